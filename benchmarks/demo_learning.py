"""Does the demo's pretraining learn? Its two targets, checked on finished `raycxr demo` runs, and
UniChest's ``unichest.expert_init`` (random | copy) compared on the demo.

1. The demo's classifier (the run's ``best.pt``: the epoch with the best val AUC over both stages,
   which eval and export use), scored on the training sites' test splits pooled, against a logistic
   regression on 64x64 pixels fitted on the same sites' train splits (the corpus-fitness classifier) on
   Cardiomegaly, Pleural Effusion and Edema. Beside them: a "site prior" that scores every image with
   the finding's training prevalence at its site (no pixels at all), which shows how much of a pooled
   AUC only tells the sites apart, and the mean AUC within each site.
2. A linear probe on the held-out site with the pretrained encoder against the same probe on a
   random-init encoder, with the paired-bootstrap 95 % interval of the difference (from the run's
   `raycxr eval` results).
3. ``unichest.expert_init``: one demo run per value (``runs/demo-unichest-experts-<value>``, trained by
   this script with `raycxr demo`'s settings when the folder has no evaluation yet): val AUC at the
   switch (the conquer epoch divide starts from), after divide, the best epoch, the pooled test AUCs
   and the linear probe of each.

    python benchmarks/demo_learning.py [--expert-init random copy] [--data data/demo] [--out benchmarks/results]
    python benchmarks/demo_learning.py --run runs/demo-unichest   # one finished run, no training

The detailed tables are for the run whose ``expert_init`` is the configured default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from corpus_fitness import classifier, load_corpus  # noqa: E402

from raycxr.engine.metrics import per_class_auc  # noqa: E402
from raycxr.eval.predict import predict_site  # noqa: E402
from raycxr.methods import load_pretrained  # noqa: E402
from raycxr.sites.config import discover_sites  # noqa: E402
from raycxr.train.driver import best_summary  # noqa: E402

FINDINGS = ["Cardiomegaly", "Pleural Effusion", "Edema"]


def analyse(run: str, sites: dict, d: dict) -> dict:
    """Targets 1 and 2 and the run's val AUC curve for one finished demo run."""
    pre = load_pretrained(run)  # best.pt where the run has one
    train_sites = list(pre.sites)
    # the run's classifier on each training site's test split
    preds = {s: predict_site(pre.classifier, sites[s], pre.class_names, split="test", image_size=pre.image_size,
                             progress=False) for s in train_sites}
    # the pixel baseline on the same sites: fitted on their train splits, scored on their test splits
    keep = np.isin(np.array(d["sites"])[d["site"]], train_sites)
    names = d["union"].names
    res: dict = {"run": run, "method": pre.method, "checkpoint": pre.source, "training_sites": train_sites,
                 "findings": {}}
    for f in FINDINGS:
        j = names.index(f)
        known = d["masks"][:, j] == 1
        y = d["targets"][:, j]
        tr = keep & known & (d["split"] == "train")
        te = keep & known & (d["split"] == "test")
        pixel = roc_auc_score(y[te], classifier().fit(d["X"][tr], y[tr]).predict_proba(d["X"][te])[:, 1])
        prior = np.array([y[tr & (d["site"] == s)].mean() if (tr & (d["site"] == s)).any() else y[tr].mean()
                          for s in d["site"][te]])
        c = pre.class_names.index(f)
        p = np.concatenate([preds[s].probs[:, c] for s in train_sites])
        t = np.concatenate([preds[s].targets[:, c] for s in train_sites])
        m = np.concatenate([preds[s].mask[:, c] for s in train_sites]) > 0
        within = {}
        for s in train_sites:
            pk = preds[s]
            auc = per_class_auc(pk.probs[:, [c]], pk.targets[:, [c]], pk.mask[:, [c]])[0]
            if np.isfinite(auc):
                within[s] = round(float(auc), 4)
        res["findings"][f] = {"model_pooled": round(float(roc_auc_score(t[m], p[m])), 4),
                              "pixel_logistic": round(float(pixel), 4),
                              "site_prior": round(float(roc_auc_score(y[te], prior)), 4),
                              "model_within_site": within, "n_pos": int(t[m].sum()), "n": int(m.sum())}
        res["findings"][f]["reaches_pixel_baseline"] = bool(res["findings"][f]["model_pooled"] >= pixel)
    ev = Path(run) / "eval" / "results.json"
    if ev.is_file():
        lp = json.loads(ev.read_text()).get("linear_probe", {})
        res["linear_probe_vs_random"] = {s: {"pretrained": r["mean"]["auc"], **r.get("vs_random", {})}
                                         for s, r in lp.items()}
    hist = [json.loads(line) for line in open(Path(run) / "metrics.jsonl") if line.strip()]
    hist = [h for h in hist if h.get("position", 0) >= 0]
    res["val_curve"] = [{k: h.get(k) for k in ("stage", "epoch", "val_auc")} for h in hist]
    conquer = [h["val_auc"] for h in hist if h.get("stage") == "conquer" and h.get("val_auc") is not None]
    divide = [h["val_auc"] for h in hist if h.get("stage") == "divide" and h.get("val_auc") is not None]
    # divide_from=best: divide starts from the best conquer epoch
    res["val_auc_at_switch"] = max(conquer) if conquer else None
    res["val_auc_after_divide"] = divide[-1] if divide else None
    res["best"] = best_summary(hist, run)
    res["expert_init"] = (pre.config.get("unichest") or {}).get("expert_init")
    return res


def train(init: str, run: str) -> float:
    """`raycxr demo` with its own settings and ``unichest.expert_init=init`` into ``run`` (fine-tuning,
    attention maps and the export skipped: they do not enter these figures); its seconds."""
    from raycxr.config import compose
    from raycxr.demo import run_demo

    cfg = compose("demo", [f"run={run}", "export.enabled=false"])
    cfg.pretrain.overrides.append(f"unichest.expert_init={init}")
    cfg.eval.overrides += ["fine_tune.enabled=false", "attention.enabled=false"]
    return float(run_demo(cfg)["seconds"]["total"])


def detail_lines(res: dict) -> list[str]:
    lines = [f"Demo run `{res['run']}` ({res['method']}, `{res['checkpoint']}`), training sites "
             f"{', '.join(res['training_sites'])}: test splits pooled", "",
             "| finding | positives / images | demo classifier | pixel logistic (same splits) | site prior (no pixels) "
             "| demo classifier within each site |", "|---|---|---|---|---|---|"]
    for f, r in res["findings"].items():
        ws = ", ".join(f"{s} {v:.2f}" for s, v in r["model_within_site"].items())
        lines.append(f"| {f} | {r['n_pos']} / {r['n']} | {r['model_pooled']:.3f} | {r['pixel_logistic']:.3f} | "
                     f"{r['site_prior']:.3f} | {ws} |")
    for s, r in res.get("linear_probe_vs_random", {}).items():
        if r.get("difference") is not None:
            lines += ["", f"Linear probe on the held-out site {s}: pretrained {r['pretrained']:.3f} vs random init "
                          f"{r['random_mean_auc']:.3f}, difference {r['difference']:+.3f} (95 % CI "
                          f"{r['ci'][0]:+.3f} to {r['ci'][1]:+.3f}, paired bootstrap over test images)"]
    return lines


def comparison_lines(runs: dict[str, dict], default: str) -> list[str]:
    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = ["`unichest.expert_init` on the demo (same seed and settings; val = mean AUC on the training sites' val "
             "splits; test = the best epoch's classifier, training sites' test splits pooled):", "",
             "| expert_init | val AUC at the switch | val AUC after divide | best epoch (used) | "
             + " | ".join(f"test {f}" for f in FINDINGS) + " | held-out linear probe − random init [95 % CI] "
             "| demo seconds |", "|---|---|---|---|" + "---|" * len(FINDINGS) + "---|---|"]
    for init, r in runs.items():
        b = r.get("best") or {}
        where = f"{b.get('stage', '')} {b.get('epoch', '')}: {fmt(b.get('val_auc'))}" if b else "–"
        lp = next(iter(r.get("linear_probe_vs_random", {}).values()), {})
        probe = (f"{lp['difference']:+.3f} [{lp['ci'][0]:+.3f}, {lp['ci'][1]:+.3f}]"
                 if lp.get("difference") is not None else "–")
        secs = f"{r['demo_seconds']:.0f}" if r.get("demo_seconds") else "–"
        mark = " (default)" if init == default else ""
        lines.append(f"| {init}{mark} | {fmt(r['val_auc_at_switch'])} | {fmt(r['val_auc_after_divide'])} | {where} | "
                     + " | ".join(fmt(r["findings"][f]["model_pooled"]) for f in FINDINGS) + f" | {probe} | {secs} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="one finished run to analyse (no training, no comparison)")
    ap.add_argument("--expert-init", nargs="+", default=["random", "copy"])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--sites-dir", default="sites")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from raycxr.config import compose

    default = str(compose("pretrain", []).unichest.expert_init)
    folders = {None: args.run} if args.run else {i: f"runs/demo-unichest-experts-{i}" for i in args.expert_init}
    seconds = {}
    out = Path(args.out)
    prev = json.loads((out / "demo_learning.json").read_text()) if (out / "demo_learning.json").is_file() else {}
    for init, run in folders.items():
        if init is not None and not (Path(run) / "eval" / "results.json").is_file():
            seconds[init] = train(init, run)
        elif init is not None:  # trained earlier: keep the time measured then
            seconds[init] = (prev.get("compare_expert_init", {}).get(init) or {}).get("demo_seconds")
    sites = discover_sites(args.sites_dir, data_root=args.data_root)
    d = load_corpus(Path(args.data))
    runs = {init: {**analyse(run, sites, d), "demo_seconds": seconds.get(init)} for init, run in folders.items()}
    if args.run:
        main_run, res = runs[None], runs[None]
    else:
        main_run = runs.get(default) or next(iter(runs.values()))
        res = {**main_run, "default_expert_init": default, "compare_expert_init": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_learning.json").write_text(json.dumps(res, indent=2))
    lines = detail_lines(main_run)
    if not args.run:
        lines += ["", *comparison_lines(runs, default)]
    (out / "demo_learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
