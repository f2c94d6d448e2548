"""DICOMweb (dicomweb-client, optional: ``pip install 'raycxr-runtime[dicomweb]'``): score a study
held by a PACS and store the Structured Reports back in it.

    raycxr-infer dicomweb --model classifier.onnx --url https://pacs/dicom-web --study 1.2.3... [--token T]

1. QIDO-RS (PS3.18 §10.6, *Search Transaction*) lists the study's instances with their Modality.
2. Instances whose Modality is not a projection radiograph are recorded as ``flagged`` without being
   retrieved (``--force`` retrieves them); SR, KO, PR and other non-image objects are skipped
   (counted, not scored: the study holds the SRs of an earlier run too).
3. WADO-RS (§10.4, *Retrieve Transaction*) fetches each remaining instance into a private temporary
   folder, and the runtime's one inference path (:class:`~raycxr_runtime.inference.Predictor`)
   scores it: header scope checks, pixel budget, model.
4. A scored instance's SR (:func:`raycxr_runtime.sr.make_sr`) is stored with STOW-RS (§10.5,
   *Store Transaction*) into the same study.

Results and logs name instances by a counter (``instance #3``), never by UID or patient attribute;
an HTTP failure is reported by its status code, never with the server's answer (it may quote the
request). The bearer token goes in the ``Authorization`` header and is never logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inference import ERROR, FLAGGED, Prediction, Predictor
from .model import Model
from .safety import XRAY_MODALITIES

__all__ = ["DicomWebError", "StudyRun", "connect", "score_study", "token_from_env"]

logger = logging.getLogger("raycxr_runtime.dicomweb")

# non-image objects a study holds next to its images (our own SRs among them): not candidates for scoring
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RWV", "AU", "ECG"})
_MODALITY, _SERIES, _SOP = "00080060", "0020000E", "00080018"


class DicomWebError(Exception):
    """The DICOMweb server cannot be used (unreachable, refused, no such study): one line, no server text."""


@dataclass
class StudyRun:
    """What :func:`score_study` did to one study.

    Args:
        results: one :class:`~raycxr_runtime.inference.Prediction` per image instance, in QIDO order.
        found: instances QIDO-RS listed.
        skipped: non-image instances (SR, KO, PR...) left alone.
        sr_stored: SRs stored with STOW-RS.
        sr_failed: scored instances whose SR could not be made or stored (their warnings say why).
    """

    results: list[Prediction] = field(default_factory=list)
    found: int = 0
    skipped: int = 0
    sr_stored: int = 0
    sr_failed: int = 0


def connect(url: str, *, token: str | None = None, timeout: float = 60.0) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the service root ``url`` (``.../dicom-web``), with
    ``Authorization: Bearer <token>`` when a token is given."""
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise DicomWebError("DICOMweb needs dicomweb-client: pip install 'raycxr-runtime[dicomweb]'") from None
    if not url.startswith(("http://", "https://")):
        raise DicomWebError(f"--url must start with http:// or https://, got {url!r}")
    # their INFO / DEBUG lines quote the request URLs, which hold the study, series and instance UIDs
    for name in ("dicomweb_client", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url=url.rstrip("/"), headers=headers, timeout=timeout)


def _http_problem(action: str, exc: Exception) -> str:
    """``"QIDO-RS search failed: HTTP 401"``: the status code or the error type, never the server's body."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return f"{action} failed: " + (f"HTTP {status}" if status is not None else type(exc).__name__)


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _code(text: str) -> str:
    # a Modality is a code string; keep it to code characters so a malformed header cannot inject text
    return "".join(ch for ch in text if ch.isalnum() or ch in "_ ").strip()[:16]


def score_study(client: Any, study_uid: str, model: Model, predictor: Predictor, *, store: bool = True,
                on_result: Callable[[Prediction], None] | None = None) -> StudyRun:
    """Score every radiograph of ``study_uid`` on the server behind ``client`` and (``store``) STOW its SRs.

    Raises :class:`DicomWebError` when the study cannot be listed or holds no instance; per-instance
    problems (retrieval, reading, SR) become that instance's status and warnings."""
    import requests

    try:
        instances = client.search_for_instances(study_instance_uid=study_uid, get_remaining=True,
                                                fields=["Modality", "SeriesInstanceUID", "SOPInstanceUID"])
    except (requests.exceptions.RequestException, ValueError) as exc:
        raise DicomWebError(_http_problem("QIDO-RS search for the study's instances", exc)) from None
    if not instances:
        raise DicomWebError("QIDO-RS found no instance in the study (wrong StudyInstanceUID, or not on this server)")
    run = StudyRun(found=len(instances))
    tmp = Path(tempfile.mkdtemp(prefix="raycxr-dicomweb-"))  # private (0700)
    try:
        n = 0
        for item in instances:
            modality = _code(_value(item, _MODALITY)).upper()
            if modality in NON_IMAGE_MODALITIES:
                run.skipped += 1
                continue
            n += 1
            name = f"instance #{n}"
            if modality and modality not in XRAY_MODALITIES and not predictor.force:
                pred = Prediction(input=name, status=FLAGGED, model_version=model.model_version, warnings=[
                    f"not a chest radiograph: Modality {modality!r} (expected one of {', '.join(XRAY_MODALITIES)}); "
                    "not retrieved"])
            else:
                pred = _score_instance(client, study_uid, item, name, tmp / f"instance-{n}.dcm", model, predictor,
                                       run, store)
            logger.info("%s: %s", name, pred.status)
            run.results.append(pred)
            if on_result is not None:
                on_result(pred)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run


def _score_instance(client: Any, study_uid: str, item: dict[str, Any], name: str, path: Path, model: Model,
                    predictor: Predictor, run: StudyRun, store: bool) -> Prediction:
    import requests

    from .readers import read_dicom_header

    try:
        ds = client.retrieve_instance(study_uid, _value(item, _SERIES), _value(item, _SOP))
        ds.save_as(path, enforce_file_format=True)
    except requests.exceptions.RequestException as exc:
        return _failed(name, model, _http_problem("WADO-RS retrieval", exc))
    except Exception as exc:  # a multipart answer or data set pydicom cannot parse or write: the type only
        return _failed(name, model, f"WADO-RS answer not usable ({type(exc).__name__})")
    try:
        pred = predictor.predict_file(path, name=name)
        if pred.probabilities is None:
            return pred
        from .sr import SRError, make_sr

        try:
            sr = make_sr(read_dicom_header(path), pred, model)
        except SRError as exc:
            pred.warnings.append(f"no structured report: {exc.reason}")
            run.sr_failed += 1
            return pred
        except Exception as exc:  # highdicom refusing a header: this instance gets no SR, the study goes on
            pred.warnings.append(f"no structured report: highdicom could not build it ({type(exc).__name__})")
            run.sr_failed += 1
            return pred
        if store:
            try:
                client.store_instances(datasets=[sr], study_instance_uid=study_uid)
            except requests.exceptions.RequestException as exc:
                pred.warnings.append(f"structured report not stored: {_http_problem('STOW-RS', exc)}")
                run.sr_failed += 1
                return pred
            run.sr_stored += 1
        return pred
    finally:
        path.unlink(missing_ok=True)


def _failed(name: str, model: Model, reason: str) -> Prediction:
    return Prediction(input=name, status=ERROR, warnings=[f"retrieving the instance failed: {reason}"],
                      model_version=model.model_version)


def token_from_env(value: str | None) -> str | None:
    """``--token`` if given, else ``RAYCXR_DICOMWEB_TOKEN`` (keeps the token out of the process list)."""
    return value or os.environ.get("RAYCXR_DICOMWEB_TOKEN") or None
