"""``raycxr export``: a pretraining run as ONNX files a hospital can run without torch.

Writes to ``out``:

- ``classifier.onnx``: input ``image`` float32 ``[batch, 1, S, S]`` in [0, 1] (the output of
  :func:`raycxr.readers.resize` on :func:`raycxr.readers.read_image`), outputs ``probabilities``
  ``[batch, C]`` and one ``prob:<Class Name>`` ``[batch]`` per class, so a consumer can address a
  finding by name;
- ``encoder.onnx``: the same input, output ``embedding`` ``[batch, D]`` (linear probes, retrieval);
- ``classifier.int8.onnx`` with ``int8=true``: onnxruntime INT8 quantisation of the classifier;
- ``export.json``: metadata, thresholds, the parity figures and the INT8 AUC change.

Every ONNX file carries its own model card in ``metadata_props`` (keys ``raycxr.*``: kind, class
names, per-class thresholds, input size, preprocessing, frontal-only, model version, method,
training sites, encoder, creation time, raycxr version), which the hospital runtime
(``deploy/raycxr_runtime``) reads; nothing else has to travel with the file.

Thresholds are max-F1 per class on the validation split of the training sites (classes without a
validation positive get 0.5 and are listed in ``raycxr.thresholds_note``).

**Parity.** After export the PyTorch classifier and onnxruntime score the same inputs: a batch of
real test-split images through the evaluation transform, and random images at batch 1 and 7 (the
batch axis is dynamic; the graph was traced at batch 2). The largest absolute difference per
output is recorded, and :class:`ParityError` is raised above ``atol`` (1e-4 in float32).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from raycxr_runtime import contract
from raycxr_runtime.contract import (
    EMBEDDING,
    INPUT,
    META_PREFIX,
    PREPROCESSING,
    PROBABILITIES,
    classifier_output_names,
)

from . import __version__
from .checkpoint import Checkpoint
from .methods import Pretrained, load_pretrained
from .registry import Registry
from .sites.config import SiteConfig, discover_sites


class ParityError(ValueError):
    """The ONNX graph does not reproduce the PyTorch model within tolerance."""


class ClassifierOutputs(nn.Module):
    """A classifier whose outputs are named per class: ``(probabilities, p[:, 0], ..., p[:, C-1])``."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.classifier(x)
        return (p, *(p[:, j] for j in range(p.shape[1])))


# ----------------------------------------------------------------------------------- ONNX writing


EXPORTER_REGISTRY: Registry[Callable[..., str]] = Registry("exporter")


def register_exporter(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator: make an export target available as ``raycxr export exporter=<name>``.

    The function is called as ``fn(module, example, path, output_names, *, opset)``: it writes ``module``
    (images ``[batch, 1, S, S]`` → ``output_names``) as an ONNX graph at ``path`` with input
    :data:`~raycxr_runtime.contract.INPUT` and a dynamic batch axis (``example`` is a batch of 2), and
    returns one line saying how (recorded as ``exporter`` in ``export.json``). The metadata, the parity
    check against PyTorch and the INT8 step are the same for every target; a graph that fails parity
    is deleted."""
    return EXPORTER_REGISTRY.decorator(name)


def list_exporters() -> list[str]:
    """Registered export targets, built-in first (``legacy``, ``dynamo``)."""
    return EXPORTER_REGISTRY.names()


@register_exporter("legacy")
def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str], *,
                       opset: int) -> str:
    """The default: the TorchScript tracer (``dynamo=False``), height and width fixed (the encoder's geometry
    needs them), the batch axis dynamic.

    It exports UniChest's nn.MultiheadAttention (checked: parity ~1e-7 at batch 1, 7 and 8) and the timm
    CNNs used here. On the demo UniChest (ResNet-18, 4 query networks, 2 cores) it took ~9 s where the
    dynamo exporter took ~61 s, logged hundreds of constant-folding warnings and raised the opset to 18,
    for the same parity. ``exporter=dynamo`` (torch.export + onnxscript) stays available. Either way,
    the parity check decides: a file that fails it is deleted.
    """
    axes = {n: {0: "batch"} for n in [INPUT, *output_names]}
    with warnings.catch_warnings():
        # TracerWarnings flag shape-dependent Python branches; batch 1 and 7 parity proves the batch axis.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=int(opset),
                          input_names=[INPUT], output_names=output_names, dynamic_axes=axes,
                          do_constant_folding=True)
    return f"torch.onnx.export(dynamo=False) TorchScript tracer, opset {opset}, torch {torch.__version__}"


@register_exporter("dynamo")
def export_dynamo(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str], *,
                  opset: int) -> str:
    """torch.export + onnxscript (``dynamo=True``), the batch axis dynamic."""
    # its implementations start at opset 18; asking for less triggers a down-conversion that fails here
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=max(int(opset), 18),
                      input_names=[INPUT], output_names=output_names, dynamic_shapes=({0: batch},), verbose=False)
    return (f"torch.onnx.export(dynamo=True) torch.export + onnxscript, opset {max(int(opset), 18)}, "
            f"torch {torch.__version__}")


def write_metadata(path: str | Path, metadata: dict[str, str], doc_string: str) -> None:
    """Replace the ``raycxr.*`` entries of ``metadata_props`` (other keys are kept) and the doc string.

    Also stores the integrity digests the runtime checks at load (``raycxr.weights_sha256`` over the
    graph as serialized in this file, ``raycxr.metadata_sha256`` over the other ``raycxr.*`` keys;
    :func:`raycxr_runtime.contract.graph_digest`), and reads the file back to confirm them."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    skip = {META_PREFIX + k for k in contract.DIGEST_KEYS}
    meta = {k: str(v) for k, v in metadata.items() if k not in skip}
    # the graph's bytes do not depend on the metadata, so the digest of this serialization is the file's
    meta[META_PREFIX + contract.WEIGHTS_DIGEST] = contract.graph_digest(model.SerializeToString())
    meta[META_PREFIX + contract.METADATA_DIGEST] = contract.metadata_digest(meta)
    del model.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    model.doc_string = doc_string
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    written = contract.graph_digest(Path(path).read_bytes())
    if written != meta[META_PREFIX + contract.WEIGHTS_DIGEST]:
        raise RuntimeError(f"{path}: the graph digest of the written file differs from the one stored in it")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``raycxr.*`` metadata of an ONNX file, prefix stripped."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return contract.strip_prefix({p.key: p.value for p in model.metadata_props})


def build_metadata(pretrained: Pretrained, *, kind: str, model_version: str, thresholds: Sequence[float] | None,
                   thresholds_note: str = "", frontal_only: bool = True, embedding_dim: int | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``raycxr.*`` keys of one ONNX file (values are strings; lists and dicts are JSON)."""
    enc = pretrained.encoder_name
    meta: dict[str, Any] = {
        "kind": kind,
        "class_names": json.dumps(list(pretrained.class_names)),
        "input_size": str(int(pretrained.image_size)),
        "preprocessing": json.dumps({**PREPROCESSING, "input_size": int(pretrained.image_size)}),
        "frontal_only": "true" if frontal_only else "false",
        "model_version": model_version,
        "method": pretrained.method,
        "training_sites": json.dumps(list(pretrained.sites)),
        "encoder": enc,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "raycxr_version": __version__,
    }
    if kind == "classifier":
        if thresholds is None or len(thresholds) != len(pretrained.class_names):
            raise ValueError(f"need one threshold per class ({len(pretrained.class_names)}), got "
                             f"{None if thresholds is None else len(thresholds)}")
        meta["thresholds"] = json.dumps([round(float(t), 6) for t in thresholds])
        meta["thresholds_note"] = thresholds_note
        meta["outputs"] = json.dumps(classifier_output_names(pretrained.class_names))
    if embedding_dim is not None:
        meta["embedding_dim"] = str(int(embedding_dim))
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return {META_PREFIX + k: str(v) for k, v in meta.items()}


def _doc(pretrained: Pretrained, kind: str, model_version: str) -> str:
    s = pretrained.image_size
    what = (f"probabilities [batch, {len(pretrained.class_names)}] over raycxr.class_names and one "
            f"'prob:<class>' [batch] output per class" if kind == "classifier" else "embedding [batch, D]")
    return (f"raycxr {pretrained.method} {kind} {model_version}: input 'image' float32 [batch, 1, {s}, {s}] in [0, 1] "
            f"(raycxr_runtime.readers.read_image then resize to {s}); output {what}. Research use only, "
            "not a medical device. Metadata: raycxr.* keys.")


# ----------------------------------------------------------------------------------- parity


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session opened as the runtime opens it (:func:`raycxr_runtime.contract.session`)."""
    return contract.session(str(path), threads=threads)


def _reference(module: nn.Module, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """PyTorch outputs in the order of the ONNX outputs ``names``; a plain classifier is expanded to
    ``probabilities`` plus its per-class columns."""
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) == 1 and len(names) > 1 and names[0] == PROBABILITIES:
        p = outs[0]
        outs = [p, *(p[:, j] for j in range(p.shape[1]))]
    if len(outs) != len(names):
        raise ValueError(f"the PyTorch module returns {len(outs)} outputs, the ONNX graph has {len(names)}")
    return [o.detach().float().cpu().numpy() for o in outs]


def check_parity(module: nn.Module, onnx_path: str | Path, inputs: dict[str, np.ndarray], *,
                 atol: float = 1e-4, session: Any | None = None) -> dict[str, Any]:
    """Run ``module`` (PyTorch) and the ONNX file on each named input batch; max |difference| per output.

    Raises :class:`ParityError` naming the file, input and output when any difference exceeds
    ``atol`` or is not finite, or when a shape differs."""
    sess = session or ort_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    module.eval()
    report: dict[str, Any] = {"atol": float(atol), "inputs": {}}
    worst, worst_at = 0.0, ""
    for label, x in inputs.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        ref = _reference(module, x, names)
        got = sess.run(names, {INPUT: x})
        diffs: dict[str, float] = {}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ParityError(f"{onnx_path}: output '{name}' has shape {g.shape} in ONNX, {r.shape} in PyTorch "
                                  f"({label})")
            d = float(np.max(np.abs(r - g))) if r.size else 0.0
            diffs[name] = d if math.isfinite(d) else float("inf")
            if diffs[name] > worst:
                worst, worst_at = diffs[name], f"output '{name}' on {label}"
        report["inputs"][label] = {"batch": int(x.shape[0]), "max_abs_diff": max(diffs.values()),
                                   "per_output": diffs}
    report["max_abs_diff"] = worst
    report["worst"] = worst_at
    if not worst <= atol:
        raise ParityError(f"{onnx_path}: ONNX differs from PyTorch by {worst:.3g} at {worst_at} "
                          f"(tolerance {atol:g}); the exported graph is not faithful")
    return report


def parity_inputs(image_size: int, real: np.ndarray | None, seed: int = 0) -> dict[str, np.ndarray]:
    """The real batch (if any) plus random images at batch 1 and batch 7 (the dynamic axis)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    if real is not None and len(real):
        out[f"test images (batch {len(real)})"] = np.asarray(real, dtype=np.float32)
    for b in (1, 7):
        out[f"random (batch {b})"] = rng.random((b, 1, image_size, image_size), dtype=np.float32)
    return out


def real_batch(sites: dict[str, SiteConfig], class_names: list[str], image_size: int, n: int,
               split: str = "test") -> np.ndarray | None:
    """Up to ``n`` images of the sites' ``split`` through the evaluation transform, taken in turn from each site."""
    from .eval.predict import site_targets

    pools = []
    for site in sites.values():
        ds, _, _ = site_targets(site, class_names, split, image_size=image_size)
        pools.append((ds, iter(range(len(ds)))))
    images: list[np.ndarray] = []
    while pools and len(images) < n:
        for ds, it in list(pools):
            i = next(it, None)
            if i is None:
                pools.remove((ds, it))
                continue
            item = ds[i]  # None when the image is quarantined
            if item is not None:
                images.append(item["image"].numpy())
            if len(images) >= n:
                break
    return np.stack(images).astype(np.float32) if images else None


# ----------------------------------------------------------------------------------- the export


def export_model(pretrained: Pretrained, out_dir: str | Path, *, thresholds: Sequence[float] | None = None,
                 thresholds_note: str = "", opset: int = 17, model_version: str | None = None,
                 frontal_only: bool = True, parity_images: np.ndarray | None = None, atol: float = 1e-4,
                 exporter: str = "legacy", extra_metadata: dict[str, Any] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write ``classifier.onnx`` and ``encoder.onnx`` with metadata, then check parity on both.

    ``thresholds`` default to 0.5 for every class. Returns paths, metadata and the parity report;
    raises :class:`ParityError` when ONNX and PyTorch disagree by more than ``atol``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(pretrained.class_names)
    if thresholds is None:
        thresholds, thresholds_note = [0.5] * len(names), thresholds_note or "no thresholds given: 0.5 for every class"
    version = model_version or f"{pretrained.method}-untracked"
    s = int(pretrained.image_size)
    example = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(0))  # trace at batch 2, not 1
    classifier = ClassifierOutputs(pretrained.classifier).eval()
    encoder = pretrained.embedding_model.eval()
    with torch.no_grad():
        dim = int(encoder(example).shape[1])
    paths = {"classifier": out / "classifier.onnx", "encoder": out / "encoder.onnx"}
    inputs = parity_inputs(s, parity_images)
    write_graph = EXPORTER_REGISTRY.get(exporter)
    result: dict[str, Any] = {"exporter": "", "files": {}, "metadata": {}, "parity": {}}
    steps = tqdm(total=4, desc="export", unit="step", disable=not progress, leave=False)
    for kind, module, outputs in (("classifier", classifier, classifier_output_names(names)),
                                  ("encoder", encoder, [EMBEDDING])):
        steps.set_description(f"exporting {kind}")
        path = paths[kind]
        module.eval()
        result["exporter"] = write_graph(module, example, path, outputs, opset=opset)
        meta = build_metadata(pretrained, kind=kind, model_version=version,
                              thresholds=thresholds if kind == "classifier" else None,
                              thresholds_note=thresholds_note, frontal_only=frontal_only,
                              embedding_dim=dim if kind == "encoder" else None, extra=extra_metadata)
        write_metadata(path, meta, _doc(pretrained, kind, version))
        steps.update(1)
        steps.set_description(f"parity {kind}")
        try:
            result["parity"][kind] = check_parity(module, path, inputs, atol=atol)
        except ParityError:
            path.unlink(missing_ok=True)  # an unfaithful graph must not be shipped by mistake
            raise
        steps.update(1)
        result["files"][kind] = _file_info(path)
        result["metadata"][kind] = contract.strip_prefix(meta)
    steps.close()
    result["thresholds"] = dict(zip(names, (float(t) for t in thresholds)))
    result["thresholds_note"] = thresholds_note
    result["model_version"] = version
    return result


def _file_info(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), "opset": opset}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- thresholds


def validation_thresholds(classifier: nn.Module | Any, sites: dict[str, SiteConfig], class_names: list[str], *,
                          split: str = "val", image_size: int = 224, batch_size: int = 32, limit: int | None = None,
                          progress: bool = True) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Per-class max-F1 thresholds on ``split`` of ``sites`` pooled; 0.5 where a class has no positive there.

    Returns ``(thresholds (C,), note, summary)``; the note lists the classes left at 0.5."""
    from .engine.metrics import max_f1_thresholds
    from .eval.predict import predict_site

    c = len(class_names)
    probs, targets, mask = [np.zeros((0, c))], [np.zeros((0, c))], [np.zeros((0, c))]
    per_site = {}
    for name, site in sites.items():
        pred = predict_site(classifier, site, class_names, split=split, image_size=image_size, batch_size=batch_size,
                            progress=progress, limit=limit)
        probs.append(pred.probs)
        targets.append(pred.targets)
        mask.append(pred.mask)
        per_site[name] = len(pred.probs)
    p, t, m = (np.concatenate(a) for a in (probs, targets, mask))
    positives = ((t > 0.5) & (m > 0.5)).sum(0)
    thr = max_f1_thresholds(p, t, m) if len(p) else np.full(c, 0.5)
    thr = np.where(positives > 0, thr, 0.5)
    missing = [n for n, k in zip(class_names, positives) if k == 0]
    note = (f"max-F1 on the '{split}' split of {', '.join(sites) or 'no site'} ({len(p)} images)"
            + (f"; 0.5 for classes with no positive there: {', '.join(missing)}" if missing else ""))
    summary = {"split": split, "images": per_site, "positives": dict(zip(class_names, positives.tolist())),
               "default_0.5": missing}
    return thr, note, summary


# ----------------------------------------------------------------------------------- INT8


class OrtClassifier:
    """An ONNX classifier as a callable ``images tensor -> probabilities tensor`` (for predict_site)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = ort_session(path, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([PROBABILITIES], {INPUT: x})[0])


class _CalibrationReader:
    """Batches of 8 calibration images for ``quantize_static`` (its CalibrationDataReader protocol)."""

    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{INPUT: images[i:i + 8]} for i in range(0, len(images), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8(fp32: str | Path, int8: str | Path, *, mode: str = "dynamic",
                  calibration: np.ndarray | None = None) -> dict[str, Any]:
    """INT8 copy of an ONNX classifier; the raycxr metadata is carried over (model version + ``+int8``).

    ``dynamic``: weights INT8, activations quantised on the fly (onnxruntime ``quantize_dynamic``,
    MatMul/Gemm of the attention layers and the convolutions). ``static``: QDQ with per-channel
    weights, activation ranges calibrated on ``calibration`` images (training split).
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, int8 = Path(fp32), Path(int8)
    # onnxruntime's recommended pre-pass (fusions, shape inference); its symbolic shape inference
    # asserts on UniChest's reshapes, the ONNX one is enough here.
    pre = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(int8), weight_type=QuantType.QInt8)
        elif mode == "static":
            if calibration is None or not len(calibration):
                raise ValueError("int8_mode=static needs calibration images (training split of the training sites)")
            quantize_static(str(pre), str(int8), _CalibrationReader(np.asarray(calibration, np.float32)),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8)
        else:
            raise ValueError(f"unknown int8_mode '{mode}'; expected dynamic or static")
    finally:
        pre.unlink(missing_ok=True)
    meta = read_metadata(fp32)
    meta["model_version"] = meta.get("model_version", "") + "+int8"
    meta["quantization"] = f"int8 {mode} (onnxruntime.quantization)"
    import onnx

    doc = onnx.load(str(fp32), load_external_data=False).doc_string
    write_metadata(int8, {META_PREFIX + k: v for k, v in meta.items()}, doc + f" INT8 ({mode}).")
    return {"mode": mode, **_file_info(int8), "fp32_bytes": fp32.stat().st_size}


def compare_auc(models: dict[str, Any], sites: dict[str, SiteConfig], class_names: list[str], *, image_size: int,
                split: str = "test", batch_size: int = 32, limit: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Mean AUC of each named model on ``split`` of every site (``classification_metrics(...)["mean"]["auc"]``)."""
    from .engine.metrics import classification_metrics
    from .eval.predict import predict_site

    out: dict[str, Any] = {}
    for name, site in sites.items():
        row: dict[str, Any] = {}
        for label, model in models.items():
            pred = predict_site(model, site, class_names, split=split, image_size=image_size, batch_size=batch_size,
                                progress=progress, limit=limit)
            m = classification_metrics(pred.probs, pred.targets, pred.mask, class_names)
            row[label] = m["mean"]["auc"]
            row["images"] = int(len(pred.probs))
        out[name] = row
    return out


# ----------------------------------------------------------------------------------- the command


def _out_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.out)
    run = Path(cfg.run)
    if run.is_file() and out.parent == run:  # out=${run}/export with run=.../checkpoint.pt
        out = run.parent / out.name
    return out


def export_onnx(cfg: DictConfig) -> dict[str, Any]:
    """``raycxr export``: thresholds on the validation split, ONNX files, parity, optional INT8, ``export.json``."""
    import time

    t0 = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.exporter not in EXPORTER_REGISTRY:  # checked here, not by the schema: plug-ins register export targets
        raise ValueError(f"configuration 'export': exporter: must be one of {list_exporters()}, got {cfg.exporter!r}")
    # read before minutes of export: a missing file or a key that is not Ed25519 fails now
    sign_key = _signing_key(cfg.get("sign_key"))
    ckpt = Checkpoint.find(cfg.run, best=True)
    digest = sha256_file(ckpt)
    pretrained = load_pretrained(ckpt)
    if pretrained.classifier is None:
        raise ValueError(f"{ckpt}: a '{pretrained.method}' run is an encoder without a classifier; export a run "
                         "that has one, or fine-tune this encoder first (raycxr eval fine_tune)")
    out = _out_dir(cfg)
    names, size = list(pretrained.class_names), int(pretrained.image_size)
    sites, missing_sites = _training_sites(cfg, pretrained)
    batch = int(cfg.batch_size)

    if sites:
        thr, note, thr_summary = validation_thresholds(
            pretrained.classifier, sites, names, split=cfg.thresholds.split, image_size=size, batch_size=batch,
            limit=cfg.thresholds.get("limit"), progress=True)
        real = real_batch(sites, names, size, int(cfg.parity.batch), split=cfg.parity.split)
    else:
        thr, thr_summary, real = np.full(len(names), 0.5), {}, None
        note = "no training site is registered here: 0.5 for every class"
    if missing_sites:
        note += f"; training sites not registered here (not used): {', '.join(missing_sites)}"
    version = cfg.get("model_version") or f"{pretrained.method}-{digest[:12]}"
    result = export_model(pretrained, out, thresholds=thr, thresholds_note=note, opset=int(cfg.opset),
                          model_version=version, frontal_only=bool(cfg.frontal_only), parity_images=real,
                          atol=float(cfg.parity.atol), exporter=cfg.exporter,
                          extra_metadata={"checkpoint_sha256": digest})
    result.update({"run": str(cfg.run), "checkpoint": str(ckpt), "checkpoint_sha256": digest, "out": str(out),
                   "thresholds_summary": thr_summary, "training_sites_missing": missing_sites})
    if cfg.int8:
        result["int8"] = _int8(cfg, out, sites, names, size, batch)
    if cfg.get("bundle"):
        result["bundle"] = str(_bundle(out, result, str(cfg.get("bundle_version") or "0.1.0")))
    if sign_key is not None:
        result["signatures"] = sign_outputs(out, sign_key)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "export.json").write_text(json.dumps(result, indent=2, default=_json_default, allow_nan=False))
    print_summary(result)
    return result


def _training_sites(cfg: DictConfig, pretrained: Pretrained) -> tuple[dict[str, SiteConfig], list[str]]:
    try:
        registered = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    except FileNotFoundError:
        registered = {}
    wanted = list(pretrained.sites) or list(registered)
    found = {s: registered[s] for s in wanted if s in registered and registered[s].has_manifest()}
    return found, [s for s in wanted if s not in found]


def _int8(cfg: DictConfig, out: Path, sites: dict[str, SiteConfig], names: list[str], size: int,
          batch: int) -> dict[str, Any]:
    mode = cfg.int8_mode
    calib = None
    if mode == "static":
        calib = real_batch(sites, names, size, int(cfg.calibration_images), split="train")
    print(f"quantising classifier.onnx to INT8 ({mode}) ...", flush=True)
    info = quantize_int8(out / "classifier.onnx", out / "classifier.int8.onnx", mode=mode, calibration=calib)
    if not sites:
        return {**info, "note": "no registered training site: AUC not measured"}
    threads = cfg.get("threads")
    auc = compare_auc({"fp32": OrtClassifier(out / "classifier.onnx", threads),
                       "int8": OrtClassifier(out / "classifier.int8.onnx", threads)},
                      sites, names, image_size=size, split="test", batch_size=batch, limit=cfg.get("limit"))
    for row in auc.values():
        row["delta"] = None if row["fp32"] is None or row["int8"] is None else row["int8"] - row["fp32"]
    deltas = [r["delta"] for r in auc.values() if r["delta"] is not None]
    return {**info, "auc_split": "test", "sites": auc,
            "mean_auc_delta": float(np.mean(deltas)) if deltas else None,
            "max_abs_auc_delta": float(np.max(np.abs(deltas))) if deltas else None}


def _bundle(out: Path, result: dict[str, Any], version: str) -> Path:
    """``bundle=true``: ``out/bundle`` as a MONAI Bundle (see :mod:`raycxr.bundle`)."""
    from .bundle import model_card, write_bundle

    meta = read_metadata(out / "classifier.onnx")
    # the model card ships inside the runtime package, so a wheel install exports it too
    card = model_card(meta, resources.files("raycxr_runtime").joinpath("model_card.md").read_text())
    parity = result["parity"]["classifier"]["max_abs_diff"]
    return write_bundle(out / "bundle", out / "classifier.onnx", meta, card, version=version, parity=parity)


def _signing_key(path: str | None) -> Any:
    if not path:
        return None
    from raycxr_runtime.signing import SignatureError, load_private_key

    try:
        return load_private_key(path)
    except SignatureError as exc:
        raise ValueError(f"sign_key: {exc}") from None


def sign_outputs(out: str | Path, private_key: Any) -> dict[str, str]:
    """``sign_key=KEY.pem``: a detached Ed25519 signature ``<file>.sig`` (see :mod:`raycxr_runtime.signing`)
    for every ONNX file of the export, the bundle's ``models/model.onnx`` included; ``{file: .sig}``."""
    from raycxr_runtime.signing import sign_file

    out = Path(out)
    files = sorted(out.glob("*.onnx")) + sorted((out / "bundle" / "models").glob("*.onnx"))
    return {str(f.relative_to(out)): str(sign_file(f, private_key).relative_to(out)) for f in files}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_summary(result: dict[str, Any]) -> None:
    """A short table: parity per input and file, and the INT8 AUC change."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    par = result["parity"]
    table = Table(title=f"parity: max |torch - onnxruntime| (tol {par['classifier']['atol']:g})")
    table.add_column("input")
    table.add_column("batch", justify="right")
    for kind in par:
        table.add_column(kind, justify="right")
    for label, row in par["classifier"]["inputs"].items():
        table.add_row(label, str(row["batch"]), *(f"{par[k]['inputs'][label]['max_abs_diff']:.2e}" for k in par))
    console.print(table)
    if "int8" in result and "sites" in result["int8"]:
        q = result["int8"]
        t = Table(title=f"INT8 {q['mode']}: test mean AUC ({q['bytes'] / 1e6:.0f} vs {q['fp32_bytes'] / 1e6:.0f} MB)")
        for col in ("site", "images", "fp32", "int8", "change"):
            t.add_column(col, justify="right" if col != "site" else "left")

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        for site, row in q["sites"].items():
            t.add_row(site, str(row["images"]), f(row["fp32"]), f(row["int8"]),
                      "-" if row["delta"] is None else f"{row['delta']:+.4f}")
        console.print(t)
    console.print(f"wrote {', '.join(Path(v['path']).name for v in result['files'].values())}"
                  f"{', classifier.int8.onnx' if 'int8' in result else ''} and export.json to {result['out']} "
                  f"(model_version {result['model_version']})")
