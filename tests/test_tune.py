"""The Ray Tune sweep: a real two-trial sweep on a local Ray cluster, its report, and its resume."""

import json
import math
import shutil

import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")

from conftest import TUNE_TINY  # noqa: E402

from raycxr.config import compose  # noqa: E402
from raycxr.tune import best_row, grace_period, sweep_grid, write_report  # noqa: E402

TINY = TUNE_TINY


def test_grid_defaults_and_checks():
    cfg = compose("tune")
    assert sweep_grid(cfg) == {"lam": [0.3, 0.5, 0.7], "K": [3, 4, 5], "lr": [5e-5, 1e-4]}
    assert cfg.method == "unichest" and cfg.image_size == 128  # every pretraining knob is there
    assert grace_period(cfg) == 3  # the first divide epoch: conquer epochs do not depend on λ or K
    # K's lowest value is written once (schema.UniChestSection), for the run and for every value of the grid
    with pytest.raises(ValueError, match=r"tune.n_experts: must be >= 2, got 1"):
        compose("tune", ["tune.n_experts=[2,1]"])


def test_report_names_the_best_cell(tmp_path):
    rows = [{"trial": f"t{i}", "lam": lam, "K": k, "lr": lr, "best_val_auc": auc, "best_epoch": 2, "epochs_run": 2,
             "conquer_val_auc": 0.5, "max_epochs": 3, "stopped_early": True, "error": "", "last_checkpoint": ""}
            for i, (lam, k, lr, auc) in enumerate([(0.3, 3, 1e-4, 0.61), (0.3, 3, 5e-5, 0.70), (0.7, 3, 1e-4, 0.66),
                                                   (0.7, 4, 1e-4, math.nan)])]
    grid = {"lam": [0.3, 0.7], "K": [3, 4], "lr": [5e-5, 1e-4]}
    out = write_report(rows, tmp_path, grid, "unichest")
    assert best_row(rows)["trial"] == "t1"
    best = yaml.safe_load(open(out["best_config"]))
    assert best["overrides"] == ["unichest.lam=0.3", "unichest.n_experts=3", "unichest.lr=5e-05"]
    assert "**0.7000**" in open(out["markdown"]).read()
    assert len(pd.read_csv(out["csv"])) == 4 and (tmp_path / "tune_heatmap.png").stat().st_size > 5000


def test_umif_grid_and_its_report(tmp_path):
    cfg = compose("tune", ["method=umif", "tune.umif.p_end=[null,0.0]"])
    assert sweep_grid(cfg) == {"p": [0.0, 0.2, 0.5], "tau": [0.05, 0.1], "p_end": [None, 0.0]}
    assert grace_period(cfg) == 1  # no stage where the knobs do not act
    with pytest.raises(ValueError, match="tune.umif.p"):
        sweep_grid(compose("tune", ["method=umif", "tune.umif.p=[1.5]"]))
    with pytest.raises(ValueError, match="has no sweep"):
        sweep_grid(compose("tune", ["method=ark"]))
    rows = [{"trial": f"t{i}", "p": p, "tau": tau, "p_end": pe, "best_val_auc": auc, "best_epoch": 1,
             "epochs_run": 2, "conquer_val_auc": math.nan, "max_epochs": 3, "stopped_early": False, "error": "",
             "last_checkpoint": ""}
            for i, (p, tau, pe, auc) in enumerate([(0.0, 0.1, None, 0.60), (0.2, 0.1, 0.0, 0.72),
                                                   (0.2, 0.05, None, 0.65)])]
    out = write_report(rows, tmp_path, {"p": [0.0, 0.2], "tau": [0.05, 0.1], "p_end": [None, 0.0]}, "umif")
    best = yaml.safe_load(open(out["best_config"]))
    assert best["overrides"] == ["umif.p=0.2", "umif.tau=0.1", "umif.p_end=0"] and best["trial"] == "t1"
    md = open(out["markdown"]).read()
    assert md.startswith("# umif sweep") and "| **0.2** | **0.1** | 0 | **0.7200** |" in md
    assert (tmp_path / "tune_heatmap.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_two_trial_sweep_reports_and_restores(cluster, val_sites, tmp_path):
    from raycxr.tune import run_tune

    try:
        over = [*TINY, *val_sites, "tune.lam=[0.3,0.7]", "tune.n_experts=[2]", "tune.lr=[1e-4]",
                f"tune.storage_path={tmp_path}", "tune.name=t"]
        res = run_tune(compose("tune", over))
        assert not res["restored"]
        df = pd.read_csv(tmp_path / "t" / "tune_results.csv")
        assert sorted(df["lam"]) == [0.3, 0.7] and set(df["K"]) == {2} and len(df) == 2
        assert df["best_val_auc"].map(math.isfinite).all() and (df["error"].isna() | (df["error"] == "")).all()
        # ASHA's first rung is the first divide epoch (here the last one): no trial is stopped early
        assert (df["epochs_run"] == 2).all() and not df["stopped_early"].any() and (df["best_epoch"] == 2).all()
        assert (tmp_path / "t" / "tune_heatmap.png").stat().st_size > 5000
        best = yaml.safe_load(open(tmp_path / "t" / "best_config.yaml"))
        row = df[df["trial"] == best["trial"]].iloc[0]
        assert best["overrides"] == [f"unichest.lam={row.lam}", "unichest.n_experts=2", "unichest.lr=0.0001"]
        assert best["val_auc"] == pytest.approx(df["best_val_auc"].max())
        # each trial's metrics.jsonl holds its epochs with the val AUC it reported
        logs = {r.trial: [json.loads(line) for line in open(tmp_path / "t" / "runs" / r.trial / "metrics.jsonl")]
                for r in df.itertuples()}
        assert all(len([x for x in log if x["position"] >= 0]) == r.epochs_run
                   for r, log in zip(df.itertuples(), logs.values()))

        # the same name again: restored, nothing re-run, the same table
        again = run_tune(compose("tune", over))
        assert again["restored"]
        assert pd.read_csv(tmp_path / "t" / "tune_results.csv").equals(df)
        assert {t: [json.loads(line) for line in open(tmp_path / "t" / "runs" / t / "metrics.jsonl")]
                for t in logs} == logs
        with pytest.raises(ValueError, match="other settings"):
            run_tune(compose("tune", [o if not o.startswith("tune.lam=") else "tune.lam=[0.5]" for o in over]))
    finally:
        shutil.rmtree(tmp_path / "t", ignore_errors=True)  # ~0.9 GB of checkpoints (the text encoder is in each)


@pytest.mark.ray
def test_a_umif_sweep_over_p_runs_and_ranks_its_trials(cluster, val_sites, tmp_path):
    from raycxr.tune import run_tune

    try:
        over = [*TINY, *val_sites, "method=umif", "umif.epochs=2", "tune.umif.p=[0.0,1.0]", "tune.umif.tau=[0.1]",
                "tune.umif.p_end=[null]", "tune.grace_period=2", f"tune.storage_path={tmp_path}", "tune.name=u",
                "tune.checkpoint=false"]
        res = run_tune(compose("tune", over))
        df = pd.read_csv(tmp_path / "u" / "tune_results.csv")
        assert sorted(df["p"]) == [0.0, 1.0] and (df["epochs_run"] == 2).all()
        assert df["best_val_auc"].map(math.isfinite).all()  # the prompt-head classifier, scored on val
        assert res["best"]["best_val_auc"] == pytest.approx(df["best_val_auc"].max())
        logs = {t: [json.loads(line) for line in open(tmp_path / "u" / "runs" / t / "metrics.jsonl")]
                for t in df["trial"]}
        # each trial trained with its own p (p = 1: every pair CLIP-like, r = 1)
        by_p = {float(df[df["trial"] == t]["p"].iloc[0]): [r for r in log if r["position"] >= 0]
                for t, log in logs.items()}
        assert all(r["p"] == 1.0 and r["r_mean"] == 1.0 for r in by_p[1.0])
        assert all(r["p"] == 0.0 and r["r_mean"] < 1.0 for r in by_p[0.0])
    finally:
        shutil.rmtree(tmp_path / "u", ignore_errors=True)
