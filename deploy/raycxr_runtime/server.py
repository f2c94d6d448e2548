"""A small HTTP inference service on the standard library (``http.server.ThreadingHTTPServer``).

Endpoints (all answers are JSON):

- ``GET /health``: ``{"status": "ok", "model_version": ...}``;
- ``GET /model``: the model card from the ONNX metadata (classes, thresholds, preprocessing...);
- ``POST /predict``: the body is one image file, ``Content-Type`` ``application/dicom``,
  ``image/png``, ``image/jpeg`` or ``application/octet-stream`` (format sniffed). The caller may
  name it with an ``X-Request-Id`` header or ``?name=``; the name is echoed back as ``input`` (and
  the header as ``X-Request-Id``). The answer is the per-image result of
  :class:`raycxr_runtime.inference.Predictor` (``status`` scored / flagged / error).

Status codes: 200 scored or flagged; 400 empty or malformed body; 404 unknown path; 405 wrong
method (with ``Allow``); 411 no ``Content-Length``; 413 body over ``max_bytes`` (default 32 MiB);
415 unsupported content type; 422 a file that is not a readable image (the reason says why);
500 an unexpected failure (logged on the server by exception type only; the client gets no
stack trace).

Privacy: the upload is written to a private temporary file (mode 0600) that is deleted after
scoring; logs carry the method, path, status and the caller's request name, never header values.
Run it behind the hospital's TLS-terminating reverse proxy; it has no authentication of its own.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .inference import ERROR, Predictor, quiet_pydicom
from .model import Model

__all__ = ["DEFAULT_MAX_BYTES", "InferenceHTTPServer", "make_server"]

logger = logging.getLogger("raycxr_runtime.server")

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# media type -> temporary file suffix (the readers dispatch on it; "" = sniff the content)
CONTENT_TYPES = {"application/dicom": ".dcm", "image/png": ".png", "image/jpeg": ".jpg",
                 "application/octet-stream": ""}
ROUTES = {"/health": ("GET",), "/model": ("GET",), "/predict": ("POST",)}
_DRAIN_LIMIT = 64 * 1024 * 1024  # read and drop an oversized body up to this, so the client sees the 413
_NAME_MAX = 200


class InferenceHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding one classifier; ``server_address`` gives the bound port."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: Model, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 force: bool = False) -> None:
        quiet_pydicom()
        self.model = model
        self.predictor = Predictor(model, batch_size=1, force=force)
        self.max_bytes = int(max_bytes)
        super().__init__(address, _Handler)


def make_server(model: Model, *, host: str = "127.0.0.1", port: int = 8080, max_bytes: int = DEFAULT_MAX_BYTES,
                force: bool = False) -> InferenceHTTPServer:
    """Bind (``port=0`` picks a free port) and return the server; call ``serve_forever()`` on it."""
    return InferenceHTTPServer((host, port), model, max_bytes=max_bytes, force=force)


class _Handler(BaseHTTPRequestHandler):
    server: InferenceHTTPServer
    server_version = f"raycxr-runtime/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stall mid-request before the connection is dropped

    # -- dispatch ----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch("OPTIONS")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        self._request_id = ""
        try:
            url = urlsplit(self.path)
            route = url.path.rstrip("/") or "/"
            self._request_id = self._name(url.query)
            if route not in ROUTES:
                self._drop_body()
                endpoints = ", ".join(f"{m[0]} {p}" for p, m in ROUTES.items())
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"unknown path {route!r}; endpoints: {endpoints}"})
            if method not in ROUTES[route]:
                self._drop_body()
                return self._json(HTTPStatus.METHOD_NOT_ALLOWED,
                                  {"error": f"{method} is not allowed on {route}; use {ROUTES[route][0]}"},
                                  headers={"Allow": ", ".join(ROUTES[route])})
            if route == "/health":
                m = self.server.model
                return self._json(HTTPStatus.OK, {"status": "ok", "model_version": m.model_version,
                                                  "model": m.path.name, "runtime_version": __version__})
            if route == "/model":
                return self._json(HTTPStatus.OK, self.server.model.info())
            return self._predict()
        except Exception as exc:  # never a stack trace to the client; exception type only in the log (PHI)
            logger.error("internal error on %s %s (%s): %s", method, urlsplit(self.path).path, self._request_id or "-",
                         type(exc).__name__)
            logger.debug("traceback", exc_info=True)
            self.close_connection = True
            try:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            except OSError:
                pass

    # -- POST /predict -----------------------------------------------------------------------------
    def _predict(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "chunked uploads are not supported; "
                                                                    "send the file with a Content-Length"})
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.close_connection = True
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"invalid Content-Length {raw_length[:32]!r}"})
        if length > self.server.max_bytes:
            self._drop_body(length)
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              {"error": f"request body of {length} bytes exceeds the limit of "
                                        f"{self.server.max_bytes} bytes"})
        media = (self.headers.get("Content-Type") or "application/octet-stream").split(";")[0].strip().lower()
        if media not in CONTENT_TYPES:
            self._drop_body(length)
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              {"error": f"unsupported Content-Type {media[:64]!r}; send one of "
                                        + ", ".join(CONTENT_TYPES)})
        if length == 0:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "empty request body: send one DICOM, PNG or JPEG file"})
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"body ended after {len(body)} of {length} bytes"})
        name = self._request_id or "upload"
        with tempfile.TemporaryDirectory(prefix="raycxr-") as tmp:  # private (0700) folder, removed after
            path = Path(tmp) / f"upload{CONTENT_TYPES[media]}"
            path.write_bytes(body)
            result = self.server.predictor.predict_file(path, name=name).to_dict()
        if result["status"] == ERROR:
            reason = result["warnings"][-1] if result["warnings"] else "unreadable image"
            return self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"not a readable image: {reason}", **result})
        return self._json(HTTPStatus.OK, result)

    # -- helpers -----------------------------------------------------------------------------------
    def _name(self, query: str) -> str:
        """The caller's name for the request (X-Request-Id, else ?name=), printable and bounded."""
        raw = self.headers.get("X-Request-Id") or (parse_qs(query).get("name") or [""])[0]
        return re.sub(r"[\x00-\x1f\x7f]", "", raw)[:_NAME_MAX]

    def _drop_body(self, length: int | None = None) -> None:
        """Read and discard an unwanted body so the client can read our answer; close if it is huge."""
        if length is None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = _DRAIN_LIMIT + 1
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def _json(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self._request_id:
            self.send_header("X-Request-Id", self._request_id)
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # method, path without the query, status, caller's request name: no client data beyond that
        code_value = code.value if isinstance(code, HTTPStatus) else code
        logger.info("%s %s -> %s%s", self.command, urlsplit(self.path).path, code_value,
                    f" ({self._request_id})" if getattr(self, "_request_id", "") else "")

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.warning("http: " + format, *args)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("http: " + format, *args)
