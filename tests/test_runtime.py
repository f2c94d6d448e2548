"""The hospital runtime (deploy/raycxr_runtime): real DICOM files, a real ONNX export run by
onnxruntime, the CLI in a process without torch or Ray, the HTTP service over real sockets, and
no patient identifier in any output or log line.

The model is an untrained UniChest exported by `raycxr.export.export_model` (see test_export.py for
why untrained); the images are the synthetic corpus's DICOMs (DX, explicit VR, RLE, JPEG 2000,
MONOCHROME1 and 2) and pydicom's shipped CT / MR files.
"""

import csv
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from conftest import untrained_unichest_state
from PIL import Image
from pydicom.data import get_testdata_file
from runtime_helpers import sr_receiver, tiny_classifier

from raycxr.eval.predict import site_targets
from raycxr.export import export_model
from raycxr.methods import load_pretrained
from raycxr.readers import read_image
from raycxr.sites.config import discover_sites
from raycxr.synth.generator import synthesize
from raycxr.transforms import eval_transforms
from raycxr_runtime.cli import main
from raycxr_runtime.inference import Predictor
from raycxr_runtime.model import Model, ModelError
from raycxr_runtime.safety import check_header
from raycxr_runtime.server import make_server

PHI = ["Doe^Jane^Secret", "Jane Doe", "MRN-4242-PHI", "19450317", "ACC-777-PHI", "1.2.826.0.1.999.4242"]
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus(small_corpus, tmp_path_factory):
    """The session corpus (nih, vindr, siim) plus a small CheXpert-like site, which has lateral views."""
    extra = tmp_path_factory.mktemp("chexpert")
    synthesize(extra, ["chexpert"], n_per_site=16, seed=1, render_size=128, workers=2, preview=False, progress=False)
    d = tmp_path_factory.mktemp("sites")
    for n in ("nih", "vindr", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    sites = discover_sites(d, data_root=small_corpus)
    return {"overrides": [f"sites.sites_dir={d}", f"sites.data_root={small_corpus}"], "sites": sites,
            "chexpert": extra / "chexpert"}


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    pre = load_pretrained(untrained_unichest_state(corpus["overrides"]))
    out = tmp_path_factory.mktemp("export")
    thresholds = np.linspace(0.3, 0.7, len(pre.class_names))
    export_model(pre, out, thresholds=thresholds, thresholds_note="test", model_version="test-1", progress=False)
    return pre, out / "classifier.onnx", thresholds


@pytest.fixture(scope="module")
def model(exported):
    return Model(exported[1], threads=2)


@pytest.fixture(scope="module")
def files(corpus, tmp_path_factory):
    """Named real files: chest DX of each site (test split), a lateral, a PNG, CT/MR, and broken files."""
    d = tmp_path_factory.mktemp("files")
    out = {}
    for name, site in corpus["sites"].items():
        m = site.load_manifest().to_pandas()
        out[name] = [str(site.root / p) for p in m["path"][:2]]
    chex = pd.read_parquet(corpus["chexpert"] / "manifest.parquet")
    out["lateral"] = str(corpus["chexpert"] / chex[chex["view"] == "LATERAL"]["path"].iloc[0])
    out["chexpert_frontal"] = str(corpus["chexpert"] / chex[chex["view"] != "LATERAL"]["path"].iloc[0])
    png = d / "frontal.png"
    Image.fromarray((read_image(out["nih"][0]) * 255).round().astype(np.uint8)).save(png)
    out["png"] = str(png)
    out["ct"] = get_testdata_file("CT_small.dcm")
    out["mr"] = get_testdata_file("MR_small.dcm")
    (d / "garbage.dcm").write_bytes(b"this is not a DICOM file\n" * 20)
    out["garbage"] = str(d / "garbage.dcm")
    raw = open(out["nih"][0], "rb").read()
    (d / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = str(d / "truncated.dcm")
    (d / "notes.png").write_text("not an image")
    out["fake_png"] = str(d / "notes.png")
    # patient identifiers in every place a header holds them (and in free text)
    ds = pydicom.dcmread(out["vindr"][0])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[2], PHI[3]
    ds.AccessionNumber, ds.StudyInstanceUID = PHI[4], PHI[5]
    ds.SeriesDescription = f"chest of {PHI[1]}"
    ds.save_as(d / "phi_chest.dcm")
    ds.Modality, ds.ViewPosition, ds.SeriesDescription = "CT", "", f"LATERAL {PHI[1]}"
    ds.save_as(d / "phi_flagged.dcm")
    out["phi"] = [str(d / "phi_chest.dcm"), str(d / "phi_flagged.dcm")]
    return out


def model_classes(path):
    return Model(path).class_names


def torch_eval_path(pre, paths):
    """raycxr's evaluation preprocessing (SiteDataset: read_image, then eval_transforms) and the PyTorch classifier."""
    tf = eval_transforms(pre.image_size)
    x = torch.stack([torch.as_tensor(np.asarray(tf({"image": read_image(p)[None]})["image"])) for p in paths])
    with torch.no_grad():
        return pre.classifier(x).numpy()


def test_runtime_equals_pytorch_eval_path_on_real_dicoms(exported, model, corpus, files):
    pre, _, thresholds = exported
    paths = []
    for site in corpus["sites"].values():  # the evaluation split through raycxr's own dataset
        ds, _, _ = site_targets(site, pre.class_names, "test")
        paths += [str(ds.root / p) for p in ds.df["path"][:2]]
    paths += [files["chexpert_frontal"], files["png"]]  # JPEG 2000 DICOM, and an 8-bit PNG
    results = Predictor(model, batch_size=3).predict_files(paths)
    assert [r.status for r in results] == ["scored"] * len(paths)
    got = np.array([[r.probabilities[c] for c in pre.class_names] for r in results])
    want = torch_eval_path(pre, paths)
    assert np.abs(got - want).max() <= 1e-4
    assert want.std(0).max() > 1e-3  # the images give different probabilities: the comparison is not vacuous
    for r, p in zip(results, got):
        assert r.findings == [c for c, v, t in zip(pre.class_names, p, thresholds) if v >= t]
        assert r.model_version == "test-1" and r.input in paths
    assert results[-1].warnings == ["not DICOM: modality, body part and view could not be checked"]


def test_out_of_scope_images_are_flagged_not_scored(model, files):
    pred = Predictor(model)
    ct, mr, lateral = pred.predict_files([files["ct"], files["mr"], files["lateral"]])
    assert ct.status == "flagged" and ct.probabilities is None and ct.findings == []
    assert any("not a chest radiograph: Modality 'CT'" in w for w in ct.warnings)
    assert any("SOP class 'CT Image Storage'" in w for w in ct.warnings)
    assert mr.status == "flagged" and any("Modality 'MR'" in w for w in mr.warnings)
    assert lateral.status == "flagged" and lateral.probabilities is None
    assert "lateral view (ViewPosition 'LL'): this model is frontal-only" in lateral.warnings
    forced = Predictor(model, force=True).predict_files([files["ct"], files["lateral"]])
    for r in forced:  # scored on request, still marked out of scope
        assert r.status == "flagged" and len(r.probabilities) == len(model.class_names)
        assert any("force" in w for w in r.warnings)


def test_header_rules(files):
    ds = pydicom.dcmread(files["nih"][0], stop_before_pixels=True)
    assert check_header(ds) == ([], [])
    for keyword, value, expect in [
        ("BodyPartExamined", "KNEE", "BodyPartExamined 'KNEE'"),
        ("SOPClassUID", pydicom.uid.DigitalMammographyXRayImageStorageForPresentation, "Mammography"),
        ("SOPClassUID", pydicom.uid.DigitalXRayImageStorageForProcessing, "For Processing"),
        ("Modality", "US", "Modality 'US'"),
        ("ViewPosition", "RL", "ViewPosition 'RL'"),
    ]:
        bad = pydicom.dcmread(files["nih"][0], stop_before_pixels=True)
        setattr(bad, keyword, value)
        flags, _ = check_header(bad)
        assert len(flags) == 1 and expect in flags[0], (keyword, flags)
    for body in ("", "THORAX", "PORT CHEST", "CHEST_PA", "TORAX"):
        ds.BodyPartExamined = body
        assert check_header(ds)[0] == []
    ds.ViewPosition, ds.SeriesDescription = "", "Thorax lateral"
    assert check_header(ds)[0] == ["lateral view (SeriesDescription mentions a lateral view): this model is "
                                   "frontal-only"]
    assert check_header(ds, frontal_only=False)[0] == []
    ds.SeriesDescription = "left lateral decubitus"  # a frontal projection
    assert check_header(ds)[0] == []
    ds.ViewPosition, ds.SeriesDescription = "PA", "CHEST PA AND LAT"  # series text; this image says PA
    assert check_header(ds)[0] == []
    del ds.Modality, ds.BodyPartExamined
    assert check_header(ds) == ([], ["no Modality in the DICOM header: modality not checked",
                                     "no BodyPartExamined in the DICOM header: body part not checked"])


def test_unreadable_files_get_error_status_with_the_reason(model, files, tmp_path):
    paths = [files["garbage"], files["truncated"], str(tmp_path / "missing.dcm"), files["fake_png"]]
    results = Predictor(model).predict_files(paths)
    assert [r.status for r in results] == ["error"] * 4
    assert all(r.probabilities is None for r in results)
    reasons = [r.warnings[-1] for r in results]
    assert "not a DICOM file" in reasons[0]
    assert "truncated" in reasons[1]
    assert reasons[2] == "file not found"
    assert "unreadable image file" in reasons[3]


def test_model_file_errors(exported, tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        Model(tmp_path / "nope.onnx")
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ModelError, match=r"text\.onnx: not a loadable ONNX model"):
        Model(tmp_path / "text.onnx")
    m = onnx.load(str(exported[1]))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match=r"bare\.onnx: no raycxr metadata .*raycxr export"):
        Model(tmp_path / "bare.onnx")
    model = Model(exported[1])
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 64, 64\)"):
        model.predict(np.zeros((2, 64, 64), np.float32))
    encoder = Model(exported[1].with_name("encoder.onnx"))
    assert encoder.kind == "encoder" and encoder.predict(np.zeros((3, 1, 64, 64), np.float32)).shape == (3, 32)
    with pytest.raises(ValueError, match="needs a classifier"):
        Predictor(encoder)


def test_cli_folders_json_and_csv(exported, files, tmp_path, capsys):
    _, onnx_path, _ = exported
    folder = tmp_path / "study" / "nested"
    folder.mkdir(parents=True)
    for p in files["nih"]:
        shutil.copy(p, folder)
    shutil.copy(files["ct"], tmp_path / "study" / "1.2.840.99")  # PACS-style name without suffix: sniffed
    (tmp_path / "study" / "readme.txt").write_text("skip me")
    assert main(["--model", str(onnx_path), str(tmp_path / "study"), files["lateral"], "--out",
                 str(tmp_path / "r.json"), "--batch-size", "2", "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"] == {"scored": 2, "flagged": 2, "error": 0}
    assert report["model"]["model_version"] == "test-1"
    assert [r["input"] for r in report["results"]] == [
        str(tmp_path / "study" / "1.2.840.99"), *sorted(str(folder / p.split("/")[-1]) for p in files["nih"]),
        files["lateral"]]
    for r in report["results"]:
        assert set(r) == {"input", "status", "warnings", "probabilities", "findings", "model_version"}

    assert main(["--model", str(onnx_path), files["nih"][0], files["ct"], "--out", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["status"] for r in rows] == ["scored", "flagged"]
    assert 0.0 <= float(rows[0]["prob:Pneumothorax"]) <= 1.0 and rows[1]["prob:Pneumothorax"] == ""
    assert "Modality 'CT'" in rows[1]["warnings"]
    err = capsys.readouterr().err
    assert "2 file(s): 1 scored, 1 flagged, 0 error(s)" in err

    assert main(["--model", str(onnx_path), files["nih"][0]]) == 0  # JSON on stdout
    assert json.loads(capsys.readouterr().out)["results"][0]["status"] == "scored"
    assert main(["--model", str(tmp_path / "none.onnx"), files["nih"][0]]) == 2
    assert "none.onnx: model file not found" in capsys.readouterr().err
    assert main(["--model", str(onnx_path.with_name("encoder.onnx")), files["nih"][0]]) == 2
    assert "needs a classifier" in capsys.readouterr().err
    assert main(["--model", str(onnx_path), files["nih"][0], "--out", str(tmp_path / "r.xlsx")]) == 2
    assert main(["--model", str(onnx_path), str(tmp_path / "missing.dcm")]) == 0  # kept, reported as an error
    assert json.loads(capsys.readouterr().out)["results"][0]["warnings"] == ["file not found"]


def test_runtime_runs_without_torch_ray_or_raycxr_and_leaks_no_phi(exported, files, tmp_path):
    """`python -m raycxr_runtime` in a process where importing torch, ray or raycxr fails, on files
    carrying patient identifiers: the output and everything it printed or logged is free of them."""
    _, onnx_path, _ = exported
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['ray'] = None; sys.modules['raycxr'] = None; "
            "sys.argv = ['raycxr-infer', *sys.argv[1:]]; runpy.run_module('raycxr_runtime', run_name='__main__')")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-c", code, "--model", str(onnx_path), *files["phi"], files["nih"][0],
                           files["lateral"], "--out", str(out), "-vv"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["status"] for r in report["results"]] == ["scored", "flagged", "scored", "flagged"]
    flagged = report["results"][1]["warnings"]
    assert any("Modality 'CT'" in w for w in flagged)
    assert "lateral view (SeriesDescription mentions a lateral view): this model is frontal-only" in flagged
    in_process = Predictor(Model(onnx_path)).predict_file(files["nih"][0])
    got = report["results"][2]["probabilities"]
    assert np.allclose([got[c] for c in model_classes(onnx_path)],
                       [in_process.probabilities[c] for c in model_classes(onnx_path)], atol=1e-5)
    assert "phi_chest.dcm: scored" in proc.stderr  # the log names files as given
    text = out.read_text() + proc.stdout + proc.stderr
    for identifier in PHI:
        assert identifier not in text


def test_no_phi_in_cli_logs_in_process(exported, files, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    assert main(["--model", str(exported[1]), *files["phi"], "--out", str(tmp_path / "r.csv"), "-vv",
                 "--force"]) == 0
    captured = capsys.readouterr()
    text = (tmp_path / "r.csv").read_text() + caplog.text + captured.out + captured.err
    assert "phi_flagged.dcm" in caplog.text  # the logs did record these files
    for identifier in PHI:
        assert identifier not in text


@pytest.fixture(scope="module")
def server(model):
    srv = make_server(model, host="127.0.0.1", port=0, max_bytes=MAX_BYTES)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def call(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_http_service(server, model, files, caplog):
    caplog.set_level(logging.DEBUG)
    status, _, body = call(f"{server}/health")
    assert status == 200 and body["status"] == "ok" and body["model_version"] == "test-1"
    status, _, body = call(f"{server}/model")
    assert status == 200 and body["class_names"] == model.class_names and body["input_size"] == 64
    assert body["frontal_only"] is True and set(body["thresholds"]) == set(model.class_names)

    dcm = open(files["nih"][0], "rb").read()
    status, headers, body = call(f"{server}/predict", "POST", dcm,
                                 {"Content-Type": "application/dicom", "X-Request-Id": "req-17"})
    assert status == 200 and body["status"] == "scored" and body["input"] == "req-17"
    assert headers["X-Request-Id"] == "req-17"
    expected = Predictor(model).predict_file(files["nih"][0])
    assert np.allclose([body["probabilities"][c] for c in model.class_names],
                       [expected.probabilities[c] for c in model.class_names], atol=1e-5)
    status, _, body = call(f"{server}/predict?name=frontal.png", "POST", open(files["png"], "rb").read(),
                           {"Content-Type": "image/png"})
    assert status == 200 and body["input"] == "frontal.png" and body["status"] == "scored"
    status, _, body = call(f"{server}/predict", "POST", open(files["ct"], "rb").read(),
                           {"Content-Type": "application/octet-stream"})  # sniffed as DICOM
    assert status == 200 and body["status"] == "flagged" and body["probabilities"] is None

    status, _, body = call(f"{server}/predict", "POST", b"\0" * (MAX_BYTES + 1), {"Content-Type": "application/dicom"})
    assert status == 413 and str(MAX_BYTES) in body["error"]
    status, _, body = call(f"{server}/predict", "POST", b"", {"Content-Type": "application/dicom"})
    assert status == 400 and "empty request body" in body["error"]
    status, _, body = call(f"{server}/predict", "POST", b"garbage" * 50, {"Content-Type": "application/dicom"})
    assert status == 422 and "not a DICOM file" in body["error"] and body["status"] == "error"
    assert "upload" in body["input"] and "/tmp" not in json.dumps(body)  # no server-side path leaks
    status, _, body = call(f"{server}/predict", "POST", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "application/dicom" in body["error"]
    status, _, body = call(f"{server}/nope")
    assert status == 404 and "POST /predict" in body["error"]
    status, headers, body = call(f"{server}/predict")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, body = call(f"{server}/health", "POST", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and headers["Allow"] == "GET, HEAD"

    phi = open(files["phi"][0], "rb").read()
    status, _, body = call(f"{server}/predict", "POST", phi, {"Content-Type": "application/dicom",
                                                              "X-Request-Id": "req-phi"})
    assert status == 200 and body["status"] == "scored"
    assert "POST /predict -> 200 (req-phi)" in caplog.text
    for identifier in PHI:
        assert identifier not in json.dumps(body) and identifier not in caplog.text


# ----------------------------------------------------------------------------------- issue 11: CLI robustness


def test_cli_out_into_a_missing_folder_fails_before_scoring(exported, files, tmp_path, capsys, monkeypatch):
    scored = []
    monkeypatch.setattr(Model, "predict", lambda self, x: scored.append(len(x)) or np.zeros((len(x), 1)))
    assert main(["--model", str(exported[1]), files["nih"][0], "--out", str(tmp_path / "nope" / "r.json")]) == 2
    assert "cannot write" in capsys.readouterr().err and scored == [1]  # only the load-time probe ran


def test_cli_keeps_what_it_scored_when_the_run_fails(exported, files, tmp_path, capsys, monkeypatch):
    real, calls = Model.predict, []

    def flaky(self, x):
        calls.append(len(x))
        if len(calls) == 3:  # the second batch (call 1 is the load-time probe)
            raise MemoryError("Unable to allocate 6.71 GiB")
        return real(self, x)

    monkeypatch.setattr(Model, "predict", flaky)
    paths = [*files["nih"], *files["vindr"]]
    for out in ("r.json", "r.jsonl", "r.csv"):
        calls.clear()
        assert main(["--model", str(exported[1]), *paths, "--out", str(tmp_path / out), "--batch-size", "2",
                     "-q"]) == 1
        assert "stopped after 2 of 4 file(s): MemoryError" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())  # still valid JSON
    assert [r["status"] for r in report["results"]] == ["scored", "scored"]
    assert report["complete"] is False and "MemoryError" in report["error"]
    assert report["summary"] == {"scored": 2, "flagged": 0, "error": 0}
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert "model" in lines[0] and [x["status"] for x in lines[1:3]] == ["scored", "scored"]
    assert lines[-1]["complete"] is False
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 2


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException (a BaseException)."""


def test_cli_bomb_and_a_panicking_reader_fail_their_file_only(exported, files, tmp_path, monkeypatch, capsys):
    from test_pixel_budget import rle_dicom

    import raycxr_runtime.inference as inference

    bomb = rle_dicom(tmp_path / "bomb.dcm", 30000, 30000)
    real = inference.read_image

    def reader(path, **kw):
        if "vindr" in str(path):
            raise FakePanic("panicked at 'attempt to multiply with overflow'")
        return real(path, **kw)

    monkeypatch.setattr(inference, "read_image", reader)
    out = tmp_path / "r.json"
    assert main(["--model", str(exported[1]), files["nih"][0], str(bomb), files["vindr"][0], files["nih"][1],
                 "--out", str(out), "-q", "--workers", "0"]) == 0  # in process: the patched reader runs
    results = json.loads(out.read_text())["results"]
    assert [r["status"] for r in results] == ["scored", "error", "error", "scored"]
    assert "over the pixel budget: declares 30000x30000" in results[1]["warnings"][-1]
    assert results[2]["warnings"][-1].startswith("reading the image failed: FakePanic: panicked at")


def test_cli_isolated_workers_give_the_same_results(exported, files, tmp_path):
    from test_pixel_budget import rle_dicom

    bomb = str(rle_dicom(tmp_path / "bomb.dcm", 30000, 30000))
    paths = [files["nih"][0], bomb, files["ct"], files["png"], files["garbage"]]
    assert main(["--model", str(exported[1]), *paths, "--out", str(tmp_path / "a.json"), "-q"]) == 0
    assert main(["--model", str(exported[1]), *paths, "--out", str(tmp_path / "b.json"), "-q", "--workers", "2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "raycxr_runtime", "--model", str(exported[1]), *paths, "--workers",
                           "2", "--out", str(tmp_path / "c.json"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # `python -m` with spawned workers
    a, b, c = (json.loads((tmp_path / f).read_text())["results"] for f in ("a.json", "b.json", "c.json"))
    assert a == b == c and [r["status"] for r in a] == ["scored", "error", "flagged", "scored", "error"]


# ----------------------------------------------------------------------------------- issue 11: model integrity


def test_flipped_bytes_and_edited_metadata_are_refused(exported, tmp_path):
    from raycxr.export import write_metadata

    data = bytearray(exported[1].read_bytes())
    mid = len(data) // 2  # inside the weights
    data[mid:mid + 2000] = bytes(b ^ 0x5A for b in data[mid:mid + 2000])
    (tmp_path / "flipped.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"flipped\.onnx: integrity check failed: the weights/graph digest"):
        Model(tmp_path / "flipped.onnx")
    m = onnx.load(str(exported[1]))
    for p in m.metadata_props:
        if p.key == "raycxr.thresholds":
            p.value = json.dumps([0.01] * len(json.loads(p.value)))
    onnx.save(m, str(tmp_path / "edited.onnx"))
    with pytest.raises(ModelError, match="metadata .* was changed after export"):
        Model(tmp_path / "edited.onnx")
    for p in list(m.metadata_props):
        if p.key in ("raycxr.weights_sha256", "raycxr.metadata_sha256"):
            m.metadata_props.remove(p)
    onnx.save(m, str(tmp_path / "old.onnx"))
    with pytest.raises(ModelError, match="no integrity digest .*re-export"):
        Model(tmp_path / "old.onnx")
    assert not Model(tmp_path / "old.onnx", verify=False).verified  # explicitly allowed
    good = Model(exported[1])
    assert good.verified and good.info()["verified"] is True
    meta = {p.key: p.value for p in onnx.load(str(exported[1])).metadata_props}
    write_metadata(tmp_path / "old.onnx", meta, "re-exported")  # the exporter's writer stores fresh digests
    assert Model(tmp_path / "old.onnx").verified


def test_nan_outputs_give_error_status_and_valid_json(files, tmp_path):
    # NaN only for dark images: the load probe (mean 0.5) passes, the two dark real images give NaN
    path = tiny_classifier(tmp_path / "nan.onnx", 2, ["A", "B"], expr="nan_dark")
    dark = []
    for name, src in (("dark.png", files["png"]), ("dark.tif", files["png"])):
        Image.fromarray((np.asarray(Image.open(src), np.float32) * 0.2).astype(np.uint8)).save(tmp_path / name)
        dark.append(str(tmp_path / name))
    out = tmp_path / "r.json"
    assert main(["--model", str(path), *dark, "--out", str(out), "-q"]) == 0
    text = out.read_text()

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    report = json.loads(text, parse_constant=no_constants)
    assert [r["status"] for r in report["results"]] == ["error", "error"]
    assert all(r["probabilities"] is None for r in report["results"])
    assert "non-finite probabilities (NaN or inf) for 2 class(es) (A, B)" in report["results"][0]["warnings"][-1]


def test_output_width_other_than_the_class_count_is_refused(tmp_path):
    tiny_classifier(tmp_path / "ok.onnx", 3, ["A", "B", "C"])
    assert Model(tmp_path / "ok.onnx").predict(np.zeros((2, 1, 64, 64), np.float32)).shape == (2, 3)
    tiny_classifier(tmp_path / "wide.onnx", 4, ["A", "B", "C"])
    with pytest.raises(ModelError, match=r"wide\.onnx: output 'probabilities' has shape \[1, 4\] .*expected \[1, 3\]"):
        Model(tmp_path / "wide.onnx")


# ----------------------------------------------------------------------------------- issue 11: the HTTP layer


def raw_http(port, data, *, read_for=10.0, pause_after=None):
    """Write raw bytes to the service and read until it closes the connection (or ``read_for`` passes)."""
    import socket
    import time

    s = socket.create_connection(("127.0.0.1", port), timeout=read_for)
    try:
        s.sendall(data)
        if pause_after is not None:
            time.sleep(pause_after)
        out, deadline = b"", time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def port_of(url):
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def strict_server(model):
    """Short timeouts and one upload at a time, for the stall / queue cases."""
    srv = make_server(model, host="127.0.0.1", port=0, max_bytes=MAX_BYTES, decode_workers=1, max_inflight=1,
                      body_timeout=2.0, queue_timeout=0.5, header_timeout=1.0, per_client_uploads=2)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    thread.join(10)
    srv.server_close()


def test_http_leftover_body_bytes_never_reach_logs_or_answers(server, files, caplog):
    """Content-Length smaller than the body on a keep-alive connection: the rest (DICOM elements with
    the patient ID) is parsed as a new request. The old server logged and echoed it."""
    caplog.set_level(logging.DEBUG)
    body = open(files["phi"][0], "rb").read()
    at = body.index(PHI[2].encode())  # the PatientID value
    cut = at - 8  # the leftover starts in the patient module
    req = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\nConnection: keep-alive\r\n"
           b"Content-Length: " + str(cut).encode() + b"\r\n\r\n" + body)
    answer = raw_http(port_of(server), req)
    assert answer.startswith(b"HTTP/1.1 422") and b"HTTP/1.1 400" in answer  # truncated file, then the leftover
    for identifier in PHI:
        assert identifier.encode() not in answer and identifier not in caplog.text
    assert "MRN" not in caplog.text and "Traceback" not in caplog.text


def test_http_unicode_names_and_malformed_requests(server, files, caplog):
    caplog.set_level(logging.DEBUG)
    dcm = open(files["nih"][0], "rb").read()
    status, headers, body = call(f"{server}/predict?name=%C3%A9t%C3%A9%20%E2%9C%93", "POST", dcm,
                                 {"Content-Type": "application/dicom"})
    assert status == 200 and body["input"] == "été ✓" and headers["X-Request-Id"] == "%C3%A9t%C3%A9%20%E2%9C%93"
    req = (b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/dicom\r\n"
           b"X-Request-Id: " + "ordre-é".encode() + b"\r\nContent-Length: " + str(len(dcm)).encode() + b"\r\n\r\n"
           + dcm)
    answer = raw_http(port_of(server), req)
    assert answer.startswith(b"HTTP/1.1 200") and '"input": "ordre-é"'.encode() in answer
    for line in (b"GET\r\n\r\n", b"GET /health\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                 b"GET /health HTTP/1.1 extra\r\n\r\n", "GET /h\u00e9alth HTTP/1.1\r\n\r\n".encode()):
        answer = raw_http(port_of(server), line)
        assert answer.startswith(b"HTTP/1.1 400"), (line, answer[:80])
        assert line.split(b"\r\n")[0] not in answer  # the request line is not echoed
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_http_head_trace_and_temp_paths(server, caplog):
    answer = raw_http(port_of(server), b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower() and rest == b""
    status, headers, body = call(f"{server}/health", "TRACE")
    assert status == 405 and headers["Content-Type"].startswith("application/json") and headers["Allow"] == "GET, HEAD"
    for data, ctype in [(b"garbage" * 50, "application/dicom"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"),
                        (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff", "application/octet-stream"),
                        (b"<?xml version='1.0'?><x/>", "application/octet-stream")]:
        status, _, body = call(f"{server}/predict", "POST", data, {"Content-Type": ctype})
        text = json.dumps(body)
        assert status == 422 and "raycxr-" not in text and "/tmp" not in text and "upload." not in text, text


def test_http_stalled_body_gets_408_and_half_open_connections_are_quiet(strict_server, caplog):
    import socket
    import time

    caplog.set_level(logging.DEBUG)
    port = port_of(strict_server)
    t = time.monotonic()
    answer = raw_http(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                            b"Content-Length: 5000\r\n\r\n" + b"\0" * 100)
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer and time.monotonic() - t < 8
    socks = []
    for i in range(40):  # half-open: half a request line, half a body, then dropped
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /hea" if i % 2 else b"POST /predict HTTP/1.1\r\nContent-Length: 900\r\n\r\nabc")
        socks.append(s)
    for s in socks[::2]:
        s.close()
    time.sleep(3.0)  # past the header and body timeouts
    closed = 0
    for s in socks[1::2]:  # the server closed the ones it was waiting on
        s.settimeout(3)
        try:
            closed += s.recv(10) == b""
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
    assert closed == 20
    assert call(f"{strict_server}/health")[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


def test_http_uploads_are_bounded(strict_server, files, tmp_path):
    """One upload at a time here: a second one waits for the queue timeout, then gets 503; the 14 MB
    bomb is over this server's body limit (413)."""
    import socket

    from test_pixel_budget import rle_dicom

    port = port_of(strict_server)
    hold = socket.create_connection(("127.0.0.1", port))
    hold.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                 b"Content-Length: 900\r\n\r\nab")
    import time

    time.sleep(0.3)
    status, headers, body = call(f"{strict_server}/predict", "POST", open(files["nih"][0], "rb").read(),
                                 {"Content-Type": "application/dicom"})
    assert status == 503 and headers["Retry-After"] == "5"
    hold.close()
    time.sleep(0.5)
    bomb = rle_dicom(tmp_path / "bomb.dcm", 30000, 30000).read_bytes()
    assert len(bomb) > MAX_BYTES  # over this server's body limit: 413 before anything is read
    status, _, body = call(f"{strict_server}/predict", "POST", bomb, {"Content-Type": "application/dicom"})
    assert status == 413


def test_http_bombs_under_the_body_limit_are_refused_from_the_header(server, files, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from test_pixel_budget import rle_dicom

    # 16-bit, 3 samples: declares 20000 x 20000 x 3 x 2 bytes = 2.2 GiB, file a few hundred kB
    bomb = rle_dicom(tmp_path / "bomb.dcm", 2000, 2000)
    ds = pydicom.dcmread(bomb)
    ds.Rows = ds.Columns = 20000
    ds.save_as(tmp_path / "bomb2.dcm")
    data = (tmp_path / "bomb2.dcm").read_bytes()
    assert len(data) < MAX_BYTES
    with ThreadPoolExecutor(2) as ex:
        answers = list(ex.map(lambda _: call(f"{server}/predict", "POST", data, {"Content-Type": "application/dicom"}),
                              range(2)))
    for status, _, body in answers:
        assert status == 422 and "over the pixel budget" in body["error"]
    assert call(f"{server}/health")[0] == 200


# ----------------------------------------------------------------------------------- DICOM SR and the DICOM node


def check_sr(sr, source_path, model, expected):
    """The SR references the source's study / series / instance, copies its patient module, and holds
    per finding the probability, the threshold and the decision, and the model version."""
    hd = pytest.importorskip("highdicom")
    src = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID != src.SOPInstanceUID
    assert (sr.PatientID, sr.PatientName) == (src.PatientID, src.PatientName)  # same patient, for the PACS
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == src.StudyInstanceUID
    ref = ev.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)
    report = hd.sr.MeasurementReport.from_sequence([parsed])  # the SR's root container
    found = {}
    for g in report.get_image_measurement_groups():
        name = g.finding_type.meaning
        values = {m.name.meaning: m.value for m in g.get_measurements()}
        decision = g.get_qualitative_evaluations()[0].value.meaning
        texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.get("TextValue") for i in g[0].ContentSequence}
        assert texts["Algorithm Version"] == model.model_version
        assert g.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
        found[name] = (values["Probability of finding"], values["Decision threshold"], decision)
    assert set(found) == set(model.class_names)
    for c, t in zip(model.class_names, model.thresholds):
        p, thr, decision = found[c]
        assert p == pytest.approx(expected.probabilities[c], abs=1e-6) and thr == pytest.approx(t)
        assert decision == ("Present" if c in expected.findings else "Absent")


def test_sr_from_the_cli_and_the_service(exported, model, files, tmp_path, server, caplog, capsys):
    pytest.importorskip("highdicom")
    caplog.set_level(logging.DEBUG)
    src = files["phi"][0]
    expected = Predictor(model).predict_file(src)
    assert main(["--model", str(exported[1]), src, files["ct"], files["png"], "--sr-dir", str(tmp_path / "sr"),
                 "--out", str(tmp_path / "r.json"), "-vv"]) == 0
    written = list((tmp_path / "sr").iterdir())
    assert len(written) == 1  # the scored DICOM; the CT is flagged and the PNG has no UIDs to reference
    check_sr(pydicom.dcmread(written[0]), src, model, expected)
    req = urllib.request.Request(f"{server}/predict?format=sr", data=open(src, "rb").read(), method="POST",
                                 headers={"Content-Type": "application/dicom", "X-Request-Id": "sr-1"})
    with urllib.request.urlopen(req, timeout=60) as r:
        status, ctype, data = r.status, r.headers["Content-Type"], r.read()
    assert status == 200 and ctype == "application/dicom"
    import io

    check_sr(pydicom.dcmread(io.BytesIO(data)), src, model, expected)
    status, _, body = call(f"{server}/predict?format=sr", "POST", open(files["ct"], "rb").read(),
                           {"Content-Type": "application/dicom"})
    assert status == 422 and "no structured report: the image was not scored (flagged)" in body["error"]
    captured = capsys.readouterr()
    for identifier in PHI:  # the SR carries the patient module; logs and JSON never do
        assert identifier not in caplog.text + captured.err + (tmp_path / "r.json").read_text()


def test_dicom_node_scores_received_images_and_sends_the_sr(model, files, caplog, tmp_path):
    pytest.importorskip("pynetdicom")
    caplog.set_level(logging.INFO)
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from raycxr_runtime.dicom_node import Destination, DicomNode

    pacs_server, received = sr_receiver()
    node = DicomNode(model, ae_title="RAYCXR", host="127.0.0.1", port=0, spool_dir=tmp_path / "spool",
                     destination=Destination("127.0.0.1", pacs_server.server_address[1], "TESTPACS"))
    try:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(DigitalXRayImageStorageForPresentation, pydicom.dcmread(files["phi"][0]).file_meta
                                  .TransferSyntaxUID)
        scu.add_requested_context(pydicom.uid.CTImageStorage, pydicom.dcmread(files["ct"]).file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", node.port, ae_title="RAYCXR")
        assert assoc.is_established
        for path in (files["phi"][0], files["ct"]):
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        assoc.release()
        assert node.wait_idle(120)
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        node.close()
        pacs_server.shutdown()
    assert node.stats == {"received": 2, "scored": 1, "sr_sent": 1, "sr_failed": 0, "not_scored": 1}
    assert len(received) == 1  # the CT was flagged: no SR
    check_sr(received[0], files["phi"][0], model, Predictor(model).predict_file(files["phi"][0]))
    assert "image #1: scored, SR sent to TESTPACS" in caplog.text and "image #2: flagged, no SR" in caplog.text
    for identifier in PHI:
        assert identifier not in caplog.text


def test_openvino_backend_gives_the_same_results(exported, model, files):
    pytest.importorskip("openvino")
    ov = Model(exported[1], threads=2, backend="openvino")
    assert ov.backend == "openvino" and ov.verified
    paths = [*files["nih"], *files["vindr"], files["png"], files["chexpert_frontal"]]
    a = Predictor(model, batch_size=3).predict_files(paths)
    b = Predictor(ov, batch_size=3).predict_files(paths)
    assert [r.status for r in b] == ["scored"] * len(paths)
    pa = np.array([[r.probabilities[c] for c in model.class_names] for r in a])
    pb = np.array([[r.probabilities[c] for c in model.class_names] for r in b])
    assert np.abs(pa - pb).max() <= 1e-4 and pa.std(0).max() > 1e-3
    assert main(["--model", str(exported[1]), "--backend", "openvino", files["nih"][0], "-q"]) == 0
