"""Validation during pretraining: mean AUC on the val split of the training sites after every epoch.

The number drives the choice of the conquer checkpoint that divide starts from (UniChest) and the
Ray Tune sweep's early stopping. The classifier scored here is the one :mod:`raycxr.models.pretrained`
builds from a saved run, so the val AUC of an epoch is the AUC its checkpoint will have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..labels import UnionLabelSpace
from ..models.ark import ArkModel
from ..models.pretrained import HeadsClassifier, UniChestClassifier
from ..models.unichest import UniChest


def epoch_classifier(model: nn.Module, *, text: nn.Module | None = None, class_names: list[str] | None = None,
                     label_names: dict[str, list[str]] | None = None) -> tuple[Callable, list[str]]:
    """The model being trained as images → probabilities, and the class names of its output."""
    if isinstance(model, UniChest):
        with torch.no_grad():
            emb = text(list(class_names))
        return UniChestClassifier(model, emb, model.stage), list(class_names)
    if isinstance(model, ArkModel):
        labels = {s: list(label_names[s]) for s in model.heads if s in label_names}
        union = UnionLabelSpace.build(labels)
        device = next(model.parameters()).device
        return HeadsClassifier(model, labels, union).to(device), union.names
    return nn.Sequential(model, nn.Sigmoid()), list(class_names)  # union-head baselines return logits


@torch.no_grad()
def validate(classifier: nn.Module, class_names: list[str], batches: Iterable, union_names: list[str]) -> dict:
    """Mean AUC (classes with positives and negatives among annotated val images) and the image count.

    ``batches`` carry ``targets``/``target_mask`` in ``union_names`` order; they are matched to the
    classifier's ``class_names`` by name (a class the val data does not have stays unscored)."""
    from ..eval.metrics import classification_metrics

    device = next(classifier.parameters()).device
    classifier.eval()  # the loops put the model back in train mode at the start of every epoch
    col = {n: i for i, n in enumerate(union_names)}
    take = np.array([col.get(n, -1) for n in class_names])
    probs, targets, mask = [], [], []
    for batch in batches:
        if batch is None:
            continue
        probs.append(classifier(batch["image"].to(device)).float().cpu().numpy())
        t, m = batch["targets"].numpy(), batch["target_mask"].numpy()
        targets.append(np.where(take >= 0, t[:, np.maximum(take, 0)], 0.0))
        mask.append(np.where(take >= 0, m[:, np.maximum(take, 0)], 0.0))
    classifier.train()
    if not probs:
        return {"val_auc": None, "val_images": 0}
    res = classification_metrics(np.concatenate(probs), np.concatenate(targets), np.concatenate(mask), class_names)
    auc = res["mean"]["auc"]
    return {"val_auc": None if auc is None or not np.isfinite(auc) else round(float(auc), 5),
            "val_images": int(sum(len(p) for p in probs))}
