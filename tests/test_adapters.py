"""Site adapters on the real tables torchxrayvision ships, with stand-in image files.

Each test takes a deterministic subset of a table's rows, writes tiny stand-in images for most of
them in the data set's real folder layout (a few are left out on purpose), builds the manifest and
compares its labels with counts computed here, independently, from the raw table.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

xrv = pytest.importorskip("torchxrayvision")
pydicom = pytest.importorskip("pydicom")

from raycxr.manifest import Manifest  # noqa: E402
from raycxr.sites.adapters import (  # noqa: E402
    ADAPTERS,
    CHEXPERT_LABELS,
    NOT_FOUND,
    VINDR_LABELS,
    AdapterResult,
    SiteAdapter,
    decode_siim_rle,
    get_adapter,
    list_adapters,
    register_adapter,
)

DATA = Path(xrv.__file__).parent / "data"


# -- helpers ------------------------------------------------------------------------------------------
def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _encoded("PNG"), _encoded("JPEG")


def _distinct(fmt: str, k: int) -> bytes:
    """Stand-in image number ``k``: different pixels per k (folder / generic_csv drop exact duplicates)."""
    buf = io.BytesIO()
    Image.fromarray(((np.arange(64) * (k + 1)) % 251).astype(np.uint8).reshape(8, 8), mode="L").save(buf, format=fmt)
    return buf.getvalue()


def _touch(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _dicom(path: Path, rows: int = 8, cols: int = 8, pixels: bool = True, **tags: str) -> None:
    """A tiny DICOM. With ``pixels=False`` only the header is written, so Rows/Columns can carry the
    original image size (VinDr boxes are normalised by it) without megabytes of pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    with warnings.catch_warnings():  # SIIM's real headers hold ages like "38", which pydicom warns about
        warnings.simplefilter("ignore")
        for k, v in tags.items():
            setattr(ds, k, v)
    if pixels:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((rows, cols), np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _sample(values, n: int, seed: int = 0) -> list:
    values = pd.Series(pd.unique(pd.Series(list(values))))
    return sorted(values.sample(min(n, len(values)), random_state=seed).tolist())


def _held_back(ids: list, every: int = 10) -> tuple[list, list]:
    """(ids that get a file, ids deliberately left without one)."""
    return [i for k, i in enumerate(ids) if k % every], [i for k, i in enumerate(ids) if not k % every]


def _counts(mat: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Per class: (positive, negative, uncertain, missing)."""
    return [(int((c == 1).sum()), int((c == 0).sum()), int((c == -1).sum()), int(np.isnan(c).sum()))
            for c in np.asarray(mat, float).T]


def _check_labels(result: AdapterResult, expected: pd.DataFrame) -> None:
    """``expected``: one row per image (index image_id), one float column per label name."""
    man = result.manifest
    ids = man.to_pandas()["image_id"]
    assert sorted(ids) == sorted(map(str, expected.index))
    exp = expected.loc[list(ids), man.label_names].to_numpy(float)
    assert _counts(man.label_matrix()) == _counts(exp)
    np.testing.assert_array_equal(man.label_matrix(), exp.astype(np.float32))


def _check_splits(man: Manifest) -> None:
    df = man.to_pandas()
    assert set(df["split"]) <= {"train", "val", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert df["path"].map(lambda p: not p.startswith("/") and ".." not in p).all()


def _check_dropped(result: AdapterResult, missing: list, n_table: int | None = None) -> None:
    reasons = {d["image_id"]: d["reason"] for d in result.dropped}
    for i in missing:
        assert reasons.get(str(i)) == NOT_FOUND, i
    kept = set(result.manifest.to_pandas()["image_id"])
    assert not kept & {d["image_id"] for d in result.dropped}
    assert result.manifest.site_meta["n_dropped"] == len(result.dropped)
    if n_table is not None:  # every table row is either in the manifest or in `dropped`
        assert len(result.manifest) + len(result.dropped) == n_table


def _by_id(result: AdapterResult) -> pd.DataFrame:
    return result.manifest.to_pandas().set_index("image_id")


# -- registry ----------------------------------------------------------------------------------------
def test_registry() -> None:
    assert {"nih", "chexpert", "vindr", "padchest", "mimic_cxr_jpg", "openi", "siim", "rsna", "generic_csv",
            "folder"} <= set(list_adapters())
    assert isinstance(get_adapter("nih"), SiteAdapter) and get_adapter("nih").name == "nih"
    with pytest.raises(ValueError, match="known adapters: .*chexpert"):
        get_adapter("nope")
    with pytest.raises(ValueError, match="unknown option"):
        get_adapter("folder").build(".", "x", csvpth="typo")

    @register_adapter("test_dummy")
    class Dummy(SiteAdapter):
        pass

    assert ADAPTERS.pop("test_dummy") is Dummy
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("nih")(Dummy)


# -- NIH ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nih_raw() -> pd.DataFrame:
    return pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz")


@pytest.fixture(scope="module")
def nih_boxes() -> pd.DataFrame:
    names = ["img", "label", "x", "y", "w", "h", "a", "b", "c"]
    return pd.read_csv(DATA / "BBox_List_2017.csv.gz", names=names, skiprows=1)


def test_nih(tmp_path: Path, nih_raw: pd.DataFrame, nih_boxes: pd.DataFrame) -> None:
    ids = sorted(set(_sample(nih_raw["Image Index"], 120)) | set(_sample(nih_boxes["img"], 30, seed=1)))
    present, missing = _held_back(ids)
    for k, i in enumerate(present):  # the release spreads images over images_001/images ... images_012/images
        _touch(tmp_path / f"images_{k % 3 + 1:03d}" / "images" / i, PNG)
    res = get_adapter("nih").build(tmp_path, "nih_site")
    man = res.manifest
    assert len(man) == len(present) and man.site == "nih_site"
    assert len(man.label_names) == 14 and "Infiltration" in man.label_names
    _check_dropped(res, missing, n_table=len(nih_raw))
    _check_splits(man)

    sub = nih_raw.set_index("Image Index").loc[present]
    findings = sub["Finding Labels"].str.split("|")
    expected = pd.DataFrame({n: findings.map(lambda f, n=n: float(n in f)) for n in man.label_names})
    _check_labels(res, expected)

    df = _by_id(res)
    row = nih_raw.set_index("Image Index").loc[present[0]]
    got = df.loc[present[0]]
    assert got["patient_id"] == str(row["Patient ID"]) and got["sex"] == row["Patient Gender"]
    assert got["age"] == row["Patient Age"] and got["view"] == row["View Position"]
    assert got["path"].startswith("images_00") and "/images/" in got["path"]

    # Boxes: NIH's 1024-pixel coordinates normalised, "Infiltrate" named as the site's label.
    boxed = [i for i in present if i in set(nih_boxes["img"])]
    assert boxed
    for i in boxed:
        raw = nih_boxes[nih_boxes["img"] == i]
        got = sorted(df.loc[i, "boxes"], key=lambda b: (b["label"], b["x0"]))
        want = sorted(({"label": "Infiltration" if r.label == "Infiltrate" else r.label,
                        "x0": r.x / 1024, "y0": r.y / 1024,
                        "x1": min(1.0, (r.x + r.w) / 1024), "y1": min(1.0, (r.y + r.h) / 1024)}
                       for r in raw.itertuples()), key=lambda b: (b["label"], b["x0"]))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g["label"] == w["label"] and g["label"] in man.label_names
            for k in ("x0", "y0", "x1", "y1"):
                assert g[k] == pytest.approx(w[k], abs=1e-6)
    unboxed = [i for i in present if i not in set(nih_boxes["img"])]
    assert df.loc[unboxed, "boxes"].isna().all()

    # Round trip through Parquet keeps labels and site metadata.
    back = Manifest.read(man.write(tmp_path / "out" / "nih.parquet"))
    assert back.label_names == man.label_names and back.site_meta["adapter"] == "nih"

    limited = get_adapter("nih").build(tmp_path, "nih_site", limit=5)
    assert limited.manifest.to_pandas()["image_id"].tolist() == man.to_pandas()["image_id"].tolist()[:5]
    assert limited.manifest.site_meta["n_beyond_limit"] == len(present) - 5


# -- CheXpert -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chexpert_raw() -> pd.DataFrame:
    return pd.read_csv(DATA / "chexpert_train.csv.gz")


def test_chexpert(tmp_path: Path, chexpert_raw: pd.DataFrame) -> None:
    raw = chexpert_raw
    paths = sorted(set(_sample(raw["Path"], 150)) | set(_sample(raw.loc[raw["AP/PA"] == "LL", "Path"], 3)))
    present, missing = _held_back(paths)
    for p in present:  # the CSV's own layout: CheXpert-v1.0-small/train/patientN/studyM/viewK_*.jpg
        _touch(tmp_path / p, JPEG)
    res = get_adapter("chexpert").build(tmp_path, "chex")
    man = res.manifest
    assert man.label_names == CHEXPERT_LABELS
    assert len(man) == len(present)
    strip = [p.replace("CheXpert-v1.0-small/", "") for p in missing]
    _check_dropped(res, strip, n_table=len(raw))
    _check_splits(man)

    sub = raw.set_index(raw["Path"].str.replace("CheXpert-v1.0-small/", ""))
    rel = [p.replace("CheXpert-v1.0-small/", "") for p in present]
    expected = sub.loc[rel, CHEXPERT_LABELS].astype(float)
    _check_labels(res, expected)
    counts = _counts(man.label_matrix())
    assert sum(c[2] for c in counts) > 0 and sum(c[3] for c in counts) > 0  # -1 kept, blanks missing

    df = man.to_pandas()
    assert set(df["view"]) <= {"PA", "AP", "LATERAL"} and "LATERAL" in set(df["view"])
    assert (df["path"] == [p for p in df["image_id"].map(lambda i: "CheXpert-v1.0-small/" + i)]).all()
    lateral_ll = df[df["image_id"].isin(sub.index[sub["AP/PA"].isin(["LL", "RL"])])]
    assert (lateral_ll["view"] == "LATERAL").all()
    row = sub.loc[df["image_id"].iloc[0]]
    assert df["sex"].iloc[0] == {"Male": "M", "Female": "F"}.get(row["Sex"])
    assert df["patient_id"].iloc[0] == re.search(r"patient(\d+)", df["image_id"].iloc[0]).group(1)

    # Root may also be the CheXpert-v1.0-small folder itself; a table with a custom file name works.
    small = raw[raw["Path"].isin(paths)]
    small.to_csv(tmp_path / "my_labels.csv", index=False)
    res2 = get_adapter("chexpert").build(tmp_path / "CheXpert-v1.0-small", "chex",
                                         csvpath=tmp_path / "my_labels.csv")
    assert len(res2.manifest) == len(present) and len(res2.dropped) == len(missing)
    assert res2.manifest.to_pandas()["path"].str.startswith("train/").all()
    assert res2.manifest.to_pandas()["patient_id"].tolist() == df["patient_id"].tolist()


# -- VinDr-CXR ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vindr_raw() -> pd.DataFrame:
    return pd.read_csv(DATA / "vinbigdata-train.csv.gz")


def test_vindr(tmp_path: Path, vindr_raw: pd.DataFrame) -> None:
    raw = vindr_raw
    with_box = raw.dropna(subset=["x_min"])
    ids = sorted(set(_sample(raw["image_id"], 60)) | set(_sample(with_box["image_id"], 30, seed=2)))
    present, missing = _held_back(ids)
    sizes = {}
    png_one = present[-1]  # one image converted to PNG: found, but no size to normalise its boxes
    for k, i in enumerate(present):
        if i == png_one:
            _touch(tmp_path / "train" / f"{i}.png", PNG)
            continue
        # A header-only DICOM carrying a realistic original size (at least the image's largest box).
        rb = with_box[with_box["image_id"] == i]
        rows = int(max(2800, rb["y_max"].max() if len(rb) else 0)) + k
        cols = int(max(2400, rb["x_max"].max() if len(rb) else 0)) + k
        sizes[i] = (rows, cols)
        _dicom(tmp_path / "train" / f"{i}.dicom", rows, cols, pixels=False, PatientSex="F", PatientAge="061Y")
    res = get_adapter("vindr").build(tmp_path, "vindr")
    man = res.manifest
    assert man.label_names == VINDR_LABELS
    assert len(man) == len(present)
    _check_dropped(res, missing, n_table=raw["image_id"].nunique())
    _check_splits(man)

    # Labels: positive when any radiologist named the finding.
    named = raw.groupby("image_id")["class_name"].agg(set).loc[present]
    expected = pd.DataFrame({n: named.map(lambda s, n=n: float(n in s)) for n in VINDR_LABELS})
    _check_labels(res, expected)

    df = _by_id(res)
    for i in present:
        rb = with_box[with_box["image_id"] == i]
        if i == png_one:
            assert df.loc[i, "boxes"] is None
            continue
        boxes = df.loc[i, "boxes"]
        assert len(boxes) == len(rb)
        rows, cols = sizes[i]
        raw_sorted = sorted(rb.itertuples(), key=lambda r: (r.class_name, r.x_min / cols, r.y_min / rows))
        for b, r in zip(sorted(boxes, key=lambda b: (b["label"], b["x0"], b["y0"])), raw_sorted):
            assert b["label"] == r.class_name
            assert b["x0"] == pytest.approx(r.x_min / cols, abs=1e-6)
            assert b["y1"] == pytest.approx(min(1.0, r.y_max / rows), abs=1e-6)
    assert df.loc[present[0], "sex"] == "F" and df.loc[present[0], "age"] == 61


# -- PadChest -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padchest_raw() -> pd.DataFrame:
    return pd.read_csv(DATA / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", low_memory=False)


# torchxrayvision's PadChest label space, written out here: class -> terms searched in "Labels".
_PC_TERMS = {
    "Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern",
                     "alveolar pattern", "consolidation", "air bronchogram"],
    "Pleural_Thickening": ["pleural thickening"], "Consolidation": ["air bronchogram"],
    "Hilar Enlargement": ["adenopathy", "pulmonary artery enlargement"],
    "Support Devices": ["device", "pacemaker"], "Tube": ["tube'", "stent'"],
}


def test_padchest(tmp_path: Path, padchest_raw: pd.DataFrame) -> None:
    raw = padchest_raw
    usable = raw[raw["Labels"].notna() & raw["Projection"].isin(["PA", "L", "AP", "AP_horizontal"])]
    child = usable[(2019 - usable["PatientBirth"]) <= 10]
    ids = sorted(set(_sample(usable["ImageID"], 150)) | set(_sample(child["ImageID"], 3)))
    present, missing = _held_back(ids)
    costal = raw.loc[raw["Projection"] == "COSTAL", "ImageID"].iloc[0]
    no_labels = raw.loc[raw["Labels"].isna(), "ImageID"].iloc[0]
    info = raw.set_index("ImageID")
    for i in [*present, costal, no_labels]:  # real layout: <ImageDir>/<ImageID>
        _touch(tmp_path / str(info.loc[i, "ImageDir"]) / i, PNG)
    res = get_adapter("padchest").build(tmp_path, "pc")
    man = res.manifest
    assert len(man) == len(present) and len(man.label_names) == 28
    _check_dropped(res, missing, n_table=len(raw))
    _check_splits(man)
    reasons = {d["image_id"]: d["reason"] for d in res.dropped}
    assert "COSTAL" in reasons[costal] and "Labels" in reasons[no_labels]

    labels = info.loc[present, "Labels"].str.lower()
    expected = pd.DataFrame(index=labels.index)
    for name in man.label_names:
        terms = [name.lower()] + _PC_TERMS.get(name, [])
        if name == "Tube":
            terms = _PC_TERMS["Tube"]
        expected[name] = labels.map(lambda s, t=terms: float(any(x in s for x in t)))
    _check_labels(res, expected)

    df = _by_id(res)
    assert (df["path"] == [f"{info.loc[i, 'ImageDir']}/{i}" for i in df.index]).all()
    assert (df["report"] == info.loc[df.index, "Report"].str.strip()).all()
    assert set(df["view"]) <= {"PA", "AP", "LATERAL"}
    assert (df.loc[info.loc[df.index, "Projection"] == "AP_horizontal", "view"] == "AP").all()
    kid = [i for i in child["ImageID"] if i in df.index]
    assert kid and (df.loc[kid, "age"].dropna() <= 11).all()  # children are kept, unlike xrv's PC_Dataset
    sex = info.loc[df.index, "PatientSex_DICOM"].where(lambda s: s.isin(["M", "F", "O"]))
    assert (df["sex"].fillna("-") == sex.fillna("-")).all()


# -- MIMIC-CXR-JPG -------------------------------------------------------------------------------------
def _mimic_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A small table pair in the official MIMIC-CXR-JPG 2.0.0 format (not shipped: credentialed)."""
    rng = np.random.default_rng(0)
    chex_cols = sorted(CHEXPERT_LABELS)  # the official file lists the classes alphabetically
    studies, images = [], []
    for s in range(25):
        subj = 10000000 + 37 * s
        for t in range(int(rng.integers(1, 4))):
            study = 50000000 + 1000 * s + t
            studies.append({"subject_id": subj, "study_id": study,
                            **{c: rng.choice([1.0, 0.0, -1.0, np.nan]) for c in chex_cols}})
            for k in range(int(rng.integers(1, 4))):
                view = ["PA", "AP", "LATERAL", "LL", np.nan, "AP AXIAL"][int(rng.integers(0, 6))]
                images.append({"dicom_id": f"{s:04d}{t}{k}-abcdef12-34567890-aaaaaaaa-bbbbbbbb",
                               "subject_id": subj, "study_id": study,
                               "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                               "ViewPosition": view,
                               "Rows": 3056, "Columns": 2544, "StudyDate": 21800506, "StudyTime": 213014.531,
                               "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                               "ViewCodeSequence_CodeMeaning": "postero-anterior",
                               "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
    chex, meta = pd.DataFrame(studies)[["subject_id", "study_id", *chex_cols]], pd.DataFrame(images)
    # One labelled study without images, one image whose study has no label row.
    chex = pd.concat([chex, pd.DataFrame([{"subject_id": 19999999, "study_id": 59999999}])],
                     ignore_index=True)
    meta = pd.concat([meta, meta.iloc[[0]].assign(dicom_id="orphan-image", study_id=58888888)],
                     ignore_index=True)
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:
        chex.to_csv(f, index=False)
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        meta.to_csv(f, index=False)
    return chex, meta


def test_mimic(tmp_path: Path) -> None:
    chex, meta = _mimic_tables(tmp_path)
    ok_view = meta["ViewPosition"].isin(["PA", "AP", "LATERAL", "LL"]) | meta["ViewPosition"].isna()
    labelled = meta["study_id"].isin(chex["study_id"])
    ids = meta.loc[ok_view & labelled, "dicom_id"].tolist()
    present, missing = _held_back(ids, every=7)
    m = meta.set_index("dicom_id")
    for i in [*present, *meta.loc[~ok_view, "dicom_id"]]:
        s, t = str(m.loc[i, "subject_id"]), str(m.loc[i, "study_id"])
        _touch(tmp_path / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{i}.jpg", JPEG)
    first = m.loc[present[0]]
    report = tmp_path / "reports" / "files" / f"p{str(first.subject_id)[:2]}" / f"p{first.subject_id}" / \
        f"s{first.study_id}.txt"
    _touch(report, b"FINDINGS: no acute process.\n")

    res = get_adapter("mimic_cxr_jpg").build(tmp_path, "mimic", reports_dir="reports")
    man = res.manifest
    assert man.label_names == CHEXPERT_LABELS and len(man) == len(present)
    # every metadata image plus the labelled study without images
    _check_dropped(res, missing, n_table=len(meta) + 1)
    _check_splits(man)
    reasons = [d["reason"] for d in res.dropped]
    assert any("AP AXIAL" in r for r in reasons) and any("no row in the CheXpert" in r for r in reasons)
    assert any("has no image" in r for r in reasons)

    expected = m.loc[present, ["subject_id", "study_id"]].reset_index().merge(
        chex, on=["subject_id", "study_id"]).set_index("dicom_id")[CHEXPERT_LABELS].astype(float)
    _check_labels(res, expected)
    df = _by_id(res)
    same_study = m.loc[df.index, "study_id"] == first.study_id  # a report belongs to every image of its study
    assert (df.loc[same_study, "report"] == "FINDINGS: no acute process.").all()
    assert df.loc[~same_study, "report"].isna().all()
    assert df.loc[present[0], "path"].startswith(f"files/p{str(first.subject_id)[:2]}/")
    assert (df["patient_id"] == m.loc[df.index, "subject_id"].astype(str)).all()
    to_view = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LATERAL"}
    views = m.loc[df.index, "ViewPosition"].map(to_view)
    assert (df["view"].fillna("-") == views.fillna("-")).all()


# -- Open-I -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openi_meta() -> pd.DataFrame:
    return pd.read_csv(DATA / "nlmcxr_dicom_metadata.csv.gz", usecols=["imageid", "View Position"])


_OPENI_NAMES = ["Atelectasis", "Fibrosis", "Pneumonia", "Effusion", "Lesion", "Cardiomegaly",
                "Calcified Granuloma", "Fracture", "Edema", "Granuloma", "Emphysema", "Hernia", "Mass",
                "Nodule", "Opacity", "Infiltration", "Pleural_Thickening", "Pneumothorax"]
_OPENI_SYN = {"Pleural_Thickening": ["pleural thickening"], "Infiltration": ["infiltrate"],
              "Atelectasis": ["atelectases"]}


def test_openi(tmp_path: Path, openi_meta: pd.DataFrame) -> None:
    ids = _sample(openi_meta["imageid"], 120)
    present, missing = _held_back(ids)
    for i in present:
        _touch(tmp_path / "NLMCXR_png" / f"{i}.png", PNG)
    res = get_adapter("openi").build(tmp_path, "openi")
    man = res.manifest
    assert len(man) == len(present)
    _check_dropped(res, missing)
    _check_splits(man)

    # Expected labels and reports straight from the XML reports.
    auto, text = {}, {}
    with tarfile.open(DATA / "NLMCXR_reports.tgz") as tar:
        for m in tar:
            if m.name.endswith(".xml"):
                root = ET.parse(tar.extractfile(m)).getroot()
                uid = root.find("uId").attrib["id"]
                auto[uid] = "|".join(sorted({n.text.lower() for n in root.iter("automatic")}))
                text[uid] = {n.attrib.get("Label"): n.text for n in root.iter("AbstractText")}
    uid_of = {i: i.split("_")[0] for i in present}
    expected = pd.DataFrame(index=present)
    for name in _OPENI_NAMES:
        out = {"Opacity": "Lung Opacity", "Lesion": "Lung Lesion"}.get(name, name)
        terms = [name.lower()] + _OPENI_SYN.get(name, [])
        expected[out] = [float(any(t in auto[uid_of[i]] for t in terms)) for i in present]
    _check_labels(res, expected)
    assert man.label_matrix().sum() > 0

    df = _by_id(res)
    for i in present[:20]:
        findings = text[uid_of[i]].get("FINDINGS")
        if findings:
            assert f"FINDINGS: {findings.strip()}" in df.loc[i, "report"]
    assert (df["patient_id"] == [uid_of[i] for i in df.index]).all()
    # Images without a header view keep a view from the t-SNE table or none at all; all are kept.
    assert set(df["view"].dropna()) <= {"PA", "AP", "LATERAL"}


# -- SIIM-ACR --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def siim_raw() -> pd.DataFrame:
    raw = pd.read_csv(DATA / "siim-pneumothorax-train-rle.csv.gz")
    return raw.rename(columns={" EncodedPixels": "rle"})


def test_decode_siim_rle() -> None:
    # Runs go down the columns: pixel 1 is (row 1, col 0); offsets are relative to the previous run's end.
    m = decode_siim_rle("1 2 3 1", width=4, height=4)
    flat = np.zeros(16, np.uint8)
    flat[[1, 2, 6]] = 1
    np.testing.assert_array_equal(m, flat.reshape(4, 4).T)
    assert decode_siim_rle("-1", 4, 4).sum() == 0
    with pytest.raises(ValueError):
        decode_siim_rle("10 100", 4, 4)


def test_siim(tmp_path: Path, siim_raw: pd.DataFrame) -> None:
    raw = siim_raw
    pos = raw[raw["rle"].str.strip() != "-1"]
    multi = pos.loc[pos["ImageId"].duplicated(), "ImageId"]
    single = pos.loc[~pos["ImageId"].isin(multi), "ImageId"]
    ids = sorted(set(_sample(raw["ImageId"], 40)) | set(_sample(multi, 5)) | set(_sample(single, 10, seed=3)))
    present, missing = _held_back(ids)
    patient = {i: f"pat{k // 2}" for k, i in enumerate(present)}  # pairs of images share a patient
    for k, i in enumerate(present):  # Kaggle layout: <study uid>/<series uid>/<ImageId>.dcm
        _dicom(tmp_path / "dicom-images-train" / f"1.2.{k}" / f"1.3.{k}" / f"{i}.dcm",
               PatientID=patient[i], PatientSex="M" if k % 2 else "F", PatientAge=str(30 + k),
               ViewPosition="PA")
    res = get_adapter("siim").build(tmp_path, "siim")
    man = res.manifest
    assert man.label_names == ["Pneumothorax"] and len(man) == len(present)
    _check_dropped(res, missing, n_table=raw["ImageId"].nunique())
    _check_splits(man)
    expected = raw.assign(p=(raw["rle"].str.strip() != "-1").astype(float)).groupby("ImageId")[["p"]].max()
    _check_labels(res, expected.loc[present].rename(columns={"p": "Pneumothorax"}))

    df = _by_id(res)
    assert (df["patient_id"] == [patient[i] for i in df.index]).all()
    assert df.loc[present[1], "age"] == 31 and df.loc[present[1], "sex"] == "M"
    assert df.loc[df.index.isin(pos["ImageId"]), "mask_path"].notna().all()
    assert df.loc[~df.index.isin(pos["ImageId"]), "mask_path"].isna().all()

    one = next(i for i in present if i in set(single))
    mask = np.asarray(Image.open(tmp_path / df.loc[one, "mask_path"]))
    assert mask.shape == (1024, 1024) and df.loc[one, "mask_path"].startswith("raycxr_masks/")
    rle = pos.loc[pos["ImageId"] == one, "rle"].iloc[0]
    assert int((mask > 0).sum()) == sum(int(n) for n in rle.split()[1::2])
    # Same pixels as torchxrayvision's Kaggle decoder.
    ds = xrv.datasets.SIIM_Pneumothorax_Dataset(imgpath=str(tmp_path))
    want = ds.get_pathology_mask_dict(one, 1024)[0][0]
    np.testing.assert_array_equal(mask > 0, want > 0)

    many = next(i for i in present if i in set(multi))
    union = np.zeros((1024, 1024), bool)
    for r in pos.loc[pos["ImageId"] == many, "rle"]:
        union |= decode_siim_rle(r).astype(bool)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / df.loc[many, "mask_path"])) > 0, union)

    with pytest.raises(ValueError, match="inside the site root"):
        get_adapter("siim").build(tmp_path, "siim", masks_dir=tmp_path.parent / "elsewhere")


# -- RSNA ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsna_raw() -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.read_csv(DATA / "kaggle_stage_2_train_labels.csv.zip"),
            pd.read_csv(DATA / "kaggle_stage_2_train_images_dicom_headers.csv.gz", index_col="PatientID"))


def test_rsna(tmp_path: Path, rsna_raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    raw, headers = rsna_raw
    two_boxes = raw.loc[raw["patientId"].duplicated(), "patientId"]
    old = headers.index[headers["PatientAge"] > 130]
    ids = sorted(set(_sample(raw["patientId"], 100)) | set(_sample(two_boxes, 10)) | set(old[:2]))
    present, missing = _held_back(ids)
    for i in present:
        _dicom(tmp_path / "stage_2_train_images" / f"{i}.dcm")
    res = get_adapter("rsna").build(tmp_path, "rsna")
    man = res.manifest
    assert man.label_names == ["Lung Opacity", "Pneumonia"] and len(man) == len(present)
    _check_dropped(res, missing, n_table=raw["patientId"].nunique())
    _check_splits(man)
    target = raw.groupby("patientId")["Target"].max().astype(float).loc[present]
    _check_labels(res, pd.DataFrame({"Lung Opacity": target, "Pneumonia": target}))

    df = _by_id(res)
    for i in present:
        rows = raw[(raw["patientId"] == i) & raw["x"].notna()]
        boxes = sorted(df.loc[i, "boxes"], key=lambda b: (b["x0"], b["y0"]))
        assert len(boxes) == len(rows)
        for b, r in zip(boxes, sorted(rows.itertuples(), key=lambda r: (r.x, r.y))):
            assert b["label"] == "Lung Opacity"
            assert (b["x0"], b["y0"]) == pytest.approx((r.x / 1024, r.y / 1024), abs=1e-6)
            assert (b["x1"], b["y1"]) == pytest.approx((min(1, (r.x + r.width) / 1024),
                                                        min(1, (r.y + r.height) / 1024)), abs=1e-6)
        h = headers.loc[i]
        assert df.loc[i, "sex"] == h["PatientSex"] and df.loc[i, "view"] == h["ViewPosition"]
        assert df.loc[i, "age"] == (h["PatientAge"] if h["PatientAge"] <= 130 else None) or \
            (h["PatientAge"] > 130 and pd.isna(df.loc[i, "age"]))


# -- generic CSV --------------------------------------------------------------------------------------------
def test_generic_csv_label_columns(tmp_path: Path) -> None:
    rows = []
    values = ["1", "0", "-1", "", "1.0", "maybe"]
    for k in range(30):
        rows.append({"file": f"img/{k:03d}.png", "pid": f"P{k // 3}", "Sex": ["male", "F", "?"][k % 3],
                     "Age": str(20 + k), "View": ["PA", "AP", "Lateral", "LL", ""][k % 5],
                     "Effusion": values[k % 6], "Nodule": values[(k + 2) % 6], "note": f"report {k}"})
    table = pd.DataFrame(rows)
    table.to_csv(tmp_path / "export.csv", index=False)
    for k, r in enumerate(rows[:-3]):
        _touch(tmp_path / r["file"], _distinct("PNG", k))
    opts = {"csv": "export.csv", "path_col": "file", "patient_col": "pid", "sex_col": "Sex", "age_col": "Age",
            "view_col": "View", "report_col": "note", "label_cols": ["Effusion", "Nodule"]}
    res = get_adapter("generic_csv").build(tmp_path, "hosp", **opts)
    man = res.manifest
    assert man.label_names == ["Effusion", "Nodule"] and len(man) == 27
    _check_dropped(res, [r["file"] for r in rows[-3:]], n_table=30)
    _check_splits(man)
    code = {"1": 1.0, "1.0": 1.0, "0": 0.0, "-1": -1.0}
    expected = table.set_index("file")[["Effusion", "Nodule"]].iloc[:27].apply(
        lambda c: c.map(lambda v: code.get(v, np.nan)))
    _check_labels(res, expected)
    df = _by_id(res)
    assert df.loc["img/000.png", "sex"] == "M" and df.loc["img/001.png", "sex"] == "F"
    assert pd.isna(df.loc["img/002.png", "sex"]) and df.loc["img/002.png", "view"] == "LATERAL"
    assert pd.isna(df.loc["img/004.png", "view"]) and df.loc["img/004.png", "report"] == "report 4"
    assert man.site_meta["unknown_label_values"]  # "maybe" is counted, not silently taken as negative

    # require_files=False keeps rows without a file, at the path the table gives.
    res = get_adapter("generic_csv").build(tmp_path, "hosp", require_files=False, **opts)
    assert len(res.manifest) == 30 and not res.dropped
    assert res.manifest.to_pandas()["path"].iloc[-1] == rows[-1]["file"]

    with pytest.raises(ValueError, match=r"export\.csv.*'Patient'"):
        get_adapter("generic_csv").build(tmp_path, "hosp", **{**opts, "patient_col": "Patient"})
    with pytest.raises(ValueError, match=r"export\.csv.*'Cardiomegaly'"):
        get_adapter("generic_csv").build(tmp_path, "hosp", **{**opts, "label_cols": ["Cardiomegaly"]})


def test_generic_csv_joined_labels(tmp_path: Path) -> None:
    cells = ["Effusion|Mass", "No Finding", "", "Mass", "Effusion"]
    table = pd.DataFrame({"path": [f"{k}.png" for k in range(10)],
                          "patient_id": [f"p{k % 4}" for k in range(10)],
                          "Finding Labels": [cells[k % 5] for k in range(10)]})
    # The export's own split column, one split per patient ("valid" is read as "val").
    table["split"] = table["patient_id"].map({"p0": "train", "p1": "valid", "p2": "test", "p3": "train"})
    table.to_csv(tmp_path / "labels.csv", index=False)
    for k, p in enumerate(table["path"]):
        _touch(tmp_path / p, _distinct("PNG", k))
    res = get_adapter("generic_csv").build(tmp_path, "h2", csv=tmp_path / "labels.csv",
                                           labels_col="Finding Labels", label_names=["Effusion", "Mass"],
                                           split_col="split")
    man = res.manifest
    assert man.label_names == ["Effusion", "Mass"] and len(man) == 10 and not res.dropped
    items = table.set_index("path")["Finding Labels"].fillna("")
    expected = pd.DataFrame({n: items.map(lambda s, n=n: np.nan if not s else float(n in s.split("|")))
                             for n in man.label_names})
    _check_labels(res, expected)
    df = _by_id(res)
    assert (df["split"] == table.set_index("path")["split"].replace({"valid": "val"})).all()
    with pytest.raises(ValueError, match=r"labels\.csv.*'Findings'"):
        get_adapter("generic_csv").build(tmp_path, "h2", csv="labels.csv", labels_col="Findings")


# -- folder -----------------------------------------------------------------------------------------
def test_folder(tmp_path: Path) -> None:
    labelled = tmp_path / "labelled"
    for cls, n in (("NORMAL", 4), ("PNEUMONIA", 6)):
        for k in range(n):
            _touch(labelled / cls / f"person{k}_img{k % 2}.jpeg", _distinct("PNG", k + 10 * n))
    _touch(labelled / "stray.png", PNG)
    _touch(labelled / "NORMAL" / "notes.txt", b"not an image")
    res = get_adapter("folder").build(labelled, "folder_site", patient_regex=r"(?P<patient>person\d+)_")
    man = res.manifest
    assert man.label_names == ["NORMAL", "PNEUMONIA"] and len(man) == 10
    assert [d["reason"] for d in res.dropped] == ["image outside any class folder"]
    assert _counts(man.label_matrix()) == [(4, 6, 0, 0), (6, 4, 0, 0)]
    df = man.to_pandas()
    assert set(df["patient_id"]) == {f"person{k}" for k in range(6)}
    _check_splits(man)
    # Splits: every image to train with fractions (1, 0, 0); the salt changes the assignment.
    all_train = get_adapter("folder").build(labelled, "folder_site", split_fractions=(1.0, 0.0, 0.0))
    assert set(all_train.manifest.to_pandas()["split"]) == {"train"}
    salts = {tuple(get_adapter("folder").build(labelled, "s", split_salt=s).manifest.to_pandas()["split"])
             for s in ("a", "b", "c", "d")}
    assert len(salts) > 1

    flat = tmp_path / "flat"
    for k in range(5):
        _touch(flat / f"scan{k}.png", _distinct("PNG", k))
    res = get_adapter("folder").build(flat, "unlabelled")
    assert res.manifest.label_names == [] and len(res.manifest) == 5
    assert res.manifest.label_matrix().shape == (5, 0)
    assert sorted(res.manifest.to_pandas()["patient_id"]) == [f"scan{k}" for k in range(5)]


# -- issue 11: header patients, duplicates and scope at build time (folder, generic_csv), copied sites ----------
_pixel_seed = iter(range(1, 10_000))


def _dicom(path: Path, rows: int = 8, cols: int = 8, pixels: bool = True, _plain=_dicom, **tags: str) -> None:
    """As above, with pixels that differ from file to file (identical pixels are duplicates here)."""
    _plain(path, rows, cols, pixels, **tags)
    if pixels:
        ds = pydicom.dcmread(path)
        ds.PixelData = ((np.arange(rows * cols) * next(_pixel_seed)) % 251).astype(np.uint8).tobytes()
        ds.save_as(path, enforce_file_format=True)


def test_folder_patients_from_header_duplicates_and_scope(tmp_path: Path) -> None:
    from raycxr.sites.adapters import hash_patient_id

    root = tmp_path / "site"
    _dicom(root / "PNEUMONIA" / "a.dcm", 16, 16, PatientID="MRN-1", BodyPartExamined="CHEST",
           SOPInstanceUID="1.2.3.1")
    for k in range(3):  # three copies of a.dcm under other names: one image, not four patients
        (root / "NORMAL").mkdir(parents=True, exist_ok=True)
        (root / "NORMAL" / f"copy{k}.dcm").write_bytes((root / "PNEUMONIA" / "a.dcm").read_bytes())
    _dicom(root / "NORMAL" / "b.dcm", 16, 16, PatientID="MRN-1", SOPInstanceUID="1.2.3.2")  # same patient
    _dicom(root / "NORMAL" / "c.dcm", 16, 16, PatientID="MRN-2", SOPInstanceUID="1.2.3.3")
    _dicom(root / "NORMAL" / "hand.dcm", 16, 16, PatientID="MRN-3", BodyPartExamined="HAND",
           SOPInstanceUID="1.2.3.4")  # an extremity CR
    _dicom(root / "NORMAL" / "ct.dcm", 16, 16, PatientID="MRN-4", Modality="CT", SOPInstanceUID="1.2.3.5")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "NORMAL" / "p.png")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(root / "PNEUMONIA" / "p_again.png")
    res = get_adapter("folder").build(root, "folder_site")
    df = res.manifest.to_pandas().set_index("image_id")
    # the first in path order is kept: NORMAL/copy0.dcm
    assert sorted(df.index) == ["NORMAL/b.dcm", "NORMAL/c.dcm", "NORMAL/copy0.dcm", "NORMAL/p.png"]
    reasons = {d["image_id"]: d["reason"] for d in res.dropped}
    for dup in ("NORMAL/copy1.dcm", "NORMAL/copy2.dcm", "PNEUMONIA/a.dcm"):
        assert reasons[dup] == "duplicate of NORMAL/copy0.dcm (same SOPInstanceUID)"
    assert reasons["PNEUMONIA/p_again.png"] == "duplicate of NORMAL/p.png (same pixels)"
    assert reasons["NORMAL/hand.dcm"] == "out of scope: not a chest radiograph: BodyPartExamined 'HAND'"
    assert reasons["NORMAL/ct.dcm"].startswith("out of scope: not a chest radiograph: Modality 'CT'")
    # the patient is the header's, hashed: a.dcm and b.dcm are one patient in one split
    assert df.loc["NORMAL/copy0.dcm", "patient_id"] == df.loc["NORMAL/b.dcm", "patient_id"] == hash_patient_id("MRN-1")
    assert df.loc["NORMAL/copy0.dcm", "split"] == df.loc["NORMAL/b.dcm", "split"]
    assert df.loc["NORMAL/p.png", "patient_id"] == "p"  # no header: the stem, as before
    assert "MRN" not in res.manifest.to_pandas().to_csv()
    assert res.manifest.site_meta["header_checks"] == {"out_of_scope": 2, "duplicates": 4, "patient_from_header": 3}
    off = get_adapter("folder").build(root, "folder_site", header_checks=False)
    assert len(off.manifest) == 10  # the old behaviour, on request


def test_generic_csv_drops_duplicates_and_out_of_scope(tmp_path: Path) -> None:
    for name, tags in [("a.dcm", {"SOPInstanceUID": "9.1"}), ("b.dcm", {"SOPInstanceUID": "9.1"}),
                       ("knee.dcm", {"SOPInstanceUID": "9.2", "BodyPartExamined": "KNEE"}),
                       ("c.dcm", {"SOPInstanceUID": "9.3"})]:
        _dicom(tmp_path / name, 16, 16, PatientID="X", **tags)
    pd.DataFrame({"path": ["a.dcm", "b.dcm", "knee.dcm", "c.dcm"], "patient_id": ["p1", "p2", "p3", "p4"],
                  "Effusion": ["1", "0", "1", "0"]}).to_csv(tmp_path / "t.csv", index=False)
    res = get_adapter("generic_csv").build(tmp_path, "h", csv="t.csv", label_cols=["Effusion"])
    df = res.manifest.to_pandas()
    assert list(df["image_id"]) == ["a.dcm", "c.dcm"] and list(df["patient_id"]) == ["p1", "p4"]  # table wins
    reasons = {d["image_id"]: d["reason"] for d in res.dropped}
    assert reasons == {"b.dcm": "duplicate of a.dcm (same SOPInstanceUID)",
                       "knee.dcm": "out of scope: not a chest radiograph: BodyPartExamined 'KNEE'"}


def test_a_copied_manifest_site_takes_its_own_name(small_corpus: Path, tmp_path: Path) -> None:
    import shutil

    from raycxr.sites.config import SiteConfig
    from raycxr.validate import validate_site

    shutil.copytree(small_corpus / "siim", tmp_path / "site5")
    site = SiteConfig.from_dict({"name": "site5", "adapter": "manifest", "root": "site5"}, data_root=tmp_path)
    before = validate_site(site, progress=False)
    assert not before["ok"] and "names site(s) ['siim']" in before["message"] and "sites build site5" in \
        before["message"]
    manifest, dropped = site.build_manifest()
    assert not dropped and manifest.site == "site5"
    written = Manifest.read(site.manifest_path)
    assert set(written.to_pandas()["site"]) == {"site5"} and written.site_meta["name"] == "site5"
    assert written.site_meta["renamed_from"] == ["siim"]
    assert validate_site(site, progress=False)["ok"]
    original = Manifest.read(small_corpus / "siim" / "manifest.parquet")
    assert original.site == "siim" and len(original) == len(written)
