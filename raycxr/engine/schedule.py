"""The optimiser and its schedule: AdamW without decay on 1-D parameters (:func:`adamw`), the per-step
learning-rate schedule (:class:`LRSchedule`, :func:`attach_schedule`) and the step budgets that fit a
number of optimiser steps to loaders of a given length (:func:`fit_budget`, :func:`epoch_budget`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


class LRSchedule:
    """A per-step learning-rate schedule on an optimiser: linear warm-up, then cosine to ``min_lr`` (or
    constant), stepped by an optimiser post-hook so the loops stay unchanged.

    Args:
        optimizer: the optimiser (its groups' current ``lr`` are the peak rates).
        total_steps: the optimiser steps the schedule spans.
        kind: ``cosine`` or ``constant`` (after the warm-up).
        warmup: warm-up steps; a value below 1 is a fraction of ``total_steps``.
        min_lr: where the cosine ends.
        step: steps already taken (a resumed run continues the curve).
    """

    def __init__(self, optimizer: Any, total_steps: int, *, kind: str = "cosine", warmup: float = 0.05,
                 min_lr: float = 1e-6, step: int = 0) -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"schedule.kind must be cosine or constant, got '{kind}'")
        inner = getattr(optimizer, "optimizer", optimizer)  # through GradAllReduce / DDP wrappers
        self.groups = inner.param_groups
        self.base = [g.get("initial_lr", g["lr"]) for g in self.groups]
        for g, b in zip(self.groups, self.base):
            g["initial_lr"] = b
        self.total = max(1, int(total_steps))
        self.warm = int(round(warmup * self.total)) if 0 < warmup < 1 else int(warmup)
        self.kind, self.min_lr, self.step = kind, float(min_lr), int(step)
        self._apply()
        inner.register_step_post_hook(lambda *_: self._advance())

    def lr(self, step: int, base: float) -> float:
        if self.warm and step < self.warm:
            return base * (step + 1) / self.warm
        if self.kind == "constant":
            return base
        t = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        for g, b in zip(self.groups, self.base):
            g["lr"] = self.lr(self.step, b)

    def _advance(self) -> None:
        self.step += 1
        self._apply()


def batches_per_pass(n_images: int, batch_size: int) -> int:
    """Optimiser steps of one shuffled pass over ``n_images`` (the loaders drop the last partial batch)."""
    return max(1, int(n_images) // max(int(batch_size), 1))


def smallest_cap(steps: int, passes: int, per_pass: list[int]) -> int:
    """The smallest ``max_steps_per_epoch`` with which ``passes`` rounds over loaders of ``per_pass`` steps
    each reach ``steps`` (their full length when they cannot)."""
    for cap in range(1, max(per_pass) + 1):
        if passes * sum(min(p, cap) for p in per_pass) >= steps:
            return cap
    return max(per_pass)


def fit_budget(cfg: DictConfig, steps: int, per_pass: list[int]) -> tuple[int, int]:
    """Rounds over loaders of ``per_pass`` steps each (every one at most ``max_steps_per_epoch``): as many
    rounds as ``steps`` needs, and the ``max_steps_per_epoch`` that then makes them add up to it rather
    than overshoot by most of a round. Returns (rounds, cap)."""
    cap = cfg.get("max_steps_per_epoch")
    per_pass = [min(p, int(cap)) for p in per_pass] if cap else list(per_pass)
    rounds = max(1, math.ceil(int(steps) / sum(per_pass)))
    return rounds, smallest_cap(steps, rounds, per_pass)


def epoch_budget(method: type, cfg: DictConfig, steps: int, per_pass: int, n_sites: int) -> list[str]:
    """Units of one pass of ``per_pass`` steps each, fitted to ``steps`` (:func:`fit_budget`)."""
    units, cap = fit_budget(cfg, steps, [per_pass])
    return [*method.budget_overrides(cfg, units, n_sites), f"max_steps_per_epoch={cap}"]


def steps_per_unit(loader: Any, cfg: DictConfig) -> int:
    """Optimiser steps one pass over ``loader`` takes under ``max_steps_per_epoch``."""
    cap = cfg.get("max_steps_per_epoch")
    return min(len(loader), int(cap)) if cap else len(loader)


def attach_schedule(optimizer: Any, cfg: DictConfig, total_steps: int, step: int = 0) -> LRSchedule | None:
    """The run's ``schedule`` section on ``optimizer`` (None: ``kind: none``, a constant rate)."""
    s = cfg.schedule
    if s.kind == "none":
        return None
    return LRSchedule(optimizer, total_steps, kind=s.kind, warmup=float(s.warmup), min_lr=float(s.min_lr), step=step)


def set_epoch(loader: Any, epoch: int) -> None:
    """Seed a loader's order by the schedule position, so a resumed run sees the data in the order an
    uninterrupted run would (the local loaders and the site-actor streams both offer ``set_epoch``)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(int(epoch))


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and other 1-D parameters (references U.6)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)
