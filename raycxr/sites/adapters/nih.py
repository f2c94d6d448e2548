"""NIH ChestX-ray14: ``Data_Entry_2017.csv``, ``BBox_List_2017.csv`` and the official train/val and test lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .base import (
    _XRV_VIEWS,
    TRAINVAL,
    SiteAdapter,
    _box,
    _drops,
    _FileIndex,
    _find_table,
    _id_list,
    _int_str,
    _labels_from,
    _missing,
    _Parsed,
    _quiet,
    _require_columns,
    _stem,
    _table_path,
    _view_reason,
    _xrv,
    register_adapter,
)


@register_adapter("nih")
class NIHAdapter(SiteAdapter):
    """NIH ChestX-ray14: 14 text-mined labels (0/1), boxes for ~880 images from BBox_List_2017."""

    description = "NIH ChestX-ray14 (Data_Entry_2017_v2020 + BBox_List_2017), 14 labels, boxes"
    source = "NIH ChestX-ray14"
    official_split = "test_list.txt -> test, train_val_list.txt -> train/val by patient hash"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "bbox_list_path": None, "train_val_list": None,
                                         "test_list": None}
    extensions = (".png",)
    image_size = 1024.0  # BBox_List coordinates are in the released 1024x1024 images

    @staticmethod
    def _official(root: Path, index: _FileIndex, opts: dict[str, Any], ids: pd.Series,
                  meta: dict[str, Any]) -> list[str | None] | None:
        test = _find_table(root, index, opts["test_list"], ["test_list.txt"], "test_list")
        trainval = _find_table(root, index, opts["train_val_list"], ["train_val_list.txt"], "train_val_list")
        if test is None or trainval is None:
            meta["no_official_split"] = "NIH's train_val_list.txt and test_list.txt were not both found under the root"
            return None
        test_ids, tv_ids = _id_list(test), _id_list(trainval)
        meta["tables"].update(test_list=str(test), train_val_list=str(trainval))
        return ["test" if i in test_ids else TRAINVAL if i in tv_ids else None for i in ids]

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "Data_Entry_2017_v2020.csv.gz", "csvpath")
        bboxpath = _table_path(opts["bbox_list_path"], root, "BBox_List_2017.csv.gz", "bbox_list_path")
        _require_columns(csvpath, csvpath, ["Image Index", "Finding Labels", "Patient ID", "Patient Age",
                                            "Patient Gender", "View Position"], "NIH's Data_Entry table")
        _require_columns(bboxpath, bboxpath, ["Image Index", "Finding Label"], "NIH's BBox_List table")
        with _quiet():
            ds = xrv.datasets.NIH_Dataset(imgpath=str(root), csvpath=str(csvpath),
                                          bbox_list_path=str(bboxpath), views=_XRV_VIEWS,
                                          unique_patients=False)
        csv = ds.csv
        names = [str(p) for p in ds.pathologies]

        # xrv already renamed the BBox list's "Infiltrate" to the label name "Infiltration".
        boxes: dict[str, list[dict]] = {}
        bb = ds.pathology_maskscsv
        n_box_skipped = 0
        for img, lab, x, y, w, h in zip(bb["Image Index"], bb["Finding Label"], bb["x"], bb["y"], bb["w"],
                                        bb["h"]):
            if lab not in names or any(_missing(v) for v in (x, y, w, h)):
                n_box_skipped += 1
                continue
            s = self.image_size
            boxes.setdefault(img, []).append(_box(lab, x, y, x + w, y + h, s, s))

        ids = csv["Image Index"].astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids,
            "lookup": ids.map(_stem),
            "patient_id": csv["patientid"].map(_int_str),
            "study_id": ids.map(_stem),  # one image per NIH follow-up visit
            "sex": csv["Patient Gender"],
            "age": csv["Patient Age"],
            "view": csv["view"],
            "labels": _labels_from(ds.labels),
            "boxes": [boxes.get(i) for i in ids],
        })
        raw = pd.read_csv(csvpath, usecols=["Image Index", "View Position"])
        meta = {"tables": {"csvpath": str(csvpath), "bbox_list_path": str(bboxpath)}}
        if opts["split"] == "official":
            official = self._official(root, index, opts, ids, meta)
            if official is not None:
                frame["split"] = official
        gone = raw.loc[~raw["Image Index"].isin(set(ids))]
        dropped = _drops(gone["Image Index"], gone["Image Index"],
                         [_view_reason(v) for v in gone["View Position"]])
        meta.update(n_boxes_without_label=n_box_skipped, label_source="torchxrayvision NIH_Dataset")
        return _Parsed(frame, names, dropped, meta)
