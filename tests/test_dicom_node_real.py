"""The DICOM node against a real PACS (Orthanc): images in by C-STORE and C-MOVE, SRs back, nothing
acknowledged lost on SIGTERM or while the PACS is down, the allow-list, the called AE title and TLS."""

import datetime
import io
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from runtime_helpers import sr_receiver, tiny_classifier

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification  # noqa: E402

from raycxr_runtime.dicom_node import Destination, DicomNode, TLSConfig  # noqa: E402
from raycxr_runtime.model import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("node-model") / "tiny.onnx", 2, ["Effusion", "Nodule"])


@pytest.fixture(scope="module")
def model(model_path):
    return Model(model_path)


def chest_images(n):
    """``n`` new instances of one new study made from pydicom-data's real CR chest PA (RG1_UNCI, every
    second pixel to keep scoring fast): (study UID, [(SOP instance UID, Part 10 bytes)])."""
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
        pixels = ds.pixel_array[::2, ::2].copy()
        ds.PixelData, ds.Rows, ds.Columns = pixels.tobytes(), *pixels.shape
        ds.ImagerPixelSpacing = ["0.2", "0.2"]  # highdicom's image library wants it for CR
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((str(ds.SOPInstanceUID), buf.getvalue()))
    return study, out


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def upload(pacs, images):
    return [pacs.upload(blob)["ID"] for _, blob in images]


def srs_of(pacs, study):
    """The SRs Orthanc holds in ``study``, read back from its REST API (Modality SR)."""
    ids = pacs.rest("/tools/find", "POST", {"Level": "Series", "Query": {"StudyInstanceUID": study,
                                                                           "Modality": "SR"}})
    out = []
    for series in ids:
        for inst in pacs.rest(f"/series/{series}/instances"):
            out.append(pydicom.dcmread(io.BytesIO(pacs.rest(f"/instances/{inst['ID']}/file", raw=True))))
    return out


def referenced(sr):
    return {ref.ReferencedSOPInstanceUID for ev in sr.CurrentRequestedProcedureEvidenceSequence
            for series in ev.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def spool_files(spool):
    return sorted(p.relative_to(spool).as_posix() for p in spool.rglob("*") if p.is_file() and p.name != ".lock")


def outbox_states(spool):
    states = []
    for p in (spool / "outbox").glob("*.json"):
        try:
            states.append(json.loads(p.read_text()))
        except (OSError, ValueError):  # deleted meanwhile
            pass
    return states


def restart(pacs):
    """Start a stopped Orthanc again on the same configuration (same ports, same storage)."""
    with pacs.log.open("ab") as out:
        pacs.process = subprocess.Popen([pacs.process.args[0], str(pacs.folder / "orthanc.json")], stdout=out,
                                        stderr=subprocess.STDOUT, cwd=pacs.folder)
    wait_for(lambda: _answers(pacs), 60, "Orthanc to restart")


def _answers(pacs):
    try:
        pacs.rest("/system")
        return True
    except (urllib.error.URLError, OSError):
        return False


class NodeProcess:
    """``raycxr-infer dicom-node`` as a subprocess (so it can get real signals); its stderr is collected."""

    def __init__(self, model_path, spool, send_to, *extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "deploy"), str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "raycxr_runtime", "dicom-node", "--model", str(model_path),
                                      "--port", "0", "--ae-title", "RAYCXR", "--send-to", send_to, "--spool-dir",
                                      str(spool), "--allow-ae", "ORTHANC@127.0.0.1", *extra],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        found = []
        wait_for(lambda: found.extend(m for line in self.lines if (m := re.search(r"on 127\.0\.0\.1:(\d+)", line)))
                 or found or self.proc.poll() is not None, 60, "the node to listen")
        assert found, "".join(self.lines)
        self.port = int(found[0].group(1))

    @property
    def log(self):
        return "".join(self.lines)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_orthanc_stores_and_moves_to_the_node_and_gets_the_srs_back(orthanc, model, tmp_path):
    study_a, images_a = chest_images(2)
    study_b, images_b = chest_images(1)
    ids_a, _ = upload(orthanc, images_a), upload(orthanc, images_b)
    spool = tmp_path / "spool"
    node = DicomNode(model, port=0, spool_dir=spool, allow={orthanc.ae_title: {"127.0.0.1"}},
                     destination=Destination("127.0.0.1", orthanc.dicom_port, orthanc.ae_title))
    try:
        orthanc.add_modality("raycxr", "RAYCXR", node.port)
        orthanc.rest("/modalities/raycxr/store", "POST", {"Resources": ids_a, "Synchronous": True})  # C-STORE
        # C-MOVE: Orthanc asks itself (the move SCP) to move study B to the node's AE title
        orthanc.add_modality("self", orthanc.ae_title, orthanc.dicom_port)
        orthanc.rest("/modalities/self/move", "POST", {"Level": "Study", "TargetAet": "RAYCXR",
                                                        "Resources": [{"StudyInstanceUID": study_b}]})
        wait_for(lambda: len(srs_of(orthanc, study_a)) == 2 and len(srs_of(orthanc, study_b)) == 1, 60,
                 "the SRs in Orthanc")
        assert node.wait_idle(30)
    finally:
        node.close()
    assert node.stats == {"received": 3, "scored": 3, "sr_sent": 3, "sr_failed": 0, "not_scored": 0}
    assert set().union(*map(referenced, srs_of(orthanc, study_a))) == {uid for uid, _ in images_a}
    assert referenced(srs_of(orthanc, study_b)[0]) == {images_b[0][0]}
    assert spool_files(spool) == []  # acknowledged by the PACS: image and SR deleted
    assert (spool.stat().st_mode & 0o777) == 0o700


def test_sigterm_with_queued_images_loses_nothing_and_a_restart_resumes(orthanc, model_path, tmp_path):
    study, images = chest_images(8)
    ids = upload(orthanc, images)
    spool = tmp_path / "spool"
    send_to = f"127.0.0.1:{orthanc.dicom_port}:{orthanc.ae_title}"
    node = NodeProcess(model_path, spool, send_to)
    try:
        orthanc.add_modality("raycxr", "RAYCXR", node.port)
        orthanc.rest("/modalities/raycxr/store", "POST", {"Resources": ids, "Synchronous": True})  # all 8 acknowledged
        rc = node.stop()
    finally:
        node.proc.kill()
    assert rc == 0, node.log
    log_before = node.log
    left = list((spool / "incoming").glob("*.dcm"))
    outbox = list((spool / "outbox").glob("*.sr.dcm"))
    delivered = srs_of(orthanc, study)
    assert len(left) + len(delivered) == 8  # every image is in the spool until its SR is acknowledged
    assert len(left) > len(outbox), "the SIGTERM came after all images were scored: the test proves nothing"
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in left + outbox)
    assert all((d.stat().st_mode & 0o777) == 0o700 for d in (spool, spool / "incoming", spool / "outbox"))
    assert not list(spool.rglob(".tmp-*"))

    node = NodeProcess(model_path, spool, send_to)
    try:
        wait_for(lambda: len(srs_of(orthanc, study)) == 8 and not spool_files(spool), 120,
                 "every image's SR and an empty spool")
        rc = node.stop()
    finally:
        node.proc.kill()
    assert rc == 0, node.log
    assert "resuming the spool" in node.log
    for uid in [study, *(uid for uid, _ in images)]:  # logs count images, never quote their identifiers
        assert uid not in log_before + node.log
    assert set().union(*map(referenced, srs_of(orthanc, study))) == {uid for uid, _ in images}


def test_srs_wait_in_the_outbox_while_the_pacs_is_down(orthanc, model, tmp_path, caplog):
    from orthanc import start_orthanc

    caplog.set_level("INFO")
    study, images = chest_images(3)
    ids = upload(orthanc, images)
    down = start_orthanc(tmp_path / "pacs2", ae_title="PACS2")
    down.stop()  # the destination: known ports, nothing listening
    spool = tmp_path / "spool"
    kw = dict(port=0, spool_dir=spool, allow={orthanc.ae_title: None}, retry_min=0.2, retry_max=0.5,
              destination=Destination("127.0.0.1", down.dicom_port, "PACS2"))
    node = DicomNode(model, **kw)
    try:
        orthanc.add_modality("raycxr", "RAYCXR", node.port)
        orthanc.rest("/modalities/raycxr/store", "POST", {"Resources": ids, "Synchronous": True})
        wait_for(lambda: len(states := outbox_states(spool)) == 3 and all(s["attempts"] >= 2 for s in states), 60,
                 "two failed attempts for each SR")
    finally:
        node.close()
    assert all(s["last_error"] == "no association" for s in outbox_states(spool))
    assert len(list((spool / "incoming").glob("*.dcm"))) == 3 and len(list((spool / "outbox").glob("*.sr.dcm"))) == 3

    node = DicomNode(model, **kw)  # a restart resumes the outbox; the PACS comes back while it retries
    try:
        wait_for(lambda: node.stats["sr_failed"] >= 3, 30, "a retry after the restart")
        restart(down)
        wait_for(lambda: len(srs_of(down, study)) == 3, 60, "the SRs at the PACS once it is back")
        assert node.wait_idle(30)
    finally:
        node.close()
        down.stop()
    assert node.stats["received"] == 0 and node.stats["sr_sent"] == 3
    assert spool_files(spool) == []
    tries = [int(t) for t in re.findall(r"image #\d+: scored, SR sent to PACS2 after (\d+) attempts", caplog.text)]
    assert len(tries) == 3 and min(tries) >= 3  # the attempts counted before the restart were kept on disk


def _scu(calling, *contexts):
    ae = AE(ae_title=calling)
    for cx in contexts or (Verification,):
        ae.add_requested_context(cx)
    return ae


def test_unknown_calling_and_wrong_called_ae_titles_are_rejected(orthanc, model, tmp_path, caplog):
    study, images = chest_images(1)
    ids = upload(orthanc, images)
    spool = tmp_path / "spool"
    node = DicomNode(model, port=0, spool_dir=spool, allow={"MODALITY": None, "WARD": {"10.0.0.99"}},
                     destination=Destination("127.0.0.1", orthanc.dicom_port, orthanc.ae_title))
    try:
        cases = {"INTRUDER": ("RAYCXR", 0x03), "MODALITY": ("NOTRAYCXR", 0x07), "WARD": ("RAYCXR", 0x03)}
        for calling, (called, diagnostic) in cases.items():
            assoc = _scu(calling).associate("127.0.0.1", node.port, ae_title=called)
            assert assoc.is_rejected and not assoc.is_established, calling
            assert assoc.acceptor.primitive.diagnostic == diagnostic, calling
        assoc = _scu("MODALITY").associate("127.0.0.1", node.port, ae_title="RAYCXR")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # Orthanc (calling AE ORTHANC) is not on the list: its C-STORE fails and nothing is stored
        orthanc.add_modality("raycxr", "RAYCXR", node.port)
        with pytest.raises(urllib.error.HTTPError):
            orthanc.rest("/modalities/raycxr/store", "POST", {"Resources": ids, "Synchronous": True})
        # ... and a wrongly configured called AE title is refused too
        orthanc.add_modality("raycxr-typo", "RAYCXX", node.port)
        with pytest.raises(urllib.error.HTTPError):
            orthanc.rest("/modalities/raycxr-typo/store", "POST", {"Resources": ids, "Synchronous": True})
    finally:
        node.close()
    assert node.stats["received"] == 0 and spool_files(spool) == []
    assert "calling AE title 'INTRUDER' is not in --allow-ae" in caplog.text
    assert "called AE title 'NOTRAYCXR' is not this node's" in caplog.text


def _self_signed(folder):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_associations_with_a_self_signed_certificate(model, tmp_path):
    cert, key = _self_signed(tmp_path)
    _, images = chest_images(1)
    pacs_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pacs_ctx.load_cert_chain(cert, key)
    server, received = sr_receiver("TLSPACS", ssl_context=pacs_ctx)  # the SR destination, also behind TLS
    tls = TLSConfig(cert=cert, key=key, ca=cert)  # mutual: clients need a certificate signed by ``ca``
    node = DicomNode(model, port=0, spool_dir=tmp_path / "spool", allow={"MODALITY": None}, tls=tls, send_tls=tls,
                     destination=Destination("127.0.0.1", server.server_address[1], "TLSPACS"))
    try:
        scu = _scu("MODALITY", Verification, ComputedRadiographyImageStorage)
        plain = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR")
        assert not plain.is_established  # plain TCP to a TLS port
        anonymous = ssl.create_default_context(cafile=str(cert))
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR", tls_args=(anonymous, "127.0.0.1"))
        assert not assoc.is_established  # no client certificate
        client = ssl.create_default_context(cafile=str(cert))
        client.load_cert_chain(cert, key)
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR", tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(images[0][1]))).Status == 0x0000
        assoc.release()
        assert node.wait_idle(60)
    finally:
        node.close()
        server.shutdown()
    assert node.stats["sr_sent"] == 1 and len(received) == 1
    assert received[0].Modality == "SR"


def test_bad_node_flags_are_refused_with_one_line(tmp_path, capsys):
    from raycxr_runtime.cli import main

    base = ["dicom-node", "--model", str(tmp_path / "never-loaded.onnx"), "--send-to", "127.0.0.1:104:PACS"]
    for extra, message in ((["--allow-ae", "SEVENTEEN_CHARS_X"], "--allow-ae must be AE_TITLE or AE_TITLE@HOST"),
                           (["--allow-ae", "PACS@"], "--allow-ae must be AE_TITLE or AE_TITLE@HOST"),
                           (["--tls-ca", "ca.pem"], "--tls-key and --tls-ca need --tls-cert")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_one_node_per_spool_and_half_written_files_are_dropped(model, tmp_path):
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    (spool / "incoming" / ".tmp-crashed.dcm").write_bytes(b"half an image")  # a crash mid-write: never acknowledged
    dest = Destination("127.0.0.1", 9, "PACS")
    node = DicomNode(model, port=0, spool_dir=spool, allow={"MODALITY": None}, destination=dest)
    try:
        assert spool_files(spool) == []
        with pytest.raises(OSError, match="is in use by another DICOM node"):
            DicomNode(model, port=0, spool_dir=spool, allow={"MODALITY": None}, destination=dest)
    finally:
        node.close()
    DicomNode(model, port=0, spool_dir=spool, allow={"MODALITY": None}, destination=dest).close()  # free again
