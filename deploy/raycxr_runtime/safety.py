"""Out-of-scope checks on a DICOM header, before an image is scored.

A chest X-ray classifier will happily return probabilities for a knee, a CT slice or a lateral
view; those numbers mean nothing. :func:`check_header` looks at the header and returns *flags*
(reasons the image is out of scope: the runtime reports it as ``flagged`` and does not score it
unless forced) and *notes* (worth knowing, no reason to refuse):

- **not a chest radiograph**: *Modality* not a projection radiograph (CR, DX, DR, RG);
  *Body Part Examined* present and not chest-like (CHEST, THORAX, LUNG, PORT CHEST, ... or empty);
  *SOP Class* not a CR / DX image (mammography, intra-oral, angiography, secondary capture, ...),
  or DX *For Processing* (raw detector data, never shown to a reader);
- **lateral view** when the model is frontal-only: *View Position* LL / RL / LAT / LATERAL, a
  lateral *View Code Sequence* meaning, or "lateral" / "LAT" in *Series Description* or
  *Acquisition Device Processing Description* (unless *View Position* says PA or AP).

These are heuristics on what the modality wrote; a header can be wrong or empty. A header value is
quoted in a reason only when it is one of the standard's defined terms (Modality: PS3.3 C.7.3.1.1.1;
Body Part Examined: common PS3.16 Annex L terms; View Position: the lateral terms above); any other
value, where an identifier could hide, is described, never echoed.
"""

from __future__ import annotations

import re
from typing import Any

import pydicom
from pydicom.uid import UID

__all__ = [
    "CHEST_BODY_PARTS",
    "LATERAL_VIEW_POSITIONS",
    "XRAY_MODALITIES",
    "check_header",
    "is_chest_body_part",
    "lateral_reason",
]

XRAY_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG")
CHEST_BODY_PARTS: tuple[str, ...] = ("CHEST", "THORAX", "TORAX", "THORACIC", "LUNG", "LUNGS", "PORT CHEST",
                                     "PORTABLE CHEST", "CXR")
LATERAL_VIEW_POSITIONS: tuple[str, ...] = ("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT")
FRONTAL_VIEW_POSITIONS: tuple[str, ...] = ("PA", "AP")

# Defined terms that may be quoted in a reason (anything else in these attributes is not echoed).
MODALITY_TERMS: frozenset[str] = frozenset(
    "AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN "
    "LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC "
    "CD DD DF DM DR DS EC FA FS LP MA MS OPR ST VF".split())
BODY_PART_TERMS: frozenset[str] = frozenset(
    "ABDOMEN ABDOMENPELVIS ANKLE ARM BRAIN BREAST CALCANEUS CHESTABDOMEN CLAVICLE COCCYX CSPINE ELBOW EXTREMITY "
    "FACE FEMUR FIBULA FINGER FOOT FOREARM HAND HEAD HEADNECK HEART HIP HUMERUS JAW KIDNEY KNEE LEG LIVER "
    "LSPINE NECK ORBIT PATELLA PELVIS RADIUS RIB SACRUM SCAPULA SHOULDER SINUS SKULL SPINE SSPINE STERNUM "
    "THUMB TIBIA TOE TSPINE ULNA WHOLEBODY WRIST ZYGOMA".split())

_CR = "1.2.840.10008.5.1.4.1.1.1"
_DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
XRAY_IMAGE_SOP_CLASSES: tuple[str, ...] = (_CR, _DX_PRESENTATION)

# "lateral", "latero-lateral", "LAT" as a word; "lateral decubitus" is a frontal projection, excluded below
_LATERAL_TEXT = re.compile(r"later(al|o)|\blat\b", re.IGNORECASE)
_DECUBITUS = re.compile(r"decub", re.IGNORECASE)


def check_header(ds: pydicom.Dataset, *, frontal_only: bool = True) -> tuple[list[str], list[str]]:
    """``(flags, notes)`` for one DICOM header; any flag puts the image out of the model's scope."""
    flags: list[str] = []
    notes: list[str] = []
    modality = _code(ds, "Modality")
    if not modality:
        notes.append("no Modality in the DICOM header: modality not checked")
    elif modality not in XRAY_MODALITIES:
        flags.append(f"not a chest radiograph: Modality {_term(modality, MODALITY_TERMS)} (expected one of "
                     f"{', '.join(XRAY_MODALITIES)})")
    if "BodyPartExamined" in ds:
        body = _code(ds, "BodyPartExamined")
        if not is_chest_body_part(body):
            flags.append(f"not a chest radiograph: BodyPartExamined {_term(body, BODY_PART_TERMS)}")
    else:
        notes.append("no BodyPartExamined in the DICOM header: body part not checked")
    sop = str(ds.get("SOPClassUID") or "").strip()
    if sop == _DX_PROCESSING:
        flags.append("DX image 'For Processing' (raw detector data, not for display): the model saw images "
                     "'For Presentation'")
    elif sop and sop not in XRAY_IMAGE_SOP_CLASSES:
        flags.append(f"not a radiograph image object: SOP class {_sop_name(sop)!r} (expected CR or DX image storage)")
    if frontal_only:
        lateral = lateral_reason(ds)
        if lateral:
            flags.append(f"lateral view ({lateral}): this model is frontal-only")
    return flags, notes


def is_chest_body_part(value: str) -> bool:
    """Empty, or a chest-like code: CHEST, THORAX, LUNG, PORT CHEST, CHEST_PA, TORAX (PadChest)..."""
    v = " ".join(str(value).upper().replace("_", " ").replace("^", " ").split())
    return v == "" or v in CHEST_BODY_PARTS or "CHEST" in v or "THORA" in v or "TORAX" in v


def lateral_reason(ds: pydicom.Dataset) -> str | None:
    """Why the header says this is a lateral view, or ``None``."""
    view = _code(ds, "ViewPosition")
    if view in LATERAL_VIEW_POSITIONS:
        return f"ViewPosition {view!r}"
    for item in ds.get("ViewCodeSequence") or []:
        meaning = str(item.get("CodeMeaning") or "")
        if _LATERAL_TEXT.search(meaning) and not _DECUBITUS.search(meaning):
            return "ViewCodeSequence meaning is a lateral view"  # free text: not quoted
    if view in FRONTAL_VIEW_POSITIONS:  # an explicit frontal view position wins over series-level text
        return None
    for keyword in ("SeriesDescription", "AcquisitionDeviceProcessingDescription"):
        text = str(ds.get(keyword) or "")
        if _LATERAL_TEXT.search(text) and not _DECUBITUS.search(text):
            return f"{keyword} mentions a lateral view"  # free text: not quoted
    return None


def _code(ds: pydicom.Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return _clean(str(value).upper(), 16)


def _term(value: str, terms: frozenset[str]) -> str:
    """``'VALUE'`` when ``value`` is a defined term, else a description: other values are not echoed."""
    return repr(value) if value in terms else "(not one of the defined terms)"


def _clean(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9 _\-]", "", text).strip()[:limit]


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    if name and name != uid:
        return name
    return uid if re.fullmatch(r"[0-9.]{1,64}", uid) else "(not a valid UID)"
