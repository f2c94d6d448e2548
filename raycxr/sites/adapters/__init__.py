"""Site adapters: turn a public CXR data set's on-disk layout and metadata tables into a manifest.

Every adapter keeps the data set's *own* label space and hands back an :class:`AdapterResult`:
the validated :class:`~raycxr.manifest.Manifest` plus ``dropped``, one entry for every table row
that did not make it into the manifest and why. Nothing is dropped silently.

Metadata goes through torchxrayvision's loaders where they fit (view filtering, patient ids,
label derivation). Where a loader loses information the manifest needs (CheXpert / MIMIC
uncertain ``-1``, report text, boxes in pixel units) the raw columns are read instead.

Options every adapter accepts (see :data:`COMMON_OPTIONS`):

- ``split="official"``: where the data set ships an official split (NIH ``train_val_list.txt`` /
  ``test_list.txt``, CheXpert ``valid.csv``, MIMIC ``mimic-cxr-2.0.0-split.csv``, VinDr's
  ``train`` / ``test`` folders, a CSV export's ``split_col``) it is used: its test set is the
  manifest's test split, and a combined train+val set is divided into train / val by the patient
  hash; ``split="hashed"`` ignores it. Rows the official split does not cover are hashed;
- ``split_fractions=(0.8, 0.1, 0.1)`` and ``split_salt=<data set>``: patient-disjoint, stable hashed
  splits, salted by the data set's identity (not the site name), so a renamed copy keeps its splits
  and a patient registered at two sites of one data set lands in one split;
- ``require_files=True``: rows whose image is not found under ``root`` are dropped
  ("image file not found"); with ``False`` they are kept with the path the table implies;
- ``limit=None``: keep at most this many manifest rows (first ones in table order).

Image files are found by indexing ``root`` once (file name / trailing path components ->
relative posix path), so the real sets' sub-folder layouts (NIH ``images_001/images/...``,
PadChest ``0/ ... 54/``, SIIM ``<study>/<series>/<image>.dcm``) all work.

One module per data set (``nih``, ``chexpert``, ``vindr``, ``padchest``, ``mimic``, ``openi``, ``siim``,
``rsna``), ``hospital`` for a hospital's CSV export and folder layout, ``manifest`` for an existing manifest;
``base`` holds :class:`SiteAdapter`, the registry and the helpers they share, ``options`` what every option
means. Importing this package registers them all.
"""

from __future__ import annotations

from . import chexpert, hospital, manifest, mimic, nih, openi, padchest, rsna, siim, vindr  # noqa: F401 (registers)
from .base import (
    ADAPTER_REGISTRY,
    ADAPTERS,
    CHEXPERT_LABELS,
    COMMON_OPTIONS,
    NOT_FOUND,
    VINDR_LABELS,
    AdapterResult,
    ParsedTable,
    SiteAdapter,
    get_adapter,
    hash_patient_id,
    list_adapters,
    normalise_age,
    normalise_sex,
    normalise_view,
    register_adapter,
    xrv_table,
)
from .options import describe_adapters, describe_options
from .siim import decode_siim_rle

__all__ = [
    "ADAPTERS",
    "ADAPTER_REGISTRY",
    "COMMON_OPTIONS",
    "AdapterResult",
    "CHEXPERT_LABELS",
    "NOT_FOUND",
    "ParsedTable",
    "SiteAdapter",
    "VINDR_LABELS",
    "decode_siim_rle",
    "describe_adapters",
    "describe_options",
    "get_adapter",
    "hash_patient_id",
    "list_adapters",
    "normalise_age",
    "normalise_sex",
    "normalise_view",
    "register_adapter",
    "xrv_table",
]
