"""The baselines the methods are measured against: ``concurrent``, ``mixed`` and ``single``.

- ``concurrent``: Ark's model (one head per site) without teacher or cycling: every step takes one
  batch from every site and sums the sites' losses (the multi-task baseline Ark argues against).
- ``mixed``: one linear head over the union label space, missing labels masked (naive multi-source
  mixing, the situation UniChest starts from: "KAD-multi").
- ``single``: ``mixed`` on exactly one site (supervised single-source pretraining).

Each runs ``baseline.epochs`` epochs with AdamW (``baseline.lr``, ``baseline.weight_decay``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import Checkpoint
from ..engine.device import autocast, device_of, limited, place
from ..engine.schedule import adamw, batches_per_pass, epoch_budget, set_epoch, steps_per_unit
from ..losses import masked_bce_with_logits
from ..models.classifiers import Probabilities
from ..models.factory import LinearClassifier, build_encoder
from .ark import build_heads_model, heads_classifier, heads_meta, load_kept_heads, pretrained_heads_model, site_loss
from .base import PROJECTOR_PARAMETERS, LossLog, Method, Pretrained, Unit, check_resume
from .registry import register_method


def concurrent_multitask_epoch(model: nn.Module, loaders: dict[str, Iterable], optimizer: torch.optim.Optimizer, *,
                               max_steps: int | None = None, text_encoder: nn.Module | None = None) -> dict[str, float]:
    """Every step takes one batch from every site and sums the sites' losses (heads or objectives; no
    teacher, no cycling). Stops when the shortest site runs out.

    The sites with heads go through the encoder in one forward pass over their batches together, then each
    head scores its own site's part. Per-site forward passes would normalise each site's batch with its
    own BatchNorm statistics, a normalisation evaluation (running statistics over every site) does not
    reproduce: measured on the demo sites, vindr's head stayed at AUC 0.49 after 36 steps that way, and
    reached 0.68 with the joint pass."""
    model.train()
    log = LossLog()
    iters = {s: iter(limited(dl, max_steps, device_of(model))) for s, dl in loaders.items()}
    while True:
        batches = {}
        for s, it in iters.items():
            b = next(it, None)
            if b is None:
                return log.means()
            batches[s] = b
        with autocast(model):
            heads = [s for s in batches if s not in model.objectives]
            loss = torch.zeros((), device=device_of(model))
            if heads:
                proj = model.project(torch.cat([batches[s]["image"] for s in heads]))
                for s, p in zip(heads, proj.split([len(batches[s]["image"]) for s in heads])):
                    b = batches[s]
                    loss = loss + masked_bce_with_logits(model.heads[s](p).float(), b["labels"], b["label_mask"])
            for s in batches:
                if s in model.objectives:
                    loss = loss + site_loss(model, s, batches[s], text_encoder=text_encoder)[0].float()
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
    for batch in limited(loader, max_steps, device_of(model)):
        with autocast(model):
            loss = masked_bce_with_logits(model(batch["image"]).float(), batch["targets"], batch["target_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add({"loss": loss.detach()}, len(batch["image"]))
    return log.means()


class _Epochs(Method):
    """A baseline's schedule: ``baseline.epochs`` epochs, one optimiser (resumable like every method)."""

    config_key = "baseline"

    def units(self) -> list[Unit]:
        return [Unit("epoch", {"epoch": e}) for e in range(int(self.section.epochs))]

    def _optimizer(self, params: Iterable[nn.Parameter], resume: Checkpoint | None, same_shapes: bool,
                   unit_steps: int) -> None:
        """AdamW, restored from ``resume`` when the parameters kept their shapes, with the run's schedule
        over ``epochs × unit_steps`` steps."""
        self.use_optimizer(adamw(params, self.section.lr, self.section.weight_decay),
                           int(self.section.epochs) * unit_steps, resume, restore=same_shapes)


@register_method
class ConcurrentMethod(_Epochs):
    """Multi-task baseline (``method=concurrent``): all site heads every step."""

    name = "concurrent"
    # no teacher, hence no momentum encoder for MoCo v2
    objectives = ("supervised", "clip", "simclr", "vicreg", "slip")
    federated_local = ("model/heads.*", "model/objectives.*")  # each site's head (or objective) stays at the site
    federated_projector = PROJECTOR_PARAMETERS

    @classmethod
    def budget_overrides(cls, cfg: DictConfig, units: int, n_sites: int) -> list[str]:
        """A step takes one batch from every site: each site's batch is ``batch_size / n_sites``, so a step
        sees as many images as one of the other methods."""
        return [*super().budget_overrides(cfg, units, n_sites),
                f"batch_size={max(1, int(cfg.batch_size) // max(n_sites, 1))}"]

    @classmethod
    def step_budget(cls, cfg: DictConfig, steps: int, train_sizes: dict[str, int]) -> list[str]:
        """An epoch ends with the shortest site, whose batches are ``batch_size / n_sites`` images."""
        per_site_batch = max(1, int(cfg.batch_size) // max(len(train_sizes), 1))
        per_pass = min(batches_per_pass(n, per_site_batch) for n in train_sizes.values())
        return epoch_budget(cls, cfg, steps, per_pass, len(train_sizes))

    def setup(self, resume: Checkpoint | None) -> int:
        if resume is not None:
            check_resume(resume, self.name)
        self.resume = resume
        self.site_classes = self.data.site_classes()
        self.model, self.text = build_heads_model(self.cfg, self.sites, self.site_classes, resume)
        if resume is None:
            load_kept_heads(self.model, self.data.site_heads())
        place(self.cfg, self.model, self.text)
        self.loaders = self.data.site_loaders(second_view=False)
        params = list(self.model.parameters()) + (list(self.text.parameters()) if self.text is not None else [])
        self._optimizer(params, resume, resume is not None and resume.meta.get("site_classes") == self.site_classes,
                        min(steps_per_unit(dl, self.cfg) for dl in self.loaders.values()))
        return resume.position if resume is not None else 0

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        for dl in self.loaders.values():
            set_epoch(dl, position)
        return concurrent_multitask_epoch(self.model, self.loaders, self.optimizer,
                                          max_steps=self.cfg.max_steps_per_epoch, text_encoder=self.text)

    def current_classifier(self) -> tuple[nn.Module, list[str]] | None:
        return heads_classifier(self.model, self.data.label_names) if self.model.heads else None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **({"text_head": self.text.mlp_embed} if self.text is not None else {})}

    def meta(self) -> dict[str, Any]:
        return heads_meta(self.model, self.sites, self.data.label_names, self.resume)

    def end_unit(self, unit: Unit, position: int, record: dict, checkpoint: Checkpoint, run: Any) -> None:
        self.data.hand_back_heads({n: self.model.head_state(n) for n in self.model.heads}, position + 1)

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        return pretrained_heads_model(cls, ckpt, cfg)


@register_method
class MixedMethod(_Epochs):
    """Union-head baseline (``method=mixed``): one linear head over the union label space."""

    name = "mixed"

    def setup(self, resume: Checkpoint | None) -> int:
        if resume is not None:
            check_resume(resume, self.name)
        self.union = self.data.union
        self.loader = self.data.union_loader()
        self.model = LinearClassifier(build_encoder(self.cfg), len(self.union))
        same = True
        if resume is not None:
            same = _load_union_head(self.model, resume.modules["model"], list(resume.meta["class_names"]),
                                    self.union.names)
        place(self.cfg, self.model)
        self._optimizer(self.model.parameters(), resume, same, steps_per_unit(self.loader, self.cfg))
        return resume.position if resume is not None else 0

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        set_epoch(self.loader, position)
        return supervised_union_epoch(self.model, self.loader, self.optimizer, max_steps=self.cfg.max_steps_per_epoch)

    def current_classifier(self) -> tuple[nn.Module, list[str]]:
        return Probabilities(self.model), list(self.union.names)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def meta(self) -> dict[str, Any]:
        return {"class_names": list(self.union.names)}

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        names = list(ckpt.meta["class_names"])
        model = LinearClassifier(build_encoder(cfg, checkpoint=False), len(names))
        model.load_state_dict(ckpt.modules["model"])
        return Pretrained(method=cls.name, classifier=Probabilities(model), encoder=model.encoder, class_names=names,
                          image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source)


@register_method
class SingleMethod(MixedMethod):
    """Single-site supervised baseline (``method=single site_names=[NAME]``)."""

    name = "single"

    def setup(self, resume: Checkpoint | None) -> int:
        if len(self.sites) != 1:
            raise ValueError("method=single trains on exactly one site; pass site_names=[NAME] "
                             f"(got {list(self.sites)})")
        return super().setup(resume)


def _load_union_head(model: LinearClassifier, state: dict[str, torch.Tensor], old: list[str], new: list[str]) -> bool:
    """Restore a union-head model whose class list may have grown (a site added on resume): the encoder as
    saved, head rows copied by class name, new classes with fresh rows. Returns whether shapes stayed."""
    if old == new:
        model.load_state_dict(state)
        return True
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    with torch.no_grad():
        for j, name in enumerate(new):
            if name in old:
                i = old.index(name)
                model.head.weight[j] = head["weight"][i]
                model.head.bias[j] = head["bias"][i]
    print(f"union head: {len(set(new) - set(old))} new class(es) get fresh rows; the optimiser starts afresh")
    return False
