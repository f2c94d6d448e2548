"""RSNA pneumonia detection: ``stage_2_train_labels.csv`` boxes and the detailed class table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .base import (
    _XRV_VIEWS,
    SiteAdapter,
    _box,
    _drops,
    _FileIndex,
    _labels_from,
    _missing,
    _Parsed,
    _quiet,
    _table_path,
    _view_reason,
    _xrv,
    register_adapter,
)


@register_adapter("rsna")
class RSNAAdapter(SiteAdapter):
    """RSNA Pneumonia Detection: xrv's Lung Opacity / Pneumonia labels (both = Target) and opacity boxes."""

    description = "RSNA Pneumonia Detection Challenge (stage 2 train labels + DICOM headers), 2 labels, boxes"
    source = "RSNA Pneumonia Detection Challenge"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "dicomcsvpath": None}
    extensions = (".dcm", ".jpg", ".png")
    image_size = 1024.0  # box coordinates are in the 1024x1024 challenge images
    box_label = "Lung Opacity"  # the challenge's class name for the boxed regions

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "kaggle_stage_2_train_labels.csv.zip", "csvpath")
        dicompath = _table_path(opts["dicomcsvpath"], root,
                                "kaggle_stage_2_train_images_dicom_headers.csv.gz", "dicomcsvpath")
        with _quiet():
            ds = xrv.datasets.RSNA_Pneumonia_Dataset(imgpath=str(root), csvpath=str(csvpath),
                                                     dicomcsvpath=str(dicompath), views=_XRV_VIEWS)
        csv = ds.csv
        raw = ds.raw_csv
        s = self.image_size
        boxes: dict[str, list[dict]] = {}
        for pid, x, y, w, h in zip(raw["patientId"], raw["x"], raw["y"], raw["width"], raw["height"]):
            lst = boxes.setdefault(pid, [])
            if not any(_missing(v) for v in (x, y, w, h)):
                lst.append(_box(self.box_label, x, y, x + w, y + h, s, s))

        ids = csv["patientId"].astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".dcm",
            "lookup": ids,
            # RSNA's "patientId" names one image; the underlying NIH patient ids are not published.
            "patient_id": csv["patientid"].astype(str),
            "sex": csv["PatientSex"],
            "age": csv["PatientAge"],
            "view": csv["view"],
            "labels": _labels_from(ds.labels),
            "boxes": [boxes.get(i, []) for i in ids],
        })
        gone = raw.drop_duplicates("patientId")
        gone = gone.loc[~gone["patientId"].isin(set(ids))]
        vp = gone["patientId"].map(ds.dicomcsv["ViewPosition"])
        dropped = _drops(gone["patientId"], gone["patientId"] + ".dcm", [_view_reason(v) for v in vp])
        meta = {"tables": {"csvpath": str(csvpath), "dicomcsvpath": str(dicompath)},
                "label_source": "torchxrayvision RSNA_Pneumonia_Dataset",
                "n_table_rows_merged": int(len(raw) - raw["patientId"].nunique())}
        return _Parsed(frame, [str(p) for p in ds.pathologies], dropped, meta)
