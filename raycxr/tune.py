"""``raycxr tune``: a Ray Tune sweep over a method's knobs, ranked by the val mean AUC.

- The grid is the method's (:attr:`~raycxr.methods.Method.tune_space`, checked by its ``tune_grid``): UniChest
  ``tune.lam`` × ``tune.n_experts`` × ``tune.lr``; UmiF ``tune.umif.p`` × ``tune.umif.tau`` × ``tune.umif.p_end``
  (the grouping, the temperature and the r schedule), each through ``tune.grid_search``; every other knob
  is the pretraining config (``raycxr/configs/tune.yaml`` composes ``raycxr/configs/pretrain.yaml``). The method also
  says which stage ranks a trial (``tune_ranked_stage``) and where ASHA's first rung is (``tune_first_rung``).
- Each trial runs :func:`raycxr.train.driver.train_method` with :class:`~raycxr.train.local.LocalData` in
  the trial process, reporting once per epoch through ``ray.tune.report`` (metrics, ``val_auc``
  included, plus a checkpoint). ASHA stops trials whose val AUC trails at a rung.
- Resume: run again with the same ``tune.name`` / ``tune.storage_path``; ``Tuner.restore`` resumes
  unfinished and errored trials from their last checkpoint and leaves finished ones alone.
- Output in ``<storage_path>/<name>``: ``tune_results.csv`` / ``.md``, ``tune_heatmap.png`` (the first two
  knobs, e.g. λ × K, best ranked val AUC, max over the third), ``best_config.yaml`` (the overrides for
  ``raycxr pretrain``)
  and ``runs/<trial>/metrics.jsonl``.

Why trials run the single-process schedule by default (``tune.trial_runner=local``), not a
``TorchTrainer`` per trial: a sweep's parallelism is across trials, and one trial of the grid fits one
process; a Train run per trial adds a controller, a worker group and site actors per trial (a tiny trial
took ~33 s that way on 2 CPU cores, ~5 s in one process) for no gain at that size, and Tune and Train V2
share resources badly when nested (the limit below; ray#54305). For trials too big for one process,
``tune.trial_runner=ray`` is the V2 way: each trial builds and fits a ``TorchTrainer`` (site actors,
``ray.num_workers`` workers) that reports to Tune through
``ray.tune.integration.ray_train.TuneReportCallback``; the trial itself holds no CPU, so
``tune.max_concurrent_trials`` bounds how many worker groups run at once. Known limit (Ray 2.60): a
trial ASHA stops is killed with its Train controller, whose worker group's placement group is then freed
only by V2's cleaner, which needs the State API (``ray[default]``, dashboard on); on a minimal Ray
install those CPUs stay reserved until the cluster stops.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .checkpoint import FILENAME, Checkpoint
from .methods import Method, get_method, list_methods
from .methods.base import TuneKnob
from .train.driver import Run, train_method
from .train.local import LocalData, select_sites

METRIC = "val_auc"


def _values(v: Any) -> list:
    return list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else [v]


def swept_method(method: str | type[Method]) -> type[Method]:
    """The method class of a sweep; a method without a ``tune_space`` is refused, naming those that have one."""
    cls = get_method(method) if isinstance(method, str) else method
    if not cls.tune_space:
        swept = [m for m in list_methods() if get_method(m).tune_space]
        raise ValueError(f"raycxr tune sweeps {swept}; method={cls.name} has no sweep")
    return cls


def sweep_columns(cfg: DictConfig) -> dict[str, TuneKnob]:
    return swept_method(cfg.method).tune_space


def sweep_grid(cfg: DictConfig) -> dict[str, list]:
    """The method's grid from ``cfg.tune``, e.g. ``{"lam": [...], "K": [...], "lr": [...]}``."""
    cls = swept_method(cfg.method)
    grid = cls.tune_grid({col: _values(OmegaConf.select(cfg, knob.grid)) for col, knob in cls.tune_space.items()})
    if any(not vals for vals in grid.values()):
        raise ValueError(f"tune: every knob needs at least one value, got {grid}")
    return grid


def max_epochs(cfg: DictConfig) -> int:
    return swept_method(cfg.method).tune_epochs(cfg)


def grace_period(cfg: DictConfig) -> int:
    """ASHA's first rung: ``tune.grace_period``, by default the method's first epoch at which the swept
    knobs act (UniChest's first divide epoch, since λ and K only enter the model's output in divide)."""
    g = cfg.tune.get("grace_period")
    first = swept_method(cfg.method).tune_first_rung(cfg)
    return max(1, min(int(g) if g is not None else first, max_epochs(cfg)))


def trial_config(base: dict, params: dict) -> DictConfig:
    """The pretraining config of one trial: the sweep's base config with the swept knobs set."""
    cfg = OmegaConf.create(base)
    for col, knob in sweep_columns(cfg).items():
        OmegaConf.update(cfg, knob.key, params[col])
    return cfg


def _metrics(record: dict) -> dict:
    """What Tune gets per epoch: the record's numbers; a missing val AUC is NaN (ASHA skips it)."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    out[METRIC] = float(record[METRIC]) if record.get(METRIC) is not None else math.nan
    out["epochs_done"] = int(record.get("position", 0)) + 1
    return out


class TuneRun(Run):
    """Checkpoint sink of a trial: ``metrics.jsonl`` and stage snapshots in the trial's run folder,
    and one ``ray.tune.report`` per epoch with the epoch's metrics and checkpoint.

    The report happens in :meth:`save`, not :meth:`log`: the schedule logs then saves every epoch, and
    one report per epoch keeps Tune's ``training_iteration`` equal to the epoch count that ASHA's
    ``max_t`` and ``grace_period`` are in. The latest state lives in Tune's checkpoint only (no
    second copy as ``checkpoint.pt``)."""

    def __init__(self, out: str | Path, *, checkpoint: bool = True) -> None:
        super().__init__(out, keep_best=checkpoint)  # best.pt in the trial's folder, unless checkpoints are off
        self.checkpoint = checkpoint
        self.last: dict = {}

    def log(self, record: dict) -> None:
        self.last = record
        super().log(record)

    def save(self, checkpoint: Checkpoint, name: str = FILENAME) -> Path:
        import ray.tune

        if name != FILENAME:  # stage snapshots (conquer.pt): the schedule reads them back
            return super().save(checkpoint, name)
        metrics = _metrics(self.last)
        if not self.checkpoint:
            ray.tune.report(metrics)
            return self.out / name
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(Path(d) / FILENAME)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))
        return self.out / name


def run_trial(params: dict, base: dict) -> None:
    """One trial (what Tune runs): the method's schedule in this process, resumed from the trial's
    last checkpoint when Tune restarts or restores it."""
    import ray.tune

    cfg = trial_config(base, params)
    name = ray.tune.get_context().get_trial_id()
    run = TuneRun(Path(base["out"]) / "runs" / name, checkpoint=bool(cfg.tune.checkpoint))
    resume = None
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = Checkpoint.load(Path(d) / FILENAME)
        print(f"trial {name}: resuming at epoch {resume.position}")
    sites = select_sites(cfg)
    train_method(cfg, sites, run, resume, LocalData(cfg, sites))


def run_trial_on_train(params: dict, base: dict) -> None:
    """One trial as a Ray Train run (``tune.trial_runner=ray``): the trial's own site actors and a
    ``TorchTrainer`` running :func:`raycxr.ray.runner.train_loop_per_worker`, reporting every
    epoch to Tune. A restored trial resumes from its Train run's checkpoint (same name and storage)."""
    import ray.tune

    from .ray.launch import build_trainer, start_site_actors
    from .ray.runner import train_loop_per_worker

    cfg = trial_config(base, params)
    trial = ray.tune.get_context().get_trial_id()
    exp = Path(base["out"])
    cfg.out, cfg.runner = str(exp / "runs" / trial), "ray"
    cfg.ray.run_name = f"{exp.name}-{trial}"  # also names this trial's site actors
    sites = select_sites(cfg)
    actors = start_site_actors(cfg, sites, cfg.ray.run_name)
    build_trainer(cfg, actors, train_loop_per_worker, name=cfg.ray.run_name, storage=exp / "train",
                  callbacks=[_train_to_tune()], sites=sites).fit()


def _train_to_tune() -> Any:
    """``TuneReportCallback`` that also fills what the sweep needs in every report: ``val_auc`` (NaN
    when an epoch had none; Tune refuses results without the scheduler's metric) and ``epochs_done``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Report(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            super().after_report(run_context, [_metrics(m) for m in metrics], checkpoint)

    return _Report()


def _base_config(cfg: DictConfig) -> dict:
    """The resolved config every trial starts from, with paths made absolute: trials run in another
    working directory (Tune's trial folder), possibly on another node."""
    cfg = cfg.copy()
    cfg.out = str(Path(cfg.tune.storage_path).resolve() / cfg.tune.name)  # the sweep's folder
    cfg.sites.sites_dir = str(Path(cfg.sites.sites_dir).resolve())
    cfg.sites.data_root = str(Path(cfg.sites.data_root).resolve())
    for key in ("text.model_dir", "encoder.checkpoint"):
        v = OmegaConf.select(cfg, key)
        if v and not str(v).startswith(("hf://", "http")) and Path(v).exists():
            OmegaConf.update(cfg, key, str(Path(v).resolve()))
    if cfg.get("threads") is None:  # one trial must not take every core of the node
        cfg.threads = max(1, int(math.ceil(float(cfg.tune.cpus_per_trial))))
    return OmegaConf.to_container(cfg, resolve=True)


def _fingerprint(base: dict, grid: dict) -> dict:
    """What must not change between a sweep and its resume (scheduling knobs may)."""
    keep = {k: v for k, v in base.items() if k not in ("tune", "ray", "threads", "out")}
    t = base["tune"]
    return {"grid": grid, "grace_period": t.get("grace_period"), "reduction_factor": t["reduction_factor"],
            "config": json.loads(json.dumps(keep, default=str))}


def _check_same_sweep(exp: Path, fp: dict) -> None:
    path = exp / "sweep.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fp, indent=2))
        return
    old = json.loads(path.read_text())
    if old != fp:
        diff = sorted(k for k in set(old["config"]) | set(fp["config"]) if old["config"].get(k) != fp["config"].get(k))
        diff += [k for k in ("grid", "grace_period", "reduction_factor") if old.get(k) != fp.get(k)]
        raise ValueError(f"sweep '{exp.name}' in {exp.parent} was started with other settings (differs in: {diff}); "
                         "resume it with the same overrides, or start a new one with tune.name=NEW")


def run_tune(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; returns ``{"rows", "best", "csv", "markdown", "heatmap", "best_config",
    "restored", "path"}``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .ray.launch import init_ray

    sweep_columns(cfg)
    if not cfg.val.enabled:
        raise ValueError("raycxr tune ranks trials by the val AUC: val.enabled must be true")
    if cfg.get("resume"):
        raise ValueError("resume= is for one run; a sweep resumes by running again with the same tune.name "
                         "(start every trial from weights with encoder.checkpoint=...)")
    if cfg.tune.trial_runner not in ("local", "ray"):
        raise ValueError(f"tune.trial_runner must be local or ray, got {cfg.tune.trial_runner}")
    grid = sweep_grid(cfg)
    select_sites(cfg)  # unknown site names fail here, not in every trial
    base = _base_config(cfg)
    t = cfg.tune
    exp = Path(base["out"])
    storage, name = str(exp.parent), exp.name
    _check_same_sweep(exp, _fingerprint(base, grid))

    init_ray(cfg)
    max_concurrent = t.max_concurrent_trials
    if t.trial_runner == "ray":
        # the trial only drives its TorchTrainer, whose worker group asks for its own resources (a bundle
        # cannot be empty: a token CPU share)
        trainable = tune.with_resources(tune.with_parameters(run_trial_on_train, base=base), {"cpu": 0.01})
        if max_concurrent is None:
            per = int(cfg.ray.num_workers) * float(cfg.ray.cpus_per_worker)
            max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // max(per, 1)))
    else:
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=base),
                                        {"cpu": float(t.cpus_per_trial), "gpu": float(t.gpus_per_trial)})
    # num_to_keep forces an experiment snapshot per checkpoint; Tune warns about it every few seconds
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    n_trials = math.prod(len(v) for v in grid.values())
    restored = tune.Tuner.can_restore(str(exp))
    if restored:
        print(f"restoring sweep {exp}: finished trials are kept, unfinished and errored ones resume")
        tuner = tune.Tuner.restore(str(exp), trainable, resume_errored=True)
    else:
        print(f"sweep {exp}: {n_trials} trials ({' × '.join(f'{k} {v}' for k, v in grid.items())}), "
              f"{max_epochs(cfg)} epochs each, ASHA on {METRIC} from epoch {grace_period(cfg)}")
        # a Tune STOP kills the trial at once, mid-way through its last epoch's bookkeeping (divide.pt; with
        # trial_runner=ray the Train controller too, before it frees its worker group: V2's placement-group
        # cleaner needs the State API), so max_t lies one past the last epoch and a full trial returns by itself
        max_t = max_epochs(cfg) + 1
        scheduler = ASHAScheduler(metric=METRIC, mode="max", time_attr="training_iteration",
                                  max_t=max_t, grace_period=grace_period(cfg),
                                  reduction_factor=float(t.reduction_factor))
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune.grid_search(v) for k, v in grid.items()},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=t.num_to_keep)),
        )
    results = tuner.fit()
    rows = result_rows(results, max_epochs(cfg), cfg.method)
    return {**write_report(rows, exp, grid, cfg.method), "restored": restored, "path": str(exp)}


def result_rows(results: Any, max_t: int, method: str | type[Method]) -> list[dict]:
    """One row per trial: the swept knobs, the best val AUC over the method's ranked epochs
    (``tune_ranked_stage``, e.g. UniChest's divide, where λ and K act; None: every epoch) and its epoch, the
    best over its reference stage (``<stage>_val_auc``, e.g. UniChest's conquer), epochs run, stopped early
    or not."""
    cls = swept_method(method)
    columns, ranked_stage, reference = list(cls.tune_space), cls.tune_ranked_stage, cls.tune_reference_stage
    rows = []
    for res in results:
        df = res.metrics_dataframe
        aucs = [float(x) for x in df[METRIC]] if df is not None and METRIC in df else []
        stages = list(df["stage"]) if df is not None and "stage" in df else [ranked_stage] * len(aucs)
        finite = [(a, i) for i, (a, st) in enumerate(zip(aucs, stages))
                  if math.isfinite(a) and (ranked_stage is None or st == ranked_stage)]
        ref = [a for a, st in zip(aucs, stages) if math.isfinite(a) and st == reference]
        best, at = max(finite) if finite else (math.nan, -1)
        epochs = int(df["training_iteration"].max()) if df is not None and len(df) else 0
        # the trial's last state (what a resumed trial continues from), not the best epoch's
        ckpt = res.checkpoint.path if res.checkpoint is not None else ""
        if not ckpt and df is not None and "checkpoint_path" in df:  # trial_runner=ray: the Train run's
            ckpt = str(df["checkpoint_path"].dropna().iloc[-1]) if df["checkpoint_path"].notna().any() else ""
        rows.append({"trial": res.metrics.get("trial_id", Path(res.path).name),
                     **{c: res.config[c] for c in columns},
                     "best_val_auc": round(best, 5) if finite else math.nan,
                     "best_epoch": at + 1 if finite else None,
                     **({f"{reference}_val_auc": round(max(ref), 5) if ref else math.nan} if reference else {}),
                     "epochs_run": epochs, "max_epochs": max_t,
                     "stopped_early": res.error is None and epochs < max_t,
                     "error": type(res.error).__name__ if res.error is not None else "",
                     "last_checkpoint": ckpt})
    return sorted(rows, key=lambda r: tuple(_sort_key(r[c]) for c in columns))


def _sort_key(v: Any) -> tuple[int, float]:
    return (0, -1.0) if v is None else (1, float(v))


def best_row(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if math.isfinite(r["best_val_auc"])]
    return max(ok, key=lambda r: r["best_val_auc"]) if ok else None


def _fmt(v: Any) -> str:
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def write_report(rows: list[dict], out: Path, grid: dict[str, list], method: str | type[Method]) -> dict[str, Any]:
    """``tune_results.csv`` / ``.md``, the heat-map and ``best_config.yaml`` in ``out``; prints the best."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cls = swept_method(method)
    columns, ranked, reference = list(cls.tune_space), cls.tune_ranked_stage, cls.tune_reference_stage
    csv = out / "tune_results.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    best = best_row(rows)
    heat = plot_heatmap(rows, out / "tune_heatmap.png", grid, cls)
    knobs = ", ".join(f"{c} ∈ {[_fmt(v) for v in grid[c]]}" for c in columns)
    title, metric = cls.display_name or cls.name, cls.tune_metric
    heads = [*(k.heading or c for c, k in cls.tune_space.items()),
             f"best val AUC ({ranked})" if ranked else "best val AUC", "at epoch",
             *([f"best val AUC ({reference})"] if reference else [])]
    lines = [f"# {title} sweep `{out.name}`", "", f"{knobs}; metric: {metric}", "",
             "| " + " | ".join([*heads, "epochs run", "stopped early", "error"]) + " |",
             "|" + "---|" * (len(heads) + 3)]
    for r in sorted(rows, key=lambda r: -r["best_val_auc"] if math.isfinite(r["best_val_auc"]) else math.inf):
        auc = f"{r['best_val_auc']:.4f}" if math.isfinite(r["best_val_auc"]) else "–"
        mark = "**" if r is best else ""
        cells = [f"{mark}{_fmt(r[c])}{mark}" if i < 2 else _fmt(r[c]) for i, c in enumerate(columns)]
        cells += [f"{mark}{auc}{mark}", str(r["best_epoch"] or "–")]
        if reference:
            c = r.get(f"{reference}_val_auc", math.nan)
            cells.append(f"{c:.4f}" if math.isfinite(c) else "–")
        cells += [f"{r['epochs_run']}/{r['max_epochs']}", "yes" if r["stopped_early"] else "no", r["error"]]
        lines.append("| " + " | ".join(cells) + " |")
    best_yaml = out / "best_config.yaml"
    if best is not None:
        overrides = [f"{knob.key}={_fmt(best[c])}" for c, knob in cls.tune_space.items()]
        said = ", ".join(f"{c} = {_fmt(best[c])}" for c in columns)
        lines += ["", f"Best: {said} (val AUC {best['best_val_auc']:.4f}): `raycxr pretrain method={cls.name} "
                  f"{' '.join(overrides)}`"]
        best_yaml.write_text(OmegaConf.to_yaml(OmegaConf.create(
            {"overrides": overrides, **{c: best[c] for c in columns},
             "val_auc": best["best_val_auc"], "trial": best["trial"],
             "last_checkpoint": best["last_checkpoint"]})))
        print(f"best of {len(rows)} trials: {said} val AUC {best['best_val_auc']:.4f}\n"
              f"  raycxr pretrain method={cls.name} {' '.join(overrides)}")
    else:
        print(f"no trial of {len(rows)} produced a finite val AUC (is there a val split?)")
    md = out / "tune_results.md"
    md.write_text("\n".join(lines) + "\n")
    return {"rows": rows, "best": best, "csv": str(csv), "markdown": str(md), "heatmap": str(heat),
            "best_config": str(best_yaml) if best is not None else None}


def plot_heatmap(rows: list[dict], path: Path, grid: dict[str, list], method: str | type[Method]) -> Path:
    """Heat-map of the best val AUC over the method's first two knobs (λ × K; UmiF p × τ), max over the
    third, numbers in the cells, the best cell framed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cls = swept_method(method)
    space = cls.tune_space
    ycol, xcol, zcol = list(space)
    ys, xs = sorted(grid[ycol], key=_sort_key), sorted(grid[xcol], key=_sort_key)
    m = np.full((len(ys), len(xs)), np.nan)
    for r in rows:
        if math.isfinite(r["best_val_auc"]) and r[ycol] in ys and r[xcol] in xs:
            i, j = ys.index(r[ycol]), xs.index(r[xcol])
            m[i, j] = np.nanmax([m[i, j], r["best_val_auc"]])
    fig, ax = plt.subplots(figsize=(1.4 * len(xs) + 2.4, 1.0 * len(ys) + 1.8))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto")
    ranked = f"best val mean AUC in {cls.tune_ranked_stage}" if cls.tune_ranked_stage else "best val mean AUC"
    fig.colorbar(im, ax=ax, label=f"{ranked} (max over {zcol})")
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
    ax.set_xlabel(space[xcol].label or xcol)
    ax.set_ylabel(space[ycol].label or ycol)
    finite = np.isfinite(m)
    lo, hi = (np.nanmin(m), np.nanmax(m)) if finite.any() else (0.0, 1.0)
    for i in range(len(ys)):
        for j in range(len(xs)):
            txt = f"{m[i, j]:.3f}" if finite[i, j] else "–"
            dark = finite[i, j] and (m[i, j] - lo) < 0.6 * (hi - lo + 1e-12)
            ax.text(j, i, txt, ha="center", va="center", color="white" if dark else "black", fontsize=10)
    if finite.any():
        i, j = np.unravel_index(np.nanargmax(m), m.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
        ax.set_title(f"{cls.display_name or cls.name} sweep: best {ycol}={_fmt(ys[i])}, "
                     f"{xcol}={_fmt(xs[j])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
