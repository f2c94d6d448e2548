"""What a study's cells show: tables with seeds and confidence intervals, reliability curves, and the
papers' claims checked on raycxr's corpus.

Conventions (the domain-pretraining protocol, ``Krones (arXiv:2605.08819)``):

- every score is on a site's **test** split, over the target's classes that the site annotates;
  the target's test split is *in-distribution* (ID), every other site *out-of-distribution* (OOD);
- a class with fewer than ``analysis.min_positives`` test positives (or negatives) at a site is
  **not estimable** there: it is listed, never averaged in; a site with no estimable class of a set
  reports "not estimable" for that set's mean;
- a row's figure is the mean over downstream seeds (± the standard deviation over seeds);
- differences between rows are paired bootstrap intervals over test images
  (:func:`raycxr.engine.metrics.contrast_bootstrap`), OOD ones averaged over the OOD sites.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..engine import metrics as M
from ..labels import canonical_name

Key = tuple[str, str, float | None]  # (mode, row, fraction)


def load_predictions(cells: list, records: dict[str, dict]) -> dict[Key, dict[int, dict[str, tuple]]]:
    """``preds[(mode, row, fraction)][seed][site] = (probs, targets, mask)`` from the cells' ``pred.npz``."""
    preds: dict[Key, dict[int, dict[str, tuple]]] = defaultdict(dict)
    for c in cells:
        s = c.spec
        if s["kind"] not in ("lp", "ft", "lpft", "zero_shot") or c.key not in records:
            continue
        with np.load(Path(s["dir"]) / "pred.npz") as z:
            per_site = {n: (z[f"{n}/probs"], z[f"{n}/targets"], z[f"{n}/mask"]) for n in s["eval_sites"]}
        key = (s["kind"], s["row"], s.get("fraction"))
        preds[key][int(s.get("seed", 0))] = per_site
    return dict(preds)


def _sets(cfg: DictConfig, classes: list[str], targets: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Column sets at one site: the five diseases and all classes, each limited to estimable columns."""
    ok = M.estimable_classes(targets, mask, int(cfg.analysis.min_positives))
    canon = [canonical_name(c) for c in classes]
    wanted = [canonical_name(d) for d in cfg.analysis.diseases]
    disease_cols = [canon.index(d) for d in wanted if d in canon]
    annotated = [j for j in range(len(classes)) if mask[:, j].any()]
    return {"diseases": [j for j in disease_cols if ok[j]], "all": [j for j in annotated if ok[j]],
            "not_estimable": [classes[j] for j in annotated if not ok[j]],
            "n_pos": {classes[j]: int(((targets[:, j] > 0.5) & (mask[:, j] > 0)).sum()) for j in annotated}}


def _mean_auc(p: np.ndarray, t: np.ndarray, m: np.ndarray, cols: list[int]) -> float:
    if not cols:
        return math.nan
    return float(np.mean(M.per_class_auc(p[:, cols], t[:, cols], m[:, cols])))


def _summary(vals: list[float]) -> dict[str, Any]:
    v = np.asarray([x for x in vals if math.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n_seeds": 0, "estimable": False}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n_seeds": int(len(v)),
            "estimable": True}


def analyse(cfg: DictConfig, rows: list, cells: list, records: dict[str, dict]) -> dict[str, Any]:
    """Every table, curve, contrast and claim of the study, as JSON-able data."""
    preds = load_predictions(cells, records)
    target = str(cfg.target)
    classes = next(c.spec["classes"] for c in cells if "classes" in c.spec)
    eval_sites = next(c.spec["eval_sites"] for c in cells if "eval_sites" in c.spec)
    any_pred = next(iter(next(iter(preds.values())).values())) if preds else {}
    sets = {s: _sets(cfg, classes, *any_pred[s][1:]) for s in eval_sites if s in any_pred}
    row_sites = {r.name: list(r.sites) if r.method is not None else [] for r in rows}
    ood = [s for s in eval_sites if s != target]

    table: dict[str, Any] = {}
    for (mode, row, fr), seeds in sorted(preds.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        entry: dict[str, Any] = {"mode": mode, "row": row, "fraction": fr, "sites": {}}
        for site in eval_sites:
            if site not in sets:
                continue
            st = sets[site]
            per_seed = {k: [_mean_auc(*seeds[s][site], st[k]) for s in sorted(seeds)] for k in ("diseases", "all")}
            per_disease = {}
            for j in st["diseases"]:
                aucs = [float(M.per_class_auc(*(a[:, [j]] for a in seeds[s][site]))[0]) for s in sorted(seeds)]
                per_disease[classes[j]] = _summary(aucs)
            entry["sites"][site] = {"diseases": _summary(per_seed["diseases"]), "all": _summary(per_seed["all"]),
                                    "per_disease": per_disease, "seen_in_pretraining": site in row_sites.get(row, []),
                                    "role": "ID" if site == target else "OOD"}
        oods = [entry["sites"][s]["diseases"]["mean"] for s in ood if s in entry["sites"]]
        oods = [x for x in oods if x is not None]
        entry["ood_mean"] = float(np.mean(oods)) if oods else None
        table[_label(mode, row, fr)] = entry

    results: dict[str, Any] = {"target": target, "classes": classes, "eval_sites": eval_sites, "ood_sites": ood,
                               "sets": sets, "table": table, "rows": [r.__dict__ for r in rows],
                               "pretraining": {r: records[f"pretrain/{r}"] for r in row_sites
                                               if f"pretrain/{r}" in records},
                               "settings": {"diseases": list(cfg.analysis.diseases),
                                            "min_positives": int(cfg.analysis.min_positives),
                                            "bootstrap": int(cfg.analysis.bootstrap),
                                            "fractions": list(cfg.downstream.fractions),
                                            "seeds": list(cfg.downstream.seeds),
                                            "budget": OmegaConf.to_container(cfg.budget, resolve=True)}}
    results["contrasts"] = contrasts(cfg, preds, sets, target, ood,
                                     {r.name: r.control for r in rows if getattr(r, "control", None)})
    results["reliability"] = reliability(cfg, preds, sets, target)
    results["claims"] = claims(cfg, preds, sets, target, ood, table)
    return results


def _label(mode: str, row: str, fr: float | None) -> str:
    return f"{mode}/{row}" if fr is None else f"{mode}/{row}/{fr:g}"


def _strata(preds: dict, terms: list[tuple[float, Key]], sites: list[str], sets: dict, which: str = "diseases"):
    """Contrast strata over ``sites``: for each, the rows' per-seed predictions on its estimable columns."""
    out = []
    for site in sites:
        cols = sets.get(site, {}).get(which, [])
        if not cols or any(k not in preds for _, k in terms):
            continue
        t, m = next(iter(preds[terms[0][1]].values()))[site][1:]
        out.append(([(w, [preds[k][s][site][0][:, cols] for s in sorted(preds[k])]) for w, k in terms],
                    t[:, cols], m[:, cols]))
    return out


def _identical(strata: list) -> bool:
    """Whether a two-term contrast compares the same predictions (every seed, every stratum)."""
    return all(len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
               for ((_, a), (_, b)), _, _ in strata)


def contrast(preds: dict, terms: list[tuple[float, Key]], sites: list[str], sets: dict, cfg: DictConfig,
             which: str = "diseases") -> dict[str, Any]:
    strata = _strata(preds, terms, sites, sets, which)
    if not strata:
        return {"estimate": None, "ci": [None, None], "n_strata": 0, "estimable": False}
    if len(terms) == 2 and _identical(strata):
        # the same predictions (two rows that ship the same encoder): a zero difference with a zero-width
        # interval would read as evidence of no effect, when nothing was compared
        return {"estimate": None, "ci": [None, None], "n_strata": len(strata), "estimable": False,
                "identical": True}
    r = M.contrast_bootstrap(strata, n_boot=int(cfg.analysis.bootstrap), seed=int(cfg.seed))
    fin = [x if x is not None and math.isfinite(x) else None for x in (r["estimate"], *r["ci"])]
    return {"estimate": fin[0], "ci": fin[1:], "n_strata": r["n_strata"], "n_valid": r["n_valid"],
            "estimable": fin[0] is not None}


def contrasts(cfg: DictConfig, preds: dict, sets: dict, target: str, ood: list[str],
              controls: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each row against ``random`` and ``mixed``, and against its own ``control`` row where it names one (the same
    encoder untrained), for every mode and fraction, ID and OOD (five diseases)."""
    out = []
    for (mode, row, fr) in sorted(preds, key=lambda k: (k[0], k[1], k[2] or 0)):
        for base in dict.fromkeys(("random", "mixed", *([controls[row]] if controls and row in controls else []))):
            other = (mode, base, fr)
            if row == base or other not in preds:
                continue
            terms = [(1.0, (mode, row, fr)), (-1.0, other)]
            out.append({"mode": mode, "row": row, "fraction": fr, "against": base,
                        "id": contrast(preds, terms, [target], sets, cfg),
                        "ood": contrast(preds, terms, ood, sets, cfg)})
    return out


def reliability(cfg: DictConfig, preds: dict, sets: dict, target: str) -> dict[str, Any]:
    """Fine-tuning on 100 %, ID, five diseases: subset accuracy and FNR across thresholds, oracle AUC
    across referral rates (per row, averaged over seeds)."""
    th = np.asarray(cfg.analysis.thresholds, np.float64)
    ref = list(cfg.analysis.referral)
    cols = sets.get(target, {}).get("diseases", [])
    out: dict[str, Any] = {"thresholds": th.tolist(), "referral": ref, "rows": {}}
    if not cols:
        return out
    for (mode, row, fr), seeds in preds.items():
        if mode != "ft" or fr != 1.0:
            continue
        sub, fnr, orc = [], [], []
        for s in sorted(seeds):
            p, t, m = (a[:, cols] for a in seeds[s][target])
            sub.append([M.subset_accuracy(p, t, m, np.full(len(cols), x)) for x in th])
            fnr.append(M.threshold_sweep(p, t, m, th)["fnr"])
            orc.append(M.oracle_auc(p, t, m, ref)["mean_auc"])
        out["rows"][row] = {"subset_accuracy": np.nanmean(sub, 0).tolist(), "fnr": np.nanmean(fnr, 0).tolist(),
                            "oracle_auc": np.nanmean(orc, 0).tolist()}
    return out


# -- the papers' claims --------------------------------------------------------------------------------
def _verdict(c: dict[str, Any], *, expect_positive: bool = True) -> str:
    if c.get("identical"):
        return "not estimable (identical predictions)"
    if not c.get("estimable"):
        return "not estimable"
    lo, hi = c["ci"]
    if lo is None:
        return "not estimable"
    if expect_positive:
        return "reproduced" if lo > 0 else ("reversed" if hi < 0 else "not reproduced (no clear difference)")
    return "reproduced" if not lo > 0 else "not reproduced"


def _fmt(c: dict[str, Any]) -> str:
    if c.get("identical"):
        return "– (identical predictions: the two rows ship the same encoder)"
    if not c.get("estimable"):
        return "not estimable"
    lo, hi = c["ci"]
    return f"{c['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{c['estimate']:+.3f}"


def claims(cfg: DictConfig, preds: dict, sets: dict, target: str, ood: list[str], table: dict) -> list[dict]:
    """The claims of the papers behind raycxr, each with the paper's figure, raycxr's, and a verdict."""
    full = 1.0

    def have(*keys: Key) -> bool:
        return all(k in preds for k in keys)

    def diff(a: Key, b: Key, sites: list[str]) -> dict[str, Any]:
        return contrast(preds, [(1.0, a), (-1.0, b)], sites, sets, cfg)

    out: list[dict] = []

    def add(claim: str, paper: str, source: str, keys: list[Key], make, why: str = "") -> None:
        if not have(*keys):
            rows = {k[1] for k in preds}
            missing = sorted({k[1] for k in keys if k[1] not in rows})
            cells = sorted({_label(*k) for k in keys if k not in preds and k[1] in rows})
            note = "; ".join([*([f"rows not in this study: {missing}"] if missing else []),
                              *([f"cells not in this study: {cells}"] if cells else [])])
            out.append({"claim": claim, "paper": paper, "source": source, "raycxr": "not run",
                        "verdict": "not run", "note": note})
            return
        figure, verdict, note = make()
        out.append({"claim": claim, "paper": paper, "source": source, "raycxr": figure, "verdict": verdict,
                    "note": note or why})

    zs = ("zero_shot", "unichest", None), ("zero_shot", "unichest_conquer", None)
    ft_div = ("ft", "unichest", full), ("ft", "unichest_conquer", full)
    use = zs if have(*zs) else ft_div

    def c1():
        c = diff(*use, ood)
        return (f"{_fmt(c)} mean AUC, {use[0][0].replace('_', '-')}, OOD sites", _verdict(c),
                "zero-shot over the target's class names on every OOD site" if use is zs else "fine-tuned on 100 %")
    add("UniChest divide beats conquer out of distribution", "+4.86 % AUC (Shenzhen), +2.41 % (SIIM), zero-shot",
        "UniChest (TMI 2024) Table VI", list(use), c1)

    def c2():
        per = {s: diff(("ft", "unichest_conquer", full), ("ft", "unichest_conquer_single", full), [s])
               for s in [target, *ood]}
        wins = [s for s, c in per.items() if c.get("estimable") and c["ci"][0] is not None and c["ci"][0] > 0]
        est = [s for s, c in per.items() if c.get("estimable")]
        text = "; ".join(f"{s} {_fmt(c)}" for s, c in per.items() if c.get("estimable"))
        if not est:
            return "not estimable", "not estimable", ""
        verdict = "reproduced" if len(wins) < len(est) else "not reproduced (multi-source wins everywhere)"
        return text, verdict, f"multi-source significantly better on {len(wins)} of {len(est)} sites"
    add("Multi-source conquer does not consistently beat single-source",
        "+6.08 % on ChestX-ray14, −3.26 % F1/AP on SIIM (rows 1 vs 2)", "UniChest (TMI 2024) Table VI",
        [("ft", "unichest_conquer", full), ("ft", "unichest_conquer_single", full)], c2)

    def c3():
        c = diff(("ft", "ark", full), ("ft", "ark_minus_one", full), [target])
        return f"{_fmt(c)} ID mean AUC, fine-tuned on 100 %", _verdict(c), ""
    add("Ark with one more source beats Ark without it (Ark-6 > Ark-5)", "+0.41 AUC on ChestX-ray14 (89.14 vs 88.73)",
        "Ark (MICCAI 2023) Table 2", [("ft", "ark", full), ("ft", "ark_minus_one", full)], c3)

    def c4():
        c = diff(("lp", "ark", full), ("lp", "concurrent", full), [target, *ood])
        return f"{_fmt(c)} mean AUC, linear probe, all sites", _verdict(c), "the frozen encoder's quality"
    add("Cyclic training (Ark) learns where concurrent multi-task training struggles", "qualitative (§2)",
        "Ark (MICCAI 2023) §2", [("lp", "ark", full), ("lp", "concurrent", full)], c4)

    for a, paper in (("clip", "CheXpert FT 1 %: 78.19 vs 72.83; 10 %: 82.90 vs 78.33"),
                     ("slip", "CheXpert FT 1 %: 77.84 vs 72.83; 10 %: 81.67 vs 78.33")):
        keys = [("ft", a, f) for f in (0.01, 0.1)] + [("ft", "simclr", f) for f in (0.01, 0.1)]

        def cx(a=a):
            cs = {f: diff(("ft", a, f), ("ft", "simclr", f), [target]) for f in (0.01, 0.1)}
            verdicts = [_verdict(c) for c in cs.values()]
            v = "reproduced" if all(x == "reproduced" for x in verdicts) else (
                "not estimable" if all(x == "not estimable" for x in verdicts) else "not reproduced")
            return "; ".join(f"{f * 100:g} %: {_fmt(c)}" for f, c in cs.items()), v, "ID mean AUC"
        add(f"{a.upper()} beats SimCLR with 1 % and 10 % of the labels", paper, "Huang et al. (MIDL 2023) Table 1",
            keys, cx)

    def c7():
        c = diff(("lp", "clip", full), ("lp", "simclr", full), ood)
        return f"{_fmt(c)} OOD mean AUC, linear probe", _verdict(c), ""
    add("Image-report (CLIP) pretraining is more robust out of distribution than SimCLR",
        "NIH (OOD) LP: 83.80 vs 77.00", "Huang et al. (MIDL 2023) §5", [("lp", "clip", full), ("lp", "simclr", full)],
        c7)

    def c8():
        c = diff(("ft", "mixed", full), ("ft", "random", full), [target])
        note = "multi-source supervised vs random init"
        if have(("lp", "mixed", full), ("lp", "random", full)):  # the frozen encoders: no fine-tuning budget in it
            note += f"; linear probe {_fmt(diff(('lp', 'mixed', full), ('lp', 'random', full), [target]))}"
        note += (f"; fine-tuned {int(cfg.downstream.epochs)} epochs: random init converges more slowly than a "
                 "pretrained encoder (benchmarks/finetune_protocol.py)")
        return f"{_fmt(c)} ID mean AUC, fine-tuned on 100 %", _verdict(c), note
    add("Domain-matched pretraining beats random initialisation", "ViT-s: 0.797 vs 0.648 on NIH (3.3 vs 2.1)",
        "Krones (arXiv:2605.08819) Table 2", [("ft", "mixed", full), ("ft", "random", full)], c8)

    def c9():
        id_std, ood_std = [], []
        for e in table.values():
            if e["mode"] != "ft" or e["fraction"] != full:
                continue
            for s, v in e["sites"].items():
                std = v["diseases"]["std"]
                if std is not None and v["diseases"]["n_seeds"] > 1:
                    (id_std if s == target else ood_std).append(std)
        if not id_std or not ood_std:
            return "not estimable", "not estimable", "needs at least two seeds"
        a, b = float(np.mean(ood_std)), float(np.mean(id_std))
        return (f"mean std over seeds: OOD {a:.4f} vs ID {b:.4f}", "reproduced" if a > b else "not reproduced",
                "fine-tuned on 100 %, every row")
    add("Out-of-distribution variance across seeds is larger than in-distribution",
        "e.g. VinDr 0.0262 vs NIH 0.0065 (exp. 1.1)", "Krones (arXiv:2605.08819) Table 2", [("ft", "random", full)], c9)

    cnn_vit = [("ft", "mixed", full), ("ft", "random", full), ("ft", "mixed_vit", full), ("ft", "random_vit", full)]

    def c10():
        c = contrast(preds, [(1.0, cnn_vit[2]), (-1.0, cnn_vit[3]), (-1.0, cnn_vit[0]), (1.0, cnn_vit[1])],
                     [target], sets, cfg)
        return (f"(ViT gain − CNN gain) {_fmt(c)} ID mean AUC", _verdict(c),
                "gain = pretrained (mixed) − random init, fine-tuned on 100 %")
    add("CNNs are less affected by initialisation than ViTs",
        "ResNet50 random→ImageNet +0.052 vs ViT-s +0.130 (NIH, 1.1/1.2 vs 2.1/2.2)",
        "Krones (arXiv:2605.08819) Table 2", cnn_vit, c10)

    # the ablation groups (raycxr/configs/study.yaml, ablation_rows): "not run" unless the study includes them
    ark_ln = [("ft", "ark_ln", full), ("ft", "random_ln", full)]

    def c11():
        c = diff(*ark_ln, [target])
        note = "ConvNeXt-atto (LayerNorm) for both, fine-tuned on 100 %"
        if have(("lp", "ark_ln", full), ("lp", "random_ln", full)):
            lp = diff(("lp", "ark_ln", full), ("lp", "random_ln", full), [target, *ood])
            note += f"; linear probe, all sites {_fmt(lp)}"
        return f"{_fmt(c)} ID mean AUC", _verdict(c), note
    add("Ark pretraining beats its own untrained encoder (equal, batch-independent encoder)",
        "training from scratch is the lower bound on every target task", "Ark (MICCAI 2023) §3.1, Table 2", ark_ln,
        c11)

    copy = [("ft", "unichest_copy", full), ("ft", "unichest", full)]

    def c12():
        c_id, c_ood = diff(*copy, [target]), diff(*copy, ood)
        return (f"ID {_fmt(c_id)}; OOD {_fmt(c_ood)} mean AUC", _verdict(c_ood),
                "unichest.expert_init=copy − random (the authors' initialisation), fine-tuned on 100 %")
    add("Divide started from copies of the shared query network beats divide from random experts",
        "not in the paper: the authors' experts start at random and catch up over 20–100 divide epochs",
        "UniChest (TMI 2024) §III-B, Eq. 5", copy, c12)
    return out
