"""One-line errors that say what to type (issue 25, "also seen"): a pretraining key that belongs to a
method's section, and `raycxr eval` over registered sites of which one has no manifest."""

from __future__ import annotations

import yaml

from raycxr.cli import main


def test_an_unknown_override_names_the_nearest_keys(capsys):
    assert main(["pretrain", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Could not override 'epochs'" in err
    assert "nearest keys: unichest.conquer_epochs" in err and "baseline.epochs" in err


def test_eval_names_site_names_when_a_registered_site_has_no_manifest(tmp_path, small_corpus, capsys):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "nih.yaml").write_text(yaml.safe_dump({"name": "nih", "adapter": "manifest", "root": "nih"}))
    (sites / "gone.yaml").write_text(yaml.safe_dump({"name": "gone", "adapter": "manifest", "root": "gone"}))
    assert main(["eval", f"run={tmp_path / 'no_run'}", f"sites.sites_dir={sites}",
                 f"sites.data_root={small_corpus}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site(s) ['gone'] have no manifest" in err
    assert "site_names=[nih]" in err and "every registered site by default" in err
