"""What a pretraining method is, for the schedule driver, evaluation and export.

A method is one class, registered by name (:func:`raycxr.methods.register_method`), that owns:

- building its model(s) from the config and restoring them from a :class:`~raycxr.checkpoint.Checkpoint`
  (:meth:`Method.setup`);
- its schedule as a list of :class:`Unit` (UniChest: conquer then divide epochs; Ark: one site-epoch
  per site per round; baselines: epochs), each trained by :meth:`Method.run_unit`;
- the fields it adds to a checkpoint (:meth:`Method.modules`, :meth:`Method.optimizer_state`,
  :meth:`Method.meta`) and what it does between units (:meth:`Method.end_unit`);
- the classifier it is now (:meth:`Method.current_classifier`, scored for ``val_auc``) and what a
  finished run becomes (:meth:`Method.pretrained`): the classifier evaluation, export and the
  runtime use, plus any extra evaluation it offers (zero-shot, attention maps).

The driver (:func:`raycxr.train.driver.run_schedule`) owns everything else: positions, the progress
bar, metrics, validation, checkpoint files and resume. The data plane (local datasets or site
actors) is passed in, so the same method runs in one process, in Ray Train workers and in Tune trials.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import Checkpoint
from ..models.classifiers import EmbeddingModel
from ..models.encoders import ImageEncoder
from ..sites.config import SiteConfig


@dataclass(frozen=True)
class Unit:
    """One unit of a schedule: what one call of :meth:`Method.run_unit` trains.

    ``fields`` go into the unit's metrics record (e.g. ``{"stage": "conquer", "epoch": 0}`` or
    ``{"round": 1, "site": "nih"}``); ``stage`` groups units that share an optimiser."""

    stage: str
    fields: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of a pretraining method (subclass it and decorate with ``@register_method``).

    Args:
        cfg: the pretraining config (``configs/pretrain.yaml`` with overrides); the method's own
            section is ``cfg[<name>]`` (or ``cfg[config_key]``).
        sites: the run's sites by name, in registration order.
        data: the data plane: ``union``, ``label_names``, ``union_loader()``, ``site_loaders()``,
            ``site_classes()``, ``probe()``, ``val_batches()``, ``distribute(optimizer)``,
            ``site_heads()``, ``hand_back_heads()``, ``take_wait()`` (seconds waited for training batches,
            logged per unit) (:class:`raycxr.train.local.LocalData` or the Ray runner's site-actor plane).
    """

    name: ClassVar[str] = ""
    config_key: ClassVar[str | None] = None  # the config section; default: the name
    # site objectives the method can train (``objective:`` in a site YAML); others are refused
    objectives: ClassVar[tuple[str, ...]] = ("supervised",)
    unit_name: ClassVar[str] = "epoch"  # progress-bar unit
    offers_zero_shot: ClassVar[bool] = False  # a finished run scores any class name (``Pretrained.zero_shot``)

    def __init__(self, cfg: DictConfig, sites: dict[str, SiteConfig], data: Any) -> None:
        self.cfg, self.sites, self.data = cfg, sites, data
        self.optimizer: Any = None
        self.lr_schedule: LRSchedule | None = None  # attach_schedule(): its step count is checkpointed
        self.run: Any = None  # the run folder (set by the driver): stage snapshots go there
        bad = {n: s.objective for n, s in sites.items() if s.objective not in self.objectives}
        if bad:
            raise ValueError(f"method '{self.name}' cannot train site objective(s) {bad}: it supports "
                             f"{list(self.objectives)} (set the site's `objective:` or use another method)")

    @property
    def section(self) -> DictConfig:
        return self.cfg[self.config_key or self.name]

    # -- training: the driver calls these ----------------------------------------------------------
    def setup(self, resume: Checkpoint | None) -> int:
        """Build the models (restoring them from ``resume``); return the first schedule position to train."""
        raise NotImplementedError

    def units(self) -> list[Unit]:
        """The whole schedule (positions index into it)."""
        raise NotImplementedError

    def use_optimizer(self, optimizer: Any, total_steps: int, resume: Checkpoint | None,
                      restore: bool = True) -> bool:
        """Make ``optimizer`` the run's: distributed over the data plane (gradient sync under Ray), its state
        restored from ``resume`` when ``restore`` says the saved state fits (same parameters, same stage),
        and the run's ``schedule`` over ``total_steps`` steps, continued from the saved step. Returns
        whether the state was restored."""
        self.optimizer = self.data.distribute(optimizer)
        same = resume is not None and bool(resume.optimizer) and bool(restore)
        if same:
            self.optimizer.load_state_dict(resume.optimizer)
        self.lr_schedule = attach_schedule(self.optimizer, self.cfg, int(total_steps),
                                           int(resume.meta.get("lr_step") or 0) if same else 0)
        return same

    def start_unit(self, unit: Unit, position: int) -> None:
        """Before a unit: switch stage, build the stage's optimiser... (default: nothing)."""

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        """Train one unit; return its mean loss terms (``loss`` at least) plus ``steps`` and ``images``."""
        raise NotImplementedError

    def probe(self, unit: Unit | None) -> dict[str, Any]:
        """Deterministic figures on a fixed probe batch (``unit`` None: before training); default none."""
        return {}

    def current_classifier(self) -> tuple[nn.Module, list[str]] | None:
        """The model as it is now, as images → probabilities, and its class names (None: nothing to score)."""
        return None

    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint stores, by name; ``"model"`` holds the encoder as ``model.encoder``."""
        raise NotImplementedError

    def module_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State dicts of :meth:`modules` (a method that keeps frozen parts overrides it to leave them out)."""
        return {k: m.state_dict() for k, m in self.modules().items()}

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict() if self.optimizer is not None else None

    def meta(self) -> dict[str, Any]:
        """The method's own checkpoint fields (small and JSON-like)."""
        return {}

    def after_unit(self, unit: Unit, position: int, record: dict) -> None:
        """After a unit is trained and scored, before its checkpoint is made: update what the checkpoint
        records (e.g. the best val AUC so far). Default: nothing."""

    def end_unit(self, unit: Unit, position: int, record: dict, checkpoint: Checkpoint, run: Any) -> None:
        """After the unit's checkpoint is saved (so a crash here loses nothing): stage snapshots, heads
        handed back to the site actors... Default: nothing."""

    def checkpoint(self, position: int, history: list[dict], val_auc: float | None) -> Checkpoint:
        return Checkpoint(method=self.name, config=OmegaConf.to_container(self.cfg, resolve=True), position=position,
                          modules=self.module_state(), optimizer=self.optimizer_state(),
                          meta={"site_names": list(self.sites), **self.meta(),
                                "lr_step": self.lr_schedule.step if self.lr_schedule is not None else None},
                          history=list(history),
                          val_auc=val_auc)

    # -- a study's budget --------------------------------------------------------------------------
    @classmethod
    def budget_overrides(cls, cfg: DictConfig, units: int, n_sites: int) -> list[str]:
        """Config overrides that give this method ``units`` schedule units of at most
        ``max_steps_per_epoch`` steps each, on ``n_sites`` sites: how ``raycxr study`` puts every row on
        the same budget of optimiser steps × batch. Default: ``<section>.epochs=units``."""
        return [f"{cls.config_key or cls.name}.epochs={int(units)}"]

    @classmethod
    def step_budget(cls, cfg: DictConfig, steps: int, train_sizes: dict[str, int]) -> list[str]:
        """Config overrides that give this method ``steps`` optimiser steps (or the fewest above) on sites
        whose training splits hold ``train_sizes`` images: how ``raycxr study`` puts every row on the same
        budget, whatever the sites' sizes. Default: epochs over the sites' pooled images, one batch of
        ``batch_size`` a step (:meth:`budget_overrides` turns them into the method's units)."""
        return epoch_budget(cls, cfg, steps, batches_per_pass(sum(train_sizes.values()), int(cfg.batch_size)),
                            len(train_sizes))

    # -- a finished run ----------------------------------------------------------------------------
    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        """The run as a :class:`Pretrained` (classifier, encoder, class names)."""
        raise NotImplementedError


@dataclass
class Pretrained:
    """What a run produced, ready to use. ``classifier(x)`` returns probabilities over ``class_names``.

    ``zero_shot`` (a method that can score any class name or prompt) and ``attention`` (a method
    with attention maps over the image) are ``None`` when the method has no such evaluation."""

    method: str
    classifier: nn.Module | None  # None: the method trains an encoder only (label-free pretraining)
    encoder: ImageEncoder
    class_names: list[str]
    image_size: int
    sites: list[str]
    config: dict
    source: str
    site_labels: dict[str, list[str]] = field(default_factory=dict)
    zero_shot: Callable[[list[str]], nn.Module] | None = None
    attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_model(self) -> EmbeddingModel:
        return EmbeddingModel(self.encoder).eval()

    @property
    def encoder_name(self) -> str:
        return str(self.config["encoder"]["name"])

    def zero_shot_classifier(self, names: list[str]) -> nn.Module:
        """The run on any class names or prompts (a method that supports zero-shot)."""
        if self.zero_shot is None:
            raise ValueError("zero-shot needs a method that scores class names (UniChest); "
                             f"this run is '{self.method}'")
        return self.zero_shot(list(names)).eval()


# -- pieces the method loops share -------------------------------------------------------------------
@dataclass
class LossLog:
    """Running sums of named loss terms; ``means()`` for the unit's summary."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n: int = 0
    steps: list[float] = field(default_factory=list)
    images: int = 0

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in terms.items():
            self.sums[k] += float(v)
        self.n += 1
        self.images += batch_size
        self.steps.append(float(terms["loss"]))

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()} | {"steps": self.n, "images": self.images}


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a collated batch on ``device`` (lists such as image ids stay as they are). To a GPU the
    tensors go through pinned memory, so the copy is asynchronous (``non_blocking``) and overlaps the
    work already queued on the device."""
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin and v.device.type == "cpu" and not v.is_pinned() else v)
            .to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(model: nn.Module) -> torch.autocast:
    """Mixed precision as the runner set it on the model (``model.amp_dtype``, e.g. bf16 on GPU);
    off when unset. bf16 keeps fp32's range, so no gradient scaler is needed."""
    dtype = getattr(model, "amp_dtype", None)
    return torch.autocast(device_type=device_of(model).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def limited(loader: Iterable, max_steps: int | None, device: torch.device | None = None) -> Iterable:
    """At most ``max_steps`` batches of ``loader`` (on ``device``); fully quarantined batches are skipped."""
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            return
        if batch is not None:
            yield batch if device is None else to_device(batch, device)


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
    s = cfg.get("schedule") or {}
    if s.get("kind", "none") == "none":
        return None
    return LRSchedule(optimizer, total_steps, kind=s.kind, warmup=float(s.warmup), min_lr=float(s.min_lr), step=step)


def set_epoch(loader: Any, epoch: int) -> None:
    """Seed a loader's order by the schedule position, so a resumed run sees the data in the order an
    uninterrupted run would (the local loaders and the site-actor streams both offer ``set_epoch``)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(int(epoch))


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and other 1-D parameters (REFERENCE U.6)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def resolve_device(cfg: DictConfig) -> torch.device:
    """``device: auto`` is the GPU when there is one (a Ray Train worker sets its own), else the CPU."""
    d = str(cfg.get("device") or "auto")
    return torch.device("cuda" if d == "auto" and torch.cuda.is_available() else "cpu" if d == "auto" else d)


def place(cfg: DictConfig, *modules: nn.Module | None) -> torch.device:
    """Move the run's modules to its device and set their mixed precision (``model.amp_dtype``, read by
    the loops): ``precision: auto`` is bf16 autocast on a GPU and fp32 on the CPU. ``channels_last: auto``
    puts the weights in NHWC on a GPU; ``compile: default`` (or another ``torch.compile`` mode) compiles each
    module's encoder in place."""
    device = resolve_device(cfg)
    precision = str(cfg.get("precision") or "auto")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got '{precision}'")
    amp = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
    cl = str(cfg.get("channels_last") or "auto").lower()
    channels_last = cl == "true" or (cl == "auto" and device.type == "cuda")
    compile_mode = str(cfg.get("compile") or "off").lower()
    for m in modules:
        if m is not None:
            # channels_last: the layout cuDNN's convolutions and tensor cores run fastest in (NHWC)
            if channels_last:
                m.to(device, memory_format=torch.channels_last)
            else:
                m.to(device)
            m.amp_dtype = amp
            if compile_mode not in ("off", "false"):
                # in place (nn.Module.compile), on the encoder the loops call, so the model's own methods
                # stay reachable; a deep copy made later (Ark's teacher) is not compiled
                getattr(m, "encoder", m).compile(mode=None if compile_mode in ("true", "default") else compile_mode)
    return device


def check_resume(ckpt: Checkpoint, method: str) -> None:
    if ckpt.method != method:
        raise ValueError(f"cannot resume a '{ckpt.method}' checkpoint ({ckpt.source}) as '{method}'")


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict: ``state_dict()`` tensors are the live weights, which keep training."""
    return {k: v.detach().clone() for k, v in state.items()}
