"""Ark: one shared encoder, a projector, and one task head per site over the site's own labels.

As in the authors' code (``docs/references.md`` A.1, A.3):

- ``forward(x, site)`` returns ``(projection (B, P), logits of that site's head)``;
- the projector is ``Linear(width, P)`` or, with ``mlp_projector``, ``Linear → ReLU → Linear``;
- a new site just adds a head (:meth:`ArkModel.add_head`); heads are kept by site name, not by list
  position, so adding or reordering sites never shifts another site's head (Ark loads heads by
  position, which breaks on reorder: A.7);
- the teacher is built separately: the same encoder weights, but its projector and heads are
  initialised independently (:func:`make_teacher`), and it is updated only by EMA.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .encoders import ImageEncoder


class ArkModel(nn.Module):
    """Encoder + projector + per-site heads."""

    def __init__(self, encoder: ImageEncoder, site_classes: dict[str, int], *, proj_dim: int = 1376,
                 mlp_projector: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        w = encoder.dim
        self.projector = (nn.Sequential(nn.Linear(w, proj_dim), nn.ReLU(inplace=True), nn.Linear(proj_dim, proj_dim))
                          if mlp_projector else nn.Linear(w, proj_dim))
        self.proj_dim = proj_dim
        self.heads = nn.ModuleDict()
        # sites trained without labels (clip, simclr, mocov2, vicreg, slip): see raycxr.objectives
        self.objectives = nn.ModuleDict()
        for site, n in site_classes.items():
            self.add_head(site, n)

    def add_objective(self, site: str, objective: nn.Module) -> None:
        """A self-supervised or report-supervised site: its objective replaces the task head."""
        if site in self.heads or site in self.objectives:
            raise ValueError(f"site '{site}' already has a head or objective")
        self.objectives[site] = objective

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output (B, P) of the pooled embedding."""
        return self.projector(self.encoder(x)[0])

    def add_head(self, site: str, n_classes: int, *, kind: str = "linear", hidden: int | None = None) -> nn.Module:
        """A fresh head for a site joining the run (its YAML ``head:`` sets ``kind`` and ``hidden``)."""
        if site in self.heads:
            raise ValueError(f"site '{site}' already has a head")
        self.heads[site] = make_head(self.proj_dim, n_classes, kind=kind, hidden=hidden)
        return self.heads[site]

    def forward(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        if site not in self.heads:
            raise KeyError(f"no head for site '{site}'; heads: {list(self.heads)}")
        proj = self.project(x)
        return proj, self.heads[site](proj)

    def head_state(self, site: str) -> dict[str, torch.Tensor]:
        """One site's head weights (what a site actor keeps)."""
        return {k: v.detach().clone() for k, v in self.heads[site].state_dict().items()}


HEAD_KINDS = ("linear", "mlp")


def make_head(dim: int, n_classes: int, *, kind: str = "linear", hidden: int | None = None) -> nn.Module:
    """A site's task head on the projection: ``linear`` (Ark's) or ``mlp`` (Linear → ReLU → Linear,
    ``hidden`` units, default the projection width)."""
    if kind == "linear":
        if hidden is not None:
            raise ValueError("a linear head has no hidden layer; use head: {kind: mlp, hidden: N}")
        return nn.Linear(dim, n_classes)
    if kind == "mlp":
        h = int(hidden or dim)
        return nn.Sequential(nn.Linear(dim, h), nn.ReLU(inplace=True), nn.Linear(h, n_classes))
    raise ValueError(f"unknown head kind '{kind}'; expected one of {HEAD_KINDS}")


def same_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts have the same keys and tensor shapes (a kept head still fits)."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def make_teacher(student: ArkModel, *, seed: int = 1) -> ArkModel:
    """The teacher: same encoder weights; projector and heads re-initialised (as the authors do);
    no gradients."""
    teacher = copy.deepcopy(student)
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in list(teacher.projector.modules()) + list(teacher.heads.modules()):
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    torch.random.set_rng_state(g)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
