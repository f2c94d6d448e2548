"""One cell of a study: a unit of work whose result is cached on disk, so a study resumes where it stopped.

A cell is a plain dict (``spec``) so it can run in this process or as a Ray task on another node:

- ``pretrain``: train one row's method on its sites at the study's budget (``raycxr pretrain``);
- ``embed``: the row's frozen encoder on the target's training images and on every evaluation site's
  test split (what the linear probes train and score on);
- ``lp`` / ``ft`` / ``lpft``: a linear probe, a fine-tuning, or a linear probe then fine-tuning on a
  seeded fraction of the target's training images, scored on every evaluation site's test split;
- ``zero_shot``: a row whose method scores class names (UniChest) on every evaluation site, no training.

Each downstream cell writes ``pred.npz`` (per evaluation site: probabilities, targets and mask over the
target's classes) and ``cell.json`` (what it did, its cost). ``cell.json`` is written last: a cell
without it did not finish and runs again. It also keeps a digest of the spec it ran: a cell whose spec
has changed since (a new budget rule, another recipe) runs again instead of being read back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DONE = "cell.json"


RUNTIME_KEYS = ("threads", "cache", "device")  # how a cell runs, not what it computes: a change does not rerun it


def spec_digest(spec: dict[str, Any]) -> str:
    """What a cell computes, as a short digest of its spec (without :data:`RUNTIME_KEYS`)."""
    what = {k: v for k, v in spec.items() if k not in RUNTIME_KEYS}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_record(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's ``cell.json`` record if it finished with this spec (a record from before digests were
    kept counts as finished), else None."""
    done = Path(spec["dir"]) / DONE
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except json.JSONDecodeError as e:  # written atomically, so only a hand edit or a broken disk gets here
        raise ValueError(f"{done}: not a readable study cell record ({e}); delete {done.parent} to run the cell "
                         "again") from None
    return record if record.get("spec", spec_digest(spec)) == spec_digest(spec) else None


def is_done(spec: dict[str, Any]) -> bool:
    """Whether the cell finished with this spec."""
    return cached_record(spec) is not None


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run (or read back) one cell; returns its ``cell.json`` record."""
    out = Path(spec["dir"])
    done = out / DONE
    record = cached_record(spec)
    if record is not None:
        return record
    if done.is_file():  # made with another spec: start again (a pretraining must not resume its checkpoint)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    record = {"pretrain": _pretrain, "embed": _embed, "lp": _downstream, "ft": _downstream, "lpft": _downstream,
              "zero_shot": _zero_shot}[spec["kind"]](spec, out)
    record.update(key=spec["key"], kind=spec["kind"], row=spec["row"], seconds=round(time.perf_counter() - t0, 1),
                  spec=spec_digest(spec))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    tmp.replace(done)  # written last: its presence means the cell finished
    return record


# -- the pieces ------------------------------------------------------------------------------------------
def _sites(spec: dict[str, Any]) -> dict[str, Any]:
    from ..sites.config import discover_sites

    return discover_sites(spec["sites_dir"], data_root=spec["data_root"])


def _pretrain(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..config import compose
    from ..train.local import run_pretrain

    cfg = compose("pretrain", [*spec["overrides"], f"out={out / 'run'}"])
    res = run_pretrain(cfg)
    hist = [h for h in res["history"] if h.get("position", 0) >= 0]
    return {"steps": int(sum(h.get("steps", 0) for h in hist)), "images": int(sum(h.get("images", 0) for h in hist)),
            "units": len(hist), "last_val_auc": next((h["val_auc"] for h in reversed(hist)
                                                       if h.get("val_auc") is not None), None),
            "val_curve": [h.get("val_auc") for h in hist], "checkpoint": res["checkpoint"]}


def load_encoder(spec: dict[str, Any]) -> tuple[torch.nn.Module, int, Any]:
    """The row's encoder (a finished run's, or untrained for the ``random`` row), its image size and
    the run as a ``Pretrained`` (None for random)."""
    from ..config import compose
    from ..methods import load_pretrained
    from ..models.factory import build_encoder

    if spec.get("checkpoint"):
        pre = load_pretrained(spec["checkpoint"])
        return pre.encoder, pre.image_size, pre
    cfg = compose("pretrain", spec["overrides"])
    torch.manual_seed(int(cfg.seed))
    return build_encoder(cfg, checkpoint=False).eval(), int(cfg.transforms.size), None


def _score(model: torch.nn.Module, spec: dict[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """``model`` (images → probabilities over the target's classes) on every evaluation site's test split."""
    from ..eval.predict import predict_site

    sites = _sites(spec)
    arrays = {}
    for name in spec["eval_sites"]:
        p = predict_site(model, sites[name], spec["classes"], split="test", image_size=image_size,
                         batch_size=int(spec["batch_size"]), progress=False, cache=bool(spec.get("cache")))
        arrays.update({f"{name}/probs": p.probs, f"{name}/targets": p.targets, f"{name}/mask": p.mask})
    return arrays


def cell_device(spec: dict[str, Any]) -> torch.device:
    """Where a downstream cell runs (``downstream.device``; ``auto``: the GPU when this process sees one)."""
    d = str(spec.get("device") or "auto")
    return torch.device("cuda" if d == "auto" and torch.cuda.is_available() else "cpu" if d == "auto" else d)


def _save(out: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = out / "pred.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out / "pred.npz")


def _embed(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..eval.predict import predict_site
    from ..models.classifiers import EmbeddingModel

    encoder, size, _ = load_encoder(spec)
    model = EmbeddingModel(encoder).eval().to(cell_device(spec))
    sites = _sites(spec)
    target = sites[spec["target"]]
    tr = predict_site(model, target, spec["classes"], split="train", image_size=size,
                      batch_size=int(spec["batch_size"]), progress=False, cache=bool(spec.get("cache")))
    arrays = {"train/x": tr.probs, "train/targets": tr.targets, "train/mask": tr.mask}
    for name in spec["eval_sites"]:
        te = predict_site(model, sites[name], spec["classes"], split="test", image_size=size,
                          batch_size=int(spec["batch_size"]), progress=False, cache=bool(spec.get("cache")))
        arrays.update({f"{name}/x": te.probs, f"{name}/targets": te.targets, f"{name}/mask": te.mask})
    _save(out, arrays)
    return {"n_train": len(tr.probs), "dim": int(tr.probs.shape[1])}


def _probe(spec: dict[str, Any], idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    from ..eval.transfer import fit_linear_probe, linear_probe_probs

    with np.load(Path(spec["embed_dir"]) / "pred.npz") as z:
        emb = {k: z[k] for k in z.files}
    w, b = fit_linear_probe(emb["train/x"][idx], emb["train/targets"][idx], emb["train/mask"][idx],
                            C=float(spec["C"]), max_iter=int(spec["max_iter"]))
    arrays = {}
    for name in spec["eval_sites"]:
        arrays.update({f"{name}/probs": linear_probe_probs(emb[f"{name}/x"], w, b),
                       f"{name}/targets": emb[f"{name}/targets"], f"{name}/mask": emb[f"{name}/mask"]})
    return arrays, w, b


def _downstream(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from ..eval.transfer import fine_tune_model, train_subset

    with np.load(Path(spec["embed_dir"]) / "pred.npz") as z:
        n_train = len(z["train/x"])
    idx = train_subset(n_train, float(spec["fraction"]), int(spec["seed"]), int(spec["min_images"]))
    steps = 0
    if spec["kind"] == "lp":
        arrays, _, _ = _probe(spec, idx)
    else:
        head = None
        if spec["kind"] == "lpft":
            _, w, b = _probe(spec, idx)
            head = {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}
        encoder, size, _ = load_encoder(spec)
        sites = _sites(spec)
        model, steps = fine_tune_model(encoder, sites[spec["target"]], image_size=size, indices=idx,
                                       seed=int(spec["seed"]), batch_size=int(spec["batch_size"]),
                                       epochs=int(spec["epochs"]), max_steps=spec.get("max_steps"),
                                       lr=float(spec["lr"]), head_lr=float(spec["head_lr"]), head_init=head,
                                       desc=spec["key"], cache=bool(spec.get("cache")),
                                       schedule=str(spec.get("schedule", "cosine")),
                                       min_steps=int(spec.get("min_steps") or 0), device=cell_device(spec),
                                       layer_decay=spec.get("layer_decay"), warmup=float(spec.get("warmup") or 0.0))
        arrays = _score(model, spec, size)
    _save(out, arrays)
    return {"n_train": int(len(idx)), "steps": int(steps), "fraction": spec["fraction"], "seed": spec["seed"]}


def _zero_shot(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    _, size, pre = load_encoder(spec)
    if pre is None or pre.zero_shot is None:
        raise ValueError(f"row '{spec['row']}' has no zero-shot classifier")
    _save(out, _score(pre.zero_shot_classifier(list(spec["classes"])), spec, size))
    return {"classes": len(spec["classes"])}
