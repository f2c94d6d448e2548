"""A lab's own pretraining method and site objective, outside raycxr: made known by the config
(``plugins: [outside_plugin]``), as CONTRIBUTING.md shows. Nothing in raycxr names them.

- objective ``outside_spread``: label-free, pushes a batch's embeddings apart (the mean pairwise cosine
  similarity, minimised), so a site without labels still trains the encoder;
- method ``outside``: one encoder, each site's own objective (a supervised head, or ``outside_spread``), one
  batch per site per epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycxr.engine.device import limited, place
from raycxr.methods import Method, Pretrained, Unit, register_method
from raycxr.methods.base import LossLog, check_resume
from raycxr.models.factory import build_encoder
from raycxr.objectives import SiteObjective, make_objective, register_objective


@register_objective("outside_spread")
class SpreadObjective(SiteObjective):
    """The mean cosine similarity between the batch's distinct embeddings (no trainable part)."""

    def __init__(self, dim: int) -> None:
        super().__init__()

    def forward(self, features, batch, **kw):
        z = F.normalize(features.float(), dim=1)
        n = len(z)
        loss = ((z @ z.T).sum() - n) / max(n * (n - 1), 1)
        return loss, {"spread": loss.detach()}


@register_method
class OutsideMethod(Method):
    """Each site trains the shared encoder through its own objective, one batch per site per epoch."""

    name = "outside"
    objectives = ("supervised", "outside_spread")

    def setup(self, resume):
        classes = self.data.site_classes()
        self.model = nn.Module()
        self.model.encoder = build_encoder(self.cfg)
        self.model.objectives = nn.ModuleDict({n: make_objective(s.objective, self.model.encoder.dim,
                                                                 n_classes=classes[n])
                                               for n, s in self.sites.items()})
        self.device = place(self.cfg, self.model)
        self.loaders = self.data.site_loaders(second_view=False)
        self.optimizer = self.data.distribute(torch.optim.SGD(self.model.parameters(), lr=0.01))
        if resume is not None:
            check_resume(resume, self.name)
            self.model.load_state_dict(resume.modules["model"])
            return resume.position
        return 0

    def units(self):
        return [Unit("epoch", {"epoch": 0})]

    def run_unit(self, unit, position):
        log = LossLog()
        for name, loader in self.loaders.items():
            for batch in limited(loader, 1, self.device):
                pooled, _ = self.model.encoder(batch["image"])  # (pooled embedding, tokens)
                loss, terms = self.model.objectives[name](pooled, batch)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                log.add({"loss": loss.detach(), **terms}, len(batch["image"]))
        return log.means()

    def modules(self):
        return {"model": self.model}

    @classmethod
    def pretrained(cls, ckpt, cfg):
        encoder = build_encoder(cfg, checkpoint=False)
        encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in ckpt.modules["model"].items()
                                 if k.startswith("encoder.")})
        return Pretrained(method=cls.name, classifier=None, encoder=encoder, class_names=[], image_size=ckpt.image_size,
                          sites=ckpt.site_names, config=ckpt.config, source=ckpt.source)
