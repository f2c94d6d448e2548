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

Status codes: 200 scored or flagged; 400 empty or malformed body or request; 401 no or a wrong
bearer token (when one is set; ``/health`` needs none); 404 unknown path; 405 wrong method (with
``Allow``); 408 the body stalled longer than ``body_timeout``, came slower than ``min_rate``
after ``rate_grace``, or was not complete within ``body_deadline``; 411 no ``Content-Length``;
413 body over ``max_bytes`` (default 32 MiB); 415 unsupported content type; 422 a file that is not
a readable image (the reason says why), or no SR could be made; 429 this client already has
``per_client_uploads`` uploads in progress; 503 too many uploads in flight; 500 an unexpected
failure (logged by exception type only).

Why uvicorn + Starlette and not ``http.server``: h11 parses requests strictly and answers a
malformed or leftover request with a fixed 400 that quotes nothing (the standard library logged
and echoed the bytes, which can hold a patient ID); uvicorn bounds header sizes and concurrent
connections. What uvicorn lacks is added here: a deadline for a request's headers (a connection
that sends half a request is closed after ``header_timeout``), deadlines for a body (408), and a
connection cap that never refuses ``/health``: over ``max_connections``, the connection that has
waited longest without a request in progress is closed to make room (slow-header clients, idle
keep-alives), instead of answering 503 to everyone as uvicorn's ``limit_concurrency`` does.

Resource limits: at most ``max_inflight`` bodies are held at once (each at most ``max_bytes``),
at most ``per_client_uploads`` of them per client address;
images are decoded in ``decode_workers`` isolated processes (so at most that many decodes run at
once, each under the readers' pixel budget, and a decoder crash fails one request, not the
service). Privacy: uploads go to a private temporary folder (0700) removed after scoring; logs
carry method, path, status and the caller's request name, never header values or body bytes.
Access: an optional shared bearer token (``Authorization: Bearer <token>``, compared in constant
time); there is no TLS, so run it behind the hospital's TLS-terminating reverse proxy.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
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

__all__ = ["DEFAULT_MAX_BYTES", "TOKEN_ENV", "InferenceApp", "InferenceServer", "load_token", "make_server"]

logger = logging.getLogger("raycxr_runtime.server")

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# media type -> temporary file suffix (the readers dispatch on it; "" = sniff the content)
CONTENT_TYPES = {"application/dicom": ".dcm", "image/png": ".png", "image/jpeg": ".jpg",
                 "application/octet-stream": ""}
ROUTES = {"/health": ("GET", "HEAD"), "/model": ("GET", "HEAD"), "/predict": ("POST",)}
_DRAIN_LIMIT = 64 * 1024 * 1024  # read and drop an unwanted body up to this, so the client sees our answer
_NAME_MAX = 200
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")
_AUTH_DRAIN_LIMIT = 64 * 1024  # an unauthenticated body is read and dropped only up to this; larger: closed
TOKEN_ENV = "RAYCXR_INFER_TOKEN"
_TOKEN_MIN = 16
_REALM = 'Bearer realm="raycxr-infer"'


def load_token(path: str | os.PathLike[str] | None = None) -> str | None:
    """The bearer token: the first line of ``path``, else the ``RAYCXR_INFER_TOKEN`` environment
    variable, else ``None`` (no authentication). Raises ``ValueError`` (with a reason that never
    quotes the token) when it is empty, shorter than 16 characters or not printable ASCII."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise ValueError(f"token file {path}: {exc.strerror or exc}") from None
        where = f"token file {path}"
        token = (text.splitlines() or [""])[0].strip()
    elif os.environ.get(TOKEN_ENV) is not None:
        where, token = f"${TOKEN_ENV}", os.environ[TOKEN_ENV].strip()
    else:
        return None
    if len(token) < _TOKEN_MIN or not _PRINTABLE_ASCII.match(token) or " " in token:
        raise ValueError(f"{where}: the token must be at least {_TOKEN_MIN} printable ASCII characters without "
                         "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


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
        body_deadline: seconds a whole body may take, however steadily it comes (then 408).
        min_rate: bytes per second a body must average once ``rate_grace`` has passed (0: no
            minimum); a client dripping bytes is cut instead of holding an upload slot.
        rate_grace: seconds a body is given before the minimum rate applies (mod_reqtimeout's
            ``body=grace,MinRate=rate``: the allowance grows by one second per ``min_rate`` bytes).
        per_client_uploads: most uploads (held or queued) per client address; more get 429 at once
            (default: half of ``max_inflight``, at least 1).
        token: the bearer token every request but ``/health`` must carry (``None``: no authentication).
    """

    def __init__(self, model: Model, *, max_bytes: int = DEFAULT_MAX_BYTES, force: bool = False,
                 decode_workers: int = 2, max_inflight: int = 4, body_timeout: float = 30.0,
                 queue_timeout: float = 30.0, budget: PixelBudget | None = None,
                 memory_limit: int | None = None, body_deadline: float = 300.0, min_rate: float = 32 * 1024,
                 rate_grace: float = 5.0, per_client_uploads: int | None = None, token: str | None = None) -> None:
        quiet_pydicom()
        self.model = model
        self.max_bytes = int(max_bytes)
        self.body_timeout = float(body_timeout)
        self.queue_timeout = float(queue_timeout)
        self.body_deadline = float(body_deadline)
        self.min_rate = float(min_rate)
        self.rate_grace = float(rate_grace)
        if self.body_deadline <= 0 or self.min_rate < 0 or self.rate_grace < 0 or self.body_timeout <= 0:
            raise ValueError("body_deadline and body_timeout must be positive, min_rate and rate_grace at least 0")
        self.per_client_uploads = int(per_client_uploads) if per_client_uploads is not None else \
            max(1, int(max_inflight) // 2)
        if self.per_client_uploads < 1:
            raise ValueError(f"per_client_uploads must be at least 1, got {per_client_uploads}")
        self._token = token.encode("ascii") if token else None
        self._uploads_by_client: dict[str, int] = {}
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
        if path != "/health" and self._token is not None and not self._authorized(request):
            await self._drain(request, limit=_AUTH_DRAIN_LIMIT)
            return self._json(401, {"error": "this service needs a bearer token: Authorization: Bearer <token>"},
                              state, close=True, headers={"WWW-Authenticate": self._challenge(request)})
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

        # per client address first: one client's uploads, held or queued, cannot fill every slot
        client = request.client.host if request.client is not None else "-"
        if self._uploads_by_client.get(client, 0) >= self.per_client_uploads:
            return self._json(429, {"error": f"this client already has {self.per_client_uploads} upload(s) in "
                                             "progress; wait for them to finish"}, state, close=True,
                              headers={"Retry-After": "5"})
        self._uploads_by_client[client] = self._uploads_by_client.get(client, 0) + 1
        try:
            return await self._predict_in_slot(request, state, length, media, fmt)
        finally:
            left = self._uploads_by_client[client] - 1
            if left:
                self._uploads_by_client[client] = left
            else:
                del self._uploads_by_client[client]

    async def _predict_in_slot(self, request: Request, state: dict[str, Any], length: int, media: str,
                               fmt: str) -> Response:
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

    async def _read_body(self, request: Request, length: int, keep: bool = True) -> bytes | Response:
        """The body, or a 400 / 408 answer. Three clocks: no gap longer than ``body_timeout``; the
        whole body within ``body_deadline``; and, after ``rate_grace``, on average at least
        ``min_rate`` bytes per second (a gap timer alone restarts with every byte, so a client
        dripping one byte a second would hold its upload slot for ever). ``keep=False`` drops the bytes."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        hard = start + self.body_deadline
        chunks: list[bytes] = []
        got = 0
        stream = request.stream().__aiter__()
        while True:
            now = loop.time()
            rate_due = start + self.rate_grace + got / self.min_rate if self.min_rate > 0 else math.inf
            due = min(now + self.body_timeout, hard, rate_due)
            try:
                # never 0: a zero timeout would not even take a chunk already waiting
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.01, due - now))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                elapsed = loop.time() - start
                if due == hard:
                    why = f"request body not complete within the {self.body_deadline:g} s limit"
                elif due == rate_due:
                    why = f"request body too slow: under the minimum of {self.min_rate:g} bytes/s"
                else:
                    why = f"request body stalled: no data for {self.body_timeout:g} s"
                return _plain_json(408, {"error": f"{why} ({got} of {length} bytes in {elapsed:.1f} s)"}, close=True)
            got += len(chunk)
            if got > length:  # cannot happen with h11 (it frames by Content-Length); be safe
                return _plain_json(400, {"error": "body longer than Content-Length"}, close=True)
            if keep:
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
        except SRError as exc:  # the scored result still comes back, with why there is no SR
            return self._json(422, {"error": f"no structured report: {exc.reason}", **result,
                                    "sr_error": exc.reason}, state)
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

    async def _drain(self, request: Request, length: int | None = None, limit: int = _DRAIN_LIMIT) -> None:
        """Read and drop an unwanted body (up to ``limit`` bytes, under the body deadlines) so the client
        can read our answer; a larger one is not read (the answer closes the connection)."""
        if length is None:
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                return
        if length <= 0 or length > limit:
            return
        try:
            await self._read_body(request, length, keep=False)
        except ClientDisconnect:
            return

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or self._token is None:
            return False
        try:
            given_bytes = given.strip().encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(given_bytes, self._token)  # constant time: no token prefix leaks by timing

    @staticmethod
    def _challenge(request: Request) -> str:
        """RFC 6750 section 3: no credentials get the bare challenge, wrong ones ``invalid_token``."""
        return _REALM + (', error="invalid_token"' if request.headers.get("authorization") else "")

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


_FULL_BODY = b'{"error": "too many connections; try again shortly"}'
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
         b"connection: close\r\ncontent-length: " + str(len(_FULL_BODY)).encode() + b"\r\n\r\n" + _FULL_BODY)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for a request's headers (uvicorn has none: a client that
    connects and sends half a request line would hold the connection for ever; expiry closes quietly),
    and a connection cap that makes room instead of refusing: over ``max_connections``, the connection
    that has waited longest with no request in progress (half-sent headers, idle keep-alive) is closed.
    So slow-header clients cannot keep ``/health`` (or anyone) out; only connections with a request in
    progress, themselves bounded by the upload limits and body deadlines, are never cut."""

    header_timeout = 10.0
    max_connections = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_since = self.loop.time()
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and self._open() > self.max_connections \
                and not self._make_room():
            transport.write(_FULL)  # every other connection has a request in progress
            transport.close()
            return
        self._arm()

    def _open(self) -> int:
        """Connections not already closing (one closed to make room stays in the set until its
        ``connection_lost``, which a burst of new connections would otherwise count again)."""
        return sum(1 for c in self.connections if c.transport is None or not c.transport.is_closing())

    def _between_requests(self) -> bool:
        return (self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
                and self.transport is not None and not self.transport.is_closing())

    def _make_room(self) -> bool:
        waiting = [c for c in self.connections if c is not self and isinstance(c, _Protocol) and c._between_requests()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        logger.debug("over %d connections: closing one that sent no complete request for %.1f s",
                     self.max_connections, self.loop.time() - oldest._waiting_since)
        oldest.transport.close()
        return True

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
        self._waiting_since = self.loop.time()
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
        max_connections: most connections at once; a new one over it closes the oldest connection
            that has no request in progress (503 only when every connection has one).
        header_timeout: seconds a connection may take to send a request's headers.
        keep_alive: seconds an idle keep-alive connection is kept.
        forwarded_allow_ips: addresses of trusted reverse proxies whose ``X-Forwarded-For`` names the
            client (for the per-client upload limit); ``None`` trusts no one, so the client is the
            socket's peer (uvicorn's own default would trust any local process).
    """

    def __init__(self, app: InferenceApp, *, host: str = "127.0.0.1", port: int = 8080, max_connections: int = 512,
                 header_timeout: float = 10.0, keep_alive: float = 5.0, forwarded_allow_ips: str | None = None) -> None:
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
        if max_connections < 1 or header_timeout <= 0:
            self.socket.close()
            raise ValueError("max_connections and header_timeout must be positive")
        protocol = type("Protocol", (_Protocol,), {"header_timeout": float(header_timeout),
                                                   "max_connections": int(max_connections)})
        # no limit_concurrency: it answers 503 to every request, /health too, once that many
        # connections are open, however idle; _Protocol makes room instead
        config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off", log_config=None, access_log=False,
                                limit_concurrency=None, timeout_keep_alive=int(max(1, keep_alive)),
                                proxy_headers=forwarded_allow_ips is not None,
                                forwarded_allow_ips=forwarded_allow_ips or "",
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
                queue_timeout: float = 30.0, header_timeout: float = 10.0, max_connections: int = 512,
                budget: PixelBudget | None = None, memory_limit: int | None = None, body_deadline: float = 300.0,
                min_rate: float = 32 * 1024, rate_grace: float = 5.0, per_client_uploads: int | None = None,
                token: str | None = None, forwarded_allow_ips: str | None = None) -> InferenceServer:
    """Bind (``port=0`` picks a free port) and return the server; call ``serve_forever()`` on it.

    The keyword arguments are those of :class:`InferenceApp` and :class:`InferenceServer`."""
    app = InferenceApp(model, max_bytes=max_bytes, force=force, decode_workers=decode_workers,
                       max_inflight=max_inflight, body_timeout=body_timeout, queue_timeout=queue_timeout,
                       budget=budget, memory_limit=memory_limit, body_deadline=body_deadline, min_rate=min_rate,
                       rate_grace=rate_grace, per_client_uploads=per_client_uploads, token=token)
    try:
        return InferenceServer(app, host=host, port=port, max_connections=max_connections,
                               header_timeout=header_timeout, forwarded_allow_ips=forwarded_allow_ips)
    except BaseException:
        app.close()
        raise
