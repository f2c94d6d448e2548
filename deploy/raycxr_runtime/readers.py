"""Image readers for chest radiographs: DICOM, PNG, JPEG, TIFF -> float32 (H, W) in [0, 1].

This module imports only numpy, pydicom, PIL and the standard library (no torch), because the
same code runs inside the hospital inference runtime, which has no torch.

DICOM display pipeline
----------------------
A radiograph's stored values are not what the radiologist sees. The DICOM grayscale pipeline
(PS3.4 N.2) turns stored values into display values, and a model must see the image the way it
was reported on, at every site. :func:`read_dicom` therefore does:

1. **Decode** with pydicom 3 (``Dataset.pixel_array``). Compressed transfer syntaxes go through
   pydicom's decoding plugins, tried in this order until one succeeds: RLE (pylibjpeg-rle, then
   pydicom's own), JPEG baseline (GDCM, then Pillow), JPEG lossless and JPEG-LS (GDCM only while
   pylibjpeg-libjpeg is not installed), JPEG 2000 (GDCM, pylibjpeg-openjpeg, Pillow), HTJ2K
   (pylibjpeg-openjpeg). 12-bit JPEG Extended needs pylibjpeg-libjpeg: neither GDCM (through
   pydicom) nor Pillow decode it, and the error says so. :func:`decoding_plugins` lists what the
   current environment has. pydicom masks the unused high bits when *Bits Stored* < *Bits Allocated*
   (some modalities leave overlay or garbage bits there) and sign-extends signed data.
2. **Modality LUT** (``apply_modality_lut``): *Rescale Slope/Intercept* or a *Modality LUT
   Sequence*.
3. **VOI LUT** (``apply_voi_lut(prefer_lut=True)``): the *VOI LUT Sequence* if present, else
   the first *Window Center/Width* pair (a file may offer several; the first is the default
   view). The result is scaled by the VOI *output* range, so a window means what it says:
   values below it are 0, above it 1. Without a VOI (or with ``apply_voi=False``) the image is
   min-max scaled (a constant image becomes zeros).
4. **MONOCHROME1 inversion**: in MONOCHROME1 (common for CR/DX) low values are *white*; we
   invert so that, as in MONOCHROME2, bone is bright in every site's output.

Colour images (RGB, YBR after pydicom's conversion to RGB, PALETTE COLOR) become grey (BT.601
luma) scaled by their nominal range, instead of being rejected: secondary captures of CXRs exist.

Why not MONAI's ``PydicomReader``: it applies the rescale only, not the VOI LUT/window nor the
MONOCHROME1 inversion, so a MONOCHROME1 site's images come out as negatives and every site's
intensity distribution differs by its acquisition range. That is wrong for CXR.

Pixel budget
------------
A compressed file can declare far more pixels than it holds: a 14 MB RLE DICOM declaring
30000 x 30000 decodes to gigabytes. Before any decode, the size the header declares (DICOM:
*Rows* x *Columns* x *Samples per Pixel* x *Bits Allocated* x *Number of Frames*; rasters: width x
height x bands) is checked against a :class:`PixelBudget` (default 40 megapixels and 256 MiB
decoded; environment variables ``RAYCXR_MAX_PIXELS`` and ``RAYCXR_MAX_DECODED_BYTES``, or
:func:`set_pixel_budget`, or ``budget=`` per call). Over it, the file is refused with an
:class:`ImageReadError` saying so: training quarantines it, the runtime reports ``error``.

The header can lie too: a decoder allocates what its *codestream* declares. So the frame header of
a JPEG (SOFn) / JPEG-LS (SOF55) / JPEG 2000 (SIZ, also inside a JP2 ``jp2c`` box) codestream is read
from the first fragment (:func:`codestream_size`) and the file refused when that size is over the
budget or is not *Rows* x *Columns*. A Deflated Explicit VR Little Endian data set is inflated by
streaming, 1 MiB at a time, and refused past :func:`inflate_limit` (the decoded budget plus 64 MiB)
before pydicom, which inflates it whole, parses it.

Degenerate images
-----------------
Some files decode but give nothing a model should score. Refused (:class:`ImageReadError`): a
*Rescale Slope* of 0 (a blank image), a *Rescale Slope* / *Intercept* that is not a finite number,
non-finite or out-of-range values (above 2^53) after the modality LUT. Readable but reported as a
*note* (the ``notes`` list of :func:`read_image`; logged as a warning when no list is given; the
runtime flags the image and does not score it): a constant image, a window whose *Window Width* is
below 1 or whose values are not numbers (the window is ignored, the image min-max scaled), a VOI that
cannot be applied. Reasons name the attribute and the rule, never the attribute's value.

Errors
------
Every failure that is a property of the *file* (missing, not DICOM, truncated, corrupt stream,
no pixel data, multi-frame, over the pixel budget, unsupported transfer syntax, too small) raises
:class:`ImageReadError` naming the file and the reason, never a deep library traceback, so a
loader can quarantine the image (see :mod:`raycxr.quarantine`) and go on.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from PIL import Image, ImageOps
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

__all__ = [
    "DICOM_SUFFIXES",
    "CONSTANT_IMAGE",
    "MIN_SIZE",
    "RASTER_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "PixelBudget",
    "check_pixel_budget",
    "codestream_size",
    "inflate_limit",
    "decoding_plugins",
    "get_pixel_budget",
    "read_dicom",
    "read_dicom_header",
    "read_image",
    "read_raster",
    "resize",
    "set_pixel_budget",
]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".dic")
RASTER_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SUPPORTED_SUFFIXES: tuple[str, ...] = DICOM_SUFFIXES + RASTER_SUFFIXES
MIN_SIZE = 8  # images smaller than MIN_SIZE x MIN_SIZE are rejected as "too small"
CONSTANT_IMAGE = "constant image"  # how a degenerate-image note about a constant image starts

# ITU-R BT.601 luma, the weights Pillow's convert("L") uses, so DICOM and raster colour agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_REQUIRED_IMAGE_ATTRS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")


@dataclass(frozen=True)
class PixelBudget:
    """The most an image may declare before it is decoded (see "Pixel budget" in the module docstring).

    Args:
        max_pixels: rows x columns of one frame (default 40 million: 6324 x 6324; CXR detectors are
            about 4300 x 4300 at most).
        max_bytes: the decoded size, rows x columns x samples x bytes per sample x frames (default 256 MiB).
    """

    max_pixels: int = 40_000_000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if int(self.max_pixels) < MIN_SIZE * MIN_SIZE or int(self.max_bytes) < MIN_SIZE * MIN_SIZE:
            raise ValueError(f"pixel budget too small: {self}")

    @classmethod
    def from_env(cls) -> PixelBudget:
        """The default, overridden by ``RAYCXR_MAX_PIXELS`` / ``RAYCXR_MAX_DECODED_BYTES`` when set
        (environment variables reach data-loader and Ray workers without extra plumbing)."""
        base = cls()
        try:
            return cls(max_pixels=int(os.environ.get("RAYCXR_MAX_PIXELS") or base.max_pixels),
                       max_bytes=int(os.environ.get("RAYCXR_MAX_DECODED_BYTES") or base.max_bytes))
        except ValueError as exc:
            raise ValueError(f"invalid RAYCXR_MAX_PIXELS / RAYCXR_MAX_DECODED_BYTES: {exc}") from None


_budget: PixelBudget | None = None


def get_pixel_budget() -> PixelBudget:
    """The process-wide default budget (from the environment unless :func:`set_pixel_budget` changed it)."""
    global _budget
    if _budget is None:
        _budget = PixelBudget.from_env()
    return _budget


def set_pixel_budget(budget: PixelBudget | None) -> None:
    """Set the process-wide default budget (``None``: back to the environment's / the default)."""
    global _budget
    _budget = budget


def check_pixel_budget(path: str | os.PathLike[str], *, rows: int, columns: int, samples: int = 1,
                       bits: int = 8, frames: int = 1, budget: PixelBudget | None = None) -> None:
    """Raise :class:`ImageReadError` when the declared image is over ``budget``; allocates nothing."""
    b = budget or get_pixel_budget()
    pixels = int(rows) * int(columns)
    if pixels > b.max_pixels:
        raise ImageReadError(path, f"over the pixel budget: declares {rows}x{columns} = {pixels / 1e6:.1f} megapixels, "
                                   f"limit {b.max_pixels / 1e6:.1f} (refused before decoding; a decompression bomb?)")
    decoded = pixels * max(1, int(samples)) * max(1, -(-int(bits) // 8)) * max(1, int(frames))
    if decoded > b.max_bytes:
        raise ImageReadError(path, f"over the pixel budget: {rows}x{columns} x {samples} sample(s) x {bits} bits x "
                                   f"{frames} frame(s) = {decoded / 2**20:.0f} MiB decoded, limit "
                                   f"{b.max_bytes / 2**20:.0f} MiB (refused before decoding)")


class ImageReadError(Exception):
    """An image file that cannot be turned into a radiograph array. ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Default pickling would call ImageReadError(message) and fail; Ray / multiprocessing
        # workers ship exceptions back to the driver pickled.
        return (type(self), (self.path, self.reason))


# ----------------------------------------------------------------------------- dispatch


def read_image(path: str | os.PathLike[str], *, budget: PixelBudget | None = None,
               notes: list[str] | None = None) -> np.ndarray:
    """Read any supported radiograph file as float32 (H, W) in [0, 1].

    Dispatch: DICOM suffixes -> :func:`read_dicom`; PNG/JPEG/TIFF suffixes -> :func:`read_raster`;
    anything else (no suffix, or UID-named files such as ``1.2.840.113619.2.55`` whose "suffix"
    is ``.55``) is sniffed: the ``DICM`` marker at byte 128 means DICOM, otherwise it is tried
    as a raster image and finally as a DICOM data set without preamble. ``budget``: see
    :class:`PixelBudget` (default :func:`get_pixel_budget`). ``notes``: a list that receives why the
    image, although readable, is degenerate (see "Degenerate images" in the module docstring).
    """
    p = _existing_file(path)
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(p, budget=budget, notes=notes)
    if suffix in RASTER_SUFFIXES:
        return read_raster(p, budget=budget, notes=notes)
    if _has_dicm_marker(p):
        return read_dicom(p, budget=budget, notes=notes)
    try:
        return read_raster(p, budget=budget, notes=notes)
    except ImageReadError as raster_err:
        if raster_err.reason.startswith("over the pixel budget"):
            raise
        try:
            return read_dicom(p, budget=budget, notes=notes)
        except ImageReadError as dicom_err:
            raise ImageReadError(
                p,
                f"unrecognised image format (suffix {p.suffix!r}); as raster: {raster_err.reason}; "
                f"as DICOM: {dicom_err.reason}",
            ) from None


# ----------------------------------------------------------------------------- DICOM


def read_dicom_header(path: str | os.PathLike[str], *, budget: PixelBudget | None = None) -> pydicom.Dataset:
    """Read the DICOM header only (``stop_before_pixels``); :class:`ImageReadError` if not DICOM.

    A deflated data set is inflated (boundedly, see :func:`_check_deflate`) to reach its header, so
    ``budget`` applies here too."""
    p = _existing_file(path)
    return _read_dataset(p, stop_before_pixels=True, budget=budget)


def read_dicom(path: str | os.PathLike[str], *, apply_voi: bool = True,
               budget: PixelBudget | None = None, notes: list[str] | None = None) -> np.ndarray:
    """Read a single-frame DICOM radiograph through the display pipeline (see module docstring).

    ``apply_voi=False`` skips the VOI LUT / window and min-max scales the modality values
    instead (MONOCHROME1 is still inverted). The header is checked against ``budget`` before decoding.
    ``notes`` receives why a readable image is degenerate (a constant image, an invalid window).
    """
    p = _existing_file(path)
    ds = _read_dataset(p, stop_before_pixels=False, budget=budget)
    _check_image(p, ds, budget)
    _check_codestream(p, ds, budget)
    arr = _decode(p, ds)
    found: list[str] = []
    try:
        out = _to_display(p, ds, arr, apply_voi=apply_voi, notes=found)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # malformed LUT descriptors and the like: a property of the file
        raise ImageReadError(p, f"cannot apply the display pipeline: {type(exc).__name__}: {_scrub(exc)}") from exc
    if out.size and out.min() == out.max() and not any(n.startswith(CONSTANT_IMAGE) for n in found):
        found.append(f"{CONSTANT_IMAGE}: every pixel has the same value")
    _report(p, found, notes)
    return _finish(p, out)


def _report(p: Path, found: list[str], notes: list[str] | None) -> None:
    """Hand degenerate-image notes to the caller's list, or log them when the caller did not ask."""
    if notes is not None:
        notes.extend(found)
    else:
        for note in found:
            logger.warning("%s: %s", p, note)


def decoding_plugins() -> dict[str, tuple[str, ...]]:
    """Installed pydicom decoding plugins per compressed transfer syntax (for start-up logs).

    An empty tuple means that transfer syntax cannot be decoded in this environment.
    """
    syntaxes = [
        pydicom.uid.RLELossless,
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGExtended12Bit,
        pydicom.uid.JPEGLossless,
        pydicom.uid.JPEGLosslessSV1,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.JPEGLSNearLossless,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
        pydicom.uid.HTJ2K,
    ]
    return {ts.name: tuple(get_decoder(ts).available_plugins) for ts in syntaxes}


def _read_dataset(p: Path, *, stop_before_pixels: bool, budget: PixelBudget | None = None) -> pydicom.Dataset:
    _check_deflate(p, budget)
    try:
        return pydicom.dcmread(p, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble / "DICM": maybe a raw (ACR-NEMA style) data set, tried below
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageReadError(p, f"corrupt or truncated DICOM file: {type(exc).__name__}: {_scrub(exc)}") from exc

    # force=True parses almost anything (a text file becomes one nonsense element), so accept
    # the result only when it looks like a DICOM image or SOP instance.
    # A raw data set starts with a low group (0000, 0002 or 0008); anything else is not parsed at all,
    # since a nonsense element length makes pydicom allocate that many bytes.
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    plausible = len(head) == 4 and (struct.unpack("<H", head[:2])[0] in (0, 2, 8)
                                    or struct.unpack(">H", head[:2])[0] in (0, 2, 8))
    try:
        if plausible:
            ds = pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, force=True)
            plausible = "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:  # MemoryError included: an element length no real file has
        plausible = False
    if not plausible:
        raise ImageReadError(p, "not a DICOM file (no 'DICM' marker at byte 128, not a raw DICOM data set)")
    return ds


def _check_image(p: Path, ds: pydicom.Dataset, budget: PixelBudget | None = None) -> None:
    """Reject what is not a single-frame radiograph, or is over the pixel budget, before decoding it."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageReadError(p, "float pixel data (parametric map) is not a radiograph")
        what = f"Modality={_code_value(ds, 'Modality')}, SOPClassUID={_sop_class_name(ds)}"
        if "Rows" in ds:
            raise ImageReadError(p, f"image attributes but no PixelData: file truncated? ({what})")
        raise ImageReadError(p, f"no PixelData: not an image object or file truncated ({what})")
    missing = [k for k in _REQUIRED_IMAGE_ATTRS if ds.get(k) in (None, "")]
    if missing:
        raise ImageReadError(p, f"missing required image attribute(s): {', '.join(missing)}")

    # Header values are never quoted in a reason (a faulty modality can put an identifier anywhere):
    # the reason names the attribute and the rule it breaks.
    frames = _whole_number(p, ds, "NumberOfFrames", default=1)
    rows, cols = _whole_number(p, ds, "Rows"), _whole_number(p, ds, "Columns")
    spp, bits = _whole_number(p, ds, "SamplesPerPixel"), _whole_number(p, ds, "BitsAllocated")
    check_pixel_budget(p, rows=rows, columns=cols, samples=spp, bits=bits, frames=max(1, frames), budget=budget)
    if frames > 1:
        raise ImageReadError(p, f"multi-frame DICOM ({frames} frames) is not a single radiograph")

    if rows < MIN_SIZE or cols < MIN_SIZE:
        raise ImageReadError(p, f"too small ({rows}x{cols}, minimum {MIN_SIZE}x{MIN_SIZE})")

    pi = str(ds.PhotometricInterpretation).strip().upper()
    if pi not in _MONOCHROME + _RGB_LIKE + ("PALETTE COLOR",):
        raise ImageReadError(p, "unsupported PhotometricInterpretation (expected MONOCHROME1, MONOCHROME2, RGB, "
                                "YBR_* or PALETTE COLOR)")


def _whole_number(p: Path, ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    """``int(ds.<keyword>)``, or an :class:`ImageReadError` that names the attribute, not its value."""
    raw = ds.get(keyword)
    if raw in (None, "") and default is not None:
        return default
    try:
        value = float(raw)
        if not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ImageReadError(p, f"invalid {keyword}: not a whole number") from None


def _code_value(ds: pydicom.Dataset, keyword: str) -> str:
    """Modality for a reason: only a defined term (PS3.3 C.7.3.1.1.1) is quoted; other values are not echoed."""
    from .safety import MODALITY_TERMS

    value = str(ds.get(keyword) or "").strip().upper()
    if not value:
        return "?"
    return value if value in MODALITY_TERMS else "(not a defined term)"


def _scrub(exc: BaseException | str) -> str:
    """A library's error text for a reason: one line, quoted parts (where libraries put values) elided."""
    text = " ".join(str(exc).split())
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)[:400]


def _decode(p: Path, ds: pydicom.Dataset) -> np.ndarray:
    ts = _transfer_syntax(p, ds)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageReadError(
            p, f"unsupported transfer syntax {ts.name} ({ts}): pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        raise ImageReadError(
            p,
            f"cannot decode transfer syntax {ts.name}: no decoding plugin installed; install one of: "
            + "; ".join(decoder.missing_dependencies),
        )
    try:
        arr = ds.pixel_array
    except (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 (Rust decoders raise pyo3's PanicException, a BaseException)
        if not isinstance(exc, Exception):
            detail = _scrub(exc)[:300]
            raise ImageReadError(p, f"the {ts.name} decoder crashed on this file ({type(exc).__name__}: {detail})") \
                from None
        detail = _scrub(exc)  # pydicom lists per-plugin failures on several lines
        missing = "; ".join(decoder.missing_dependencies)
        if missing and "not support" in detail:
            # e.g. 12-bit JPEG Extended: GDCM (via pydicom) and Pillow refuse it, pylibjpeg-libjpeg
            # decodes it. The file is fine; the environment lacks the plugin.
            reason = (
                f"unsupported {ts.name} variant for the installed plugins ({detail}); "
                f"install one of: {missing}"
            )
        else:
            reason = f"corrupt or truncated pixel data ({ts.name}): {type(exc).__name__}: {detail}"
            if missing:
                reason += f"; other plugins that may decode it: {missing}"
        raise ImageReadError(p, reason) from exc

    spp = int(ds.SamplesPerPixel)
    expected_ndim = 2 if spp == 1 else 3
    if arr.ndim != expected_ndim or (spp > 1 and arr.shape[-1] != spp):
        raise ImageReadError(
            p, f"decoded pixel array has unexpected shape {arr.shape} for SamplesPerPixel={spp}"
        )
    return arr


def _transfer_syntax(p: Path, ds: pydicom.Dataset) -> pydicom.uid.UID:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return pydicom.uid.UID(ts)
    # Raw data sets (no file meta): the encoding pydicom parsed them with is the transfer syntax,
    # unless the pixel data is encapsulated (then the codec is unknowable).
    if ds["PixelData"].is_undefined_length:
        raise ImageReadError(p, "compressed (encapsulated) pixel data but no TransferSyntaxUID")
    implicit, little = ds.original_encoding
    if little is False:
        ts = pydicom.uid.ExplicitVRBigEndian
    elif implicit:
        ts = pydicom.uid.ImplicitVRLittleEndian
    else:
        ts = pydicom.uid.ExplicitVRLittleEndian
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


# ----------------------------------------------------------------------------- what the bytes declare
#
# The pixel budget above trusts Rows/Columns, but a decoder allocates what its *codestream* declares
# (a JPEG-LS frame header saying 60000 x 60000 inside a 512 x 512 header aborted GDCM), and a deflated
# data set is inflated whole before pydicom parses a single element (1 MB became 1 GiB). Both are
# checked here, before pydicom or a decoder sees the bytes.

# Header allowance on top of the decoded-pixel budget for a deflated data set: its other elements.
_DEFLATE_HEADER_ALLOWANCE = 64 * 1024 * 1024
_INFLATE_STEP = 1 << 20

# Start-of-frame markers (ITU-T T.81 B.1.1.3): SOF0-3, 5-7, 9-11, 13-15; and JPEG-LS SOF55 (ITU-T T.87).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_JPEG_SYNTAXES = frozenset({pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEGLossless,
                            pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLSNearLossless})
_J2K_SYNTAXES = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000, pydicom.uid.HTJ2KLossless,
                           pydicom.uid.HTJ2KLosslessRPCL, pydicom.uid.HTJ2K})
_HEADER_SCAN_BYTES = 1 << 20  # a frame header sits in the first bytes; never look further than this


def inflate_limit(budget: PixelBudget | None = None) -> int:
    """The most a deflated data set may inflate to: the decoded-pixel budget plus 64 MiB of other elements."""
    return (budget or get_pixel_budget()).max_bytes + _DEFLATE_HEADER_ALLOWANCE


def _check_deflate(p: Path, budget: PixelBudget | None) -> None:
    """Refuse a Deflated Explicit VR Little Endian file that inflates past :func:`inflate_limit`.

    pydicom inflates the whole data set in one ``zlib.decompress`` before parsing it; here a
    streaming ``decompressobj`` with ``max_length`` counts the inflated bytes, holding 1 MiB at a time."""
    if not _has_dicm_marker(p):
        return
    try:
        with p.open("rb") as f:
            f.seek(132)
            meta = pydicom.filereader._read_file_meta_info(f)
            if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
                return
            limit = inflate_limit(budget)
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            for block in iter(lambda: f.read(1 << 16), b""):
                data = inflater.decompress(block, _INFLATE_STEP)
                total += len(data)
                while inflater.unconsumed_tail and total <= limit:
                    total += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP))
                if total > limit:
                    raise ImageReadError(p, f"deflated data set inflates past the limit of {limit >> 20} MiB "
                                            "(pixel budget plus header allowance): refused before parsing "
                                            "(a decompression bomb?)")
                if inflater.eof:
                    return
    except ImageReadError:
        raise
    except (OSError, ValueError, zlib.error, EOFError, KeyError):
        return  # not readable as deflate here: dcmread reports the problem in its own words


def codestream_size(data: bytes) -> tuple[str, int, int, int, int] | None:
    """``(marker, rows, columns, components, bits)`` that a JPEG / JPEG-LS / JPEG 2000 codestream (or JP2
    file) declares in its frame header, from its first bytes; ``None`` when no frame header is found.

    ``marker`` names where the size was read: ``"SOFn"`` (ITU-T T.81 B.2.2), ``"SOF55"`` (JPEG-LS,
    ITU-T T.87 C.2.2) or ``"SIZ"`` (JPEG 2000, ISO/IEC 15444-1 A.5.1). Nothing is decoded."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_frame_header(data)
    if data[:4] == b"\xff\x4f\xff\x51":
        return _j2k_siz(data)
    if data[4:8] == b"jP  ":
        box = _jp2_codestream(data)
        return _j2k_siz(box) if box is not None and box[:4] == b"\xff\x4f\xff\x51" else None
    return None


def _jpeg_frame_header(data: bytes) -> tuple[str, int, int, int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not at a marker: a corrupt stream
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            bits, rows, cols, comps = struct.unpack_from(">BHHB", data, i + 4)
            return ("SOF55" if marker == 0xF7 else "SOFn"), rows, cols, comps, bits
        i += 2 + length
    return None


def _j2k_siz(data: bytes) -> tuple[str, int, int, int, int] | None:
    if len(data) < 4 + 38 + 3:
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, 8)
    (comps,) = struct.unpack_from(">H", data, 40)
    bits = (data[42] & 0x7F) + 1
    return "SIZ", max(0, ysiz - yo), max(0, xsiz - xo), comps, bits


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contents of the first ``jp2c`` box of a JP2 file (ISO/IEC 15444-1 I.5)."""
    i, n = 0, len(data)
    while i + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, i)
        header = 8
        if length == 1:
            if i + 16 > n:
                return None
            (length,) = struct.unpack_from(">Q", data, i + 8)
            header = 16
        elif length == 0:
            length = n - i
        if kind == b"jp2c":
            return data[i + header:i + length]
        if length < header:
            return None
        i += length
    return None


def _first_fragment_bytes(ds: pydicom.Dataset) -> bytes:
    """The start of the first frame's codestream: fragments joined up to :data:`_HEADER_SCAN_BYTES`."""
    out = b""
    items = generate_fragments(ds.PixelData)
    next(items, None)  # the Basic Offset Table item
    for fragment in items:
        out += fragment
        if len(out) >= _HEADER_SCAN_BYTES:
            break
    return out[:_HEADER_SCAN_BYTES]


def _check_codestream(p: Path, ds: pydicom.Dataset, budget: PixelBudget | None) -> None:
    """Refuse a JPEG / JPEG-LS / JPEG 2000 codestream whose own frame header declares a size other than
    Rows x Columns, or more than the budget: the decoder allocates what the codestream says."""
    ts = _transfer_syntax(p, ds)
    family = "JPEG" if ts in _JPEG_SYNTAXES else "JPEG 2000" if ts in _J2K_SYNTAXES else None
    if family is None or not ds["PixelData"].is_undefined_length:
        return
    try:
        head = _first_fragment_bytes(ds)
    except (ValueError, TypeError, struct.error) as exc:
        raise ImageReadError(p, f"corrupt encapsulated pixel data ({ts.name}): {type(exc).__name__}") from None
    found = codestream_size(head)
    if found is not None and (found[0] == "SIZ") != (family == "JPEG 2000"):
        found = None  # the other codec's stream: the decoder for this transfer syntax cannot size it
    if found is None:
        where = "frame header (SOFn / SOF55)" if family == "JPEG" else "SIZ marker"
        raise ImageReadError(p, f"no {family} {where} at the start of the pixel data ({ts.name}): corrupt "
                                "codestream, refused before decoding")
    marker, rows, cols, comps, bits = found
    what = f"the {family}{'-LS' if marker == 'SOF55' else ''} codestream's {marker} header"
    b = budget or get_pixel_budget()
    decoded = rows * cols * max(1, comps) * max(1, -(-bits // 8))
    if rows * cols > b.max_pixels or decoded > b.max_bytes:
        raise ImageReadError(p, f"over the pixel budget: {what} declares more than the limit of "
                                f"{b.max_pixels / 1e6:.1f} megapixels / {b.max_bytes >> 20} MiB decoded "
                                "(refused before decoding)")
    if rows == 0 or cols == 0 or rows != int(ds.Rows) or cols != int(ds.Columns):
        raise ImageReadError(p, f"{what} declares another image size than Rows/Columns: refused before "
                                "decoding (a codestream that misstates its size can exhaust memory)")


def _to_display(p: Path, ds: pydicom.Dataset, arr: np.ndarray, *, apply_voi: bool,
                notes: list[str]) -> np.ndarray:
    pi = str(ds.PhotometricInterpretation).strip().upper()
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb) / float(np.iinfo(rgb.dtype).max if rgb.dtype.kind in "ui" else 1.0)
    if pi in _RGB_LIKE:
        # pydicom has already converted YBR to RGB; values are display values in the nominal range.
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        return _luma(arr) / float(2**bits - 1)

    _check_rescale(p, ds)
    values = apply_modality_lut(arr, ds)
    _check_modality_values(p, values)
    if values.size and values.min() == values.max():
        notes.append(f"{CONSTANT_IMAGE}: every pixel has the same value after the modality LUT (PixelData, "
                     "RescaleSlope / RescaleIntercept)")
        apply_voi = False  # nothing a window could show
    out: np.ndarray | None = None
    kind = _voi_kind(ds) if apply_voi else None
    if kind == "window":
        problem = _window_problem(ds)
        if problem:
            notes.append(f"{problem}: the window was ignored and the image min-max scaled")
            kind = None
    if kind is not None:
        try:
            lo, hi = _voi_output_range(ds, kind)
            if kind == "lut" and values.dtype.kind == "f":
                # LUT input must be integral; a rescale with integer slope/intercept gives floats.
                values = np.rint(values).astype(np.int64)
            windowed = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            out = np.clip((np.asarray(windowed, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        except (ValueError, NotImplementedError, ZeroDivisionError, TypeError, IndexError):
            # The pixels are fine, only the suggested VOI is not (pydicom's message may quote it: not kept).
            notes.append("the VOI (VOILUTSequence, WindowCenter / WindowWidth, VOILUTFunction) cannot be "
                         "applied: it was ignored and the image min-max scaled")
            out = None
        if out is not None and out.size and out.min() == out.max():
            notes.append(f"{CONSTANT_IMAGE}: the window (WindowCenter / WindowWidth or VOILUTSequence) maps every "
                         "pixel to one value")
    if out is None:
        out = _minmax(values)
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return out


# Above 2**53 float64 stops representing whole numbers: no stored value times a sane slope gets there.
_MAX_MODALITY_VALUE = float(2**53)


def _check_rescale(p: Path, ds: pydicom.Dataset) -> None:
    """Refuse a Rescale Slope / Intercept that makes the modality LUT undefined or collapse the image."""
    if ds.get("ModalityLUTSequence"):
        return  # the LUT wins over the rescale (PS3.3 C.11.1), as in apply_modality_lut
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        try:
            raw = ds.get(keyword)
            if raw in (None, ""):
                continue
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ImageReadError(p, f"invalid {keyword}: not a single number (the modality LUT is undefined)") \
                from None
        if not math.isfinite(value):
            raise ImageReadError(p, f"invalid {keyword}: not a finite number (NaN or infinity): the modality LUT is "
                                    "undefined")
        if keyword == "RescaleSlope" and value == 0.0:
            raise ImageReadError(p, "invalid RescaleSlope: 0 maps every pixel to one value (a blank image)")


def _check_modality_values(p: Path, values: np.ndarray) -> None:
    if values.dtype.kind != "f" or not values.size:
        return
    if not np.isfinite(values).all():
        raise ImageReadError(p, "non-finite values after the modality LUT (RescaleSlope / RescaleIntercept)")
    if float(np.abs(values).max()) > _MAX_MODALITY_VALUE:
        raise ImageReadError(p, "values out of range after the modality LUT (RescaleSlope / RescaleIntercept): "
                                "magnitudes above 2^53")


def _window_problem(ds: pydicom.Dataset) -> str | None:
    """Why the first WindowCenter / WindowWidth pair cannot be applied (PS3.3 C.11.2.1.2), or ``None``."""
    for keyword in ("WindowCenter", "WindowWidth"):
        try:
            raw = ds.get(keyword)
            value = float(raw[0] if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else raw)
        except (TypeError, ValueError, OverflowError, IndexError):
            return f"invalid {keyword}: not a number"
        if not math.isfinite(value):
            return f"invalid {keyword}: not a finite number"
        if keyword == "WindowWidth" and value < 1:
            return "invalid WindowWidth: below 1 (PS3.3 C.11.2.1.2.1 requires at least 1)"
    return None


def _voi_kind(ds: pydicom.Dataset) -> str | None:
    """What ``apply_voi_lut(prefer_lut=True)`` will apply (mirrors its checks)."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _voi_output_range(ds: pydicom.Dataset, kind: str) -> tuple[float, float]:
    """The (value for black, value for white) that the VOI maps into."""
    if kind == "lut":
        item = ds.VOILUTSequence[0]
        declared_bits = int(item.LUTDescriptor[2])
        data = item.LUTData
        if isinstance(data, (bytes, bytearray)):  # VR OW: raw 16-bit words, as apply_voi reads them
            little = ds.original_encoding[1] is not False
            entries = np.frombuffer(bytes(data)[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
        else:
            entries = np.atleast_1d(np.asarray(data, dtype=np.int64))
        lut_max = int(entries.max()) if entries.size else 0
        # Vendors often declare 16 bits per entry for a 12-bit LUT; scaling by 65535 would give
        # a near-black image, so use the depth the data actually needs (as dcmtk does).
        bits = min(declared_bits, max(8, lut_max.bit_length()))
        return 0.0, float(2**bits - 1)

    # Same output range as pydicom's apply_windowing (PS3.3 C.11.2.1.2).
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    if y_max == y_min:
        raise ZeroDivisionError("VOI output range is empty")
    return y_min, y_max


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        return "?"
    uid = str(uid).strip()
    name = pydicom.uid.UID(uid).name
    return name if name and name != uid else (uid if re.fullmatch(r"[0-9.]{1,64}", uid) else "(not a valid UID)")


def _has_dicm_marker(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF


def read_raster(path: str | os.PathLike[str], *, budget: PixelBudget | None = None,
                notes: list[str] | None = None) -> np.ndarray:
    """Read a PNG / JPEG / TIFF radiograph as float32 (H, W) in [0, 1].

    8-bit data is divided by 255, 16-bit (mode ``I;16*``, or ``I`` within 0..65535) by 65535;
    RGB(A) becomes BT.601 luma with the alpha channel dropped. EXIF orientation is applied. The
    declared size is checked against ``budget`` before the pixels are decoded.
    """
    p = _existing_file(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
            check_pixel_budget(p, rows=h, columns=w, samples=len(im.getbands()),
                               bits=16 if im.mode.startswith("I;16") else 32 if im.mode in ("I", "F") else 8,
                               budget=budget)
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                raise ImageReadError(p, f"multi-page image ({frames} pages) is not a single radiograph")
            im.load()
            arr = _pil_to_unit(p, ImageOps.exif_transpose(im))
            if arr.size and arr.min() == arr.max():
                _report(p, [f"{CONSTANT_IMAGE}: every pixel has the same value"], notes)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated streams, decompression bombs
        raise ImageReadError(p, f"unreadable image file: {type(exc).__name__}: {exc}") from exc
    return _finish(p, arr)


def _pil_to_unit(p: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float64)
    if mode == "L":
        return np.asarray(im, dtype=np.float64) / 255.0
    if mode == "LA":
        return np.asarray(im.getchannel(0), dtype=np.float64) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float64) / 65535.0
    if mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:  # 16-bit data Pillow widened to int32
            return a / 65535.0
        return _minmax(a)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0:
            return a
        return _minmax(np.nan_to_num(a))
    try:
        # RGB, RGBA (alpha dropped, not composited), P, PA, CMYK, YCbCr, ...
        rgb = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageReadError(p, f"unsupported image mode {mode!r}: {exc}") from exc
    return _luma(np.asarray(rgb)) / 255.0


# ----------------------------------------------------------------------------- shared helpers


def link_problem(path: str) -> str | None:
    """Why a symbolic link cannot be followed, or ``None`` (not a link, a missing path, or a good link)."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: the link leads back to itself"
        if exc.errno == errno.ENOENT:
            return "dangling symbolic link: its target does not exist"
        return f"cannot follow the symbolic link: {exc.strerror or exc}"
    return None


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, link_problem(str(p)) or "file not found")  # say why a link leads nowhere
    if not p.is_file():
        raise ImageReadError(p, "not a regular file")
    if not os.access(p, os.R_OK):
        raise ImageReadError(p, "file not readable (permission denied)")
    return p


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb[..., :3], dtype=np.float64) @ _LUMA


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:  # constant image: zeros, not a division by zero
        return np.zeros(a.shape, dtype=np.float64)
    return (a - lo) / (hi - lo)


def _finish(p: Path, a: np.ndarray) -> np.ndarray:
    if a.ndim != 2:
        raise ImageReadError(p, f"expected a 2-D image, got shape {a.shape}")
    h, w = a.shape
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ImageReadError(p, f"too small ({h}x{w}, minimum {MIN_SIZE}x{MIN_SIZE})")
    # Guard against float rounding just outside the interval (e.g. luma of 255s).
    return np.ascontiguousarray(np.clip(a, 0.0, 1.0), dtype=np.float32)


# ----------------------------------------------------------------------------- model input


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) float32 radiograph to (size, size): bilinear, antialiased when shrinking.

    This is *the* resize of raycxr: training, evaluation and the hospital runtime all call it, so
    a model sees the same pixels in production as in its test split. Pillow's float mode is used
    (not torch or MONAI) because the runtime has neither.
    """
    if image.ndim != 2:
        raise ValueError(f"resize expects a (H, W) image, got shape {image.shape}")
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    out = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)
