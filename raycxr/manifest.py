"""The site manifest: one Parquet table per site, one row per image.

Columns (``MANIFEST_SCHEMA``):

- ``site`` / ``image_id`` / ``path`` (relative to the site root) / ``patient_id`` / ``study_id``
- ``split``: ``train`` | ``val`` | ``test``, patient-disjoint and stable (see :func:`assign_splits`)
- ``sex`` (``M`` | ``F`` | ``O``), ``age`` (years), ``view`` (``PA`` | ``AP`` | ``LATERAL``)
- ``report``: free text, nullable
- ``labels``: one int8 per class of the *site's own* label space: ``1`` positive, ``0`` negative,
  ``-1`` uncertain, null = not annotated (missing is never confused with negative)
- ``boxes``: lesion boxes ``{label, x0, y0, x1, y1}`` in coordinates normalised to [0, 1]
- ``mask_path``: optional lesion segmentation mask (e.g. SIIM pneumothorax), relative to the site root
- ``lung_mask_path``: optional lung-field mask, relative to the site root (for downstream segmentation)

The site's label names and metadata live in the Parquet schema metadata, so a manifest file is
self-describing. Every read and write validates; a malformed manifest raises
:class:`ManifestError` naming the file, the column and the row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
SPLITS = ("train", "val", "test")
VIEWS = ("PA", "AP", "LATERAL")
SEXES = ("M", "F", "O")
LABEL_VALUES = (-1, 0, 1)

BOX_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("site", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("study_id", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("sex", pa.string()),
        pa.field("age", pa.float32()),
        pa.field("view", pa.string()),
        pa.field("report", pa.string()),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
        pa.field("boxes", pa.list_(BOX_TYPE)),
        pa.field("mask_path", pa.string()),
        pa.field("lung_mask_path", pa.string()),
    ]
)
REQUIRED_COLUMNS = tuple(f.name for f in MANIFEST_SCHEMA if not f.nullable)
OPTIONAL_COLUMNS = tuple(f.name for f in MANIFEST_SCHEMA if f.nullable)

_META_LABELS = b"raycxr.label_names"
_META_SITE = b"raycxr.site"
_META_VERSION = b"raycxr.schema_version"


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message names file, column and row."""

    def __init__(self, problem: str, *, source: str = "<memory>", column: str | None = None,
                 row: int | None = None):
        where = [f"manifest {source}"]
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.source, self.column, self.row, self.problem = source, column, row, problem


@dataclass
class Manifest:
    """A validated site manifest: the Arrow table plus its label names and site metadata."""

    table: pa.Table
    label_names: list[str]
    site_meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.table = _with_metadata(self.table, self.label_names, self.site_meta)
        validate_manifest(self.table, source=self.source)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]] | pd.DataFrame,
                     label_names: Sequence[str], site_meta: Mapping[str, Any] | None = None,
                     source: str = "<memory>") -> Manifest:
        """Build from dict rows or a DataFrame; missing optional columns are filled with nulls.

        ``labels`` may hold lists or arrays whose NaN / None entries mean "not annotated".
        """
        df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
        columns = {}
        for f in MANIFEST_SCHEMA:
            if f.name not in df.columns:
                if not f.nullable:
                    raise ManifestError("required column is absent", source=source, column=f.name)
                columns[f.name] = pa.nulls(len(df), type=f.type)
                continue
            values = df[f.name].tolist()
            if f.name == "labels":
                values = [_labels_to_list(v, row, source) for row, v in enumerate(values)]
            elif f.name == "age":
                values = [None if _isnan(v) else float(v) for v in values]
            elif pa.types.is_string(f.type):
                values = [None if _isnan(v) else str(v) for v in values]
            else:  # boxes: pandas fills rows without any with NaN
                values = [None if not isinstance(v, (list, tuple, np.ndarray)) and _isnan(v) else
                          [dict(b) for b in v] for v in values]
            try:
                columns[f.name] = pa.array(values, type=f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
                raise ManifestError(f"cannot convert to {f.type}: {e}", source=source,
                                    column=f.name) from None
        table = pa.table(columns, schema=MANIFEST_SCHEMA)
        return cls(table, list(label_names), dict(site_meta or {}), source)

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest written by :meth:`write`."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError("file does not exist", source=str(path))
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ManifestError(f"not a readable Parquet file ({e})", source=str(path)) from None
        meta = table.schema.metadata or {}
        if _META_LABELS not in meta:
            raise ManifestError("schema metadata lacks the label names (raycxr.label_names)",
                                source=str(path))
        label_names = json.loads(meta[_META_LABELS])
        site_meta = json.loads(meta.get(_META_SITE, b"{}"))
        return cls(table, label_names, site_meta, str(path))

    def write(self, path: str | Path) -> Path:
        """Validate and write as Parquet (atomic: a temporary file is renamed into place)."""
        path = Path(path)
        validate_manifest(self.table, source=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        pq.write_table(self.table, tmp)
        tmp.replace(path)
        self.source = str(path)
        return path

    # -- views ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def site(self) -> str:
        return str(self.site_meta.get("name") or (self.table["site"][0].as_py() if len(self) else ""))

    def to_pandas(self) -> pd.DataFrame:
        return self.table.to_pandas()

    def label_matrix(self) -> np.ndarray:
        """Labels as float32 ``(N, C)``: 1, 0, -1 (uncertain) and NaN where not annotated."""
        n, c = len(self), len(self.label_names)
        if n == 0:
            return np.zeros((0, c), np.float32)
        flat = self.table["labels"].combine_chunks().flatten()
        values = flat.to_numpy(zero_copy_only=False).astype(np.float32)
        return values.reshape(n, c)

    def select(self, mask: np.ndarray | Sequence[bool]) -> Manifest:
        """Rows where ``mask`` is true, as a new manifest with the same metadata."""
        return Manifest(self.table.filter(pa.array(np.asarray(mask, bool))), self.label_names,
                        self.site_meta, self.source)

    def split(self, name: str) -> Manifest:
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; expected one of {SPLITS}")
        return self.select(np.asarray(self.table["split"].to_pylist()) == name)


def validate_manifest(table: pa.Table, *, source: str = "<memory>") -> None:
    """Check a manifest table against the schema; raise :class:`ManifestError` on the first problem."""
    names = set(table.column_names)
    for f in MANIFEST_SCHEMA:
        if f.name not in names:
            raise ManifestError("required column is absent", source=source, column=f.name)
        col_type = table.schema.field(f.name).type
        if col_type != f.type and not (pa.types.is_null(col_type) and f.nullable):
            raise ManifestError(f"has type {col_type}, expected {f.type}", source=source, column=f.name)
    meta = table.schema.metadata or {}
    if _META_LABELS not in meta:
        raise ManifestError("schema metadata lacks the label names", source=source)
    label_names = json.loads(meta[_META_LABELS])
    if len(set(label_names)) != len(label_names):
        raise ManifestError(f"label names are not unique: {label_names}", source=source)

    cols = {name: table[name].to_pylist() for name in ("site", "image_id", "path", "patient_id", "split",
                                                      "sex", "view", "age", "mask_path", "lung_mask_path")}
    for name in REQUIRED_COLUMNS:
        if name == "labels":
            continue
        for row, v in enumerate(cols[name]):
            if v is None or v == "":
                raise ManifestError("empty value in a required column", source=source, column=name, row=row)
    _check_choices(cols["split"], SPLITS, "split", source)
    _check_choices(cols["sex"], SEXES, "sex", source)
    _check_choices(cols["view"], VIEWS, "view", source)
    for row, age in enumerate(cols["age"]):
        if age is not None and not (0 <= age <= 130):
            raise ManifestError(f"age {age} outside [0, 130]", source=source, column="age", row=row)
    for name in ("path", "mask_path", "lung_mask_path"):
        for row, p in enumerate(cols[name]):
            if p is not None and not _is_relative_inside(p):
                raise ManifestError(f"path '{p}' must be relative to the site root and stay inside it",
                                    source=source, column=name, row=row)
    seen: dict[str, int] = {}
    for row, image_id in enumerate(cols["image_id"]):
        if image_id in seen:
            raise ManifestError(f"image_id '{image_id}' repeats row {seen[image_id]}", source=source,
                                column="image_id", row=row)
        seen[image_id] = row
    patient_split: dict[str, tuple[str, int]] = {}
    for row, (pid, split) in enumerate(zip(cols["patient_id"], cols["split"])):
        first = patient_split.setdefault(pid, (split, row))
        if first[0] != split:
            raise ManifestError(f"patient '{pid}' is in split '{split}' here but in '{first[0]}' at row "
                                f"{first[1]}; splits must be patient-disjoint", source=source,
                                column="split", row=row)
    labels = table["labels"].to_pylist()
    for row, vec in enumerate(labels):
        if vec is None or len(vec) != len(label_names):
            n = None if vec is None else len(vec)
            raise ManifestError(f"has {n} values, expected {len(label_names)} (one per label name)",
                                source=source, column="labels", row=row)
        for j, v in enumerate(vec):
            if v is not None and v not in LABEL_VALUES:
                raise ManifestError(f"value {v} for '{label_names[j]}' is not 1, 0, -1 or null",
                                    source=source, column="labels", row=row)
    for row, boxes in enumerate(table["boxes"].to_pylist()):
        for b in boxes or []:
            coords = [b["x0"], b["y0"], b["x1"], b["y1"]]
            if any(c is None or not (0.0 <= c <= 1.0) for c in coords) or b["x1"] < b["x0"] or \
                    b["y1"] < b["y0"]:
                raise ManifestError(f"box {b} must have 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1",
                                    source=source, column="boxes", row=row)


def assign_splits(patient_ids: Iterable[str], *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  salt: str = "") -> list[str]:
    """Patient-disjoint train/val/test assignment that is stable under re-runs.

    Each patient is placed by a hash of ``salt + patient_id``, so the split of a patient never
    depends on which other patients are present: adding images to a site does not move anyone.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    edges = (fractions[0], fractions[0] + fractions[1])
    out = []
    for pid in patient_ids:
        h = hashlib.sha1(f"{salt}{pid}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        out.append("train" if u < edges[0] else "val" if u < edges[1] else "test")
    return out


# -- helpers ------------------------------------------------------------------------------------
def _with_metadata(table: pa.Table, label_names: Sequence[str], site_meta: Mapping[str, Any]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[_META_LABELS] = json.dumps(list(label_names)).encode()
    meta[_META_SITE] = json.dumps(dict(site_meta), default=str).encode()
    meta[_META_VERSION] = SCHEMA_VERSION.encode()
    return table.replace_schema_metadata(meta)


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _labels_to_list(v: Any, row: int, source: str) -> list[int | None]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise ManifestError("labels are null; use a list with null entries for unannotated classes",
                            source=source, column="labels", row=row)
    out: list[int | None] = []
    for x in list(v):
        if _isnan(x) or (isinstance(x, (float, np.floating)) and np.isnan(x)):
            out.append(None)
        else:
            if float(x) not in LABEL_VALUES:
                raise ManifestError(f"label value {x} is not 1, 0, -1 or missing", source=source,
                                    column="labels", row=row)
            out.append(int(x))
    return out


def _check_choices(values: list, allowed: Sequence[str], column: str, source: str) -> None:
    for row, v in enumerate(values):
        if v is not None and v not in allowed:
            raise ManifestError(f"value '{v}' not in {list(allowed)}", source=source, column=column, row=row)


def _is_relative_inside(p: str) -> bool:
    pp = PurePosixPath(p.replace("\\", "/"))
    return not pp.is_absolute() and ".." not in pp.parts and not (len(p) > 1 and p[1] == ":")
