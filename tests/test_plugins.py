"""Plug-ins from outside raycxr, one of each kind, used through the normal commands:

- a method and a site objective (``tests/outside_plugin.py``) named in the config's ``plugins``, trained by
  ``raycxr pretrain`` on a site whose YAML says ``objective: outside_spread``;
- a site adapter and an export target (``tests/outside_entry_point.py``) from an installed package's entry
  point (group ``raycxr.plugins``; the package here is a ``.dist-info`` folder put on ``sys.path``, which is
  what ``pip install`` writes), used by ``raycxr sites build`` and ``raycxr export exporter=...``.
"""

import json
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from raycxr import cli
from raycxr.config import compose
from raycxr.methods import load_pretrained
from raycxr.methods.registry import METHOD_REGISTRY
from raycxr.sites.adapters import ADAPTER_REGISTRY
from raycxr.sites.config import discover_sites

SMALL = ["image_size=64", "batch_size=8", "encoder.embed_dim=32", "max_steps_per_epoch=1", "threads=2",
         "probe_size=0", "val.enabled=false"]


@pytest.fixture(autouse=True)
def forget_plugins():
    """After each test its plug-ins are forgotten (registries, modules, entry points loaded), so every other
    test file sees raycxr's own registries whatever the order."""
    from raycxr import registry
    from raycxr.export import EXPORTER_REGISTRY
    from raycxr.objectives import OBJECTIVE_REGISTRY

    registries = [METHOD_REGISTRY, OBJECTIVE_REGISTRY, ADAPTER_REGISTRY, EXPORTER_REGISTRY]
    before = [dict(r.entries) for r in registries]
    yield
    for r, entries in zip(registries, before):
        r.entries.clear()
        r.entries.update(entries)
    for module in ("outside_plugin", "outside_entry_point"):
        sys.modules.pop(module, None)
    registry._loaded_entry_points.difference_update({k for k in registry._loaded_entry_points if "outside" in k})


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``outside_entry_point`` as an installed package's ``raycxr.plugins`` entry point."""
    d = tmp_path_factory.mktemp("site-packages")
    info = d / "raycxr_outside_lab-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raycxr-outside-lab\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[raycxr.plugins]\noutside_lab = outside_entry_point\n")
    sys.path.insert(0, str(d))
    yield
    sys.path.remove(str(d))


def test_a_method_and_an_objective_from_the_config_plugins_train(small_corpus, tmp_path):
    assert "outside" not in METHOD_REGISTRY.entries  # nothing imported it yet: the config will
    d = tmp_path / "sites"
    d.mkdir()
    for name in ("nih", "siim"):  # siim trains the outside objective, without its labels
        (d / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "adapter": "manifest", "root": str(small_corpus / name),
             **({"objective": "outside_spread"} if name == "siim" else {})}))
    run = tmp_path / "run"
    assert cli.main(["pretrain", "plugins=[outside_plugin]", "method=outside", f"sites.sites_dir={d}",
                     f"out={run}", *SMALL]) == 0
    rec = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any("spread" in r for r in rec)  # the outside objective's loss term was logged
    pre = load_pretrained(run)
    assert pre.method == "outside" and pre.classifier is None and pre.sites == ["nih", "siim"]


def test_a_plugin_that_cannot_be_imported_is_one_clear_error():
    with pytest.raises(ValueError, match="plugin module 'no_such_lab.methods' cannot be imported"):
        compose("pretrain", ["plugins=[no_such_lab.methods]"])


def test_an_adapter_from_an_entry_point_builds_a_site(installed, tmp_path, capsys):
    root = tmp_path / "hospital"
    root.mkdir()
    rng = np.random.default_rng(0)
    findings = {}
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / f"img{i}.png")
        findings[f"img{i}.png"] = ["Effusion"] if i % 3 == 0 else ["Cardiomegaly", "Effusion"] if i % 3 == 1 else []
    (root / "findings.json").write_text(json.dumps(findings))
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "lab.yaml").write_text(yaml.safe_dump({"name": "lab", "adapter": "findings_json", "root": str(root)}))
    over = [f"sites_dir={sites}", f"data_root={tmp_path}"]
    assert cli.main(["sites", "build", "lab", *over]) == 0
    assert "findings_json" in ADAPTER_REGISTRY  # found through the entry point
    assert "wrote 12 rows" in capsys.readouterr().out
    m = discover_sites(sites, data_root=tmp_path)["lab"].load_manifest()
    assert m.label_names == ["Cardiomegaly", "Effusion"] and len(m) == 12
    assert cli.main(["sites", "adapters", "findings_json", *over]) == 0
    assert "PNGs + findings.json" in capsys.readouterr().out


def test_an_export_target_from_an_entry_point_writes_graphs_that_pass_parity(installed, small_sites, tmp_path):
    from omegaconf import OmegaConf

    from raycxr.checkpoint import Checkpoint
    from raycxr.models.factory import LinearClassifier, build_encoder

    cfg = compose("pretrain", ["method=mixed", "image_size=32", "encoder.embed_dim=16", *small_sites])
    model = LinearClassifier(build_encoder(cfg, checkpoint=False), 2)  # an untrained union-head run
    run = tmp_path / "run"
    Checkpoint(method="mixed", config=OmegaConf.to_container(cfg, resolve=True), modules={"model": model.state_dict()},
               meta={"class_names": ["Effusion", "Cardiomegaly"], "site_names": []}).save(run / "checkpoint.pt")
    assert cli.main(["export", f"run={run}", "exporter=unfolded", "threads=2", *small_sites]) == 0
    result = json.loads((run / "export" / "export.json").read_text())
    assert result["exporter"].startswith("outside plug-in: TorchScript tracer without constant folding")
    assert result["parity"]["classifier"]["max_abs_diff"] <= 1e-4 and (run / "export" / "encoder.onnx").is_file()
