"""A hospital's own data: a CSV export (``generic_csv``) and an ImageFolder layout (``folder``)."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .base import (
    _SPLIT_NAMES,
    HEADER_CHECK_OPTIONS,
    SiteAdapter,
    _drops,
    _FileIndex,
    _labels_from,
    _missing,
    _Parsed,
    _rel_posix,
    _str_or_none,
    _token,
    _view_allowed,
    _view_reason,
    register_adapter,
)

_DEFAULT_POSITIVE = ("1", "1.0", "true", "yes", "y", "positive", "pos")
_DEFAULT_NEGATIVE = ("0", "0.0", "false", "no", "n", "negative", "neg")
_DEFAULT_UNCERTAIN = ("-1", "-1.0", "uncertain", "u")





@register_adapter("generic_csv")
class GenericCSVAdapter(SiteAdapter):
    """A hospital's own table: one row per image, labels as one column per class or one joined column."""

    description = "Any CSV export: path/patient/demographic columns, per-class or joined label columns"
    source = "generic CSV"
    dataset = "local"  # a hospital's own patients: one identity with `folder`, so hashed DICOM patients agree
    official_split = "the table's split_col"
    options: ClassVar[dict[str, Any]] = {
        "csv": None, "path_col": "path", "patient_col": "patient_id", "image_id_col": None,
        "study_col": None, "sex_col": None, "age_col": None, "view_col": None, "report_col": None,
        "split_col": None, "label_cols": None, "positive_values": _DEFAULT_POSITIVE,
        "negative_values": _DEFAULT_NEGATIVE, "uncertain_values": _DEFAULT_UNCERTAIN,
        "labels_col": None, "sep": "|", "empty_findings": "unlabelled", "label_names": None, "source_name": None,
        **HEADER_CHECK_OPTIONS,
    }
    extensions = ("",)
    header_checks = True

    def _patient_from_header(self, opts: dict[str, Any]) -> bool:
        return opts["patient_col"] is None  # a table's own patient column wins

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        if opts["csv"] is None:
            raise ValueError("generic_csv needs the option csv=<path to the table>")
        csvpath = Path(opts["csv"]).expanduser()
        if not csvpath.is_absolute():
            csvpath = root / csvpath
        if not csvpath.is_file():
            raise FileNotFoundError(f"generic_csv: table {csvpath} does not exist")
        table = pd.read_csv(csvpath, dtype=str)

        def need(opt: str) -> pd.Series | None:
            col = opts[opt]
            if col is None:
                return None
            if col not in table.columns:
                raise ValueError(f"{csvpath}: column '{col}' (option {opt}) not found; "
                                 f"columns are {list(table.columns)}")
            return table[col]

        if opts["path_col"] is None:
            raise ValueError("generic_csv: path_col cannot be None")
        paths = need("path_col").map(lambda v: None if _missing(v) else _rel_posix(v))
        image_ids = need("image_id_col")
        image_ids = paths if image_ids is None else image_ids.map(_str_or_none)
        patients = need("patient_col")
        frame = pd.DataFrame({
            "image_id": image_ids,
            "expected": paths,
            "lookup": paths,
            "patient_id": patients.map(_str_or_none) if patients is not None else image_ids,
        })
        for key, opt in (("study_id", "study_col"), ("sex", "sex_col"), ("age", "age_col"),
                         ("view", "view_col"), ("report", "report_col")):
            col = need(opt)
            if col is not None:
                frame[key] = col
        split = need("split_col")
        if split is None:
            parsed_meta_split = "no split_col given"
        else:
            parsed_meta_split = None
        if split is not None:
            frame["split"] = [self._split(v, csvpath, opts["split_col"], row) for row, v in enumerate(split)]

        label_names, labels, unknown = self._labels(table, csvpath, opts, need)
        frame["labels"] = _labels_from(labels)

        # Rows that cannot become manifest rows, each with why.
        views = frame["view"] if "view" in frame else pd.Series(None, index=frame.index, dtype=object)
        reasons = []
        for path, image_id, view in zip(frame["expected"], frame["image_id"], views):
            if path is None:
                reasons.append(f"empty value in path column '{opts['path_col']}'")
            elif image_id is None:
                reasons.append(f"empty value in image id column '{opts['image_id_col']}'")
            elif path.startswith("/") or re.match(r"^[A-Za-z]:/", path):
                reasons.append(self._absolute(root, path))
            elif not _view_allowed(view):
                reasons.append(_view_reason(view))
            else:
                reasons.append("")
        # An absolute path inside the root is fine: make it relative.
        frame["expected"] = [self._relative(root, p) if r == "" and p and p.startswith("/") else p
                             for p, r in zip(frame["expected"], reasons)]
        frame["lookup"] = frame["expected"]
        drop = np.array([r != "" for r in reasons], dtype=bool)
        dropped = _drops(frame.loc[drop, "image_id"], frame.loc[drop, "expected"],
                         [r for r in reasons if r])
        frame = frame.loc[~drop]
        meta = {"tables": {"csv": str(csvpath)},
                "label_format": "label_cols" if opts["label_cols"] else
                "labels_col" if opts["labels_col"] else "unlabelled"}
        if unknown:
            meta["unknown_label_values"] = dict(unknown.most_common(20))
        if opts["source_name"]:
            meta["source"] = str(opts["source_name"])
        if parsed_meta_split:
            meta["no_official_split"] = parsed_meta_split
        return _Parsed(frame, label_names, dropped, meta)

    @staticmethod
    def _relative(root: Path, path: str) -> str | None:
        try:
            return Path(os.path.realpath(path)).relative_to(os.path.realpath(root)).as_posix()
        except ValueError:
            return None

    def _absolute(self, root: Path, path: str) -> str:
        return "" if self._relative(root, path) is not None else "absolute path outside the site root"

    @staticmethod
    def _split(v: Any, csvpath: Path, col: str, row: int) -> str | None:
        if _missing(v) or not str(v).strip():
            return None  # falls back to the hashed split
        s = _SPLIT_NAMES.get(_token(v))
        if s is None:
            raise ValueError(f"{csvpath}: column '{col}' row {row}: split '{v}' is not one of "
                             f"{sorted(set(_SPLIT_NAMES))}")
        return s

    @staticmethod
    def _labels(table: pd.DataFrame, csvpath: Path, opts: dict[str, Any],
                need: Callable[[str], pd.Series | None]) -> tuple[list[str], np.ndarray, Counter]:
        unknown: Counter = Counter()
        if opts["label_cols"] and opts["labels_col"]:
            raise ValueError("generic_csv: give either label_cols (one column per class) or labels_col, "
                             "not both")
        if opts["label_cols"]:
            names = [str(c) for c in opts["label_cols"]]
            for c in names:
                if c not in table.columns:
                    raise ValueError(f"{csvpath}: column '{c}' (option label_cols) not found; "
                                     f"columns are {list(table.columns)}")
            codes = {**{_token(v): 1.0 for v in opts["positive_values"]},
                     **{_token(v): 0.0 for v in opts["negative_values"]},
                     **{_token(v): -1.0 for v in opts["uncertain_values"]}}
            out = np.full((len(table), len(names)), np.nan, np.float32)
            for j, c in enumerate(names):
                col = table[c]
                tokens = col.map(lambda v: None if _missing(v) else _token(v))
                out[:, j] = tokens.map(lambda t: codes.get(t, np.nan) if t else np.nan).to_numpy(np.float32)
                unknown.update(f"{c}={t}" for t in tokens if t and t not in codes)
            return names, out, unknown
        if opts["labels_col"]:
            if opts["empty_findings"] not in ("negative", "unlabelled"):
                raise ValueError(f"generic_csv: empty_findings must be negative or unlabelled, "
                                 f"got {opts['empty_findings']!r}")
            col = need("labels_col")
            sep = opts["sep"]
            items = [None if _missing(v) or not str(v).strip() else
                     [s.strip() for s in str(v).split(sep) if s.strip()] for v in col]
            names = [str(n) for n in opts["label_names"]] if opts["label_names"] is not None else \
                sorted({s for lst in items if lst for s in lst})
            pos = {n: j for j, n in enumerate(names)}
            out = np.full((len(table), len(names)), np.nan, np.float32)
            for i, lst in enumerate(items):
                if lst is None:  # a blank cell: not annotated, unless the export writes a normal study so
                    if opts["empty_findings"] == "negative":
                        out[i] = 0.0
                    continue
                out[i] = 0.0  # NIH style: a class not listed is negative
                for s in lst:
                    if s in pos:
                        out[i, pos[s]] = 1.0
                    else:
                        unknown[s] += 1
            return names, out, unknown
        return [], np.zeros((len(table), 0), np.float32), unknown

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        by_name: dict[str, list[str]] = {}
        for p in index.paths:
            by_name.setdefault(p.rsplit("/", 1)[-1], []).append(p)
        out: list[str | None] = []
        for p in frame["lookup"]:
            if p in index.path_set:
                out.append(p)
            else:  # the export may name files relative to another folder: accept a unique file name
                hits = by_name.get(p.rsplit("/", 1)[-1], [])
                out.append(hits[0] if len(hits) == 1 else None)
        return out


# -- an ImageFolder layout ----------------------------------------------------------------------------
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


@register_adapter("folder")
class FolderAdapter(SiteAdapter):
    """``root/<Class>/<file>``: one-hot labels over the class folders; loose images only: unlabelled.

    The patient is the file stem (or ``patient_regex``), unless the image is a DICOM with a
    PatientID: then that, hashed. Duplicates and out-of-scope DICOMs are dropped (see
    :func:`_header_checks`; ``header_checks=false`` turns that off)."""

    description = "ImageFolder layout: class sub-folders give one-hot labels, or an unlabelled folder"
    source = "image folder"
    dataset = "local"
    options: ClassVar[dict[str, Any]] = {"patient_regex": None, "image_extensions": _IMAGE_EXTS,
                                         "patient_from_header": True, **HEADER_CHECK_OPTIONS}
    extensions = ("",)
    header_checks = True

    def _patient_from_header(self, opts: dict[str, Any]) -> bool:
        return bool(opts["patient_from_header"])

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        exts = tuple(e.lower() for e in opts["image_extensions"])
        images = [p for p in index.paths if os.path.splitext(p)[1].lower() in exts]
        classes = sorted({p.split("/", 1)[0] for p in images if "/" in p})
        dropped: list[dict] = []
        if classes:
            loose = [p for p in images if "/" not in p]
            dropped += _drops(loose, loose, ["image outside any class folder"] * len(loose))
            images = [p for p in images if "/" in p]
        pos = {c: j for j, c in enumerate(classes)}
        labels = np.zeros((len(images), len(classes)), np.float32)
        if classes:
            for i, p in enumerate(images):
                labels[i, pos[p.split("/", 1)[0]]] = 1.0

        regex = re.compile(opts["patient_regex"]) if opts["patient_regex"] else None
        pids: list[str | None] = []
        for p in images:
            if regex is None:
                pids.append(PurePosixPath(p).stem)
                continue
            m = regex.search(p)
            if m is None:
                pids.append(None)
            elif "patient" in m.groupdict():
                pids.append(m.group("patient"))
            else:
                pids.append(m.group(1) if m.groups() else m.group(0))
        frame = pd.DataFrame({"image_id": images, "expected": images, "lookup": images, "patient_id": pids,
                              "labels": _labels_from(labels)})
        if regex is not None:
            miss = frame["patient_id"].isna()
            dropped += _drops(frame.loc[miss, "image_id"], frame.loc[miss, "expected"],
                              [f"patient_regex {opts['patient_regex']!r} did not match"] * int(miss.sum()))
            frame = frame.loc[~miss]
        meta = {"classes": classes, "patient_regex": opts["patient_regex"]}
        return _Parsed(frame, classes, dropped, meta)

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        return list(frame["lookup"])
