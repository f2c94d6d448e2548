"""Experiment tracking: the metrics a run writes to ``metrics.jsonl``, also sent to MLflow or TensorBoard.

One config switch, off by default (``tracking.backend: none | mlflow | tensorboard``), for
``raycxr pretrain`` (every runner: only the Ray Train worker of rank 0 reports), Tune trials (one tracked
run each) and ``raycxr study`` (its headline figures). Nothing leaves the machine unless ``tracking.uri``
points at a server:

- ``mlflow``: a local store by default (``<out>/mlruns``, MLflow's file store), or any tracking URI;
  the run's config goes in as parameters (flattened keys), every numeric record field as a metric at
  step = schedule position;
- ``tensorboard``: event files in ``<out>/tensorboard`` (``tensorboard --logdir <out>``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BACKENDS = ("none", "mlflow", "tensorboard")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Sends parameters and per-step metrics to the configured backend (a no-op for ``none``).

    Args:
        backend: ``none``, ``mlflow`` or ``tensorboard``.
        out: the run folder (the local stores go there by default).
        uri: an MLflow tracking URI (``None``: ``<out>/mlruns``).
        experiment: the MLflow experiment name.
        run_name: the tracked run's name.
    """

    def __init__(self, backend: str = "none", out: str | Path = ".", *, uri: str | None = None,
                 experiment: str = "raycxr", run_name: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"tracking.backend must be one of {BACKENDS}, got '{backend}'")
        self.backend, self.out = backend, Path(out)
        self._run: Any = None
        if backend == "mlflow":
            import mlflow

            uri = uri or (self.out / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):
                # MLflow keeps its local file store in maintenance mode behind this switch; a server URI needs none
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)
            self._mlflow = mlflow
            self._run = mlflow.start_run(run_name=run_name or self.out.name)
        elif backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._run = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    @classmethod
    def from_config(cls, cfg: Any, out: str | Path, run_name: str | None = None) -> Tracker:
        t = cfg.get("tracking") if cfg is not None else None
        if not t or t.backend == "none":
            return cls("none", out)
        return cls(str(t.backend), out, uri=t.uri, experiment=str(t.experiment),
                   run_name=run_name)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.backend == "mlflow":
            flat = {k: str(v)[:500] for k, v in _flat(params).items()}
            keys = list(flat)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
                self._mlflow.log_params({k: flat[k] for k in keys[i:i + 100]})
        elif self.backend == "tensorboard":
            text = "\n".join(f"{k}: {v}" for k, v in _flat(params).items())
            self._run.add_text("config", f"```\n{text}\n```")

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        nums = {k: float(v) for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("position",)}
        if not nums or self.backend == "none":
            return
        if self.backend == "mlflow":
            self._mlflow.log_metrics(nums, step=int(step))
        else:
            for k, v in nums.items():
                self._run.add_scalar(k, v, int(step))
            self._run.flush()

    def close(self) -> None:
        if self.backend == "mlflow" and self._run is not None:
            self._mlflow.end_run()
        elif self.backend == "tensorboard" and self._run is not None:
            self._run.close()
        self._run = None
