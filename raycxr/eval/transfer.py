"""Transfer of a pretrained encoder to a target site: linear probe and fine-tuning, the pieces that
``raycxr eval`` and ``raycxr study`` both use.

- :func:`train_subset`: the seeded fraction of a site's training images a run may use;
- :func:`fit_linear_probe`: logistic regression per class on frozen, standardised embeddings, returned
  as weights on the raw embeddings (so they also initialise a fine-tuning head: LP-FT);
- :func:`fine_tune_model`: the encoder plus a new linear head over the site's classes, trained on the
  subset with the shared supervised loop, returned as images → probabilities;
- :func:`prior_bias`: the head's starting bias, each class's log-odds on the subset.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..dataset import collate_skip_none, site_dataset
from ..engine.supervised import fit_supervised
from ..losses import masked_bce_with_logits
from ..models.classifiers import Probabilities
from ..models.factory import LinearClassifier
from ..sites.config import SiteConfig


def train_subset(n: int, fraction: float, seed: int, min_images: int = 8) -> np.ndarray:
    """Sorted indices of ``ceil(fraction · n)`` (at least ``min_images``) of ``n`` training items, seeded."""
    k = min(n, max(int(min_images), math.ceil(float(fraction) * n)))
    return np.sort(np.random.default_rng(int(seed)).permutation(n)[:k])


def fit_linear_probe(x: np.ndarray, targets: np.ndarray, mask: np.ndarray, *, C: float = 0.5,
                     max_iter: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Per-class logistic regression on standardised embeddings ``x`` (N, D); returns ``(w (C, D), b (C,))``
    on the raw embeddings. A class with fewer than 2 annotated positives or negatives keeps w = 0,
    b = 0 (probability 0.5 everywhere, so its AUC shows it was not fit)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    c = targets.shape[1]
    w, b = np.zeros((c, x.shape[1]), np.float32), np.zeros(c, np.float32)
    for j in range(c):
        rows = mask[:, j] > 0
        y = targets[rows, j] > 0.5
        if y.sum() < 2 or (~y).sum() < 2:
            continue
        clf = LogisticRegression(C=float(C), max_iter=int(max_iter)).fit(z[rows], y)
        # fold the standardisation into the weights so they apply to raw embeddings
        w[j] = clf.coef_[0] / sd
        b[j] = clf.intercept_[0] - float((clf.coef_[0] * mu / sd).sum())
    return w, b


def linear_probe_probs(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Probabilities ``σ(x wᵀ + b)`` of a fitted probe, (N, C)."""
    return (1.0 / (1.0 + np.exp(-(np.asarray(x, np.float64) @ w.T.astype(np.float64) + b)))).astype(np.float32)


def prior_bias(labels: np.ndarray, mask: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """(C,) log-odds of each class's positive rate among its annotated rows (0 where none), clipped to
    [eps, 1 - eps]: a new head that starts there predicts the prior, so its first steps learn to tell
    images apart instead of pushing every score towards the majority label (which, in a few steps,
    scores images with larger activations lower: AUCs below 0.5)."""
    n = mask.sum(0)
    rate = np.where(n > 0, (labels * mask).sum(0) / np.maximum(n, 1), 0.5).clip(eps, 1 - eps)
    return np.log(rate / (1 - rate)).astype(np.float32)


def encoder_groups(encoder: nn.Module, lr: float, layer_decay: float | None = None) -> list[dict]:
    """The encoder's optimiser groups: one at ``lr``, or with ``layer_decay`` one per depth of its timm backbone
    (``timm.optim.param_groups_layer_decay``'s scales applied to ``lr``; the token MLP after it at ``lr``)."""
    if layer_decay is None:
        return [{"params": list(encoder.parameters()), "lr": lr}]
    from timm.optim import param_groups_layer_decay

    backbone = getattr(encoder, "backbone", None)
    if backbone is None or not hasattr(backbone, "group_matcher"):
        raise ValueError("layer_decay needs a timm backbone that names its layers (a ViT); got "
                         f"{type(encoder).__name__}")
    groups = param_groups_layer_decay(backbone, weight_decay=0.01, layer_decay=float(layer_decay))
    out = [{"params": g["params"], "lr": lr * float(g.get("lr_scale", 1.0)), "weight_decay": g["weight_decay"]}
           for g in groups]
    inside = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in encoder.parameters() if id(p) not in inside]
    return out + ([{"params": rest, "lr": lr}] if rest else [])


def fine_tune_model(encoder: nn.Module, site: SiteConfig, *, image_size: int, indices: np.ndarray | None = None,
                    seed: int = 0, batch_size: int = 32, epochs: int = 2, max_steps: int | None = None,
                    min_steps: int = 0, lr: float = 1e-4, head_lr: float = 1e-3, head_init: dict | None = None,
                    desc: str | None = None, cache: bool = False, schedule: str = "cosine",
                    device: torch.device | str | None = None, layer_decay: float | None = None,
                    warmup: float = 0.0) -> tuple[nn.Module, int]:
    """Fine-tune a copy of ``encoder`` with a new linear head over the site's own classes on its training
    images (``indices`` of the train split, default all; ``cache``: read through the site's decode
    cache; ``schedule``: the learning rates decay on a cosine to 0, or stay ``constant``). The run is
    ``epochs`` passes over the subset, extended to at least ``min_steps`` optimiser steps (a 1 % subset
    is one batch per epoch) and cut at ``max_steps``. A new head starts at the classes' priors
    (:func:`prior_bias`); ``head_init`` (LP-FT) replaces it. Returns the model as images → probabilities
    and the number of optimiser steps. ``device``: where it trains (default: the CPU). ``layer_decay``
    (ViT-family backbones): each block trains at ``layer_decay`` times the rate of the block above it, the
    embedding lowest (the BEiT / MAE fine-tuning recipe); ``warmup``: a fraction of the steps of linear warm-up."""
    train_ds = site_dataset(site, {"size": int(image_size), "cache": bool(cache)}, split="train", train=True,
                            seed=int(seed), use_labels=True)
    idx = np.arange(len(train_ds)) if indices is None else np.asarray(indices)
    torch.manual_seed(int(seed))
    model = LinearClassifier(copy.deepcopy(encoder), len(train_ds.manifest.label_names))
    if head_init is not None:
        model.head.load_state_dict(head_init)
    else:
        with torch.no_grad():
            model.head.bias.copy_(torch.from_numpy(prior_bias(train_ds.labels[idx], train_ds.label_mask[idx])))
    if device is not None:
        model.to(device)  # before the optimiser is built, so its state lives there too
    opt = torch.optim.AdamW([*encoder_groups(model.encoder, float(lr), layer_decay),
                             {"params": model.head.parameters(), "lr": float(head_lr)}], weight_decay=0.01)
    dl = DataLoader(Subset(train_ds, idx.tolist()), batch_size=int(batch_size), shuffle=True,
                    collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(int(seed)))

    def bce(m: nn.Module, b: dict) -> torch.Tensor:
        return masked_bce_with_logits(m(b["image"]), b["labels"], b["label_mask"])

    per_epoch = max(1, len(dl))
    n_epochs = max(int(epochs), math.ceil(int(min_steps) / per_epoch))
    total = max(int(epochs) * per_epoch, int(min_steps))
    total = total if max_steps is None else min(total, int(max_steps))
    history = fit_supervised(model, dl, bce, opt, epochs=n_epochs, max_steps=total,
                             desc=desc or f"fine-tune {site.name}", progress=False, schedule=schedule, warmup=warmup)
    return Probabilities(model).eval(), len(history)
