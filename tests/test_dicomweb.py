"""`raycxr-infer dicomweb` against a real PACS: Orthanc with its DICOMweb plugin (tests/orthanc.py).

A real chest CR from pydicom-data is uploaded through Orthanc's REST API, with a CT in the same
study; the command lists the study (QIDO-RS), retrieves the radiograph (WADO-RS), scores it with a
real ONNX model and stores the SR (STOW-RS). The SR is then read back through Orthanc's REST API."""

import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from runtime_helpers import tiny_classifier

from raycxr_runtime.cli import main
from raycxr_runtime.model import Model

pytest.importorskip("dicomweb_client", reason="needs dicomweb-client (raycxr-runtime[dicomweb])")
pytest.importorskip("highdicom", reason="needs highdicom (raycxr-runtime[dicomweb])")


@pytest.fixture(scope="module")
def pacs(orthanc):
    if orthanc.dicomweb is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb')")
    return orthanc


@pytest.fixture(scope="module")
def study(pacs):
    """A real CR chest PA (pydicom-data RG1_UNCR) and pydicom's CT_small, uploaded as one study."""
    cr_path = get_testdata_file("RG1_UNCR.dcm")
    if cr_path is None:
        pytest.skip("pydicom-data is not installed (RG1_UNCR.dcm)")
    cr = pydicom.dcmread(cr_path)
    # the file has PixelSpacing only; most CR/DX carry ImagerPixelSpacing, which highdicom's SR image
    # library reads (SRs for files without it are another change's business)
    cr.ImagerPixelSpacing = cr.PixelSpacing
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.StudyInstanceUID, ct.PatientID, ct.PatientName = cr.StudyInstanceUID, cr.PatientID, cr.PatientName
    for ds in (cr, ct):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        pacs.upload(buf.getvalue())
    return cr, ct


def orthanc_study(pacs, uid):
    return next(r["ID"] for r in pacs.rest("/tools/lookup", "POST", uid.encode()) if r["Type"] == "Study")


def sr_instances(pacs, uid):
    sid = orthanc_study(pacs, uid)
    out = []
    for series in pacs.rest(f"/studies/{sid}/series"):
        if series["MainDicomTags"].get("Modality") == "SR":
            for inst in series["Instances"]:
                out.append(pydicom.dcmread(io.BytesIO(pacs.rest(f"/instances/{inst}/file", raw=True))))
    return out


def test_dicomweb_scores_the_study_and_stores_the_sr_in_it(pacs, study, tmp_path, capsys):
    cr, ct = study
    model = tiny_classifier(tmp_path / "classifier.onnx", 2, ["Effusion", "Nodule"], thresholds=[0.3, 0.9])
    out = tmp_path / "r.json"
    assert main(["dicomweb", "--model", str(model), "--url", pacs.dicomweb, "--study", cr.StudyInstanceUID,
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 instance(s): 1 scored, 1 flagged, 0 error(s), 0 non-image skipped; 1 SR(s) stored" in err
    report = json.loads(out.read_text())
    results = {r["input"]: r for r in report["results"]}
    assert sorted(results) == ["instance #1", "instance #2"]
    scored = next(r for r in results.values() if r["status"] == "scored")
    flagged = next(r for r in results.values() if r["status"] == "flagged")
    assert "Modality 'CT'" in flagged["warnings"][0] and "not retrieved" in flagged["warnings"][0]
    # the same probabilities as scoring the same file locally
    local = tmp_path / "cr.dcm"
    cr.save_as(local, enforce_file_format=True)
    assert main(["--model", str(model), str(local), "--out", str(tmp_path / "local.json"), "-q"]) == 0
    assert json.loads((tmp_path / "local.json").read_text())["results"][0]["probabilities"] == \
        scored["probabilities"]

    [sr] = sr_instances(pacs, cr.StudyInstanceUID)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == cr.StudyInstanceUID
    assert sr.SeriesInstanceUID != cr.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == cr.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr.SOPInstanceUID
    values = [float(item.MeasuredValueSequence[0].NumericValue) for item in _walk(sr)
              if "MeasuredValueSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == "PROB"]
    assert np.allclose(sorted(values), sorted(scored["probabilities"].values()), atol=1e-5)
    # no patient attribute or UID of the source in what the command printed
    for value in (str(cr.PatientName), cr.PatientID, cr.StudyInstanceUID, cr.SOPInstanceUID):
        assert value not in err and value not in out.read_text()

    # a second run skips the SR the first one stored; --no-store leaves the PACS alone
    assert main(["dicomweb", "--model", str(model), "--url", pacs.dicomweb, "--study", cr.StudyInstanceUID,
                 "--no-store", "-q", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["status"] for r in again["results"]] == [r["status"] for r in report["results"]]
    assert len(sr_instances(pacs, cr.StudyInstanceUID)) == 1


def _walk(ds):
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


def test_dicomweb_problems_are_one_line(pacs, study, tmp_path, capsys):
    from orthanc import free_port

    model = tiny_classifier(tmp_path / "classifier.onnx", 2, ["A", "B"])
    assert Model(model).verified
    cases = [
        (["--url", pacs.dicomweb, "--study", "1.2.3.4.5.6.7.8.9"], "QIDO-RS found no instance in the study"),
        (["--url", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", study[0].StudyInstanceUID],
         "QIDO-RS search for the study's instances failed: ConnectionError"),
        (["--url", pacs.http + "/no-such-root", "--study", study[0].StudyInstanceUID],
         "QIDO-RS search for the study's instances failed: HTTP 404"),
        (["--url", "ftp://pacs/dicom-web", "--study", "1.2.3"], "--url must start with http:// or https://"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["dicomweb", "--model", str(model), *args, "--out", str(tmp_path / "r.json")]) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("raycxr-infer dicomweb: ") and message in err and "\n" not in err, err


def test_without_dicomweb_client_the_command_says_what_to_install(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['dicomweb_client'] = None\n"  # the import fails as if not installed
            "from raycxr_runtime.cli import main\n"
            f"raise SystemExit(main(['dicomweb', '--model', {str(tmp_path / 'm.onnx')!r}, '--url', "
            "'http://127.0.0.1:9/dicom-web', '--study', '1.2.3']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("raycxr-infer dicomweb: DICOMweb needs dicomweb-client: "
                                   "pip install 'raycxr-runtime[dicomweb]'")
