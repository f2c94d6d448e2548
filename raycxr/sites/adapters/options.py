"""What each adapter option means, for ``raycxr sites adapters`` and the site templates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ADAPTERS, get_adapter, list_adapters


def describe_adapters() -> Mapping[str, str]:
    """Name -> one-line description of every registered adapter (for CLIs)."""
    return {n: ADAPTERS[n].description for n in list_adapters()}


_TABLE = "table path: absolute, or relative to root"
# What each option means: "*" for every table adapter, then per adapter (see describe_options).
OPTION_HELP: dict[str, dict[str, str]] = {
    "*": {
        "split": "official: the data set's own train/val/test split where it ships one (see `sites show`); "
                 "hashed: a hash of the patient for every row",
        "split_fractions": "train / val / test fractions of the hashed split (official train+val sets use the "
                           "first two)",
        "split_salt": "salt of the hashed split; default: the data set's identity (a renamed site keeps its splits)",
        "require_files": "drop rows whose image is not under root (listed in dropped.csv); false keeps them",
        "limit": "keep at most this many images (the first in table order); for smoke runs",
        "extensions": "file suffixes tried when the table names an image without one",
        "header_checks": "read each image at build: DICOM PatientID (hashed) as patient, duplicates and "
                         "out-of-scope images dropped",
    },
    "nih": {"csvpath": f"Data_Entry_2017_v2020.csv ({_TABLE}; default: the copy torchxrayvision ships)",
            "bbox_list_path": f"BBox_List_2017.csv ({_TABLE}; default: torchxrayvision's copy)",
            "train_val_list": "train_val_list.txt (default: searched under root)",
            "test_list": "test_list.txt, the official test set (default: searched under root)"},
    "chexpert": {"csvpath": f"train.csv ({_TABLE}; default: torchxrayvision's copy of train.csv)",
                 "valid_csvpath": "valid.csv, the official validation set, used as the test split "
                                  "(default: next to csvpath, else searched under root)"},
    "vindr": {"csvpath": "Kaggle train.csv, PhysioNet annotations_train.csv or image_labels_train.csv "
                         "(default: searched under root: image_labels_train, annotations_train, train; "
                         "then torchxrayvision's Kaggle copy)",
              "test_csvpath": "the official test table (default: the _test sibling of a PhysioNet csvpath)",
              "vote": "any | majority | all: a finding is positive when any / more than half / all of the "
                      "image's radiologists marked it",
              "read_dicom_headers": "read Rows/Columns (box scaling), sex, age and view from each DICOM"},
    "padchest": {"csvpath": f"PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv ({_TABLE}; default: "
                            "torchxrayvision's copy)",
                 "xrv_age_filter": "apply torchxrayvision's filter (drops patients aged <= 10 and rows without a "
                                   "birth year)"},
    "mimic_cxr_jpg": {"csvpath": "mimic-cxr-2.0.0-chexpert.csv[.gz] (default: searched under root)",
                      "metacsvpath": "mimic-cxr-2.0.0-metadata.csv[.gz] (default: searched under root)",
                      "splitcsvpath": "mimic-cxr-2.0.0-split.csv[.gz], the official split (default: searched "
                                      "under root)",
                      "reports_dir": "folder of MIMIC-CXR's report .txt files (files/pNN/pN/sN.txt); none: no text"},
    "openi": {"xmlpath": "NLMCXR_reports.tgz (default: torchxrayvision's copy)",
              "dicomcsv_path": "nlmcxr_dicom_metadata.csv (default: torchxrayvision's copy)",
              "tsnepacsv_path": "nlmcxr_tsne_pa.csv (default: torchxrayvision's copy)",
              "use_tsne_derived_view": "take the view from the t-SNE table instead of the DICOM header"},
    "siim": {"csvpath": "train-rle.csv (default: torchxrayvision's copy)",
             "masks_dir": "where decoded masks are written, inside root (default: raycxr_masks/)",
             "mask_size": "mask side in pixels (the challenge's 1024)",
             "read_dicom_headers": "patient, sex, age and view from each DICOM header",
             "write_masks": "decode the run-length masks to PNG files (false: labels only)"},
    "rsna": {"csvpath": "stage_2_train_labels.csv (default: torchxrayvision's copy)",
             "dicomcsvpath": "the DICOM header table (default: torchxrayvision's copy)"},
    "generic_csv": {"csv": "the export's table (required; relative to root)",
                    "path_col": "column with the image path relative to root", "patient_col": "patient column "
                    "(null: the DICOM PatientID, hashed)", "image_id_col": "image id column (default: the path)",
                    "study_col": "study column", "sex_col": "sex column", "age_col": "age column",
                    "view_col": "view column (PA / AP / lateral spellings)", "report_col": "report text column",
                    "split_col": "the export's own train/val/test column (used with split: official)",
                    "label_cols": "one column per class, values as positive/negative/uncertain_values",
                    "positive_values": "cell values read as positive", "negative_values": "cell values read as "
                    "negative", "uncertain_values": "cell values read as uncertain (-1)",
                    "labels_col": "one column listing the positive classes, joined by sep",
                    "sep": "separator inside labels_col", "empty_findings": "an empty labels_col cell: unlabelled "
                    "(default, safe: never invents negatives) or negative (the export writes normals so)",
                    "label_names": "the classes of labels_col (default: every name seen)",
                    "source_name": "the data set's name in the manifest metadata"},
    "folder": {"patient_regex": "regex on the path giving the patient (group 'patient' or 1); default: file stem",
               "image_extensions": "file suffixes that are images",
               "patient_from_header": "a DICOM's PatientID (hashed) is the patient"},
    "manifest": {"manifest": "the existing manifest, relative to root"},
}


def describe_options(name: str) -> list[tuple[str, Any, str]]:
    """``(option, default, meaning)`` for every option adapter ``name`` accepts."""
    adapter = get_adapter(name)
    helps = {**OPTION_HELP["*"], **OPTION_HELP.get(name, {})}
    return [(k, v, helps.get(k, "")) for k, v in sorted(adapter.option_defaults().items())]
