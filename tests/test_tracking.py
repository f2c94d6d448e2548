"""Experiment tracking: one switch sends a run's metrics to MLflow (local store) or TensorBoard."""

import pytest

from raycxr.config import compose
from raycxr.train.local import run_pretrain

SMALL = ["image_size=64", "batch_size=8", "encoder.embed_dim=32", "max_steps_per_epoch=2", "probe_size=0",
         "threads=2", "method=mixed", "baseline.epochs=2"]


def test_mlflow_local_store_gets_the_config_and_every_epochs_metrics(small_sites, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    res = run_pretrain(compose("pretrain", [*SMALL, *small_sites, f"out={tmp_path}", "tracking.backend=mlflow",
                                            "tracking.experiment=t-raycxr"]))
    mlflow.set_tracking_uri((tmp_path / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["t-raycxr"])
    assert len(runs) == 1 and runs["params.method"][0] == "mixed" and runs["params.baseline.epochs"][0] == "2"
    client = mlflow.tracking.MlflowClient()
    loss = client.get_metric_history(runs["run_id"][0], "loss")
    assert [m.step for m in loss] == [0, 1]
    assert [m.value for m in loss] == pytest.approx([h["loss"] for h in res["history"]])


def test_tensorboard_event_files_hold_the_metrics(small_sites, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_pretrain(compose("pretrain", [*SMALL, *small_sites, f"out={tmp_path}", "tracking.backend=tensorboard"]))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [0, 1]
    assert [e.value for e in events] == pytest.approx([h["loss"] for h in res["history"]], rel=1e-5)


def test_an_unknown_backend_is_one_line():
    with pytest.raises(ValueError, match=r"tracking.backend: must be one of \['none', 'mlflow', 'tensorboard'\]"):
        compose("pretrain", ["tracking.backend=wandb"])
