"""raycxr sites under FL engines: the MONAI FL ``ClientAlgo`` driven by hand through a FedAvg round (MONAI
is a core dependency), then NVIDIA FLARE's simulator and Flower's simulation each running a FedAvg job
over two tiny sites (skipped without the ``fl`` extra: nvflare, monai-nvflare, flwr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raycxr.checkpoint import Checkpoint
from raycxr.federated import weighted_average
from raycxr.methods import load_pretrained

REPO = Path(__file__).resolve().parents[1]
SMALL = ["image_size=32", "batch_size=4", "encoder.embed_dim=16", "max_steps_per_epoch=1", "threads=1",
         "probe_size=0", "val.limit=4", "method=mixed"]


def test_client_algo_lifecycle_through_a_hand_driven_fedavg_round(tmp_path):
    from monai.fl.client import ClientAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    from raycxr.federated.fl import RaycxrClientAlgo, global_checkpoint
    from raycxr.synth.generator import synthesize

    synthesize(tmp_path / "corpus", ["nih", "vindr"], n_per_site=12, seed=3, render_size=64, workers=1, progress=False)
    sites = tmp_path / "sites"
    sites.mkdir()
    for n in ("nih", "vindr"):
        (sites / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    overrides = [*SMALL, f"sites.sites_dir={sites}", f"sites.data_root={tmp_path / 'corpus'}",
                 f"out={tmp_path / 'out'}"]
    algos = [RaycxrClientAlgo(overrides) for _ in range(2)]
    for i, a in enumerate(algos):
        assert isinstance(a, ClientAlgo)
        a.initialize({ExtraItems.CLIENT_NAME: f"site-{i + 1}"})  # NVFLARE's names: the catalogue's n-th site
    assert [a.site_name for a in algos] == ["nih", "vindr"]
    init = algos[0].get_weights().weights
    assert torch.equal(init["model/encoder.backbone.conv1.weight"],
                       algos[1].get_weights().weights["model/encoder.backbone.conv1.weight"])  # same start
    outs = []
    for a in algos:
        a.train(ExchangeObject(weights=init))
        eo = a.get_weights()
        assert eo.weight_type == WeightType.WEIGHTS and eo.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] > 0
        outs.append(eo)
    n = [o.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] for o in outs]
    new = weighted_average([o.weights for o in outs], n)
    metrics = algos[0].evaluate(ExchangeObject(weights=new)).metrics
    assert 0.0 <= metrics["val_auc"] <= 1.0
    for a in algos:
        a.finalize()
    global_checkpoint(algos[0].cfg, new)
    pre = load_pretrained(tmp_path / "out")
    assert pre.method == "mixed" and pre.classifier(torch.rand(2, 1, 32, 32)).shape == (2, len(pre.class_names))


def _engine(engine: str, tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "deploy"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fl_engines.py"), "--engine", engine,
                           "--work", str(tmp_path), "--rounds", "2"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert res["max_change_from_initial"] > 0  # trained updates were averaged, not the initial model passed on
    assert Checkpoint.load(res["checkpoint"]).method == "mixed"
    assert set(res["val_auc"]) == {"nih", "vindr"}
    return res


def test_nvflare_simulator_runs_a_fedavg_job_over_raycxr_sites(tmp_path):
    pytest.importorskip("nvflare")
    pytest.importorskip("monai_nvflare")
    _engine("nvflare", tmp_path)


def test_flower_simulation_runs_fedavg_over_raycxr_sites(tmp_path):
    pytest.importorskip("flwr")
    _engine("flower", tmp_path)
