"""Decompression bombs and dying decoders (issue 11, defect 1).

- A real RLE DICOM declaring 30000 x 30000 (valid RLE that would decode to 900 MB) is refused from
  its header, before decoding, without allocating anything large (tracemalloc).
- The budget is configurable (argument, process default, environment) and covers rasters too.
- A decoder raising a ``BaseException`` (pyo3's ``PanicException`` is one) becomes an ImageReadError.
- ``raycxr sites validate ... check_images=true`` survives a worker that raises a BaseException,
  calls ``os._exit`` or hangs: those files are quarantined with the reason and the run finishes
  (``multiprocessing.Pool`` hung on a dead worker).
- :class:`IsolatedPool` on its own, under the default ``spawn`` start method.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

import raycxr.validate as validate_mod
from raycxr.quarantine import Quarantine
from raycxr.readers import ImageReadError, PixelBudget, read_image, set_pixel_budget
from raycxr.sites.config import SiteConfig
from raycxr_runtime.isolate import IsolatedPool

HERE = Path(__file__).resolve().parent


def rle_constant(rows: int, cols: int) -> bytes:
    """A valid one-segment RLE frame (8-bit) of rows x cols zeros: runs of 128 (``0x81 0x00``)."""
    n = rows * cols
    runs, rest = divmod(n, 128)
    seg = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" if rest == 1 else b"")
    header = struct.pack("<16L", 1, 64, *([0] * 14))
    return header + seg + (b"\x00" if len(seg) % 2 else b"")


def rle_dicom(path: Path, rows: int, cols: int) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([rle_constant(rows, cols)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(autouse=True)
def _default_budget():
    set_pixel_budget(None)
    yield
    set_pixel_budget(None)


def test_rle_bomb_is_refused_from_the_header_without_allocating(tmp_path):
    bomb = rle_dicom(tmp_path / "bomb.dcm", 30000, 30000)
    assert bomb.stat().st_size < 16 * 2**20  # ~14 MB on disk, 900 MB decoded
    small = rle_dicom(tmp_path / "small.dcm", 512, 512)  # the same construction decodes fine
    assert read_image(small).shape == (512, 512)
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match=r"over the pixel budget: declares 30000x30000 = 900\.0 megapixels"
                                                 r".*refused before decoding") as info:
            read_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.path == str(bomb)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB: something decoded"  # the file itself is read, no more


def test_budget_is_configurable_and_covers_rasters(tmp_path):
    dcm = rle_dicom(tmp_path / "img.dcm", 100, 100)
    with pytest.raises(ImageReadError, match="over the pixel budget: declares 100x100"):
        read_image(dcm, budget=PixelBudget(max_pixels=5000))
    with pytest.raises(ImageReadError, match=r"MiB decoded, limit"):
        read_image(dcm, budget=PixelBudget(max_bytes=9000))
    set_pixel_budget(PixelBudget(max_pixels=5000))  # the process default
    with pytest.raises(ImageReadError, match="over the pixel budget"):
        read_image(dcm)
    set_pixel_budget(None)
    assert read_image(dcm).shape == (100, 100)
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 200), np.uint8)).save(png)
    with pytest.raises(ImageReadError, match="over the pixel budget: declares 300x200"):
        read_image(png, budget=PixelBudget(max_pixels=50_000))
    code = f"from raycxr_runtime.readers import read_image; read_image(r'{dcm}')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "RAYCXR_MAX_PIXELS": "5000"})
    assert proc.returncode != 0 and "over the pixel budget" in proc.stderr


class FakePanic(BaseException):
    """Stands in for pyo3's PanicException (a BaseException, not an Exception)."""


def test_decoder_base_exception_becomes_image_read_error(tmp_path, monkeypatch):
    dcm = rle_dicom(tmp_path / "img.dcm", 64, 64)

    def panic(self):
        raise FakePanic("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(panic))
    with pytest.raises(ImageReadError, match=r"RLE Lossless decoder crashed on this file \(FakePanic: called"):
        read_image(dcm)


# ------------------------------------------------------------------------------ validate with dying workers


def _bad_reader(real):
    def read(path, **kw):
        name = Path(path).name
        if name.endswith("000001.dcm"):
            raise FakePanic("panicked at src/lib.rs")  # escapes every `except Exception`
        if name.endswith("000002.dcm"):
            os._exit(3)  # a hard crash of the worker process
        if name.endswith("000003.dcm"):
            time.sleep(60)  # a decoder that hangs
        return real(path, **kw)
    return read


def test_validate_survives_dead_and_hung_workers(small_corpus, tmp_path, monkeypatch):
    site = SiteConfig.from_dict({"name": "nih", "adapter": "manifest", "root": str(small_corpus / "nih"),
                                 "quarantine": str(tmp_path / "q.jsonl")})
    # validate forks its workers, so the patched reader is what they run (test-only: no hook in the code)
    monkeypatch.setattr(validate_mod, "read_image", _bad_reader(validate_mod.read_image))
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("validate hung"))
    signal.alarm(120)
    try:
        t = time.perf_counter()
        report = validate_mod.validate_site(site, check_images=True, workers=2, progress=False, image_timeout=3)
        took = time.perf_counter() - t
    finally:
        signal.alarm(0)
    assert report["ok"] and report["images"] == 24 and report["quarantined"] == 3, report
    reasons = {Path(e.path).name: e.reason for e in Quarantine(site.quarantine_path, site="nih").entries()}
    assert reasons["nih-000001.dcm"].startswith("reading failed: FakePanic: panicked at src/lib.rs")
    assert reasons["nih-000002.dcm"] == "reading failed: worker process died (exit code 3)"
    assert reasons["nih-000003.dcm"] == "reading failed: timed out after 3 s"
    assert took < 60


def test_isolated_pool_spawn_crash_panic_and_order():
    with IsolatedPool("_isolate_targets:work", workers=2, timeout=5) as pool:  # spawn: a fresh interpreter
        outs = list(pool.imap([(i,) for i in range(8)]))
        assert [o.ok for o in outs] == [True, True, False, False, True, True, False, True]
        assert [o.value for o in outs if o.ok] == [0, 10, 40, 50, 70]
        assert outs[2].error == "FakePanic: boom 2"
        assert outs[3].error == "worker process died (exit code 7)"
        assert outs[6].error == "timed out after 5 s"
        assert pool.call(9).value == 90  # the pool replaced its dead workers


def test_isolated_pool_memory_limit():
    with IsolatedPool("_isolate_targets:allocate", workers=1, memory_limit=1 << 30) as pool:
        assert pool.call(10 << 20).ok
        out = pool.call(4 << 30)  # 4 GiB under a 1 GiB address-space limit
        assert not out.ok and "not enough memory" in out.error
        assert pool.call(10 << 20).ok


sys.path.insert(0, str(HERE))  # _isolate_targets, importable by the spawned workers (sys.path travels)
