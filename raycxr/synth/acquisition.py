"""Per-site acquisition signatures and DICOM writing for the synthetic corpus.

A site's images differ from another's not only in who was scanned but in how: detector response
curve, noise, blur, collimation, burned-in markers, photometric interpretation (MONOCHROME1 stores
bright as low values), bit depth, rescale and window in the header, and transfer syntax. Those are
the signatures that make multi-source pretraining hard, so each site gets its own
:class:`SiteProfile`. Stored values are chosen so that the standard display pipeline (modality
LUT → VOI window → MONOCHROME1 inversion, as :mod:`raycxr.readers` does) gives back the image.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                     "rle": RLELossless, "j2k": JPEG2000Lossless}


@dataclass(frozen=True)
class SiteProfile:
    """How one site acquires and stores its radiographs."""

    manufacturer: str = "raycxr synthetic"
    model: str = "generic"
    modality: str = "DX"  # CR or DX
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    rescale: tuple[float, float] | None = None  # (slope, intercept); None = no modality LUT
    window: bool = True  # write WindowCenter/Width covering the used range
    size: int = 256  # stored rows = columns
    gamma: float = 1.0  # detector response / processing curve
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.02  # quantum noise std at mid grey
    blur: float = 0.5  # focal spot + detector blur (pixels at 256)
    collimation: float = 0.2  # probability of visible collimator edges
    markers: tuple[str, ...] = ("R",)
    marker_prob: float = 0.6
    transfer_syntax: str = "explicit"  # explicit | implicit | rle | j2k
    pixel_spacing: float = 0.6  # mm at the stored size
    used_range: tuple[float, float] = (0.55, 0.9)  # fraction of the stored range that holds the image
    extra_header: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **kw: Any) -> SiteProfile:
        return replace(self, **kw)


# One signature per public source: modelled on what those collections are known for (NIH: 8-bit
# PNG exports; CheXpert: processed DX; VinDr and Open-I: MONOCHROME1 from CR/DX vendors; SIIM and
# RSNA: 8-bit DICOM exports, many portable AP).
PROFILES: dict[str, SiteProfile] = {
    "nih": SiteProfile("Clinical Center PACS export", "NIH-PNG2DCM", "DX", "MONOCHROME2", 8, None, False, 256,
                       gamma=1.0, contrast=1.1, noise=0.015, blur=0.6, collimation=0.1,
                       markers=("R", "L"), marker_prob=0.5, transfer_syntax="explicit",
                       used_range=(0.0, 1.0)),
    "chexpert": SiteProfile("GE Healthcare", "Definium 6000", "DX", "MONOCHROME2", 12, (1.0, 0.0), True, 288,
                            gamma=0.8, contrast=1.25, brightness=0.02, noise=0.02, blur=0.8, collimation=0.3,
                            markers=("PORTABLE", "AP", "L"), marker_prob=0.7, transfer_syntax="j2k"),
    "vindr": SiteProfile("Philips", "DigitalDiagnost", "DX", "MONOCHROME1", 14, (1.0, -1024.0), True, 256,
                         gamma=1.25, contrast=0.9, noise=0.03, blur=0.4, collimation=0.5,
                         markers=("R",), marker_prob=0.3, transfer_syntax="rle"),
    "openi": SiteProfile("FUJIFILM Corporation", "FCR 5000", "CR", "MONOCHROME1", 12, (1.0, 0.0), False, 224,
                         gamma=1.4, contrast=0.85, brightness=-0.03, noise=0.035, blur=1.0, collimation=0.6,
                         markers=("L",), marker_prob=0.4, transfer_syntax="implicit"),
    "siim": SiteProfile("Kaggle SIIM export", "unknown", "DX", "MONOCHROME2", 8, None, False, 256,
                        gamma=0.7, contrast=1.3, noise=0.04, blur=1.2, collimation=0.2,
                        markers=("PORTABLE", "SUPINE"), marker_prob=0.6, transfer_syntax="explicit",
                        used_range=(0.0, 1.0)),
    "padchest": SiteProfile("Philips", "DigitalDiagnost", "CR", "MONOCHROME2", 16, (1.0, 0.0), True, 256,
                            gamma=1.1, contrast=1.0, noise=0.025, blur=0.7, collimation=0.4,
                            markers=("D", "I"), marker_prob=0.6, transfer_syntax="explicit",
                            used_range=(0.05, 0.5)),
    "rsna": SiteProfile("Kaggle RSNA export", "unknown", "CR", "MONOCHROME2", 8, None, False, 256,
                        gamma=0.9, contrast=1.2, noise=0.03, blur=0.9, collimation=0.3,
                        markers=("AP", "PORTABLE"), marker_prob=0.7, transfer_syntax="rle",
                        used_range=(0.0, 1.0)),
}
DEFAULT_PROFILE = SiteProfile()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def acquire(dens: np.ndarray, profile: SiteProfile, rng: np.random.Generator,
            masks: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    """Turn a density map into the displayed image ``v`` in [0, 1] the way this site would.

    Returns ``(v, masks, info)``: ``masks`` resized with the image (nearest), ``info`` with
    what was applied (collimated, markers) for the header.
    """
    s = dens.shape[0]
    v = ndimage.gaussian_filter(dens, profile.blur * s / 256) if profile.blur > 0 else dens.copy()
    v = np.clip(v, 0, 1) ** profile.gamma
    v = 0.5 + profile.contrast * (v - 0.5) + profile.brightness
    v = v + profile.noise * np.sqrt(np.clip(v, 0, 1) + 0.05) * rng.standard_normal(v.shape).astype(np.float32)
    info: dict[str, Any] = {"collimated": False, "markers": []}
    if rng.random() < profile.collimation:
        # unexposed detector behind the collimator blades displays white
        m = (rng.uniform(0.0, 0.08, 4) * s).astype(int)
        v[: m[0]], v[s - m[1]:] = 0.95, 0.95
        v[:, : m[2]], v[:, s - m[3]:] = 0.95, 0.95
        info["collimated"] = True
    if profile.markers and rng.random() < profile.marker_prob:
        img = Image.fromarray(np.zeros((s, s), np.uint8))
        draw = ImageDraw.Draw(img)
        text = str(rng.choice(list(profile.markers)))
        x = int(rng.choice([0.05, 0.8]) * s)
        draw.text((x, int(0.04 * s)), text, fill=255, font=_font(max(10, s // 16)))
        v = np.maximum(v, np.asarray(img, np.float32) / 255.0)
        info["markers"].append(text)
    v = np.clip(v, 0, 1).astype(np.float32)
    if profile.size != s:
        v = np.asarray(Image.fromarray(v, mode="F").resize((profile.size, profile.size), Image.BILINEAR))
        masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
            (profile.size, profile.size), Image.NEAREST)) > 127 for m in (masks or [])]
    return v, list(masks or []), info


def to_stored(v: np.ndarray, profile: SiteProfile, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored pixel values and the header elements that display them back as ``v``.

    The image occupies a site-typical fraction of the stored range (``used_range``); the window,
    when written, covers exactly that part, and MONOCHROME1 stores the inverse.
    """
    top = 2**profile.bits_stored - 1
    lo_f, hi_f = profile.used_range
    lo = lo_f * top + rng.uniform(0, 0.02) * top * (hi_f - lo_f < 1)
    hi = hi_f * top
    disp = lo + v * (hi - lo)
    stored = (top - disp) if profile.photometric == "MONOCHROME1" else disp
    stored = np.clip(np.rint(stored), 0, top).astype(np.uint8 if profile.bits_stored <= 8 else np.uint16)
    hdr: dict[str, Any] = {}
    slope, intercept = profile.rescale or (1.0, 0.0)
    if profile.rescale is not None:
        hdr.update(RescaleSlope=f"{slope:g}", RescaleIntercept=f"{intercept:g}", RescaleType="US")
    if profile.window:
        # window over the modality values that hold the image
        a = intercept + slope * ((top - hi) if profile.photometric == "MONOCHROME1" else lo)
        b = intercept + slope * ((top - lo) if profile.photometric == "MONOCHROME1" else hi)
        hdr.update(WindowCenter=f"{(a + b) / 2 + 0.5:.1f}", WindowWidth=f"{(b - a) + 1:.1f}")
    return stored, hdr


def write_dicom(path: str | Path, stored: np.ndarray, profile: SiteProfile, *, uid_seed: list,
                patient_id: str, sex: str | None, age: float | None, view: str | None,
                study_date: _dt.date, header: dict[str, Any] | None = None) -> Path:
    """Write one de-identified radiograph with realistic headers in the site's transfer syntax."""
    path = Path(path)
    sop_class = CR_STORAGE if profile.modality == "CR" else DX_STORAGE
    sop_uid = generate_uid(entropy_srcs=[str(x) for x in uid_seed] + ["sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(x) for x in uid_seed] + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(x) for x in uid_seed] + ["series"])
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = {"LATERAL": "LL"}.get(view or "", view or "")
    ds.PatientOrientation = ["P", "F"] if view == "LATERAL" else ["L", "F"]
    ds.PatientID = patient_id
    ds.PatientName = f"ANON^{patient_id}"
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    ds.PatientAge = "" if age is None or np.isnan(age) else f"{int(round(age)):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "raycxr synthetic: no real patient"
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{profile.pixel_spacing:.3f}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if profile.bits_stored <= 8 else 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if profile.photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    for k, val in {**(header or {}), **profile.extra_header}.items():
        setattr(ds, k, val)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    ts = profile.transfer_syntax
    if ts == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif ts in ("rle", "j2k"):
        ds.compress(TRANSFER_SYNTAXES[ts], stored)
    elif ts != "explicit":
        raise ValueError(f"unknown transfer syntax '{ts}'; expected one of {sorted(TRANSFER_SYNTAXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
