"""raycxr-infer over a hostile folder, in a real process: symbolic link loops, a dangling link, a
name that is not UTF-8, a name with a newline, names a spreadsheet would run as formulas. Every
entry is in the results and the counts (the unusable ones as errors, with the reason), the run
completes (exit 0), CSV cells are escaped and each log record is one line."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from runtime_helpers import tiny_classifier

FORMULAS = ["=cmd|' -C calc'!A0.png", "@SUM(A1).png", "+1.png", "-1.png"]
IMAGES = ["good.png", *FORMULAS, "new\nline.png", "sub/inner.png"]  # plus the non-UTF-8 one
NOT_UTF8 = b"bad\xff\xfe.png"
SHOWN = "bad\\xff\\xfe.png"  # how results and logs show it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("model") / "classifier.onnx", 2, ["Effusion", "Pneumothorax"])


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "export"
    (d / "sub").mkdir(parents=True)
    img = Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    for name in IMAGES:
        img.save(d / name, "PNG")
    img.save(os.path.join(os.fsencode(d), NOT_UTF8), "PNG")
    (d / "notes.txt").write_text("not an image")
    os.symlink("nowhere.dcm", d / "dangling.dcm")
    os.symlink("self.dcm", d / "self.dcm")
    os.symlink("loop2.dcm", d / "loop1.dcm")
    os.symlink("loop1.dcm", d / "loop2.dcm")
    os.symlink("..", d / "sub" / "up")  # a folder link back to its parent
    (tmp_path / "elsewhere").mkdir()
    img.save(tmp_path / "elsewhere" / "other.png", "PNG")
    os.symlink(tmp_path / "elsewhere", d / "outside")  # a folder link out of the tree: not followed
    return d


REASONS = {"dangling.dcm": "dangling symbolic link", "self.dcm": "symbolic link loop",
           "loop1.dcm": "symbolic link loop", "loop2.dcm": "symbolic link loop", "sub/up": "symbolic link loop",
           "outside": "symbolic link to a folder: not followed"}


def run(model, cwd, *args):
    return subprocess.run([sys.executable, "-m", "raycxr_runtime", "--model", str(model), *args],
                          capture_output=True, text=True, errors="backslashreplace", timeout=120, cwd=cwd)


def test_every_entry_of_a_hostile_folder_is_accounted_for(model, folder):
    """Before: the links were missing from the results and the counts, and the non-UTF-8 name
    stopped the run (exit 1, the results after it lost)."""
    proc = run(model, folder, ".", "--out", str(folder.parent / "r.json"), "-v")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((folder.parent / "r.json").read_text(encoding="utf-8"))
    assert report["complete"] is True
    got = {r["input"]: r for r in report["results"]}
    assert set(got) == {*IMAGES, SHOWN, *REASONS}  # every entry but notes.txt, each once
    for name in IMAGES:
        assert got[name]["status"] == "scored", got[name]
    assert got[SHOWN]["status"] == "scored"
    assert got[SHOWN]["warnings"][0].startswith("the file name is not valid UTF-8")
    for name, reason in REASONS.items():
        assert got[name]["status"] == "error" and got[name]["warnings"][0].startswith(reason), got[name]
    assert report["summary"] == {"scored": len(IMAGES) + 1, "flagged": 0, "error": len(REASONS)}
    assert f"{len(got)} file(s): {len(IMAGES) + 1} scored, 0 flagged, {len(REASONS)} error(s); " \
           "1 non-image file(s) skipped" in proc.stderr

    # each log record is one line: the newline in a name is escaped, not a second (forgeable) line
    records = [line for line in proc.stderr.splitlines() if " raycxr_runtime: " in line]
    assert "new\\nline.png: scored (1 warning(s))" in proc.stderr
    assert f"{SHOWN}: scored" in proc.stderr
    assert "dangling.dcm: error (dangling symbolic link: its target does not exist)" in proc.stderr
    assert len(records) == len(got)
    whole = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO raycxr_runtime: .+: (scored|error)( \(.+\))?$")
    assert all(whole.search(line) for line in records), records
    # nothing else: only log records, the progress bar and the summary (no "line.png: scored" stray)
    stray = [x for x in proc.stderr.splitlines()
             if x.strip() and " raycxr_runtime: " not in x and not x.startswith("raycxr-infer:")]
    assert not stray, stray


def test_csv_cells_cannot_run_as_formulas(model, folder):
    """A file name starting with = + - @ is written with a leading ' (OWASP CSV injection); the non-UTF-8
    name is written with escapes instead of stopping the run."""
    out = folder.parent / "r.csv"
    proc = run(model, folder, ".", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.reader(open(out, newline="", encoding="utf-8")))
    header, rows = rows[0], rows[1:]
    assert header[0] == "input" and len(rows) == len(IMAGES) + 1 + len(REASONS)
    inputs = [r[0] for r in rows]
    for name in FORMULAS:
        assert "'" + name in inputs
    assert SHOWN in inputs and "new\nline.png" in inputs
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row


def test_links_given_on_the_command_line(model, folder):
    """A dangling link or a link loop named explicitly gets its reason too, and the good file is scored."""
    out = folder.parent / "r.jsonl"
    proc = run(model, folder, "dangling.dcm", "self.dcm", "good.png", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()][1:-1]
    assert [(r["input"], r["status"]) for r in lines] == [("dangling.dcm", "error"), ("self.dcm", "error"),
                                                          ("good.png", "scored")]
    assert lines[0]["warnings"] == ["dangling symbolic link: its target does not exist"]
    assert lines[1]["warnings"] == ["symbolic link loop: the link leads back to itself"]
