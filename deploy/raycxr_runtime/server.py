"""The HTTP inference service: a Starlette (ASGI) application served by uvicorn (h11), torch-free.

Endpoints (all answers are JSON, except a structured report on request):

- ``GET /health`` (and ``HEAD``): ``{"status": "ok", "model_version": ...}``;
- ``GET /model`` (and ``HEAD``): the model card from the ONNX metadata (classes, thresholds, preprocessing...);
- ``POST /predict``: the body is one image file, ``Content-Type`` ``application/dicom``,
  ``image/png``, ``image/jpeg`` or ``application/octet-stream`` (format sniffed). The caller may
  name it with an ``X-Request-Id`` header or ``?name=``; the name is echoed back as ``input`` (and
  the header as ``X-Request-Id``, percent-encoded where it is not ASCII). The answer is the
  per-image result of :class:`raycxr_runtime.inference.Predictor` (``status`` scored / flagged /
  error). ``?format=sr`` answers a scored DICOM with its DICOM Structured Report
  (``application/dicom``, :mod:`raycxr_runtime.sr`).

Status codes: 200 scored or flagged; 400 empty or malformed body or request; 404 unknown path; 405
wrong method (with ``Allow``); 408 the body stalled longer than ``body_timeout``; 411 no
``Content-Length``; 413 body over ``max_bytes`` (default 32 MiB); 415 unsupported content type;
422 a file that is not a readable image (the reason says why), or no SR could be made; 503 too
many uploads in flight; 500 an unexpected failure (logged by exception type only).

Why uvicorn + Starlette and not ``http.server``: h11 parses requests strictly and answers a
malformed or leftover request with a fixed 400 that quotes nothing (the standard library logged
and echoed the bytes, which can hold a patient ID); uvicorn bounds header sizes and concurrent
connections. What uvicorn lacks is added here: a timeout for a request's headers (a connection
that sends half a request is closed after ``header_timeout``), and one for a stalled body (408).

Resource limits: at most ``max_inflight`` bodies are held at once (each at most ``max_bytes``);
images are decoded in ``decode_workers`` isolated processes (so at most that many decodes run at
once, each under the readers' pixel budget, and a decoder crash fails one request, not the
service). Privacy: uploads go to a private temporary folder (0700) removed after scoring; logs
carry method, path, status and the caller's request name, never header values or body bytes.
Run it behind the hospital's TLS-terminating reverse proxy; it has no authentication of its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import __version__
from .inference import ERROR, Predictor, dumps, quiet_pydicom
from .model import Model
from .readers import PixelBudget

__all__ = ["DEFAULT_MAX_BYTES", "InferenceApp", "InferenceServer", "make_server"]

logger = logging.getLogger("raycxr_runtime.server")

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# media type -> temporary file suffix (the readers dispatch on it; "" = sniff the content)
CONTENT_TYPES = {"application/dicom": ".dcm", "image/png": ".png", "image/jpeg": ".jpg",
                 "application/octet-stream": ""}
ROUTES = {"/health": ("GET", "HEAD"), "/model": ("GET", "HEAD"), "/predict": ("POST",)}
_DRAIN_LIMIT = 64 * 1024 * 1024  # read and drop an unwanted body up to this, so the client sees our answer
_NAME_MAX = 200
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


class InferenceApp:
    """The ASGI application (usable with any ASGI server; :func:`make_server` runs it on uvicorn).

    Args:
        model: the classifier.
        max_bytes: largest request body accepted (larger: 413).
        force: also score out-of-scope images.
        decode_workers: isolated reader processes (0: read in the server process, one at a time).
        max_inflight: most uploads held at once; more wait up to ``queue_timeout`` then get 503.
        body_timeout: seconds a body may stall between two chunks (then 408).
        queue_timeout: seconds an upload may wait for a free slot.
        budget: the pixel budget (default: the readers' process default).
        memory_limit: address-space limit of each decode worker, bytes.
    """

    def __init__(self, model: Model, *, max_bytes: int = DEFAULT_MAX_BYTES, force: bool = False,
                 decode_workers: int = 2, max_inflight: int = 4, body_timeout: float = 30.0,
                 queue_timeout: float = 30.0, budget: PixelBudget | None = None,
                 memory_limit: int | None = None) -> None:
        quiet_pydicom()
        self.model = model
        self.max_bytes = int(max_bytes)
        self.body_timeout = float(body_timeout)
        self.queue_timeout = float(queue_timeout)
        self.predictor = Predictor(model, batch_size=1, force=force, budget=budget, workers=decode_workers,
                                   timeout=120.0 if decode_workers else None, memory_limit=memory_limit)
        # serial decodes in-process; the pool bounds them otherwise
        self._decode_lock = threading.Semaphore(1) if decode_workers == 0 else None
        self.max_inflight = int(max_inflight)
        self._inflight: asyncio.Semaphore | None = None

    def close(self) -> None:
        self.predictor.close()

    # ------------------------------------------------------------------------------------------- ASGI
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # nothing to set up; answer so servers with lifespan=on are happy
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        state: dict[str, Any] = {"name": "", "status": 500}
        try:
            response = await self._dispatch(request, state)
        except ClientDisconnect:
            logger.info("%s %s: client went away before the request was complete", request.method, scope["path"])
            return
        except Exception as exc:  # never a stack trace to the client; exception type only in the log (PHI)
            logger.error("internal error on %s %s (%s): %s", request.method, scope["path"], state["name"] or "-",
                         type(exc).__name__)
            logger.debug("traceback", exc_info=True)
            response = self._json(500, {"error": "internal error"}, state, close=True)
        if response is None:
            return
        state["status"] = response.status_code
        logger.info("%s %s -> %s%s", request.method, scope["path"], response.status_code,
                    f" ({state['name']})" if state["name"] else "")
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, state: dict[str, Any]) -> Response | None:
        path = request.url.path.rstrip("/") or "/"
        state["name"] = self._name(request)
        method = request.method
        if path not in ROUTES:
            await self._drain(request)
            endpoints = ", ".join(f"{m[0]} {p}" for p, m in ROUTES.items())
            return self._json(404, {"error": f"unknown path {path[:100]!r}; endpoints: {endpoints}"}, state)
        if method not in ROUTES[path]:
            await self._drain(request)
            return self._json(405, {"error": f"{method[:16]} is not allowed on {path}; use {ROUTES[path][0]}"}, state,
                              headers={"Allow": ", ".join(ROUTES[path])})
        if path == "/health":
            m = self.model
            return self._json(200, {"status": "ok", "model_version": m.model_version, "model": m.path.name,
                                    "runtime_version": __version__, "backend": m.backend}, state, head=method == "HEAD")
        if path == "/model":
            return self._json(200, self.model.info(), state, head=method == "HEAD")
        return await self._predict(request, state)

    # ------------------------------------------------------------------------------------ POST /predict
    async def _predict(self, request: Request, state: dict[str, Any]) -> Response | None:
        headers = request.headers
        if "chunked" in (headers.get("transfer-encoding") or "").lower():
            return self._json(411, {"error": "chunked uploads are not supported; send the file with a "
                                             "Content-Length"}, state, close=True)
        raw_length = headers.get("content-length")
        if raw_length is None:
            return self._json(411, {"error": "Content-Length is required"}, state, close=True)
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            return self._json(400, {"error": f"invalid Content-Length {raw_length[:32]!r}"}, state, close=True)
        if length > self.max_bytes:
            await self._drain(request, length)
            return self._json(413, {"error": f"request body of {length} bytes exceeds the limit of "
                                             f"{self.max_bytes} bytes"}, state, close=True)
        media = (headers.get("content-type") or "application/octet-stream").split(";")[0].strip().lower()
        if media not in CONTENT_TYPES:
            await self._drain(request, length)
            return self._json(415, {"error": f"unsupported Content-Type {media[:64]!r}; send one of "
                                             + ", ".join(CONTENT_TYPES)}, state)
        fmt = (request.query_params.get("format") or "json").lower()
        if fmt not in ("json", "sr"):
            await self._drain(request, length)
            return self._json(400, {"error": f"unknown format {fmt[:16]!r}; use json or sr"}, state)
        if length == 0:
            return self._json(400, {"error": "empty request body: send one DICOM, PNG or JPEG file"}, state)

        if self._inflight is None:
            self._inflight = asyncio.Semaphore(self.max_inflight)
        try:
            await asyncio.wait_for(self._inflight.acquire(), self.queue_timeout)
        except asyncio.TimeoutError:
            return self._json(503, {"error": "too many uploads in progress; try again shortly"}, state, close=True,
                              headers={"Retry-After": "5"})
        try:
            body = await self._read_body(request, length)
            if isinstance(body, Response):
                state_response = body
                state_response.headers.update(self._base_headers(state))
                return state_response
            name = state["name"] or "upload"
            return await run_in_threadpool(self._score, body, media, name, fmt, state)
        finally:
            self._inflight.release()

    async def _read_body(self, request: Request, length: int) -> bytes | Response:
        chunks: list[bytes] = []
        got = 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), self.body_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                return _plain_json(408, {"error": f"request body stalled: no data for {self.body_timeout:g} s "
                                                  f"after {got} of {length} bytes"}, close=True)
            got += len(chunk)
            if got > length:  # cannot happen with h11 (it frames by Content-Length); be safe
                return _plain_json(400, {"error": "body longer than Content-Length"}, close=True)
            chunks.append(chunk)
        if got < length:
            return _plain_json(400, {"error": f"body ended after {got} of {length} bytes"}, close=True)
        return b"".join(chunks)

    def _score(self, body: bytes, media: str, name: str, fmt: str, state: dict[str, Any]) -> Response:
        with tempfile.TemporaryDirectory(prefix="raycxr-") as tmp:  # private (0700) folder, removed after
            path = Path(tmp) / f"upload{CONTENT_TYPES[media]}"
            path.write_bytes(body)
            del body
            if self._decode_lock is not None:
                with self._decode_lock:
                    pred = self.predictor.predict_file(path, name=name)
            else:
                pred = self.predictor.predict_file(path, name=name)
            # a reader's reason may quote the file it read: never show the server's temporary path
            pred.warnings = [w.replace(str(path), name).replace(tmp, "") for w in pred.warnings]
            result = pred.to_dict()
            if result["status"] == ERROR:
                reason = result["warnings"][-1] if result["warnings"] else "unreadable image"
                return self._json(422, {"error": f"not a readable image: {reason}", **result}, state)
            if fmt == "sr":
                return self._sr_response(path, pred, result, state)
        return self._json(200, result, state)

    def _sr_response(self, path: Path, pred: Any, result: dict[str, Any], state: dict[str, Any]) -> Response:
        if pred.probabilities is None:
            return self._json(422, {"error": f"no structured report: the image was not scored ({pred.status})",
                                    **result}, state)
        try:
            from .sr import SRError, sr_bytes
        except ImportError:
            return self._json(422, {"error": "no structured report: this runtime lacks highdicom "
                                             "(pip install 'raycxr-runtime[sr]')", **result}, state)
        try:
            data = sr_bytes(path, pred, self.model)
        except SRError as exc:
            return self._json(422, {"error": f"no structured report: {exc.reason}", **result}, state)
        return Response(data, status_code=200, media_type="application/dicom", headers=self._base_headers(state))

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _name(request: Request) -> str:
        """The caller's name for the request (X-Request-Id, else ?name=), printable and bounded."""
        raw = request.headers.get("x-request-id")
        if raw is not None:
            try:  # headers arrive as latin-1; a UTF-8 client name reads back as what was meant
                raw = raw.encode("latin-1").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                pass
        else:
            raw = request.query_params.get("name") or ""
        return re.sub(r"[\x00-\x1f\x7f]", "", raw)[:_NAME_MAX]

    async def _drain(self, request: Request, length: int | None = None) -> None:
        """Read and drop an unwanted body (bounded, with the body timeout) so the client can read our answer."""
        if length is None:
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                return
        if length <= 0 or length > _DRAIN_LIMIT:
            return
        stream = request.stream().__aiter__()
        try:
            while True:
                await asyncio.wait_for(stream.__anext__(), self.body_timeout)
        except (StopAsyncIteration, asyncio.TimeoutError, ClientDisconnect):
            return

    @staticmethod
    def _base_headers(state: dict[str, Any]) -> dict[str, str]:
        out = {"Cache-Control": "no-store"}
        name = state.get("name") or ""
        if name:
            # response headers are latin-1 on the wire: a non-ASCII name goes back percent-encoded (RFC 3986)
            out["X-Request-Id"] = name if _PRINTABLE_ASCII.match(name) else quote(name, safe="")
        return out

    def _json(self, status: int, payload: dict[str, Any], state: dict[str, Any], *, close: bool = False,
              head: bool = False, headers: dict[str, str] | None = None) -> Response:
        r = _plain_json(status, payload, close=close, head=head)
        r.headers.update({**self._base_headers(state), **(headers or {})})
        return r


def _plain_json(status: int, payload: dict[str, Any], *, close: bool = False, head: bool = False) -> Response:
    data = dumps(payload).encode("utf-8")
    r = Response(b"" if head else data, status_code=status, media_type="application/json")
    if head:
        r.headers["content-length"] = str(len(data))
    if close:
        r.headers["Connection"] = "close"
    return r


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's headers (uvicorn has none: a client that
    connects and sends half a request line would hold the connection for ever). Expiry closes quietly."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # still waiting for the rest of the headers
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # its keep-alive timer covers the idle time until the next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expire(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing() and \
                (self.cycle is None or self.cycle.response_complete):
            logger.debug("closing a connection that sent no complete request within %g s", self.header_timeout)
            self.transport.close()


class InferenceServer:
    """uvicorn serving an :class:`InferenceApp` on a socket bound at construction (``server_address``
    gives the port); :meth:`serve_forever` blocks until :meth:`shutdown` (from another thread) or Ctrl-C.

    Args:
        app: the application.
        host: address to bind.
        port: port (0 picks a free one).
        limit_concurrency: most connections at once; more get uvicorn's 503.
        header_timeout: seconds a connection may take to send a request's headers.
        keep_alive: seconds an idle keep-alive connection is kept.
    """

    def __init__(self, app: InferenceApp, *, host: str = "127.0.0.1", port: int = 8080, limit_concurrency: int = 64,
                 header_timeout: float = 10.0, keep_alive: float = 5.0) -> None:
        import uvicorn

        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(128)
        self.server_address = self.socket.getsockname()[:2]
        protocol = type("Protocol", (_Protocol,), {"header_timeout": float(header_timeout)})
        config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", log_config=None, access_log=False,
                                limit_concurrency=limit_concurrency, timeout_keep_alive=int(max(1, keep_alive)),
                                h11_max_incomplete_event_size=16 * 1024, server_header=False, date_header=True,
                                headers=[("server", f"raycxr-runtime/{__version__}")])
        self._uvicorn = uvicorn.Server(config)

    def serve_forever(self) -> None:
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True

    def server_close(self) -> None:
        self.app.close()
        try:
            self.socket.close()
        except OSError:
            pass


def make_server(model: Model, *, host: str = "127.0.0.1", port: int = 8080, max_bytes: int = DEFAULT_MAX_BYTES,
                force: bool = False, decode_workers: int = 2, max_inflight: int = 4, body_timeout: float = 30.0,
                queue_timeout: float = 30.0, header_timeout: float = 10.0, limit_concurrency: int = 64,
                budget: PixelBudget | None = None, memory_limit: int | None = None) -> InferenceServer:
    """Bind (``port=0`` picks a free port) and return the server; call ``serve_forever()`` on it.

    The keyword arguments are those of :class:`InferenceApp` and :class:`InferenceServer`."""
    app = InferenceApp(model, max_bytes=max_bytes, force=force, decode_workers=decode_workers,
                       max_inflight=max_inflight, body_timeout=body_timeout, queue_timeout=queue_timeout,
                       budget=budget, memory_limit=memory_limit)
    try:
        return InferenceServer(app, host=host, port=port, limit_concurrency=limit_concurrency,
                               header_timeout=header_timeout)
    except BaseException:
        app.close()
        raise
