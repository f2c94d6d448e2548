"""The ONNX contract between ``raycxr export`` and the hospital runtime, in one place.

Everything both sides must agree on lives here: the graph's input and output names, the
``raycxr.*`` metadata keys, the preprocessing a file promises, and how an onnxruntime session is
opened. ``raycxr export`` imports this module (the training package installs the runtime too), so
there is no second copy that could drift. Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INPUT = "image"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
CLASS_OUTPUT_PREFIX = "prob:"
META_PREFIX = "raycxr."
KINDS = ("classifier", "encoder")
# keys every exported file carries; the runtime refuses a file without them
REQUIRED_METADATA = ("kind", "class_names", "input_size", "model_version")

# What the runtime must do to a file before the model sees it; the functions named here are the
# ones training and evaluation call (raycxr.readers re-exports raycxr_runtime.readers).
PREPROCESSING: dict[str, Any] = {
    "reader": "raycxr_runtime.readers.read_image",
    "dicom": "modality LUT (rescale), then VOI LUT or the first window (min-max when there is none), "
             "then MONOCHROME1 inverted; single-frame only",
    "raster": "PNG/JPEG/TIFF: 8-bit / 255, 16-bit / 65535, colour -> BT.601 luma",
    "resize": "raycxr_runtime.readers.resize: bilinear, antialiased when shrinking (Pillow float mode), "
              "to input_size x input_size without keeping the aspect ratio",
    "value_range": [0.0, 1.0],
    "channels": 1,
    "layout": "NCHW",
    "dtype": "float32",
    "normalisation": "inside the model (feed [0, 1] values)",
}


def output_name(kind: str) -> str:
    """The main output of a graph of ``kind`` (classifier: probabilities; encoder: embedding)."""
    if kind not in KINDS:
        raise ValueError(f"unknown raycxr.kind '{kind}' (expected one of {KINDS})")
    return PROBABILITIES if kind == "classifier" else EMBEDDING


def classifier_output_names(class_names: Sequence[str]) -> list[str]:
    """``["probabilities", "prob:<class 0>", ...]``: the classifier graph's outputs, in order."""
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique to name the ONNX outputs: {list(class_names)}")
    return [PROBABILITIES, *(f"{CLASS_OUTPUT_PREFIX}{c}" for c in class_names)]


def strip_prefix(metadata: dict[str, str]) -> dict[str, str]:
    """The ``raycxr.*`` entries of a metadata map, prefix removed."""
    return {k[len(META_PREFIX):]: v for k, v in metadata.items() if k.startswith(META_PREFIX)}


def session(path: str, *, threads: int | None = None, quiet: bool = False) -> Any:
    """An onnxruntime CPU session with every graph optimisation on: the one way both export's parity
    check and the runtime open a model, so parity is measured on what the hospital runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        opts.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initialisers) are not the user's problem
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
