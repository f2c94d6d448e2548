"""Is the synthetic corpus fit for purpose? Two checks on the demo corpus, written to a results file.

1. Findings are learnable: a small classifier (logistic regression on 64x64 pixels, trained on the
   train split of all sites, scored on the test split) reaches a test AUC well above 0.5 for the
   salient findings.
2. Sites are heterogeneous: the same kind of classifier tells the site of an image from its pixels
   far above chance (1 / number of sites).

Baseline in the same run: the same classifier on pixels shuffled within each image (all spatial
structure destroyed, intensity histogram kept), which shows how much comes from the anatomy and
findings rather than from grey-level statistics alone.

    python benchmarks/corpus_fitness.py [data/demo] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from raycxr.labels import UnionLabelSpace
from raycxr.manifest import Manifest
from raycxr.readers import ImageReadError, read_image

warnings.filterwarnings("ignore", category=ConvergenceWarning)

SALIENT = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Support Devices", "Edema", "Nodule/Mass", "Mass",
           "Nodule", "Consolidation", "Lung Opacity", "Atelectasis", "Emphysema", "Fibrosis"]


def load_corpus(root: Path, size: int = 64) -> dict:
    sites = sorted(p.parent.name for p in root.glob("*/manifest.parquet"))
    if not sites:
        raise SystemExit(f"no site manifests under {root}; run `raycxr synth out={root}` first")
    manifests = {s: Manifest.read(root / s / "manifest.parquet") for s in sites}
    union = UnionLabelSpace.build({s: m.label_names for s, m in manifests.items()})
    X, site, split, targets, masks = [], [], [], [], []
    for si, (s, m) in enumerate(manifests.items()):
        df = m.to_pandas()
        t, mk = union.to_union(s, m.label_matrix(), policy="ignore")
        for i, rel in enumerate(tqdm(df["path"], desc=f"read {s}")):
            try:
                img = read_image(root / s / rel)
            except ImageReadError:
                continue
            X.append(np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)).ravel())
            site.append(si)
            split.append(df["split"].iloc[i])
            targets.append(t[i])
            masks.append(mk[i])
    return {"X": np.array(X, np.float32), "site": np.array(site), "split": np.array(split),
            "targets": np.array(targets), "masks": np.array(masks), "union": union, "sites": sites}


def classifier() -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=300))


def evaluate(d: dict, X: np.ndarray) -> dict:
    train = d["split"] != "test"
    test = d["split"] == "test"
    out = {"site_accuracy": float(classifier().fit(X[train], d["site"][train]).score(X[test], d["site"][test])),
           "chance": 1 / len(d["sites"]), "findings": {}}
    for name in SALIENT:
        if name not in d["union"].names:
            continue
        j = d["union"].names.index(name)
        known = d["masks"][:, j] == 1
        y = d["targets"][:, j]
        tr, te = train & known, test & known
        if y[tr].sum() < 10 or y[te].sum() < 3 or (1 - y[te]).sum() < 3:
            continue
        clf = classifier().fit(X[tr], y[tr])
        out["findings"][name] = {"auc": float(roc_auc_score(y[te], clf.predict_proba(X[te])[:, 1])),
                                 "train_pos": int(y[tr].sum()), "test_pos": int(y[te].sum()), "test_n": int(te.sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default="data/demo")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    d = load_corpus(Path(args.root))
    rng = np.random.default_rng(0)
    shuffled = np.array([rng.permutation(x) for x in d["X"]])
    res = {"images": len(d["X"]), "sites": d["sites"], "pixels": evaluate(d, d["X"]),
           "baseline_shuffled_pixels": evaluate(d, shuffled)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus_fitness.json").write_text(json.dumps(res, indent=2))
    lines = [f"Corpus fitness on {res['images']} images from {len(d['sites'])} sites "
             "(logistic regression on 64x64 pixels; test split):", "",
             "| check | raycxr corpus | baseline: pixels shuffled within each image |", "|---|---|---|",
             f"| site predicted from pixels (accuracy; chance {res['pixels']['chance']:.2f}) | "
             f"{res['pixels']['site_accuracy']:.2f} | {res['baseline_shuffled_pixels']['site_accuracy']:.2f} |"]
    for name, r in res["pixels"]["findings"].items():
        b = res["baseline_shuffled_pixels"]["findings"].get(name, {}).get("auc", float("nan"))
        lines.append(f"| {name} AUC ({r['test_pos']} positives / {r['test_n']}) | {r['auc']:.2f} | {b:.2f} |")
    (out / "corpus_fitness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
