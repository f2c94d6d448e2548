"""Every adapter has a template in sites/templates, `raycxr sites adapters` lists every option with its
default and meaning, and templates build on stand-in layouts of their data sets (issue 25)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("torchxrayvision")

from conftest import REPO  # noqa: E402
from test_adapters import DATA, JPEG, PNG, _dicom, _distinct, _mimic_tables, _touch  # noqa: E402

from raycxr.cli import main  # noqa: E402
from raycxr.sites.adapters import describe_options, list_adapters  # noqa: E402
from raycxr.sites.config import SiteConfig  # noqa: E402

TEMPLATES = REPO / "sites" / "templates"


def _templates() -> dict[str, Path]:
    return {yaml.safe_load(p.read_text())["adapter"]: p for p in sorted(TEMPLATES.glob("*.yaml"))}


def test_every_adapter_has_a_template_and_every_option_a_meaning(capsys) -> None:
    assert set(list_adapters()) - {"manifest"} <= set(_templates())
    for name in list_adapters():
        missing = [opt for opt, _, meaning in describe_options(name) if not meaning]
        assert not missing, (name, missing)
    assert main(["sites", "adapters", "vindr"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("csvpath", "vote", "majority", "split_fractions", "[0.8, 0.1, 0.1]", "limit",
                  "template: sites/templates/vindr.yaml"):
        assert words in out, words
    assert "mimic_cxr_jpg" not in out  # only the adapter asked for


def _load(adapter: str, root: Path) -> SiteConfig:
    d = yaml.safe_load(_templates()[adapter].read_text())
    d["root"] = str(root)  # the one edit a template needs
    return SiteConfig.from_dict(d, source=str(_templates()[adapter]))


def test_vindr_template_builds_on_physionet_layout(tmp_path: Path) -> None:
    names = ["Aortic enlargement", "Cardiomegaly", "No finding"]
    rows = [{"image_id": i, "rad_ID": f"R{r}", **dict.fromkeys(names, 0), "Cardiomegaly": int(r == 0)}
            for i in ("a", "b") for r in range(3)]
    (tmp_path / "annotations").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "annotations" / "image_labels_train.csv", index=False)
    pd.DataFrame([{"image_id": "t", **dict.fromkeys(names, 0)}]).to_csv(
        tmp_path / "annotations" / "image_labels_test.csv", index=False)
    for i in "ab":
        _dicom(tmp_path / "train" / f"{i}.dicom", 8, 8, pixels=False)
    _dicom(tmp_path / "test" / "t.dicom", 8, 8, pixels=False)
    m, dropped = _load("vindr", tmp_path).build_manifest()
    assert len(m) == 3 and not dropped and m.to_pandas().set_index("image_id").loc["t", "split"] == "test"


def test_mimic_template_builds(tmp_path: Path) -> None:
    _chex, meta = _mimic_tables(tmp_path)
    for r in meta.itertuples():
        s, t = str(r.subject_id), str(r.study_id)
        _touch(tmp_path / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{r.dicom_id}.jpg", JPEG)
    m, _ = _load("mimic_cxr_jpg", tmp_path).build_manifest()
    assert len(m) > 10


def test_folder_template_builds(tmp_path: Path) -> None:
    for k in range(4):
        _touch(tmp_path / ("A" if k % 2 else "B") / f"x{k}.png", _distinct("PNG", k))
    m, _ = _load("folder", tmp_path).build_manifest()
    assert len(m) == 4 and m.label_names == ["A", "B"]


def _nih_layout(root: Path) -> int:
    ids = pd.read_csv(DATA / "Data_Entry_2017_v2020.csv.gz", nrows=6)["Image Index"]
    for i in ids:
        _touch(root / "images_001" / "images" / i, PNG)
    return len(ids)


def _chexpert_layout(root: Path) -> int:
    raw = pd.read_csv(DATA / "chexpert_train.csv.gz", nrows=30)
    raw = raw[raw["Frontal/Lateral"] == "Frontal"].head(6)
    raw.to_csv(root / "train.csv", index=False)
    for p in raw["Path"]:
        _touch(root / p.replace("CheXpert-v1.0-small/", ""), JPEG)
    return len(raw)


def _rsna_layout(root: Path) -> int:
    ids = pd.read_csv(DATA / "kaggle_stage_2_train_labels.csv.zip")["patientId"].drop_duplicates().head(6)
    for i in ids:
        _dicom(root / "stage_2_train_images" / f"{i}.dcm")
    return len(ids)


def _siim_layout(root: Path) -> int:
    ids = pd.read_csv(DATA / "siim-pneumothorax-train-rle.csv.gz")["ImageId"].drop_duplicates().head(4)
    for i in ids:
        _dicom(root / "dicom-images-train" / "1.2" / "3.4" / f"{i}.dcm", PatientID=f"P{i[-6:]}")
    return len(ids)


def _padchest_layout(root: Path) -> int:
    raw = pd.read_csv(DATA / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", nrows=200, low_memory=False)
    usable = raw[raw["Labels"].notna() & raw["Projection"].isin(["PA", "L", "AP", "AP_horizontal"])].head(6)
    for r in usable.itertuples():  # the real layout: <ImageDir>/<ImageID>
        _touch(root / str(r.ImageDir) / r.ImageID, _distinct("PNG", int(r.Index)))
    return len(usable)


def _openi_layout(root: Path) -> int:
    ids = pd.read_csv(DATA / "nlmcxr_dicom_metadata.csv.gz", usecols=["imageid"], nrows=6)["imageid"]
    for k, i in enumerate(ids):
        _touch(root / "NLMCXR_png" / f"{i}.png", _distinct("PNG", k))
    return len(ids)


@pytest.mark.parametrize("adapter,layout", [("nih", _nih_layout), ("chexpert", _chexpert_layout),
                                            ("rsna", _rsna_layout), ("siim", _siim_layout),
                                            ("padchest", _padchest_layout), ("openi", _openi_layout)])
def test_public_set_templates_build(tmp_path: Path, adapter, layout) -> None:
    n = layout(tmp_path)
    m, _ = _load(adapter, tmp_path).build_manifest()
    assert len(m) == n and m.site == yaml.safe_load(_templates()[adapter].read_text())["name"]
