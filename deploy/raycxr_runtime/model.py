"""An exported raycxr ONNX model, run on the CPU, with its metadata read from the file.

``raycxr export`` writes the model card into the ONNX file itself (``metadata_props``, keys
``raycxr.*``): class names, per-class thresholds, input size, preprocessing, whether the model is
frontal-only, model version. :class:`Model` reads it, so a hospital needs nothing but the file.

Integrity: the file also carries ``raycxr.weights_sha256`` (the graph: nodes, initializers,
inputs and outputs, opsets) and ``raycxr.metadata_sha256`` (the other ``raycxr.*`` keys).
:class:`Model` recomputes both from the bytes it loads and refuses a file that does not match
(a corrupted copy, or weights changed under the same ``model_version``). Those digests are unkeyed:
with ``trusted_keys`` (``--trusted-key``) the detached Ed25519 signature ``<model>.sig`` is checked
too, and ``require_signature`` refuses a file without a valid one (see :mod:`.signing`).

Sanity at load: thresholds must be finite and within [0, 1], and the model is run once on a probe
image (a smooth ramp): a classifier must give one column per class, every output must be finite and
a classifier's probabilities within [0, 1].

Backends: ``onnxruntime`` (default) or ``openvino`` (optional package, ``pip install
raycxr-runtime[openvino]``); both run the same file and give the same probabilities within 1e-4.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import contract
from .contract import META_PREFIX, REQUIRED_METADATA
from .signing import SignatureError, TrustedKey, signature_path, verify_signature

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "META_PREFIX", "Model", "ModelError"]

BACKENDS = ("onnxruntime", "openvino")
# onnxruntime float32 stays the default: see benchmarks/results/onnx_inference.json (OpenVINO is
# offered where it measures faster; onnxruntime needs no extra package)
DEFAULT_BACKEND = "onnxruntime"


class ModelError(Exception):
    """A model file that cannot be used: ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class _OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None) -> None:
        self.session = contract.session(str(path), threads=threads, quiet=True)
        self.inputs = [(i.name, list(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, output: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([output], feed)[0]


class _OpenVinoBackend:
    name = "openvino"

    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        core = ov.Core()
        # f32: on CPUs with AMX / AVX512-BF16 OpenVINO otherwise runs float32 graphs in bf16 (1e-3 off)
        # no CPU pinning: OpenVINO would otherwise pin the process's threads, and PyTorch / onnxruntime / the
        # decode workers sharing the cores then ran up to 10x slower in the benchmark
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.inputs = [(i.get_any_name(), [d.get_length() if d.is_static else "batch" for d in i.get_partial_shape()])
                       for i in self.compiled.inputs]
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def run(self, output: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        res = self.request.infer(feed)
        return np.asarray(res[self.compiled.output(output)])


class Model:
    """An exported raycxr ONNX file (``classifier.onnx``, ``classifier.int8.onnx`` or ``encoder.onnx``).

    Attributes read from the metadata: ``kind`` ("classifier" | "encoder"), ``class_names``,
    ``thresholds`` (one per class, classifiers only), ``input_size``, ``frontal_only``,
    ``model_version``, ``metadata`` (every ``raycxr.*`` key, JSON values decoded).

    Args:
        path: the ONNX file.
        threads: intra-op threads (default: the backend's choice, all cores).
        backend: ``onnxruntime`` or ``openvino``.
        verify: check the embedded digests (``False`` only for files exported before they existed).
        trusted_keys: public keys (:func:`raycxr_runtime.signing.load_trusted_keys`) that check the
            file's detached signature ``<model>.sig`` when there is one.
        require_signature: refuse a file without a signature that verifies with one of ``trusted_keys``.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, backend: str = DEFAULT_BACKEND,
                 verify: bool = True, trusted_keys: Sequence[TrustedKey] = (),
                 require_signature: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(self.path, "model file not found" if not self.path.exists() else "not a regular file")
        if backend not in BACKENDS:
            raise ModelError(self.path, f"unknown backend '{backend}' (expected one of {BACKENDS})")
        try:
            data = self.path.read_bytes()
            raw = contract.read_metadata_props(data)
        except (OSError, ValueError) as exc:
            raise ModelError(self.path, f"not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        meta = contract.strip_prefix(raw)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing and raw:
            raise ModelError(self.path, f"no raycxr metadata ({', '.join(META_PREFIX + k for k in missing)} missing): "
                                        "export the model with `raycxr export`")
        self.verified = False
        if verify and not missing:
            self._verify(data, raw, meta)
        self.signature = self._check_signature(data, trusted_keys, require_signature)
        del data
        self.backend_name = backend
        try:
            self._backend = _OrtBackend(self.path, threads) if backend == "onnxruntime" else \
                _OpenVinoBackend(self.path, threads)
        except ImportError:
            raise ModelError(self.path, "backend 'openvino' needs the openvino package: "
                                        "pip install 'raycxr-runtime[openvino]'") from None
        except Exception as exc:  # onnxruntime / OpenVINO raise their own types; all mean "not usable"
            detail = " ".join(str(exc).split())[:300]
            raise ModelError(self.path, f"not a loadable ONNX model ({type(exc).__name__}: {detail})") from None
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
        if self.thresholds is not None and not (np.all(np.isfinite(self.thresholds))
                                                and np.all((self.thresholds >= 0) & (self.thresholds <= 1))):
            bad = [f"{c}={t}" for c, t in zip(self.class_names, self.thresholds.tolist())
                   if not (np.isfinite(t) and 0 <= t <= 1)] if self.thresholds.ndim == 1 else []
            raise ModelError(self.path, "raycxr.thresholds must be finite and within [0, 1]"
                                        + (f": {', '.join(bad[:5])}" if bad else ""))
        self.model_version = str(meta["model_version"])
        self.frontal_only = str(meta.get("frontal_only", "true")).lower() == "true"
        inputs = self._backend.inputs
        if len(inputs) != 1:
            raise ModelError(self.path, f"expected one input, the graph has {len(inputs)}")
        self.input_name, shape = inputs[0]
        if len(shape) != 4 or shape[1] != 1 or shape[2:] != [self.input_size, self.input_size]:
            raise ModelError(self.path, f"input '{self.input_name}' has shape {shape}, metadata says "
                                        f"[batch, 1, {self.input_size}, {self.input_size}]")
        self.output_name = contract.output_name(self.kind)
        outputs = self._backend.outputs
        if self.output_name not in outputs:
            raise ModelError(self.path, f"no '{self.output_name}' output (outputs: {outputs[:5]})")
        if self.kind == "classifier" and (self.thresholds is None
                                          or self.thresholds.shape != (len(self.class_names),)):
            raise ModelError(self.path, "raycxr.thresholds must hold one threshold per class")
        self._probe()

    def _probe(self) -> None:
        """Run the model once on a ramp image: the output width is often symbolic in the graph, and a
        model with NaN weights (or a graph edited to output garbage) must fail here, not per image."""
        s = self.input_size
        ramp = np.linspace(0.0, 1.0, s * s, dtype=np.float32).reshape(1, 1, s, s)
        out = np.asarray(self.predict(ramp))
        if not np.all(np.isfinite(out)):
            raise ModelError(self.path, f"output '{self.output_name}' is not finite (NaN or inf) on a probe image; "
                                        "the weights are broken, refusing to load it")
        if self.kind == "classifier" and not np.all((out >= -1e-6) & (out <= 1 + 1e-6)):
            raise ModelError(self.path, f"output '{self.output_name}' holds values outside [0, 1] on a probe image "
                                        f"({float(out.min()):.3g} to {float(out.max()):.3g}): not probabilities")

    def _check_signature(self, data: bytes, keys: Sequence[TrustedKey], required: bool) -> dict[str, str]:
        """``{"status": "verified", "key_id": ...}``, ``{"status": "unsigned"}`` or ``{"status": "not checked"}``
        (signed, but no trusted key was given); a bad or missing (when ``required``) signature raises."""
        if required and not keys:
            raise ModelError(self.path, "--require-signature needs the publisher's public key (--trusted-key PUB.pem)")
        if not keys:
            return {"status": "not checked" if signature_path(self.path).is_file() else "unsigned"}
        try:
            signed = verify_signature(self.path, data, keys)
        except SignatureError as exc:
            raise ModelError(self.path, f"signature check failed: {exc}; refusing to load it") from None
        except ValueError as exc:
            raise ModelError(self.path, f"not a loadable ONNX model ({exc})") from None
        if signed is None:
            if required:
                raise ModelError(self.path, f"unsigned (no {signature_path(self.path).name}) and a signature is "
                                            "required; refusing to load it")
            return {"status": "unsigned"}
        return {"status": "verified", "key_id": signed["key_id"]}

    def _verify(self, data: bytes, raw: dict[str, str], meta: dict[str, str]) -> None:
        stored_graph, stored_meta = meta.get(contract.WEIGHTS_DIGEST), meta.get(contract.METADATA_DIGEST)
        if not stored_graph or not stored_meta:
            raise ModelError(self.path, f"no integrity digest ({META_PREFIX}{contract.WEIGHTS_DIGEST}): exported "
                                        "before digests existed; re-export it with `raycxr export`, or load it "
                                        "unverified (--allow-unverified-model) if you trust the copy")
        try:
            actual = contract.graph_digest(data)
        except ValueError as exc:
            raise ModelError(self.path, f"not a loadable ONNX model ({exc})") from None
        if actual != stored_graph:
            raise ModelError(self.path, f"integrity check failed: the weights/graph digest is {actual[:16]}..., "
                                        f"the file says {stored_graph[:16]}... (corrupted or modified copy of "
                                        f"model_version {meta.get('model_version', '?')}); refusing to load it")
        if contract.metadata_digest(raw) != stored_meta:
            raise ModelError(self.path, "integrity check failed: the raycxr.* metadata (classes, thresholds, "
                                        "version...) was changed after export; refusing to load it")
        self.verified = True

    @property
    def backend(self) -> str:
        return self.backend_name

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``(B, 1, S, S)`` float32 in [0, 1] -> ``(B, C)`` probabilities (or ``(B, D)`` embeddings).

        A classifier whose output is not ``(B, C)`` raises :class:`ModelError` (never silently cut)."""
        x = np.asarray(images)
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"{self.path.name} expects images of shape (B, 1, {s}, {s}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.class_names) if self.kind == "classifier" else 0), np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self._backend.run(self.output_name, {self.input_name: x})
        if self.kind == "classifier" and out.shape != (x.shape[0], len(self.class_names)):
            raise ModelError(self.path, f"output '{self.output_name}' has shape {list(out.shape)} for a batch of "
                                        f"{x.shape[0]}, expected [{x.shape[0]}, {len(self.class_names)}] "
                                        f"(one column per class in raycxr.class_names)")
        return out

    def info(self) -> dict[str, Any]:
        """The model card as JSON-able data (what ``GET /model`` returns)."""
        out = dict(self.metadata)
        out["file"] = self.path.name
        out["input_size"] = self.input_size
        out["frontal_only"] = self.frontal_only
        out["backend"] = self.backend_name
        out["verified"] = self.verified
        out["signature"] = dict(self.signature)
        if self.thresholds is not None:
            out["thresholds"] = dict(zip(self.class_names, self.thresholds.tolist()))
        return out

    def __repr__(self) -> str:
        return (f"Model({self.path.name!r}, kind={self.kind}, version={self.model_version}, "
                f"classes={len(self.class_names)}, input={self.input_size}, backend={self.backend_name})")


def _decode(value: str) -> Any:
    """JSON values (lists, dicts, numbers, booleans) decoded; plain strings kept."""
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
