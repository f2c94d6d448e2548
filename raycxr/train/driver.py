"""The schedule driver: runs any method's units with one position count, progress bar, metrics,
validation, checkpoint and resume, whatever the data plane (one process, Ray Train workers, Tune trials).

Per unit: the method trains it (:meth:`~raycxr.methods.base.Method.run_unit`), the driver adds the
probe figures and the val mean AUC of the model as it is now, appends one record to
``metrics.jsonl``, lets the method add its end-of-unit work (stage snapshots, heads handed back),
and saves ``checkpoint.pt`` through the run's sink (a folder, or ``ray.train.report`` /
``ray.tune.report``). A run resumed from a checkpoint continues at its position, for every method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..checkpoint import FILENAME, Checkpoint
from ..methods import Method, get_method, import_plugins
from ..sites.config import SiteConfig
from ..tracking import Tracker
from .validation import validate


class Run:
    """Output folder of a run: ``checkpoint.pt`` (latest), stage snapshots, ``metrics.jsonl``, ``config.yaml``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"
        self.tracker: Tracker | None = None

    def write_config(self, cfg: DictConfig) -> None:
        """Write ``config.yaml`` and start tracking (``tracking:``) with the config as parameters."""
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self.tracker = Tracker.from_config(cfg, self.out)
        self.tracker.log_params(OmegaConf.to_container(cfg, resolve=True))

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(record, int(record.get("position", 0)))

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def save(self, checkpoint: Checkpoint, name: str = FILENAME) -> Path:
        return checkpoint.save(self.out / name)


def train_method(cfg: DictConfig, sites: dict[str, SiteConfig], run: Run, resume: Checkpoint | None, data: Any,
                 method_cls: type[Method] | None = None) -> dict[str, Any]:
    """Build ``cfg.method`` (or ``method_cls``) on a data plane and run its schedule into ``run``."""
    torch.manual_seed(int(cfg.seed))
    torch.set_num_threads(max(1, int(cfg.get("threads") or torch.get_num_threads())))
    if method_cls is None:
        import_plugins(cfg.get("plugins"))
        method_cls = get_method(cfg.method)
    run.write_config(cfg)
    return run_schedule(method_cls(cfg, sites, data), run, resume)


def run_schedule(method: Method, run: Run, resume: Checkpoint | None) -> dict[str, Any]:
    """Train ``method`` from ``resume``'s position (or the start) to the end of its schedule."""
    method.run = run
    start = method.setup(resume)
    units = method.units()
    history = list(resume.history) if resume is not None else []
    history = [h for h in history if h.get("position", 0) < start]
    bar = tqdm(total=len(units), initial=min(start, len(units)), desc=method.name, unit=method.unit_name,
               dynamic_ncols=True)
    if start == 0:
        before = method.probe(None)
        if before:
            run.log({"method": method.name, "position": -1, **before})
    for pos in range(start, len(units)):
        unit = units[pos]
        method.start_unit(unit, pos)
        t0 = time.perf_counter()
        method.data.take_wait()  # what the trainer waited for batches in this unit only
        means = method.run_unit(unit, pos)
        waited = method.data.take_wait()
        record = {"method": method.name, **unit.fields, "position": pos, **means, **method.probe(unit),
                  **_validate(method)}
        record["data_wait_s"] = round(waited, 2)
        history.append(record)
        _report(run, bar, record, t0)
        method.after_unit(unit, pos, record)
        ckpt = method.checkpoint(pos + 1, history, record.get("val_auc"))
        run.save(ckpt)  # first, so that what follows (heads handed back, snapshots) never outruns the checkpoint
        method.end_unit(unit, pos, record, ckpt, run)
    bar.close()
    run.close()
    return {"history": history, "checkpoint": str(run.out / FILENAME)}


def _validate(method: Method) -> dict:
    """``{"val_auc", "val_images", "val_seconds"}`` for the model as it is now, or ``{}`` when validation is
    off or the method has nothing to score yet."""
    batches = method.data.val_batches()
    if batches is None:
        return {}
    t0 = time.perf_counter()
    current = method.current_classifier()
    if current is None:
        return {}
    classifier, names = current
    out = validate(classifier, names, batches, method.data.union.names)
    return {**out, "val_seconds": round(time.perf_counter() - t0, 2)}


def _report(run: Run, bar: tqdm, record: dict, t0: float) -> None:
    record["seconds"] = round(time.perf_counter() - t0, 2)
    train_s = record["seconds"] - record.get("val_seconds", 0.0)  # training throughput, validation excluded
    record["images_per_s"] = round(record.get("images", 0) / max(train_s, 1e-9), 1)
    # the share of training time spent waiting for batches: near 0 when the data plane keeps up
    record["data_wait_frac"] = round(min(1.0, record.get("data_wait_s", 0.0) / max(train_s, 1e-9)), 3)
    run.log(record)
    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", ips=record["images_per_s"],
                    wait=f"{record['data_wait_frac']:.0%}",
                    **({"val_auc": record["val_auc"]} if record.get("val_auc") is not None else {}))
    bar.update(1)
