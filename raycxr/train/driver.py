"""The schedule driver: runs any method's units with one position count, progress bar, metrics,
validation, checkpoint and resume, whatever the data plane (one process, Ray Train workers, Tune trials).

Per unit: the method trains it (:meth:`~raycxr.methods.base.Method.run_unit`), the driver adds the
probe figures and the val mean AUC of the model as it is now, appends one record to
``metrics.jsonl``, lets the method add its end-of-unit work (stage snapshots, heads handed back),
and saves ``checkpoint.pt`` through the run's sink (a folder, or ``ray.train.report`` /
``ray.tune.report``). A run resumed from a checkpoint continues at its position, for every method.

``best.pt`` beside it is the unit with the best val AUC over the whole schedule, whatever its stage
(UniChest: conquer or divide), the earliest on a tie (:func:`best_unit`); ``raycxr eval``, ``export``
and the demo use it (:meth:`~raycxr.checkpoint.Checkpoint.load` with ``best=True``), resuming uses
``checkpoint.pt``. The authors of UniChest likewise keep their best validation epoch (references U.6).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..checkpoint import BEST_FILENAME, FILENAME, Checkpoint
from ..engine.validation import validation_auc
from ..methods import Method, get_method, import_plugins
from ..sites.config import SiteConfig
from ..tracking import Tracker


class Run:
    """Output folder of a run: ``checkpoint.pt`` (latest), ``best.pt`` (best val AUC), stage snapshots,
    ``metrics.jsonl``, ``config.yaml``.

    Args:
        out: the run folder.
        keep_best: write ``best.pt``; off where the schedule is one piece of a larger run (a federated
            site's local epochs in one round), whose best unit is not the run's.
    """

    def __init__(self, out: str | Path, *, keep_best: bool = True) -> None:
        self.keep_best = keep_best
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

    def discard(self, name: str) -> None:
        """Remove a file a previous run left in the folder (a fresh run's stale ``best.pt``)."""
        (self.out / name).unlink(missing_ok=True)


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
    if start == 0 and run.keep_best:
        run.discard(BEST_FILENAME)  # an earlier run's best in this folder is not this run's
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
                  **_validation(method)}
        record["data_wait_s"] = round(waited, 2)
        history.append(record)
        _report(run, bar, record, t0)
        method.after_unit(unit, pos, record)
        ckpt = method.checkpoint(pos + 1, history, record.get("val_auc"))
        run.save(ckpt)  # first, so that what follows (heads handed back, snapshots) never outruns the checkpoint
        if run.keep_best and best_unit(history) is record:
            run.save(ckpt.slim(), BEST_FILENAME)
        method.end_unit(unit, pos, record, ckpt, run)
    bar.close()
    run.close()
    best = best_summary(history, run.out) if run.keep_best else None
    if best is not None:
        print(f"{method.name}: {describe_best(best)}")
    return {"history": history, "checkpoint": str(run.out / FILENAME), "best": best}


def best_unit(history: list[dict]) -> dict | None:
    """The record with the best val AUC (the earliest on a tie), or None when no unit was validated."""
    best = None
    for record in history:
        auc = record.get("val_auc")
        if auc is not None and record.get("position", 0) >= 0 and (best is None or auc > best["val_auc"]):
            best = record
    return best


# what a unit's record says about where it sits in the schedule, for the run summary
_PLACE = ("stage", "epoch", "round", "site")


def best_summary(history: list[dict], out: str | Path) -> dict | None:
    """Where the run's ``best.pt`` comes from: ``{"val_auc", "position", "stage"/"epoch"/"round"/"site"
    (those the method's units have), "checkpoint"}``; None when no unit was validated."""
    record = best_unit(history)
    if record is None:
        return None
    path = Path(out) / BEST_FILENAME
    return {"val_auc": record["val_auc"], "position": record["position"],
            **{k: record[k] for k in _PLACE if k in record},
            "checkpoint": str(path) if path.is_file() else None}


def best_place(best: dict) -> str:
    """Where the best unit sits in the schedule, e.g. "stage conquer, epoch 3"."""
    return ", ".join(f"{k} {best[k]}" for k in _PLACE if k in best) or f"unit {best['position'] + 1}"


def describe_best(best: dict) -> str:
    """One line for logs and summaries: "best val AUC 0.7321 at stage conquer, epoch 3 (unit 4 of the
    schedule): runs/x/best.pt, which eval and export use"."""
    return (f"best val AUC {best['val_auc']:.4f} at {best_place(best)} (unit {best['position'] + 1} of the schedule): "
            f"{best['checkpoint'] or 'no best.pt here'}, which eval and export use")


def _validation(method: Method) -> dict:
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
    out = validation_auc(classifier, names, batches, method.data.union.names)
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
