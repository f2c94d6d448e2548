"""A DICOM node (pynetdicom, optional: ``pip install 'raycxr-runtime[dicom]'``): a storage SCP that
scores what it receives and sends the Structured Report on with C-STORE.

    raycxr-infer dicom-node --model classifier.onnx --port 11112 --ae-title RAYCXR --send-to pacs:104:PACS

- It accepts C-STORE of any storage SOP class (and C-ECHO). A received image is written to a
  private temporary folder and answered *Success* at once; scoring happens on a worker thread, so
  a slow model never stalls the sender's association. When the queue is full (``max_queue``) the
  node answers *Out of resources* (0xA700) and the sender may retry.
- Scoring is the runtime's one inference path (:class:`~raycxr_runtime.inference.Predictor`):
  header scope checks, pixel budget, model. A scored image gets an SR
  (:mod:`raycxr_runtime.sr`) sent to ``--send-to``; a flagged or unreadable one gets none (the log
  says why).
- Logs name received images by a counter, never by UID or patient attribute; pynetdicom's own
  logger is kept at WARNING because its INFO/DEBUG lines describe the data sets.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification

from .inference import Predictor, quiet_pydicom
from .model import Model
from .readers import PixelBudget, read_dicom_header
from .sr import SRError, make_sr

__all__ = ["DicomNode", "Destination", "parse_destination"]

logger = logging.getLogger("raycxr_runtime.dicom_node")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class Destination:
    """Where SRs go: a storage SCP's address and AE title."""

    host: str
    port: int
    ae_title: str


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


class DicomNode:
    """A running storage SCP that scores received images and forwards their SRs.

    Args:
        model: the classifier.
        ae_title: this node's AE title.
        host: address to listen on.
        port: port (0 picks a free one; see ``port``).
        destination: where the SRs are sent.
        force: also score out-of-scope images.
        budget: the pixel budget (default: the readers' process default).
        max_queue: received images waiting to be scored before the node answers "out of resources".
    """

    def __init__(self, model: Model, *, ae_title: str = "RAYCXR", host: str = "127.0.0.1", port: int = 11112,
                 destination: Destination, force: bool = False, budget: PixelBudget | None = None,
                 max_queue: int = 64) -> None:
        quiet_pydicom()
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self.model = model
        self.ae_title = ae_title
        self.destination = destination
        self.predictor = Predictor(model, batch_size=1, force=force, budget=budget)
        self.stats = {"received": 0, "scored": 0, "sr_sent": 0, "sr_failed": 0, "not_scored": 0}
        self._tmp = Path(tempfile.mkdtemp(prefix="raycxr-node-"))  # private (0700)
        self._queue: queue.Queue[tuple[int, Path] | None] = queue.Queue(maxsize=max_queue)
        self._counter = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="raycxr-node-worker", daemon=True)
        self._worker.start()
        self.ae = AE(ae_title=ae_title)
        for cx in StoragePresentationContexts:  # compressed syntaxes too (RLE, JPEG 2000...): the readers decode them
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])

    # -------------------------------------------------------------------------------------- receiving
    def _on_store(self, event: Any) -> int:
        with self._lock:
            self._counter += 1
            n = self._counter
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = self._tmp / f"received-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
        except Exception as exc:  # a data set pydicom cannot write back: tell the sender, log the type only
            logger.warning("image #%d: cannot store the received data set (%s)", n, type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            self._queue.put_nowait((n, path))
        except queue.Full:
            path.unlink(missing_ok=True)
            logger.warning("image #%d: refused, %d images already waiting", n, self._queue.maxsize)
            return OUT_OF_RESOURCES
        self.stats["received"] += 1
        return SUCCESS

    # -------------------------------------------------------------------------------------- scoring
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._process(*item)
            except Exception as exc:  # the node keeps running whatever one image does
                logger.error("image: unexpected failure (%s)", type(exc).__name__)
                logger.debug("traceback", exc_info=True)
            finally:
                if item is not None:
                    item[1].unlink(missing_ok=True)
                self._queue.task_done()

    def _process(self, n: int, path: Path) -> None:
        pred = self.predictor.predict_file(path, name=f"received image #{n}")
        if pred.probabilities is None:
            self.stats["not_scored"] += 1
            logger.info("image #%d: %s, no SR (%s)", n, pred.status, pred.warnings[-1] if pred.warnings else "")
            return
        self.stats["scored"] += 1
        try:
            sr = make_sr(read_dicom_header(path), pred, self.model)
        except SRError as exc:
            logger.warning("image #%d: scored, but no SR: %s", n, exc.reason)
            return
        status = self._send(sr)
        if status == SUCCESS:
            self.stats["sr_sent"] += 1
            logger.info("image #%d: scored, SR sent to %s", n, self.destination.ae_title)
        else:
            self.stats["sr_failed"] += 1
            logger.warning("image #%d: scored, sending the SR to %s failed (%s)", n, self.destination.ae_title,
                           "no association" if status is None else f"status 0x{status:04X}")

    def _send(self, sr: Any) -> int | None:
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ComprehensiveSRStorage, sr.file_meta.TransferSyntaxUID)
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_store(sr)
            return int(status.Status) if status and "Status" in status else None
        finally:
            assoc.release()

    # -------------------------------------------------------------------------------------- life cycle
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every received image is processed (``False`` if ``timeout`` passed first)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def serve_forever(self) -> None:
        """Block until :meth:`close` is called (from another thread) or Ctrl-C."""
        self._stop.wait()

    def close(self) -> None:
        """Stop listening, finish the images already received, remove the temporary folder."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._server.shutdown()
        self._queue.put(None)
        self._worker.join(timeout=60)
        self.predictor.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
