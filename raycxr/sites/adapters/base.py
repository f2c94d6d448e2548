"""The adapter base class and registry, and the helpers every adapter shares: normalising views, sex and ages,
the torchxrayvision tables, the file index, official and hashed splits, DICOM header reads and checks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from raycxr.manifest import Manifest, assign_splits
from raycxr.registry import Registry

COMMON_OPTIONS: dict[str, Any] = {
    "split": "official",  # official | hashed
    "split_fractions": (0.8, 0.1, 0.1),
    "split_salt": None,  # None -> the data set's identity (SiteAdapter.dataset)
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
                "validate": "val", "dev": "val", "test": "test", "testing": "test"}
SPLIT_POLICIES = ("official", "hashed")
# An official value "trainval": the data set's train+val set, divided into train / val by the patient hash.
TRAINVAL = "trainval"
# A patient the official split puts in two sets goes to the more held-out one (never test images in training).
_HELD_OUT_RANK = {TRAINVAL: 0, "train": 1, "val": 2, "test": 3}


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


def _find_table(root: Path, index: _FileIndex | None, value: Any, names: Sequence[str], what: str) -> Path | None:
    """An optional table: the option's path if given (must exist), else the first of ``names`` under root."""
    if value is not None:
        return _table_path(value, root, None, what)
    for name in names:
        hit = index.find(name) if index is not None else None
        if hit is not None:
            return root / hit
    return None


def _require_columns(table: pd.DataFrame | Path, path: Path, columns: Sequence[str], what: str = "") -> None:
    """One line naming the file and the absent column(s), instead of a KeyError deep in a loader."""
    have = list(pd.read_csv(table, nrows=0).columns) if isinstance(table, Path) else list(table.columns)
    absent = [c for c in columns if c not in have]
    if absent:
        raise ValueError(f"{path}: column(s) {absent} not found{' (' + what + ')' if what else ''}; "
                         f"columns are {have[:30]}")


def _id_list(path: Path) -> set[str]:
    """The image names listed in a text file, one a line (NIH's train_val_list.txt / test_list.txt)."""
    return {line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()}


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
        self._others: dict[int, dict[str, list[str]]] = {}
        self.ambiguous = 0
        # path the manifest uses -> the other files of that name it was chosen over (listed in dropped)
        self.shadowed: dict[str, list[str]] = {}

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
                    self._others.setdefault(k, {}).setdefault(key, []).append(p)
                else:
                    table[key] = p
            self._tails[k] = table
        return self._tails[k]

    def find(self, key: str, exts: Sequence[str] = ("",)) -> str | None:
        k = key.count("/") + 1
        table = self._tail(k)
        for ext in exts:
            hit = table.get(key + ext.lower())
            if hit is not None:
                others = self._others.get(k, {}).get(key + ext.lower())
                if others:
                    self.shadowed[hit] = others
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


ADAPTER_REGISTRY: Registry[type[SiteAdapter]] = Registry("site adapter")
ADAPTERS = ADAPTER_REGISTRY.entries  # name -> class, as registered so far (plug-ins: list_adapters())


def register_adapter(name: str) -> Callable[[type[SiteAdapter]], type[SiteAdapter]]:
    """Class decorator: register a :class:`SiteAdapter` subclass under ``name`` (in raycxr or in a plug-in
    module, see :mod:`raycxr.registry`)."""
    def deco(cls: type[SiteAdapter]) -> type[SiteAdapter]:
        ADAPTER_REGISTRY.register(name, cls)
        cls.name = name
        return cls
    return deco


def get_adapter(name: str) -> SiteAdapter:
    """A new instance of the adapter registered as ``name``."""
    if name not in ADAPTER_REGISTRY:
        raise ValueError(f"unknown site adapter '{name}'; known adapters: {', '.join(list_adapters())}")
    return ADAPTERS[name]()


def list_adapters() -> list[str]:
    """Registered adapter names, sorted."""
    return sorted(ADAPTER_REGISTRY.names())


class SiteAdapter:
    """Base class: subclasses implement :meth:`_parse` (and optionally ``_locate`` / ``_enrich``)."""

    name: str = ""
    description: str = ""
    source: str = ""
    # The data set's identity: salts the hashed split (None: the adapter name), so a renamed site keeps its splits.
    dataset: ClassVar[str | None] = None
    # Where the data set's official split comes from ("" = it publishes none); shown by `sites show`.
    official_split: ClassVar[str] = ""
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

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError naming any option this adapter does not accept (with the nearest accepted name)."""
        import difflib

        accepted = sorted(self.option_defaults())
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            def near(u: str) -> list[str]:  # a typo, or an abbreviation (separator -> sep)
                return difflib.get_close_matches(u, accepted, 1) or \
                    [a for a in accepted if len(a) >= 3 and (u.startswith(a) or a.startswith(u))][:1]
            hints = [f"'{u}' -> '{m[0]}'" for u in unknown if (m := near(u))]
            raise ValueError(f"adapter '{self.name}' got unknown option(s) {unknown}"
                             + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                             + f"; accepted: {accepted}")
        if "split" in options and options["split"] not in SPLIT_POLICIES and "split" in accepted:
            raise ValueError(f"option split must be one of {list(SPLIT_POLICIES)}, got {options['split']!r}")

    def build(self, root: str | Path, site: str, **options: Any) -> AdapterResult:
        """Index ``root``, read the tables, and return the site's manifest and the dropped rows."""
        defaults = self.option_defaults()
        self.check_options(options)
        opts = {**defaults, **options}
        if isinstance(opts["extensions"], str):
            opts["extensions"] = (opts["extensions"],)
        if opts["split"] not in SPLIT_POLICIES:
            raise ValueError(f"option split must be one of {list(SPLIT_POLICIES)}, got {opts['split']!r}")
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
        # A second file of the same name (a stray backup/ copy): the first in path order is used, the other listed.
        for used, others in sorted(index.shadowed.items()):
            dropped += [_drop(None, o, f"ambiguous file name: {used} has the same name and is the one used")
                        for o in others]

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

        salt = (self.dataset or self.name) if opts["split_salt"] is None else str(opts["split_salt"])
        pids = [str(p) for p in frame["patient_id"]]
        official = list(frame["split"]) if "split" in frame and opts["split"] == "official" else None
        frame["split"], split_meta = _resolve_splits(pids, official, tuple(opts["split_fractions"]), salt)
        split_meta["policy"] = opts["split"]
        found_in, missing_why = parsed.meta.pop("official_split", None), parsed.meta.pop("no_official_split", None)
        if split_meta["official_rows"]:
            split_meta["source"] = f"official ({found_in or self.official_split})"
        elif opts["split"] == "hashed":
            split_meta["source"] = "hashed (split=hashed)"
        else:
            split_meta["source"] = f"hashed ({missing_why or self._no_official()})"
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
            "split": split_meta,
            "ambiguous_file_names": sum(len(o) for o in index.shadowed.values()),
            **parsed.meta,
        }
        manifest = Manifest.from_records(records, parsed.label_names, meta, source=f"<{self.name}:{site}>")
        return AdapterResult(manifest, dropped)

    def _no_official(self) -> str:
        if self.official_split:
            return f"the official split ({self.official_split}) was not found under the root"
        return f"{self.source or self.name} publishes no official split"

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


def _resolve_splits(pids: list[str], official: list | None, fractions: tuple[float, ...],
                    salt: str) -> tuple[list[str], dict[str, Any]]:
    """Each row's split: the official one where given (``trainval`` divided by the patient hash), else hashed.

    A patient whose rows carry different official splits goes, with all its rows, to the most held-out
    of them (test > val > train), so splits stay patient-disjoint and no test image is trained on.
    """
    hashed = assign_splits(pids, fractions=fractions, salt=salt)
    meta: dict[str, Any] = {"official_rows": 0}
    if official is None or all(_missing(v) or v is None for v in official):
        return hashed, meta
    f_train, f_val = fractions[0], fractions[1]
    tv = (1.0, 0.0, 0.0) if f_train + f_val <= 0 else (f_train / (f_train + f_val), f_val / (f_train + f_val), 0.0)
    hashed_tv = assign_splits(pids, fractions=tv, salt=salt)
    per_patient: dict[str, str] = {}
    conflicts: set[str] = set()
    for pid, v in zip(pids, official):
        if _missing(v) or v is None:
            continue
        first = per_patient.get(pid)
        if first is not None and first != v:
            conflicts.add(pid)
        if first is None or _HELD_OUT_RANK[v] > _HELD_OUT_RANK[first]:
            per_patient[pid] = v
    out = []
    for pid, h, htv in zip(pids, hashed, hashed_tv):
        v = per_patient.get(pid)
        out.append(h if v is None else htv if v == TRAINVAL else v)
    meta["official_rows"] = sum(1 for v in official if not (_missing(v) or v is None))
    meta["rows_without_official_split"] = len(pids) - meta["official_rows"]
    meta["patients_in_two_official_splits"] = len(conflicts)
    return out, meta


def _col(frame: pd.DataFrame, name: str, fn: Callable[[Any], Any]) -> list:
    if name not in frame:
        return [None] * len(frame)
    return [fn(v) for v in frame[name]]


ParsedTable = _Parsed  # the public name of what ``_parse`` returns, for adapters outside raycxr


def _stem(name: str) -> str:
    return os.path.splitext(str(name))[0]




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
