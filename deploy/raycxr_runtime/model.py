"""An exported raycxr ONNX model, run with onnxruntime on the CPU, with its metadata read from the file.

``raycxr export`` writes the model card into the ONNX file itself (``metadata_props``, keys
``raycxr.*``): class names, per-class thresholds, input size, preprocessing, whether the model is
frontal-only, model version. :class:`Model` reads it, so a hospital needs nothing but the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import contract
from .contract import META_PREFIX, REQUIRED_METADATA

__all__ = ["META_PREFIX", "Model", "ModelError"]


class ModelError(Exception):
    """A model file that cannot be used: ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class Model:
    """An exported raycxr ONNX file (``classifier.onnx``, ``classifier.int8.onnx`` or ``encoder.onnx``).

    Attributes read from the metadata: ``kind`` ("classifier" | "encoder"), ``class_names``,
    ``thresholds`` (one per class, classifiers only), ``input_size``, ``frontal_only``,
    ``model_version``, ``metadata`` (every ``raycxr.*`` key, JSON values decoded).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(self.path, "model file not found" if not self.path.exists() else "not a regular file")
        try:
            self.session = contract.session(str(self.path), threads=threads, quiet=True)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types; all mean "not usable"
            detail = " ".join(str(exc).split())[:300]
            raise ModelError(self.path, f"not a loadable ONNX model ({type(exc).__name__}: {detail})") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        meta = contract.strip_prefix(raw)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelError(self.path, f"no raycxr metadata ({', '.join(META_PREFIX + k for k in missing)} missing): "
                                        "export the model with `raycxr export`")
        self.metadata: dict[str, Any] = {k: _decode(v) for k, v in meta.items()}
        self.kind = str(meta["kind"])
        if self.kind not in contract.KINDS:
            raise ModelError(self.path, f"unknown raycxr.kind '{self.kind}' (expected one of {contract.KINDS})")
        try:
            self.class_names: list[str] = [str(c) for c in json.loads(meta["class_names"])]
            self.input_size = int(meta["input_size"])
            self.thresholds = (np.asarray(json.loads(meta["thresholds"]), dtype=np.float64)
                               if "thresholds" in meta else None)
        except (ValueError, TypeError) as exc:
            raise ModelError(self.path, f"malformed raycxr metadata: {exc}") from None
        self.model_version = str(meta["model_version"])
        self.frontal_only = str(meta.get("frontal_only", "true")).lower() == "true"
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(self.path, f"expected one input, the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 1 or shape[2:] != [self.input_size, self.input_size]:
            raise ModelError(self.path, f"input '{self.input_name}' has shape {shape}, metadata says "
                                        f"[batch, 1, {self.input_size}, {self.input_size}]")
        self.output_name = contract.output_name(self.kind)
        outputs = [o.name for o in self.session.get_outputs()]
        if self.output_name not in outputs:
            raise ModelError(self.path, f"no '{self.output_name}' output (outputs: {outputs[:5]})")
        if self.kind == "classifier":
            if self.thresholds is None or self.thresholds.shape != (len(self.class_names),):
                raise ModelError(self.path, "raycxr.thresholds must hold one threshold per class")

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(B, 1, S, S)`` float32 in [0, 1] -> ``(B, C)`` probabilities (or ``(B, D)`` embeddings)."""
        x = np.asarray(images)
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"{self.path.name} expects images of shape (B, 1, {s}, {s}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.class_names) if self.kind == "classifier" else 0), np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def info(self) -> dict[str, Any]:
        """The model card as JSON-able data (what ``GET /model`` returns)."""
        out = dict(self.metadata)
        out["file"] = self.path.name
        out["input_size"] = self.input_size
        out["frontal_only"] = self.frontal_only
        if self.thresholds is not None:
            out["thresholds"] = dict(zip(self.class_names, self.thresholds.tolist()))
        return out

    def __repr__(self) -> str:
        return (f"Model({self.path.name!r}, kind={self.kind}, version={self.model_version}, "
                f"classes={len(self.class_names)}, input={self.input_size})")


def _decode(value: str) -> Any:
    """JSON values (lists, dicts, numbers, booleans) decoded; plain strings kept."""
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
