"""Self-supervised and image-report pretraining without labels: SimCLR, MoCo v2, VICReg, CLIP, SLIP.

``method=selfsup selfsup.objective=simclr`` trains the encoder with one objective on the images of
every site (labels are never read), the strategies that ``Huang et al. (MIDL 2023)`` compares:

- ``simclr``, ``vicreg``: two augmented views of each image;
- ``mocov2``: queries from the encoder, keys from a momentum copy of it (EMA, ``selfsup.momentum``);
- ``clip``: image-report contrastive on the images that have a report (a batch's images without one
  are left out of the loss; a run on sites without reports learns nothing and says so);
- ``slip``: CLIP plus SimCLR.

A finished run is an encoder only: it has no classifier (``raycxr eval`` runs its linear probe and
fine-tuning; ``raycxr study`` uses it as a pretraining row).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import Checkpoint
from ..engine.device import autocast, device_of, limited, place
from ..engine.schedule import adamw, set_epoch, steps_per_unit
from ..losses import ema_update
from ..models.factory import build_encoder, build_text_encoder
from ..objectives import REPORT_OBJECTIVES, make_objective
from .base import LossLog, Method, Pretrained, Unit, check_resume
from .registry import register_method


class SelfSupModel(nn.Module):
    """Image encoder + one objective (its projector); ``text_head`` is the report projection for CLIP/SLIP."""

    def __init__(self, encoder: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective


def selfsup_epoch(model: SelfSupModel, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                  momentum_encoder: nn.Module | None = None, momentum: float = 0.99,
                  text_encoder: nn.Module | None = None, max_steps: int | None = None) -> dict[str, float]:
    """One epoch of the objective over ``loader`` (batches with ``image``, ``image2`` and ``report``)."""
    model.train()
    log = LossLog()
    needs = model.objective.needs
    skipped = 0
    for batch in limited(loader, max_steps, device_of(model)):
        if "text_emb" in needs:
            keep = [i for i, r in enumerate(batch["report"]) if r]
            if len(keep) < 2:  # no report pairs to contrast in this batch
                skipped += 1
                continue
            batch = {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep] for k, v in batch.items()}
        with autocast(model):
            feats = model.encoder(batch["image"])[0]
            kw: dict[str, torch.Tensor] = {}
            if "features2" in needs:
                kw["features2"] = model.encoder(batch["image2"])[0]
            if "key_features" in needs:
                with torch.no_grad():
                    kw["key_features"] = momentum_encoder(batch["image2"])[0]
            if "text_emb" in needs:
                kw["text_emb"] = text_encoder(list(batch["report"]))
            loss, terms = model.objective(feats.float(), batch, **{k: v.float() for k, v in kw.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if momentum_encoder is not None:
            ema_update(momentum_encoder, model.encoder, momentum)
        log.add({"loss": loss.detach(), **terms}, len(batch["image"]))
    out = log.means()
    if skipped:
        out["batches_without_reports"] = skipped
    return out


@register_method
class SelfSupMethod(Method):
    """Label-free pretraining with one objective (``method=selfsup``; knobs in ``selfsup:``)."""

    name = "selfsup"
    objectives = None  # a site's own objective is not used: every site trains the same one

    def setup(self, resume: Checkpoint | None) -> int:
        s = self.section
        if resume is not None:
            check_resume(resume, self.name)
        kind = str(s.objective)
        if kind == "supervised":
            raise ValueError("selfsup.objective must be a label-free objective (simclr, mocov2, vicreg, clip, slip)")
        encoder = build_encoder(self.cfg)
        self.text = build_text_encoder(self.cfg, int(s.proj_dim)) if kind in REPORT_OBJECTIVES else None
        self.model = SelfSupModel(encoder, make_objective(kind, encoder.dim, text_dim=int(s.proj_dim)))
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False) if "key_features" in \
            self.model.objective.needs else None
        if resume is not None:
            self.model.load_state_dict(resume.modules["model"])
            if self.text is not None:
                self.text.mlp_embed.load_state_dict(resume.modules["text_head"])
            if self.momentum_encoder is not None:
                self.momentum_encoder.load_state_dict(resume.modules["momentum_encoder"])
        place(self.cfg, self.model, self.text, self.momentum_encoder)
        self.loader = self.data.union_loader(second_view="augmented")
        params = list(self.model.parameters()) + (list(self.text.parameters()) if self.text is not None else [])
        self.use_optimizer(adamw(params, float(s.lr), float(s.weight_decay)),
                           int(s.epochs) * steps_per_unit(self.loader, self.cfg), resume)
        return resume.position if resume is not None else 0

    def units(self) -> list[Unit]:
        return [Unit("epoch", {"epoch": e}) for e in range(int(self.section.epochs))]

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        set_epoch(self.loader, position)
        return selfsup_epoch(self.model, self.loader, self.optimizer, momentum_encoder=self.momentum_encoder,
                             momentum=float(self.section.momentum), text_encoder=self.text,
                             max_steps=self.cfg.max_steps_per_epoch)

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"model": self.model}
        if self.text is not None:
            out["text_head"] = self.text.mlp_embed
        if self.momentum_encoder is not None:
            out["momentum_encoder"] = self.momentum_encoder
        return out

    def meta(self) -> dict[str, Any]:
        return {"objective": str(self.section.objective)}

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        encoder = build_encoder(cfg, checkpoint=False)
        encoder.load_state_dict(ckpt.encoder_state())
        return Pretrained(method=cls.name, classifier=None, encoder=encoder, class_names=[],
                          image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source,
                          extra={"objective": ckpt.meta.get("objective")})
