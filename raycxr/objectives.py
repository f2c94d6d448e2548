"""Per-site objectives, so that every source counts, labelled or not.

A site's objective plays the role of its task head: it owns its trainable parts (head, projector,
queue) and turns the shared encoder's output on a batch into a loss. Supervised sites use
:class:`SupervisedHead`; sites with reports only, or with images only, use one of the objectives
compared in the reports-vs-SSL study: CLIP / ConVIRT (image-report contrastive), SimCLR, MoCo v2,
VICReg, or SLIP (CLIP + SimCLR). The choice comes from the site YAML (``objective:``); objectives are
registered by name (:func:`register_objective`), and each method says which ones it can train
(``Method.objectives``), so a site whose objective a method cannot use is refused, not ignored.

Interface: ``objective(features, batch, *, features2=None, key_features=None, text_emb=None)``
returns ``(loss, terms)`` where ``features`` are the encoder's pooled embeddings of view 1,
``features2`` of view 2, ``key_features`` the momentum (teacher) encoder's on view 2 (MoCo), and
``text_emb`` the report embeddings (CLIP, SLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import image_text_contrastive_loss, masked_bce_with_logits, moco_loss, nt_xent_loss, vicreg_loss
from .registry import Registry

# name -> SiteObjective subclass, built as cls(dim, [n_classes | text_dim], **options); filled by @register_objective
OBJECTIVE_REGISTRY: Registry[type[SiteObjective]] = Registry("objective")
# objectives that read the site's reports (they need the text encoder)
REPORT_OBJECTIVES = ("clip", "slip")


def register_objective(name: str):
    """Class decorator: make a :class:`SiteObjective` available as ``objective: <name>`` in site YAMLs."""
    def deco(cls: type[SiteObjective]) -> type[SiteObjective]:
        OBJECTIVE_REGISTRY.register(name, cls)
        cls.objective_name = name
        return cls
    return deco


def list_objectives() -> tuple[str, ...]:
    """Registered objective names, ``supervised`` first."""
    names = OBJECTIVE_REGISTRY.names()
    return tuple(sorted(names, key=lambda n: (n != "supervised", names.index(n))))


def _mlp(dim: int, hidden: int, out: int, *, bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(dim, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    return nn.Sequential(*layers)


class SiteObjective(nn.Module):
    """Base class; ``needs`` lists what the training loop must provide besides ``features``."""

    needs: tuple[str, ...] = ()

    def forward(self, features: torch.Tensor, batch: dict, **kw: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


@register_objective("supervised")
class SupervisedHead(SiteObjective):
    """Linear head over the site's own label space; masked BCE (missing labels ignored)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, n_classes)

    def forward(self, features, batch, **kw):
        loss = masked_bce_with_logits(self.head(features), batch["labels"], batch["label_mask"])
        return loss, {"supervised": loss.detach()}


@register_objective("clip")
class CLIPObjective(SiteObjective):
    """Image-report contrastive (ConVIRT / CLIP): project the image into the text space."""

    needs = ("text_emb",)

    def __init__(self, dim: int, text_dim: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.proj = _mlp(dim, dim, text_dim)
        self.temperature = temperature

    def forward(self, features, batch, *, text_emb=None, **kw):
        if text_emb is None:
            raise ValueError("the clip objective needs report embeddings (text_emb)")
        loss = image_text_contrastive_loss(self.proj(features), text_emb, self.temperature, normalize=True)
        return loss, {"clip": loss.detach()}


@register_objective("simclr")
class SimCLRObjective(SiteObjective):
    """Two augmented views, NT-Xent on an MLP projection."""

    needs = ("features2",)

    def __init__(self, dim: int, proj_dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        self.proj = _mlp(dim, dim, proj_dim)
        self.temperature = temperature

    def forward(self, features, batch, *, features2=None, **kw):
        loss = nt_xent_loss(self.proj(features), self.proj(features2), self.temperature)
        return loss, {"simclr": loss.detach()}


@register_objective("mocov2")
class MoCoV2Objective(SiteObjective):
    """Queries from the student, keys from the momentum encoder (Ark's EMA teacher), negatives
    from a FIFO queue of past keys."""

    needs = ("key_features",)

    def __init__(self, dim: int, proj_dim: int = 128, queue_size: int = 4096, temperature: float = 0.2) -> None:
        super().__init__()
        self.proj = _mlp(dim, dim, proj_dim)
        self.key_proj = _mlp(dim, dim, proj_dim)
        self.key_proj.load_state_dict(self.proj.state_dict())
        for p in self.key_proj.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.temperature = temperature

    def forward(self, features, batch, *, key_features=None, **kw):
        with torch.no_grad():
            for pk, pq in zip(self.key_proj.parameters(), self.proj.parameters()):
                pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
            k = F.normalize(self.key_proj(key_features), dim=1)
        loss = moco_loss(self.proj(features), k, self.queue.clone(), self.temperature)
        with torch.no_grad():  # enqueue the newest keys, drop the oldest
            n = min(len(k), len(self.queue))
            idx = (self.ptr + torch.arange(n)) % len(self.queue)
            self.queue[idx] = k[:n]
            self.ptr.copy_((self.ptr + n) % len(self.queue))
        return loss, {"moco": loss.detach()}


@register_objective("vicreg")
class VICRegObjective(SiteObjective):
    """Variance-invariance-covariance on an expander of two views."""

    needs = ("features2",)

    def __init__(self, dim: int, expander_dim: int = 512) -> None:
        super().__init__()
        self.expander = _mlp(dim, expander_dim, expander_dim, bn=True)

    def forward(self, features, batch, *, features2=None, **kw):
        loss = vicreg_loss(self.expander(features), self.expander(features2))
        return loss, {"vicreg": loss.detach()}


@register_objective("slip")
class SLIPObjective(SiteObjective):
    """SLIP: image-report contrastive plus SimCLR on the same images."""

    needs = ("text_emb", "features2")

    def __init__(self, dim: int, text_dim: int, ssl_scale: float = 1.0) -> None:
        super().__init__()
        self.clip = CLIPObjective(dim, text_dim)
        self.simclr = SimCLRObjective(dim)
        self.ssl_scale = ssl_scale

    def forward(self, features, batch, *, text_emb=None, features2=None, **kw):
        lc, _ = self.clip(features, batch, text_emb=text_emb)
        ls, _ = self.simclr(features, batch, features2=features2)
        loss = lc + self.ssl_scale * ls
        return loss, {"clip": lc.detach(), "simclr": ls.detach()}


def make_objective(kind: str, dim: int, *, n_classes: int = 0, text_dim: int | None = None,
                   **options: float) -> SiteObjective:
    """Build a site's objective from its YAML ``objective`` name (see :func:`register_objective`)."""
    if kind not in OBJECTIVE_REGISTRY:
        raise ValueError(f"unknown objective '{kind}'; expected one of {list_objectives()}")
    if kind == "supervised":
        if n_classes < 1:
            raise ValueError("a supervised site needs at least one label; use clip, simclr, mocov2, vicreg "
                             "or slip for an unlabelled site")
        return SupervisedHead(dim, n_classes)
    if kind in REPORT_OBJECTIVES:
        if not text_dim:
            raise ValueError(f"objective '{kind}' needs a text encoder (text_dim)")
        return OBJECTIVE_REGISTRY.entries[kind](dim, text_dim, **options)
    return OBJECTIVE_REGISTRY.entries[kind](dim, **options)


OBJECTIVES = list_objectives()  # the built-in ones, for validation and tests
