"""``raycxr export bundle=true``: the exported classifier as a MONAI Bundle folder.

    <out>/bundle/
      configs/metadata.json   version, monai/pytorch/numpy versions, task, description, authors,
                              copyright, network_data_format (input "image", output "pred")...
      models/model.onnx       the exported classifier.onnx (it carries its own raycxr.* card and digests)
      docs/README.md          the model card

``python -m monai.bundle verify_metadata --meta_file configs/metadata.json`` downloads the schema
named by the metadata's ``schema`` URL unless ``--filepath`` names an existing file (then it skips
the download). raycxr ships :data:`SCHEMA_FILE` for that offline check; see :func:`verify_command`.
The bundle holds no TorchScript ``model.pt``: the model is meant to run with onnxruntime (the
raycxr runtime, or MONAI's ONNX support), and ``pytorch_version`` records what exported it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_FILE = Path(__file__).with_name("bundle_schema.json")


def metadata(meta: dict[str, Any], *, version: str, parity: float | None = None) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` from the classifier's ``raycxr.*`` metadata (prefix stripped)."""
    import monai
    import onnxruntime
    import pydicom
    import torch

    classes = json.loads(meta["class_names"]) if isinstance(meta["class_names"], str) else list(meta["class_names"])
    size = int(meta["input_size"])
    sites = meta.get("training_sites", "[]")
    sites = json.loads(sites) if isinstance(sites, str) else sites
    out: dict[str, Any] = {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"raycxr export of model {meta['model_version']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"onnxruntime": onnxruntime.__version__, "pydicom": pydicom.__version__,
                                      "raycxr": __version__},
        "name": f"raycxr chest X-ray classifier ({meta.get('method', '')})".replace(" ()", ""),
        "task": "Multi-label finding classification of frontal chest radiographs",
        "description": (f"raycxr {meta.get('method', '')} model {meta['model_version']} ({meta.get('encoder', '')} "
                        f"encoder) pretrained across sites {', '.join(sites) or '-'}; ONNX, run with onnxruntime. "
                        "Research use only, not a medical device."),
        "authors": "raycxr contributors",
        "copyright": "Copyright (c) raycxr contributors, Apache-2.0",
        "data_source": f"training sites: {', '.join(sites) or '-'} (see docs/README.md)",
        "data_type": "dicom",
        "image_classes": f"one grey channel, the radiograph through raycxr_runtime.readers.read_image and resize "
                         f"to {size}x{size}, values in [0, 1]",
        "pred_classes": "per-class probabilities in raycxr.class_names order: " + ", ".join(classes),
        "eval_metrics": {"onnx_vs_pytorch_max_abs_diff": parity} if parity is not None else {},
        "intended_use": "Research and engineering evaluation only; not for diagnosis, triage or clinical decisions",
        "references": ["raycxr docs: Export and deployment (docs/deployment.md)"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "xray", "num_channels": 1,
                                 "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(classes),
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
        "thresholds": dict(zip(classes, json.loads(meta["thresholds"]))) if "thresholds" in meta else {},
        "frontal_only": str(meta.get("frontal_only", "true")).lower() == "true",
    }
    return out


def write_bundle(out: str | Path, classifier: str | Path, meta: dict[str, Any], model_card: str, *,
                 version: str = "0.1.0", parity: float | None = None) -> Path:
    """Write the bundle folder ``out`` (replaced if it exists); returns it."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    (out / "docs").mkdir()
    shutil.copyfile(classifier, out / "models" / "model.onnx")
    doc = metadata(meta, version=version, parity=parity)
    (out / "configs" / "metadata.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (out / "docs" / "README.md").write_text(model_card)
    return out


def verify_command(bundle: str | Path, schema: str | Path = SCHEMA_FILE) -> list[str]:
    """``python -m monai.bundle verify_metadata`` on the bundle, with the schema file given (no download)."""
    return [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
            str(Path(bundle) / "configs" / "metadata.json"), "--filepath", str(schema)]


def model_card(meta: dict[str, Any], runtime_readme: str | None = None) -> str:
    """docs/README.md: the essentials from the metadata, then the runtime's model card
    (``raycxr_runtime/model_card.md``, from its ``## Model card`` heading on)."""
    classes = json.loads(meta["class_names"]) if isinstance(meta["class_names"], str) else meta["class_names"]
    thresholds = json.loads(meta.get("thresholds", "[]"))
    lines = [f"# raycxr chest X-ray classifier {meta['model_version']}", "",
             "> Research software. **Not a medical device.**", "",
             f"- method: {meta.get('method', '')}, encoder: {meta.get('encoder', '')}",
             f"- training sites: {meta.get('training_sites', '')}",
             f"- input: `image` float32 [batch, 1, {meta['input_size']}, {meta['input_size']}] in [0, 1] "
             "(raycxr_runtime.readers.read_image, then resize)",
             "- output: `probabilities` [batch, C], one column per class below",
             f"- frontal only: {meta.get('frontal_only', 'true')}; thresholds: {meta.get('thresholds_note', '')}",
             f"- integrity: raycxr.weights_sha256 {meta.get('weights_sha256', '')[:16]}... (checked by the runtime)",
             "", "| class | threshold |", "|---|---|"]
    lines += [f"| {c} | {t:.3f} |" for c, t in zip(classes, thresholds)]
    lines += ["", "Run it: `pip install raycxr-runtime` (deploy/ in the raycxr repository), then",
              "`raycxr-infer --model models/model.onnx IMAGE...`."]
    if runtime_readme and "## Model card" in runtime_readme:
        lines += ["", runtime_readme[runtime_readme.index("## Model card"):].strip()]
    return "\n".join(lines) + "\n"
