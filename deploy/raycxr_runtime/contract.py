"""The ONNX contract between ``raycxr export`` and the hospital runtime, in one place.

Everything both sides must agree on lives here: the graph's input and output names, the
``raycxr.*`` metadata keys, the preprocessing a file promises, and how an onnxruntime session is
opened. ``raycxr export`` imports this module (the training package installs the runtime too), so
there is no second copy that could drift. Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

INPUT = "image"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
CLASS_OUTPUT_PREFIX = "prob:"
META_PREFIX = "raycxr."
KINDS = ("classifier", "encoder")
# keys every exported file carries; the runtime refuses a file without them
REQUIRED_METADATA = ("kind", "class_names", "input_size", "model_version")
# integrity: sha256 of the graph (nodes, initializers, inputs/outputs) plus opsets and functions, and
# sha256 of the other raycxr.* metadata; see graph_digest / metadata_digest
WEIGHTS_DIGEST = "weights_sha256"
METADATA_DIGEST = "metadata_sha256"
DIGEST_KEYS = (WEIGHTS_DIGEST, METADATA_DIGEST)

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


# ---------------------------------------------------------------------------------------------- integrity
# ModelProto field numbers (onnx.proto3): 7 graph, 8 opset_import, 25 functions. The digest covers
# exactly these, so it excludes metadata_props (14), doc_string (6) and the producer fields, and can
# be stored in the metadata of the file it describes. The runtime has no `onnx` package, so the
# top-level protobuf fields are read from the wire format here (a few lines, no decoding of the graph).
_DIGEST_FIELDS = (7, 8, 25)


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _top_level_fields(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    buf = memoryview(data)
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        start = i
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _varint(buf, i)
            start = i
            i += length
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in field {number}")
        if i > n:
            raise ValueError(f"protobuf field {number} runs past the end of the file (truncated?)")
        yield number, buf[start:i]


def graph_digest(data: bytes | memoryview) -> str:
    """sha256 (hex) of a serialized ONNX model's graph, opset imports and functions, as stored in the file.

    Raises ``ValueError`` when the bytes are not a well-formed protobuf message."""
    h = hashlib.sha256(b"raycxr-graph-v1")
    for number, value in _top_level_fields(data):
        if number in _DIGEST_FIELDS:
            h.update(number.to_bytes(4, "little") + len(value).to_bytes(8, "little"))
            h.update(value)
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """sha256 (hex) of the ``raycxr.*`` entries (prefix included) other than the two digests, key-sorted."""
    skip = {META_PREFIX + k for k in DIGEST_KEYS}
    items = sorted((k, str(v)) for k, v in metadata.items() if k.startswith(META_PREFIX) and k not in skip)
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_metadata_props(data: bytes | memoryview) -> dict[str, str]:
    """Every ``metadata_props`` entry (ModelProto field 14: key 1, value 2) of a serialized ONNX model."""
    out: dict[str, str] = {}
    for number, value in _top_level_fields(data):
        if number != 14:
            continue
        key = val = ""
        for sub, raw in _top_level_fields(value):
            if sub == 1:
                key = bytes(raw).decode("utf-8", "replace")
            elif sub == 2:
                val = bytes(raw).decode("utf-8", "replace")
        out[key] = val
    return out
