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
label space is the training sites' own. As DICOM requires, highdicom copies the patient and study
modules from the source image into the SR (so a PACS files it under the same patient and study);
the SR adds no identifier of its own, and nothing from it is logged.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from .readers import ImageReadError, read_dicom_header

__all__ = ["SRError", "make_sr", "sr_bytes", "write_sr"]

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


class SRError(Exception):
    """No SR can be made for this input; ``reason`` says why (no file path in it)."""

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


def make_sr(source: pydicom.Dataset, prediction: Any, model: Any) -> hd.sr.ComprehensiveSR:
    """The SR for one scored ``prediction`` (a :class:`~raycxr_runtime.inference.Prediction`) of the
    image whose header is ``source``, made by ``model`` (its class names, thresholds, version)."""
    if prediction.probabilities is None:
        raise SRError(f"the image was not scored (status {prediction.status})")
    missing = [k for k in _REQUIRED if not source.get(k)]
    if missing:
        raise SRError(f"the source DICOM lacks {', '.join(missing)}")
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
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=generate_uid(), series_number=9917,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="raycxr",
        series_description=f"raycxr AI findings {version}"[:64], is_complete=True, is_final=False,
        is_verified=False)


def _source(path: str | os.PathLike[str]) -> pydicom.Dataset:
    try:
        return read_dicom_header(path)
    except ImageReadError as exc:
        raise SRError(f"the source is not a readable DICOM ({exc.reason})") from None


def sr_bytes(path: str | os.PathLike[str], prediction: Any, model: Any) -> bytes:
    """The SR of the DICOM at ``path`` as a DICOM file (Part 10 bytes)."""
    sr = make_sr(_source(path), prediction, model)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_sr(path: str | os.PathLike[str], prediction: Any, model: Any, folder: str | os.PathLike[str]) -> Path:
    """Write the SR of the DICOM at ``path`` into ``folder`` as ``<SR SOP Instance UID>.dcm`` (no
    patient-derived file name); returns its path."""
    sr = make_sr(_source(path), prediction, model)
    out = Path(folder) / f"{UID(sr.SOPInstanceUID)}.dcm"
    sr.save_as(out, enforce_file_format=True)
    return out
