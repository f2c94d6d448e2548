"""DICOM SR for every scored image, whatever its source object: a real computed radiograph (pydicom-data's
RG1_UNCR, a chest CR: MONOCHROME1, no Imager Pixel Spacing), a DX made from that radiograph's pixels,
and a Secondary Capture built here that lacks most type 2 patient and study attributes.

Each SR is checked by dciodvfy (dicom3tools), must not carry the source's equipment / institution
attributes, and nothing of the source (UIDs, names) may reach a log line or stderr. pydicom-data has
no DX image, hence the DX derived from the real CR.
"""

import io
import json
import logging
import shutil
import subprocess
import tempfile
import threading
import urllib.request

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from runtime_helpers import sr_receiver, tiny_classifier

pytest.importorskip("highdicom")

from raycxr_runtime.cli import main  # noqa: E402
from raycxr_runtime.model import Model  # noqa: E402
from raycxr_runtime.server import make_server  # noqa: E402
from raycxr_runtime.sr import make_sr, write_sr  # noqa: E402

CLASSES = ["Effusion", "Nodule"]
EQUIPMENT = ("InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber")
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
# the only source attributes an SR may repeat (the patient module and general study, type 1 and 2)
SHARED = {"SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
          "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"}
SC_NAME = "Jane Doe PHI"  # no caret: highdicom warns about the name, quoting it


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("model") / "tiny.onnx", len(CLASSES), CLASSES)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``{"CR": path, "DX": path, "SC": path}``."""
    d = tmp_path_factory.mktemp("sources")
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert cr.SOPClassUID == pydicom.uid.ComputedRadiographyImageStorage and cr.BodyPartExamined == "CHEST"
    assert cr.PhotometricInterpretation == "MONOCHROME1" and "ImagerPixelSpacing" not in cr
    assert all(k in cr for k in ("InstitutionName", "StationName", "DeviceSerialNumber"))
    cr.InstitutionAddress = "1 Hospital Road"  # the fourth equipment attribute the SR must not carry
    cr.save_as(d / "cr.dcm")
    small = cr.pixel_array[::4, ::4].copy()

    dx = pydicom.dcmread(d / "cr.dcm")  # the same radiograph as DX For Presentation, smaller
    dx.SOPClassUID, dx.Modality, dx.PresentationIntentType = DX_STORAGE, "DX", "FOR PRESENTATION"
    dx.SOPInstanceUID, dx.SeriesInstanceUID = generate_uid(), generate_uid()
    dx.PixelData, (dx.Rows, dx.Columns) = small.tobytes(), small.shape
    dx.ImagerPixelSpacing, dx.PixelIntensityRelationship = [0.6, 0.6], "LOG"
    del dx.PixelSpacing
    dx.file_meta.MediaStorageSOPClassUID, dx.file_meta.MediaStorageSOPInstanceUID = DX_STORAGE, dx.SOPInstanceUID
    dx.save_as(d / "dx.dcm", enforce_file_format=True)

    sc = pydicom.Dataset()  # a capture station's SC: no patient ID, birth date, sex, accession, study ID...
    sc.SOPClassUID, sc.SOPInstanceUID, sc.Modality, sc.ConversionType = SC_STORAGE, generate_uid(), "OT", "WSD"
    sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.PatientName = generate_uid(), generate_uid(), SC_NAME
    sc.StationName = "CAPTURE-7"
    sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.Rows, sc.Columns = 1, "MONOCHROME2", *small.shape
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    sc.PixelData = (255 - small.astype(float) / small.max() * 255).astype("uint8").tobytes()
    sc.file_meta = pydicom.dataset.FileMetaDataset()
    sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sc.file_meta.MediaStorageSOPClassUID, sc.file_meta.MediaStorageSOPInstanceUID = SC_STORAGE, sc.SOPInstanceUID
    sc.save_as(d / "sc.dcm", enforce_file_format=True)
    return {"CR": str(d / "cr.dcm"), "DX": str(d / "dx.dcm"), "SC": str(d / "sc.dcm")}


def walk(ds):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def library_descriptors(sr):
    """Concept names of the image library entry's descriptors (TID 1602 / 1603)."""
    names = []
    for elem in walk(sr):
        if elem.keyword == "ContentSequence":
            for item in elem.value:
                if item.get("ValueType") == "IMAGE" and "ContentSequence" in item and \
                        item.ConceptNameCodeSequence[0].CodeMeaning == "Source":
                    names += [i.ConceptNameCodeSequence[0].CodeMeaning for i in item.ContentSequence]
    return names


def check_sr(sr, source_path):
    """Valid (dciodvfy), references its source, carries the patient/study attributes the source has, and no more."""
    src = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert sr.get(keyword) == src.get(keyword, ""), keyword  # the source's value, or empty (type 2)
    present = {e.keyword for e in walk(sr)}
    assert not present & set(EQUIPMENT), present & set(EQUIPMENT)
    assert not {"StudyDescription", "OtherPatientIDs", "InstitutionalDepartmentName"} & present
    own = {"InstanceNumber", "SeriesNumber"}  # the SR's own numbering, which may equal the source's
    shared = {e.keyword for e in sr if e.keyword in src and e.value == src[e.keyword].value and e.value != ""} - own
    assert shared <= SHARED, shared - SHARED
    dciodvfy(sr)


def dciodvfy(sr):
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    with tempfile.TemporaryDirectory() as d:
        sr.save_as(f"{d}/sr.dcm", enforce_file_format=True)
        out = subprocess.run([exe, f"{d}/sr.dcm"], capture_output=True, timeout=60)
    text = (out.stdout + out.stderr).decode("latin-1")
    assert "ComprehensiveSR" in text, text  # dciodvfy recognised the IOD
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, errors


def source_secrets(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [str(ds[k].value) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if k in ds] + [
        str(ds[k].value) for k in ("PatientName", "PatientID", *EQUIPMENT) if k in ds and str(ds[k].value)]


def assert_nothing_leaked(text, paths):
    for path in paths:
        for secret in source_secrets(path):
            assert secret not in text, f"a value of {path} reached the logs"


def test_cli_writes_a_valid_sr_for_cr_dx_and_sc(model_path, sources, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    out, sr_dir = tmp_path / "r.json", tmp_path / "sr"
    paths = [sources["CR"], sources["DX"], sources["SC"]]
    # the SC is out of the model's scope (not a radiograph object): --force scores it, flagged
    assert main(["--model", str(model_path), *paths, "--force", "--sr-dir", str(sr_dir), "--out", str(out),
                 "-vv"]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["status"] for r in results] == ["scored", "scored", "flagged"]
    assert all(r["probabilities"] and "sr_error" not in r for r in results)
    srs = {pydicom.dcmread(p).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
           .ReferencedSOPSequence[0].ReferencedSOPInstanceUID: pydicom.dcmread(p) for p in sr_dir.iterdir()}
    assert len(srs) == 3
    by_kind = {}
    for kind, path in sources.items():
        sr = srs[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        check_sr(sr, path)
        by_kind[kind] = sr
    # the image library says what each source really has: pixel spacing for the DX only
    assert "Horizontal Pixel Spacing" in library_descriptors(by_kind["DX"])
    assert "Horizontal Pixel Spacing" not in library_descriptors(by_kind["CR"])
    assert "Pixel Data Rows" in library_descriptors(by_kind["SC"])
    captured = capfd.readouterr()
    assert_nothing_leaked(caplog.text + captured.err + captured.out + out.read_text(), paths)
    assert SC_NAME not in captured.err and "SR: " in caplog.text  # highdicom's name warning: counted, not quoted
    for sr in by_kind.values():
        assert sr.SOPInstanceUID not in caplog.text + captured.err


def test_the_sr_writer_directly(model_path, sources, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    model = Model(model_path)
    from raycxr_runtime.inference import Predictor

    for kind, path in sources.items():
        pred = Predictor(model, force=True).predict_file(path)
        assert pred.probabilities is not None, kind
        check_sr(pydicom.dcmread(write_sr(path, pred, model, tmp_path)), path)
        check_sr(make_sr(pydicom.dcmread(path, stop_before_pixels=True), pred, model), path)
    captured = capfd.readouterr()
    assert_nothing_leaked(caplog.text + captured.err, sources.values())


def test_an_sr_failure_keeps_the_scored_result(model_path, sources, tmp_path):
    """A source with no Series Instance UID scores but cannot have an SR: recorded as sr_error, the run goes on."""
    ds = pydicom.dcmread(sources["CR"])
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "no_series.dcm")
    out = tmp_path / "r.json"
    assert main(["--model", str(model_path), str(tmp_path / "no_series.dcm"), sources["DX"],
                 "--sr-dir", str(tmp_path / "sr"), "--out", str(out), "-q"]) == 0
    first, second = json.loads(out.read_text())["results"]
    assert first["status"] == "scored" and first["probabilities"]
    assert first["sr_error"] == "the source DICOM lacks SeriesInstanceUID"
    assert second["status"] == "scored" and "sr_error" not in second
    assert len(list((tmp_path / "sr").iterdir())) == 1
    assert main(["--model", str(model_path), str(tmp_path / "no_series.dcm"), "--sr-dir", str(tmp_path / "sr"),
                 "--out", str(tmp_path / "r.csv"), "-q"]) == 0
    assert "no structured report: the source DICOM lacks SeriesInstanceUID" in (tmp_path / "r.csv").read_text()


def test_http_predict_format_sr_answers_the_cr(model_path, sources, caplog):
    caplog.set_level(logging.DEBUG)
    srv = make_server(Model(model_path), host="127.0.0.1", port=0, max_bytes=16_000_000)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{srv.server_address[1]}/predict?format=sr",
                                     data=open(sources["CR"], "rb").read(), method="POST",
                                     headers={"Content-Type": "application/dicom", "X-Request-Id": "cr-1"})
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, data = r.status, r.headers["Content-Type"], r.read()
    finally:
        srv.shutdown()
        thread.join(10)
        srv.server_close()
    assert status == 200 and ctype == "application/dicom"
    check_sr(pydicom.dcmread(io.BytesIO(data)), sources["CR"])
    assert_nothing_leaked(caplog.text, [sources["CR"]])


def test_dicom_node_sends_the_sr_of_a_received_cr(model_path, sources, caplog):
    """The node answered the CR with Success and then sent no SR (AttributeError in the worker)."""
    pytest.importorskip("pynetdicom")
    caplog.set_level(logging.DEBUG)
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    from raycxr_runtime.dicom_node import Destination, DicomNode

    pacs_server, received = sr_receiver()
    node = DicomNode(Model(model_path), ae_title="RAYCXR", host="127.0.0.1", port=0,
                     destination=Destination("127.0.0.1", pacs_server.server_address[1], "TESTPACS"))
    try:
        cr = pydicom.dcmread(sources["CR"])
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(ComputedRadiographyImageStorage, cr.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR")
        assert assoc.is_established
        assert assoc.send_c_store(cr).Status == 0x0000
        assoc.release()
        assert node.wait_idle(120)
    finally:
        node.close()
        pacs_server.shutdown()
    assert node.stats == {"received": 1, "scored": 1, "sr_sent": 1, "sr_failed": 0, "not_scored": 0}
    assert len(received) == 1
    check_sr(received[0], sources["CR"])
    assert_nothing_leaked(caplog.text, [sources["CR"]])


def test_invalid_header_values_never_reach_the_logs(model_path, sources, tmp_path, caplog, capfd):
    """pydicom logs (and warns) each invalid value it is given while the SR is built, quoting it."""
    caplog.set_level(logging.DEBUG)
    ds = pydicom.dcmread(sources["DX"])
    ds.StudyInstanceUID = "1.2.840.77777.x77"  # not a valid UID: pydicom quotes it
    ds.PatientSex, ds.PatientBirthDate = "female", "1940-03-05"  # invalid: written empty, the SR still made
    ds.save_as(tmp_path / "bad.dcm")
    out = tmp_path / "r.json"
    assert main(["--model", str(model_path), str(tmp_path / "bad.dcm"), "--sr-dir", str(tmp_path / "sr"),
                 "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["status"] == "scored" and "sr_error" not in result
    (written,) = (tmp_path / "sr").iterdir()
    sr = pydicom.dcmread(written)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientSex == "" and sr.PatientBirthDate == ""
    text = caplog.text + capfd.readouterr().err
    assert "77777.x77" not in text and "female" not in text and "1940-03-05" not in text
    assert "SR: " in text  # the warnings were counted


def test_projection_descriptors_only_when_complete(model_path, sources):
    """A DX whose Patient Orientation has one value (highdicom indexes two) still gets a valid SR, without them."""
    from raycxr_runtime.inference import Predictor

    model = Model(model_path)
    pred = Predictor(model).predict_file(sources["DX"])
    ds = pydicom.dcmread(sources["DX"], stop_before_pixels=True)
    ds.PatientOrientation = "L"
    sr = make_sr(ds, pred, model)
    check_sr(sr, sources["DX"])
    assert "Horizontal Pixel Spacing" not in library_descriptors(sr)
    assert "Pixel Data Rows" in library_descriptors(sr)
