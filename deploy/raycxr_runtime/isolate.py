"""Run a function on files in worker processes that may die, without losing the run or hanging.

A decoder can fail in ways no ``except Exception`` catches: pylibjpeg-rle's Rust code raises a
pyo3 ``PanicException`` (a ``BaseException``), a C decoder can segfault, a decompression bomb can
be killed by the kernel's OOM killer. ``multiprocessing.Pool`` then waits forever for the result
of the task the dead worker held. :class:`IsolatedPool` instead knows which item each worker holds:

- the worker wraps the call in ``except BaseException``, so a panic comes back as a failure of
  that item ("PanicException: ...") and the worker lives on;
- a worker that dies (``os._exit``, a signal, the OOM killer) is noticed through its process
  sentinel; its item fails with "worker process died (exit code N)" and a fresh worker replaces it;
- an item that runs past ``timeout`` seconds has its worker killed and fails with "timed out".

:meth:`IsolatedPool.call` is thread-safe and blocks until a worker is free, so the pool also
bounds how many decodes run at once (the HTTP service relies on that).

A worker keeps its warnings and log records to itself (pydicom's warnings quote header values,
which may be patient identifiers); what matters comes back in the :class:`Outcome`. Workers start
with one BLAS thread, so their address space (``RLIMIT_AS``) does not grow with the core count.

:func:`decode_isolated` is the one isolated image decode for the CLI, the HTTP service and the
DICOM node: a file or the bytes of an upload in, the model-ready array out, decoded in a worker
under a memory limit derived from the pixel budget (:func:`worker_memory_limit`). The pool itself is
standard library only; the decode target imports the readers in the worker.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["IsolatedPool", "Outcome", "decode_isolated", "default_context", "worker_memory_limit"]

# Address space a decode worker needs besides the image: the interpreter, numpy, pydicom and the
# codec libraries (about 0.5 GiB measured), with room to spare.
_WORKER_BASE_MEMORY = 1 << 30
# The display pipeline holds a few float64 copies of the image (modality LUT, window, clip): the
# decoded-bytes budget times this covers a 16-bit image at the budget's edge.
_WORKER_MEMORY_PER_BUDGET_BYTE = 8
_ENV_LOCK = threading.Lock()
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Outcome:
    """The result of one call: ``ok`` with ``value``, or not ``ok`` with ``error`` (a readable reason)."""

    ok: bool
    value: Any = None
    error: str = ""


def default_context() -> str:
    """``spawn``: workers start clean (no copy of the parent's threads or onnxruntime session)."""
    return "spawn"


def _worker_main(conn: Connection, target: str, memory_limit: int | None) -> None:
    # Limits first, then the imports the target needs, so the limit covers everything the worker does.
    if memory_limit and os.name == "posix":  # RLIMIT_AS is POSIX-only
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = int(memory_limit) if hard == resource.RLIM_INFINITY else min(int(memory_limit), hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # never above an inherited hard limit
    # Nothing a worker warns or logs reaches the parent's stderr: a library's warning can quote a header value.
    logging.getLogger().addHandler(logging.NullHandler())
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        if args is None:
            return
        try:
            with warnings.catch_warnings(record=True):  # recorded, then dropped with the context
                warnings.simplefilter("always")
                out: tuple[bool, Any, str] = (True, fn(*args), "")
        except MemoryError:
            out = (False, None, "not enough memory (the worker's memory limit was reached)")
        except BaseException as exc:  # noqa: BLE001 (PanicException is a BaseException; that is the point)
            detail = " ".join(str(exc).split())[:500]
            out = (False, None, f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)
        try:
            conn.send(out)
        except (OSError, ValueError, TypeError) as exc:  # an unpicklable value is the function's bug, not the file's
            conn.send((False, None, f"result could not be sent back: {type(exc).__name__}"))


class _Worker:
    def __init__(self, ctx: Any, target: str, memory_limit: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, target, memory_limit), daemon=True)
        with _ENV_LOCK:  # the child's environment is the parent's at start: one BLAS thread for it only
            saved = {k: os.environ.get(k) for k in _ONE_THREAD}
            os.environ.update({k: v for k, v in _ONE_THREAD.items() if saved[k] is None})
            try:
                self.process.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
        child.close()

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class IsolatedPool:
    """``workers`` processes running ``target`` (``"package.module:function"``) on argument tuples.

    Args:
        target: the function to run, as ``"module:name"`` (imported in the worker, after limits are set).
        workers: number of worker processes, that is, the most calls that run at once.
        timeout: seconds one call may take before its worker is killed (``None``: no limit).
        memory_limit: address-space limit per worker in bytes (``RLIMIT_AS``; ``None``: none).
        context: multiprocessing start method (default ``spawn``; ``fork`` starts faster and lets a
            test patch the target in the parent).
    """

    def __init__(self, target: str, *, workers: int = 2, timeout: float | None = None,
                 memory_limit: int | None = None, context: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if ":" not in target:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        self.target = target
        self.workers = int(workers)
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._ctx = mp.get_context(context or default_context())
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(self.workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        w = _Worker(self._ctx, self.target, self.memory_limit)
        with self._lock:
            self._all.append(w)
        return w

    def _replace(self, w: _Worker, kill: bool) -> None:
        w.stop(kill=kill)
        with self._lock:
            if w in self._all:
                self._all.remove(w)
        if not self._closed:
            self._idle.put(self._start())

    def call(self, *args: Any) -> Outcome:
        """Run the target on ``args`` in a free worker (waits for one); never raises for the call's own failure."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        w = self._idle.get()
        try:
            w.conn.send(args)
        except OSError:  # the worker died while idle
            self._replace(w, kill=True)
            return self.call(*args)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([w.conn, w.process.sentinel], timeout=left)
            if w.conn in ready:
                try:
                    ok, value, error = w.conn.recv()
                except (EOFError, OSError):
                    ready = [w.process.sentinel]  # died while answering
                else:
                    self._idle.put(w)
                    return Outcome(ok, value, error)
            if w.process.sentinel in ready:
                w.process.join(timeout=5)
                code = w.process.exitcode
                self._replace(w, kill=True)
                how = f"killed by signal {-code} ({_signal_name(-code)})" if code is not None and code < 0 \
                    else f"exit code {code}"
                return Outcome(False, None, f"worker process died ({how})")
            if deadline is not None and time.monotonic() >= deadline:
                self._replace(w, kill=True)
                return Outcome(False, None, f"timed out after {self.timeout:g} s")

    def imap(self, items: Iterable[tuple[Any, ...]]) -> Iterator[Outcome]:
        """:meth:`call` on every argument tuple, results in input order, ``workers`` at a time."""
        it = iter(items)
        with ThreadPoolExecutor(self.workers) as ex:
            pending: list[Any] = []
            for args in it:
                pending.append(ex.submit(self.call, *args))
                if len(pending) >= 2 * self.workers:  # bounded read-ahead
                    yield pending.pop(0).result()
            for f in pending:
                yield f.result()

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), []
        for w in workers:
            w.stop()

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover (best effort at interpreter exit)
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


# ----------------------------------------------------------------------------------- the isolated decode


def worker_memory_limit(budget: Any = None) -> int:
    """The address-space limit of a decode worker for ``budget`` (a :class:`~raycxr_runtime.readers.PixelBudget`;
    default: the readers' process default): 1 GiB plus 8 x the decoded-bytes budget (3 GiB by default)."""
    if budget is None:
        from .readers import get_pixel_budget

        budget = get_pixel_budget()
    return _WORKER_BASE_MEMORY + _WORKER_MEMORY_PER_BUDGET_BYTE * int(budget.max_bytes)


def _decode_target(source: str | bytes, budget: Any, size: int | None) -> tuple[Any, list[str], str | None]:
    """Worker side of :func:`decode_isolated`: ``(image, notes, None)``, or ``(None, [], reason)`` for a bad file."""
    from .readers import ImageReadError

    try:
        return (*_decode_here(source, budget, size), None)
    except ImageReadError as exc:
        return None, [], exc.reason


def _decode_here(source: str | bytes, budget: Any, size: int | None) -> tuple[Any, list[str]]:
    from .readers import read_image, resize

    notes: list[str] = []
    if isinstance(source, bytes):  # an upload: the readers take paths (and sniff the format)
        fd, name = tempfile.mkstemp(prefix="raycxr-decode-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            image = read_image(name, budget=budget, notes=notes)
        finally:
            os.unlink(name)
    else:
        image = read_image(source, budget=budget, notes=notes)
    return (resize(image, size) if size else image), notes


_pools: dict[tuple[Any, ...], IsolatedPool] = {}
_pools_lock = threading.Lock()


def decode_isolated(source: str | os.PathLike[str] | bytes, budget: Any = None, *, size: int | None = None,
                    notes: list[str] | None = None, timeout: float | None = 120.0, memory_limit: int | None = None,
                    workers: int = 2) -> Any:
    """Decode one image (a path, or an upload's bytes) in an isolated worker process; the caller's process
    never parses its pixel data.

    Returns the float32 ``(H, W)`` array in [0, 1] (resized to ``size`` x ``size`` when given) and appends
    degenerate-image notes to ``notes``. Raises :class:`~raycxr_runtime.readers.ImageReadError` for a bad
    file and for a worker that dies (signal, memory limit) or hangs past ``timeout``, with a one-line
    reason. ``memory_limit`` default: :func:`worker_memory_limit` ``(budget)``. Workers are shared, per
    (budget, limits), by every caller in the process, at most ``workers`` decodes at once."""
    from .readers import ImageReadError

    limit = worker_memory_limit(budget) if memory_limit is None else (memory_limit or None)
    key = (budget, timeout, limit, workers)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = IsolatedPool(f"{__name__}:_decode_target", workers=workers, timeout=timeout,
                                              memory_limit=limit)
    label = "uploaded image" if isinstance(source, bytes) else str(source)
    out = pool.call(source if isinstance(source, bytes) else str(source), budget, size)
    if not out.ok:  # the worker died, hung, ran out of memory or raised something else
        raise ImageReadError(label, f"reading the image failed: {out.error}")
    image, found, reason = out.value
    if reason is not None:
        raise ImageReadError(label, reason)
    if notes is not None:
        notes.extend(found)
    return image


@atexit.register
def _close_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()
