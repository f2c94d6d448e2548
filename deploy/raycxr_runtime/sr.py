"""DICOM Structured Report output (highdicom, optional: ``pip install 'raycxr-runtime[sr]'``).

One Comprehensive SR per scored DICOM image, built on TID 1500 (Measurement Report), which a PACS
stores and displays like any other SR:

- the observer is a *device*: raycxr, with the model version as its model name;
- one measurement group (TID 1501) per finding (class): finding type = the class, the
  *probability* and the *decision threshold* as unitless numeric measurements, and the decision
  as a qualitative evaluation "Decision at threshold: Present / Absent" (SNOMED CT values); each group names the
  algorithm (``raycxr <method>``, version = ``model_version``) and its source image;
- the evidence and the image library reference the source image's study, series and SOP instance
  UIDs, so the SR lands in the same study.

Classes are coded in a private scheme (``99RAYCXR``, code meaning = the class name) because the
label space is the training sites' own.

What the SR copies from its source, and nothing else (:data:`COPIED`): so that a PACS files it under
the source's patient and study, the Patient module's identifying attributes (Patient's Name, ID,
Issuer of Patient ID, Birth Date, Sex) and the General Study module's type 1 and 2 attributes (Study
Instance UID, Date, Time, ID, Accession Number, Referring Physician's Name), with the Specific
Character Set that decodes them; the source's Series and SOP Instance UIDs and SOP Class as the
evidence and references; Rows, Columns and the modality-specific image library descriptors
(Patient Orientation, Imager Pixel Spacing; geometry for CT/MR/PT), only where the source has them.
A type 2 attribute the source lacks (or holds as a date, time or sex that does not parse) is
written empty, as the SR IOD allows. Nothing from the General Equipment module (Institution Name /
Address, Station Name, Device Serial Number...) nor Study Description, Other Patient IDs or any
other attribute is carried over: the SR is built from a copy of the header holding only the
attributes above (:func:`source_view`), so highdicom cannot copy more (its Contributing Equipment
names highdicom only, not the source's acquisition equipment). The SR adds no identifier of its own.

Nothing of it is logged: highdicom's logger is kept at ERROR (its INFO lines quote SOP Instance
UIDs, one WARNING line a patient's name), and the Python warnings raised while the SR is built
(pydicom's value validation and highdicom's person-name check quote header values) are caught,
pydicom's log lines of the same warnings dropped, and all reduced to one value-free log line.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, TM

from .readers import ImageReadError, read_dicom_header

__all__ = ["COPIED", "SRError", "make_sr", "source_view", "sr_bytes", "write_sr"]

logger = logging.getLogger("raycxr_runtime.sr")
# highdicom's INFO lines quote the source's SOP Instance UID ("copy Patient-related attributes from ..."),
# and one WARNING line the patient's name (a name it finds suspicious): only its errors are let through
logging.getLogger("highdicom").setLevel(logging.ERROR)

SCHEME = "99RAYCXR"
PROBABILITY = hd.sr.CodedConcept("PROB", SCHEME, "Probability of finding")
THRESHOLD = hd.sr.CodedConcept("THRESH", SCHEME, "Decision threshold")
# not DCM 121071 "Finding": TID 1501 uses that concept for the finding type itself
DECISION = hd.sr.CodedConcept("DECISION", SCHEME, "Decision at threshold")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

# The source attributes an SR carries (module docstring): patient and general study (type 2 ones
# written empty when the source lacks them), the references, and the image library descriptors.
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")
_PATIENT_STUDY_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID")
_REFERENCES = _REQUIRED
_LIBRARY = ("Rows", "Columns", "FrameOfReferenceUID")
# TID 1603 / 1604 descriptors: highdicom picks them by Modality and needs all of them
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"), ("PatientOrientation", "ImagerPixelSpacing")
_CROSS_SECTIONAL = ("CT", "MR", "PT"), ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                                        "SliceThickness")
_MULTIPLICITY = {"PatientOrientation": 2, "ImagerPixelSpacing": 2, "PixelSpacing": 2, "ImageOrientationPatient": 6,
          "ImagePositionPatient": 3}
COPIED: tuple[str, ...] = (*_PATIENT_STUDY_OPTIONAL, *_PATIENT_STUDY_TYPE2, *_REFERENCES, *_LIBRARY, "Modality",
                           *_PROJECTION[1], *_CROSS_SECTIONAL[1])
# warnings.catch_warnings swaps process-wide state: one SR is built at a time (milliseconds each)
_BUILD_LOCK = threading.RLock()


class SRError(Exception):
    """No SR can be made for this input; ``reason`` says why (no file path and no header value in it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _class_code(name: str) -> hd.sr.CodedConcept:
    # code values are short strings; the class name itself is the code meaning
    value = "C" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:10].upper()
    return hd.sr.CodedConcept(value, SCHEME, name[:64])


def _device_uid(model_version: str) -> str:
    # stable per model version (pydicom's UID root, deterministic from the entropy source)
    return str(generate_uid(entropy_srcs=["raycxr-device", model_version]))


def _has(ds: pydicom.Dataset, keyword: str) -> bool:
    """``keyword`` is present with a value (and, for the geometry attributes, the full multiplicity)."""
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return False
    want = _MULTIPLICITY.get(keyword)
    if want is None:
        return True
    values = list(elem) if isinstance(elem, (MultiValue, list, tuple)) else [elem]  # a string is one value
    return len(values) == want and all(str(v).strip() for v in values)


def _valid(ds: pydicom.Dataset, keyword: str) -> bool:
    """The values highdicom parses (dates, times, sex) parse; a bad one would stop the SR."""
    value = ds.get(keyword)
    if value is None or value == "":
        return True
    try:
        if keyword in ("PatientBirthDate", "StudyDate"):
            DA(value)
        elif keyword == "StudyTime":
            TM(value)
        elif keyword == "PatientSex":
            return str(value) in ("M", "F", "O")
    except (TypeError, ValueError):
        return False
    return True


def source_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``source`` holding only what its SR may carry (:data:`COPIED`, module docstring).

    Type 2 patient and study attributes the source lacks, or holds as a value highdicom would refuse
    (a date, time or sex that does not parse), are empty here, as the SR IOD allows.
    The image library descriptors of a modality are kept only when the source has all of them; if
    not, the copy's Modality is ``OT`` (it only selects highdicom's descriptors: the SR codes the
    modality from the SOP Class), so a CR without Imager Pixel Spacing still gets its SR."""
    missing = [k for k in _REQUIRED if not _has(source, k)]
    if missing:
        raise SRError(f"the source DICOM lacks {', '.join(missing)}")
    view = pydicom.Dataset()
    for keyword in (*_PATIENT_STUDY_OPTIONAL, *_PATIENT_STUDY_TYPE2, *_REFERENCES, *_LIBRARY):
        if keyword in source and _valid(source, keyword):
            view[keyword] = copy.deepcopy(source[keyword])
        elif keyword in _PATIENT_STUDY_TYPE2:
            if keyword in source:
                logger.info("SR: the source's %s is not a valid value; the SR has it empty", keyword)
            setattr(view, keyword, "")
    modality = str(source.get("Modality") or "").strip().upper()
    view.Modality = "OT"
    for modalities, descriptors in (_PROJECTION, _CROSS_SECTIONAL):
        if modality in modalities and all(_has(source, k) for k in descriptors):
            view.Modality = modality
            for keyword in descriptors:
                view[keyword] = copy.deepcopy(source[keyword])
    return view


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet() -> Iterator[None]:
    """Build under a lock with warnings caught and pydicom's log lines dropped (pydicom logs each
    value-validation warning too, quoting the value); log how many warnings there were, never their text."""
    pydicom_logger, drop = logging.getLogger("pydicom"), _DropRecords()
    with _BUILD_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pydicom_logger.addFilter(drop)
        try:
            yield
        finally:
            pydicom_logger.removeFilter(drop)
            if caught:
                kinds = sorted({w.category.__name__ for w in caught})
                logger.info("SR: %d warning(s) while building it (%s; text not logged, it may quote header "
                            "values)", len(caught), ", ".join(kinds))


def make_sr(source: pydicom.Dataset, prediction: Any, model: Any) -> hd.sr.ComprehensiveSR:
    """The SR for one scored ``prediction`` (a :class:`~raycxr_runtime.inference.Prediction`) of the
    image whose header is ``source``, made by ``model`` (its class names, thresholds, version).

    Raises :class:`SRError` when none can be made, whatever the reason (an unexpected one is named
    by its exception type only: highdicom's messages may quote header values)."""
    if prediction.probabilities is None:
        raise SRError(f"the image was not scored (status {prediction.status})")
    with _quiet():
        view = source_view(source)
        try:
            return _build(view, prediction, model)
        except Exception as exc:
            raise SRError(f"the SR could not be built ({type(exc).__name__})") from None


def _build(source: pydicom.Dataset, prediction: Any, model: Any) -> hd.sr.ComprehensiveSR:
    version = str(model.model_version)
    method = str(model.metadata.get("method", "") if hasattr(model, "metadata") else "")
    algorithm = hd.sr.AlgorithmIdentification(name=f"raycxr {method}".strip()[:64], version=version[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=_device_uid(version), name="raycxr",
                                                       manufacturer_name="raycxr", model_name=version[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    source_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for name, threshold in zip(model.class_names, model.thresholds):
        p = float(prediction.probabilities[name])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"raycxr {name}"[:64]),
            finding_type=_class_code(name),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=PROBABILITY, value=p, unit=UNITLESS),
                          hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=UNITLESS)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=DECISION, value=PRESENT if name in prediction.findings else ABSENT)],
            source_images=[source_ref],
        ))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CHEST_XRAY,
                                     imaging_measurements=groups, referenced_images=[source])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=generate_uid(), series_number=9917,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="raycxr",
        series_description=f"raycxr AI findings {version}"[:64], is_complete=True, is_final=False,
        is_verified=False)
    # a private coding scheme is declared in the SOP Common module (PS3.3 C.12.1.1.3.1)
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "raycxr finding classes and scores"
    scheme.CodingSchemeResponsibleOrganization = "raycxr"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _source(path: str | os.PathLike[str]) -> pydicom.Dataset:
    try:
        return read_dicom_header(path)
    except ImageReadError as exc:
        raise SRError(f"the source is not a readable DICOM ({exc.reason})") from None


def _encoded(path: str | os.PathLike[str], prediction: Any, model: Any) -> tuple[str, bytes]:
    """``(SR SOP Instance UID, Part 10 bytes)`` of the SR of the DICOM at ``path``."""
    with _quiet():
        sr = make_sr(_source(path), prediction, model)
        buf = io.BytesIO()
        try:
            sr.save_as(buf, enforce_file_format=True)
        except Exception as exc:
            raise SRError(f"the SR could not be encoded ({type(exc).__name__})") from None
    return str(UID(sr.SOPInstanceUID)), buf.getvalue()


def sr_bytes(path: str | os.PathLike[str], prediction: Any, model: Any) -> bytes:
    """The SR of the DICOM at ``path`` as a DICOM file (Part 10 bytes); :class:`SRError` if none."""
    return _encoded(path, prediction, model)[1]


def write_sr(path: str | os.PathLike[str], prediction: Any, model: Any, folder: str | os.PathLike[str]) -> Path:
    """Write the SR of the DICOM at ``path`` into ``folder`` as ``<SR SOP Instance UID>.dcm`` (no
    patient-derived file name); returns its path. :class:`SRError` if none could be made or written."""
    uid, data = _encoded(path, prediction, model)
    out = Path(folder) / f"{uid}.dcm"
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise SRError(f"the SR could not be written ({exc.strerror or type(exc).__name__})") from None
    return out
