"""The synthetic corpus is fit for purpose: findings are learnable and sites are distinguishable.

Small, fast versions of benchmarks/corpus_fitness.py (which runs on the full demo corpus)."""

import warnings

import numpy as np
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score

from raycxr.manifest import Manifest
from raycxr.readers import read_image
from raycxr.synth.generator import SiteSpec, render_one

warnings.filterwarnings("ignore", category=ConvergenceWarning)


def _pixels(path, size=48):
    return np.asarray(Image.fromarray(read_image(path)).resize((size, size), Image.BILINEAR)).ravel()


def test_site_is_predictable_from_pixels(small_corpus):
    X, y = [], []
    for si, site in enumerate(("nih", "vindr", "siim")):
        m = Manifest.read(small_corpus / site / "manifest.parquet")
        for rel in m.to_pandas()["path"]:
            X.append(_pixels(small_corpus / site / rel))
            y.append(si)
    acc = cross_val_score(LogisticRegression(C=0.05, max_iter=300), np.array(X), np.array(y), cv=3).mean()
    assert acc > 0.8  # chance is 1/3


def test_salient_findings_are_learnable(tmp_path):
    names = ["Cardiomegaly", "Effusion"]
    spec = SiteSpec.parse({"name": "t", "source": "nih"}, 1)
    X, Y = [], []
    for i in range(96):
        labels = [i % 2, (i // 2) % 2]
        row = {"labels": labels, "view": "PA", "sex": "MF"[i % 3 == 0], "age": 50.0, "patient_id": str(i),
               "image_id": str(i), "boxes": None, "report": None}
        rec = render_one({"row": row, "spec": spec, "seed": 5, "idx": i, "site_index": 0, "render_size": 128,
                          "out": str(tmp_path), "label_names": names})
        X.append(_pixels(tmp_path / rec["path"]))
        Y.append(labels)
    X, Y = np.array(X), np.array(Y)
    train, test = np.arange(96) < 64, np.arange(96) >= 64
    for j in range(2):
        clf = LogisticRegression(C=0.05, max_iter=500).fit(X[train], Y[train, j])
        auc = roc_auc_score(Y[test, j], clf.predict_proba(X[test])[:, 1])
        assert auc > 0.75, (names[j], auc)
