"""MIMIC-CXR-JPG: the CheXpert-labeller table, the metadata, the official split and the reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .base import (
    _SPLIT_NAMES,
    _XRV_VIEWS,
    CHEXPERT_LABELS,
    SiteAdapter,
    _drop,
    _drops,
    _FileIndex,
    _find_table,
    _int_str,
    _labels_from,
    _Parsed,
    _quiet,
    _require_columns,
    _table_path,
    _token,
    _view_reason,
    _xrv,
    register_adapter,
)

_MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
_MIMIC_META = "mimic-cxr-2.0.0-metadata.csv"
_MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"


@register_adapter("mimic_cxr_jpg")
class MIMICAdapter(SiteAdapter):
    """MIMIC-CXR-JPG 2.0: CheXpert-labeler labels per study (``-1`` kept), views from the metadata table."""

    description = "MIMIC-CXR-JPG 2.0.0 (chexpert + metadata tables), 14 labels with -1 kept, reports"
    source = "MIMIC-CXR-JPG"
    dataset = "mimic_cxr"
    official_split = "mimic-cxr-2.0.0-split.csv: train, validate -> val, test"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "metacsvpath": None, "splitcsvpath": None,
                                         "reports_dir": None}
    extensions = (".jpg",)

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        # Not shipped by torchxrayvision (credentialed): default to the official tables inside root.
        csvpath = self._table(root, index, opts["csvpath"], _MIMIC_CHEXPERT, "csvpath")
        metapath = self._table(root, index, opts["metacsvpath"], _MIMIC_META, "metacsvpath")
        with _quiet():
            ds = xrv.datasets.MIMIC_Dataset(imgpath=str(root), csvpath=str(csvpath),
                                            metacsvpath=str(metapath), views=_XRV_VIEWS,
                                            unique_patients=False)
        csv = ds.csv
        # A label-table study without any image joins as a row without dicom_id: not an image.
        no_image = csv["dicom_id"].isna()
        dropped = [_drop(None, None, f"study s{_int_str(st)} of patient p{_int_str(su)} has no image in "
                                     "the metadata table")
                   for su, st in zip(csv.loc[no_image, "subject_id"], csv.loc[no_image, "study_id"])]
        csv = csv.loc[~no_image]

        # Labels from the raw table: xrv maps -1 to NaN and zeroes every class of "No Finding" studies.
        keys = ["subject_id", "study_id"]
        chex = pd.read_csv(csvpath).drop_duplicates(keys).set_index(keys)
        key = pd.MultiIndex.from_arrays([csv["subject_id"], csv["study_id"]])
        labels = np.full((len(csv), len(CHEXPERT_LABELS)), np.nan, np.float32)
        for j, name in enumerate(CHEXPERT_LABELS):
            if name in chex.columns:
                labels[:, j] = pd.to_numeric(chex[name], errors="coerce").reindex(key).to_numpy(np.float32)

        subj = csv["subject_id"].map(_int_str)
        study = csv["study_id"].map(_int_str)
        ids = csv["dicom_id"].astype(str)
        expected = [f"files/p{s[:2]}/p{s}/s{t}/{d}.jpg" for s, t, d in zip(subj, study, ids)]
        reports = None
        if opts["reports_dir"] is not None:
            rdir = Path(opts["reports_dir"]).expanduser()
            if not rdir.is_absolute() and not rdir.is_dir():
                rdir = root / rdir
            if not rdir.is_dir():
                raise FileNotFoundError(f"reports_dir {rdir} is not a directory")
            cache: dict[tuple[str, str], str | None] = {}
            reports = [_mimic_report(rdir, s, t, cache) for s, t in zip(subj, study)]
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": expected,
            "lookup": ids,
            "patient_id": subj,
            "study_id": study,
            "view": csv["view"],
            "report": reports,
            "labels": _labels_from(labels),
        })

        meta_raw = pd.read_csv(metapath)
        gone = meta_raw.loc[~meta_raw["dicom_id"].astype(str).isin(set(ids))]
        labelled = pd.MultiIndex.from_frame(gone[["subject_id", "study_id"]]).isin(chex.index)
        reasons = [_view_reason(v) if lab else "study has no row in the CheXpert label table"
                   for v, lab in zip(gone["ViewPosition"], labelled)]
        dropped += _drops(gone["dicom_id"], [
            f"files/p{_int_str(s)[:2]}/p{_int_str(s)}/s{_int_str(t)}/{d}.jpg"
            for s, t, d in zip(gone["subject_id"], gone["study_id"], gone["dicom_id"])], reasons)
        meta = {"tables": {"csvpath": str(csvpath), "metacsvpath": str(metapath)},
                "reports_dir": None if opts["reports_dir"] is None else str(opts["reports_dir"]),
                "label_source": "raw MIMIC-CXR chexpert columns (-1 kept)"}
        splitpath = _find_table(root, index, opts["splitcsvpath"], [_MIMIC_SPLIT + ".gz", _MIMIC_SPLIT],
                                "splitcsvpath")
        if splitpath is None:
            meta["no_official_split"] = f"{_MIMIC_SPLIT}[.gz] was not found under the root"
        elif opts["split"] == "official":
            table = pd.read_csv(splitpath, dtype=str)
            _require_columns(table, splitpath, ["dicom_id", "split"])
            by_id = dict(zip(table["dicom_id"], table["split"]))
            bad = sorted({v for v in by_id.values() if _token(v) not in _SPLIT_NAMES})
            if bad:
                raise ValueError(f"{splitpath}: column 'split' has values {bad[:5]}, not train / validate / test")
            frame["split"] = [_SPLIT_NAMES[_token(by_id[i])] if i in by_id else None for i in ids]
            meta["tables"]["splitcsvpath"] = str(splitpath)
        return _Parsed(frame, list(CHEXPERT_LABELS), dropped, meta)

    @staticmethod
    def _table(root: Path, index: _FileIndex, value: Any, name: str, what: str) -> Path:
        if value is not None:
            return _table_path(value, root, None, what)
        for cand in (name + ".gz", name):
            hit = index.find(cand)
            if hit is not None:
                return root / hit
        raise FileNotFoundError(f"{what}: no {name}[.gz] under {root}; MIMIC-CXR-JPG is not shipped with "
                                "torchxrayvision, pass the PhysioNet table's path")


def _mimic_report(rdir: Path, subj: str, study: str, cache: dict) -> str | None:
    if (subj, study) not in cache:
        text = None
        for base in (rdir / "files", rdir):  # reports_dir may be the folder holding files/ or files/ itself
            p = base / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
            if p.is_file():
                text = p.read_text(encoding="utf-8", errors="replace").strip() or None
                break
        cache[(subj, study)] = text
    return cache[(subj, study)]
