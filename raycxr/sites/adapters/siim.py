"""SIIM-ACR pneumothorax: DICOMs and run-length-encoded masks (``train-rle.csv``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from .base import (
    MASKS_DIRNAME,
    SiteAdapter,
    _dicom_header,
    _FileIndex,
    _is_dicom,
    _labels_from,
    _Parsed,
    _quiet,
    _table_path,
    _xrv,
    register_adapter,
)


def decode_siim_rle(rle: str, width: int = 1024, height: int = 1024) -> np.ndarray:
    """Decode a SIIM-ACR run-length string to a ``(height, width)`` uint8 mask of 0/1.

    The competition's format: pairs ``start length`` where each start is an offset from the end of
    the previous run, over pixels numbered column by column (top to bottom, then left to right) -
    the Kaggle ``rle2mask(rle, w, h)`` followed by ``.T``. ``"-1"`` is an empty mask.
    """
    text = str(rle).strip()
    if text in ("", "-1"):
        return np.zeros((height, width), np.uint8)
    nums = np.asarray(text.split(), dtype=np.int64)
    if len(nums) % 2 or (nums < 0).any():
        raise ValueError(f"malformed SIIM run-length string (odd count or negative): {text[:60]}...")
    offsets, lengths = nums[0::2], nums[1::2]
    ends = np.cumsum(offsets + lengths)
    starts = ends - lengths
    if len(ends) and ends[-1] > width * height:
        raise ValueError(f"SIIM run-length string runs past the {width}x{height} image")
    edge = np.zeros(width * height + 1, np.int32)
    np.add.at(edge, starts, 1)
    np.add.at(edge, ends, -1)
    flat = (np.cumsum(edge[:-1]) > 0).astype(np.uint8)
    return flat.reshape(width, height).T.copy()


@register_adapter("siim")
class SIIMAdapter(SiteAdapter):
    """SIIM-ACR pneumothorax: label Pneumothorax, RLE masks decoded to PNG files for positive images."""

    description = "SIIM-ACR Pneumothorax (train-rle.csv + DICOMs), Pneumothorax label, PNG masks"
    source = "SIIM-ACR Pneumothorax Segmentation"
    options: ClassVar[dict[str, Any]] = {"csvpath": None, "masks_dir": None, "mask_size": 1024,
                                         "read_dicom_headers": True, "write_masks": True}
    extensions = (".dcm", ".png", ".jpg")

    def _masks_dir(self, root: Path, opts: dict[str, Any]) -> Path:
        d = Path(opts["masks_dir"]).expanduser() if opts["masks_dir"] is not None else root / MASKS_DIRNAME
        if not d.is_absolute():
            d = root / d
        try:
            Path(os.path.realpath(d)).relative_to(os.path.realpath(root))
        except ValueError:
            raise ValueError(f"masks_dir {d} must lie inside the site root {root} "
                             "(mask_path is stored relative to the root)") from None
        return d

    def _skip_dirs(self, root: Path, opts: dict[str, Any]) -> list[Path]:
        return [self._masks_dir(root, opts)]

    def _parse(self, root: Path, index: _FileIndex, opts: dict[str, Any]) -> _Parsed:
        xrv = _xrv()
        csvpath = _table_path(opts["csvpath"], root, "siim-pneumothorax-train-rle.csv.gz", "csvpath")
        with _quiet():
            ds = xrv.datasets.SIIM_Pneumothorax_Dataset(imgpath=str(root), csvpath=str(csvpath))
        csv = ds.csv.assign(_label=np.asarray(ds.labels)[:, 0])
        rle_col = " EncodedPixels" if " EncodedPixels" in csv else "EncodedPixels"
        # An image annotated by several readers has one row each: one manifest row, masks unioned.
        rles = csv[rle_col].astype(str).str.strip()
        csv["_rle"] = rles.where(rles != "-1")
        grouped = csv.groupby("ImageId", sort=False).agg(
            label=("_label", "max"), rles=("_rle", lambda s: [r for r in s if isinstance(r, str)]),
            n_rows=("_label", "size"))
        ids = grouped.index.astype(str)
        frame = pd.DataFrame({
            "image_id": ids,
            "expected": ids + ".dcm",
            "lookup": ids,
            "labels": _labels_from(grouped[["label"]].to_numpy()),
            "rles": grouped["rles"].to_numpy(),
        })
        meta = {"tables": {"csvpath": str(csvpath)},
                "label_source": "torchxrayvision SIIM_Pneumothorax_Dataset",
                "n_table_rows_merged": int((grouped["n_rows"] - 1).sum())}
        return _Parsed(frame, [str(p) for p in ds.pathologies], [], meta)

    def _locate(self, index: _FileIndex, frame: pd.DataFrame, opts: dict[str, Any]) -> list[str | None]:
        found = super()._locate(index, frame, opts)
        # Patient ids live in the DICOM header only; read them before splits and before `limit`.
        headers = [_dicom_header(index.root / p) if p and opts["read_dicom_headers"] and _is_dicom(p) else {}
                   for p in found]
        frame["patient_id"] = [h.get("PatientID") or i for h, i in zip(headers, frame["image_id"])]
        frame["sex"] = [h.get("PatientSex") for h in headers]
        frame["age"] = [h.get("PatientAge") for h in headers]
        frame["view"] = [h.get("ViewPosition") for h in headers]
        return found

    def _enrich(self, root: Path, frame: pd.DataFrame, opts: dict[str, Any],
                meta: dict[str, Any]) -> pd.DataFrame:
        if not opts["write_masks"]:  # labels only (e.g. sampling the table); no mask files, no mask_path
            meta["masks_dir"] = None
            return frame.assign(mask_path=None)
        mdir = self._masks_dir(root, opts)
        size = int(opts["mask_size"])
        mask_paths: list[str | None] = []
        for image_id, rles in zip(frame["image_id"], frame["rles"]):
            if not rles:  # negatives have no mask file; an all-zero mask is implied
                mask_paths.append(None)
                continue
            mask = np.zeros((size, size), np.uint8)
            for rle in rles:
                mask |= decode_siim_rle(rle, size, size)
            out = mdir / f"{image_id}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_png(mask * 255, out)
            mask_paths.append(Path(os.path.relpath(out, root)).as_posix())
        meta["masks_dir"] = Path(os.path.relpath(mdir, root)).as_posix()
        return frame.assign(mask_path=mask_paths)


def _write_png(array: np.ndarray, path: Path) -> None:

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(tmp, format="PNG")
    tmp.replace(path)  # atomic: a crashed build never leaves half a mask behind
