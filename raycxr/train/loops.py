"""Plain PyTorch training loops for Ark, UniChest and the baselines.

Each function trains for one unit of the method's schedule (one site-epoch for Ark, one epoch for
UniChest) and returns the mean loss terms, so a caller (the local runner here, the Ray Train
coordinator later) owns the schedule, checkpoints and logging. Nothing here knows about Ray.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..losses import (
    ark_consistency_loss,
    asymmetric_loss,
    ema_update,
    image_text_contrastive_loss,
    masked_bce_with_logits,
    source_contrastive_loss,
)
from ..transforms import cross_site_fourier_mix


@dataclass
class LossLog:
    """Running sums of named loss terms; ``means()`` for the epoch summary, ``steps`` per step."""

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
    """Tensors of a collated batch on ``device`` (lists such as image ids stay as they are)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(model: nn.Module) -> torch.autocast:
    """Mixed precision as the runner set it on the model (``model.amp_dtype``, e.g. bf16 on GPU);
    off when unset. bf16 keeps fp32's range, so no gradient scaler is needed."""
    dtype = getattr(model, "amp_dtype", None)
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def _limited(loader: Iterable, max_steps: int | None, device: torch.device | None = None) -> Iterable:
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            return
        if batch is not None:  # every sample of the batch was quarantined
            yield batch if device is None else to_device(batch, device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- Ark ------------------------------------------------------------------------------------------
def ark_site_epoch(student: nn.Module, teacher: nn.Module, site: str, loader: Iterable,
                   optimizer: torch.optim.Optimizer, *, consistency_weight: float, momentum: float,
                   ema_mode: str = "epoch", max_steps: int | None = None, on_step: Callable[[dict], None] | None = None,
                   text_encoder: nn.Module | None = None) -> dict[str, float]:
    """One Ark task-epoch on one site (REFERENCE A.2–A.4).

    ``loss = (1-c)·BCE(student_head(v1), y) + c·MSE(student_proj(v1), teacher_proj(v2))`` with missing
    labels masked; the teacher is updated by EMA at the end of the epoch (``ema_mode='epoch'``, Ark's
    default) or after every step (``'iteration'``). The teacher sees ``image2`` (a clean view, as Ark+
    does) and the student the augmented ``image``. A site trained without labels uses its objective
    (``student.objectives[site]``) in place of the BCE term; then ``image2`` is a second augmented view.
    """
    student.train()
    log = LossLog()
    c = consistency_weight
    objective = student.objectives[site] if site in student.objectives else None
    for batch in _limited(loader, max_steps, _device(student)):
        with autocast(student):
            view2 = batch.get("image2", batch["image"])
            with torch.no_grad():
                proj_t = teacher.project(view2)
            if objective is None:
                proj_s, logits = student(batch["image"], site)
                sup = masked_bce_with_logits(logits.float(), batch["labels"], batch["label_mask"])
            else:
                proj_s = student.project(batch["image"])
                kw = {}
                if "features2" in objective.needs:
                    kw["features2"] = student.project(view2)
                if "key_features" in objective.needs:
                    kw["key_features"] = proj_t  # the EMA teacher is MoCo's momentum encoder
                if "text_emb" in objective.needs:
                    if text_encoder is None:
                        raise ValueError(f"site '{site}' uses a report objective but no text encoder was given")
                    kw["text_emb"] = text_encoder([r or "" for r in batch["report"]])
                sup, _ = objective(proj_s, batch, **kw)
            cons = ark_consistency_loss(proj_s.float(), proj_t.float())
            loss = (1 - c) * sup.float() + c * cons
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema_mode == "iteration":
            ema_update(teacher, student, momentum)
        terms = {"loss": loss.detach(), "supervised": sup.detach(), "consistency": cons.detach()}
        log.add(terms, len(batch["image"]))
        if on_step:
            on_step(terms)
    if ema_mode == "epoch":
        ema_update(teacher, student, momentum)
    return log.means()


def concurrent_multitask_epoch(model: nn.Module, loaders: dict[str, Iterable], optimizer: torch.optim.Optimizer, *,
                               max_steps: int | None = None) -> dict[str, float]:
    """The baseline Ark argues against: every step takes one batch from every site and sums the
    sites' head losses (no teacher, no cycling). Stops when the shortest site runs out."""
    model.train()
    log = LossLog()
    iters = {s: iter(_limited(dl, max_steps, _device(model))) for s, dl in loaders.items()}
    while True:
        batches = {}
        for s, it in iters.items():
            b = next(it, None)
            if b is None:
                return log.means()
            batches[s] = b
        with autocast(model):
            loss = sum(masked_bce_with_logits(model(b["image"], s)[1].float(), b["labels"], b["label_mask"])
                       for s, b in batches.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add({"loss": loss.detach()}, sum(len(b["image"]) for b in batches.values()))


def supervised_union_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                           max_steps: int | None = None) -> dict[str, float]:
    """Naive multi-source mixing ("KAD-multi"): one head over the union label space, missing masked.
    ``model(images)`` returns logits over the union classes."""
    model.train()
    log = LossLog()
    for batch in _limited(loader, max_steps, _device(model)):
        with autocast(model):
            loss = masked_bce_with_logits(model(batch["image"]).float(), batch["targets"], batch["target_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add({"loss": loss.detach()}, len(batch["image"]))
    return log.means()


# -- UniChest ---------------------------------------------------------------------------------------
@dataclass
class UniChestLossConfig:
    """Loss settings; defaults are the authors' (REFERENCE U.4)."""

    gamma_neg: float = 6.0
    gamma_pos: float = 0.0
    clip: float = 0.05
    asl_reduction: str = "sum"
    detach_focal: bool = True  # authors: focal weight without gradient; False = the ASL paper's gradient
    itc_temperature: float | None = None  # None: the coded fixed scale ln(1/0.07)
    itc_normalize: bool = False
    itc_weight: float = 1.0
    scl_temperature: float = 1.0
    scl_weight: float = 1.0  # moe_ratio in divide (0 in conquer)
    text_branch: bool = True  # ASL (and SCL) on the text entity features too, as coded
    fourier_p: float = 0.5


def batch_texts(batch: dict, class_names: Sequence[str]) -> list[str]:
    """UniChest text per sample: report entities, or the positive class names joined by [SEP]."""
    from ..text import entity_text

    pos = (batch["targets"] * batch["target_mask"]) >= 0.5
    return [entity_text(r or None, [class_names[j] for j in torch.nonzero(p).flatten().tolist()])
            for r, p in zip(batch["report"], pos)]


def unichest_epoch(model: nn.Module, text_encoder: nn.Module, class_names: Sequence[str], loader: Iterable,
                   optimizer: torch.optim.Optimizer, *, stage: str, cfg: UniChestLossConfig | None = None,
                   max_steps: int | None = None, generator: torch.Generator | None = None,
                   on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
    """One UniChest epoch in ``stage`` conquer or divide (REFERENCE U.4, U.5, U.7).

    ``L = ASL(img) + ASL(text) + w_itc·ITC(pooled, text) + [divide] w_scl·(SCL(img) + SCL(text))``.
    Class queries are re-encoded every step, as the authors do, because the text projection trains.
    """
    cfg = cfg or UniChestLossConfig()
    model.set_stage(stage)
    model.train()
    text_encoder.train()
    log = LossLog()
    asl = dict(gamma_neg=cfg.gamma_neg, gamma_pos=cfg.gamma_pos, clip=cfg.clip, from_probs=True,
               reduction=cfg.asl_reduction, detach_focal=cfg.detach_focal)
    for batch in _limited(loader, max_steps, _device(model)):
        images, sites = batch["image"], batch["site_index"]
        if cfg.fourier_p > 0:
            images = cross_site_fourier_mix(images, sites, p=cfg.fourier_p, generator=generator)
        with autocast(model):
            loss, terms = _unichest_loss(model, text_encoder, class_names, batch, images, stage, cfg, asl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms = {"loss": loss.detach()} | {k: v.detach() for k, v in terms.items()}
        log.add(terms, len(images))
        if on_step:
            on_step(terms)
    return log.means()


def _unichest_loss(model: nn.Module, text_encoder: nn.Module, class_names: Sequence[str], batch: dict,
                   images: torch.Tensor, stage: str, cfg: UniChestLossConfig, asl: dict) -> tuple[torch.Tensor, dict]:
    """One step's UniChest loss and its terms (losses in fp32 under mixed precision)."""
    sites = batch["site_index"]
    class_emb = text_encoder(list(class_names))
    out = model(images, class_emb, stage=stage)
    text_emb = text_encoder(batch_texts(batch, class_names))
    y, m = batch["targets"], batch["target_mask"]
    terms = {"asl": asymmetric_loss(out["prob"].float(), y, m, **asl),
             "itc": image_text_contrastive_loss(out["pooled"].float(), text_emb.float(), cfg.itc_temperature,
                                                normalize=cfg.itc_normalize)}
    loss = terms["asl"] + cfg.itc_weight * terms["itc"]
    if cfg.text_branch:
        out_t = model.heads(text_emb.unsqueeze(1), class_emb, stage=stage)
        terms["asl_text"] = asymmetric_loss(out_t["prob"].float(), y, m, **asl)
        loss = loss + terms["asl_text"]
    if stage == "divide":
        terms["scl"] = source_contrastive_loss(out["scl"].float(), sites, cfg.scl_temperature)
        if cfg.text_branch:
            terms["scl"] = terms["scl"] + source_contrastive_loss(out_t["scl"].float(), sites, cfg.scl_temperature)
        loss = loss + cfg.scl_weight * terms["scl"]
    return loss, terms
