"""``raycxr study``: plan the cells of a study, run what is not cached (in this process or as Ray tasks),
then analyse and report.

A study is a config (``raycxr/configs/study.yaml``): the corpus, the target site, the rows (pretraining
strategies), the budget every row gets, the downstream protocol (fractions, seeds, linear probe,
fine-tuning, LP-FT, zero-shot) and the analysis. Its folder (``out``) holds ``study.json`` (the settings
it was started with), ``sites/`` (the corpus's registered sites), ``cells/`` (every cell's cached
result) and the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .cells import RUNTIME_KEYS, cached_record, run_cell


@dataclass(frozen=True)
class Row:
    """One pretraining strategy: ``method`` None is the untrained (random-init) encoder."""

    name: str
    method: str | None
    sites: tuple[str, ...]
    backbone: str
    overrides: tuple[str, ...] = ()
    control: str | None = None  # the row it is compared with beside random and mixed (its untrained encoder)


@dataclass
class Cell:
    spec: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    cost: float = 1.0  # images processed, for the progress bar's ETA

    @property
    def key(self) -> str:
        return self.spec["key"]


# -- the plan ---------------------------------------------------------------------------------------
def build_rows(cfg: DictConfig) -> list[Row]:
    """The study's rows, then those of the named ``ablations`` groups; with ``include_registered`` every
    registered method without a row gets one."""
    from ..methods import list_methods

    rows, names = [], set()
    groups = OmegaConf.to_container(cfg.get("ablation_rows") or {}, resolve=True)
    unknown = [g for g in cfg.get("ablations") or [] if g not in groups]
    if unknown:
        raise ValueError(f"study ablations {unknown} are not groups of ablation_rows ({sorted(groups)})")
    extra = [r for g in cfg.get("ablations") or [] for r in groups[g]]
    for r in [*OmegaConf.to_container(cfg.rows, resolve=True), *extra]:
        unknown = set(r) - {"name", "method", "sites", "backbone", "overrides", "control"}
        if unknown:
            raise ValueError(f"study row {r.get('name', r)}: unknown keys {sorted(unknown)}")
        if r["name"] in names:
            raise ValueError(f"study rows: the name '{r['name']}' is used twice")
        backbone = r.get("backbone", "cnn")
        if backbone not in cfg.backbones:
            raise ValueError(f"study row '{r['name']}': backbone '{backbone}' is not one of {list(cfg.backbones)}")
        names.add(r["name"])
        rows.append(Row(r["name"], r.get("method"), tuple(r.get("sites") or cfg.pretrain_sites), backbone,
                        tuple(r.get("overrides") or ()), r.get("control")))
    if cfg.include_registered:
        used = {r.method for r in rows[:len(rows) - len(extra)]}  # an ablation row does not stand for its method
        for m in list_methods():
            if m not in used and m not in cfg.skip_methods:
                rows.append(Row(m, m, tuple(cfg.pretrain_sites), "cnn"))
    missing = [f"{r.name} -> {r.control}" for r in rows if r.control is not None and r.control not in names]
    if missing:
        raise ValueError(f"study rows name a control that is not a row of this study: {missing}")
    return rows


def _row_overrides(cfg: DictConfig, row: Row, train_sizes: dict[str, int]) -> list[str]:
    """The pretraining config of a row: the study's pretrain overrides, the backbone, the budget, the row's own.

    ``train_sizes`` (images in each site's training split) let the method fit ``budget.steps`` to the row's
    sites: a row on one small site runs more epochs than a row on four, for the same optimiser steps."""
    from ..config import compose
    from ..methods import get_method

    common = [*cfg.pretrain, *cfg.backbones[row.backbone], f"sites.sites_dir={cfg.sites.sites_dir}",
              f"sites.data_root={cfg.sites.data_root}", f"seed={cfg.seed}",
              f"batch_size={cfg.budget.batch_size}", f"max_steps_per_epoch={cfg.budget.steps_per_unit}",
              f"site_names=[{','.join(row.sites)}]"]
    if row.method is None:
        return [*common, *row.overrides]
    base = compose("pretrain", [*common, f"method={row.method}", *row.overrides])
    budget = get_method(row.method).step_budget(base, int(cfg.budget.steps), {s: train_sizes[s] for s in row.sites})
    return [*common, f"method={row.method}", *budget, *row.overrides]


def plan(cfg: DictConfig, rows: list[Row], classes: list[str], eval_sites: list[str],
         train_sizes: dict[str, int]) -> list[Cell]:
    """Every cell of the study, with its dependencies and estimated cost (``train_sizes``: images in each
    site's training split)."""
    from ..methods import get_method

    out = Path(cfg.out) / "cells"
    d = cfg.downstream
    threads = cell_threads(cfg)
    common = {"sites_dir": str(cfg.sites.sites_dir), "data_root": str(cfg.sites.data_root), "target": cfg.target,
              "eval_sites": eval_sites, "classes": classes, "batch_size": int(d.batch_size),
              "threads": threads, "cache": bool(d.cache), "device": str(d.device)}
    budget_images = int(cfg.budget.steps) * int(cfg.budget.batch_size)
    n_eval = 200 * len(eval_sites)  # rough: test images scored per cell
    n_train = train_sizes[cfg.target]
    cells: list[Cell] = []
    for row in rows:
        overrides = _row_overrides(cfg, row, train_sizes)
        ckpt = None
        deps: list[str] = []
        if row.method is not None:
            pdir = out / "pretrain" / row.name
            cells.append(Cell({"kind": "pretrain", "key": f"pretrain/{row.name}", "row": row.name, "dir": str(pdir),
                               "overrides": overrides, "threads": threads}, cost=budget_images))
            ckpt, deps = str(pdir / "run"), [f"pretrain/{row.name}"]
        enc = {"checkpoint": ckpt, "overrides": overrides}
        edir = out / "embed" / row.name
        cells.append(Cell({**common, **enc, "kind": "embed", "key": f"embed/{row.name}", "row": row.name,
                           "dir": str(edir)}, deps, cost=n_train + n_eval))
        ds = {**common, **enc, "embed_dir": str(edir), "C": float(d.C), "max_iter": int(d.max_iter),
              "epochs": int(d.epochs), "max_steps": d.max_steps, "lr": float(d.lr), "head_lr": float(d.head_lr),
              "schedule": str(d.schedule), "min_steps": int(d.min_steps or 0),
              "min_images": int(d.min_images),
              # set only when used, so that the cells of studies made before these knobs keep their digests
              **{k: float(d[k]) for k in ("warmup", "layer_decay") if d[k] is not None}}
        after = [*deps, f"embed/{row.name}"]
        modes = (["lp"] if d.linear_probe else []) + ["ft"]
        for seed in d.seeds:
            for mode in modes:
                for fr in d.fractions:
                    key = f"{mode}/{row.name}/{fr:g}/{seed}"
                    n_fr = max(float(d.min_images), fr * n_train)
                    trained = max(n_fr * int(d.epochs), int(d.get("min_steps") or 0) * min(n_fr, int(d.batch_size)))
                    cost = n_eval if mode == "lp" else trained + n_eval
                    cells.append(Cell({**ds, "kind": mode, "key": key, "row": row.name, "seed": int(seed),
                                       "fraction": float(fr), "dir": str(out / key)}, after, cost=cost))
            if d.lp_ft:
                key = f"lpft/{row.name}/1/{seed}"
                cells.append(Cell({**ds, "kind": "lpft", "key": key, "row": row.name, "seed": int(seed),
                                   "fraction": 1.0, "dir": str(out / key)}, after,
                                  cost=n_train * int(d.epochs) + n_eval))
        if d.zero_shot and row.method is not None and get_method(row.method).offers_zero_shot:
            key = f"zero_shot/{row.name}"
            cells.append(Cell({**common, **enc, "kind": "zero_shot", "key": key, "row": row.name,
                               "dir": str(out / key)}, deps, cost=n_eval))
    return cells


# -- the corpus -------------------------------------------------------------------------------------
def prepare_corpus(cfg: DictConfig) -> dict[str, Any]:
    """Synthesise the study corpus if absent and register its sites in the study's own sites folder."""
    from ..config import compose_preset
    from ..demo import register_synthetic_sites
    from ..synth.generator import synthesize

    preset = [f"preset={cfg.corpus.preset}"] if cfg.corpus.preset else []
    c = compose_preset("synth", [*preset, *cfg.corpus.overrides, f"out={cfg.corpus.out}",
                                 f"sites=[{','.join(cfg.corpus.sites)}]"])
    corpus = Path(c.out)
    names = list(cfg.corpus.sites)
    missing = [n for n in names if not (corpus / n / "manifest.parquet").exists()]
    if missing:
        print(f"study corpus: synthesising {missing} into {corpus}")
        synthesize(corpus, missing, n_per_site=c.n_per_site, seed=c.seed, render_size=c.render_size,
                   workers=c.workers, overwrite=True, preview=False,
                   enrich=OmegaConf.to_container(c.enrich) if c.enrich else None,
                   split_fractions=list(c.split_fractions))
    register_synthetic_sites(names, corpus, Path(cfg.sites.sites_dir), Path(cfg.sites.data_root))
    return {"out": str(corpus), "n_per_site": int(c.n_per_site), "render_size": int(c.render_size),
            "enrich": OmegaConf.to_container(c.enrich) if c.enrich else None,
            "split_fractions": list(c.split_fractions), "seed": int(c.seed)}


# -- running ------------------------------------------------------------------------------------------
def _fingerprint(cfg: DictConfig, corpus: dict[str, Any]) -> dict[str, Any]:
    """What a resumed study must share with the run that made its cells (rows may be added)."""
    keep = ("target", "pretrain_sites", "pretrain", "budget", "backbones", "downstream", "seed")
    fp = {"corpus": corpus, **{k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                               else cfg[k] for k in keep}}
    # where a cell runs (device, decode cache) does not change what it computes
    fp["downstream"] = {k: v for k, v in fp["downstream"].items() if k not in RUNTIME_KEYS}
    return fp


def _check_same_study(out: Path, fp: dict[str, Any], rows: list[Row]) -> None:
    path = out / "study.json"
    rows_now = {r.name: [r.method, list(r.sites), r.backbone, list(r.overrides)] for r in rows}
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old["settings"]) | set(fp) if old["settings"].get(k) != fp.get(k))
        changed = sorted(n for n, r in rows_now.items() if n in old["rows"] and old["rows"][n] != r)
        if diff or changed:
            raise ValueError(f"study {out} was started with other settings (differs in: {diff + changed}); rerun "
                             "it with the same config to resume, or start another one with name=NEW")
        rows_now = {**old["rows"], **rows_now}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": fp, "rows": rows_now}, indent=1))


def cell_threads(cfg: DictConfig) -> int | None:
    """Torch threads per cell: ``threads``, else ``cpus_per_cell`` when cells run as Ray tasks (so two
    cells on two cores do not oversubscribe them), else torch's default."""
    if cfg.get("threads"):
        return int(cfg.threads)
    return max(1, int(float(cfg.cpus_per_cell))) if _use_ray(cfg) else None


def _use_ray(cfg: DictConfig) -> bool:
    if cfg.runner not in ("auto", "local", "ray"):
        raise ValueError(f"study runner must be auto, local or ray, got '{cfg.runner}'")
    if cfg.runner != "auto":
        return cfg.runner == "ray"
    if cfg.ray.address:
        return True
    return (os.cpu_count() or 1) >= 2 * float(cfg.cpus_per_cell)  # room for two cells at once


def execute(cells: list[Cell], cfg: DictConfig) -> dict[str, dict]:
    """Run every cell whose result is not cached, dependencies first; returns the records by key."""
    records = {c.key: r for c in cells if (r := cached_record(c.spec)) is not None}
    todo = [c for c in cells if c.key not in records]
    total = sum(c.cost for c in cells)
    bar = tqdm(total=round(total), initial=round(total - sum(c.cost for c in todo)), desc="raycxr study",
               unit="img", unit_scale=True, dynamic_ncols=True)
    bar.set_postfix_str(f"{len(cells) - len(todo)}/{len(cells)} cells cached")
    if _use_ray(cfg):
        _execute_ray(todo, records, cfg, bar)
    else:
        for c in _order(todo):
            bar.set_postfix_str(c.key)
            records[c.key] = run_cell(c.spec)
            bar.update(round(c.cost))
    bar.close()
    return records


def _order(cells: list[Cell]) -> list[Cell]:
    """Dependencies before the cells that need them (a cell's deps are cached or earlier in the list)."""
    pending, done, out = list(cells), {c.key for c in cells}, []
    placed: set[str] = set()
    while pending:
        ready = [c for c in pending if all(d in placed or d not in done for d in c.deps)]
        if not ready:
            raise ValueError(f"study cells with unmet dependencies: {[c.key for c in pending][:5]}")
        for c in ready:
            out.append(c)
            placed.add(c.key)
        pending = [c for c in pending if c.key not in placed]
    return out


def _execute_ray(todo: list[Cell], records: dict, cfg: DictConfig, bar: tqdm) -> None:
    """Cells as Ray tasks, each asking for ``cpus_per_cell`` CPUs, submitted as their dependencies finish."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=float(cfg.cpus_per_cell), num_gpus=float(cfg.gpus_per_cell), max_retries=1)(run_cell)
    pending = {c.key: c for c in todo}
    running: dict[Any, Cell] = {}
    while pending or running:
        for key, c in list(pending.items()):
            if all(d in records for d in c.deps):
                running[task.remote(c.spec)] = c
                del pending[key]
        if not running:
            raise ValueError(f"study cells with unmet dependencies: {list(pending)[:5]}")
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            c = running.pop(ref)
            records[c.key] = ray.get(ref)
            bar.set_postfix_str(c.key)
            bar.update(round(c.cost))


def _track(cfg: DictConfig, results: dict[str, Any], out: Path) -> None:
    """The study's settings and its in-distribution / OOD mean AUCs to the configured tracker."""
    from ..tracking import Tracker

    tracker = Tracker.from_config(cfg, out, run_name=f"study-{cfg.name}")
    tracker.log_params(results["settings"])
    figures = {}
    for key, e in results["table"].items():
        site = e["sites"].get(results["target"], {}).get("diseases", {})
        if site.get("mean") is not None:
            figures[f"{key}/id".replace("/", ".")] = site["mean"]
        if e.get("ood_mean") is not None:
            figures[f"{key}/ood".replace("/", ".")] = e["ood_mean"]
    tracker.log_metrics(figures, 0)
    tracker.close()


def run_study(cfg: DictConfig) -> dict[str, Any]:
    """Prepare the corpus, run (or resume) every cell, analyse, and write the report."""
    from ..sites.config import discover_sites
    from .analysis import analyse
    from .report import write_study_report

    t0 = time.perf_counter()
    out = Path(cfg.out)
    corpus = prepare_corpus(cfg)
    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    rows = build_rows(cfg)
    for name in [cfg.target, *cfg.pretrain_sites, *(s for r in rows for s in r.sites)]:
        if name not in sites:
            raise ValueError(f"study site '{name}' is not in the corpus ({sorted(sites)})")
    target = sites[cfg.target]
    classes = list(target.load_manifest().label_names)
    eval_sites = list(cfg.eval_sites) if cfg.eval_sites else list(sites)
    train_sizes = {n: int((sites[n].load_manifest().to_pandas()["split"] == "train").sum())
                   for n in sorted({s for r in rows for s in r.sites} | {cfg.target})}
    _check_same_study(out, _fingerprint(cfg, corpus), rows)
    cells = plan(cfg, rows, classes, eval_sites, train_sizes)
    print(f"study {out}: {len(rows)} rows, {len(cells)} cells on target '{cfg.target}' "
          f"(evaluated on {', '.join(eval_sites)})")
    records = execute(cells, cfg)
    results = analyse(cfg, rows, cells, records)
    results.update(corpus=corpus, seconds=round(time.perf_counter() - t0, 1),
                   cell_seconds=round(sum(float(r.get("seconds", 0)) for r in records.values()), 1))
    report = write_study_report(results, out)
    _track(cfg, results, out)
    if cfg.get("report_dir"):
        dest = Path(cfg.report_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            if f.is_file() and f.suffix in (".md", ".html", ".png", ".json", ".yaml", ".csv"):
                shutil.copyfile(f, dest / f.name)
        print(f"report copied to {dest}")
    print(f"wrote {report}")
    return results
