"""Files in, one result per file out: header checks, the raycxr readers, the ONNX classifier, thresholds.

Each input goes through, in order:

1. **header** (DICOM only): :func:`raycxr_runtime.readers.read_dicom_header`, then
   :func:`raycxr_runtime.safety.check_header`; any flag makes the result ``flagged`` and, unless
   ``force``, it is not scored (``probabilities`` is ``None``).
2. **pixels**: ``resize(read_image(path), S)[None]``, exactly what training and evaluation did
   (the same functions). An :class:`~raycxr_runtime.readers.ImageReadError` gives status
   ``error`` with the reason.
3. **model**: images are scored in batches; ``findings`` are the classes whose probability is
   at least the class's threshold (stored in the model file).

A result is ``{"input", "status", "warnings", "probabilities", "findings", "model_version"}``
where ``input`` is the path or the name the caller gave, as given. No header value other than
Modality, Body Part, View Position and SOP class (codes) ever reaches a result or a log line.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .model import Model
from .readers import (
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    ImageReadError,
    _has_dicm_marker,
    read_dicom_header,
    read_image,
    resize,
)
from .safety import check_header

__all__ = ["Prediction", "Predictor", "collect_inputs", "quiet_pydicom", "write_csv", "write_json"]

logger = logging.getLogger("raycxr_runtime")

SCORED, FLAGGED, ERROR = "scored", "flagged", "error"
NOT_DICOM_NOTE = "not DICOM: modality, body part and view could not be checked"


@dataclass
class Prediction:
    """The result for one input file."""

    input: str
    status: str
    warnings: list[str] = field(default_factory=list)
    probabilities: dict[str, float] | None = None
    findings: list[str] = field(default_factory=list)
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Predictor:
    """Score files with a classifier :class:`Model`.

    ``force``: score flagged (out-of-scope) images too; they keep status ``flagged`` and their
    reasons, so a consumer can still tell them apart.
    """

    def __init__(self, model: Model, *, batch_size: int = 16, force: bool = False) -> None:
        if model.kind != "classifier":
            raise ValueError(f"{model.path.name} is an {model.kind} model; scoring needs a classifier "
                             "(classifier.onnx or classifier.int8.onnx)")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self.force = bool(force)

    def predict_file(self, path: str | os.PathLike[str], name: str | None = None) -> Prediction:
        """One file; ``name`` (default: the path as given) is what the result calls it."""
        return self.predict_files([path], names=[name] if name is not None else None)[0]

    def predict_files(self, paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Every file, in order. ``progress(n)`` is called after each batch with the files done in it."""
        return list(self.iter_predictions(paths, names, progress))

    def iter_predictions(self, paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None,
                         progress: Callable[[int], None] | None = None) -> Iterator[Prediction]:
        if names is not None and len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} files")
        labels = [str(p) for p in paths] if names is None else [str(n) for n in names]
        for start in range(0, len(paths), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(paths)))
            results: list[Prediction] = []
            images: list[np.ndarray] = []
            scored: list[int] = []
            for i in chunk:
                result, image = self._prepare(paths[i], labels[i])
                if image is not None:
                    scored.append(len(results))
                    images.append(image)
                results.append(result)
            if images:
                probs = self.model.predict(np.stack(images))
                for k, p in zip(scored, probs):
                    self._fill(results[k], p)
            for r in results:
                logger.info("%s: %s%s", r.input, r.status, f" ({len(r.warnings)} warning(s))" if r.warnings else "")
                for w in r.warnings:
                    logger.debug("%s: %s", r.input, w)
            if progress is not None:
                progress(len(results))
            yield from results

    def _prepare(self, path: str | os.PathLike[str], label: str) -> tuple[Prediction, np.ndarray | None]:
        p = Path(path)
        result = Prediction(input=label, status=SCORED, model_version=self.model.model_version)
        flags: list[str] = []
        header = _header(p)
        if isinstance(header, ImageReadError):
            result.status, result.warnings = ERROR, [header.reason]
            return result, None
        if header is None:
            result.warnings.append(NOT_DICOM_NOTE)
        else:
            flags, notes = check_header(header, frontal_only=self.model.frontal_only)
            result.warnings = [*flags, *notes]
        if flags:
            result.status = FLAGGED
            if not self.force:
                return result, None
            result.warnings.append("scored anyway (force): the probabilities are outside the model's scope")
        try:
            image = resize(read_image(p), self.model.input_size)[None]
        except ImageReadError as exc:
            result.status = ERROR
            result.warnings = [w for w in result.warnings if w != NOT_DICOM_NOTE] + [exc.reason]
            return result, None
        return result, image

    def _fill(self, result: Prediction, probs: np.ndarray) -> None:
        names, thr = self.model.class_names, self.model.thresholds
        result.probabilities = {c: round(float(v), 6) for c, v in zip(names, probs)}
        result.findings = [c for c, v, t in zip(names, probs, thr) if float(v) >= float(t)]


def _header(p: Path) -> Any:
    """The DICOM header, ``None`` for a raster image, or the :class:`ImageReadError` of a broken DICOM."""
    suffix = p.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return None
    try:
        return read_dicom_header(p)
    except ImageReadError as exc:
        if suffix in DICOM_SUFFIXES or not p.is_file():
            return exc
        return None  # unknown suffix and not DICOM: read_image tries it as a raster and says why it fails


def quiet_pydicom() -> None:
    """Turn off pydicom's value-validation warnings for this process: they can quote element values,
    which may be patient identifiers (the CLI and the server call this; a library user decides)."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


# ----------------------------------------------------------------------------------- inputs and outputs


def collect_inputs(items: Iterable[str | os.PathLike[str]]) -> tuple[list[str], int]:
    """Files as given, and the supported images under folders (recursive, sorted).

    Inside folders, files with a DICOM / PNG / JPEG / TIFF suffix are taken, and files with no
    known suffix when they carry the DICOM ``DICM`` marker (PACS exports name files by UID).
    Returns ``(files, skipped)``: ``skipped`` counts the other files found in folders. A path that
    does not exist is kept, so its result says "file not found".
    """
    files: list[str] = []
    skipped = 0
    for item in items:
        p = Path(item)
        if not p.is_dir():
            files.append(str(item))
            continue
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            if f.suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES or _has_dicm_marker(f):
                files.append(str(f))
            else:
                skipped += 1
    return files, skipped


def summary(results: Sequence[Prediction]) -> dict[str, int]:
    """Counts per status."""
    out = {SCORED: 0, FLAGGED: 0, ERROR: 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def report(results: Sequence[Prediction], model: Model) -> dict[str, Any]:
    """The JSON document ``raycxr-infer`` writes: the model card essentials, counts and the results."""
    return {
        "model": {"file": model.path.name, "model_version": model.model_version, "class_names": model.class_names,
                  "thresholds": dict(zip(model.class_names, model.thresholds.tolist())),
                  "frontal_only": model.frontal_only},
        "summary": summary(results),
        "results": [r.to_dict() for r in results],
    }


def write_json(results: Sequence[Prediction], model: Model, path: str | os.PathLike[str] | None) -> str:
    """Write (or, with ``path=None``, return) the JSON report."""
    text = json.dumps(report(results, model), indent=2, ensure_ascii=False)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def write_csv(results: Sequence[Prediction], model: Model, path: str | os.PathLike[str]) -> None:
    """One row per input: input, status, model_version, findings and warnings ("; "-joined), then
    one ``prob:<class>`` column per class (empty when not scored)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["input", "status", "model_version", "findings", "warnings",
                    *(f"prob:{c}" for c in model.class_names)])
        for r in results:
            probs = r.probabilities or {}
            w.writerow([r.input, r.status, r.model_version, "; ".join(r.findings), "; ".join(r.warnings),
                        *(probs.get(c, "") for c in model.class_names)])
