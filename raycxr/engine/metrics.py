"""Multi-label classification metrics in numpy and scikit-learn.

Every function takes ``probs`` (N, C) probabilities, ``targets`` (N, C) 0/1 and ``mask`` (N, C) 0/1,
where ``mask`` is 1 when the label is annotated for that image. Each class is evaluated on its
annotated rows only. A class without a positive or without a negative among them is *degenerate*:
its AUC and AP are NaN and it is left out of every mean over classes (``n_pos`` / ``n_neg`` show why).

A case is predicted positive when ``prob >= threshold`` (scikit-learn's convention), so the max-F1
thresholds from :func:`max_f1_thresholds` reproduce exactly the F1 they were picked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def _check(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 probs, bool targets and bool mask of one (N, C) shape."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64) > 0
    if p.ndim != 2 or p.shape != t.shape or p.shape != m.shape:
        raise ValueError(f"probs, targets and mask must share one (N, C) shape, got {p.shape}, {t.shape}, {m.shape}")
    if not np.isfinite(p[m]).all():
        raise ValueError("probs has non-finite values on annotated entries")
    # unannotated targets may be NaN; they are never read
    return p, np.nan_to_num(t) > 0.5, m


def class_counts(targets: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Annotated positives and negatives per class, each (C,)."""
    t = np.nan_to_num(np.asarray(targets, dtype=np.float64)) > 0.5
    m = np.asarray(mask, dtype=np.float64) > 0
    return (t & m).sum(0), (~t & m).sum(0)


def evaluable_classes(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C,) bool: the class has at least one annotated positive and one annotated negative."""
    pos, neg = class_counts(targets, mask)
    return (pos > 0) & (neg > 0)


def _rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half); NaN when ``y`` has one class. Cheap enough for bootstraps."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = rankdata(p)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C,) ROC AUC on each class's annotated rows; NaN for degenerate classes."""
    p, t, m = _check(probs, targets, mask)
    return np.array([_rank_auc(t[m[:, c], c], p[m[:, c], c]) for c in range(p.shape[1])])


def mean_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """Mean ROC AUC over non-degenerate classes; NaN when there are none."""
    aucs = per_class_auc(probs, targets, mask)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan


def max_f1_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C,) per class, the threshold that maximises F1 on its annotated rows (lowest one on ties).

    UniChest reports F1 and accuracy at these. Classes without an annotated positive get 0.5."""
    p, t, m = _check(probs, targets, mask)
    out = np.full(p.shape[1], 0.5)
    for c in range(p.shape[1]):
        y, s = t[m[:, c], c], p[m[:, c], c]
        if not y.any():
            continue
        prec, rec, th = precision_recall_curve(y, s)
        # the last (precision 1, recall 0) point has no threshold
        prec, rec = prec[:-1], rec[:-1]
        denom = prec + rec
        f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(denom), where=denom > 0)
        out[c] = float(th[int(np.argmax(f1))])
    return out


def _confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = s >= threshold
    return int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum()), int((~pred & ~y).sum())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement; the same draws for every bootstrap in this module."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), np.int64)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, metric_fn: MetricFn, n_boot: int = 200,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile ``1 - alpha`` interval of ``metric_fn(probs, targets, mask)`` over image resamples.

    Rows (images) are drawn with replacement. A resample is skipped when a class that has positives
    and negatives in the full data loses either, or when ``metric_fn`` returns NaN, so every kept
    resample scores the same classes. Deterministic for a given ``seed``; (NaN, NaN) if none is kept."""
    p, t, m = _check(probs, targets, mask)
    keep = evaluable_classes(t, m)
    vals = []
    for idx in _resample_indices(len(p), n_boot, seed):
        if not evaluable_classes(t[idx][:, keep], m[idx][:, keep]).all():
            continue
        vals.append(float(metric_fn(p[idx], t[idx], m[idx])))
    return _percentile_ci(np.asarray(vals, dtype=np.float64), alpha)


def bootstrap_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, n_boot: int = 200,
                  alpha: float = 0.05, seed: int = 0, mean_over: np.ndarray | None = None) -> dict[str, Any]:
    """Per-class and mean AUC intervals from one set of image resamples.

    A class's interval uses the resamples where that class keeps a positive and a negative; the mean's
    uses those where every non-degenerate class does (the same rule and draws as :func:`bootstrap_ci`).
    ``mean_over`` (C,) bool limits the mean to those classes (e.g. the estimable ones).
    Returns ``{"per_class": (C, 2) array, "mean": (low, high), "n_valid": resamples kept for the mean}``."""
    p, t, m = _check(probs, targets, mask)
    keep = evaluable_classes(t, m)
    aucs = np.full((n_boot, p.shape[1]), np.nan)
    for b, idx in enumerate(_resample_indices(len(p), n_boot, seed)):
        pb, tb, mb = p[idx], t[idx], m[idx]
        for c in np.flatnonzero(keep):
            aucs[b, c] = _rank_auc(tb[mb[:, c], c], pb[mb[:, c], c])
    per_class = np.array([_percentile_ci(aucs[:, c], alpha) for c in range(p.shape[1])]).reshape(-1, 2)
    if mean_over is not None:
        keep = keep & np.asarray(mean_over, bool)
    if keep.any():
        full = np.isfinite(aucs[:, keep]).all(1)
        means = aucs[full][:, keep].mean(1)
    else:
        means = np.zeros(0)
    return {"per_class": per_class, "mean": _percentile_ci(means, alpha), "n_valid": int(len(means))}


def classification_metrics(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, class_names: Sequence[str],
                           thresholds: np.ndarray | None = None, *, n_boot: int = 0, alpha: float = 0.05,
                           seed: int = 0, min_positives: int = 1) -> dict[str, Any]:
    """Per-class AUC, AP, and F1 / accuracy / sensitivity / specificity at a threshold, and their means.

    ``thresholds=None`` picks each class's max-F1 threshold on this same data (optimistic, as in
    UniChest; recorded as ``threshold_source``). ``n_boot > 0`` adds bootstrap ``auc_ci`` per class and
    to the mean. Means are over the classes with at least ``min_positives`` annotated positives and as
    many negatives (``estimable_classes``; 1 = every non-degenerate class), listed in ``mean["classes"]``;
    the others keep their per-class figures, are flagged ``not_estimable`` and listed in
    ``excluded_from_means``. The result is JSON-serialisable: python floats, NaN as None."""
    p, t, m = _check(probs, targets, mask)
    if len(class_names) != p.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {p.shape[1]} columns")
    source = "given"
    if thresholds is None:
        thresholds, source = max_f1_thresholds(p, t, m), "max-F1 on this split"
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.shape != (p.shape[1],):
        raise ValueError(f"thresholds must have shape ({p.shape[1]},), got {thresholds.shape}")
    keep = evaluable_classes(t, m) & estimable_classes(t, m, max(1, int(min_positives)))
    ci = bootstrap_auc(p, t, m, n_boot=n_boot, alpha=alpha, seed=seed, mean_over=keep) if n_boot > 0 else None
    defined = evaluable_classes(t, m)
    per_class: dict[str, dict[str, Any]] = {}
    rows = np.zeros((p.shape[1], 4))
    for c, name in enumerate(class_names):
        y, s = t[m[:, c], c], p[m[:, c], c]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        auc = float(roc_auc_score(y, s)) if defined[c] else math.nan
        ap = float(average_precision_score(y, s)) if defined[c] else math.nan
        tp, fp, fn, tn = _confusion(y, s, thresholds[c])
        f1, acc = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp + tn, len(y))
        rows[c] = auc, ap, f1, acc
        per_class[str(name)] = {
            "auc": _json_float(auc), "ap": _json_float(ap), "f1": _json_float(f1), "acc": _json_float(acc),
            "threshold": float(thresholds[c]), "n_pos": n_pos, "n_neg": n_neg,
            "sensitivity": _json_float(_ratio(tp, tp + fn)), "specificity": _json_float(_ratio(tn, tn + fp)),
            "not_estimable": bool(defined[c] and not keep[c]),
        }
        if ci is not None:
            lo, hi = ci["per_class"][c]
            per_class[str(name)]["auc_ci"] = [_json_float(lo), _json_float(hi)] if defined[c] else None
    mean = {k: _json_float(np.nanmean(rows[keep, i])) if keep.any() else None
            for i, k in enumerate(("auc", "ap", "f1", "acc"))}
    mean["classes"] = [str(n) for n, k in zip(class_names, keep) if k]
    out: dict[str, Any] = {"per_class": per_class, "mean": mean, "n_images": int(p.shape[0]),
                           "threshold_source": source, "min_positives": int(min_positives),
                           "excluded_from_means": [str(n) for n, k in zip(class_names, keep) if not k]}
    if ci is not None:
        lo, hi = ci["mean"]
        mean["auc_ci"] = [_json_float(lo), _json_float(hi)] if keep.any() else None
        out["bootstrap"] = {"n_boot": int(n_boot), "alpha": float(alpha), "seed": int(seed),
                            "n_valid": ci["n_valid"]}
    return out


def _group_labels(groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Group values as strings; None, NaN and empty strings become "unknown"."""
    out = []
    for g in np.asarray(groups, dtype=object).reshape(-1):
        missing = g is None or (isinstance(g, float) and math.isnan(g)) or str(g).strip().lower() in ("", "nan",
                                                                                                       "none")
        out.append("unknown" if missing else str(g))
    return np.asarray(out, dtype=object)


def fnr_by_group(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, groups: Sequence[Any] | np.ndarray,
                 thresholds: np.ndarray) -> dict[str, dict[str, Any]]:
    """False-negative rate over all annotated positive (image, class) pairs, per value of ``groups`` (N,).

    Missing group values are pooled as "unknown". ``fnr`` is None for a group with no positives."""
    p, t, m = _check(probs, targets, mask)
    g = _group_labels(groups)
    if len(g) != len(p):
        raise ValueError(f"{len(g)} group values for {len(p)} images")
    missed = p < np.asarray(thresholds, dtype=np.float64)[None, :]
    pos = t & m
    out = {}
    for value in sorted(set(g.tolist())):
        rows = g == value
        n_pos = int(pos[rows].sum())
        out[value] = {"fnr": _json_float(_ratio(int((pos[rows] & missed[rows]).sum()), n_pos)), "n_pos": n_pos,
                      "n_images": int(rows.sum())}
    return out


def age_bands(ages: Sequence[float] | np.ndarray, edges: Sequence[float] = (0, 40, 60, 80, 200)) -> np.ndarray:
    """Age band labels such as "40-59" (``lo <= age < hi``; the last band reads "80+").

    NaN ages and ages outside the edges are "unknown"."""
    a = np.asarray(ages, dtype=np.float64).reshape(-1)
    e = [float(x) for x in edges]
    names = [f"{lo:g}-{hi - 1:g}" for lo, hi in zip(e[:-2], e[1:-1])] + [f"{e[-2]:g}+"]
    out = np.full(len(a), "unknown", dtype=object)
    ok = np.isfinite(a) & (a >= e[0]) & (a < e[-1])
    idx = np.searchsorted(e, a[ok], side="right") - 1
    out[ok] = np.asarray(names, dtype=object)[idx]
    return out


def subset_accuracy(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> float:
    """Fraction of images whose every annotated label is predicted right (images with none are left out)."""
    p, t, m = _check(probs, targets, mask)
    right = (p >= np.asarray(thresholds, dtype=np.float64)[None, :]) == t
    rows = m.any(1)
    return float((right | ~m)[rows].all(1).mean()) if rows.any() else math.nan


def threshold_sweep(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                    thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mean FNR, FPR and accuracy over non-degenerate classes at each global threshold.

    ``thresholds`` defaults to ``np.linspace(0, 1, 21)``. Returns arrays keyed "thresholds", "fnr",
    "fpr", "accuracy" (NaN everywhere if no class is non-degenerate)."""
    p, t, m = _check(probs, targets, mask)
    th = np.linspace(0.0, 1.0, 21) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    keep = evaluable_classes(t, m)
    p, t, m = p[:, keep], t[:, keep], m[:, keep]
    pred = p[:, :, None] >= th[None, None, :]  # (N, C, T)
    tt, mm = t[:, :, None], m[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        fnr = ((~pred & tt & mm).sum(0) / (tt & mm).sum(0)).mean(0)
        fpr = ((pred & ~tt & mm).sum(0) / (~tt & mm).sum(0)).mean(0)
        acc = (((pred == tt) & mm).sum(0) / mm.sum(0)).mean(0)
    if not keep.any():
        fnr = fpr = acc = np.full(len(th), np.nan)
    return {"thresholds": th, "fnr": fnr, "fpr": fpr, "accuracy": acc}


def oracle_auc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
               fractions: Sequence[float] = (0, 0.05, 0.1, 0.2, 0.3)) -> dict[str, Any]:
    """Mean AUC when the most uncertain fraction of cases is referred to a radiologist (an oracle).

    Per class, the annotated cases are ranked by ``|p - 0.5|`` (smallest = most uncertain; 0.5 rather
    than the max-F1 threshold so the ranking does not depend on thresholds tuned on the same split;
    ties keep row order) and the first ``round(fraction * n)`` get their true label as score. Referral
    sets grow with the fraction and a referred case can only gain rank in the right direction, so the
    curve is non-decreasing; at 0 it is the plain mean AUC, at 1 it is 1."""
    p, t, m = _check(probs, targets, mask)
    fr = np.asarray(fractions, dtype=np.float64)
    keep = np.flatnonzero(evaluable_classes(t, m))
    per_class = np.full((len(fr), p.shape[1]), np.nan)
    for c in keep:
        y, s = t[m[:, c], c], p[m[:, c], c]
        order = np.argsort(np.abs(s - 0.5), kind="stable")
        for i, f in enumerate(fr):
            k = int(round(float(f) * len(s)))
            scored = s.copy()
            scored[order[:k]] = y[order[:k]]
            per_class[i, c] = float(roc_auc_score(y, scored))
    mean = per_class[:, keep].mean(1) if len(keep) else np.full(len(fr), np.nan)
    return {"fractions": fr, "mean_auc": mean, "uncertainty": "|p - 0.5| per class, most uncertain referred first"}


def roc_points(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
               class_names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ROC curve ``(fpr, tpr)`` per non-degenerate class, for plotting."""
    p, t, m = _check(probs, targets, mask)
    keep = evaluable_classes(t, m)
    out = {}
    for c, name in enumerate(class_names):
        if keep[c]:
            fpr, tpr, _ = roc_curve(t[m[:, c], c], p[m[:, c], c])
            out[str(name)] = (fpr, tpr)
    return out


# ----------------------------------------------------------------------------------------- studies


def estimable_classes(targets: np.ndarray, mask: np.ndarray, min_positives: int = 10) -> np.ndarray:
    """(C,) bool: the class has at least ``min_positives`` annotated positives and as many negatives.

    With fewer, an AUC is too noisy to compare methods by (one positive moves it by 1/n_pos): a study
    reports such a class as *not estimable* instead of averaging it in."""
    pos, neg = class_counts(targets, mask)
    return (pos >= int(min_positives)) & (neg >= int(min_positives))


Term = tuple[float, Sequence[np.ndarray]]  # (weight, one (N, C) prediction per seed)
Stratum = tuple[Sequence[Term], np.ndarray, np.ndarray]  # (terms, targets (N, C), mask (N, C))


def _contrast(terms: Sequence[Term], t: np.ndarray, m: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Σ_i w_i · (mean over seeds of the mean AUC over the stratum's classes) on rows ``idx``."""
    total = 0.0
    for w, seeds in terms:
        vals = []
        for p in seeds:
            pb, tb, mb = (p, t, m) if idx is None else (p[idx], t[idx], m[idx])
            aucs = [_rank_auc(tb[mb[:, c], c], pb[mb[:, c], c]) for c in range(pb.shape[1])]
            vals.append(float(np.mean(aucs)))
        total += float(w) * float(np.mean(vals))
    return total


def _weighted_auc_draws(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) Mann-Whitney AUC of one class under each bootstrap draw, ties counting one half.

    A draw with replacement is a vector of integer weights per image (``counts``, (B, n)), so the AUC
    of the resample is sum_pos w_i * (negative weight below p_i + half the negative weight tied with it),
    over (positive weight * negative weight): the same number ``_rank_auc`` gives on the resampled
    rows, for all draws at once (NaN where a draw has no positive or no negative)."""
    values, group = np.unique(p, return_inverse=True)
    onehot = np.zeros((len(p), len(values)))
    onehot[np.arange(len(p)), group] = 1.0
    pos_w = (counts * y) @ onehot  # (B, G): positive weight at each distinct score
    neg_w = (counts * ~y) @ onehot
    below = np.cumsum(neg_w, axis=1) - neg_w
    n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_w * (below + 0.5 * neg_w)).sum(1) / (n_pos * n_neg)


def _contrast_draws(terms: Sequence[Term], t: np.ndarray, m: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) ``_contrast`` under each bootstrap draw (``counts``: (B, n) multiplicity of each image)."""
    total = np.zeros(len(counts))
    for w, seeds in terms:
        per_seed = []
        for p in seeds:
            p = np.asarray(p, np.float64)
            aucs = [_weighted_auc_draws(t[m[:, c], c], p[m[:, c], c], counts[:, m[:, c]]) for c in range(p.shape[1])]
            per_seed.append(np.mean(aucs, axis=0))
        total += float(w) * np.mean(per_seed, axis=0)
    return total


def contrast_bootstrap(strata: Sequence[Stratum], *, n_boot: int = 500, alpha: float = 0.05,
                       seed: int = 0) -> dict[str, Any]:
    """A contrast of mean AUCs with its paired-bootstrap percentile interval.

    Each stratum is one test set (a site) with the predictions of several rows on the *same* images:
    ``terms`` are ``(weight, [one (N, C) prediction per seed])``, e.g. ``[(1, A), (-1, B)]`` for the
    difference A - B, or ``[(1, A1), (-1, A0), (-1, B1), (1, B0)]`` for a difference of differences.
    A row's value is the mean over its seeds of the mean AUC over the stratum's classes (pass only
    estimable ones); the estimate is the contrast averaged over strata. Every bootstrap draw resamples
    the images of each stratum once and scores every row and seed on the same draw, so the interval
    is paired (the variance the rows share cancels). A draw where a class loses all its positives or
    negatives is skipped. Returns ``{"estimate", "ci": (low, high), "n_valid", "n_strata"}``.

    The draws are scored all at once as integer image weights (``_weighted_auc_draws``): the same
    figures as resampling the rows one draw at a time, ~18x faster (300 draws, 4 strata of
    200 images x 14 classes, 3 + 3 seeds: 16.5 s -> 0.9 s)."""
    kept = [(terms, np.nan_to_num(np.asarray(t, np.float64)) > 0.5, np.asarray(m, np.float64) > 0)
            for terms, t, m in strata if np.asarray(t).shape[1] > 0 and len(terms)]
    if not kept:
        return {"estimate": math.nan, "ci": (math.nan, math.nan), "n_valid": 0, "n_strata": 0}
    for terms, t, _ in kept:
        for _, seeds in terms:
            for p in seeds:
                if np.asarray(p).shape != t.shape:
                    raise ValueError(f"predictions of shape {np.asarray(p).shape} do not match targets {t.shape}")
    estimate = float(np.mean([_contrast(terms, t, m) for terms, t, m in kept]))
    valid = np.ones(int(n_boot), bool)
    per_stratum = []
    for k, (terms, t, m) in enumerate(kept):
        idx = _resample_indices(len(t), n_boot, seed + k)
        counts = np.zeros((int(n_boot), len(t)))
        np.add.at(counts, (np.repeat(np.arange(int(n_boot)), idx.shape[1]), idx.ravel()), 1.0)
        pos = counts @ (t & m).astype(np.float64)  # (B, C) annotated positives in each draw
        neg = counts @ (~t & m).astype(np.float64)
        valid &= ((pos > 0) & (neg > 0)).all(1)
        per_stratum.append(_contrast_draws(terms, t, m, counts))
    values = np.mean(per_stratum, axis=0)[valid]
    lo, hi = _percentile_ci(np.asarray(values, np.float64), alpha)
    return {"estimate": estimate, "ci": (lo, hi), "n_valid": len(values), "n_strata": len(kept)}
