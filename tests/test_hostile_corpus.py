"""Hostile inputs (issue 23): codestreams and deflated data sets that lie about their size, degenerate
images, header values in error texts, and the CLI run over the whole corpus under a memory limit.

The corpus is tests/hostile_corpus.py (small files built with pydicom; only codec headers are
hand-crafted). The good files are real: pydicom's JPEG / JPEG-LS / JPEG 2000 / deflated test files
and pydicom-data's chest CR.
"""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile_corpus import build, j2k_codestream, jls_codestream, jp2_file
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from raycxr_runtime.readers import (
    ImageReadError,
    PixelBudget,
    _first_fragment_bytes,
    codestream_size,
    read_dicom_header,
    read_image,
    set_pixel_budget,
)

GOOD_CODESTREAMS = ["SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "JPEGLSNearLossless_16.dcm",
                    "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "RG1_J2KI.dcm"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(autouse=True)
def _default_budget():
    set_pixel_budget(None)
    yield
    set_pixel_budget(None)


def test_codestream_size_of_real_files_matches_their_header():
    for name in GOOD_CODESTREAMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(get_testdata_file(name))
        marker, rows, cols, comps, bits = codestream_size(_first_fragment_bytes(ds))
        assert (rows, cols, comps) == (ds.Rows, ds.Columns, ds.SamplesPerPixel), name
        ts = ds.file_meta.TransferSyntaxUID
        assert marker == ("SIZ" if "2000" in ts.name else "SOF55" if "JPEG-LS" in ts.name else "SOFn"), name
    assert read_image(get_testdata_file("RG1_J2KI.dcm")).shape == (1955, 1841)  # a real chest CR still reads
    assert codestream_size(jp2_file(j2k_codestream(300, 200), 300, 200))[:3] == ("SIZ", 300, 200)
    assert codestream_size(b"\xff\xd8\xff\xd9") is None and codestream_size(b"RIFF....") is None


@pytest.mark.parametrize("name", ["jls_60000.dcm", "jls_8000.dcm", "j2k_siz.dcm", "jp2_siz.dcm"])
def test_codestream_over_the_budget_is_refused_before_decoding(corpus, name):
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match=r"over the pixel budget: the JPEG(-LS| 2000) codestream's "
                                                 r"(SOF55|SIZ) header declares more than the limit") as info:
            read_image(corpus[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.path == str(corpus[name]) and "512" not in info.value.reason
    assert peak < 16 << 20, f"{peak >> 20} MiB: something was decoded"


@pytest.mark.parametrize("ts,stream", [(JPEGLSLossless, jls_codestream(2000, 2000)),
                                       (JPEG2000Lossless, j2k_codestream(2000, 2000)),
                                       (JPEG2000Lossless, jls_codestream(512, 512)),  # wrong codec: no SIZ
                                       (JPEGLSLossless, b"\xff\xd8\xff\xda\x00\x08")],  # scan before any frame
                         ids=["jls-2000", "j2k-2000", "jls-in-j2k", "no-frame"])
def test_codestream_size_other_than_rows_columns_is_refused(tmp_path, ts, stream):
    from hostile_corpus import _encapsulated

    path = _encapsulated(tmp_path / "lie.dcm", ts, stream)
    with pytest.raises(ImageReadError, match=r"declares another image size than Rows/Columns|no JPEG"):
        read_image(path)


@pytest.mark.parametrize("name", ["deflate_bomb.dcm", "deflate_private.dcm"])
def test_deflate_bomb_is_refused_before_pydicom_inflates_it(corpus, name):
    assert corpus[name].stat().st_size < 2 << 20  # ~1 MB on disk, 1 GiB inflated
    budget = PixelBudget(max_bytes=16 << 20)  # limit 16 + 64 MiB: the refusal comes after inflating 80 MiB
    tracemalloc.start()
    try:
        for read in (read_image, read_dicom_header):
            with pytest.raises(ImageReadError, match=r"deflated data set inflates past the limit of 80 MiB"):
                read(corpus[name], budget=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB: the data set was inflated in memory"


def test_deflated_file_within_the_limit_still_reads(tmp_path):
    from hostile_corpus import deflate_bomb_private

    real = get_testdata_file("image_dfl.dcm")  # a real deflated data set
    assert read_dicom_header(real).Rows > 0
    small = deflate_bomb_private(tmp_path / "small.dcm", size=1 << 20)  # 1 MiB private element: fine
    assert read_image(small).shape == (512, 512)
    with pytest.raises(ImageReadError, match="deflated data set inflates past the limit of 65 MiB"):
        read_image(deflate_bomb_private(tmp_path / "over.dcm", size=80 << 20), budget=PixelBudget(max_bytes=1 << 20))


# ----------------------------------------------------------------------------------- degenerate images (item 5)


@pytest.mark.parametrize("name,reason", [
    ("slope_zero.dcm", "invalid RescaleSlope: 0 maps every pixel to one value (a blank image)"),
    ("slope_nan.dcm", "invalid RescaleSlope: not a finite number (NaN or infinity): the modality LUT is undefined"),
    ("intercept_inf.dcm", "invalid RescaleIntercept: not a finite number (NaN or infinity): the modality LUT is "
                          "undefined"),
])
def test_undefined_modality_lut_is_refused_naming_the_attribute(corpus, name, reason):
    with pytest.raises(ImageReadError) as info:
        read_image(corpus[name])
    assert info.value.reason == reason  # the input attribute, not the model, is blamed


@pytest.mark.parametrize("name,note", [
    ("window_zero.dcm", "invalid WindowWidth: below 1"),
    ("window_negative.dcm", "invalid WindowWidth: below 1"),
    ("constant.dcm", "constant image: every pixel has the same value after the modality LUT"),
])
def test_degenerate_but_readable_images_are_reported(corpus, name, note, caplog):
    notes: list[str] = []
    image = read_image(corpus[name], notes=notes)
    assert image.shape == (512, 512) and len(notes) == 1 and notes[0].startswith(note), notes
    read_image(corpus[name])  # without a list (training): logged, not silent
    assert note in caplog.text


def tiny_model(path: Path) -> Path:
    """runtime_helpers.tiny_classifier's graph with its metadata written by the runtime's own contract
    (raycxr.export imports torch: a minute and more on a loaded machine, for a few strings)."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from raycxr_runtime import contract

    w = helper.make_tensor("w", TensorProto.FLOAT, [64 * 64, 2], np.full(64 * 64 * 2, 1e-3, np.float32))
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["probabilities"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 1, 64, 64])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "c"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = {"raycxr.kind": "classifier", "raycxr.class_names": json.dumps(["A", "B"]), "raycxr.input_size": "64",
            "raycxr.model_version": "tiny-1", "raycxr.thresholds": json.dumps([0.5, 0.5])}
    meta["raycxr." + contract.WEIGHTS_DIGEST] = contract.graph_digest(model.SerializeToString())
    meta["raycxr." + contract.METADATA_DIGEST] = contract.metadata_digest(meta)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_degenerate_images_are_flagged_not_scored(corpus, tmp_path):
    from raycxr_runtime.inference import Predictor
    from raycxr_runtime.model import Model

    model = Model(tiny_model(tmp_path / "tiny.onnx"))
    names = ["slope_zero.dcm", "slope_nan.dcm", "intercept_inf.dcm", "window_zero.dcm", "constant.dcm"]
    results = Predictor(model).predict_files([corpus[n] for n in names])
    assert [r.status for r in results] == ["error", "error", "error", "flagged", "flagged"]
    assert all(r.probabilities is None for r in results)
    assert not any("model" in w for r in results for w in r.warnings)  # NaN slope used to blame the model
    forced = Predictor(model, force=True).predict_file(corpus["window_zero.dcm"])
    assert forced.status == "flagged" and forced.probabilities is not None
    assert forced.warnings[-1].startswith("scored anyway (force)")


# ----------------------------------------------------------------------------------- header values in errors (item 6)


def test_errors_name_the_attribute_never_its_value(corpus, tmp_path):
    from hostile_corpus import PHI_STRINGS, _put_raw, _save, base_ds

    with pytest.raises(ImageReadError) as frames:
        read_image(corpus["phi_frames.dcm"])
    assert frames.value.reason == "invalid NumberOfFrames: not a whole number"
    with pytest.raises(ImageReadError) as pi:
        read_image(corpus["phi_photometric.dcm"])
    assert pi.value.reason.startswith("unsupported PhotometricInterpretation (expected MONOCHROME1")
    ds = base_ds()  # no PixelData: the reason quotes Modality / SOP class only when they are codes
    _put_raw(ds, "Modality", "CS", PHI_STRINGS[1].encode())
    _put_raw(ds, "SOPClassUID", "UI", PHI_STRINGS[0].encode())
    _put_raw(ds, "Columns", "US", b"\x00")  # odd: not a valid US
    with pytest.raises(ImageReadError) as nopix:
        read_image(_save(ds, tmp_path / "nopix.dcm"))
    assert "Modality=PHINAME" not in nopix.value.reason
    for err in (frames.value, pi.value, nopix.value):
        assert not any(s in str(err) for s in PHI_STRINGS), str(err)


# ----------------------------------------------------------------------------------- the CLI over the corpus (item 2b)

EXPECTED = {  # status, and what the one-line reason starts with
    "jls_60000.dcm": ("error", "over the pixel budget: the JPEG-LS codestream's SOF55 header"),
    "jls_8000.dcm": ("error", "over the pixel budget: the JPEG-LS codestream's SOF55 header"),
    "j2k_siz.dcm": ("error", "over the pixel budget: the JPEG 2000 codestream's SIZ header"),
    "jp2_siz.dcm": ("error", "over the pixel budget: the JPEG 2000 codestream's SIZ header"),
    "deflate_bomb.dcm": ("error", "deflated data set inflates past the limit"),
    "deflate_private.dcm": ("error", "deflated data set inflates past the limit"),
    "slope_zero.dcm": ("error", "invalid RescaleSlope: 0"),
    "slope_nan.dcm": ("error", "invalid RescaleSlope: not a finite number"),
    "intercept_inf.dcm": ("error", "invalid RescaleIntercept: not a finite number"),
    "window_zero.dcm": ("flagged", "invalid WindowWidth: below 1"),
    "window_negative.dcm": ("flagged", "invalid WindowWidth: below 1"),
    "constant.dcm": ("flagged", "constant image"),
    "phi_frames.dcm": ("error", "invalid NumberOfFrames: not a whole number"),
    "phi_photometric.dcm": ("error", "unsupported PhotometricInterpretation (expected"),
    "truncated.dcm": ("error", "corrupt or truncated pixel data"),
    "not_dicom.dcm": ("error", "not a DICOM file"),
    # decodes within the budget but not within --worker-memory-mb: its worker fails, the run goes on
    "rle_6000.dcm": ("error", "reading the image failed: not enough memory"),
    "cr_no_spacing.dcm": ("scored", None),  # pydicom-data's real chest CR without ImagerPixelSpacing
    "chest_cr.dcm": ("scored", None),  # pydicom-data's real chest CR, JPEG 2000
    "chest.png": ("scored", None),
}
CLI_MEMORY = 3 << 30  # RLIMIT_AS of the CLI process (and so of its workers)
PEAK_RSS_LIMIT = 1 << 30  # the whole process tree stays under this; the deflate bombs alone took 4.3 GB


def test_cli_accounts_for_every_hostile_input_under_a_memory_limit(corpus, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from hostile_corpus import PHI_STRINGS, ramp
    from PIL import Image
    from test_pixel_budget import rle_dicom

    files = dict(corpus)
    files["rle_6000.dcm"] = rle_dicom(tmp_path / "rle_6000.dcm", 6000, 6000)  # 36 MP: inside the budget
    files["chest_cr.dcm"] = Path(shutil.copy(get_testdata_file("RG1_J2KI.dcm"), tmp_path / "chest_cr.dcm"))
    files["chest.png"] = tmp_path / "chest.png"
    Image.fromarray(ramp(256, 256)).save(files["chest.png"])
    assert set(files) == set(EXPECTED)
    paths = [str(files[n]) for n in EXPECTED]
    model = tiny_model(tmp_path / "tiny.onnx")
    # The CLI runs under RLIMIT_AS in a wrapper whose RUSAGE_CHILDREN covers the CLI and its workers only.
    wrapper = (
        "import json, resource, subprocess, sys\n"
        f"def limit(): resource.setrlimit(resource.RLIMIT_AS, ({CLI_MEMORY}, {CLI_MEMORY}))\n"
        "p = subprocess.run([sys.executable, '-m', 'raycxr_runtime', *sys.argv[1:]], capture_output=True, text=True,"
        " preexec_fn=limit)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,"
        " 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, "--model", str(model), *paths, "-vv",
                           "--worker-memory-mb", "800"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout)
    assert run["rc"] == 0, run["err"][-3000:]  # not 134 (abort) or -9 (killed)

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    report = json.loads(run["out"], parse_constant=no_constants)  # valid, complete JSON
    assert report["complete"] is True
    results = report["results"]
    assert [r["input"] for r in results] == paths  # every input accounted for, in order
    for name, r in zip(EXPECTED, results):
        status, reason = EXPECTED[name]
        assert r["status"] == status, (name, r)
        if reason is None:
            assert r["probabilities"] is not None
        else:
            assert r["probabilities"] is None and r["warnings"][-1].startswith(reason), (name, r["warnings"])
            assert "\n" not in r["warnings"][-1] and len(r["warnings"][-1]) < 500
    assert report["summary"] == {"scored": 3, "flagged": 3, "error": len(EXPECTED) - 6}
    for text in (run["out"], run["err"]):  # no identifier in the report, the log or a worker's warnings
        assert not any(s in text for s in PHI_STRINGS), [s for s in PHI_STRINGS if s in text]
    assert "chest_cr.dcm: scored" in run["err"]  # the -vv log did run
    assert run["maxrss_kib"] * 1024 < PEAK_RSS_LIMIT, f"peak RSS {run['maxrss_kib'] >> 10} MiB"


def test_decode_isolated_for_the_service_and_the_node(corpus):
    from raycxr_runtime.isolate import decode_isolated, worker_memory_limit

    assert worker_memory_limit(PixelBudget(max_bytes=32 << 20)) == (1 << 30) + (256 << 20)
    notes: list[str] = []
    image = decode_isolated(corpus["window_zero.dcm"].read_bytes(), size=64, notes=notes)  # an upload's bytes
    assert image.shape == (64, 64) and notes[0].startswith("invalid WindowWidth: below 1")
    with pytest.raises(ImageReadError, match=r"^uploaded image: over the pixel budget: the JPEG-LS codestream"):
        decode_isolated(corpus["jls_60000.dcm"].read_bytes())
    with pytest.raises(ImageReadError) as info:
        decode_isolated(corpus["phi_frames.dcm"])
    assert info.value.path == str(corpus["phi_frames.dcm"])
    assert info.value.reason == "invalid NumberOfFrames: not a whole number"


# ----------------------------------------------------------------------------------- file names (CLI)

NAMED = {  # what the result calls each file (valid UTF-8; JSON escapes a newline), its status and last reason
    "=HYPERLINK(1).dcm": ("=HYPERLINK(1).dcm", "scored", None),
    "bad\udcff\udcfename.dcm": ("bad\\xff\\xfename.dcm", "scored",
                                "the file name is not valid UTF-8: its undecodable bytes are shown as \\xNN"),
    "dangling.dcm": ("dangling.dcm", "error", "dangling symbolic link: its target does not exist"),
    "loop_a.dcm": ("loop_a.dcm", "error", "symbolic link loop: the link leads back to itself"),
    "loop_b.dcm": ("loop_b.dcm", "error", "symbolic link loop: the link leads back to itself"),
    "new\nline.dcm": ("new\nline.dcm", "scored", None),
}


def test_printable_name():
    from raycxr_runtime.inference import log_name as printable_name

    assert printable_name("/pacs/IM 0001 é.dcm") == "/pacs/IM 0001 é.dcm"
    assert printable_name("bad\udcff.dcm") == "bad\\xff.dcm"  # a filename byte that is not UTF-8
    assert printable_name("a\nb\rc\x85d\u2028e") == "a\\nb\\rc\\x85d\\u2028e"
    assert printable_name("lone\ud800") == "lone\\ud800"  # not an escaped byte either


def test_cli_accounts_for_hostile_file_names(tmp_path, monkeypatch):
    """Links that lead nowhere are inputs with a reason (they were dropped silently from a folder),
    a filename that is not UTF-8 no longer stops the run (CSV: UnicodeEncodeError after the files
    before it; JSON on standard output: invalid UTF-8), a newline in a name no longer splits a log
    line or a CSV row, and a name starting with '=' is not a formula in the CSV."""
    import csv
    import json
    import subprocess
    import sys

    from hostile_corpus import NAME_CASES, build_names

    from raycxr_runtime.cli import main

    folder = build_names(tmp_path / "in")["loop_a.dcm"].parent
    model = str(tiny_model(tmp_path / "tiny.onnx"))
    proc = subprocess.run([sys.executable, "-m", "raycxr_runtime", "--model", model, str(folder), "-v"],
                          capture_output=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.decode("utf-8"))  # strict: valid UTF-8, valid JSON
    got = {Path(r["input"]).name: (r["status"], r["warnings"][-1] if r["warnings"] else None)
           for r in report["results"]}
    assert got == {shown: (status, reason) for shown, status, reason in NAMED.values()}
    assert set(NAMED) == set(NAME_CASES)
    log = proc.stderr.decode("utf-8")
    lines = [line for line in log.splitlines() if ": scored" in line or ": error" in line]
    assert len(lines) == len(NAMED) and all(line.split("raycxr_runtime: ")[1].startswith(str(folder))
                                            for line in lines), log  # one line per file, none split

    out = tmp_path / "out.csv"
    relative = ["=HYPERLINK(1).dcm", "new\nline.dcm"]  # as typed in the folder: the cell would start with '='
    monkeypatch.chdir(folder)
    assert main(["--model", model, str(folder), *relative, "--out", str(out), "-q"]) == 0
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(NAMED) + 2  # one row each: the newline stays inside its quoted cell
    assert [r["input"] for r in rows[-2:]] == ["'=HYPERLINK(1).dcm", "new\nline.dcm"]
    assert not any(r["input"].startswith(("=", "+", "-", "@")) for r in rows)
    assert [r["status"] for r in rows].count("scored") == 5
