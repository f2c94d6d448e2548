"""Hostile DICOM inputs for the hospital runtime (issue 23): files that lie, bombs and degenerate images.

Every case is a small file built with pydicom; where a codec is involved only its *headers* are
hand-crafted (a JPEG-LS frame header, a JPEG 2000 SIZ marker), because the point of the file is
the lie between the DICOM header (*Rows* x *Columns*) and the codestream, not valid entropy-coded
data. No encoder is needed.

    python tests/hostile_corpus.py OUT_DIR      # writes every case, prints name, size and what it is

:func:`build` returns ``{name: path}``; :data:`CASES` says what each case is. ``PHI_STRINGS`` are
the identifiers planted in header values: none of them may appear in any output or log line.
:func:`build_names` adds, for the CLI, the file-system cases: a symbolic link loop, a dangling
link, a filename that is not UTF-8, one with a newline and one starting with ``=`` (a spreadsheet
formula).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

__all__ = ["CASES", "NAME_CASES", "PHI_STRINGS", "build", "build_names", "jls_codestream", "j2k_codestream",
           "jp2_file"]

PHI_STRINGS = ("PHIID12345", "PHINAME", "Doe^Hostile^PHI", "MRN-HOSTILE-99")
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
GIB = 1 << 30


def base_ds(rows: int = 512, cols: int = 512, *, bits: int = 8) -> Dataset:
    """A chest DX header (in scope for the model) with patient identifiers in the usual places."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX, generate_uid()
    ds.PatientName, ds.PatientID = PHI_STRINGS[2], PHI_STRINGS[3]
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    return ds


def ramp(rows: int = 512, cols: int = 512, dtype: type = np.uint8) -> np.ndarray:
    hi = 255 if dtype == np.uint8 else 4095
    return (np.add.outer(np.arange(rows), np.arange(cols)) % (hi + 1)).astype(dtype)


def _save(ds: Dataset, path: Path) -> Path:
    with warnings.catch_warnings():  # pydicom's "invalid value" warnings quote the planted identifiers
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------- codestream headers


def jls_codestream(rows: int, cols: int, *, precision: int = 8, scan: bytes = b"\x00" * 64) -> bytes:
    """A JPEG-LS codestream (ISO/IEC 14495-1): SOI, SOF55 frame header declaring rows x cols, SOS, scan, EOI."""
    sof = struct.pack(">HHBHHB", 0xFFF7, 11, precision, rows, cols, 1) + bytes([1, 0x11, 0])
    sos = struct.pack(">HHB", 0xFFDA, 8, 1) + bytes([1, 0, 0, 0, 0])  # comp 1, no table, NEAR 0, ILV 0, Al/Ah 0
    return b"\xff\xd8" + sof + sos + scan + b"\xff\xd9"


def j2k_codestream(rows: int, cols: int, *, data: bytes = b"\x00" * 64) -> bytes:
    """A JPEG 2000 codestream (ISO/IEC 15444-1 Annex A): SOC, SIZ declaring rows x cols (one tile), COD,
    QCD, one tile-part of ``data``, EOC."""
    siz = struct.pack(">HHHIIIIIIIIH", 0xFF51, 41, 0, cols, rows, 0, 0, cols, rows, 0, 0, 1) + bytes([7, 1, 1])
    cod = struct.pack(">HHB", 0xFF52, 12, 0) + bytes([0, 0, 1, 0, 0, 4, 4, 0, 1])  # LRCP, 1 layer, 0 levels, 5-3
    qcd = struct.pack(">HHB", 0xFF5C, 4, 0x40) + bytes([0x40])
    sot = struct.pack(">HHHIBB", 0xFF90, 10, 0, 12 + 2 + len(data), 0, 1)
    return b"\xff\x4f" + siz + cod + qcd + sot + b"\xff\x93" + data + b"\xff\xd9"


def jp2_file(codestream: bytes, rows: int, cols: int) -> bytes:
    """``codestream`` in a JP2 file (ISO/IEC 15444-1 Annex I): signature, ftyp, jp2h (ihdr) and jp2c boxes."""
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload
    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", rows, cols, 1, 7, 7, 0, 0))
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 " + b"\x00" * 4 + b"jp2 ")
            + box(b"jp2h", ihdr) + box(b"jp2c", codestream))


def _encapsulated(path: Path, ts: str, codestream: bytes, rows: int = 512, cols: int = 512) -> Path:
    ds = base_ds(rows, cols)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return _save(ds, path)


# ----------------------------------------------------------------------------------- deflate bombs


def _deflated(path: Path, ds: Dataset, big_tag: int, big_length: int) -> Path:
    """``ds`` in the Deflated Explicit VR Little Endian transfer syntax, with one more element ``big_tag``
    (VR OB) of ``big_length`` zero bytes: streamed through the compressor, never held in memory."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < big_tag else after).add(elem)

    def encode(part: Dataset) -> bytes:
        buf = pydicom.filebase.DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, part)
        return buf.getvalue()

    # After a full flush the compressor starts afresh, so one compressed chunk of zeros, repeated,
    # is a valid stream of many: the bomb is built in milliseconds.
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    group, element = big_tag >> 16, big_tag & 0xFFFF
    head = encode(before) + struct.pack("<HH2sHI", group, element, b"OB", 0, big_length)
    chunk = 8 << 20
    n, rest = divmod(big_length, chunk)
    body = [comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)]
    if n:
        body.append((comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)) * n)
    body.append(comp.compress(bytes(rest) + encode(after)) + comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(pydicom.filebase.DicomFileLike(f), meta, enforce_standard=True)
        for part in body:
            f.write(part)
    return path


def deflate_bomb(path: Path, size: int = GIB) -> Path:
    """A 512 x 512 header whose PixelData inflates to ``size`` bytes (1 GiB from ~1 MB)."""
    return _deflated(path, base_ds(), 0x7FE00010, size)


def deflate_bomb_private(path: Path, size: int = GIB) -> Path:
    """A valid 512 x 512 image plus a private OB element of ``size`` zero bytes: the image alone is fine."""
    ds = base_ds()
    ds.PixelData = ramp().tobytes()
    block = ds.private_block(0x0009, "RAYCXR HOSTILE", create=True)
    block.add_new(0x01, "LO", "placeholder")  # replaced: the big element is written by _deflated
    del ds[0x00091001]
    return _deflated(path, ds, 0x00091010, size)


# ----------------------------------------------------------------------------------- degenerate images


def _plain(path: Path, pixels: np.ndarray | None = None, **attrs: object) -> Path:
    px = ramp() if pixels is None else pixels
    ds = base_ds(*px.shape, bits=px.dtype.itemsize * 8)
    ds.PixelData = px.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return _save(ds, path)


def _raw_attr(path: Path, keyword: str, raw: bytes, vr: str) -> Path:
    """A valid image whose ``keyword`` holds ``raw`` bytes as they are (pydicom would refuse to write them)."""
    ds = base_ds()
    ds.PixelData = ramp().tobytes()
    _put_raw(ds, keyword, vr, raw)
    return _save(ds, path)


def _put_raw(ds: Dataset, keyword: str, vr: str, raw: bytes) -> None:
    """Store ``raw`` as the element's encoded value, unvalidated (as a faulty modality would write it)."""
    tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
    raw = raw + b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def rescale(path: Path, slope: str, intercept: str) -> Path:
    ds = base_ds(bits=16)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = ramp(dtype=np.uint16).tobytes()
    # DS values written as text, as a modality would; pydicom would not accept NaN / inf as numbers.
    _put_raw(ds, "RescaleSlope", "DS", slope.encode())
    _put_raw(ds, "RescaleIntercept", "DS", intercept.encode())
    return _save(ds, path)


def _truncated(path: Path) -> Path:
    good = _plain(path.with_name("_full.dcm"))
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 3])
    return path


def real_cr_without_spacing(path: Path) -> Path:
    """pydicom-data's real chest CR (RG1_UNCI: MONOCHROME1, no Imager Pixel Spacing), as it is: scorable,
    and its SR must be made without the attribute highdicom's image library would like."""
    from pydicom.data import get_testdata_file

    return Path(shutil.copyfile(get_testdata_file("RG1_UNCI.dcm"), path))


# name -> (builder, what it is). Builders take the output path.
CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "jls_60000.dcm": (lambda p: _encapsulated(p, JPEGLSLossless, jls_codestream(60000, 60000)),
                      "JPEG-LS, header 512x512, SOF55 frame header 60000x60000 (aborted GDCM: exit 134)"),
    "jls_8000.dcm": (lambda p: _encapsulated(p, JPEGLSLossless, jls_codestream(8000, 8000)),
                     "JPEG-LS, header 512x512, SOF55 frame header 8000x8000 (was scored)"),
    "j2k_siz.dcm": (lambda p: _encapsulated(p, JPEG2000Lossless, j2k_codestream(20000, 20000)),
                    "JPEG 2000, header 512x512, SIZ 20000x20000 (1.96 GB peak)"),
    "jp2_siz.dcm": (lambda p: _encapsulated(p, JPEG2000Lossless,
                                            jp2_file(j2k_codestream(20000, 20000), 20000, 20000)),
                    "the same SIZ lie inside a JP2 file (jp2c box)"),
    "deflate_bomb.dcm": (deflate_bomb, "Deflated Explicit VR LE: ~1 MB inflating to 1 GiB of PixelData"),
    "deflate_private.dcm": (deflate_bomb_private, "Deflated: valid 512x512 image + a 1 GiB private element"),
    "slope_zero.dcm": (lambda p: rescale(p, "0", "0"), "RescaleSlope 0: every pixel maps to one value"),
    "slope_nan.dcm": (lambda p: rescale(p, "NaN", "0"), "RescaleSlope NaN"),
    "intercept_inf.dcm": (lambda p: rescale(p, "1", "inf"), "RescaleIntercept inf"),
    "window_zero.dcm": (lambda p: _plain(p, WindowCenter=128, WindowWidth=0), "WindowWidth 0"),
    "window_negative.dcm": (lambda p: _plain(p, WindowCenter=128, WindowWidth=-50), "WindowWidth negative"),
    "constant.dcm": (lambda p: _plain(p, np.full((512, 512), 700, np.uint16)), "a constant image"),
    "phi_frames.dcm": (lambda p: _raw_attr(p, "NumberOfFrames", PHI_STRINGS[0].encode(), "IS"),
                       "NumberOfFrames holding an identifier"),
    "phi_photometric.dcm": (lambda p: _raw_attr(p, "PhotometricInterpretation", PHI_STRINGS[1].encode(), "CS"),
                            "PhotometricInterpretation holding an identifier"),
    "truncated.dcm": (_truncated, "a valid file cut at a third"),
    "not_dicom.dcm": (lambda p: (p.write_bytes(b"%PDF-1.4 not an image\n" * 40), p)[1], "not a DICOM file"),
    "cr_no_spacing.dcm": (real_cr_without_spacing, "a real chest CR without ImagerPixelSpacing (scorable)"),
}

# file-system cases for the CLI: name -> what it is (:func:`build_names` makes them)
NAME_CASES = {
    "loop_a.dcm": "a symbolic link loop (loop_a.dcm -> loop_b.dcm -> loop_a.dcm)",
    "loop_b.dcm": "the other half of the loop",
    "dangling.dcm": "a symbolic link to a file that does not exist",
    "bad\udcff\udcfename.dcm": "a filename that is not UTF-8 (bytes 0xFF 0xFE): a valid image",
    "new\nline.dcm": "a filename with a newline: a valid image",
    "=HYPERLINK(1).dcm": "a filename starting with '=' (a spreadsheet formula): a valid image",
}


def build_names(out: str | Path) -> dict[str, Path]:
    """Write the :data:`NAME_CASES` into ``out`` (POSIX: links and byte names); ``{name: path}``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    made = {n: folder / n for n in NAME_CASES}
    os.symlink("loop_b.dcm", made["loop_a.dcm"])
    os.symlink("loop_a.dcm", made["loop_b.dcm"])
    os.symlink("missing.dcm", made["dangling.dcm"])
    for name in ("bad\udcff\udcfename.dcm", "new\nline.dcm", "=HYPERLINK(1).dcm"):
        _plain(made[name])
    return made


def build(out: str | Path, names: list[str] | None = None, *, bomb_size: int = GIB) -> dict[str, Path]:
    """Write the cases (all, or ``names``) into ``out``; ``bomb_size``: what the deflate bombs inflate to."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, (make, _) in CASES.items():
        if names is not None and name not in names:
            continue
        if name.startswith("deflate"):
            made[name] = (deflate_bomb if name == "deflate_bomb.dcm" else deflate_bomb_private)(folder / name,
                                                                                                  bomb_size)
        else:
            made[name] = make(folder / name)
    return made


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/hostile_corpus.py OUT_DIR")
    for n, p in build(sys.argv[1]).items():
        print(f"{n:24s} {p.stat().st_size:>10,d} B  {CASES[n][1]}")
