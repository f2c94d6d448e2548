import csv
import json
import math
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from raycxr.engine import metrics as M
from raycxr.eval.report import write_report


def _col(*xs):
    return np.asarray(xs, dtype=np.float64)[:, None]


def _random(n=120, c=3, seed=0):
    """Scores that carry signal, every class annotated on ~80 % of rows."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, c)) < 0.35).astype(float)
    p = np.clip(0.5 * t + 0.6 * rng.random((n, c)), 0, 1)
    m = (rng.random((n, c)) < 0.8).astype(float)
    return p, t, m


def test_separable_and_reversed_scores():
    t = _col(0, 0, 1, 1)
    m = np.ones_like(t)
    res = M.classification_metrics(_col(0.1, 0.2, 0.8, 0.9), t, m, ["x"])
    pc = res["per_class"]["x"]
    assert pc["auc"] == 1.0 and pc["ap"] == 1.0 and pc["f1"] == 1.0 and pc["acc"] == 1.0
    assert pc["sensitivity"] == 1.0 and pc["specificity"] == 1.0 and (pc["n_pos"], pc["n_neg"]) == (2, 2)
    assert res["mean"]["auc"] == 1.0 and res["n_images"] == 4
    assert M.classification_metrics(_col(0.9, 0.8, 0.2, 0.1), t, m, ["x"])["per_class"]["x"]["auc"] == 0.0


def test_max_f1_threshold_by_hand():
    # thresholds 0.1 / 0.35 / 0.4 / 0.8 give F1 2/3, 0.8, 0.5, 2/3: the best is 0.35 (TP 2, FP 1, FN 0)
    p, t = _col(0.1, 0.4, 0.35, 0.8), _col(0, 0, 1, 1)
    m = np.ones_like(t)
    np.testing.assert_allclose(M.max_f1_thresholds(p, t, m), [0.35])
    res = M.classification_metrics(p, t, m, ["x"])
    pc = res["per_class"]["x"]
    assert pc["threshold"] == pytest.approx(0.35) and pc["f1"] == pytest.approx(0.8)
    assert pc["acc"] == pytest.approx(0.75) and pc["sensitivity"] == 1.0 and pc["specificity"] == 0.5
    assert pc["auc"] == pytest.approx(0.75)
    assert res["threshold_source"] == "max-F1 on this split"
    given = M.classification_metrics(p, t, m, ["x"], thresholds=np.array([0.5]))
    assert given["threshold_source"] == "given" and given["per_class"]["x"]["f1"] == pytest.approx(2 / 3)


def test_masked_rows_are_excluded():
    p, t, m = _random(seed=1)
    m[5] = 0
    names = ["a", "b", "c"]
    th = np.full(3, 0.5)
    sex = np.array(["F", "M"] * 60)

    def everything(p, t):
        return (M.classification_metrics(p, t, m, names, n_boot=20), M.max_f1_thresholds(p, t, m).tolist(),
                M.fnr_by_group(p, t, m, sex, th), M.subset_accuracy(p, t, m, th),
                {k: v.tolist() for k, v in M.threshold_sweep(p, t, m).items()},
                M.oracle_auc(p, t, m)["mean_auc"].tolist())

    before = everything(p, t)
    p2, t2 = p.copy(), t.copy()
    p2[5], t2[5] = 1 - p2[5], 1 - t2[5]
    assert everything(p2, t2) == before
    # and the masked row really was an input: unmasking it changes the result
    m[5] = 1
    assert everything(p2, t2)[0] != before[0]


def test_degenerate_classes_are_none_and_left_out_of_means():
    p = np.array([[0.9, 0.6, 0.6], [0.2, 0.4, 0.7], [0.8, 0.7, 0.2]])
    t = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]])
    m = np.ones_like(t)
    res = M.classification_metrics(p, t, m, ["ok", "no_pos", "no_neg"], n_boot=10)
    json.dumps(res, allow_nan=False)
    for name in ("no_pos", "no_neg"):
        assert res["per_class"][name]["auc"] is None and res["per_class"][name]["ap"] is None
        assert res["per_class"][name]["auc_ci"] is None
    assert (res["per_class"]["no_pos"]["n_pos"], res["per_class"]["no_neg"]["n_neg"]) == (0, 0)
    assert res["per_class"]["no_pos"]["threshold"] == 0.5 and res["per_class"]["no_pos"]["sensitivity"] is None
    assert res["mean"]["auc"] == 1.0 and res["mean"]["classes"] == ["ok"]
    assert res["excluded_from_means"] == ["no_pos", "no_neg"]
    # "no_pos" has F1 0 at 0.5 (two false positives, no true one) and does not drag the mean F1 down
    assert res["per_class"]["no_pos"]["f1"] == 0.0 and res["per_class"]["no_pos"]["specificity"] == pytest.approx(1 / 3)
    assert res["mean"]["f1"] == res["per_class"]["ok"]["f1"] == 1.0


def test_rank_auc_matches_sklearn_with_ties():
    p, t, m = _random(seed=2)
    p = np.round(p, 1)  # many ties
    aucs = M.per_class_auc(p, t, m)
    for c in range(3):
        rows = m[:, c] > 0
        assert aucs[c] == pytest.approx(roc_auc_score(t[rows, c], p[rows, c]))
    assert M.mean_auc(p, t, m) == pytest.approx(aucs.mean())


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    p, t, m = _random(n=150, seed=3)
    point = M.mean_auc(p, t, m)
    lo, hi = M.bootstrap_ci(p, t, m, M.mean_auc, n_boot=100, seed=7)
    assert lo < point < hi and 0 <= lo and hi <= 1
    assert M.bootstrap_ci(p, t, m, M.mean_auc, n_boot=100, seed=7) == (lo, hi)
    assert M.bootstrap_ci(p, t, m, M.mean_auc, n_boot=100, seed=8) != (lo, hi)
    # the fast per-class path draws the same resamples
    assert M.bootstrap_auc(p, t, m, n_boot=100, seed=7)["mean"] == pytest.approx((lo, hi))
    res = M.classification_metrics(p, t, m, ["a", "b", "c"], n_boot=100, seed=7)
    assert res["mean"]["auc_ci"] == pytest.approx([lo, hi])
    for pc in res["per_class"].values():
        assert pc["auc_ci"][0] < pc["auc"] < pc["auc_ci"][1]
    assert res["bootstrap"]["n_valid"] == 100


def test_bootstrap_skips_resamples_where_a_class_degenerates():
    rng = np.random.default_rng(0)
    p = rng.random((30, 1))
    t = np.zeros((30, 1))
    t[0] = 1  # one positive: about e^-1 of resamples lose it
    m = np.ones_like(t)
    ci = M.bootstrap_auc(p, t, m, n_boot=200, seed=0)
    assert 30 < ci["n_valid"] < 170
    assert np.isfinite(ci["per_class"]).all() and np.isfinite(ci["mean"]).all()


def test_subset_accuracy_by_hand():
    p = np.array([[0.9, 0.1], [0.9, 0.9], [0.2, 0.9], [0.5, 0.5]])
    t = np.array([[1, 0], [1, 0], [1, 1], [0, 0]])
    m = np.array([[1, 1], [1, 0], [1, 1], [0, 0]])  # row 1's wrong class is unannotated; row 3 has no labels
    assert M.subset_accuracy(p, t, m, np.array([0.5, 0.5])) == pytest.approx(2 / 3)


def test_fnr_by_group_by_hand():
    p = np.array([[0.9, 0.2], [0.4, 0.8], [0.7, 0.1], [0.1, 0.1]])
    t = np.array([[1, 1], [1, 0], [1, 1], [0, 1]])
    m = np.array([[1, 1], [1, 1], [1, 0], [1, 0]])
    out = M.fnr_by_group(p, t, m, np.array(["F", "M", None, "F"], dtype=object), np.array([0.5, 0.5]))
    assert out == {"F": {"fnr": 0.5, "n_pos": 2, "n_images": 2}, "M": {"fnr": 1.0, "n_pos": 1, "n_images": 1},
                   "unknown": {"fnr": 0.0, "n_pos": 1, "n_images": 1}}
    none = M.fnr_by_group(p, t, np.zeros_like(m), ["F", "F", float("nan"), "M"], np.array([0.5, 0.5]))
    assert none["unknown"] == {"fnr": None, "n_pos": 0, "n_images": 1}


def test_age_bands():
    out = M.age_bands([5, 39.9, 40, 59, 60, 80, 199, 200, np.nan, -1])
    assert out.tolist() == ["0-39", "0-39", "40-59", "40-59", "60-79", "80+", "80+", "unknown", "unknown", "unknown"]


def test_threshold_sweep_by_hand():
    # class "ok" separable at 0.5; class "deg" has no positive and stays out of the means
    p = np.array([[0.2, 0.9], [0.3, 0.9], [0.6, 0.9], [0.9, 0.9]])
    t = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])
    sw = M.threshold_sweep(p, t, np.ones_like(t), thresholds=np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(sw["fnr"], [0, 0, 1])
    np.testing.assert_allclose(sw["fpr"], [1, 0, 0])
    np.testing.assert_allclose(sw["accuracy"], [0.5, 1, 0.5])
    assert len(M.threshold_sweep(p, t, np.ones_like(t))["thresholds"]) == 21


def test_oracle_auc_endpoints_and_monotone():
    p, t, m = _random(n=200, seed=4)
    fr = (0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    curve = M.oracle_auc(p, t, m, fractions=fr)["mean_auc"]
    assert curve[0] == pytest.approx(M.mean_auc(p, t, m))
    assert curve[-1] == pytest.approx(1.0)
    assert (np.diff(curve) >= -1e-12).all() and curve[-2] > curve[0]


def test_oracle_refers_the_case_closest_to_half():
    # one inverted pair (0.45 negative above 0.4 positive); referring 1 of 4 fixes the 0.45 case
    p, t = _col(0.1, 0.4, 0.45, 0.95), _col(0, 1, 0, 1)
    res = M.oracle_auc(p, t, np.ones_like(t), fractions=(0, 0.25))
    np.testing.assert_allclose(res["mean_auc"], [0.75, 1.0])


def test_roc_points():
    p, t = np.array([[0.1, 0.5], [0.9, 0.5]]), np.array([[0, 1], [1, 1]])
    roc = M.roc_points(p, t, np.ones_like(t), ["x", "all_pos"])
    assert list(roc) == ["x"]
    fpr, tpr = roc["x"]
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


def test_shape_errors():
    with pytest.raises(ValueError):
        M.classification_metrics(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 2)), ["only one"])
    with pytest.raises(ValueError):
        M.max_f1_thresholds(np.zeros((3, 2)), np.zeros((3, 1)), np.ones((3, 2)))


def _site_results(seed, ood):
    p, t, m = _random(n=80, c=3, seed=seed)
    names = ["Effusion", "Edema", "Mass"]
    t[:, 2] = 0  # "Mass" has no positive: reported, not averaged
    res = M.classification_metrics(p, t, m, names, n_boot=20)
    th = np.array([res["per_class"][n]["threshold"] for n in names])
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M", None], size=len(p))
    roc = M.roc_points(p, t, m, names)
    return {"split": "test", "ood": ood, "n_images": len(p), "metrics": res,
            "fnr_by_sex": M.fnr_by_group(p, t, m, sex, th),
            "fnr_by_age": M.fnr_by_group(p, t, m, M.age_bands(rng.uniform(20, 90, len(p))), th),
            "subset_accuracy": M.subset_accuracy(p, t, m, th), "threshold_sweep": M.threshold_sweep(p, t, m),
            "oracle_auc": M.oracle_auc(p, t, m), "roc": {k: [v[0].tolist(), v[1].tolist()] for k, v in roc.items()}}


def test_write_report(tmp_path):
    a, b = _site_results(0, False), _site_results(1, True)
    zs = dict(b["metrics"], unseen_classes=["Mass"], unseen_mean_auc=None)
    results = {
        "model": {"run": "runs/x", "method": "unichest", "encoder": "resnet18", "classes": ["Effusion", "Edema"],
                  "sites": ["nih"]},
        "sites": {"nih": a, "vindr": b, "siim": {"split": "test", "ood": True, "skipped": "no common classes"}},
        "zero_shot": {"vindr": zs},
        "linear_probe": {"vindr": dict(b["metrics"], n_train=40)},
        "fine_tune": {"vindr": {"1%": {"mean_auc": 0.6}, "10%": {"mean_auc": 0.7}, "100%": {"mean_auc": 0.8},
                                "probe_then_ft": {"mean_auc": 0.82}}},
        "attention_maps": [{"path": "attention_vindr.png", "caption": "vindr | attention"}],
    }
    (tmp_path / "attention_vindr.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the caller writes these
    md = write_report(results, tmp_path, title="test report")
    assert md == tmp_path / "report.md"
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["sites"]["nih"]["metrics"]["per_class"]["Mass"]["auc"] is None
    assert isinstance(loaded["sites"]["nih"]["oracle_auc"]["mean_auc"], list)

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    # classifier 2 sites x (3 classes + mean), zero-shot and linear probe 3 + 1 each, fine-tune 4 settings
    assert len(rows) == 2 * 4 + 4 + 4 + 4
    eff = next(r for r in rows if (r["evaluation"], r["site"], r["class"]) == ("classifier", "nih", "Effusion"))
    pc = a["metrics"]["per_class"]["Effusion"]
    assert float(eff["auc"]) == pytest.approx(pc["auc"]) and float(eff["auc_ci_low"]) == pytest.approx(pc["auc_ci"][0])
    assert eff["ood"] == "False" and float(eff["threshold"]) == pytest.approx(pc["threshold"])

    text = md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"auc_by_class.png", "roc.png", "fnr_by_sex.png", "fnr_by_age.png", "threshold_sweep.png",
            "oracle_auc.png", "zero_shot_auc.png", "linear_probe_auc.png", "fine_tune.png",
            "attention_vindr.png"} <= set(links)
    for link in links:
        assert (tmp_path / link).is_file() and (tmp_path / link).stat().st_size > 0
    assert "skipped: no common classes" in text and "Mass" in text
    page = (tmp_path / "report.html").read_text()
    assert set(re.findall(r"<img src='([^']+)'", page)) == set(links)
    assert "vindr | attention" in page


def test_write_report_with_only_the_model(tmp_path):
    md = write_report({"model": {"run": "r", "method": "ark", "encoder": "e"}}, tmp_path)
    assert md.is_file() and (tmp_path / "report.html").is_file()
    assert len(list(csv.reader(open(tmp_path / "metrics.csv")))) == 1
    assert not list(tmp_path.glob("*.png"))


def test_json_of_numpy_results_is_strict():
    # what classification_metrics returns needs no conversion at all
    p, t, m = _random(seed=5)
    m[:, 1] = 0
    res = M.classification_metrics(p, t, m, ["a", "b", "c"], n_boot=5)
    assert math.isfinite(res["mean"]["auc"])
    json.dumps(res, allow_nan=False)


def test_estimable_classes_need_ten_positives_and_ten_negatives():
    t = np.zeros((30, 3))
    t[:10, 0] = 1  # 10 positives, 20 negatives: estimable
    t[:9, 1] = 1   # 9 positives: not
    t[:25, 2] = 1  # 5 negatives: not
    assert M.estimable_classes(t, np.ones_like(t)).tolist() == [True, False, False]
    assert M.estimable_classes(t, np.ones_like(t), min_positives=5).tolist() == [True, True, True]


def test_contrast_bootstrap_by_hand():
    y = np.array([[1.0], [1.0], [0.0], [0.0]])
    m = np.ones_like(y)
    a1 = np.array([[0.9], [0.4], [0.5], [0.1]])  # pairs: 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> AUC 3/4
    a2 = np.array([[0.8], [0.7], [0.2], [0.1]])  # AUC 1
    b = np.array([[0.1], [0.2], [0.8], [0.9]])   # AUC 0
    # A averages its two seeds: (0.75 + 1) / 2 = 0.875; A - B = 0.875
    res = M.contrast_bootstrap([([(1.0, [a1, a2]), (-1.0, [b])], y, m)], n_boot=200)
    assert res["estimate"] == pytest.approx(0.875)
    lo, hi = res["ci"]
    assert 0.5 <= lo <= 0.875 <= hi <= 1.0  # a resample can only move seed 1's AUC
    # a row against itself: exactly 0 on every draw
    same = M.contrast_bootstrap([([(1.0, [a1]), (-1.0, [a1])], y, m)], n_boot=50)
    assert same["estimate"] == 0.0 and same["ci"] == (0.0, 0.0) and same["n_valid"] > 0
    # perfect against reversed: 1 on every draw
    sep = M.contrast_bootstrap([([(1.0, [a2]), (-1.0, [b])], y, m)], n_boot=50)
    assert sep["estimate"] == 1.0 and sep["ci"] == (1.0, 1.0)
    # two strata are averaged: (0.875 + 1) / 2; a difference of differences is one contrast
    two = M.contrast_bootstrap([([(1.0, [a1, a2]), (-1.0, [b])], y, m), ([(1.0, [a2]), (-1.0, [b])], y, m)],
                               n_boot=20)
    assert two["estimate"] == pytest.approx(0.9375) and two["n_strata"] == 2
    dd = M.contrast_bootstrap([([(1.0, [a2]), (-1.0, [a1]), (-1.0, [a2]), (1.0, [b])], y, m)], n_boot=20)
    assert dd["estimate"] == pytest.approx((1 - 0.75) - (1 - 0))
    with pytest.raises(ValueError, match="do not match"):
        M.contrast_bootstrap([([(1.0, [a1[:3]])], y, m)])


def test_contrast_bootstrap_equals_resampling_the_rows_draw_by_draw():
    # the vectorised draws against the definition: resample the rows, rank-AUC each draw, skip degenerate ones
    rng = np.random.default_rng(3)
    n, c = 40, 3
    y = (rng.random((n, c)) < 0.3).astype(float)
    m = (rng.random((n, c)) < 0.85).astype(float)
    ties = np.round(rng.random((n, c)), 1)  # coarse scores: many ties, which count one half
    a = [ties, rng.random((n, c))]
    b = [rng.random((n, c))]
    strata = [([(1.0, a), (-1.0, b)], y, m), ([(1.0, a[:1]), (-1.0, b)], y[::-1], m[::-1])]
    n_boot, seed = 60, 5
    res = M.contrast_bootstrap(strata, n_boot=n_boot, seed=seed)
    draws = [M._resample_indices(n, n_boot, seed + k) for k in range(2)]
    values = []
    for i in range(n_boot):
        per = []
        for (terms, t, mm), d in zip(strata, draws):
            idx = d[i]
            tb, mb = t[idx] > 0.5, mm[idx] > 0
            if not M.evaluable_classes(tb, mb).all():
                break
            per.append(sum(w * np.mean([np.mean([M._rank_auc(tb[mb[:, j], j], p[idx][mb[:, j], j])
                                                 for j in range(c)]) for p in seeds]) for w, seeds in terms))
        else:
            values.append(np.mean(per))
    assert 0 < len(values) == res["n_valid"]
    assert res["ci"] == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
