"""Where a run's tensors live and how they are computed: the device, mixed precision, channels-last and
``torch.compile`` (:func:`place`), batches copied to the device (:func:`to_device`, :func:`limited`) and
the autocast the training loops enter (:func:`autocast`). Shared by the methods, the supervised
fine-tuning loop and evaluation; it imports nothing above the data plane.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

from ..transforms import augment_batch


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
    """At most ``max_steps`` batches of ``loader`` (on ``device``); fully quarantined batches are skipped.
    A loader with an ``augment`` (:class:`~raycxr.transforms.BatchAugment`, ``transforms.augment=device``)
    has its batches augmented here, on the device, after the copy (:func:`~raycxr.transforms.augment_batch`)."""
    augment = getattr(loader, "augment", None)
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            return
        if batch is not None:
            yield augment_batch(batch if device is None else to_device(batch, device), augment)


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


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict: ``state_dict()`` tensors are the live weights, which keep training."""
    return {k: v.detach().clone() for k, v in state.items()}
