"""Validation during pretraining: mean AUC on the val split of the training sites after every unit.

The number drives the choice of the conquer checkpoint that divide starts from (UniChest) and the
Ray Tune sweep's early stopping. The classifier scored is the method's own
(:meth:`~raycxr.methods.base.Method.current_classifier`), the module a saved run becomes through
:func:`raycxr.methods.load_pretrained`, so the val AUC of a unit is the AUC its checkpoint will have.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def validation_auc(classifier: nn.Module, class_names: list[str], batches: Iterable, union_names: list[str],
             min_positives: int = 1) -> dict:
    """Mean AUC (classes with at least ``min_positives`` positives and negatives among annotated val
    images; ``None`` when no class has) and the image count.

    ``batches`` carry ``targets``/``target_mask`` in ``union_names`` order; they are matched to the
    classifier's ``class_names`` by name (a class the val data does not have stays unscored)."""
    from .metrics import classification_metrics

    device = next(classifier.parameters()).device
    classifier.eval()  # the loops put the model back in train mode at the start of every unit
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
    res = classification_metrics(np.concatenate(probs), np.concatenate(targets), np.concatenate(mask), class_names,
                                 min_positives=min_positives)
    auc = res["mean"]["auc"]
    return {"val_auc": None if auc is None or not np.isfinite(auc) else round(float(auc), 5),
            "val_images": int(sum(len(p) for p in probs))}
