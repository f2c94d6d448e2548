"""The study's report: ``report.md`` and ``report.html`` (the same blocks as ``raycxr eval``'s report),
``claims.md``, ``results.json`` and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.report import Block, grouped_bars, jsonable, pyplot, render_html, report_markdown, save_figure


def modes(results: dict) -> list[tuple[str, float | None, str]]:
    """The table's columns: the linear probe on all training images, fine-tuning at every fraction,
    LP-FT and zero-shot."""
    fr = sorted(results["settings"]["fractions"])
    return [("lp", 1.0, "LP"), *(("ft", f, f"FT {f * 100:g} %") for f in fr), ("lpft", 1.0, "LP-FT"),
            ("zero_shot", None, "zero-shot")]


def _cell(entry: dict | None, site: str, which: str = "diseases") -> str:
    if entry is None or site not in entry["sites"]:
        return "–"
    s = entry["sites"][site][which]
    if not s["estimable"]:
        return "not estimable"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n_seeds"] > 1 else f"{s['mean']:.3f}"


def _entry(results: dict, mode: str, row: str, fr: float | None) -> dict | None:
    return results["table"].get(f"{mode}/{row}" if fr is None else f"{mode}/{row}/{fr:g}")


def _rows(results: dict) -> list[str]:
    return [r["name"] for r in results["rows"]]


def _ood(entry: dict | None, results: dict) -> str:
    if entry is None:
        return "–"
    vals = [entry["sites"][s]["diseases"] for s in results["ood_sites"] if s in entry["sites"]]
    vals = [v for v in vals if v["estimable"]]
    if not vals:
        return "not estimable"
    means = [v["mean"] for v in vals]
    return f"{np.mean(means):.3f}"


def _fmt_ci(c: dict) -> str:
    if not c.get("estimable"):
        return "not estimable"
    lo, hi = c["ci"]
    return f"{c['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{c['estimate']:+.3f}"


def blocks(results: dict, figures: dict[str, str]) -> list[Block]:
    s = results["settings"]
    corpus = results.get("corpus", {})
    target = results["target"]
    b: list[Block] = [("h", 1, f"raycxr study: what each pretraining strategy is worth on target '{target}'")]
    b.append(("ul", [
        f"corpus: {corpus.get('n_per_site')} images per site at {corpus.get('render_size')} px, seed "
        f"{corpus.get('seed')}, splits {corpus.get('split_fractions')}, enriched: {corpus.get('enrich')}",
        f"target (fine-tuned on, in-distribution): {target}; out-of-distribution: {', '.join(results['ood_sites'])}",
        f"budget per row: {s['budget']['steps']} optimiser steps × batch {s['budget']['batch_size']}",
        f"downstream seeds: {s['seeds']}; fractions of the target's training images: {s['fractions']}",
        f"scores: mean AUC over the {len(s['diseases'])} CheXpert diseases ({', '.join(s['diseases'])}) that the "
        f"site annotates with at least {s['min_positives']} test positives (and negatives); other classes are "
        "listed below as not estimable, never averaged in",
        f"differences: paired bootstrap over test images ({s['bootstrap']} draws), 95 % intervals",
        f"wall time: {results.get('seconds', 0) / 60:.1f} min for this invocation; the cells took "
        f"{results.get('cell_seconds', 0) / 60:.1f} min of compute in all (cells run in parallel, and a resumed "
        "study reads finished ones from its cache)"]))
    b.append(("h", 2, "Claims"))
    b.append(("table", ["claim", "paper", "source", "raycxr (95 % CI)", "verdict", "note"],
              [[c["claim"], c["paper"], c["source"], c["raycxr"], c["verdict"], c.get("note", "")]
               for c in results["claims"]]))
    cols = modes(results)
    head = ["row", "method", "sites", "images seen"] + [m[2] for m in cols]
    rows = []
    for r in results["rows"]:
        pre = results["pretraining"].get(r["name"], {})
        rows.append([r["name"], r["method"] or "none (random init)", ", ".join(r["sites"]) if r["method"] else "–",
                     str(pre.get("images", 0)) if r["method"] else "0"] +
                    [_cell(_entry(results, m, r["name"], f), target) for m, f, _ in cols])
    b.append(("h", 2, f"In-distribution: {target}'s test split (mean ± std over seeds)"))
    b.append(("table", head, rows))
    b.append(("h", 2, "Out-of-distribution: mean over the other sites (mean over seeds)"))
    b.append(("table", ["row"] + [m[2] for m in cols],
              [[r] + [_ood(_entry(results, m, r, f), results) for m, f, _ in cols] for r in _rows(results)]))
    b.append(("h", 2, "Fine-tuned on 100 %, every site (five diseases; * = the row pretrained on that site)"))
    sites = results["eval_sites"]
    per_site = []
    for r in _rows(results):
        e = _entry(results, "ft", r, 1.0)
        cells = []
        for site in sites:
            mark = "*" if e and site in e["sites"] and e["sites"][site]["seen_in_pretraining"] else ""
            cells.append(_cell(e, site) + mark)
        per_site.append([r] + cells)
    b.append(("table", ["row"] + [f"{s} ({'ID' if s == target else 'OOD'})" for s in sites], per_site))
    diseases = [results["classes"][j] for j in results["sets"].get(target, {}).get("diseases", [])]
    if diseases:
        b.append(("h", 2, "Per disease, fine-tuned on 100 %, in-distribution"))
        pd_rows = []
        for r in _rows(results):
            e = _entry(results, "ft", r, 1.0)
            pdz = e["sites"][target]["per_disease"] if e and target in e["sites"] else {}
            pd_rows.append([r] + [f"{pdz[d]['mean']:.3f}" if d in pdz and pdz[d]["estimable"] else "–"
                                  for d in diseases])
        b.append(("table", ["row"] + diseases, pd_rows))
    b.append(("h", 2, "Against random init, against mixed and against a row's own control (paired bootstrap, five "
                      "diseases)"))
    crow = [[c["row"], f"{c['mode']} {c['fraction'] * 100:g} %" if c["fraction"] is not None else c["mode"],
             c["against"], _fmt_ci(c["id"]), _fmt_ci(c["ood"])]
            for c in results["contrasts"] if c["fraction"] in (1.0, None) or c["mode"] == "ft"]
    b.append(("table", ["row", "evaluation", "against", "ID difference", "OOD difference"], crow))
    for key, caption in (("per_disease", "per-disease AUC, fine-tuned on 100 %, in-distribution"),
                         ("fractions", "mean AUC against the fraction of the target's training images"),
                         ("ood_vs_id", "out-of-distribution against in-distribution mean AUC"),
                         ("reliability", "subset accuracy and FNR across thresholds, oracle AUC across referral")):
        if key in figures:
            b.append(("img", figures[key], caption))
    ne = [[site, ", ".join(f"{n} ({st['n_pos'].get(n, 0)})" for n in st["not_estimable"]) or "none"]
          for site, st in results["sets"].items()]
    b.append(("h", 2, "Not estimable (fewer test positives than the threshold; positives in brackets)"))
    b.append(("table", ["site", "classes"], ne))
    return b


def plot_per_disease(results: dict, path: Path) -> Path | None:
    target = results["target"]
    diseases = [results["classes"][j] for j in results["sets"].get(target, {}).get("diseases", [])]
    series, errors = {}, {}
    for r in _rows(results):
        e = _entry(results, "ft", r, 1.0)
        if not e or target not in e["sites"]:
            continue
        pdz = e["sites"][target]["per_disease"]
        series[r] = [pdz[d]["mean"] if d in pdz and pdz[d]["estimable"] else math.nan for d in diseases]
        errors[r] = np.array([pdz[d]["std"] if d in pdz and pdz[d]["estimable"] else 0.0 for d in diseases])
    if not diseases or not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(diseases)), 4))
    grouped_bars(ax, diseases, series, errors)
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"per disease, fine-tuned on 100 % of {target}", fontsize=10)
    ax.legend(fontsize=6, ncol=3)
    return save_figure(fig, path)


def plot_fractions(results: dict, path: Path) -> Path | None:
    fr = sorted(f for f in results["settings"]["fractions"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for r in _rows(results):
        for mode, style in (("ft", "-o"), ("lp", "--s")):
            ys = []
            for f in fr:
                e = _entry(results, mode, r, f)
                s = e["sites"][results["target"]]["diseases"] if e and results["target"] in e["sites"] else None
                ys.append(s["mean"] if s and s["estimable"] else math.nan)
            if np.isfinite(ys).any():
                ax.plot([f * 100 for f in fr], ys, style, ms=3, lw=1, label=f"{r} ({mode.upper()})")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("training images of the target used (%)")
    ax.set_ylabel("in-distribution mean AUC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_ood_vs_id(results: dict, path: Path) -> Path | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = 0
    for r in _rows(results):
        e = _entry(results, "ft", r, 1.0)
        if not e or results["target"] not in e["sites"] or e.get("ood_mean") is None:
            continue
        x = e["sites"][results["target"]]["diseases"]["mean"]
        if x is None:
            continue
        ax.scatter([x], [e["ood_mean"]])
        ax.annotate(r, (x, e["ood_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        pts += 1
    if not pts:
        plt.close(fig)
        return None
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("ID mean AUC (fine-tuned on 100 %)")
    ax.set_ylabel("OOD mean AUC (mean over sites)")
    return save_figure(fig, path)


def plot_reliability(results: dict, path: Path) -> Path | None:
    rel = results["reliability"]
    if not rel["rows"]:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r, v in rel["rows"].items():
        axes[0].plot(rel["thresholds"], v["subset_accuracy"], "-o", ms=3, lw=1, label=r)
        axes[1].plot(rel["thresholds"], v["fnr"], "-o", ms=3, lw=1, label=r)
        axes[2].plot([x * 100 for x in rel["referral"]], v["oracle_auc"], "-o", ms=3, lw=1, label=r)
    for ax, (xl, yl) in zip(axes, (("decision threshold", "subset accuracy (5 diseases)"),
                                   ("decision threshold", "false-negative rate (mean over diseases)"),
                                   ("cases referred to the oracle (%)", "oracle AUC"))):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=6)
    fig.suptitle(f"fine-tuned on 100 % of {results['target']}, in-distribution, mean over seeds", fontsize=10)
    return save_figure(fig, path)


def write_study_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for key, fn in (("per_disease", plot_per_disease), ("fractions", plot_fractions),
                    ("ood_vs_id", plot_ood_vs_id), ("reliability", plot_reliability)):
        path = fn(results, out / f"{key}.png")
        if path is not None:
            figures[key] = path.name
    blk = blocks(results, figures)
    (out / "report.md").write_text(report_markdown(blk))
    (out / "report.html").write_text(render_html(blk, "raycxr study"))
    claims = [b for b in blk if b[0] == "table"][0]
    (out / "claims.md").write_text(report_markdown([("h", 1, "raycxr study: claims"), claims]))
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1, allow_nan=False))
    return out / "report.md"
