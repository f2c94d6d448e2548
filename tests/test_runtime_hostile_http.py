"""The HTTP service under hostile clients, over real sockets: slow bodies (slowloris on the upload
slots), slow headers (on the connections), bodies under the minimum rate, and the bearer token.

Slow clients come from several loopback addresses (127.0.0.2, 127.0.0.3...: Linux routes all of
127/8 to lo) so that the per-client limit and the global slots can be told apart. The deadlines
are configured short so that each test takes seconds."""

import io
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from runtime_helpers import tiny_classifier

from raycxr_runtime.model import Model
from raycxr_runtime.server import make_server

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_classifier(tmp_path_factory.mktemp("model") / "classifier.onnx", 2, ["Effusion", "Pneumothorax"])
    return Model(path, threads=1)


@pytest.fixture(scope="module")
def png():
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(buf, "PNG")
    return buf.getvalue()


def serve(model, **kw):
    srv = make_server(model, host="127.0.0.1", port=0, decode_workers=0, **kw)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


def stop(srv, thread):
    srv.shutdown()
    thread.join(10)
    srv.server_close()


def call(url, method="GET", data=None, headers=None, timeout=20):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def slow_upload(port, source, length=5000):
    """A POST /predict from ``source`` whose headers and first byte are sent; the caller drips the rest."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
              + str(length).encode() + b"\r\n\r\n\x89")
    return s


class Drip:
    """Sends one byte per second on each socket until stopped (a client at 1 B/s); records what came back."""

    def __init__(self, socks):
        self.socks, self.answers = socks, {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for s in self.socks:
            s.setblocking(False)
        while not self.stopped.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b"\0")
                except OSError:
                    pass
                try:
                    got = s.recv(4096)
                    if got:
                        self.answers[s] = self.answers.get(s, b"") + got
                except (BlockingIOError, OSError):
                    pass

    def close(self):
        self.stopped.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def test_slow_bodies_cannot_hold_the_upload_slots(model, png):
    """max_inflight + 1 clients from different addresses sending their body at 1 B/s: they are cut
    at the minimum rate (after the grace), and a normal upload waiting behind them is scored within
    seconds. Before: the stall timer restarted with every byte, and the normal upload got 503 after
    the queue timeout."""
    srv, thread = serve(model, max_inflight=4, body_timeout=30.0, queue_timeout=30.0, min_rate=1000,
                        rate_grace=1.0, body_deadline=60.0)
    port = srv.server_address[1]
    drip = None
    try:
        drip = Drip([slow_upload(port, f"127.0.0.{2 + i}") for i in range(5)])
        time.sleep(0.3)  # every slot is held
        t = time.monotonic()
        status, _, body = call(f"http://127.0.0.1:{port}/predict", "POST", png, {"Content-Type": "image/png"})
        took = time.monotonic() - t
        assert status == 200 and json.loads(body)["status"] == "scored"
        assert took < 5.0, took
        t = time.monotonic()  # the fifth slow client got a slot after the first four were cut, and is cut too
        while len(drip.answers) < 5 and time.monotonic() - t < 8:
            time.sleep(0.2)
        answers = list(drip.answers.values())
        assert len(answers) == 5 and all(a.startswith(b"HTTP/1.1 408") and b"too slow" in a for a in answers), answers
    finally:
        if drip is not None:
            drip.close()
        stop(srv, thread)


def test_one_client_cannot_take_every_slot(model, png):
    """Five slow uploads from one address: only ``per_client_uploads`` are held, the others get 429
    at once; another client is scored at once, without waiting for any deadline."""
    srv, thread = serve(model, max_inflight=4, per_client_uploads=1, min_rate=0, body_timeout=30.0)
    port = srv.server_address[1]
    socks = [slow_upload(port, "127.0.0.2") for _ in range(5)]
    try:
        answers = []
        for s in socks[1:]:
            s.settimeout(5)
            answers.append(s.recv(4096))
        assert all(a.startswith(b"HTTP/1.1 429") and b"retry-after: 5" in a.lower() for a in answers), answers
        t = time.monotonic()
        status, _, body = call(f"http://127.0.0.1:{port}/predict", "POST", png, {"Content-Type": "image/png"})
        assert status == 200 and time.monotonic() - t < 3.0
    finally:
        for s in socks:
            s.close()
        stop(srv, thread)


def trickle_until_answer(s, chunk: bytes, give_up: float) -> tuple[bytes, float]:
    """Send ``chunk`` every 0.1 s until the server answers (or closes); the answer's first bytes and the
    seconds it took."""
    s.settimeout(0.1)
    t, answer = time.monotonic(), b""
    while time.monotonic() - t < give_up and not answer:
        try:
            s.send(chunk)
            answer = s.recv(4096)
        except TimeoutError:
            pass
        except OSError:
            break
    return answer, time.monotonic() - t


def rest_of_answer(s, first, wait=2.0):
    """The whole answer the server sent before closing: the first chunk can be the headers alone."""
    s.settimeout(wait)
    answer = first
    try:
        while chunk := s.recv(4096):
            answer += chunk
    except OSError:
        pass
    return answer


def test_a_body_under_the_minimum_rate_is_cut(model):
    """10 B/s against a minimum of 1000 B/s after a 0.5 s grace: 408 within about a second, although
    no single gap reaches the stall timeout; a body that is not done by the whole-body deadline is
    cut too, however fast it started."""
    srv, thread = serve(model, body_timeout=30.0, min_rate=1000, rate_grace=0.5, body_deadline=2.0)
    port = srv.server_address[1]
    try:
        s = slow_upload(port, "127.0.0.1", length=10_000)
        answer, took = trickle_until_answer(s, b"\0", give_up=5)
        assert took < 2.0
        answer = rest_of_answer(s, answer)
        assert answer.startswith(b"HTTP/1.1 408") and b"too slow" in answer, answer
        s.close()

        s = slow_upload(port, "127.0.0.1", length=1_000_000)  # 600 kB at once, then 1 kB every 0.1 s
        s.sendall(b"\0" * 600_000)
        answer, took = trickle_until_answer(s, b"\0" * 1000, give_up=6)
        assert took < 4.0
        answer = rest_of_answer(s, answer)
        assert answer.startswith(b"HTTP/1.1 408") and b"within the 2 s limit" in answer, answer
        s.close()
    finally:
        stop(srv, thread)


def test_slow_headers_never_block_health(model):
    """70 connections that send half a request line and stop, more than ``max_connections``:
    /health still answers 200 at once (the oldest half-sent connections are closed to make room),
    and so does /predict. Before: more than 64 connections and uvicorn answered 503 to everything."""
    srv, thread = serve(model, header_timeout=30.0, max_connections=40)
    port = srv.server_address[1]
    socks = []
    try:
        for i in range(70):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 5}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /hea")
            socks.append(s)
        time.sleep(0.3)
        for _ in range(3):
            t = time.monotonic()
            status, _, body = call(f"http://127.0.0.1:{port}/health", timeout=5)
            assert status == 200 and json.loads(body)["status"] == "ok"
            assert time.monotonic() - t < 1.0
        closed = 0
        readable, _, _ = select.select(socks, [], [], 0.5)
        for s in readable:
            try:
                closed += s.recv(10) == b""
            except ConnectionResetError:  # closed before the server read the half request
                closed += 1
        assert closed >= 30  # the oldest ones made room; the newest 40 or so are still open
    finally:
        for s in socks:
            s.close()
        stop(srv, thread)


def test_bearer_token(model, png):
    """With a token: 401 with WWW-Authenticate without it or with a wrong one, 200 with it; /health stays open."""
    srv, thread = serve(model, token=TOKEN)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert call(f"{url}/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            status, got, body = call(f"{url}/predict", "POST", png, {"Content-Type": "image/png", **headers})
            assert status == 401 and got["WWW-Authenticate"].startswith('Bearer realm="raycxr-infer"'), (status, got)
            assert TOKEN.encode() not in body
            assert call(f"{url}/model", headers=headers)[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = call(f"{url}/predict", "POST", png, {"Content-Type": "image/png", **auth})
        assert status == 200 and json.loads(body)["status"] == "scored"
        assert call(f"{url}/model", headers=auth)[0] == 200
    finally:
        stop(srv, thread)


def test_token_from_file_or_environment_and_the_serve_command(model, png, tmp_path, monkeypatch):
    """load_token: the file's first line, else $RAYCXR_INFER_TOKEN, else none; a short token is refused
    without being quoted. `raycxr-infer serve --token-file` then requires it (a real process)."""
    import subprocess
    import sys

    from raycxr_runtime.server import TOKEN_ENV, load_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, f" {TOKEN}\n")
    assert load_token(None) == TOKEN
    (tmp_path / "token").write_text(TOKEN[::-1] + "\n")
    assert load_token(tmp_path / "token") == TOKEN[::-1]  # the file wins over the environment
    (tmp_path / "short").write_text("hunter2\n")
    with pytest.raises(ValueError, match="at least 16") as err:
        load_token(tmp_path / "short")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="token file"):
        load_token(tmp_path / "missing")

    monkeypatch.delenv(TOKEN_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "raycxr_runtime", "serve", "--model", str(model.path), "--port",
                             "0", "--decode-workers", "0", "--token-file", str(tmp_path / "token")],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "bearer token required" in line, line
        url = line.split(" on ")[1].split(" ")[0]
        assert call(f"{url}/health")[0] == 200
        assert call(f"{url}/predict", "POST", png, {"Content-Type": "image/png"})[0] == 401
        status, _, body = call(f"{url}/predict", "POST", png, {"Content-Type": "image/png",
                                                                "Authorization": f"Bearer {TOKEN[::-1]}"})
        assert status == 200 and json.loads(body)["status"] == "scored"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
    proc = subprocess.run([sys.executable, "-m", "raycxr_runtime", "serve", "--model", str(model.path), "--port", "0",
                           "--token-file", str(tmp_path / "short")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "at least 16" in proc.stderr and "hunter2" not in proc.stderr
