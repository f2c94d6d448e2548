"""Open-I (Indiana University): the reports XML and its MeSH findings."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .base import (
    _VIEW_UNKNOWN,
    _XRV_VIEWS,
    SiteAdapter,
    _drops,
    _FileIndex,
    _int_str,
    _labels_from,
    _Parsed,
    _quiet,
    _table_path,
    _view_key,
    _view_reason,
    _xrv,
    register_adapter,
)


@register_adapter("openi")
class OpenIAdapter(SiteAdapter):
    """Open-I (Indiana University): xrv's 18 MeSH-derived labels and the report text from the XML."""

    description = "Open-I / Indiana University CXR (NLMCXR reports + DICOM metadata), 18 labels, reports"
    source = "Open-I (Indiana University)"
    options: ClassVar[dict[str, Any]] = {"xmlpath": None, "dicomcsv_path": None, "tsnepacsv_path": None,
                                         "use_tsne_derived_view": False}
    extensions = (".png",)

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        xmlpath = _table_path(opts["xmlpath"], root, "NLMCXR_reports.tgz", "xmlpath")
        dicompath = _table_path(opts["dicomcsv_path"], root, "nlmcxr_dicom_metadata.csv.gz", "dicomcsv_path")
        tsnepath = _table_path(opts["tsnepacsv_path"], root, "nlmcxr_tsne_pa.csv.gz", "tsnepacsv_path")
        with _quiet():
            ds = xrv.datasets.Openi_Dataset(imgpath=str(root), xmlpath=str(xmlpath),
                                            dicomcsv_path=str(dicompath), tsnepacsv_path=str(tsnepath),
                                            use_tsne_derived_view=bool(opts["use_tsne_derived_view"]),
                                            views=_XRV_VIEWS, unique_patients=False)
        csv = ds.csv
        images, reports = _openi_reports(xmlpath)
        # The header's view is missing for a third of the images; the t-SNE derived view fills it.
        other = csv["View Position"] if opts["use_tsne_derived_view"] else csv["tsne-view"]
        view = [o if _view_key(v) in _VIEW_UNKNOWN else v for v, o in zip(csv["view"], other)]
        birth = pd.to_datetime(csv["Patient's Birth Date"].map(_int_str), format="%Y%m%d", errors="coerce")
        date = pd.to_datetime(csv["Study Date"].map(_int_str), format="%Y%m%d", errors="coerce")
        age = ((date - birth).dt.days / 365.25).to_numpy()

        ids = csv["imageid"].astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".png",
            "lookup": ids,
            "patient_id": csv["patientid"].astype(str),  # the report id: Open-I publishes no patient ids
            "study_id": csv["uid"].astype(str),
            "sex": csv["Patient's Sex"],
            "age": age,
            "view": view,
            "report": csv["uid"].map(reports),
            "labels": _labels_from(ds.labels),
        })
        gone = images.loc[~images["imageid"].isin(set(ids))]
        vp = gone["imageid"].map(pd.read_csv(dicompath, usecols=["imageid", "View Position"])
                                 .set_index("imageid")["View Position"])
        dropped = _drops(gone["imageid"], gone["imageid"] + ".png", [_view_reason(v) for v in vp])
        meta = {"tables": {"xmlpath": str(xmlpath), "dicomcsv_path": str(dicompath),
                           "tsnepacsv_path": str(tsnepath)},
                "label_source": "torchxrayvision Openi_Dataset (MeSH automatic terms)"}
        return _Parsed(frame, [str(p) for p in ds.pathologies], dropped, meta)


_OPENI_SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")


def _openi_reports(xmlpath: Path) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """(uid, imageid) of every image in the report archive, and each report's text by uid."""
    rows, reports = [], {}
    with tarfile.open(xmlpath, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            xml = ET.parse(tar.extractfile(member)).getroot()
            uid = xml.find("uId").attrib["id"]
            parts = []
            for node in xml.iter("AbstractText"):
                label, text = node.attrib.get("Label", ""), (node.text or "").strip()
                if text and label.upper() in _OPENI_SECTIONS:
                    parts.append(f"{label.upper()}: {text}")
            reports[uid] = "\n".join(parts) or None
            rows += [{"uid": uid, "imageid": img.attrib["id"]} for img in xml.iter("parentImage")]
    return pd.DataFrame(rows, columns=["uid", "imageid"]), reports
