"""Official splits (issue 25): a data set's own train / val / test files decide the manifest's split column.

Each test builds a small copy of the data set's layout (stand-in images, as in test_adapters) together
with its official split files, and checks the split column against them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torchxrayvision")

from test_adapters import DATA, JPEG, PNG, _dicom, _distinct, _mimic_tables, _sample, _touch  # noqa: E402

from raycxr.sites.adapters import get_adapter  # noqa: E402


def _splits(result) -> pd.Series:
    return result.manifest.to_pandas().set_index("image_id")["split"]


def test_nih_official_lists(tmp_path: Path) -> None:
    raw = pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz", usecols=["Image Index", "Patient ID"])
    patients = _sample(raw["Patient ID"], 40)
    rows = raw[raw["Patient ID"].isin(patients)]
    test_patients = set(patients[::4])
    is_test = rows["Patient ID"].isin(test_patients)
    for i in rows["Image Index"]:
        _touch(tmp_path / "images_001" / "images" / i, PNG)
    (tmp_path / "test_list.txt").write_text("\n".join(rows.loc[is_test, "Image Index"]) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(rows.loc[~is_test, "Image Index"]) + "\n")
    res = get_adapter("nih").build(tmp_path, "nih")
    split = _splits(res)
    want_test = set(rows.loc[is_test, "Image Index"])
    assert set(split.index[split == "test"]) == want_test
    assert set(split[~split.index.isin(want_test)]) == {"train", "val"}  # train_val divided by the patient hash
    meta = res.manifest.site_meta["split"]
    assert meta["policy"] == "official" and meta["source"].startswith("official (test_list.txt")
    assert meta["rows_without_official_split"] == 0

    hashed = _splits(get_adapter("nih").build(tmp_path, "nih", split="hashed"))
    assert set(hashed.index[hashed == "test"]) != want_test
    with pytest.raises(ValueError, match="split must be one of"):
        get_adapter("nih").build(tmp_path, "nih", split="paper")


def test_chexpert_valid_csv_is_the_test_split(tmp_path: Path) -> None:
    raw = pd.read_csv(DATA / "chexpert_train.csv.gz")
    train = raw[raw["Path"].isin(_sample(raw["Path"], 40))]
    valid = raw[raw["Path"].isin(_sample(raw["Path"], 12, seed=5))].copy()
    valid = valid[~valid["Path"].isin(train["Path"])]
    # valid.csv's own layout: CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg
    valid["Path"] = [f"CheXpert-v1.0-small/valid/patient{64541 + k}/study1/view1_frontal.jpg"
                     for k in range(len(valid))]
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    train.to_csv(folder / "train.csv", index=False)
    valid.to_csv(folder / "valid.csv", index=False)
    for p in [*train["Path"], *valid["Path"]]:
        _touch(tmp_path / p, JPEG)
    res = get_adapter("chexpert").build(tmp_path, "chex", csvpath=folder / "train.csv")
    split = _splits(res)
    is_valid = split.index.str.startswith("valid/")
    assert is_valid.sum() > 0 and (split[is_valid] == "test").all()
    assert set(split[~is_valid]) <= {"train", "val"}
    assert "valid.csv" in res.manifest.site_meta["split"]["source"]
    # hashed: the validation images are still in the manifest, split by patient hash
    hashed = _splits(get_adapter("chexpert").build(tmp_path, "chex", csvpath=folder / "train.csv", split="hashed"))
    assert len(hashed) == len(split) and res.manifest.site_meta["split"]["policy"] == "official"


def test_mimic_split_csv(tmp_path: Path) -> None:
    chex, meta = _mimic_tables(tmp_path)
    ok = meta["ViewPosition"].isin(["PA", "AP", "LATERAL", "LL"]) | meta["ViewPosition"].isna()
    ok &= meta["study_id"].isin(chex["study_id"])
    m = meta[ok]
    for r in m.itertuples():
        s, t = str(r.subject_id), str(r.study_id)
        _touch(tmp_path / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{r.dicom_id}.jpg", JPEG)
    subjects = sorted(m["subject_id"].unique())
    official = {s: ["train", "validate", "test"][k % 3] for k, s in enumerate(subjects)}
    table = m[["dicom_id", "study_id", "subject_id"]].assign(split=m["subject_id"].map(official))
    with gzip.open(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        table.to_csv(f, index=False)
    res = get_adapter("mimic_cxr_jpg").build(tmp_path, "mimic")
    split = _splits(res)
    want = table.set_index("dicom_id")["split"].replace({"validate": "val"})
    assert (split == want.loc[split.index]).all()
    assert "mimic-cxr-2.0.0-split.csv" in res.manifest.site_meta["split"]["source"]


def test_vindr_train_and_test_folders(tmp_path: Path) -> None:
    raw = pd.read_csv(DATA / "vinbigdata-train.csv.gz", usecols=["image_id"])
    ids = _sample(raw["image_id"], 30)
    test_ids = set(ids[::3])
    for i in ids:  # PhysioNet's layout: train/ and test/ (the labels of both here come from one table)
        _dicom(tmp_path / ("test" if i in test_ids else "train") / f"{i}.dicom", 8, 8, pixels=False)
    res = get_adapter("vindr").build(tmp_path, "vindr")
    split = _splits(res)
    assert set(split.index[split == "test"]) == test_ids
    assert set(split[~split.index.isin(test_ids)]) == {"train", "val"}
    # Kaggle's copy (train/ only): no official test set, so the hashed split, and it says so
    kaggle = tmp_path / "kaggle"
    for i in ids:
        _dicom(kaggle / "train" / f"{i}.dicom", 8, 8, pixels=False)
    res = get_adapter("vindr").build(kaggle, "vindr")
    assert res.manifest.site_meta["split"]["source"].startswith("hashed")
    assert "test" in set(_splits(res))


def test_a_renamed_site_keeps_its_splits(tmp_path: Path) -> None:
    n = 40
    pd.DataFrame({"path": [f"{k}.png" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)]}
                 ).to_csv(tmp_path / "t.csv", index=False)
    for k in range(n):
        _touch(tmp_path / f"{k}.png", _distinct("PNG", k))
    a = get_adapter("generic_csv").build(tmp_path, "hospital-a", csv="t.csv")
    b = get_adapter("generic_csv").build(tmp_path, "hospital-a-renamed", csv="t.csv")
    assert list(_splits(a)) == list(_splits(b))
    assert len(set(_splits(a))) == 3
    assert np.array_equal(a.manifest.label_matrix(), b.manifest.label_matrix())
