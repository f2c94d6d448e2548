"""The hostile corpus (tests/hostile_corpus.py, issue 23) through the two long-running front ends, each a
real process under an address-space limit (``RLIMIT_AS``) as a hospital would run it:

- the HTTP service: every corpus file POSTed to ``/predict`` and ``/predict?format=sr`` gets a
  definite answer (200, or 4xx with a one-line reason; never 500, never a hang), the service stays
  up (``/health`` 200 at the end);
- the DICOM node: every corpus file that is DICOM on the wire is C-STOREd (sent as its encoded
  bytes, so a deflate bomb travels deflated); the node never dies and accounts for each image: an
  SR at the destination (a pynetdicom storage SCP here) for the scorable one, a "no SR" line for the
  others, nothing left in the spool.

For both: no identifier planted by the corpus appears in an answer or a log line, and the peak RSS
of the process and its decode workers stays under :data:`PEAK_RSS_LIMIT`. One process per front end
serves the whole corpus.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hostile_corpus import PHI_STRINGS, build
from runtime_helpers import sr_receiver
from test_hostile_corpus import tiny_model

pytest.importorskip("highdicom")  # the SRs (format=sr, the node)

ROOT = Path(__file__).resolve().parents[1]
MEMORY = 3 << 30  # RLIMIT_AS of the service / node process (its decode workers set their own, lower)
PEAK_RSS_LIMIT = 1 << 30  # the process and its workers together (VmHWM, about 450 MiB); a deflate bomb took 4 GB
SCORABLE = {"cr_no_spacing.dcm"}  # the real chest CR; every other case is refused or flagged
FLAGGED = {"window_zero.dcm", "window_negative.dcm", "constant.dcm"}
NOT_ON_THE_WIRE = {"not_dicom.dcm"}  # no DICOM file meta: a storage SCU cannot send it at all
# a smaller pixel budget than the default: the deflate bombs are refused after inflating 64 + 64 MiB,
# not 256 + 64 (seconds each on a loaded machine); the real CR (7 MiB decoded) is well inside it
BUDGET = ("--max-decoded-mb", "64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


class Runtime:
    """``python -m raycxr_runtime <argv>`` under :data:`MEMORY`, its stderr collected line by line."""

    def __init__(self, *argv: str, listening: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "deploy"), str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "raycxr_runtime", *argv], stderr=subprocess.PIPE,
                                     text=True, errors="backslashreplace", env=env, preexec_fn=_limit)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        found = wait_for(lambda: re.search(listening, self.log) or self.proc.poll() is not None, 120,
                         "the process to listen")
        assert self.proc.poll() is None and found, self.log
        self.port = int(re.search(listening, self.log).group(1))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def peak_rss(self) -> int:
        """VmHWM of the process and every live descendant (its decode workers), in bytes."""
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) << 10
        return total

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.kill()


def wait_for(condition, timeout, what, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log()[-4000:]}")


def post(url: str, data: bytes, timeout: float = 60) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/dicom"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # a hang fails the test (socket timeout)
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def no_phi(text: str) -> list[str]:
    return [s for s in PHI_STRINGS if s in text]


def test_service_answers_every_hostile_upload_and_stays_up(corpus, model):
    service = Runtime("serve", "--model", str(model), "--port", "0", "--decode-workers", "1", *BUDGET,
                      listening=r"on http://127\.0\.0\.1:(\d+)")
    url = f"http://127.0.0.1:{service.port}"
    try:
        answers = {}
        for name, path in corpus.items():
            data = path.read_bytes()
            for fmt in ("json", "sr"):
                answers[name, fmt] = post(f"{url}/predict?name={name}&format={fmt}", data)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            health = r.status
        peak = service.peak_rss()
        alive = service.proc.poll() is None
    finally:
        rc = service.stop()
    assert alive and health == 200, service.log[-3000:]
    assert rc == 0, service.log[-3000:]
    for (name, fmt), (status, media, body) in answers.items():
        if name in SCORABLE:
            assert status == 200, (name, fmt, status, body[:300])
            if fmt == "sr":
                assert media == "application/dicom" and body[128:132] == b"DICM", (name, body[:200])
            else:
                assert json.loads(body)["status"] == "scored"
            continue
        assert media == "application/json", (name, fmt, media)
        answer = json.loads(body)
        if name in FLAGGED and fmt == "json":
            assert status == 200 and answer["status"] == "flagged", (name, answer)
            continue
        # refused: 422 with one line saying why (flagged images get no SR: 422 too)
        assert status == 422, (name, fmt, status, answer)
        assert "\n" not in answer["error"] and len(answer["error"]) < 500, (name, answer["error"])
        assert answer["input"] == name
    for (name, fmt), (_, media, body) in answers.items():
        if media == "application/json":  # an SR carries the source's patient module, as it must
            assert not no_phi(body.decode("utf-8")), (name, fmt, no_phi(body.decode("utf-8")))
    assert not no_phi(service.log), no_phi(service.log)
    assert " 500" not in service.log and "internal error" not in service.log, service.log[-3000:]
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak >> 20} MiB"


def test_node_accounts_for_every_hostile_image_and_stays_up(corpus, model, tmp_path, monkeypatch):
    pynetdicom = pytest.importorskip("pynetdicom")
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    scp, received = sr_receiver("PACS", [cx.abstract_syntax for cx in StoragePresentationContexts])  # SR destination
    spool = tmp_path / "spool"
    node = Runtime("dicom-node", "--model", str(model), "--port", "0", "--ae-title", "RAYCXR", "--send-to",
                   f"127.0.0.1:{scp.server_address[1]}:PACS", "--spool-dir", str(spool), "--allow-ae", "MODALITY",
                   "--retry-min", "0.2", "--retry-max", "1", *BUDGET, listening=r"on 127\.0\.0\.1:(\d+)")
    sent = {n: p for n, p in corpus.items() if n not in NOT_ON_THE_WIRE}
    # send each file's bytes as they are (pynetdicom's default reads the file with dcmread first: it
    # inflated the deflate bombs in this process, 4 GB and 20 s each, before re-deflating them)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    try:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(Verification)
        for meta in {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                     for m in map(read_file_meta_info, sent.values())}:
            scu.add_requested_context(*meta)
        statuses = {}
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR")
        assert assoc.is_established
        for name, path in sent.items():  # the file's encoded bytes, as a modality sends them
            statuses[name] = assoc.send_c_store(path).Status
        assoc.release()
        assert statuses == dict.fromkeys(sent, 0x0000)  # every image acknowledged: the node owns it now
        # each image ends in one line: "scored, SR sent", "<status>, no SR (<reason>)" or "moved to failed"
        outcome = re.compile(r"image #(\d+): (scored, SR sent.*|\w+, no SR \(.*\)|.*moved to .*failed)$", re.M)
        wait_for(lambda: len(outcome.findall(node.log)) >= len(sent), 60, "an outcome for every image",
                 lambda: node.log)
        wait_for(lambda: len(received) >= len(SCORABLE), 30, "the SRs at the destination")
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR")
        echo = assoc.send_c_echo().Status if assoc.is_established else None
        assoc.release()
        peak = node.peak_rss()
        alive = node.proc.poll() is None
    finally:
        rc = node.stop()
        scp.shutdown()
    log = node.log
    assert alive and echo == 0x0000 and rc == 0, log[-3000:]
    outcomes = dict(outcome.findall(log))
    assert sorted(map(int, outcomes)) == list(range(1, len(sent) + 1)), log[-3000:]  # each image once
    assert sum(o.startswith("scored, SR sent") for o in outcomes.values()) == len(SCORABLE)
    assert sum(o.startswith("flagged, no SR") for o in outcomes.values()) == len(FLAGGED)
    assert not [o for o in outcomes.values() if "failed" in o], log[-3000:]  # refused cleanly, none unexpected
    assert len(received) == len(SCORABLE) and received[0].Modality == "SR"
    left = sorted(p.relative_to(spool).as_posix() for p in spool.rglob("*") if p.is_file() and p.name != ".lock")
    assert left == [], left  # not scored: deleted; scored: deleted once the SR was acknowledged
    for line in log.splitlines():
        assert not no_phi(line), line
    assert "Traceback" not in log, log[-3000:]
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak >> 20} MiB"
