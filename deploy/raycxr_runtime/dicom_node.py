"""A DICOM node (pynetdicom, optional: ``pip install 'raycxr-runtime[dicom]'``): a storage SCP that
scores what it receives and sends the Structured Report on with C-STORE.

    raycxr-infer dicom-node --model classifier.onnx --port 11112 --ae-title RAYCXR --send-to pacs:104:PACS \\
        --spool-dir /var/lib/raycxr/node --allow-ae MODALITY@10.0.0.5

What the node guarantees: an image answered *Success* is on disk. Nothing acknowledged is lost by
a stop, a crash or an unreachable destination.

- **Spool.** A received image is written under ``<spool>/incoming/`` to a temporary name, fsync'd,
  renamed and its folder fsync'd *before* the C-STORE is answered *Success* (files 0600, folders
  0700). When that fails, or ``max_queue`` images wait to be scored, the answer is *Out of
  resources* (0xA700) and the sender keeps the image and may retry.
- **Outbox.** A scored image's SR is written the same way to ``<spool>/outbox/`` with its retry
  state (``.json``: attempts, next attempt, last error). A sender thread delivers it to
  ``--send-to``, with exponential back-off from ``retry_min`` to ``retry_max`` seconds and no
  limit on attempts. The SR and its image are deleted only once the destination acknowledges the SR
  (a success or warning status). An SR is sent again with the same SOP Instance UID if an
  acknowledgement was lost, so a PACS files it once.
- **Restart.** A node starting on a spool resumes it: images without an SR are scored, SRs in the
  outbox are sent. One node per spool (a lock file).
- **Stop** (:meth:`DicomNode.close`; the CLI calls it on SIGTERM and Ctrl-C): refuse new
  associations, answer *Out of resources* to images still arriving, abort what remains open,
  finish the image being scored and the SR being sent, leave the rest in the spool.
- **Not scored.** A flagged or unreadable image (out of scope, pixel budget...) gets no SR and its
  file is deleted (the log says why). An image whose scoring or SR fails unexpectedly is moved to
  ``<spool>/failed/`` for a person to look at; it is not retried.
- **Access.** ``allow`` (``--allow-ae AET`` or ``AET@HOST``) restricts the calling AE titles; the
  called AE title must be the node's own; ``tls`` wraps the listening socket (``--tls-cert``,
  ``--tls-key``; ``--tls-ca`` also requires client certificates signed by it) and ``send_tls``
  the association to the destination. A refused association gets an A-ASSOCIATE-RJ with the
  reason (calling / called AE title not recognised).
- Logs name received images by a counter, never by UID or patient attribute; pynetdicom's own
  logger is kept at WARNING because its INFO/DEBUG lines describe the data sets.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .inference import Predictor, quiet_pydicom
from .model import Model
from .readers import PixelBudget
from .sr import SRError, sr_bytes

try:  # one node per spool; POSIX only (elsewhere the operator keeps it so)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["DicomNode", "Destination", "TLSConfig", "default_spool_dir", "parse_allow", "parse_destination"]

logger = logging.getLogger("raycxr_runtime.dicom_node")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 section 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_STOPPING = (0x02, 0x03, 0x01)  # transient, presentation related, temporary congestion


@dataclass(frozen=True)
class Destination:
    """Where SRs go: a storage SCP's address and AE title."""

    host: str
    port: int
    ae_title: str


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the node (PEM files).

    Args:
        cert: this node's certificate (chain).
        key: its private key.
        ca: certificates that peers are verified against. On the listening side, with ``ca`` a
            client must present a certificate signed by it (mutual TLS); on the sending side it
            verifies the destination (default: the system's trust store).
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        if self.cert is None:
            raise ValueError("TLS on the listening side needs --tls-cert (and --tls-key)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        if self.ca is not None:
            ctx.load_verify_locations(str(self.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx


def parse_destination(text: str) -> Destination:
    """``HOST:PORT:AE_TITLE`` -> :class:`Destination` (``ValueError`` naming what is wrong)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--send-to must be HOST:PORT:AE_TITLE, got {text!r}")
    host, port, aet = parts
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--send-to port must be 1..65535, got {port!r}")
    if len(aet) > 16:
        raise ValueError(f"--send-to AE title must be at most 16 characters, got {aet!r}")
    return Destination(host, int(port), aet)


def parse_allow(entries: Iterable[str]) -> dict[str, set[str] | None]:
    """``["AET", "AET@HOST", ...]`` -> {AE title: allowed hosts, or None for any host}."""
    allow: dict[str, set[str] | None] = {}
    for entry in entries:
        aet, _, host = entry.partition("@")
        aet = aet.strip()
        if not aet or len(aet) > 16 or (_ and not host):
            raise ValueError(f"--allow-ae must be AE_TITLE or AE_TITLE@HOST (title at most 16 characters), "
                             f"got {entry!r}")
        if not host:
            allow[aet] = None
        elif aet not in allow or allow[aet] is not None:
            allow.setdefault(aet, set()).add(host)  # type: ignore[union-attr]
    return allow


def default_spool_dir(ae_title: str) -> Path:
    """``$RAYCXR_STATE_DIR``, else ``$XDG_STATE_HOME/raycxr-runtime``, else ``~/.local/state/raycxr-runtime``;
    then ``dicom-node-<AE title>``. A state folder, not a temporary one: it must survive a restart."""
    base = os.environ.get("RAYCXR_STATE_DIR") or (Path(os.environ.get("XDG_STATE_HOME") or
                                                       Path.home() / ".local" / "state") / "raycxr-runtime")
    return Path(base) / ("dicom-node-" + re.sub(r"[^A-Za-z0-9_-]", "_", ae_title.strip()))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(folder: Path, name: str, data: bytes) -> Path:
    """Write ``folder/name`` so that it is complete on disk or absent: a temporary name, fsync, rename,
    fsync of the folder. Mode 0600."""
    final = folder / name
    tmp = folder / f".tmp-{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


@dataclass
class _Outgoing:
    """One SR in the outbox and its retry state (persisted next to it as JSON)."""

    stem: str
    attempts: int = 0
    next_try: float = 0.0  # time.time()
    last_error: str = ""
    n: int = 0  # the image counter, for the log

    def state(self) -> bytes:
        state = {"attempts": self.attempts, "next_try": self.next_try, "last_error": self.last_error}
        return json.dumps(state).encode()


@dataclass
class _Spool:
    """The node's folders: ``incoming`` (acknowledged images), ``outbox`` (SRs and their state), ``failed``."""

    root: Path
    incoming: Path = field(init=False)
    outbox: Path = field(init=False)
    failed: Path = field(init=False)

    def __post_init__(self) -> None:
        self.incoming, self.outbox, self.failed = (self.root / "incoming", self.root / "outbox",
                                                   self.root / "failed")
        for folder in (self.root, self.incoming, self.outbox, self.failed):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    def remove_partial(self) -> None:
        """Delete half-written files a crash left (never acknowledged); only while holding the lock."""
        for folder in (self.incoming, self.outbox):
            for tmp in folder.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)

    def image(self, stem: str) -> Path:
        return self.incoming / f"{stem}.dcm"

    def sr(self, stem: str) -> Path:
        return self.outbox / f"{stem}.sr.dcm"

    def sr_state(self, stem: str) -> Path:
        return self.outbox / f"{stem}.json"


class DicomNode:
    """A running storage SCP that scores received images and forwards their SRs (see the module docstring
    for what it guarantees).

    Args:
        model: the classifier.
        ae_title: this node's AE title; an association calling another title is refused.
        host: address to listen on.
        port: port (0 picks a free one; see ``port``).
        destination: where the SRs are sent.
        force: also score out-of-scope images.
        budget: the pixel budget (default: the readers' process default).
        max_queue: received images waiting to be scored before the node answers "out of resources".
        spool_dir: the node's state folder (default :func:`default_spool_dir`).
        allow: calling AE titles allowed to associate, each with the hosts it may come from (None: any
            host); see :func:`parse_allow`. None accepts any calling AE title (logged as a warning).
        tls: TLS on the listening socket (None: plain TCP).
        send_tls: TLS to the destination (None: plain TCP).
        retry_min, retry_max: back-off bounds in seconds between attempts to deliver one SR.
    """

    def __init__(self, model: Model, *, ae_title: str = "RAYCXR", host: str = "127.0.0.1", port: int = 11112,
                 destination: Destination, force: bool = False, budget: PixelBudget | None = None,
                 max_queue: int = 64, spool_dir: str | os.PathLike[str] | None = None,
                 allow: dict[str, set[str] | None] | None = None, tls: TLSConfig | None = None,
                 send_tls: TLSConfig | None = None, retry_min: float = 5.0, retry_max: float = 300.0) -> None:
        quiet_pydicom()
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines quote the source image's UIDs
        if retry_min <= 0 or retry_max < retry_min:
            raise ValueError(f"retry bounds must satisfy 0 < min <= max, got {retry_min:g} and {retry_max:g}")
        self.model = model
        self.ae_title = ae_title
        self.destination = destination
        self.allow = allow
        self.retry_min, self.retry_max = retry_min, retry_max
        self.max_queue = max_queue
        self._send_ctx = send_tls.client_context() if send_tls is not None else None
        server_ctx = tls.server_context() if tls is not None else None
        self.stats = {"received": 0, "scored": 0, "sr_sent": 0, "sr_failed": 0, "not_scored": 0}
        self.spool = _Spool(Path(spool_dir) if spool_dir is not None else default_spool_dir(ae_title))
        self._lock_file = self._take_lock()
        self.spool.remove_partial()
        self.predictor = Predictor(model, batch_size=1, force=force, budget=budget, workers=1,
                                   timeout=120.0)  # isolated decode
        self._lock = threading.Lock()
        self._counter = 0
        self._pending = 0  # images in incoming/ not yet scored
        self._in_store = 0  # C-STORE handlers between "accepted" and "answered"
        self._queue: queue.Queue[tuple[int, str]] = queue.Queue()
        self._outbox: dict[str, _Outgoing] = {}
        self._wake_sender = threading.Condition(self._lock)
        self._stopping = threading.Event()  # no new images; workers finish their current item
        self._stop_requested = False  # serve_forever returns; a plain flag, so a signal handler may set it
        self._closed = False
        self._resume()
        self._worker = threading.Thread(target=self._work, name="raycxr-node-worker", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="raycxr-node-sender", daemon=True)
        self._worker.start()
        self._sender.start()
        self.ae = AE(ae_title=ae_title)
        for cx in StoragePresentationContexts:  # compressed syntaxes too (RLE, JPEG 2000...): the readers decode them
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_REQUESTED, self._on_requested)]
        if allow is None:
            logger.warning("any calling AE title may store images on this node (no --allow-ae)")
        try:
            self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers,
                                                ssl_context=server_ctx)
        except BaseException:
            self._halt_workers()
            raise
        self.port = int(self._server.server_address[1])

    def _take_lock(self) -> Any:
        handle = open(self.spool.root / ".lock", "a")  # noqa: SIM115 - held for the node's life
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise OSError(f"spool {self.spool.root} is in use by another DICOM node") from None
        return handle

    def _resume(self) -> None:
        """Queue what a previous run left: images to score, SRs to send."""
        images = sorted(p.name[:-len(".dcm")] for p in self.spool.incoming.glob("*.dcm"))
        srs = {p.name[:-len(".sr.dcm")] for p in self.spool.outbox.glob("*.sr.dcm")}
        for stem in sorted(srs):
            item = _Outgoing(stem)
            try:
                state = json.loads(self.spool.sr_state(stem).read_text())
                item.attempts, item.last_error = int(state["attempts"]), str(state.get("last_error", ""))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no or broken state: start counting again
            self._counter += 1
            item.n = self._counter
            self._outbox[stem] = item  # first attempt at once: a restart is a good moment to retry
        for state in self.spool.outbox.glob("*.json"):  # the state of an SR that was delivered or never written
            if state.name[:-len(".json")] not in srs:
                state.unlink(missing_ok=True)
        to_score = [s for s in images if s not in srs]
        for stem in to_score:
            self._counter += 1
            self._pending += 1
            self._queue.put((self._counter, stem))
        if images or srs:
            logger.info("resuming the spool: %d images to score, %d SRs to send", len(to_score), len(srs))

    # -------------------------------------------------------------------------------------- receiving
    def _on_requested(self, event: Any) -> None:
        """Refuse an association before negotiation: stopping, unknown calling or wrong called AE title."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        host = assoc.requestor.address
        reason = None
        if self._stopping.is_set():
            reason, rsd = "the node is stopping", REJECT_STOPPING
        elif called != self.ae_title:
            reason, rsd = f"called AE title {called!r} is not this node's", REJECT_CALLED_AE
        elif self.allow is not None:
            if calling not in self.allow:
                reason, rsd = f"calling AE title {calling!r} is not in --allow-ae", REJECT_CALLING_AE
            elif self.allow[calling] is not None and host not in self.allow[calling]:  # type: ignore[operator]
                reason, rsd = f"calling AE title {calling!r} is not allowed from this host", REJECT_CALLING_AE
        if reason is not None:
            logger.warning("association from %s refused: %s", host, reason)
            assoc.acse.send_reject(*rsd)
            assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ is out

    def _on_store(self, event: Any) -> int:
        with self._lock:
            if self._stopping.is_set():
                return OUT_OF_RESOURCES
            if self._pending >= self.max_queue:
                logger.warning("image refused: %d images already waiting", self.max_queue)
                return OUT_OF_RESOURCES
            self._counter += 1
            n = self._counter
            self._pending += 1
            self._in_store += 1
        stem = f"{time.time_ns():020d}-{os.getpid()}-{n:06d}"  # names sort in arrival order; no UIDs
        try:
            try:
                durable_write(self.spool.incoming, f"{stem}.dcm", event.encoded_dataset(include_meta=True))
            except Exception as exc:  # disk full, permissions...: not stored, so not acknowledged
                with self._lock:
                    self._pending -= 1
                logger.error("image #%d: cannot store it in the spool (%s), answered out of resources", n,
                             type(exc).__name__)
                return OUT_OF_RESOURCES
            self._queue.put((n, stem))
            self.stats["received"] += 1
            return SUCCESS
        finally:
            with self._lock:
                self._in_store -= 1

    # -------------------------------------------------------------------------------------- scoring
    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                n, stem = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._process(n, stem)
            except Exception as exc:  # the node keeps running whatever one image does; the file is kept
                logger.error("image #%d: unexpected failure (%s), moved to %s", n, type(exc).__name__,
                             self.spool.failed)
                logger.debug("traceback", exc_info=True)
                self._move_failed(stem)
            finally:
                with self._lock:
                    self._pending -= 1
                self._queue.task_done()

    def _process(self, n: int, stem: str) -> None:
        path = self.spool.image(stem)
        pred = self.predictor.predict_file(path, name=f"received image #{n}")
        if pred.probabilities is None:
            self.stats["not_scored"] += 1
            logger.info("image #%d: %s, no SR (%s)", n, pred.status, pred.warnings[-1] if pred.warnings else "")
            self._remove(path)
            return
        self.stats["scored"] += 1
        try:
            sr = sr_bytes(path, pred, self.model)
        except SRError as exc:
            self.stats["sr_failed"] += 1
            logger.warning("image #%d: scored, but no SR: %s", n, exc.reason)
            self._remove(path)
            return
        item = _Outgoing(stem, n=n)
        durable_write(self.spool.outbox, f"{stem}.json", item.state())
        durable_write(self.spool.outbox, f"{stem}.sr.dcm", sr)  # last: its presence means "scored"
        with self._lock:
            self._outbox[stem] = item
            self._wake_sender.notify()

    def _move_failed(self, stem: str) -> None:
        try:
            os.replace(self.spool.image(stem), self.spool.failed / f"{stem}.dcm")
            _fsync_dir(self.spool.failed)
            _fsync_dir(self.spool.incoming)
        except OSError:
            pass

    @staticmethod
    def _remove(*paths: Path) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        for folder in {p.parent for p in paths}:
            _fsync_dir(folder)

    # -------------------------------------------------------------------------------------- sending
    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping.is_set():
                    now = time.time()
                    due = [it for it in self._outbox.values() if it.next_try <= now]
                    if due:
                        break
                    wait = min((it.next_try for it in self._outbox.values()), default=now + 1.0) - now
                    self._wake_sender.wait(timeout=min(max(wait, 0.01), 1.0))
                if self._stopping.is_set():
                    return
            self._deliver(sorted(due, key=lambda it: it.stem))

    def _deliver(self, items: list[_Outgoing]) -> None:
        """Send due SRs on one association; on success delete SR and image, else back off."""
        datasets: list[tuple[_Outgoing, Any]] = []
        for item in items:
            try:
                datasets.append((item, pydicom.dcmread(self.spool.sr(item.stem))))
            except Exception as exc:  # an SR file that cannot be read will not get better: set it aside
                logger.error("image #%d: its SR cannot be read back (%s), moved to %s", item.n, type(exc).__name__,
                             self.spool.failed)
                for path in (self.spool.sr(item.stem), self.spool.image(item.stem)):
                    if path.exists():
                        os.replace(path, self.spool.failed / path.name)
                self._remove(self.spool.sr_state(item.stem))
                with self._lock:
                    self._outbox.pop(item.stem, None)
        if not datasets:
            return
        d = self.destination
        ae = AE(ae_title=self.ae_title)
        for cx in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for _, ds in datasets}:
            ae.add_requested_context(*cx)
        tls_args = (self._send_ctx, d.host) if self._send_ctx is not None else None
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=tls_args)
        except Exception as exc:  # e.g. a TLS handshake failure
            assoc, error = None, type(exc).__name__
        else:
            error = "no association" if not assoc.is_established else ""
        if error:
            for item, _ in datasets:
                self._failed(item, error)
            return
        try:
            for i, (item, ds) in enumerate(datasets):
                if self._stopping.is_set():  # the rest stays in the outbox for the next start
                    break
                try:
                    rsp = assoc.send_c_store(ds)
                    status = int(rsp.Status) if rsp and "Status" in rsp else None
                except Exception as exc:
                    status, error = None, type(exc).__name__
                if status is not None and (status == SUCCESS or status >> 12 == 0xB):  # warnings are stored too
                    self._delivered(item)
                else:
                    self._failed(item, error or ("no response" if status is None else f"status 0x{status:04X}"))
                    if not assoc.is_established:
                        for rest, _ in datasets[i + 1:]:
                            self._failed(rest, "association lost")
                        break
        finally:
            if assoc.is_established:
                assoc.release()

    def _delivered(self, item: _Outgoing) -> None:
        # the image first: a crash in between leaves the SR, which is sent again under the same UID,
        # never an image without its SR, which would be scored again into a second SR
        self._remove(self.spool.image(item.stem))
        self._remove(self.spool.sr_state(item.stem), self.spool.sr(item.stem))
        with self._lock:
            self._outbox.pop(item.stem, None)
        self.stats["sr_sent"] += 1
        logger.info("image #%d: scored, SR sent to %s%s", item.n, self.destination.ae_title,
                    f" after {item.attempts + 1} attempts" if item.attempts else "")

    def _failed(self, item: _Outgoing, error: str) -> None:
        item.attempts += 1
        delay = min(self.retry_max, self.retry_min * 2 ** min(item.attempts - 1, 30))
        item.next_try, item.last_error = time.time() + delay, error
        try:
            durable_write(self.spool.outbox, f"{item.stem}.json", item.state())
        except OSError:
            pass  # the SR itself is safe; only the attempt count would restart
        self.stats["sr_failed"] += 1
        logger.warning("image #%d: sending the SR to %s failed (%s), attempt %d; next in %.3g s, kept in %s", item.n,
                       self.destination.ae_title, error, item.attempts, delay, self.spool.outbox)

    # -------------------------------------------------------------------------------------- life cycle
    def outbox_size(self) -> int:
        """SRs waiting for the destination's acknowledgement."""
        with self._lock:
            return len(self._outbox)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every received image is scored and every SR acknowledged (``False`` if ``timeout``
        passed first; an unreachable destination keeps the node busy)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._pending == 0 and not self._outbox:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return (safe in a signal handler: it only sets a flag)."""
        self._stop_requested = True

    def serve_forever(self) -> None:
        """Block until :meth:`request_stop` or :meth:`close` is called (another thread, a signal) or Ctrl-C."""
        while not self._stop_requested:
            time.sleep(0.2)

    def close(self, grace: float = 5.0) -> None:
        """Stop gracefully: refuse new associations and images, abort open associations, finish the image
        being scored and the SR being sent; everything else stays in the spool for the next start."""
        if self._closed:
            return
        self._closed = True
        self._stop_requested = True
        with self._lock:
            self._stopping.set()
            self._wake_sender.notify_all()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:  # let a C-STORE being written finish and be answered
            with self._lock:
                if self._in_store == 0:
                    break
            time.sleep(0.02)
        for assoc in list(self._server.active_associations):
            assoc.abort()
        self._server.shutdown()
        self._halt_workers()
        with self._lock:
            left, queued = len(self._outbox), self._pending
        if left or queued:
            logger.info("stopped: %d images to score and %d SRs to send stay in %s for the next start", queued, left,
                        self.spool.root)

    def _halt_workers(self) -> None:
        self._stopping.set()
        with self._lock:
            self._wake_sender.notify_all()
        self._worker.join(timeout=120)
        self._sender.join(timeout=120)
        self.predictor.close()
        self._lock_file.close()
