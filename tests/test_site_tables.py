"""Site tables that are not what an adapter expects (issue 25): one line naming the file and the column,
never a loader's KeyError; and VinDr's two table formats with a radiologist vote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("torchxrayvision")

from test_adapters import DATA, PNG, _dicom, _touch  # noqa: E402

from raycxr.cli import main  # noqa: E402
from raycxr.sites.adapters import VINDR_LABELS, get_adapter  # noqa: E402


def _one_line_from_cli(tmp_path: Path, adapter: str, options: dict, capsys) -> str:
    sites = tmp_path / "sites"
    sites.mkdir(exist_ok=True)
    (sites / "s.yaml").write_text(yaml.safe_dump({"name": "s", "adapter": adapter, "root": str(tmp_path),
                                                  "adapter_options": options}))
    assert main(["sites", "build", "s", f"sites_dir={sites}", f"data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_nih_without_finding_labels(tmp_path: Path, capsys) -> None:
    raw = pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz", nrows=20)
    raw.rename(columns={"Finding Labels": "Findings"}).to_csv(tmp_path / "Data_Entry.csv", index=False)
    err = _one_line_from_cli(tmp_path, "nih", {"csvpath": "Data_Entry.csv"}, capsys)
    assert "Data_Entry.csv: column(s) ['Finding Labels'] not found" in err


def test_chexpert_without_frontal_lateral(tmp_path: Path, capsys) -> None:
    raw = pd.read_csv(DATA / "chexpert_train.csv.gz", nrows=20)
    raw.rename(columns={"Frontal/Lateral": "View"}).to_csv(tmp_path / "train.csv", index=False)
    err = _one_line_from_cli(tmp_path, "chexpert", {"csvpath": "train.csv"}, capsys)
    assert "train.csv: column(s) ['Frontal/Lateral'] not found" in err


def test_vindr_with_a_table_of_neither_format(tmp_path: Path, capsys) -> None:
    pd.DataFrame({"image_id": ["a", "b"], "Patient": ["x", "y"]}).to_csv(tmp_path / "other.csv", index=False)
    err = _one_line_from_cli(tmp_path, "vindr", {"csvpath": "other.csv"}, capsys)
    assert "other.csv: neither VinDr table format" in err and "'class_name'" in err


def test_padchest_duplicate_image_rows_are_listed_not_fatal(tmp_path: Path) -> None:
    raw = pd.read_csv(DATA / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", low_memory=False)
    rows = raw[raw["Labels"].notna() & raw["Projection"].isin(["PA", "L"])].head(12)
    table = pd.concat([rows, rows.iloc[[0, 3]]], ignore_index=True)
    table.to_csv(tmp_path / "pc.csv", index=False)
    for d, i in zip(rows["ImageDir"], rows["ImageID"]):
        _touch(tmp_path / str(d) / i, PNG)
    res = get_adapter("padchest").build(tmp_path, "pc", csvpath="pc.csv")
    assert len(res.manifest) == 12
    dup = [d for d in res.dropped if d["reason"].startswith("duplicate ImageID row")]
    assert sorted(d["image_id"] for d in dup) == sorted(rows["ImageID"].iloc[[0, 3]])


def test_vindr_physionet_image_labels_with_votes_and_its_test_table(tmp_path: Path) -> None:
    names = ["Aortic enlargement", "Cardiomegaly", "Lung Opacity", "COPD", "No finding"]
    rows = []
    # image a: 1 of 3 radiologists marks Cardiomegaly; b: 2 of 3; c: 3 of 3
    for img, k in (("a", 1), ("b", 2), ("c", 3)):
        for r in range(3):
            rows.append({"image_id": img, "rad_ID": f"R{r}", **dict.fromkeys(names, 0),
                         "Cardiomegaly": int(r < k), "COPD": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "image_labels_train.csv", index=False)
    pd.DataFrame([{"image_id": "t", **dict.fromkeys(names, 0), "Lung Opacity": 1}]).to_csv(
        tmp_path / "image_labels_test.csv", index=False)
    for img in "abc":
        _dicom(tmp_path / "train" / f"{img}.dicom", 8, 8, pixels=False)
    _dicom(tmp_path / "test" / "t.dicom", 8, 8, pixels=False)

    def cardio(vote: str) -> dict:
        res = get_adapter("vindr").build(tmp_path, "v", vote=vote)
        m = res.manifest
        assert m.label_names == ["Aortic enlargement", "Cardiomegaly", "Lung Opacity", "COPD"]
        df = m.to_pandas().set_index("image_id")
        assert df.loc["t", "split"] == "test" and m.site_meta["tables"]["csvpath"].endswith("image_labels_train.csv")
        col = m.label_matrix()[:, 1]
        return {i: float(v) for i, v in zip(df.index, col)}

    assert cardio("any") == {"a": 1, "b": 1, "c": 1, "t": 0}
    assert cardio("majority") == {"a": 0, "b": 1, "c": 1, "t": 0}
    assert cardio("all") == {"a": 0, "b": 0, "c": 1, "t": 0}
    with pytest.raises(ValueError, match="vote must be one of"):
        get_adapter("vindr").build(tmp_path, "v", vote="most")


def test_vindr_kaggle_table_votes_per_radiologist(tmp_path: Path) -> None:
    raw = pd.read_csv(DATA / "vinbigdata-train.csv.gz")
    per = raw.groupby(["image_id", "class_name"])["rad_id"].nunique().unstack(fill_value=0)
    img = per.index[(per.get("Cardiomegaly", 0) == 1)][0]  # one radiologist of three marked it
    _dicom(tmp_path / "train" / f"{img}.dicom", 8, 8, pixels=False)
    col = VINDR_LABELS.index("Cardiomegaly")
    table = DATA / "vinbigdata-train.csv.gz"
    anyv = get_adapter("vindr").build(tmp_path, "v", csvpath=table).manifest
    maj = get_adapter("vindr").build(tmp_path, "v", csvpath=table, vote="majority").manifest
    assert anyv.label_matrix()[0, col] == 1 and maj.label_matrix()[0, col] == 0
    assert np.array_equal(maj.label_matrix() <= anyv.label_matrix(), np.ones_like(maj.label_matrix(), bool))

