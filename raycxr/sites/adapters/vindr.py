"""VinDr-CXR: per-radiologist finding tables voted into one label per image, boxes in pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .base import (
    TRAINVAL,
    VINDR_LABELS,
    SiteAdapter,
    _box,
    _dicom_header,
    _FileIndex,
    _find_table,
    _is_dicom,
    _labels_from,
    _Parsed,
    _require_columns,
    register_adapter,
    xrv_table,
)


@register_adapter("vindr")
class VinDrAdapter(SiteAdapter):
    """VinDr-CXR: findings voted over the radiologists (``vote``: any / majority / all); boxes sized by the DICOM.

    Reads either table VinDr ships: Kaggle's ``train.csv`` / PhysioNet's ``annotations_*.csv`` (one row
    per finding and radiologist, with boxes; the 14 local classes) or PhysioNet's
    ``image_labels_*.csv`` (one row per radiologist, one 0/1 column per finding, local and global;
    no boxes). Without ``csvpath`` the root is searched for ``image_labels_train.csv``, then
    ``annotations_train.csv``, then ``train.csv``; only then is torchxrayvision's copy of the Kaggle
    table used (the manifest's ``tables`` says which). ``test_csvpath`` (default: the ``_test``
    sibling of a PhysioNet table) adds the official test images.
    """

    description = "VinDr-CXR (Kaggle train.csv, or PhysioNet annotations_*.csv / image_labels_*.csv), votes, boxes"
    source = "VinDr-CXR"
    official_split = "the image's folder: test/ -> test, train/ -> train/val by patient hash"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "test_csvpath": None, "vote": "any",
                                         "read_dicom_headers": True}
    extensions = (".dicom", ".dcm", ".png", ".jpg")
    _search = ("image_labels_train.csv", "annotations_train.csv", "train.csv")

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        if opts["vote"] not in VOTES:
            raise ValueError(f"vindr: vote must be one of {list(VOTES)}, got {opts['vote']!r}")
        meta: dict[str, Any] = {"tables": {}, "vote": opts["vote"],
                                "patient_id": "image_id (VinDr has no patient ids)"}
        csvpath = _find_table(root, index, opts["csvpath"], self._search, "csvpath")
        if csvpath is None:
            csvpath = xrv_table("vinbigdata-train.csv.gz")
            meta["tables_note"] = "no csvpath and no VinDr table under the root: torchxrayvision's Kaggle train.csv"
        meta["tables"]["csvpath"] = str(csvpath)
        test = _find_table(root, index, opts["test_csvpath"], [], "test_csvpath")
        sibling = csvpath.parent / csvpath.name.replace("_train", "_test")
        if test is None and "_train" in csvpath.name and sibling.is_file():
            test = sibling
        names, rows = None, []
        for path in [csvpath] + ([test] if test is not None else []):
            got_names, ids, labels, boxes, fmt = _vindr_table(path, opts["vote"])
            if names is not None and got_names != names:
                raise ValueError(f"{path}: its findings {got_names} differ from {csvpath}'s; give two tables of "
                                 "one format")
            names = got_names
            meta["label_source"] = fmt
            rows.append(pd.DataFrame({"image_id": ids, "labels": _labels_from(labels), "pixel_boxes": boxes}))
        if test is not None:
            meta["tables"]["test_csvpath"] = str(test)
        frame = pd.concat(rows, ignore_index=True)
        ids = frame["image_id"]
        frame = frame.assign(expected=ids + ".dicom", lookup=ids,
                             # VinDr publishes no patient ids (images were de-identified one by one).
                             patient_id=ids)
        return _Parsed(frame, list(names), [], meta)

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        found = super()._locate(index, frame, opts)
        # The official split is the folder an image ships in: test/ -> test, train/ -> train/val by hash.
        folder = [next((p for p in reversed(f.split("/")[:-1]) if p.lower() in ("train", "test")), None)
                  if f else None for f in found]
        split = [None if d is None else "test" if d.lower() == "test" else TRAINVAL for d in folder]
        # Kaggle's copy has train/ only (its test labels were never released): no official test set, so hashed.
        frame["split"] = split if "test" in split else None
        return found

    def _enrich(self, root: Path, frame: pd.DataFrame, opts: dict[str, Any],
                meta: dict[str, Any]) -> pd.DataFrame:
        boxes, sex, age, view = [], [], [], []
        n_sized = 0
        for path, found, pixel_boxes in zip(frame["path"], frame["file_found"], frame["pixel_boxes"]):
            read = found and opts["read_dicom_headers"] and _is_dicom(path)
            hdr = _dicom_header(root / path) if read else {}
            rows, cols = hdr.get("Rows"), hdr.get("Columns")
            if rows and cols and pixel_boxes is not None:
                n_sized += 1
                boxes.append([_box(lab, x0, y0, x1, y1, float(cols), float(rows))
                              for lab, x0, y0, x1, y1 in pixel_boxes])
            else:  # pixel boxes cannot be normalised without the original size
                boxes.append(None)
            sex.append(hdr.get("PatientSex"))
            age.append(hdr.get("PatientAge"))
            view.append(hdr.get("ViewPosition"))
        meta["n_images_with_size"] = n_sized
        return frame.assign(boxes=boxes, sex=sex, age=age, view=view)


VOTES = ("any", "majority", "all")
_VINDR_RAD = ("rad_id", "rad_ID", "rad")


def _vote(count: np.ndarray, n: np.ndarray, vote: str) -> np.ndarray:
    """Positive when any / more than half / all of an image's readers marked the finding."""
    if vote == "any":
        return (count > 0).astype(np.float32)
    if vote == "majority":
        return (count * 2 > n).astype(np.float32)
    return (count >= n).astype(np.float32)


def _vindr_table(path: Path, vote: str) -> tuple[list[str], pd.Series, np.ndarray, list, str]:
    """(label names, image ids, voted labels, pixel boxes per image, format) of one VinDr table."""
    raw = pd.read_csv(path)
    _require_columns(raw, path, ["image_id"], "a VinDr table")
    rad = next((c for c in _VINDR_RAD if c in raw.columns), None)
    readers = raw[rad].astype(str) if rad else pd.Series(raw.index.astype(str), index=raw.index)
    if "class_name" in raw.columns:  # one row per (image, radiologist, finding); Kaggle's or PhysioNet's
        names = list(VINDR_LABELS)
        lower = {n.lower(): n for n in names}
        if not rad:  # no reader column: the table's rows are one reading of the image
            readers = pd.Series("1", index=raw.index)
        cls = raw["class_name"].astype(str).str.strip().str.lower().map(lower)
        marked = pd.DataFrame({"image_id": raw["image_id"].astype(str), "reader": readers, "cls": cls})
        ids = pd.Series(sorted(pd.unique(marked["image_id"])))  # sorted, as torchxrayvision's table was
        n = marked.groupby("image_id")["reader"].nunique().reindex(ids).to_numpy()
        votes = marked.dropna(subset=["cls"]).drop_duplicates().groupby(["image_id", "cls"]).size()
        count = np.zeros((len(ids), len(names)))
        pos = {i: k for k, i in enumerate(ids)}
        for (i, c), v in votes.items():
            count[pos[i], names.index(c)] = v
        labels = _vote(count, n[:, None], vote)
        box_cols = ["x_min", "y_min", "x_max", "y_max"]
        pix: dict[str, list[tuple]] = {}
        if all(c in raw.columns for c in box_cols):
            has = raw[box_cols].notna().all(axis=1) & cls.notna()
            for i, c, x0, y0, x1, y1 in zip(raw.loc[has, "image_id"].astype(str), cls[has], *(raw.loc[has, b]
                                                                                              for b in box_cols)):
                pix.setdefault(i, []).append((c, x0, y0, x1, y1))
        return names, ids, labels, [pix.get(i, []) for i in ids], f"{path.name}: class_name rows, vote {vote}"
    names = [c for c in raw.columns if c not in ("image_id", rad) and c.lower() != "no finding"]
    values = raw[names].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in names if not values[c].dropna().isin([0, 1]).all() or values[c].isna().all()]
    if bad or not names:
        raise ValueError(f"{path}: neither VinDr table format: it has no column 'class_name' (Kaggle train.csv, "
                         "annotations_*.csv) and its columns "
                         f"{bad[:5] or list(raw.columns)[:10]} are not 0/1 finding columns (image_labels_*.csv)")
    grouped = values.assign(image_id=raw["image_id"].astype(str)).groupby("image_id")
    count, n = grouped[names].sum(), grouped.size()
    labels = _vote(count.to_numpy(), n.to_numpy()[:, None], vote)
    ids = pd.Series(count.index.astype(str))
    return names, ids, labels, [None] * len(ids), f"{path.name}: one 0/1 column per finding, vote {vote}"
