"""The supervised fine-tuning loop that downstream classification and segmentation share.

A plain PyTorch loop: batches from a loader, ``loss_fn(model, batch)``, one optimiser step each, a
progress bar; a fixed number of epochs, optionally capped in steps per epoch and in total, and an
optional cosine decay of every learning rate to zero over those steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .device import device_of, to_device


def fit_supervised(model: nn.Module, loader: Iterable, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                   optimizer: torch.optim.Optimizer, *, epochs: int = 1, max_steps_per_epoch: int | None = None,
                   max_steps: int | None = None, desc: str = "fine-tune",
                   progress: bool = True, schedule: str = "constant", warmup: float = 0.0) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` passes over ``loader`` (fully quarantined batches are skipped).

    ``schedule``: ``constant`` keeps the optimiser's learning rates; ``cosine`` decays each of them to 0
    over the run's steps, after ``warmup`` (a fraction of the steps) of linear warm-up (default none: the
    encoder starts from trained weights; a ViT fine-tuned at a high rate wants some).
    Returns one record per step: ``{"epoch", "step", "loss"}``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"fine-tuning schedule must be constant or cosine, got '{schedule}'")
    device = device_of(model)
    per_epoch = len(loader) if max_steps_per_epoch is None else min(len(loader), int(max_steps_per_epoch))
    total = int(epochs) * per_epoch if max_steps is None else min(int(epochs) * per_epoch, int(max_steps))
    history: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, disable=not progress)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    warm = int(round(float(warmup) * total)) if schedule == "cosine" else 0
    for epoch in range(int(epochs)):
        model.train()
        for step, batch in enumerate(loader):
            if step >= per_epoch or len(history) >= total:
                break
            if batch is None:
                continue
            if schedule == "cosine":
                i = len(history)
                cosine = 0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(total - warm, 1)))
                scale = (i + 1) / warm if i < warm else cosine
                for g, lr in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = lr * scale
            loss = loss_fn(model, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"epoch": epoch, "step": len(history), "loss": float(loss.detach())})
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]['loss']:.4f}")
        if len(history) >= total:
            break
    bar.close()
    return history
