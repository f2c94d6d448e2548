"""CheXpert (and CheXpert-small): ``train.csv`` / ``valid.csv`` with uncertain ``-1`` labels kept."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .base import (
    _XRV_VIEWS,
    CHEXPERT_LABELS,
    TRAINVAL,
    SiteAdapter,
    _drops,
    _FileIndex,
    _find_table,
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

_CHEXPERT_PREFIX = re.compile(r"^(?:\./)?CheXpert-v1\.0(?:-small)?/")


@register_adapter("chexpert")
class CheXpertAdapter(SiteAdapter):
    """CheXpert: 14 observations incl. No Finding, with uncertain ``-1`` kept and blank = not annotated."""

    description = "Stanford CheXpert (train.csv + valid.csv), 14 labels with uncertain -1 kept"
    source = "CheXpert"
    official_split = "valid.csv -> test (the set papers report on), train.csv -> train/val by patient hash"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "valid_csvpath": None}
    extensions = (".jpg", ".png")

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        csvpath = _table_path(opts["csvpath"], root, "chexpert_train.csv.gz", "csvpath")
        frame, dropped = self._table(root, csvpath)
        meta: dict[str, Any] = {"tables": {"csvpath": str(csvpath)},
                                "label_source": "raw CheXpert columns (-1 kept)"}
        # The official validation table: named, next to a given train table, or anywhere under root.
        valid = None
        if opts["valid_csvpath"] is not None:
            valid = _table_path(opts["valid_csvpath"], root, None, "valid_csvpath")
        elif opts["csvpath"] is not None and (csvpath.parent / "valid.csv").is_file():
            valid = csvpath.parent / "valid.csv"
        else:
            valid = _find_table(root, index, None, ["valid.csv"], "valid_csvpath")
        if valid is not None and valid.resolve() == csvpath.resolve():
            valid = None
        if valid is not None:
            vframe, vdropped = self._table(root, valid)
            meta["tables"]["valid_csvpath"] = str(valid)
            frame["split"] = TRAINVAL
            vframe["split"] = "test"
            frame = pd.concat([frame, vframe], ignore_index=True)
            dropped += vdropped
        elif opts["split"] == "official":
            meta["no_official_split"] = "CheXpert's valid.csv was not found next to csvpath or under the root"
        if opts["split"] != "official":
            frame = frame.drop(columns=["split"], errors="ignore")
        return _Parsed(frame, list(CHEXPERT_LABELS), dropped, meta)

    @staticmethod
    def _table(root: Path, csvpath: Path) -> tuple[pd.DataFrame, list[dict]]:
        raw = pd.read_csv(csvpath)
        _require_columns(raw, csvpath, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"])
        ds = _chexpert_xrv(root, csvpath)
        csv = ds.csv
        if not csv["Path"].equals(raw.loc[csv.index, "Path"]):  # xrv keeps the file's row index
            raise RuntimeError("torchxrayvision's CheXpert table does not line up with the raw file")
        # Labels from the raw columns: xrv maps -1 to NaN and rewrites blanks of "No Finding" rows.
        labels = np.full((len(csv), len(CHEXPERT_LABELS)), np.nan, np.float32)
        for j, name in enumerate(CHEXPERT_LABELS):
            if name in raw.columns:
                labels[:, j] = pd.to_numeric(raw.loc[csv.index, name], errors="coerce").to_numpy(np.float32)

        rel = csv["Path"].astype(str).str.replace(_CHEXPERT_PREFIX, "", regex=True)
        pid = csv["patientid"] if "patientid" in csv else pd.Series(np.nan, index=csv.index)
        pid = [p if not _missing(p) and str(p) else m for p, m in
               zip(pid, rel.str.extract(r"patient(\d+)", expand=False))]
        study = rel.str.extract(r"(patient\d+/study\d+)", expand=False).str.replace("/", "_")
        age = csv["Age"].where(csv["Age"] != 0)  # CheXpert writes 0 for an unknown age (as xrv treats it)
        frame = pd.DataFrame({
            "image_id": rel,
            "expected": rel,
            "lookup": rel.map(_stem),
            "patient_id": pid,
            "study_id": study,
            "sex": csv["Sex"],
            "age": age,
            "view": csv["view"],
            "labels": _labels_from(labels),
        })
        gone = raw.loc[~raw.index.isin(csv.index)]
        gone_view = np.where(gone["Frontal/Lateral"] == "Frontal", gone["AP/PA"], "L")
        dropped = _drops(gone["Path"].str.replace(_CHEXPERT_PREFIX, "", regex=True),
                         gone["Path"].str.replace(_CHEXPERT_PREFIX, "", regex=True),
                         [_view_reason(v) for v in gone_view])
        return frame, dropped


def _chexpert_xrv(root: Path, csvpath: Path) -> Any:
    xrv = _xrv()
    kw = {"imgpath": str(root), "views": _XRV_VIEWS, "unique_patients": False}
    try:
        with _quiet():
            return xrv.datasets.CheX_Dataset(csvpath=str(csvpath), **kw)
    except NotImplementedError:
        # xrv derives patient ids only for files whose path says "train" or "valid"; feed it the
        # same table under such a name (the adapter falls back to the path's patientNNNNN).
        with tempfile.TemporaryDirectory(prefix="raycxr_") as tmp:
            alias = Path(tmp) / ("train" + "".join(csvpath.suffixes))
            try:
                alias.symlink_to(csvpath.resolve())
            except OSError:
                shutil.copyfile(csvpath, alias)
            with _quiet():
                return xrv.datasets.CheX_Dataset(csvpath=str(alias), **kw)
