"""PadChest: the 160K label table (BIMCV), its projections and its radiologist-labelled rows."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .base import (
    _XRV_VIEWS,
    SiteAdapter,
    _drops,
    _FileIndex,
    _int_str,
    _labels_from,
    _missing,
    _Parsed,
    _quiet,
    _require_columns,
    _stem,
    _table_path,
    _view_allowed,
    _view_reason,
    _xrv,
    register_adapter,
)

_PC_TABLE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
# The columns PC_Dataset reads; only these are handed to it (see PadChestAdapter._parse).
_PC_XRV_COLUMNS = ["ImageID", "Projection", "Labels", "PatientID", "PatientBirth", "StudyDate_DICOM",
                   "PatientSex_DICOM"]


@register_adapter("padchest")
class PadChestAdapter(SiteAdapter):
    """PadChest: torchxrayvision's 28 labels derived from the finding lists, plus the report text."""

    description = "PadChest (BIMCV), xrv's 28 labels, Spanish (stemmed) report text"
    source = "PadChest"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "xrv_age_filter": False}
    extensions = (".png",)

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, _PC_TABLE, "csvpath")
        raw = pd.read_csv(csvpath, low_memory=False)
        _require_columns(raw, csvpath, [*_PC_XRV_COLUMNS, "ImageDir", "StudyID"], "PadChest's label table")
        # A repeated ImageID (an edited copy of the table) keeps its first row; the others are listed.
        dup = raw["ImageID"].duplicated()
        dup_dropped = _drops(raw.loc[dup, "ImageID"], raw.loc[dup, "ImageID"],
                             ["duplicate ImageID row in the table (first row kept)"] * int(dup.sum()))
        raw = raw.loc[~dup].reset_index(drop=True)
        kw = {"imgpath": str(root), "views": _XRV_VIEWS, "unique_patients": False}
        # xrv gets a copy of the columns it reads. Without xrv_age_filter the birth year is neutral:
        # PC_Dataset drops patients aged <= 10 and rows without a birth year (a modelling choice of its
        # paper), and a manifest keeps them, as age is a column (demographics come from the raw table below).
        with tempfile.TemporaryDirectory(prefix="raycxr_") as tmp:
            sub = raw[_PC_XRV_COLUMNS].copy()
            if not opts["xrv_age_filter"]:
                sub["PatientBirth"] = 1900.0
            sub.to_csv(Path(tmp) / "padchest.csv", index=False)
            with _quiet():
                ds = xrv.datasets.PC_Dataset(csvpath=str(Path(tmp) / "padchest.csv"), **kw)
        csv = ds.csv
        names = [str(p) for p in ds.pathologies]
        info = raw.set_index("ImageID").loc[csv["ImageID"]]

        ids = csv["ImageID"].astype(str)
        expected = [f"{_int_str(d)}/{i}" if not _missing(d) else i for d, i in zip(info["ImageDir"], ids)]
        study_year = pd.to_numeric(info["StudyDate_DICOM"].astype(str).str[:4], errors="coerce")
        # Age at the study (xrv uses 2017 - birth year, which ignores the study date).
        age = (study_year - pd.to_numeric(info["PatientBirth"], errors="coerce")).to_numpy()
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": expected,
            "lookup": ids.map(_stem),
            "patient_id": csv["patientid"].astype(str),
            "study_id": info["StudyID"].astype(str).to_numpy(),
            "sex": info["PatientSex_DICOM"].to_numpy(),
            "age": age,
            "view": csv["view"],
            "report": info["Report"].to_numpy() if "Report" in info else None,
            "labels": _labels_from(ds.labels),
        })

        gone = raw.loc[~raw["ImageID"].isin(set(ids))]
        view_ok = gone["Projection"].map(_view_allowed)
        too_young = ~(2019 - gone["PatientBirth"] > 10)  # PC_Dataset's own test
        reasons = [
            _view_reason(v) if not ok else
            "no labels in table (Labels is empty)" if no_labels else
            "age <= 10 or no birth year (torchxrayvision PC_Dataset filter)"
            if young and opts["xrv_age_filter"] else
            "listed as missing or unreadable by torchxrayvision PC_Dataset"
            for v, ok, no_labels, young in zip(gone["Projection"], view_ok, gone["Labels"].isna(), too_young)]
        gone_dir = [f"{_int_str(d)}/{i}" for d, i in zip(gone["ImageDir"], gone["ImageID"])]
        dropped = dup_dropped + _drops(gone["ImageID"], gone_dir, reasons)
        meta = {"tables": {"csvpath": str(csvpath)}, "label_source": "torchxrayvision PC_Dataset",
                "xrv_age_filter": bool(opts["xrv_age_filter"])}
        return _Parsed(frame, names, dropped, meta)
