"""The ``raycxr eval`` report: ``results.json``, ``metrics.csv``, PNG figures, ``report.md`` and ``report.html``.

:func:`write_report` takes the results dict that :mod:`raycxr.eval.evaluate` builds; every section but
``model`` is optional. The Markdown and the HTML are rendered from one list of blocks, so they always
carry the same tables and figures (linked relatively, next to the report).
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CSV_COLUMNS = ["evaluation", "site", "split", "ood", "class", "n_pos", "n_neg", "auc", "auc_ci_low", "auc_ci_high",
               "ap", "f1", "acc", "sensitivity", "specificity", "threshold"]

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", items) | ("table", header, rows) | ("img", file, caption)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x: Any) -> float:
    """A float, NaN for None and non-numbers (results store missing values as None)."""
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: Any, nd: int = 3) -> str:
    v = _num(x)
    return "–" if not math.isfinite(v) else f"{v:.{nd}f}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or not all(math.isfinite(_num(v)) for v in ci):
        return ""
    return f"[{_num(ci[0]):.3f}, {_num(ci[1]):.3f}]"


def jsonable(x: Any) -> Any:
    """Plain JSON types: numpy arrays and scalars converted, NaN/inf as None, paths as strings."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def _metric_sets(results: Mapping[str, Any], section: str) -> dict[str, Mapping[str, Any]]:
    """site -> classification_metrics dict for "sites" (the classifier), "zero_shot" or "linear_probe"."""
    out = {}
    for site, r in (results.get(section) or {}).items():
        if not isinstance(r, Mapping):
            continue
        m = r.get("metrics") if section == "sites" else r
        if isinstance(m, Mapping) and "per_class" in m:
            out[site] = m
    return out


def _site_field(results: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {s: r[key] for s, r in (results.get("sites") or {}).items() if isinstance(r, Mapping) and r.get(key)}


def _fine_tune_keys(entries: Mapping[str, Any]) -> tuple[list[tuple[float, str]], list[str]]:
    """(percent, key) pairs sorted by percent ("10%" -> 10.0), and the other keys (probe_then_ft)."""
    pct, other = [], []
    for k in entries:
        try:
            pct.append((float(str(k).removesuffix("%")), k))
        except ValueError:
            other.append(k)
    return sorted(pct), other


def _fine_tune_columns(fine_tune: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Fraction keys in increasing order, then the others, over all sites."""
    pct = sorted({pk for e in fine_tune.values() for pk in _fine_tune_keys(e)[0]})
    other = [k for e in fine_tune.values() for k in _fine_tune_keys(e)[1]]
    return list(dict.fromkeys([k for _, k in pct] + other))


# ----------------------------------------------------------------------------------------------- metrics.csv


def metric_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (evaluation, site, class), plus a "mean" class row per (evaluation, site)."""
    sites = results.get("sites") or {}
    rows = []
    for evaluation, section in (("classifier", "sites"), ("zero_shot", "zero_shot"), ("linear_probe", "linear_probe")):
        for site, m in _metric_sets(results, section).items():
            info = sites.get(site) if isinstance(sites.get(site), Mapping) else {}
            base = {"evaluation": evaluation, "site": site, "split": info.get("split", ""), "ood": info.get("ood", "")}
            for name, pc in m["per_class"].items():
                ci = pc.get("auc_ci") or [None, None]
                rows.append({**base, "class": name, **{k: pc.get(k) for k in CSV_COLUMNS[5:] if k in pc},
                             "auc_ci_low": ci[0], "auc_ci_high": ci[1]})
            mean = m.get("mean") or {}
            ci = mean.get("auc_ci") or [None, None]
            rows.append({**base, "class": "mean", **{k: mean.get(k) for k in ("auc", "ap", "f1", "acc")},
                         "auc_ci_low": ci[0], "auc_ci_high": ci[1]})
    for site, entries in (results.get("fine_tune") or {}).items():
        info = sites.get(site) if isinstance(sites.get(site), Mapping) else {}
        for key, r in entries.items():
            if isinstance(r, Mapping):
                rows.append({"evaluation": f"fine_tune {key}", "site": site, "split": info.get("split", ""),
                             "ood": info.get("ood", ""), "class": "mean", "auc": r.get("mean_auc"),
                             "f1": r.get("mean_f1")})
    return rows


def write_metrics_csv(results: Mapping[str, Any], path: Path) -> Path:
    """``metrics.csv`` from :func:`metric_rows`; missing values are empty cells."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in metric_rows(results):
            w.writerow({k: "" if (v := jsonable(r.get(k))) is None else v for k in CSV_COLUMNS})
    return path


# ----------------------------------------------------------------------------------------------- plots


def save_figure(fig: Any, path: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def grouped_bars(ax: Any, categories: list[str], series: Mapping[str, Sequence[float]],
                  errors: Mapping[str, np.ndarray] | None = None) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(categories))
    for i, (label, vals) in enumerate(series.items()):
        err = None if errors is None or label not in errors else errors[label]
        xs = x + (i - (n - 1) / 2) * width
        ax.bar(xs, vals, width, label=label, yerr=err, capsize=2, error_kw={"elinewidth": 0.7})
        # a missing bar would read as zero: say it is undefined
        for xi, v in zip(xs, vals):
            if not math.isfinite(_num(v)):
                ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="grey")
    ax.set_xticks(x, categories, rotation=60 if len(categories) > 4 else 0, ha="right" if len(categories) > 4
                  else "center", fontsize=8)


def plot_auc_bars(metrics: Mapping[str, Mapping[str, Any]], path: Path, *, title: str = "AUC per class") -> Path:
    """Grouped bars: per-class AUC, one bar per site (error bars: bootstrap CI where present)."""
    plt = pyplot()
    classes = list(dict.fromkeys(n for m in metrics.values() for n in m["per_class"]))
    series, errors = {}, {}
    for site, m in metrics.items():
        pc = m["per_class"]
        auc = np.array([_num(pc.get(n, {}).get("auc")) for n in classes])
        series[site] = auc
        lo = np.array([_num((pc.get(n, {}).get("auc_ci") or [None, None])[0]) for n in classes])
        hi = np.array([_num((pc.get(n, {}).get("auc_ci") or [None, None])[1]) for n in classes])
        if np.isfinite(lo).any():
            errors[site] = np.nan_to_num(np.vstack([auc - lo, hi - auc]).clip(0))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(classes) * max(len(metrics), 1) + 2), 4))
    grouped_bars(ax, classes, series, errors)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("ROC AUC (n/a: no positive or no negative)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(len(metrics) + 1, 6), loc="upper center")
    return save_figure(fig, path)


def plot_roc_curves(rocs: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: Path, *,
                    per_class: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, k: int = 4) -> Path:
    """One panel per site with the ROC curves of its ``k`` classes with the most positives."""
    plt = pyplot()
    n = max(len(rocs), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (site, roc) in zip(axes.flat, rocs.items()):
        pc = (per_class or {}).get(site, {})
        names = sorted(roc, key=lambda c: -_num(pc.get(c, {}).get("n_pos", 0)))[:k]
        for c in names:
            fpr, tpr = roc[c]
            auc = pc.get(c, {}).get("auc")
            ax.plot(fpr, tpr, lw=1.2, label=f"{c} (AUC {_fmt(auc, 2)}, n+={pc.get(c, {}).get('n_pos', '?')})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(site, fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(rocs):]:
        ax.axis("off")
    fig.suptitle(f"ROC curves, the {k} classes with the most positives per site", fontsize=10)
    return save_figure(fig, path)


def plot_fnr_by_group(fnr: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, *,
                      title: str = "false-negative rate by sex", xlabel: str = "sex") -> Path:
    """Grouped bars: FNR per group value (x), one bar per site; the bar label is the positive count."""
    plt = pyplot()
    groups = sorted({g for d in fnr.values() for g in d}, key=lambda g: (g == "unknown", g))
    series = {site: [_num(d.get(g, {}).get("fnr")) for g in groups] for site, d in fnr.items()}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(groups) * max(len(fnr), 1) + 2), 3.6))
    grouped_bars(ax, groups, series)
    for container, (_, d) in zip(ax.containers, fnr.items()):
        ax.bar_label(container, labels=[f"n={d.get(g, {}).get('n_pos', 0)}" for g in groups], fontsize=6)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FNR over annotated positives")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_oracle_auc(oracle: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Mean AUC vs the fraction of most-uncertain cases referred to an oracle, one line per site."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for site, o in oracle.items():
        ax.plot(np.asarray(o["fractions"], float) * 100, [_num(v) for v in o["mean_auc"]], marker="o", label=site)
    ax.set_xlabel("cases referred to a radiologist (%), most uncertain first")
    ax.set_ylabel("mean AUC")
    ax.set_title("oracle AUC: referring the most uncertain cases", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_threshold_sweep(sweeps: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Two panels, one line per site: mean FNR and mean accuracy against a global threshold."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for site, s in sweeps.items():
        th = np.asarray(s["thresholds"], float)
        a1.plot(th, [_num(v) for v in s["fnr"]], label=site)
        a2.plot(th, [_num(v) for v in s["accuracy"]], label=site)
    for ax, name in ((a1, "mean false-negative rate"), (a2, "mean accuracy")):
        ax.set_xlabel("threshold (all classes)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("FNR and accuracy across thresholds (means over classes)", fontsize=10)
    return save_figure(fig, path)


def plot_fine_tune(fine_tune: Mapping[str, Mapping[str, Any]], path: Path, *,
                   linear_probe: Mapping[str, float] | None = None) -> Path:
    """Mean AUC vs the percentage of training images fine-tuned on (log x), one line per site.

    A star marks linear-probe-then-fine-tune (at 100 %); a dashed line the linear probe, where given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ticks: set[float] = {100.0}
    for site, entries in fine_tune.items():
        pct, _ = _fine_tune_keys(entries)
        ticks |= {p for p, _ in pct}
        (line,) = ax.plot([p for p, _ in pct], [_num(entries[k].get("mean_auc")) for _, k in pct], marker="o",
                          label=f"{site} fine-tune")
        if isinstance(entries.get("probe_then_ft"), Mapping):
            ax.scatter([100], [_num(entries["probe_then_ft"].get("mean_auc"))], marker="*", s=120,
                       color=line.get_color(), label=f"{site} probe, then fine-tune", zorder=3)
        if linear_probe and math.isfinite(_num(linear_probe.get(site))):
            ax.axhline(_num(linear_probe[site]), color=line.get_color(), ls="--", lw=0.9,
                       label=f"{site} linear probe")
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("training images used (%)")
    ax.set_ylabel("mean test AUC")
    ax.set_title("fine-tuning with a fraction of the target site's training images", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- Markdown / HTML


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The headline figures in words: the pooled large findings and pretrained vs random init."""
    lines = []
    pooled_res = results.get("pooled_training_sites")
    if pooled_res:
        pc = pooled_res["metrics"]["per_class"]
        shown = [f"{c} {v['auc']:.3f} (n+={v['n_pos']})" for c, v in pc.items()
                 if c in ("Cardiomegaly", "Pleural Effusion", "Edema") and v["auc"] is not None]
        if shown:
            lines.append(f"classifier on the training sites' pooled test splits: {', '.join(shown)}")
    for site, r in results.get("linear_probe", {}).items():
        v = r.get("vs_random")
        if v and v.get("difference") is not None:
            lo, hi = v["ci"]
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"
            lines.append(f"pretrained vs random init, linear probe on {site}: {r['mean']['auc']:.3f} vs "
                         f"{v['random_mean_auc']:.3f}, difference {v['difference']:+.3f} [95 % CI {lo:+.3f}, "
                         f"{hi:+.3f}] ({verdict})")
        elif v:
            lines.append(f"pretrained vs random init, linear probe on {site}: not estimable ({v.get('note')})")
    return lines


def _blocks(results: Mapping[str, Any], figures: Mapping[str, str], title: str) -> list[Block]:
    model = results.get("model") or {}
    sites = results.get("sites") or {}
    clf = _metric_sets(results, "sites")
    zs = _metric_sets(results, "zero_shot")
    lp = _metric_sets(results, "linear_probe")
    b: list[Block] = [("h", 1, title)]
    b.append(("ul", [f"{k}: {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                     for k, v in (("run", model.get("run")), ("method", model.get("method")),
                                  ("encoder", model.get("encoder")), ("training sites", model.get("sites")),
                                  ("classes", len(model.get("classes") or [])))
                     if v not in (None, "", [])]))
    headline = summary_lines(results)
    if headline:
        b.append(("h", 2, "Headline"))
        b.append(("ul", headline))

    if sites:
        b.append(("h", 2, "Summary"))
        rows = []
        for site, r in sites.items():
            if not isinstance(r, Mapping):
                continue
            mean = (clf.get(site) or {}).get("mean", {})
            if "skipped" in r and site not in clf:
                rows.append([site, r.get("split", ""), "yes" if r.get("ood") else "", "skipped: " + str(r["skipped"])]
                            + [""] * 8)
                continue
            rows.append([site, r.get("split", ""), "yes" if r.get("ood") else "",
                         str(r.get("n_images", (clf.get(site) or {}).get("n_images", ""))),
                         f"{_fmt(mean.get('auc'))} {_ci(mean.get('auc_ci'))}".strip(), _fmt(mean.get("ap")),
                         _fmt(mean.get("f1")), _fmt(mean.get("acc")), _fmt(r.get("subset_accuracy")),
                         str(len(mean.get("classes", []))),
                         _fmt((zs.get(site) or {}).get("mean", {}).get("auc")),
                         _fmt((lp.get(site) or {}).get("mean", {}).get("auc"))])
        b.append(("table", ["site", "split", "OOD", "images", "mean AUC [95% CI]", "AP", "F1", "ACC",
                            "subset acc", "classes in mean", "zero-shot AUC", "linear probe AUC"], rows))
        sources = {m.get("threshold_source") for m in clf.values()} - {None}
        b.append(("p", "OOD: the site was not among the training sites. Means are over classes with at least one "
                       "annotated positive and one annotated negative; the others are listed at the end. F1, "
                       "accuracy and subset accuracy use per-class thresholds ("
                       + (", ".join(sorted(sources)) or "given") + "; thresholds tuned on the test split are "
                       "optimistic)."))

    if clf:
        b.append(("h", 2, "Classifier, per class"))
        if "auc_bars" in figures:
            b.append(("img", figures["auc_bars"], "per-class AUC per site (error bars: bootstrap 95% CI)"))
        if "roc" in figures:
            b.append(("img", figures["roc"], "ROC curves of the classes with the most positives"))
        for site, m in clf.items():
            b.append(("h", 3, site))
            b.append(("table", ["class", "n_pos", "n_neg", "AUC", "95% CI", "AP", "F1", "ACC", "sensitivity",
                                "specificity", "threshold"],
                      [[n, str(pc.get("n_pos", "")), str(pc.get("n_neg", "")), _fmt(pc.get("auc")),
                        _ci(pc.get("auc_ci")), _fmt(pc.get("ap")), _fmt(pc.get("f1")), _fmt(pc.get("acc")),
                        _fmt(pc.get("sensitivity")), _fmt(pc.get("specificity")), _fmt(pc.get("threshold"))]
                       for n, pc in m["per_class"].items()]))

    fnr_sex, fnr_age = _site_field(results, "fnr_by_sex"), _site_field(results, "fnr_by_age")
    oracle, sweep = _site_field(results, "oracle_auc"), _site_field(results, "threshold_sweep")
    if fnr_sex or fnr_age or oracle or sweep:
        b.append(("h", 2, "Reliability"))
    for name, fnr, key in (("sex", fnr_sex, "fnr_sex"), ("age band", fnr_age, "fnr_age")):
        if not fnr:
            continue
        b.append(("h", 3, f"False-negative rate by {name}"))
        groups = sorted({g for d in fnr.values() for g in d}, key=lambda g: (g == "unknown", g))
        b.append(("table", [name] + list(fnr),
                  [[g] + [f"{_fmt(d.get(g, {}).get('fnr'))} (n={d.get(g, {}).get('n_pos', 0)})" for d in fnr.values()]
                   for g in groups]))
        b.append(("p", "FNR over all annotated positive (image, class) pairs at each class's threshold; n is the "
                       "number of such pairs."))
        if key in figures:
            b.append(("img", figures[key], f"false-negative rate by {name}"))
    if sweep:
        b.append(("h", 3, "Thresholds"))
        if "sweep" in figures:
            b.append(("img", figures["sweep"], "mean FNR and accuracy over classes at one global threshold"))
    if oracle:
        b.append(("h", 3, "Referring uncertain cases"))
        fr = next(iter(oracle.values()))["fractions"]
        b.append(("table", ["site"] + [f"{_num(f) * 100:g}% referred" for f in fr],
                  [[s] + [_fmt(v) for v in o["mean_auc"]] for s, o in oracle.items()]))
        b.append(("p", "Mean AUC when the most uncertain cases per class (|p - 0.5| smallest) are referred to a "
                       "radiologist who labels them correctly."))
        if "oracle" in figures:
            b.append(("img", figures["oracle"], "oracle AUC against the fraction referred"))

    if zs:
        b.append(("h", 2, "Zero-shot"))
        unseen_top = (results.get("zero_shot") or {}).get("unseen_classes")
        rows = []
        for site, m in zs.items():
            unseen = m.get("unseen_classes")
            if unseen is None and isinstance(unseen_top, Mapping):
                unseen = unseen_top.get(site)
            unseen = list(unseen or [])
            aucs = [m["per_class"].get(u, {}).get("auc") for u in unseen]
            um = m.get("unseen_mean_auc")
            if um is None and any(a is not None for a in aucs):
                um = float(np.mean([a for a in aucs if a is not None]))
            rows.append([site, _fmt(m["mean"].get("auc")), _fmt(m["mean"].get("f1")),
                         ", ".join(f"{u} {_fmt(a, 2)}" for u, a in zip(unseen, aucs)) or "–", _fmt(um)])
        b.append(("table", ["site", "mean AUC", "mean F1", "classes no training site had (AUC)", "their mean AUC"],
                  rows))
        b.append(("p", "The site's own class names as text queries; no training on the site."))
        if "zero_shot" in figures:
            b.append(("img", figures["zero_shot"], "zero-shot AUC per class"))

    if lp:
        b.append(("h", 2, "Linear probe"))
        b.append(("table", ["site", "train images", "mean AUC", "AP", "F1", "ACC"],
                  [[s, str(m.get("n_train", "")), _fmt(m["mean"].get("auc")), _fmt(m["mean"].get("ap")),
                    _fmt(m["mean"].get("f1")), _fmt(m["mean"].get("acc"))] for s, m in lp.items()]))
        if "linear_probe" in figures:
            b.append(("img", figures["linear_probe"], "linear-probe AUC per class"))

    ft = {s: e for s, e in (results.get("fine_tune") or {}).items() if isinstance(e, Mapping) and e}
    if ft:
        b.append(("h", 2, "Fine-tuning"))
        keys = _fine_tune_columns(ft)
        b.append(("table", ["site"] + [k.replace("_", " ") for k in keys],
                  [[s] + [_fmt((e.get(k) or {}).get("mean_auc")) for k in keys] for s, e in ft.items()]))
        b.append(("p", "Mean test AUC after fine-tuning encoder and a new head on that share of the site's training "
                       "images; probe then ft starts the head from the linear probe and uses all images."))
        if "fine_tune" in figures:
            b.append(("img", figures["fine_tune"], "mean AUC against the share of training images"))

    if results.get("retrieval"):
        from .retrieval import retrieval_rows

        b.append(("h", 2, "Image-report retrieval"))
        b.append(("table", ["site", "pairs", "i→t R@1", "R@5", "R@10", "t→i R@1", "R@5", "R@10"],
                  retrieval_rows(results)))
        b.append(("p", "Recall@k over each site's test (image, report) pairs, both directions; chance is k / pairs."))

    seg = results.get("segmentation_frozen") or {}
    if seg:
        b.append(("h", 2, "Segmentation, backbone frozen"))
        rows = [[fr, r["task"], r["init"], str(r["n_train"]), _fmt(r.get("dice_mean")), _fmt(r.get("hd95_mean"), 1),
                 str(r.get("n_positive", ""))] for fr, e in seg.items() for r in e["rows"]]
        b.append(("table", ["training share", "task", "init", "train images", "test Dice", "HD95 (px)",
                            "test masks"], rows))
        b.append(("p", "The encoder frozen (BatchNorm statistics too), only the decoder trained on that share of "
                       "the training masks (UmiF Table 3 protocol), from the run's encoder and from random init "
                       "with the same seed; Dice over test images with a non-empty mask."))

    maps = [a for a in results.get("attention_maps") or [] if isinstance(a, Mapping) and a.get("path")]
    if maps:
        b.append(("h", 2, "Attention maps"))
        for a in maps:
            b.append(("img", str(a["path"]), str(a.get("caption", ""))))

    excluded = []
    for section, sets in (("classifier", clf), ("zero-shot", zs), ("linear probe", lp)):
        for site, m in sets.items():
            for n in m.get("excluded_from_means", []):
                pc = m["per_class"].get(n, {})
                excluded.append([section, site, n, str(pc.get("n_pos", "")), str(pc.get("n_neg", ""))])
    if excluded:
        b.append(("h", 2, "Classes left out of the means"))
        b.append(("p", "These classes are not estimable on the split: fewer annotated positives (or negatives) "
                       "than min_positives, so their AUC is too noisy to average in (or undefined with none). "
                       "Their own figures are in the per-class tables."))
        b.append(("table", ["evaluation", "site", "class", "n_pos", "n_neg"], excluded))
    return b


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def report_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            header, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_cell(blk[2]).replace(']', ')')}]({blk[1]})")
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1em;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#555}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{e(blk[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f"<figure><img src='{e(blk[1], quote=True)}' alt='{e(blk[2], quote=True)}'>"
                       f"<figcaption>{e(blk[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_figures(results: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Every figure the results have data for; returns figure key -> file name in ``out_dir``."""
    out_dir = Path(out_dir)
    clf = _metric_sets(results, "sites")
    figs: dict[str, str] = {}

    def put(key: str, name: str, fn: Any, *args: Any, **kw: Any) -> None:
        fn(*args, out_dir / name, **kw)
        figs[key] = name

    if clf:
        put("auc_bars", "auc_by_class.png", plot_auc_bars, clf, title="classifier AUC per class")
    rocs = {s: r for s, r in _site_field(results, "roc").items() if isinstance(r, Mapping)}
    if rocs:
        put("roc", "roc.png", plot_roc_curves, rocs, per_class={s: m["per_class"] for s, m in clf.items()})
    if fnr := _site_field(results, "fnr_by_sex"):
        put("fnr_sex", "fnr_by_sex.png", plot_fnr_by_group, fnr)
    if fnr := _site_field(results, "fnr_by_age"):
        put("fnr_age", "fnr_by_age.png", plot_fnr_by_group, fnr, title="false-negative rate by age band",
            xlabel="age band")
    if sweep := _site_field(results, "threshold_sweep"):
        put("sweep", "threshold_sweep.png", plot_threshold_sweep, sweep)
    if oracle := _site_field(results, "oracle_auc"):
        put("oracle", "oracle_auc.png", plot_oracle_auc, oracle)
    if zs := _metric_sets(results, "zero_shot"):
        put("zero_shot", "zero_shot_auc.png", plot_auc_bars, zs, title="zero-shot AUC per class")
    lp = _metric_sets(results, "linear_probe")
    if lp:
        put("linear_probe", "linear_probe_auc.png", plot_auc_bars, lp, title="linear-probe AUC per class")
    ft = {s: e for s, e in (results.get("fine_tune") or {}).items() if isinstance(e, Mapping) and e}
    if ft:
        put("fine_tune", "fine_tune.png", plot_fine_tune, ft,
            linear_probe={s: m["mean"].get("auc") for s, m in lp.items()})
    return figs


def write_report(results: dict, out_dir: Path, *, title: str = "raycxr evaluation") -> Path:
    """Write ``results.json``, ``metrics.csv``, the figures, ``report.md`` and ``report.html`` into ``out_dir``.

    Returns the Markdown path. Figures are written only for sections present in ``results``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    write_metrics_csv(clean, out_dir / "metrics.csv")
    blocks = _blocks(clean, write_figures(clean, out_dir), title)
    (out_dir / "report.html").write_text(render_html(blocks, title))
    md = out_dir / "report.md"
    md.write_text(report_markdown(blocks))
    return md
