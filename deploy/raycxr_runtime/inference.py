"""Files in, one result per file out: header checks, the raycxr readers, the ONNX classifier, thresholds.

Each input goes through, in order:

1. **header** (DICOM only): :func:`raycxr_runtime.readers.read_dicom_header`, then
   :func:`raycxr_runtime.safety.check_header`; any flag makes the result ``flagged`` and, unless
   ``force``, it is not scored (``probabilities`` is ``None``).
2. **pixels**: ``resize(read_image(path), S)[None]``, exactly what training and evaluation did
   (the same functions). An :class:`~raycxr_runtime.readers.ImageReadError` gives status
   ``error`` with the reason; a readable but degenerate image (constant, an invalid window: the
   readers' ``notes``) is ``flagged`` and, unless ``force``, not scored.
3. **model**: images are scored in batches; ``findings`` are the classes whose probability is
   at least the class's threshold (stored in the model file).

A result is ``{"input", "status", "warnings", "probabilities", "findings", "model_version"}``
where ``input`` is the path or the name the caller gave, as given (plus ``sr_error``, why no
Structured Report was made, when one was asked for and failed). No header value other than
Modality, Body Part, View Position and SOP class (codes) ever reaches a result or a log line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .isolate import IsolatedPool, Outcome, worker_memory_limit
from .model import Model
from .readers import (
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    ImageReadError,
    PixelBudget,
    _has_dicm_marker,
    link_problem,
    read_dicom_header,
    read_image,
    resize,
)
from .safety import check_header

__all__ = ["InputScan", "Prediction", "Predictor", "ResultWriter", "collect_inputs", "csv_cell", "display_name",
           "dumps", "json_safe", "log_name", "prepare", "quiet_pydicom", "scan_inputs", "write_csv", "write_json"]

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
    sr_error: str | None = None  # why no Structured Report was made (only when one was asked for)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["sr_error"] is None:
            del d["sr_error"]
        return d


def prepare(path: str | os.PathLike[str], label: str, input_size: int, frontal_only: bool, force: bool,
            model_version: str, budget: PixelBudget | None = None) -> tuple[Prediction, np.ndarray | None]:
    """Header checks, then the pixels as the model's input ``(1, S, S)``; ``None`` when not to be scored.

    Module-level (and picklable arguments only) so that it can run in an isolated worker process."""
    p = Path(path)
    result = Prediction(input=label, status=SCORED, model_version=model_version)
    flags: list[str] = []
    header = _header(p, budget)
    if isinstance(header, ImageReadError):
        result.status, result.warnings = ERROR, [header.reason]
        return result, None
    if header is None:
        result.warnings.append(NOT_DICOM_NOTE)
    else:
        flags, notes = check_header(header, frontal_only=frontal_only)
        result.warnings = [*flags, *notes]
    if flags:
        result.status = FLAGGED
        if not force:
            return result, None
        result.warnings.append("scored anyway (force): the probabilities are outside the model's scope")
    degenerate: list[str] = []
    try:
        image = resize(read_image(p, budget=budget, notes=degenerate), input_size)[None]
    except ImageReadError as exc:
        result.status = ERROR
        result.warnings = [w for w in result.warnings if w != NOT_DICOM_NOTE] + [exc.reason]
        return result, None
    if degenerate:  # readable, but not the image the model was trained on: out of scope
        result.warnings = [w for w in result.warnings if not w.startswith("scored anyway")] + degenerate
        if result.status != FLAGGED:
            result.status = FLAGGED
            if not force:
                return result, None
        result.warnings.append("scored anyway (force): the probabilities are outside the model's scope")
    return result, image


class Predictor:
    """Score files with a classifier :class:`Model`: the one inference path of the CLI, the service and the DICOM node.

    Args:
        model: a classifier.
        batch_size: images per model call.
        force: score flagged (out-of-scope) images too; they keep status ``flagged`` and their
            reasons, so a consumer can still tell them apart.
        budget: the pixel budget checked before decoding (default: the readers' process default).
        workers: 0 reads images in this process (a decoder's ``BaseException`` becomes an ``error``
            result); N > 0 reads them in N isolated worker processes
            (:class:`~raycxr_runtime.isolate.IsolatedPool`), so a decoder that crashes or hangs
            fails only its file. The pool also bounds how many decodes run at once.
        timeout: seconds one image may take to read (workers > 0 only).
        memory_limit: address-space limit of each worker in bytes (workers > 0 only; default
            :func:`~raycxr_runtime.isolate.worker_memory_limit` of the budget, 0: no limit). A worker
            over it fails its file ("not enough memory" or "worker process died"), not the run.
    """

    def __init__(self, model: Model, *, batch_size: int = 16, force: bool = False, budget: PixelBudget | None = None,
                 workers: int = 0, timeout: float | None = None, memory_limit: int | None = None) -> None:
        if model.kind != "classifier":
            raise ValueError(f"{model.path.name} is an {model.kind} model; scoring needs a classifier "
                             "(classifier.onnx or classifier.int8.onnx)")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self.force = bool(force)
        self.budget = budget
        self.pool: IsolatedPool | None = None
        if workers > 0:
            limit = worker_memory_limit(budget) if memory_limit is None else (memory_limit or None)
            self.pool = IsolatedPool(f"{__name__}:prepare", workers=workers, timeout=timeout, memory_limit=limit)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def predict_file(self, path: str | os.PathLike[str], name: str | None = None) -> Prediction:
        """One file; ``name`` (default: the path as given) is what the result calls it."""
        return self.predict_files([path], names=[name] if name is not None else None)[0]

    def predict_files(self, paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[Prediction]:
        """Every file, in order. ``progress(n)`` is called after each batch with the files done in it."""
        return list(self.iter_predictions(paths, names, progress))

    def iter_predictions(self, paths: Sequence[str | os.PathLike[str]], names: Sequence[str] | None = None,
                         progress: Callable[[int], None] | None = None) -> Iterator[Prediction]:
        """Results one batch at a time, in input order (a caller can write each as it comes)."""
        if names is not None and len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} files")
        labels = [str(p) for p in paths] if names is None else [str(n) for n in names]
        args = [(str(p), lab, self.model.input_size, self.model.frontal_only, self.force, self.model.model_version,
                 self.budget) for p, lab in zip(paths, labels)]
        if self.pool is None:
            prepared: Iterator[Outcome] = map(self._prepare_here, args)
        elif len(args) == 1:  # the service's case: no read-ahead threads for one file
            prepared = iter([self.pool.call(*args[0])])
        else:
            prepared = self.pool.imap(args)
        for start in range(0, len(paths), self.batch_size):
            results: list[Prediction] = []
            images: list[np.ndarray] = []
            scored: list[int] = []
            for i in range(start, min(start + self.batch_size, len(paths))):
                out = next(prepared)
                result, image = out.value if out.ok else (self._failed(labels[i], out.error), None)
                if image is not None:
                    scored.append(len(results))
                    images.append(image)
                results.append(result)
            if images:
                probs = self.model.predict(np.stack(images))
                for k, p in zip(scored, probs):
                    self._fill(results[k], p)
            for r in results:
                logger.info("%s: %s%s", log_name(r.input), r.status,
                            f" ({len(r.warnings)} warning(s))" if r.warnings else "")
                for w in r.warnings:
                    logger.debug("%s: %s", log_name(r.input), log_name(w))
            if progress is not None:
                progress(len(results))
            yield from results

    def _prepare_here(self, args: tuple[Any, ...]) -> Outcome:
        try:
            return Outcome(True, prepare(*args))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except MemoryError:
            return Outcome(False, None, "not enough memory to read this image")
        except BaseException as exc:  # noqa: BLE001 (a decoder's PanicException must not end the run)
            return Outcome(False, None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def _failed(self, label: str, error: str) -> Prediction:
        return Prediction(input=label, status=ERROR, warnings=[f"reading the image failed: {error}"],
                          model_version=self.model.model_version)

    def _fill(self, result: Prediction, probs: np.ndarray) -> None:
        names, thr = self.model.class_names, self.model.thresholds
        values = np.asarray(probs, dtype=np.float64)
        if not np.isfinite(values).all():
            bad = [c for c, v in zip(names, values) if not np.isfinite(v)]
            result.status = ERROR
            result.warnings.append(f"the model returned non-finite probabilities (NaN or inf) for "
                                   f"{len(bad)} class(es) ({', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}): "
                                   "not scored")
            return
        result.probabilities = {c: round(float(v), 6) for c, v in zip(names, values)}
        result.findings = [c for c, v, t in zip(names, values, thr) if float(v) >= float(t)]


def _header(p: Path, budget: PixelBudget | None = None) -> Any:
    """The DICOM header, ``None`` for a raster image, or the :class:`ImageReadError` of a broken DICOM."""
    suffix = p.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return None
    try:
        return read_dicom_header(p, budget=budget)
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


def display_name(text: str) -> str:
    """``text`` as any UTF-8 output can hold it: a file name that is not valid UTF-8 reaches Python
    with its bytes kept as surrogate escapes (PEP 383), which a UTF-8 file refuses; those bytes are
    shown as ``\\xNN``. Valid names are returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_name(text: str) -> str:
    """``text`` on one line for a log: :func:`display_name`, then control characters (a newline in a
    file name would forge a second log line) written as escapes (``\\n``, ``\\x1b``...)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], display_name(text))


# a spreadsheet runs a cell starting with one of these as a formula (OWASP, "CSV Injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with ``= + - @``, tab or
    carriage return gets a leading ``'`` (OWASP's CSV injection guidance); numbers are kept."""
    if isinstance(value, str):
        value = display_name(value)
        if value.startswith(_FORMULA_START):
            return "'" + value
    return value


@dataclass
class InputScan:
    """What :func:`scan_inputs` found: every entry of the given folders is in one of the three.

    Attributes:
        entries: ``(path, None)`` for a file to score, ``(path, reason)`` for an entry that cannot
            be (a dangling symbolic link, a link loop, a link to a folder, a folder that cannot be
            listed...), in input order (folders sorted, depth first).
        skipped: files in folders that are not images (by suffix, and no DICOM marker).
    """

    entries: list[tuple[str, str | None]] = field(default_factory=list)
    skipped: int = 0

    @property
    def files(self) -> list[str]:
        return [p for p, reason in self.entries if reason is None]


def scan_inputs(items: Iterable[str | os.PathLike[str]]) -> InputScan:
    """Files as given, and the supported images under folders (recursive, sorted); nothing found is
    dropped silently.

    Inside folders, files with a DICOM / PNG / JPEG / TIFF suffix are taken, and files with no
    known suffix when they carry the DICOM ``DICM`` marker (PACS exports name files by UID). Links
    to files are followed; links to folders inside a folder are not (one to ``/`` would walk the
    whole disk, one to a parent loops): each is reported with its reason, and a folder given as an
    input is searched even when it is a link. A path given that does not exist is kept, so its
    result says "file not found". Names that are
    not valid UTF-8 are kept as Python gives them (surrogate escapes), so they still open; show
    them with :func:`display_name`.
    """
    scan = InputScan()
    for item in items:
        path = os.fspath(item)
        reason = link_problem(path)
        if reason is None and os.path.isdir(path):
            try:
                st = os.stat(path)
                _walk(path, scan, {(st.st_dev, st.st_ino)})
            except OSError as exc:
                scan.entries.append((path, f"cannot list the folder: {exc.strerror or exc}"))
        else:
            scan.entries.append((path, reason))
    return scan


def collect_inputs(items: Iterable[str | os.PathLike[str]]) -> tuple[list[str], int]:
    """``(files, skipped)`` of :func:`scan_inputs` (its unusable entries are left out: use it to report them)."""
    scan = scan_inputs(items)
    return scan.files, scan.skipped


def _walk(folder: str, scan: InputScan, ancestors: set[tuple[int, int]]) -> None:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = str(Path(folder) / e.name)  # as pathlib writes it ("x.dcm" in ".", not "./x.dcm")
        reason = link_problem(path)
        if reason is not None:
            scan.entries.append((path, reason))
            continue
        try:
            st = e.stat()  # follows links
        except OSError as exc:
            scan.entries.append((path, f"cannot read: {exc.strerror or exc}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                scan.entries.append((path, "symbolic link loop: the link leads to a folder that contains it"))
            elif e.is_symlink():
                scan.entries.append((path, "symbolic link to a folder: not followed (give that folder as an "
                                           "input to search it)"))
            else:
                try:
                    _walk(path, scan, ancestors | {key})
                except OSError as exc:
                    scan.entries.append((path, f"cannot list the folder: {exc.strerror or exc}"))
        elif not stat.S_ISREG(st.st_mode):
            # a named pipe would block the reader for ever; a socket or device is not an image
            if Path(e.name).suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES:
                scan.entries.append((path, "not a regular file (a pipe, socket or device)"))
            else:
                scan.skipped += 1
        elif Path(e.name).suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES or _has_dicm_marker(Path(path)):
            scan.entries.append((path, None))
        else:
            scan.skipped += 1


def _utf8(value: Any) -> Any:
    """Every string in ``value`` through :func:`display_name` (a non-UTF-8 file name must not stop the output)."""
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, dict):
        return {k: _utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_utf8(v) for v in value]
    return value


def summary(results: Sequence[Prediction]) -> dict[str, int]:
    """Counts per status."""
    out = {SCORED: 0, FLAGGED: 0, ERROR: 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def model_card(model: Model) -> dict[str, Any]:
    """The model essentials every report starts with."""
    return {"file": model.path.name, "model_version": model.model_version, "class_names": model.class_names,
            "thresholds": dict(zip(model.class_names, model.thresholds.tolist())),
            "frontal_only": model.frontal_only, "backend": model.backend,
            "verified": model.verified, "signature": dict(model.signature)}


def report(results: Sequence[Prediction], model: Model) -> dict[str, Any]:
    """The JSON document ``raycxr-infer`` writes: the model card essentials, counts and the results."""
    return {"model": model_card(model), "summary": summary(results), "results": [r.to_dict() for r in results]}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None``: JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def dumps(value: Any, **kw: Any) -> str:
    """Strict JSON (``allow_nan=False``) of :func:`json_safe` ``(value)``: always valid JSON."""
    return json.dumps(json_safe(value), allow_nan=False, ensure_ascii=False, **kw)


def write_json(results: Sequence[Prediction], model: Model, path: str | os.PathLike[str] | None) -> str:
    """Write (or, with ``path=None``, return) the JSON report."""
    text = dumps(report(results, model), indent=2)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def write_csv(results: Sequence[Prediction], model: Model, path: str | os.PathLike[str]) -> None:
    """One row per input: input, status, model_version, findings and warnings ("; "-joined), then
    one ``prob:<class>`` column per class (empty when not scored)."""
    with ResultWriter.open(path, model) as w:
        for r in results:
            w.write(r)


OUTPUT_SUFFIXES = (".json", ".jsonl", ".csv")


class ResultWriter:
    """Writes results as they come, so that a run that fails half-way keeps what it scored.

    ``.csv`` and ``.jsonl`` get one flushed line per result. ``.json`` (and standard output) is
    streamed too: the model card and each result as it comes, then ``summary`` at the end; when the
    run stops on an error, :meth:`close` still ends the document, with ``"complete": false`` and the
    error, so the file is valid JSON with every result scored before the failure.

    Args:
        stream: an open text stream.
        kind: ``json``, ``jsonl`` or ``csv``.
        model: the model (its card heads the JSON, its classes are the CSV columns).
    """

    def __init__(self, stream: IO[str], kind: str, model: Model, *, owns: bool = True) -> None:
        self.stream, self.kind, self.model, self.owns = stream, kind, model, owns
        self.counts = {SCORED: 0, FLAGGED: 0, ERROR: 0}
        self.closed = False
        self._first = True
        if kind == "csv":
            self._csv = csv.writer(stream)
            self._csv.writerow(["input", "status", "model_version", "findings", "warnings",
                                *(f"prob:{c}" for c in model.class_names)])
        elif kind == "json":
            stream.write('{\n  "model": ' + dumps(model_card(model)) + ',\n  "results": [')
        elif kind == "jsonl":
            stream.write(dumps({"model": model_card(model)}) + "\n")
        else:
            raise ValueError(f"unknown output kind {kind!r}")
        stream.flush()

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None, model: Model) -> ResultWriter:
        """A writer on ``path`` (kind from its suffix) or, with ``None``, JSON on standard output.

        Opening creates the file now, so a missing folder or a read-only place fails before any scoring."""
        if path is None:
            return cls(sys.stdout, "json", model, owns=False)
        suffix = Path(path).suffix.lower()
        if suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"--out must end in {', '.join(OUTPUT_SUFFIXES)}, got {path}")
        stream = open(path, "w", newline="" if suffix == ".csv" else None, encoding="utf-8")
        return cls(stream, suffix[1:], model)

    def write(self, r: Prediction) -> None:
        self.counts[r.status] = self.counts.get(r.status, 0) + 1
        if self.kind == "csv":
            probs = r.probabilities or {}
            self._csv.writerow([csv_cell(v) for v in (
                r.input, r.status, r.model_version, "; ".join(r.findings),
                "; ".join(r.warnings + ([f"no structured report: {r.sr_error}"] if r.sr_error else [])),
                *(probs.get(c, "") for c in self.model.class_names))])
        elif self.kind == "jsonl":
            self.stream.write(dumps(_utf8(r.to_dict())) + "\n")
        else:
            self.stream.write(("\n    " if self._first else ",\n    ") + dumps(_utf8(r.to_dict())))
            self._first = False
        self.stream.flush()

    def close(self, error: str | None = None) -> None:
        """End the document (``error``: why the run stopped early) and close the file."""
        if self.closed:
            return
        self.closed = True
        try:
            tail: dict[str, Any] = {"summary": self.counts, "complete": error is None}
            if error is not None:
                tail["error"] = display_name(error)
            if self.kind == "json":
                body = ",\n  ".join(f"{dumps(k)}: {dumps(v)}" for k, v in tail.items())
                self.stream.write(("\n  ]" if not self._first else "]") + ",\n  " + body + "\n}\n")
            elif self.kind == "jsonl":
                self.stream.write(dumps(tail) + "\n")
            self.stream.flush()
        finally:
            if self.owns:
                self.stream.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(None if exc is None else f"stopped early: {type(exc).__name__}")
