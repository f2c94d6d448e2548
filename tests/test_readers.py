"""Readers (DICOM display pipeline, rasters, errors) and the quarantine.

Expected values are computed by hand from the DICOM definitions, not with the pydicom functions
the reader uses, so a change in pydicom's behaviour shows up here.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import pickle
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    RLELossless,
    generate_uid,
)

from raycxr.quarantine import Quarantine, QuarantineEntry, safe_read
from raycxr.readers import (
    SUPPORTED_SUFFIXES,
    ImageReadError,
    decoding_plugins,
    read_dicom,
    read_dicom_header,
    read_image,
    read_raster,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pydicom_file(name: str) -> str:
    # Only files shipped inside the pydicom wheel: others would trigger a download (no network).
    local = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not local.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom")
    path = get_testdata_file(name)
    assert path is not None
    return path


def make_ds(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    raw: bytes | None = None,
    **attrs,
) -> Dataset:
    """A minimal single-frame DX dataset; ``raw`` overrides the pixel bytes (garbage high bits)."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = raw if raw is not None else pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(tmp_path: Path, name: str, pixels: np.ndarray, **kw) -> Path:
    return save(make_ds(pixels, **kw), tmp_path / name)


def ramp(shape=(8, 8), dtype=np.uint16, start=0, step=1) -> np.ndarray:
    return (start + step * np.arange(shape[0] * shape[1])).reshape(shape).astype(dtype)


# ----------------------------------------------------------------------------- own DICOMs, exact values


def test_monochrome2_without_voi_is_min_max(tmp_path):
    px = ramp(dtype=np.uint8)  # 0..63
    out = read_dicom(write_dicom(tmp_path, "m2.dcm", px))
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out, px / 63.0, atol=1e-7)


def test_monochrome1_is_inverted(tmp_path):
    px = ramp(dtype=np.uint8)
    out = read_dicom(write_dicom(tmp_path, "m1.dcm", px, photometric="MONOCHROME1"))
    np.testing.assert_allclose(out, 1.0 - px / 63.0, atol=1e-7)
    assert out[0, 0] == 1.0 and out[-1, -1] == 0.0  # lowest stored value is white


def test_rescale_then_window_by_hand(tmp_path):
    # slope 2, intercept -100; window [0, 800] in rescaled units (LINEAR: c - 0.5, w - 1).
    stored = np.full((8, 8), 50, np.uint16)
    stored[0, :5] = [0, 50, 250, 450, 650]  # rescaled: -100, 0, 400, 800, 1200
    path = write_dicom(
        tmp_path,
        "rescale.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=400.5,
        WindowWidth=801,
    )
    out = read_dicom(path)
    np.testing.assert_allclose(out[0, :5], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # Without the VOI: min-max of the rescaled values (-100 .. 1200).
    np.testing.assert_allclose(
        read_dicom(path, apply_voi=False)[0, :5], [0, 100 / 1300, 500 / 1300, 900 / 1300, 1]
    )


def test_window_clips_and_first_of_several_windows_is_used(tmp_path):
    stored = np.zeros((8, 8), np.uint16)
    stored[0, :6] = [0, 1535, 1536, 2048, 2560, 4095]
    # Window 1: centre 2048.5, width 1025 -> [1536, 2560] maps linearly to [0, 1].
    path = write_dicom(
        tmp_path, "win.dcm", stored, bits_stored=12, WindowCenter=[2048.5, 100], WindowWidth=[1025, 50]
    )
    out = read_dicom(path)
    np.testing.assert_allclose(out[0, :6], [0.0, 0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # Same window on MONOCHROME1: inverted after the VOI.
    path1 = write_dicom(
        tmp_path,
        "win1.dcm",
        stored,
        bits_stored=12,
        photometric="MONOCHROME1",
        WindowCenter=2048.5,
        WindowWidth=1025,
    )
    np.testing.assert_allclose(read_dicom(path1)[0, :6], [1.0, 1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_voi_lut_sequence_preferred_over_window(tmp_path):
    stored = ramp((16, 16), np.uint8)  # 0..255
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item["LUTData"] = pydicom.DataElement(0x00283006, "US", list(range(255, -1, -1)))  # inverting
    ds = make_ds(stored, WindowCenter=10, WindowWidth=20)
    ds.VOILUTSequence = [item]
    out = read_dicom(save(ds, tmp_path / "voilut.dcm"))
    np.testing.assert_allclose(out, (255 - stored) / 255.0, atol=1e-6)


def test_voi_lut_declaring_16_bits_for_12_bit_data(tmp_path):
    # Common vendor quirk: 16 bits per entry declared, entries only reach 4095. Scaling by 65535
    # would give a near-black image; the reader uses the depth the data needs (12 bits).
    stored = ramp((16, 16), np.uint16, step=16)  # 0..4080
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item["LUTData"] = pydicom.DataElement(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    ds = make_ds(stored, bits_stored=12)
    ds.VOILUTSequence = [item]
    out = read_dicom(save(ds, tmp_path / "voilut16.dcm"))
    np.testing.assert_allclose(out, stored / 4095.0, atol=1e-6)


def test_invalid_window_falls_back_to_min_max(tmp_path):
    px = ramp(dtype=np.uint8)
    out = read_dicom(write_dicom(tmp_path, "badwin.dcm", px, WindowCenter=10, WindowWidth=0))
    np.testing.assert_allclose(out, px / 63.0, atol=1e-7)


def test_bits_stored_12_masks_garbage_high_bits(tmp_path):
    clean = ramp(step=60)  # 0..3780, fits 12 bits
    garbage = (clean | 0xF000).astype("<u2")  # overlay / garbage in bits 12-15
    path = write_dicom(tmp_path, "garbage.dcm", clean, bits_stored=12, raw=garbage.tobytes())
    np.testing.assert_allclose(read_dicom(path), clean / 3780.0, atol=1e-6)
    # With a window the output range is the 12-bit range: 4095 -> 1, 0 -> 0.
    ds = make_ds(clean, bits_stored=12, raw=garbage.tobytes(), WindowCenter=2048, WindowWidth=4096)
    out = read_dicom(save(ds, tmp_path / "garbage_win.dcm"))
    np.testing.assert_allclose(out, np.clip((clean - 2047.5) / 4095 + 0.5, 0, 1), atol=1e-6)


def test_signed_12_bit_is_sign_extended(tmp_path):
    values = np.zeros((8, 8), np.int16)
    values[0, :3] = [-100, 0, 100]
    values[1:] = 0
    raw = (values.astype(np.int32) & 0x0FFF).astype("<u2")  # 12-bit two's complement
    raw[0, 0] |= 0xA000  # garbage above bit 11 must be replaced by the sign
    path = write_dicom(tmp_path, "signed.dcm", values, bits_stored=12, signed=True, raw=raw.tobytes())
    out = read_dicom(path)
    np.testing.assert_allclose(out[0, :3], [0.0, 0.5, 1.0], atol=1e-7)


def test_constant_image_is_zeros(tmp_path):
    out = read_dicom(write_dicom(tmp_path, "flat.dcm", np.full((8, 8), 700, np.uint16)))
    assert np.all(out == 0.0)


def test_rgb_dicom_becomes_luma(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    out = read_dicom(write_dicom(tmp_path, "rgb.dcm", rgb, photometric="RGB"))
    np.testing.assert_allclose(out, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-6)


def test_rle_copy_decodes_identically(tmp_path):
    stored = (np.random.default_rng(0).integers(0, 4096, (64, 64))).astype(np.uint16)
    ds = make_ds(stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    reference = read_dicom(save(ds, tmp_path / "plain.dcm"))
    ds.compress(RLELossless)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_dicom(save(ds, tmp_path / "rle.dcm")), reference)


def test_jpeg2000_lossless_copy_decodes_identically(tmp_path):
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder (pylibjpeg-openjpeg) installed")
    stored = (np.random.default_rng(1).integers(0, 4096, (64, 64))).astype(np.uint16)
    ds = make_ds(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024)
    reference = read_dicom(save(ds, tmp_path / "plain.dcm"))
    ds.compress(JPEG2000Lossless)  # openjpeg needs >= 32x32 for its default 6 resolutions
    np.testing.assert_array_equal(read_dicom(save(ds, tmp_path / "j2k.dcm")), reference)


@pytest.mark.parametrize("ts_name", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEGLSLossless"])
def test_gdcm_encoded_jpeg_lossless_and_jpeg_ls(tmp_path, ts_name):
    gdcm = pytest.importorskip("gdcm")  # used here as an independent encoder only
    stored = (np.random.default_rng(2).integers(0, 4096, (32, 32))).astype(np.uint16)
    src = write_dicom(tmp_path, "plain.dcm", stored, bits_stored=12, photometric="MONOCHROME1")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, ts_name)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "compressed.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID.is_compressed
    out = read_dicom(tmp_path / "compressed.dcm")
    np.testing.assert_array_equal(out, read_dicom(src))
    lo, hi = stored.min(), stored.max()
    np.testing.assert_allclose(out, 1.0 - (stored - lo) / (hi - lo), atol=1e-6)  # MONOCHROME1, min-max


def test_raw_dataset_without_preamble_and_uid_named_file(tmp_path):
    px = ramp(dtype=np.uint8)
    ds = make_ds(px)
    del ds.file_meta  # ACR-NEMA style: no preamble, no "DICM", no file meta
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(raw), px / 63.0, atol=1e-7)
    # UID-named file: its "suffix" is ".5"; dispatch sniffs the DICM marker.
    uid_named = write_dicom(tmp_path, "1.2.840.113619.2.5", px, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(uid_named), 1.0 - px / 63.0, atol=1e-7)


# ----------------------------------------------------------------------------- pydicom's test files


def test_mr_small_window_by_hand():
    stored = pydicom.dcmread(pydicom_file("MR_small.dcm")).pixel_array.astype(np.float64)
    # WindowCenter 600, WindowWidth 1600, no rescale, LINEAR.
    expected = np.clip((stored - 599.5) / 1599 + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(pydicom_file("MR_small.dcm")), expected, atol=1e-6)


def test_ct_small_rescale_without_window_is_min_max():
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    hu = ds.pixel_array * 1.0 - 1024.0
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    np.testing.assert_allclose(read_image(pydicom_file("CT_small.dcm")), expected, atol=1e-6)


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_compressed_twins_equal_uncompressed(twin):
    np.testing.assert_array_equal(read_image(pydicom_file(twin)), read_image(pydicom_file("MR_small.dcm")))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_every_installed_plugin_decodes_losslessly(name):
    # pydicom tries plugins in turn; check each installed one really works, not just the first.
    reference = pydicom.dcmread(pydicom_file("MR_small.dcm")).pixel_array
    ts = pydicom.dcmread(pydicom_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    plugins = get_decoder(ts).available_plugins
    assert plugins, f"no decoder for {ts.name}"
    for plugin in plugins:
        arr = pydicom.pixels.pixel_array(pydicom_file(name), decoding_plugin=plugin)
        np.testing.assert_array_equal(arr, reference, err_msg=f"{name} via {plugin}")


def test_jpeg2000_lossy_plugins_agree():
    path = pydicom_file("JPEG2000.dcm")
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    arrays = [pydicom.pixels.pixel_array(path, decoding_plugin=p) for p in get_decoder(ts).available_plugins]
    for arr in arrays[1:]:
        np.testing.assert_array_equal(arr, arrays[0])
    out = read_image(path)
    assert out.shape == (1024, 256) and out.min() == 0.0 and out.max() == 1.0


def test_jpeg_baseline_colour_is_grey_close_to_lossless_reference():
    reference = read_image(pydicom_file("SC_rgb_rle.dcm"))  # same picture, RLE (lossless)
    lossy = read_image(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, YBR_FULL
    assert lossy.shape == reference.shape == (100, 100)
    assert np.abs(lossy - reference).mean() < 0.02
    # JPEG lossless (process 14 SV1, RGB, decoded by GDCM) is exact.
    np.testing.assert_array_equal(read_image(pydicom_file("SC_rgb_jpeg_gdcm.dcm")), reference)


def test_jpeg_baseline_plugins_agree():
    path = pydicom_file("SC_rgb_jpeg_dcmtk.dcm")
    plugins = get_decoder(pydicom.uid.JPEGBaseline8Bit).available_plugins
    arrays = [pydicom.pixels.pixel_array(pydicom.dcmread(path), decoding_plugin=p) for p in plugins]
    for arr in arrays[1:]:
        assert np.abs(arr.astype(int) - arrays[0]).max() <= 2  # IDCT implementations may differ by 1-2


def test_jpeg_extended_12_bit_decodes_or_names_the_plugin():
    path = pydicom_file("JPGExtended.dcm")
    if "pylibjpeg" in get_decoder(JPEGExtended12Bit).available_plugins:
        assert read_image(path).shape == (1024, 256)
    else:  # GDCM (via pydicom) and Pillow refuse 12-bit JPEG; the message must say what to install
        with pytest.raises(ImageReadError, match="pylibjpeg-libjpeg"):
            read_image(path)


def test_decoding_plugins_report():
    report = decoding_plugins()
    assert report["RLE Lossless"] and report["JPEG 2000 Image Compression (Lossless Only)"]


@pytest.mark.parametrize(
    "name,frames", [("SC_rgb_rle_2frame.dcm", 2), ("rtdose.dcm", 15), ("examples_ybr_color.dcm", 30)]
)
def test_multi_frame_rejected(name, frames):
    with pytest.raises(
        ImageReadError, match=rf"multi-frame DICOM \({frames} frames\) is not a single radiograph"
    ):
        read_image(pydicom_file(name))


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_non_image_objects_rejected(name):
    with pytest.raises(ImageReadError, match="no PixelData") as info:
        read_image(pydicom_file(name))
    assert info.value.path == pydicom_file(name)


def test_truncated_pixel_data_shipped_file():
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(pydicom_file("MR_truncated.dcm"))


def test_corrupt_compressed_stream(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small_jp2klossless.dcm"))
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    frame[100:] = b"\x00" * (len(frame) - 100)
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(ImageReadError, match="corrupt or truncated pixel data") as info:
        read_image(save(ds, tmp_path / "corrupt.dcm"))
    assert str(info.value).startswith(str(tmp_path / "corrupt.dcm"))


# ----------------------------------------------------------------------------- errors


def test_truncated_dicom_file(tmp_path):
    data = Path(pydicom_file("CT_small.dcm")).read_bytes()
    for n in (len(data) // 2, 900):  # inside the pixel data / inside the header
        path = tmp_path / f"trunc_{n}.dcm"
        path.write_bytes(data[:n])
        with pytest.raises(ImageReadError, match="truncated") as info:
            read_image(path)
        assert info.value.path == str(path)


def test_text_file_named_dcm(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(ImageReadError, match="not a DICOM file") as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_dicom_header(path)


def test_missing_file_and_directory(tmp_path):
    for reader in (read_image, read_dicom, read_raster, read_dicom_header):
        with pytest.raises(ImageReadError, match="file not found") as info:
            reader(tmp_path / "nope.dcm")
        assert info.value.path == str(tmp_path / "nope.dcm")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


def test_too_small(tmp_path):
    with pytest.raises(ImageReadError, match="too small"):
        read_image(write_dicom(tmp_path, "tiny.dcm", np.zeros((4, 16), np.uint8)))
    Image.fromarray(np.zeros((7, 32), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageReadError, match="too small"):
        read_image(tmp_path / "tiny.png")


def test_unsupported_transfer_syntax(tmp_path):
    ds = make_ds(ramp(dtype=np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # private, unknown codec
    ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / "private_ts.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageReadError, match="unsupported transfer syntax"):
        read_image(path)


def test_missing_plugin_names_what_to_install(tmp_path, monkeypatch):
    import raycxr_runtime.readers as readers  # the implementation raycxr.readers re-exports

    class NoPlugin:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(readers, "get_decoder", lambda ts: NoPlugin())
    with pytest.raises(ImageReadError, match="no decoding plugin installed.*pylibjpeg-libjpeg"):
        read_image(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))


def test_header_only(tmp_path):
    ds = read_dicom_header(pydicom_file("MR_small.dcm"))
    assert ds.Rows == 64 and "PixelData" not in ds


def test_error_pickles_for_worker_processes():
    err = pickle.loads(pickle.dumps(ImageReadError("/a/b.dcm", "file not found")))
    assert (err.path, err.reason, str(err)) == ("/a/b.dcm", "file not found", "/a/b.dcm: file not found")


def test_readers_do_not_import_torch():
    code = "import sys, raycxr.readers, raycxr.quarantine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------- rasters


def test_png_8_and_16_bit(tmp_path):
    px8 = ramp(dtype=np.uint8, step=4)
    Image.fromarray(px8).save(tmp_path / "a8.png")
    np.testing.assert_allclose(read_image(tmp_path / "a8.png"), px8 / 255.0, atol=1e-7)
    px16 = ramp(dtype=np.uint16, step=1000)
    Image.fromarray(px16).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode in ("I;16", "I")
    np.testing.assert_allclose(read_image(tmp_path / "a16.png"), px16 / 65535.0, atol=1e-7)
    Image.fromarray(px16).save(tmp_path / "a16.tif")
    np.testing.assert_allclose(read_image(tmp_path / "a16.tif"), px16 / 65535.0, atol=1e-7)


def test_rgba_png_drops_alpha_and_rgb_jpeg_is_grey(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), luma, atol=1e-6)
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "rgb.jpg", quality=95)
    out = read_image(tmp_path / "rgb.jpg")
    assert out.shape == (16, 16) and out.dtype == np.float32
    assert np.abs(out - luma).max() < 0.02  # lossy


def test_unreadable_rasters(tmp_path):
    (tmp_path / "text.png").write_text("not a png")
    Image.fromarray(ramp((64, 64), np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    for name in ("text.png", "trunc.png"):
        with pytest.raises(ImageReadError, match="unreadable image file") as info:
            read_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)
    frames = [Image.fromarray(ramp((16, 16), np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match=r"multi-page image \(3 pages\)"):
        read_image(tmp_path / "pages.tif")


def test_unknown_suffix_sniffed(tmp_path):
    px = ramp(dtype=np.uint8, step=4)
    Image.fromarray(px).save(tmp_path / "img", format="PNG")
    np.testing.assert_allclose(read_image(tmp_path / "img"), px / 255.0, atol=1e-7)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ImageReadError, match="unrecognised image format"):
        read_image(tmp_path / "blob.bin")
    assert ".dcm" in SUPPORTED_SUFFIXES and ".png" in SUPPORTED_SUFFIXES


# ----------------------------------------------------------------------------- quarantine


def _record_many(path: str, site: str, worker: int, n: int) -> None:
    q = Quarantine(path, site=site)
    for i in range(n):
        # Long reasons: a line bigger than stdio buffers must still land in one piece.
        q.record(f"w{worker}-{i}", f"images/w{worker}-{i}.dcm", f"reason {worker}/{i} " + "x" * 3000)


def test_quarantine_from_two_processes(tmp_path):
    path = tmp_path / "q" / "quarantine.jsonl"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_record_many, args=(str(path), "siteA", w, 150)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 300 and all(json.loads(line)["site"] == "siteA" for line in lines)
    q = Quarantine(path, site="siteA")
    assert len(q) == 300
    assert q.image_ids() == {f"w{w}-{i}" for w in range(2) for i in range(150)}
    entry = next(e for e in q.entries() if e.image_id == "w1-7")
    assert entry.reason == "reason 1/7 " + "x" * 3000 and entry.path == "images/w1-7.dcm"


def test_quarantine_dedup_time_and_csv(tmp_path):
    q = Quarantine(tmp_path / "q.jsonl", site="s1")
    q.record("a", "images/a.dcm", "file not found")
    q.record("b", "images/b.dcm", "too small (4x4, minimum 8x8)")
    q.record("a", "images/a.dcm", "corrupt or truncated pixel data")
    with (tmp_path / "q.jsonl").open("a") as f:
        f.write('{"site": "s1", "image_id": "c", "path": "x", "rea')  # a writer killed mid-line
    entries = q.entries()
    assert len(q) == 2 and q.image_ids() == {"a", "b"}
    a = next(e for e in entries if e.image_id == "a")
    assert a.reason == "corrupt or truncated pixel data" and a.site == "s1"
    t = datetime.fromisoformat(a.time)
    assert t.utcoffset() == timedelta(0)
    # A new instance sees the same file (the record is on disk, not in memory).
    assert Quarantine(tmp_path / "q.jsonl", site="s1").image_ids() == {"a", "b"}

    out = q.to_csv(tmp_path / "reports" / "quarantine.csv")
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image_id"] for r in rows] == ["b", "a"]
    assert set(rows[0]) == {"site", "image_id", "path", "reason", "time"}


def test_quarantine_in_memory_and_safe_read(tmp_path):
    q = Quarantine(None, site="mem")
    assert len(q) == 0
    assert safe_read(read_image, tmp_path / "missing.png", "m1", q) is None
    Image.fromarray(ramp(dtype=np.uint8)).save(tmp_path / "ok.png")
    assert safe_read(read_image, tmp_path / "ok.png", "ok", q).shape == (8, 8)
    assert q.entries() == [
        QuarantineEntry("mem", "m1", str(tmp_path / "missing.png"), "file not found", q.entries()[0].time)
    ]

    def buggy_reader(path):
        raise TypeError("a programming error")

    with pytest.raises(TypeError):  # bugs are not quarantined
        safe_read(buggy_reader, tmp_path / "ok.png", "ok", q)
    assert q.image_ids() == {"m1"}
