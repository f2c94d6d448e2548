import numpy as np
import pyarrow.parquet as pq
import pytest

from raycxr.manifest import Manifest, ManifestError, assign_splits

LABELS = ["Effusion", "Mass", "Nodule"]


def rows(n=6):
    pids = [f"p{i // 2}" for i in range(n)]
    splits = assign_splits(pids, salt="s")
    return [dict(site="s", image_id=f"i{i}", path=f"images/{i}.dcm", patient_id=p, split=sp, sex="F", age=50.0,
                 view="PA", labels=[1, np.nan, -1]) for i, (p, sp) in enumerate(zip(pids, splits))]


def test_round_trip_keeps_missing_distinct_from_negative(tmp_path):
    r = rows()
    r[1]["labels"] = [0, 0, None]
    r[2]["boxes"] = [{"label": "Mass", "x0": 0.1, "y0": 0.2, "x1": 0.3, "y1": 0.4}]
    m = Manifest.from_records(r, LABELS, {"name": "s", "source": "test"})
    m.write(tmp_path / "m.parquet")
    back = Manifest.read(tmp_path / "m.parquet")
    lab = back.label_matrix()
    assert lab[0, 0] == 1 and np.isnan(lab[0, 1]) and lab[0, 2] == -1
    assert lab[1, 0] == 0 and lab[1, 1] == 0 and np.isnan(lab[1, 2])
    assert back.label_names == LABELS and back.site_meta["source"] == "test"
    assert back.to_pandas()["boxes"][2][0]["label"] == "Mass"
    # label names live in the Parquet schema metadata, readable without raycxr
    assert b"raycxr.label_names" in pq.read_schema(tmp_path / "m.parquet").metadata


@pytest.mark.parametrize("column,value,needle", [
    ("path", "/etc/passwd", "column 'path', row 3"),
    ("path", "../x.dcm", "column 'path', row 3"),
    ("split", "training", "column 'split', row 3"),
    ("view", "PA-ish", "column 'view', row 3"),
    ("sex", "female", "column 'sex', row 3"),
    ("age", 300.0, "column 'age', row 3"),
    ("labels", [1, 0], "column 'labels', row 3"),
    ("labels", [2, 0, 0], "column 'labels', row 3"),
    ("image_id", "i0", "column 'image_id', row 3"),
])
def test_malformed_rows_name_column_and_row(column, value, needle):
    r = rows()
    r[3][column] = value
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_records(r, LABELS)


def test_patient_in_two_splits_is_rejected():
    r = rows()
    r[1]["split"] = "test" if r[0]["split"] != "test" else "train"
    with pytest.raises(ManifestError, match="patient-disjoint"):
        Manifest.from_records(r, LABELS)


def test_read_reports_file_problems(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.read(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="junk.parquet.*not a readable Parquet"):
        Manifest.read(tmp_path / "junk.parquet")


def test_missing_required_column():
    r = rows()
    for x in r:
        del x["patient_id"]
    with pytest.raises(ManifestError, match="column 'patient_id'"):
        Manifest.from_records(r, LABELS)


def test_splits_are_stable_patient_disjoint_and_independent_of_other_patients():
    pids = [f"patient{i}" for i in range(2000)]
    a = assign_splits(pids, salt="nih")
    b = assign_splits(pids[::-1], salt="nih")[::-1]
    assert a == b  # order does not matter
    c = assign_splits(pids[:100], salt="nih")
    assert a[:100] == c  # adding patients moves nobody
    frac = {s: a.count(s) / len(a) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["val"] - 0.1) < 0.02
    assert assign_splits(pids, salt="other") != a
    with pytest.raises(ValueError):
        assign_splits(pids, fractions=(0.5, 0.5, 0.5))


def test_select_and_split():
    m = Manifest.from_records(rows(20), LABELS, {"name": "s"})
    parts = [m.split(s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 20
    assert all(p.label_names == LABELS for p in parts)
