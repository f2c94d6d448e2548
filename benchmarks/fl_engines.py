"""raycxr sites under real FL engines: NVIDIA FLARE's simulator and Flower's simulation, FedAvg over two
tiny demo sites, each ending in a raycxr checkpoint that ``raycxr eval`` / ``load_pretrained`` reads.

Needs the ``fl`` extra (``pip install -e '.[fl]'``, or a venv that has nvflare, monai-nvflare and flwr):

    python benchmarks/fl_engines.py --engine nvflare --work runs/fl-engines
    python benchmarks/fl_engines.py --engine flower --work runs/fl-engines

Each run writes ``<work>/<engine>/checkpoint.pt`` (the global model) and prints one JSON line with the
global model's val mean AUC on each site and the wall time. ``tests/test_fl_engines.py`` runs both and
skips without the extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["image_size=32", "batch_size=4", "encoder.embed_dim=16", "max_steps_per_epoch=1", "threads=1",
         "probe_size=0", "val.limit=8", "method=mixed"]


def demo_sites(work: Path) -> list[str]:
    """Two tiny synthetic sites (nih, vindr), built once under ``work``; their config overrides."""
    import yaml

    from raycxr.synth.generator import synthesize

    corpus, sites = work / "corpus", work / "sites"
    if not (corpus / "vindr" / "manifest.parquet").is_file():
        synthesize(corpus, ["nih", "vindr"], n_per_site=12, seed=3, render_size=64, workers=1, progress=False)
    sites.mkdir(parents=True, exist_ok=True)
    for n in ("nih", "vindr"):
        (sites / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    return [f"sites.sites_dir={sites}", f"sites.data_root={corpus}"]


def run_nvflare(work: Path, rounds: int) -> Path:
    """NVFLARE's simulator: FedAvg controller and :class:`RaycxrPersistor` on the server, monai-nvflare's
    ``ClientAlgoExecutor`` (:class:`RaycxrClientAlgoExecutor`: its result made readable by NVFLARE 2.7)
    driving a :class:`RaycxrClientAlgo` on each of two clients."""
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.job_config.api import FedJob

    from raycxr.federated.fl import RaycxrClientAlgo, RaycxrClientAlgoExecutor, RaycxrPersistor

    out = work / "nvflare"
    overrides = [*SMALL, *demo_sites(work), f"out={out}"]
    job = FedJob(name="raycxr_fedavg", min_clients=2)
    job.to_server(RaycxrPersistor(overrides=overrides), id="persistor")
    job.to_server(FedAvg(num_clients=2, num_rounds=rounds, persistor_id="persistor"))
    job.to_clients(RaycxrClientAlgo(overrides=overrides), id="client_algo")
    job.to_clients(RaycxrClientAlgoExecutor(client_algo_id="client_algo", key_metric="val_auc"), tasks=["train"])
    job.simulator_run(str(work / "nvflare-workspace"), n_clients=2, threads=1)
    return out


def run_flower(work: Path, rounds: int) -> Path:
    """Flower's simulation (its Ray backend): Flower's FedAvg ``ServerApp``, a raycxr ``ClientApp`` per node."""
    from flwr.simulation import run_simulation

    from raycxr.federated.fl import flower_client_app, flower_server_app

    out = work / "flower"
    overrides = [*SMALL, *demo_sites(work), f"out={out}"]
    run_simulation(server_app=flower_server_app(overrides, rounds, 2), client_app=flower_client_app(overrides),
                   num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                     "init_args": {"num_cpus": 2, "include_dashboard": False}})
    return out


def score(out: Path, work: Path) -> dict:
    """The global model's val mean AUC on each site (through ``load_pretrained``, as eval and export read it)."""
    from raycxr.config import compose
    from raycxr.engine.validation import validation_auc
    from raycxr.methods import load_pretrained
    from raycxr.train.local import LocalData, select_sites

    pre = load_pretrained(out)
    cfg = compose("federate", [*SMALL, *demo_sites(work), "val.limit=null"])
    res = {}
    for name, site in select_sites(cfg).items():
        data = LocalData(cfg, {name: site})
        r = validation_auc(pre.classifier, pre.class_names, data.val_batches(), data.union.names)
        res[name] = r["val_auc"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["nvflare", "flower"], required=True)
    p.add_argument("--work", default="runs/fl-engines")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(REPO))
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = (run_nvflare if a.engine == "nvflare" else run_flower)(work, a.rounds)
    seconds = round(time.perf_counter() - t0, 1)
    from raycxr.checkpoint import Checkpoint
    from raycxr.config import compose
    from raycxr.federated.fl import initial_shared

    ck = Checkpoint.load(out)
    init = initial_shared(compose("federate", [*SMALL, *demo_sites(work), f"out={out}"]))
    model = {f"model/{k}": v for k, v in ck.modules["model"].items()}
    # the engine really averaged trained updates: the global model is no longer the initial one
    moved = max(float((model[k].double() - v.double()).abs().max()) for k, v in init.items() if v.is_floating_point())
    print(json.dumps({"engine": a.engine, "rounds": a.rounds, "checkpoint": str(out / "checkpoint.pt"),
                      "method": ck.method, "val_auc": score(out, work), "max_change_from_initial": moved,
                      "seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
