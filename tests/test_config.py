"""Config errors reach users as one line naming the key or the file, never a traceback."""

import pytest
import torch

from raycxr.checkpoint import Checkpoint
from raycxr.cli import main
from raycxr.config import compose
from raycxr.schema import SCHEMAS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_config_matches_its_schema(name):
    compose(name, [])  # a key the YAML has and the schema lacks (or the reverse) fails here


@pytest.mark.parametrize("override,message", [
    ("image_size=-5", "image_size: must be >= 1, got -5"),
    ("baseline.epochs=two", "baseline.epochs: 'two' is not an integer"),
    ("image_size=abc", "image_size: 'abc' is not an integer"),
    ("unichest.loss.gamma_neg=x", "unichest.loss.gamma_neg: 'x' is not a float"),
    ("runner=slurm", "runner: must be one of ['local', 'ray'], got 'slurm'"),
    ("+unichest.tpyo=1", "unichest.tpyo: unknown key"),
    ("ark.ema_mode=sometimes", "ark.ema_mode: must be one of ['epoch', 'iteration']"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message, capsys):
    assert main(["pretrain", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_plugin_methods_own_section_passes():
    assert compose("pretrain", ["+mine.lr=0.1"]).mine.lr == 0.1


def test_truncated_and_interrupted_checkpoints_are_named(small_sites, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    Checkpoint(method="mixed", config={"encoder": {"name": "resnet18"}, "image_size": 64}).save(good / "checkpoint.pt")
    (good / "checkpoint.pt.tmp").write_bytes(b"")  # a save killed half-way: never read
    assert Checkpoint.load(good).method == "mixed"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": torch.zeros(1000)}, bad / "full.pt")
    (bad / "checkpoint.pt").write_bytes((bad / "full.pt").read_bytes()[:300])  # truncated zip
    for argv in (["pretrain", f"resume={bad}", *small_sites, f"out={tmp_path / 'o'}"],
                 ["export", f"run={bad}", *small_sites]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{bad / 'checkpoint.pt'} cannot be read (truncated" in err and len(err.splitlines()) == 1
    only_tmp = tmp_path / "killed"
    only_tmp.mkdir()
    (only_tmp / "checkpoint.pt.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt.tmp there is a save that was interrupted"):
        Checkpoint.load(only_tmp)


@pytest.mark.parametrize("extra,message", [
    ({"labels": {"uncertain_polcy": "ones"}}, "labels: unknown keys ['uncertain_polcy']"),
    ({"placement": {"label_selecter": {"site": "a"}}}, "placement: unknown keys ['label_selecter']"),
    ({"placement": {"label_selector": "site=a"}}, "placement.label_selector must be a mapping"),
])
def test_nested_site_yaml_typos_are_refused(extra, message):
    from raycxr.sites.config import SiteConfig, SiteConfigError

    with pytest.raises(SiteConfigError, match="site file a.yaml: " + message.replace("[", r"\[").replace("]", r"\]")):
        SiteConfig.from_dict({"name": "a", "adapter": "manifest", "root": "a", **extra}, source="a.yaml")
