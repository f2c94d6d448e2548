"""Does the demo's pretraining learn? Its two targets, checked on a finished `raycxr demo` run.

1. The demo's classifier, scored on the training sites' test splits pooled, against a logistic
   regression on 64x64 pixels fitted on the same sites' train splits (the corpus-fitness classifier) on
   Cardiomegaly, Pleural Effusion and Edema. Beside them: a "site prior" that scores every image with
   the finding's training prevalence at its site (no pixels at all), which shows how much of a pooled
   AUC only tells the sites apart, and the mean AUC within each site.
2. A linear probe on the held-out site with the pretrained encoder against the same probe on a
   random-init encoder, with the paired-bootstrap 95 % interval of the difference (from the run's
   `raycxr eval` results).

    python benchmarks/demo_learning.py [--run runs/demo-unichest] [--data data/demo] [--out benchmarks/results]

Run `raycxr demo` first (or pass another run folder evaluated by `raycxr eval`).
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

from raycxr.eval.metrics import per_class_auc  # noqa: E402
from raycxr.eval.predict import predict_site  # noqa: E402
from raycxr.methods import load_pretrained  # noqa: E402
from raycxr.sites.config import discover_sites  # noqa: E402

FINDINGS = ["Cardiomegaly", "Pleural Effusion", "Edema"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo-unichest")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--sites-dir", default="sites")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    pre = load_pretrained(args.run)
    train_sites = list(pre.sites)
    sites = discover_sites(args.sites_dir, data_root=args.data_root)

    # the run's classifier on each training site's test split
    preds = {s: predict_site(pre.classifier, sites[s], pre.class_names, split="test", image_size=pre.image_size,
                             progress=False) for s in train_sites}
    # the pixel baseline on the same sites: fitted on their train splits, scored on their test splits
    d = load_corpus(Path(args.data))
    keep = np.isin(np.array(d["sites"])[d["site"]], train_sites)
    names = d["union"].names
    res: dict = {"run": args.run, "method": pre.method, "training_sites": train_sites, "findings": {}}
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
        res["findings"][f]["reaches_pixel_baseline"] = res["findings"][f]["model_pooled"] >= pixel
    ev = Path(args.run) / "eval" / "results.json"
    if ev.is_file():
        lp = json.loads(ev.read_text()).get("linear_probe", {})
        res["linear_probe_vs_random"] = {s: {"pretrained": r["mean"]["auc"], **r.get("vs_random", {})}
                                         for s, r in lp.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_learning.json").write_text(json.dumps(res, indent=2))
    lines = [f"Demo run `{args.run}` ({pre.method}), training sites {', '.join(train_sites)}: test splits pooled", "",
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
    (out / "demo_learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
