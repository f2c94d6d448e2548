"""Site adapters: turn a public CXR data set's on-disk layout and metadata tables into a manifest.

Every adapter keeps the data set's *own* label space and hands back an :class:`AdapterResult`:
the validated :class:`~raycxr.manifest.Manifest` plus ``dropped``, one entry for every table row
that did not make it into the manifest and why. Nothing is dropped silently.

Metadata goes through torchxrayvision's loaders where they fit (view filtering, patient ids,
label derivation). Where a loader loses information the manifest needs (CheXpert / MIMIC
uncertain ``-1``, report text, boxes in pixel units) the raw columns are read instead.

Options every adapter accepts (see :data:`COMMON_OPTIONS`):

- ``split_fractions=(0.8, 0.1, 0.1)`` and ``split_salt=<site>``: patient-disjoint, stable splits;
- ``require_files=True``: rows whose image is not found under ``root`` are dropped
  ("image file not found"); with ``False`` they are kept with the path the table implies;
- ``limit=None``: keep at most this many manifest rows (first ones in table order).

Image files are found by indexing ``root`` once (file name / trailing path components ->
relative posix path), so the real sets' sub-folder layouts (NIH ``images_001/images/...``,
PadChest ``0/ ... 54/``, SIIM ``<study>/<series>/<image>.dcm``) all work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import shutil
import tarfile
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from raycxr.manifest import Manifest, assign_splits

__all__ = [
    "ADAPTERS",
    "COMMON_OPTIONS",
    "AdapterResult",
    "SiteAdapter",
    "decode_siim_rle",
    "describe_adapters",
    "get_adapter",
    "list_adapters",
    "normalise_age",
    "normalise_sex",
    "normalise_view",
    "register_adapter",
    "xrv_table",
]

COMMON_OPTIONS: dict[str, Any] = {
    "split_fractions": (0.8, 0.1, 0.1),
    "split_salt": None,  # None -> the site name
    "require_files": True,
    "limit": None,
}

NOT_FOUND = "image file not found"
MASKS_DIRNAME = "raycxr_masks"
# Directories never indexed as images: our own mask output (SIIM masks share the image names).
_SKIP_DIRS = {MASKS_DIRNAME}

CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
# VinDr-CXR's own class names (class_id 0..13; 14 is "No finding", which is no class of its own).
VINDR_LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
]
# torchxrayvision's VinDr column names -> VinDr's own spelling (the rest are spelled the same).
_VINDR_FROM_XRV = {"Effusion": "Pleural effusion", "Other Lesion": "Other lesion",
                   "Pleural_Thickening": "Pleural thickening", "Pulmonary Fibrosis": "Pulmonary fibrosis"}

# -- normalisation --------------------------------------------------------------------------------
_VIEW_NORMAL = {
    "PA": "PA", "POSTEROANTERIOR": "PA",
    "AP": "AP", "ANTEROPOSTERIOR": "AP", "AP SUPINE": "AP", "AP HORIZONTAL": "AP",
    "L": "LATERAL", "LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL",
    "LARGE LATERAL": "LATERAL", "XTABLE LATERAL": "LATERAL",
}
_VIEW_UNKNOWN = {"", "UNKNOWN", "UNK", "NAN", "NONE"}
# Spellings handed to torchxrayvision's ``views=``: every PA / AP / lateral spelling the sets use,
# plus "UNKNOWN" (xrv's value for a missing view) so images without view metadata are kept.
_XRV_VIEWS = ["PA", "AP", "L", "LL", "RL", "LAT", "LATERAL", "Lateral", "LARGE LATERAL", "XTABLE LATERAL",
              "AP Supine", "AP_horizontal", "POSTEROANTERIOR", "ANTEROPOSTERIOR", "UNK", "UNKNOWN"]
_SEX = {"M": "M", "MALE": "M", "MAN": "M", "F": "F", "FEMALE": "F", "WOMAN": "F", "O": "O", "OTHER": "O"}
_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def _view_key(v: Any) -> str:
    return "" if _missing(v) else re.sub(r"[\s_]+", " ", str(v).strip().upper())


def normalise_view(v: Any) -> str | None:
    """``PA`` / ``AP`` / ``LATERAL`` for the spellings the public sets use, else None."""
    return _VIEW_NORMAL.get(_view_key(v))


def _view_allowed(v: Any) -> bool:
    """A PA / AP / lateral view, or an unknown one (kept with view None)."""
    key = _view_key(v)
    return key in _VIEW_NORMAL or key in _VIEW_UNKNOWN


def _view_reason(v: Any) -> str:
    return f"view '{v}' is not a PA, AP or lateral chest view"


def normalise_sex(v: Any) -> str | None:
    """``M`` / ``F`` (``O`` where the source says "other", which the manifest schema allows), else None."""
    return None if _missing(v) else _SEX.get(str(v).strip().upper())


def normalise_age(v: Any) -> float | None:
    """Age in years from a number or a DICOM age string (``058Y``, ``6M``); None if absent or implausible."""
    if _missing(v):
        return None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWDymwd])?\s*", v)
        if not m:
            return None
        age = float(m.group(1)) * _AGE_UNITS[(m.group(2) or "Y").upper()]
    else:
        try:
            age = float(v)
        except (TypeError, ValueError):
            return None
    # Ages outside [0, 130] are data-entry errors (RSNA has 148 and 155); the manifest rejects them.
    return age if 0.0 <= age <= 130.0 and not math.isnan(age) else None


def _str_or_none(v: Any) -> str | None:
    if _missing(v):
        return None
    s = str(v).strip()
    return s or None


def _int_str(v: Any) -> str:
    """Ids that pandas may have read as floats (``1.0``) back to their integer spelling."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _box(label: str, x0: float, y0: float, x1: float, y1: float, width: float, height: float) -> dict:
    """A box in pixel corners -> normalised to [0, 1] (clipped: annotations may overhang the image)."""
    def c(v: float, size: float) -> float:
        return float(min(1.0, max(0.0, v / size)))
    nx0, nx1 = sorted((c(x0, width), c(x1, width)))
    ny0, ny1 = sorted((c(y0, height), c(y1, height)))
    return {"label": label, "x0": nx0, "y0": ny0, "x1": nx1, "y1": ny1}


def _labels_from(matrix: np.ndarray) -> list[np.ndarray]:
    return list(np.asarray(matrix, dtype=np.float32))


def _drop(image_id: Any, path: Any, reason: str) -> dict:
    return {"image_id": None if _missing(image_id) else str(image_id),
            "path": None if _missing(path) else str(path), "reason": reason}


def _drops(ids: Iterable, paths: Iterable, reasons: Iterable[str]) -> list[dict]:
    return [_drop(i, p, r) for i, p, r in zip(ids, paths, reasons)]


# -- torchxrayvision ----------------------------------------------------------------------------
def _xrv() -> Any:
    try:
        import torchxrayvision as xrv
    except ImportError as e:  # only the public-set adapters need it
        raise ImportError("this site adapter reads metadata through torchxrayvision; "
                          "install it with `pip install torchxrayvision`") from e
    return xrv


def xrv_table(name: str) -> Path:
    """Path of a metadata table shipped inside torchxrayvision's ``data/`` folder."""
    return Path(os.path.dirname(_xrv().__file__)) / "data" / name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # xrv's loaders print progress and raise pandas FutureWarnings; neither is ours to show.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _table_path(value: str | os.PathLike | None, root: Path, default: str | None, what: str) -> Path:
    """An option naming a table: absolute, relative to root, or (None) the file xrv ships."""
    if value is None:
        if default is None:
            raise ValueError(f"option '{what}' is required")
        return xrv_table(default)
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    if not p.is_file():
        raise FileNotFoundError(f"{what}: table {p} does not exist")
    return p


# -- the file index -----------------------------------------------------------------------------
class _FileIndex:
    """All files under a site root, indexed once, so tables can name images without their folders.

    ``find(key, exts)`` matches ``key + ext`` against the last ``key.count('/') + 1`` components
    of every indexed path (extension compared case-insensitively); on a tie the first path in
    sorted order wins and the tie is counted in ``ambiguous``.
    """

    def __init__(self, root: Path, skip: Iterable[Path] = ()):
        self.root = root
        skip_real = {os.path.realpath(p) for p in skip}
        paths: list[str] = []
        seen: set[tuple[int, int]] = set()
        stack = [(str(root), "")]
        while stack:
            top, rel = stack.pop()
            try:
                st = os.stat(top)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:  # symlink loops
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                r = f"{rel}{e.name}"
                try:
                    if e.is_dir():
                        if e.name in _SKIP_DIRS or os.path.realpath(e.path) in skip_real:
                            continue
                        stack.append((e.path, r + "/"))
                    elif e.is_file():
                        paths.append(r)
                except OSError:
                    continue
        self.paths = sorted(paths)
        self.path_set = set(self.paths)
        self._tails: dict[int, dict[str, str]] = {}
        self.ambiguous = 0

    def _tail(self, k: int) -> dict[str, str]:
        if k not in self._tails:
            table: dict[str, str] = {}
            for p in self.paths:
                parts = p.split("/")
                if len(parts) < k:
                    continue
                stem, ext = os.path.splitext("/".join(parts[-k:]))
                key = stem + ext.lower()
                if key in table:
                    self.ambiguous += 1
                else:
                    table[key] = p
            self._tails[k] = table
        return self._tails[k]

    def find(self, key: str, exts: Sequence[str] = ("",)) -> str | None:
        table = self._tail(key.count("/") + 1)
        for ext in exts:
            hit = table.get(key + ext.lower())
            if hit is not None:
                return hit
        return None


# -- adapters ---------------------------------------------------------------------------------------
@dataclass
class AdapterResult:
    """The manifest plus one ``{"image_id", "path", "reason"}`` entry per table row left out of it."""

    manifest: Manifest
    dropped: list[dict]


@dataclass
class _Parsed:
    """What an adapter's parser hands the shared pipeline.

    ``frame`` has one row per candidate image with columns ``image_id``, ``expected`` (the
    relative path the table implies), ``lookup`` (key for :meth:`_FileIndex.find`), ``labels``
    (float arrays, NaN = not annotated) and any of ``patient_id``, ``study_id``, ``sex``, ``age``,
    ``view``, ``report``, ``boxes``, ``mask_path``, ``split``; adapters may add private columns.
    """

    frame: pd.DataFrame
    label_names: list[str]
    dropped: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


ADAPTERS: dict[str, type[SiteAdapter]] = {}


def register_adapter(name: str) -> Callable[[type[SiteAdapter]], type[SiteAdapter]]:
    """Class decorator: register a :class:`SiteAdapter` subclass under ``name``."""
    def deco(cls: type[SiteAdapter]) -> type[SiteAdapter]:
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise ValueError(f"a site adapter named '{name}' is already registered "
                             f"({ADAPTERS[name].__name__})")
        cls.name = name
        ADAPTERS[name] = cls
        return cls
    return deco


def get_adapter(name: str) -> SiteAdapter:
    """A new instance of the adapter registered as ``name``."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown site adapter '{name}'; known adapters: {', '.join(list_adapters())}")
    return ADAPTERS[name]()


def list_adapters() -> list[str]:
    """Registered adapter names, sorted."""
    return sorted(ADAPTERS)


class SiteAdapter:
    """Base class: subclasses implement :meth:`_parse` (and optionally ``_locate`` / ``_enrich``)."""

    name: str = ""
    description: str = ""
    source: str = ""
    options: ClassVar[dict[str, Any]] = {}
    extensions: ClassVar[tuple[str, ...]] = (".png",)
    # folder / generic_csv: read each image's header when the site is built (see _header_checks)
    header_checks: ClassVar[bool] = False

    def _patient_from_header(self, opts: dict[str, Any]) -> bool:
        """Whether the DICOM header's PatientID (hashed) replaces the patient id the table / layout gave."""
        return False

    def option_defaults(self) -> dict[str, Any]:
        """All options this adapter accepts, with their defaults."""
        return {**COMMON_OPTIONS, "extensions": self.extensions, **self.options}

    def build(self, root: str | Path, site: str, **options: Any) -> AdapterResult:
        """Index ``root``, read the tables, and return the site's manifest and the dropped rows."""
        defaults = self.option_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"adapter '{self.name}' got unknown option(s) {unknown}; "
                             f"accepted: {sorted(defaults)}")
        opts = {**defaults, **options}
        if isinstance(opts["extensions"], str):
            opts["extensions"] = (opts["extensions"],)
        if not site or not isinstance(site, str):
            raise ValueError(f"site name must be a non-empty string, got {site!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"site root {root} is not a directory")
        limit = opts["limit"]
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")

        index = _FileIndex(root, skip=self._skip_dirs(root, opts))
        parsed = self._parse(root, index, opts)
        frame = parsed.frame.reset_index(drop=True)
        dropped = list(parsed.dropped)

        found = self._locate(index, frame, opts)
        is_found = np.array([p is not None for p in found], dtype=bool)
        if opts["require_files"]:
            lost = frame.loc[~is_found]
            dropped += _drops(lost["image_id"], lost["expected"], [NOT_FOUND] * len(lost))
            frame = frame.loc[is_found].copy()
            frame["path"] = [p for p in found if p is not None]
        else:
            frame = frame.copy()
            frame["path"] = [p if p is not None else e for p, e in zip(found, frame["expected"])]
        frame["file_found"] = is_found[frame.index] if len(frame) else np.zeros(0, bool)

        # image_id is the manifest key; a table that repeats one keeps its first row.
        dup = frame["image_id"].duplicated()
        if dup.any():
            d = frame.loc[dup]
            dropped += _drops(d["image_id"], d["path"], ["duplicate image_id (first row kept)"] * len(d))
            frame = frame.loc[~dup]
        no_pid = frame["patient_id"].map(lambda v: _str_or_none(v) is None) if "patient_id" in frame \
            else pd.Series(True, index=frame.index)
        if no_pid.any():
            d = frame.loc[no_pid]
            dropped += _drops(d["image_id"], d["path"], ["no patient id"] * len(d))
            frame = frame.loc[~no_pid]

        if self.header_checks and opts.get("header_checks", True):
            frame, more, checked = _header_checks(root, frame.reset_index(drop=True),
                                                  patient_from_header=self._patient_from_header(opts))
            dropped += more
            parsed.meta["header_checks"] = checked

        n_beyond = 0
        if limit is not None and len(frame) > limit:
            n_beyond = len(frame) - limit
            frame = frame.iloc[:limit]
        frame = self._enrich(root, frame.reset_index(drop=True), opts, parsed.meta)

        salt = site if opts["split_salt"] is None else str(opts["split_salt"])
        pids = [str(p) for p in frame["patient_id"]]
        splits = assign_splits(pids, fractions=tuple(opts["split_fractions"]), salt=salt)
        if "split" in frame:  # a table's own split column wins where it has a value
            splits = [s if not _missing(s) else a for s, a in zip(frame["split"], splits)]
        frame["split"] = splits
        frame["patient_id"] = pids
        frame["site"] = site

        records = pd.DataFrame({
            "site": frame["site"],
            "image_id": frame["image_id"].astype(str),
            "path": frame["path"],
            "patient_id": frame["patient_id"],
            "study_id": _col(frame, "study_id", _str_or_none),
            "split": frame["split"],
            "sex": _col(frame, "sex", normalise_sex),
            "age": _col(frame, "age", normalise_age),
            "view": _col(frame, "view", normalise_view),
            "report": _col(frame, "report", _str_or_none),
            "labels": list(frame["labels"]) if len(frame) else [],
            "boxes": _col(frame, "boxes", lambda b: b if isinstance(b, list) else None),
            "mask_path": _col(frame, "mask_path", _str_or_none),
        })
        reasons = Counter(d["reason"] for d in dropped)
        meta = {
            "name": site,
            "adapter": self.name,
            "source": self.source,
            "n_images": len(records),
            "n_dropped": len(dropped),
            "dropped_reasons": dict(reasons.most_common()),
            "n_beyond_limit": n_beyond,
            "require_files": bool(opts["require_files"]),
            "split_salt": salt,
            "split_fractions": list(opts["split_fractions"]),
            "ambiguous_file_names": index.ambiguous,
            **parsed.meta,
        }
        manifest = Manifest.from_records(records, parsed.label_names, meta, source=f"<{self.name}:{site}>")
        return AdapterResult(manifest, dropped)

    # -- hooks --------------------------------------------------------------------------------------
    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        raise NotImplementedError

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        exts = tuple(opts["extensions"])
        return [index.find(k, exts) for k in frame["lookup"]]

    def _enrich(self, root: Path, frame: pd.DataFrame, opts: dict[str, Any],
                meta: dict[str, Any]) -> pd.DataFrame:
        """Per-row work done only for rows that made it (DICOM headers, mask files)."""
        return frame

    def _skip_dirs(self, root: Path, opts: dict[str, Any]) -> list[Path]:
        return []


def _col(frame: pd.DataFrame, name: str, fn: Callable[[Any], Any]) -> list:
    if name not in frame:
        return [None] * len(frame)
    return [fn(v) for v in frame[name]]


def _stem(name: str) -> str:
    return os.path.splitext(str(name))[0]


# -- NIH ChestX-ray14 -------------------------------------------------------------------------------
@register_adapter("nih")
class NIHAdapter(SiteAdapter):
    """NIH ChestX-ray14: 14 text-mined labels (0/1), boxes for ~880 images from BBox_List_2017."""

    description = "NIH ChestX-ray14 (Data_Entry_2017_v2020 + BBox_List_2017), 14 labels, boxes"
    source = "NIH ChestX-ray14"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "bbox_list_path": None}
    extensions = (".png",)
    image_size = 1024.0  # BBox_List coordinates are in the released 1024x1024 images

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "Data_Entry_2017_v2020.csv.gz", "csvpath")
        bboxpath = _table_path(opts["bbox_list_path"], root, "BBox_List_2017.csv.gz", "bbox_list_path")
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
        gone = raw.loc[~raw["Image Index"].isin(set(ids))]
        dropped = _drops(gone["Image Index"], gone["Image Index"],
                         [_view_reason(v) for v in gone["View Position"]])
        meta = {"tables": {"csvpath": str(csvpath), "bbox_list_path": str(bboxpath)},
                "n_boxes_without_label": n_box_skipped, "label_source": "torchxrayvision NIH_Dataset"}
        return _Parsed(frame, names, dropped, meta)


# -- CheXpert -------------------------------------------------------------------------------------
_CHEXPERT_PREFIX = re.compile(r"^(?:\./)?CheXpert-v1\.0(?:-small)?/")


@register_adapter("chexpert")
class CheXpertAdapter(SiteAdapter):
    """CheXpert: 14 observations incl. No Finding, with uncertain ``-1`` kept and blank = not annotated."""

    description = "Stanford CheXpert (train.csv / valid.csv), 14 labels with uncertain -1 kept"
    source = "CheXpert"
    options: ClassVar[dict[str, Any]] = {"csvpath": None}
    extensions = (".jpg", ".png")

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        csvpath = _table_path(opts["csvpath"], root, "chexpert_train.csv.gz", "csvpath")
        raw = pd.read_csv(csvpath)
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
        meta = {"tables": {"csvpath": str(csvpath)}, "label_source": "raw CheXpert columns (-1 kept)"}
        return _Parsed(frame, list(CHEXPERT_LABELS), dropped, meta)


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


# -- VinDr-CXR ------------------------------------------------------------------------------------
@register_adapter("vindr")
class VinDrAdapter(SiteAdapter):
    """VinDr-CXR: 14 findings, positive if any radiologist marked them (as xrv); boxes sized by the DICOM."""

    description = "VinDr-CXR (Kaggle vinbigdata train.csv or PhysioNet annotations), 14 labels, boxes"
    source = "VinDr-CXR"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "read_dicom_headers": True}
    extensions = (".dicom", ".dcm", ".png", ".jpg")

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "vinbigdata-train.csv.gz", "csvpath")
        with _quiet():
            ds = xrv.datasets.VinDr_Dataset(imgpath=str(root), csvpath=str(csvpath))
        xrv_names = [str(p) for p in ds.pathologies]
        own = [_VINDR_FROM_XRV.get(n, n) for n in xrv_names]
        if sorted(own) != sorted(VINDR_LABELS):
            raise RuntimeError(f"unexpected torchxrayvision VinDr classes {xrv_names}")
        order = [own.index(n) for n in VINDR_LABELS]
        labels = np.asarray(ds.labels, np.float32)[:, order]

        # Boxes of every radiologist, kept in pixels until the image size is read from the DICOM.
        raw = ds.rawcsv
        lower = {n.lower(): n for n in VINDR_LABELS}
        has = raw[["x_min", "y_min", "x_max", "y_max"]].notna().all(axis=1) & \
            raw["class_name"].str.lower().isin(set(lower))
        pix: dict[str, list[tuple]] = {}
        cols = ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
        for r in raw.loc[has, cols].itertuples(index=False):
            pix.setdefault(r[0], []).append((lower[r[1].lower()], r[2], r[3], r[4], r[5]))

        ids = ds.csv["image_id"].astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".dicom",
            "lookup": ids,
            # VinDr publishes no patient ids (images were de-identified one by one): each image is its own.
            "patient_id": ids,
            "labels": _labels_from(labels),
            "pixel_boxes": [pix.get(i, []) for i in ids],
        })
        meta = {"tables": {"csvpath": str(csvpath)}, "label_source": "torchxrayvision VinDr_Dataset",
                "patient_id": "image_id (VinDr has no patient ids)"}
        return _Parsed(frame, list(VINDR_LABELS), [], meta)

    def _enrich(self, root: Path, frame: pd.DataFrame, opts: dict[str, Any],
                meta: dict[str, Any]) -> pd.DataFrame:
        boxes, sex, age, view = [], [], [], []
        n_sized = 0
        for path, found, pixel_boxes in zip(frame["path"], frame["file_found"], frame["pixel_boxes"]):
            read = found and opts["read_dicom_headers"] and _is_dicom(path)
            hdr = _dicom_header(root / path) if read else {}
            rows, cols = hdr.get("Rows"), hdr.get("Columns")
            if rows and cols:
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


def _is_dicom(path: str) -> bool:
    return path.lower().endswith((".dcm", ".dicom"))


_HEADER_TAGS = ["Rows", "Columns", "PatientID", "PatientSex", "PatientAge", "ViewPosition"]


def _dicom_header(path: Path) -> dict[str, Any]:
    """A few header fields (no pixel data read); {} for a file pydicom cannot parse."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            # Real headers break the VR rules (SIIM writes PatientAge "38", not "038Y"); we parse leniently.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            out = {}
            for tag in _HEADER_TAGS:
                v = ds.get(tag)
                if v is not None and str(v).strip() != "":
                    out[tag] = v if tag in ("Rows", "Columns") else str(v).strip()
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
        return {}
    return out


# -- PadChest -------------------------------------------------------------------------------------
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
        kw = {"imgpath": str(root), "views": _XRV_VIEWS, "unique_patients": False}
        if opts["xrv_age_filter"]:
            with _quiet():
                ds = xrv.datasets.PC_Dataset(csvpath=str(csvpath), **kw)
        else:
            # PC_Dataset drops patients aged <= 10 and rows without a birth year (a modelling choice of
            # its paper). A manifest keeps them, as age is a column: xrv gets a copy of the columns it
            # reads with a neutral birth year; demographics come from the raw table below.
            with tempfile.TemporaryDirectory(prefix="raycxr_") as tmp:
                sub = raw[[c for c in _PC_XRV_COLUMNS if c in raw.columns]].copy()
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
        dropped = _drops(gone["ImageID"], gone_dir, reasons)
        meta = {"tables": {"csvpath": str(csvpath)}, "label_source": "torchxrayvision PC_Dataset",
                "xrv_age_filter": bool(opts["xrv_age_filter"])}
        return _Parsed(frame, names, dropped, meta)


# -- MIMIC-CXR-JPG ----------------------------------------------------------------------------------
_MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
_MIMIC_META = "mimic-cxr-2.0.0-metadata.csv"


@register_adapter("mimic_cxr_jpg")
class MIMICAdapter(SiteAdapter):
    """MIMIC-CXR-JPG 2.0: CheXpert-labeler labels per study (``-1`` kept), views from the metadata table."""

    description = "MIMIC-CXR-JPG 2.0.0 (chexpert + metadata tables), 14 labels with -1 kept, reports"
    source = "MIMIC-CXR-JPG"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "metacsvpath": None, "reports_dir": None}
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


# -- Open-I -----------------------------------------------------------------------------------------
@register_adapter("openi")
class OpenIAdapter(SiteAdapter):
    """Open-I (Indiana University): xrv's 18 MeSH-derived labels and the report text from the XML."""

    description = "Open-I / Indiana University CXR (NLMCXR reports + DICOM metadata), 18 labels, reports"
    source = "Open-I (Indiana University)"
    options: ClassVar[dict[str, Any]] = {"xmlpath": None, "dicomcsv_path": None, "tsnepacsv_path": None,
                                         "use_tsne_derived_view": False}
    extensions = (".png",)

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        xmlpath = _table_path(opts["xmlpath"], root, "NLMCXR_reports.tgz", "xmlpath")
        dicompath = _table_path(opts["dicomcsv_path"], root, "nlmcxr_dicom_metadata.csv.gz", "dicomcsv_path")
        tsnepath = _table_path(opts["tsnepacsv_path"], root, "nlmcxr_tsne_pa.csv.gz", "tsnepacsv_path")
        with _quiet():
            ds = xrv.datasets.Openi_Dataset(imgpath=str(root), xmlpath=str(xmlpath),
                                            dicomcsv_path=str(dicompath), tsnepacsv_path=str(tsnepath),
                                            use_tsne_derived_view=bool(opts["use_tsne_derived_view"]),
                                            views=_XRV_VIEWS, unique_patients=False)
        csv = ds.csv
        images, reports = _openi_reports(xmlpath)
        # The header's view is missing for a third of the images; the t-SNE derived view fills it.
        other = csv["View Position"] if opts["use_tsne_derived_view"] else csv["tsne-view"]
        view = [o if _view_key(v) in _VIEW_UNKNOWN else v for v, o in zip(csv["view"], other)]
        birth = pd.to_datetime(csv["Patient's Birth Date"].map(_int_str), format="%Y%m%d", errors="coerce")
        date = pd.to_datetime(csv["Study Date"].map(_int_str), format="%Y%m%d", errors="coerce")
        age = ((date - birth).dt.days / 365.25).to_numpy()

        ids = csv["imageid"].astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".png",
            "lookup": ids,
            "patient_id": csv["patientid"].astype(str),  # the report id: Open-I publishes no patient ids
            "study_id": csv["uid"].astype(str),
            "sex": csv["Patient's Sex"],
            "age": age,
            "view": view,
            "report": csv["uid"].map(reports),
            "labels": _labels_from(ds.labels),
        })
        gone = images.loc[~images["imageid"].isin(set(ids))]
        vp = gone["imageid"].map(pd.read_csv(dicompath, usecols=["imageid", "View Position"])
                                 .set_index("imageid")["View Position"])
        dropped = _drops(gone["imageid"], gone["imageid"] + ".png", [_view_reason(v) for v in vp])
        meta = {"tables": {"xmlpath": str(xmlpath), "dicomcsv_path": str(dicompath),
                           "tsnepacsv_path": str(tsnepath)},
                "label_source": "torchxrayvision Openi_Dataset (MeSH automatic terms)"}
        return _Parsed(frame, [str(p) for p in ds.pathologies], dropped, meta)


_OPENI_SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")


def _openi_reports(xmlpath: Path) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """(uid, imageid) of every image in the report archive, and each report's text by uid."""
    rows, reports = [], {}
    with tarfile.open(xmlpath, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            xml = ET.parse(tar.extractfile(member)).getroot()
            uid = xml.find("uId").attrib["id"]
            parts = []
            for node in xml.iter("AbstractText"):
                label, text = node.attrib.get("Label", ""), (node.text or "").strip()
                if text and label.upper() in _OPENI_SECTIONS:
                    parts.append(f"{label.upper()}: {text}")
            reports[uid] = "\n".join(parts) or None
            rows += [{"uid": uid, "imageid": img.attrib["id"]} for img in xml.iter("parentImage")]
    return pd.DataFrame(rows, columns=["uid", "imageid"]), reports


# -- SIIM-ACR pneumothorax ------------------------------------------------------------------------
def decode_siim_rle(rle: str, width: int = 1024, height: int = 1024) -> np.ndarray:
    """Decode a SIIM-ACR run-length string to a ``(height, width)`` uint8 mask of 0/1.

    The competition's format: pairs ``start length`` where each start is an offset from the end of
    the previous run, over pixels numbered column by column (top to bottom, then left to right) -
    the Kaggle ``rle2mask(rle, w, h)`` followed by ``.T``. ``"-1"`` is an empty mask.
    """
    text = str(rle).strip()
    if text in ("", "-1"):
        return np.zeros((height, width), np.uint8)
    nums = np.asarray(text.split(), dtype=np.int64)
    if len(nums) % 2 or (nums < 0).any():
        raise ValueError(f"malformed SIIM run-length string (odd count or negative): {text[:60]}...")
    offsets, lengths = nums[0::2], nums[1::2]
    ends = np.cumsum(offsets + lengths)
    starts = ends - lengths
    if len(ends) and ends[-1] > width * height:
        raise ValueError(f"SIIM run-length string runs past the {width}x{height} image")
    edge = np.zeros(width * height + 1, np.int32)
    np.add.at(edge, starts, 1)
    np.add.at(edge, ends, -1)
    flat = (np.cumsum(edge[:-1]) > 0).astype(np.uint8)
    return flat.reshape(width, height).T.copy()


@register_adapter("siim")
class SIIMAdapter(SiteAdapter):
    """SIIM-ACR pneumothorax: label Pneumothorax, RLE masks decoded to PNG files for positive images."""

    description = "SIIM-ACR Pneumothorax (train-rle.csv + DICOMs), Pneumothorax label, PNG masks"
    source = "SIIM-ACR Pneumothorax Segmentation"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "masks_dir": None, "mask_size": 1024,
                                         "read_dicom_headers": True, "write_masks": True}
    extensions = (".dcm", ".png", ".jpg")

    def _masks_dir(self, root: Path, opts: dict[str, Any]) -> Path:
        d = Path(opts["masks_dir"]).expanduser() if opts["masks_dir"] is not None else root / MASKS_DIRNAME
        if not d.is_absolute():
            d = root / d
        try:
            Path(os.path.realpath(d)).relative_to(os.path.realpath(root))
        except ValueError:
            raise ValueError(f"masks_dir {d} must lie inside the site root {root} "
                             "(mask_path is stored relative to the root)") from None
        return d

    def _skip_dirs(self, root: Path, opts: dict[str, Any]) -> list[Path]:
        return [self._masks_dir(root, opts)]

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "siim-pneumothorax-train-rle.csv.gz", "csvpath")
        with _quiet():
            ds = xrv.datasets.SIIM_Pneumothorax_Dataset(imgpath=str(root), csvpath=str(csvpath))
        csv = ds.csv.assign(_label=np.asarray(ds.labels)[:, 0])
        rle_col = " EncodedPixels" if " EncodedPixels" in csv else "EncodedPixels"
        # An image annotated by several readers has one row each: one manifest row, masks unioned.
        rles = csv[rle_col].astype(str).str.strip()
        csv["_rle"] = rles.where(rles != "-1")
        grouped = csv.groupby("ImageId", sort=False).agg(
            label=("_label", "max"), rles=("_rle", lambda s: [r for r in s if isinstance(r, str)]),
            n_rows=("_label", "size"))
        ids = grouped.index.astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".dcm",
            "lookup": ids,
            "labels": _labels_from(grouped[["label"]].to_numpy()),
            "rles": grouped["rles"].to_numpy(),
        })
        meta = {"tables": {"csvpath": str(csvpath)},
                "label_source": "torchxrayvision SIIM_Pneumothorax_Dataset",
                "n_table_rows_merged": int((grouped["n_rows"] - 1).sum())}
        return _Parsed(frame, [str(p) for p in ds.pathologies], [], meta)

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        found = super()._locate(index, frame, opts)
        # Patient ids live in the DICOM header only; read them before splits and before `limit`.
        headers = [_dicom_header(index.root / p) if p and opts["read_dicom_headers"] and _is_dicom(p) else {}
                   for p in found]
        frame["patient_id"] = [h.get("PatientID") or i for h, i in zip(headers, frame["image_id"])]
        frame["sex"] = [h.get("PatientSex") for h in headers]
        frame["age"] = [h.get("PatientAge") for h in headers]
        frame["view"] = [h.get("ViewPosition") for h in headers]
        return found

    def _enrich(self, root: Path, frame: pd.DataFrame, opts: dict[str, Any],
                meta: dict[str, Any]) -> pd.DataFrame:
        if not opts["write_masks"]:  # labels only (e.g. sampling the table); no mask files, no mask_path
            meta["masks_dir"] = None
            return frame.assign(mask_path=None)
        mdir = self._masks_dir(root, opts)
        size = int(opts["mask_size"])
        mask_paths: list[str | None] = []
        for image_id, rles in zip(frame["image_id"], frame["rles"]):
            if not rles:  # negatives have no mask file; an all-zero mask is implied
                mask_paths.append(None)
                continue
            mask = np.zeros((size, size), np.uint8)
            for rle in rles:
                mask |= decode_siim_rle(rle, size, size)
            out = mdir / f"{image_id}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_png(mask * 255, out)
            mask_paths.append(Path(os.path.relpath(out, root)).as_posix())
        meta["masks_dir"] = Path(os.path.relpath(mdir, root)).as_posix()
        return frame.assign(mask_path=mask_paths)


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(tmp, format="PNG")
    tmp.replace(path)  # atomic: a crashed build never leaves half a mask behind


# -- RSNA pneumonia ---------------------------------------------------------------------------------
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


# -- a hospital's own CSV export ------------------------------------------------------------------
_DEFAULT_POSITIVE = ("1", "1.0", "true", "yes", "y", "positive", "pos")
_DEFAULT_NEGATIVE = ("0", "0.0", "false", "no", "n", "negative", "neg")
_DEFAULT_UNCERTAIN = ("-1", "-1.0", "uncertain", "u")


def _token(v: Any) -> str:
    return str(v).strip().lower()


def _rel_posix(p: str) -> str:
    p = str(p).strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


# -- header checks at build time (folder, generic_csv) -------------------------------------------------
HEADER_CHECK_OPTIONS: dict[str, Any] = {"header_checks": True}
_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: how many public CXR sets ship (SIIM): accepted


def hash_patient_id(patient_id: str) -> str:
    """A pseudonymous patient key from a DICOM PatientID (sha256; the clear ID is never stored)."""
    return "pt-" + hashlib.sha256(b"raycxr-patient\0" + str(patient_id).strip().encode("utf-8")).hexdigest()[:20]


def _image_facts(full: Path) -> tuple[str | None, str | None, str | None, list[str]]:
    """``(hashed patient, SOPInstanceUID, pixel hash, scope flags)`` of one image file; ``(None, None, None, [])``
    when it cannot be read here (the reader quarantines it later with the real reason)."""
    from raycxr_runtime.readers import DICOM_SUFFIXES, ImageReadError, _has_dicm_marker, check_pixel_budget
    from raycxr_runtime.safety import check_header

    if full.suffix.lower() in DICOM_SUFFIXES or _has_dicm_marker(full):
        import pydicom

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(full)
        except Exception:  # not readable as DICOM: the image reader reports it (quarantine)
            return None, None, None, []
        flags, _ = check_header(ds, frontal_only=False)  # lateral views are training data
        if str(ds.get("SOPClassUID") or "") == _SC_STORAGE:
            flags = [f for f in flags if not f.startswith("not a radiograph image object")]
        pid = str(ds.get("PatientID") or "").strip()
        uid = str(ds.get("SOPInstanceUID") or "").strip() or None
        pixels = ds.get("PixelData")
        digest = hashlib.sha256(bytes(pixels)).hexdigest() if pixels else None
        return (hash_patient_id(pid) if pid else None), uid, digest, flags
    try:
        with Image.open(full) as im:
            check_pixel_budget(full, rows=im.size[1], columns=im.size[0], samples=len(im.getbands()))
            h = hashlib.sha256(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
            return None, None, h.hexdigest(), []
    except (ImageReadError, OSError, ValueError, Image.DecompressionBombError):
        return None, None, None, []


def _header_checks(root: Path, frame: pd.DataFrame, *, patient_from_header: bool) -> tuple[pd.DataFrame, list[dict],
                                                                                          dict[str, int]]:
    """What a folder or a CSV export cannot say about its images, read from the images themselves:

    - **scope**: the runtime's header check (:func:`raycxr_runtime.safety.check_header`: modality,
      body part, SOP class; lateral views are kept, Secondary Capture is accepted): an extremity CR
      is dropped with the reason instead of entering training;
    - **patient**: with ``patient_from_header``, the DICOM PatientID, hashed, replaces the id the
      layout implied (a file stem is not a patient);
    - **duplicates**: a second image with the same SOPInstanceUID, or the same pixels, is dropped
      ("duplicate of <image_id>"), so copies cannot land in two splits.
    """
    keep = np.ones(len(frame), bool)
    dropped: list[dict] = []
    pids = list(frame["patient_id"])
    seen_uid: dict[str, str] = {}
    seen_pixels: dict[str, str] = {}
    stats = {"out_of_scope": 0, "duplicates": 0, "patient_from_header": 0}
    for i, (image_id, rel) in enumerate(zip(frame["image_id"], frame["path"])):
        pid, uid, digest, flags = _image_facts(root / rel)
        if flags:
            keep[i] = False
            stats["out_of_scope"] += 1
            dropped.append(_drop(image_id, rel, "out of scope: " + "; ".join(flags)))
            continue
        first = (seen_uid.get(uid) if uid else None) or (seen_pixels.get(digest) if digest else None)
        if first is not None:
            keep[i] = False
            stats["duplicates"] += 1
            same = "same SOPInstanceUID" if uid and seen_uid.get(uid) == first else "same pixels"
            dropped.append(_drop(image_id, rel, f"duplicate of {first} ({same})"))
            continue
        if uid:
            seen_uid[uid] = str(image_id)
        if digest:
            seen_pixels[digest] = str(image_id)
        if patient_from_header and pid:
            pids[i] = pid
            stats["patient_from_header"] += 1
    out = frame.assign(patient_id=pids).loc[keep].reset_index(drop=True)
    return out, dropped, stats


@register_adapter("generic_csv")
class GenericCSVAdapter(SiteAdapter):
    """A hospital's own table: one row per image, labels as one column per class or one joined column."""

    description = "Any CSV export: path/patient/demographic columns, per-class or joined label columns"
    source = "generic CSV"
    options: ClassVar[dict[str, Any]] = {
        "csv": None, "path_col": "path", "patient_col": "patient_id", "image_id_col": None,
        "study_col": None, "sex_col": None, "age_col": None, "view_col": None, "report_col": None,
        "split_col": None, "label_cols": None, "positive_values": _DEFAULT_POSITIVE,
        "negative_values": _DEFAULT_NEGATIVE, "uncertain_values": _DEFAULT_UNCERTAIN,
        "labels_col": None, "sep": "|", "label_names": None, "source_name": None, **HEADER_CHECK_OPTIONS,
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
            col = need("labels_col")
            sep = opts["sep"]
            items = [None if _missing(v) or not str(v).strip() else
                     [s.strip() for s in str(v).split(sep) if s.strip()] for v in col]
            names = [str(n) for n in opts["label_names"]] if opts["label_names"] is not None else \
                sorted({s for lst in items if lst for s in lst})
            pos = {n: j for j, n in enumerate(names)}
            out = np.full((len(table), len(names)), np.nan, np.float32)
            for i, lst in enumerate(items):
                if lst is None:  # a blank cell: not annotated
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


def describe_adapters() -> Mapping[str, str]:
    """Name -> one-line description of every registered adapter (for CLIs)."""
    return {n: ADAPTERS[n].description for n in list_adapters()}


# -- an existing raycxr manifest ---------------------------------------------------------------------
@register_adapter("manifest")
class ManifestAdapter(SiteAdapter):
    """A site whose manifest already exists (the synthetic demo sites, or one built elsewhere).

    ``build`` reads and validates it; with ``require_files`` (default) rows whose image is absent
    move to ``dropped``, like every other adapter. The rows and the metadata take the site's own
    name (a copy of another site's folder is renamed, ``renamed_from`` records the old name).
    """

    description = "an existing raycxr manifest.parquet (synthetic sites, or built elsewhere)"
    source = "raycxr manifest"
    options: ClassVar[dict[str, Any]] = {"manifest": "manifest.parquet"}

    def build(self, root: str | Path, site: str, **options: Any) -> AdapterResult:
        allowed = {"manifest", "require_files", "limit"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"adapter 'manifest' got unknown option(s) {unknown}; accepted: {sorted(allowed)}")
        root = Path(root)
        path = Path(options.get("manifest", "manifest.parquet"))
        manifest = Manifest.read(path if path.is_absolute() else root / path)
        keep = np.ones(len(manifest), bool)
        dropped: list[dict] = []
        if options.get("require_files", True):
            for i, (iid, rel) in enumerate(zip(manifest.table["image_id"].to_pylist(),
                                               manifest.table["path"].to_pylist())):
                if not (root / rel).is_file():
                    keep[i] = False
                    dropped.append(_drop(iid, rel, "image file not found"))
        limit = options.get("limit")
        if limit is not None:
            keep &= np.cumsum(keep) <= int(limit)
        manifest = manifest.select(keep) if not keep.all() else manifest
        return AdapterResult(_renamed(manifest, site), dropped)


def _renamed(manifest: Manifest, site: str) -> Manifest:
    """The manifest under the site's own (YAML) name: a copied site (data/demo/siim registered as
    ``site5``) keeps ``site='siim'`` in its rows otherwise, and training looks rows up by the YAML name."""
    import pyarrow as pa

    names = sorted(set(manifest.table["site"].to_pylist()))
    if names in ([site], []) and manifest.site_meta.get("name", site) == site:
        return manifest
    i = manifest.table.schema.get_field_index("site")
    table = manifest.table.set_column(i, manifest.table.schema.field(i),
                                      pa.array([site] * len(manifest), pa.string()))
    meta = {**manifest.site_meta, "name": site, "renamed_from": names}
    return Manifest(table, manifest.label_names, meta, manifest.source)
