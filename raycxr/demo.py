"""``raycxr demo``: the main job on the embedded data set, end to end.

It synthesises the demo corpus if absent, registers its sites, checks and reports on them, then
pretrains (UniChest by default, ``method=ark`` for Ark), evaluates the run on every site (one site
held out as out-of-distribution), exports it to ONNX with a parity check, and prints a summary.
Every step is the same code as its own command (``raycxr pretrain``, ``eval``, ``export``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .config import compose
from .sites.config import discover_sites
from .stats import corpus_montage, markdown_table, plot_prevalence, print_corpus_table, site_statistics


def _site_names(items: list[Any]) -> list[str]:
    return [s if isinstance(s, str) else s["name"] for s in items]


def register_synthetic_sites(names: list[str], corpus: Path, sites_dir: Path, data_root: Path) -> list[Path]:
    """Write ``sites/<name>.yaml`` for synthetic sites that have none (existing files are kept)."""
    written = []
    sites_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = sites_dir / f"{name}.yaml"
        if path.exists():
            continue
        root = corpus / name
        try:  # relative to data_root when inside it, so the YAML moves with the data
            rel = os.path.relpath(root, data_root)
        except ValueError:  # another drive (Windows)
            rel = ".."
        root_s = str(root.resolve()) if rel.split(os.sep)[0] == ".." else rel
        path.write_text(yaml.safe_dump({"name": name, "adapter": "manifest", "root": root_s,
                                        "description": f"synthetic site '{name}' (raycxr synth)",
                                        "labels": {"uncertain_policy": "ignore"}}, sort_keys=False))
        written.append(path)
    return written


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """All the steps; returns ``{"stats", "pretrain", "eval", "export", "seconds"}`` (absent when disabled)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    out: dict[str, Any] = {"stats": corpus_report(cfg)}
    times["corpus"] = time.perf_counter() - t0
    run = Path(cfg.run)
    common = [f"sites.sites_dir={cfg.sites.sites_dir}", f"sites.data_root={cfg.sites.data_root}"]
    if cfg.pretrain.enabled:
        from .train.local import run_pretrain

        print(f"[4/6] pretraining {cfg.method} into {run}")
        t = time.perf_counter()
        pcfg = compose("pretrain", [*cfg.pretrain.overrides, f"method={cfg.method}", f"out={run}", *common])
        out["pretrain"] = run_pretrain(pcfg)
        times["pretrain"] = time.perf_counter() - t
    if cfg.eval.enabled:
        from .eval.evaluate import run_eval

        print(f"[5/6] evaluating {run} on every registered demo site")
        t = time.perf_counter()
        out["eval"] = run_eval(compose("eval", [*cfg.eval.overrides, f"run={run}", *common]))
        times["eval"] = time.perf_counter() - t
    if cfg.export.enabled:
        from .export import export_onnx

        print(f"[6/6] exporting {run} to ONNX")
        t = time.perf_counter()
        out["export"] = export_onnx(compose("export", [*cfg.export.overrides, f"run={run}", *common]))
        times["export"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    out["seconds"] = {k: round(v, 1) for k, v in times.items()}
    print_demo_summary(cfg, out)
    return out


def print_demo_summary(cfg: DictConfig, out: dict[str, Any]) -> None:
    """One table: what each step produced and how long it took."""
    from rich.console import Console
    from rich.table import Table

    secs = out["seconds"]
    table = Table(title="raycxr demo")
    table.add_column("step", no_wrap=True)  # the long paths in "where" fold, the step names stay whole
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_column("where", overflow="fold")
    n = sum(s["images"] for s in out["stats"].values())
    table.add_row("corpus", f"{len(out['stats'])} sites, {n} images", f"{secs['corpus']:.0f}", str(cfg.out))
    if "pretrain" in out:
        h = [r for r in out["pretrain"]["history"] if r.get("position", 0) >= 0]
        last = h[-1] if h else {}
        val = f", val AUC {last['val_auc']:.3f}" if last.get("val_auc") is not None else ""
        table.add_row(f"pretrain ({cfg.method})", f"{len(h)} epochs, loss {last.get('loss', float('nan')):.3f}{val}",
                      f"{secs['pretrain']:.0f}", str(cfg.run))
        best = out["pretrain"].get("best")
        if best is not None:  # what eval and export below used
            from .train.driver import best_place

            table.add_row("best epoch (eval, export)", f"val AUC {best['val_auc']:.3f} at {best_place(best)}", "",
                          str(best["checkpoint"]))
    if "eval" in out:
        for site, r in out["eval"]["sites"].items():
            auc = r.get("metrics", {}).get("mean", {}).get("auc")
            f1 = r.get("metrics", {}).get("mean", {}).get("f1")
            tag = " (held out)" if r.get("ood") else ""
            res = f"mean AUC {auc:.3f}, F1 {f1:.3f}" if auc is not None else r.get("skipped", "-")
            table.add_row(f"eval {site}{tag}", res, "", "")
        table.add_row("eval (all)", "report.md / report.html", f"{secs['eval']:.0f}", f"{cfg.run}/eval")
    if "export" in out:
        e = out["export"]
        diffs = [p["max_abs_diff"] for p in e.get("parity", {}).values() if p.get("max_abs_diff") is not None]
        diff = max(diffs) if diffs else None
        table.add_row("export", f"ONNX parity max |diff| {diff:.1e}" if diff is not None else "ONNX written",
                      f"{secs['export']:.0f}", str(e.get("out", "")))
    table.add_row("total", "", f"{secs['total']:.0f}", "")
    Console().print(table)
    if "eval" in out:
        from .eval.report import summary_lines

        for line in summary_lines(out["eval"]):
            print(line)


def corpus_report(cfg: DictConfig) -> dict[str, Any]:
    """Steps 1-3: synthesise if absent, register the sites, validate and report on them."""
    from .synth.generator import synthesize
    from .validate import validate_site

    s = cfg.synth
    corpus, out = Path(s.out), Path(cfg.out)
    data_root, sites_dir = Path(cfg.sites.data_root), Path(cfg.sites.sites_dir)
    items = OmegaConf.to_container(s.sites)
    names = _site_names(items)
    missing = [it for it, n in zip(items, names) if not (corpus / n / "manifest.parquet").exists()]
    if missing:
        print(f"[1/6] synthesising {len(missing)} site(s) into {corpus}")
        synthesize(corpus, missing, n_per_site=s.n_per_site, seed=s.seed, render_size=s.render_size,
                   workers=s.workers, overwrite=True, preview=s.preview,
                   enrich=OmegaConf.to_container(s.enrich) if s.enrich else None,
                   split_fractions=list(s.split_fractions))
    else:
        print(f"[1/6] demo corpus found in {corpus} (delete it or run `raycxr synth overwrite=true` to rebuild)")
    new = register_synthetic_sites(names, corpus, sites_dir, data_root)
    sites = {n: site for n, site in discover_sites(sites_dir, data_root=data_root).items() if n in names}
    print(f"[2/6] {len(sites)} sites registered in {sites_dir}" + (f" ({len(new)} new)" if new else ""))
    stats, manifests = {}, {}
    for name, site in sites.items():
        report = validate_site(site, check_images=False, progress=False)
        if not report["ok"]:
            raise ValueError(f"site '{name}' failed validation: {report['message']}")
        manifests[name] = site.load_manifest()
        stats[name] = site_statistics(manifests[name], quarantined=report["quarantined"])
    print("[3/6] corpus report")
    print_corpus_table(stats, title="raycxr demo corpus")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "stats.md").write_text(markdown_table(stats))
    plot_prevalence(manifests, out / "prevalence.png")
    corpus_montage({n: (m, sites[n].root) for n, m in manifests.items()}, out / "corpus.png")
    for n in names:
        prev = corpus / n / "preview.png"
        if prev.exists():
            shutil.copyfile(prev, out / f"preview_{n}.png")
    print(f"wrote {out}/stats.md, stats.json, prevalence.png, corpus.png and per-site previews")
    return stats
