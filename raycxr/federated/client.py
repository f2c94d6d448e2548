"""A site's side of a federation: one round of local training with the method's own schedule driver.

:class:`SiteClient` is plain Python, so the same object runs in the server's process
(``runner=local``), inside a Ray actor placed on the site's node (``runner=ray``), or under a real FL
engine (:mod:`raycxr.federated.fl`). A round:

1. the method's model is built for this site alone (``site_names=[site]``, the federation's union
   classes), its local parts restored from the state the site kept, its shared parts set to the global
   model the server sent;
2. ``federate.local_epochs`` schedule units are trained by :func:`raycxr.train.driver.run_schedule`,
   the same driver as ``raycxr pretrain`` (progress, metrics, the site's own ``checkpoint.pt`` under
   ``out/sites/<site>``: the site's personalised model, which ``raycxr eval`` reads);
3. what goes back is model state only: the shared parameters (clipped and noised when
   ``federate.clip_norm`` is set), the local ones (kept by the server for resume), the method's small
   metadata, the number of training images and the round's mean loss. :func:`audit_update` is the
   server's check that no image-shaped tensor, file path or identifier is in it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import FILENAME, Checkpoint
from ..labels import UnionLabelSpace
from ..methods import get_method, import_plugins
from ..sites.config import SiteConfig
from ..train.driver import Run, run_schedule
from ..train.local import LocalData
from .strategy import clip_and_noise, flatten, local_patterns, proximal_hook, split_state, unflatten

# meta fields a site may send: small, label-level facts the global checkpoint needs (no paths, no ids)
META_KEYS = ("order", "head_specs", "site_classes", "site_labels", "site_objectives", "class_names", "stage",
             "site_names")


class SiteData(LocalData):
    """One site's data plane for a round: :class:`~raycxr.train.local.LocalData` on the federation's
    union classes, whose optimiser gets FedProx's proximal term when ``mu > 0``.

    Args:
        cfg: the site's round config.
        sites: this site only.
        union_names: the federation's union classes (a site class outside it is left out).
        mu: FedProx's μ (0: plain local training).
        prox_pairs: callable returning ``[(parameter, global tensor)]`` for the proximal term.
    """

    def __init__(self, cfg: DictConfig, sites: dict[str, SiteConfig], union_names: list[str], *, mu: float = 0.0,
                 prox_pairs: Any = None) -> None:
        super().__init__(cfg, sites)
        self.union = UnionLabelSpace.onto(list(union_names), self.label_names)
        self.mu, self.prox_pairs = float(mu), prox_pairs

    def distribute(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.mu > 0 and self.prox_pairs is not None:
            proximal_hook(optimizer, self.prox_pairs, self.mu)
        return optimizer


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Hydra-style ``key=value`` strings (what :meth:`Method.budget_overrides` returns) set on ``cfg``."""
    for o in overrides:
        key, _, value = o.partition("=")
        OmegaConf.update(cfg, key.lstrip("+"), yaml.safe_load(value), force_add=True)


class SiteClient:
    """One site in a federation (see the module docstring).

    Args:
        cfg: the federate config (a DictConfig or its plain container, as it travels to a Ray actor).
        site: the site's config (absolute paths: :meth:`SiteConfig.resolved`).
        site_index: the site's number in the federation (seeds its data order and DP noise).
    """

    def __init__(self, cfg: DictConfig | dict, site: SiteConfig, site_index: int = 0) -> None:
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        torch.set_num_threads(max(1, int(self.cfg.get("threads") or 1)))
        import_plugins(self.cfg.get("plugins"))
        self.site, self.site_index = site, int(site_index)
        self.method_cls = get_method(self.cfg.method)
        f = self.cfg.federate
        self.patterns = local_patterns(self.cfg.method, share_projector=bool(f.share_projector),
                                       extra=list(f.local) if f.strategy == "fedper" else ())
        self.dir = Path(self.cfg.out) / "sites" / site.name
        self._templates: dict[tuple, Checkpoint] = {}

    # -- what the server asks ----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The site's label names and number of training images (FedAvg's weight)."""
        data = LocalData(self.round_config(0), {self.site.name: self.site})
        return {"name": self.site.name, "label_names": list(data.label_names[self.site.name]),
                "n_train": len(data.datasets()[self.site.name])}

    def initial_state(self, union_names: list[str]) -> dict[str, torch.Tensor]:
        """The shared part of a freshly built model: the global model before round 0."""
        shared, _ = split_state(flatten(self.template(union_names).modules), self.patterns)
        return shared

    def fit(self, global_shared: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor] | None,
            union_names: list[str], round_: int) -> dict[str, Any]:
        """One round of local training from the global model; returns the site's update."""
        t0 = time.perf_counter()
        cfg = self.round_config(round_)
        sites = {self.site.name: self.site}
        base = self.template(union_names)
        flat = flatten(base.modules)
        if local:  # the site's own parts from its last round; absent: a fresh head (a site joining)
            flat.update({k: v for k, v in local.items() if k in flat})
        missing = [k for k in global_shared if k not in flat]
        if missing:
            raise ValueError(f"site '{self.site.name}': the global model has parameters this site's model lacks: "
                             f"{missing[:3]}")
        flat.update(global_shared)
        resume = Checkpoint(method=base.method, config=base.config, position=0, modules=unflatten(flat),
                            meta=dict(base.meta))
        holder: dict[str, Any] = {}

        def prox_pairs() -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
            named = {f"{m}/{k}": p for m, mod in holder["method"].modules().items() for k, p in mod.named_parameters()}
            return [(p, global_shared[k]) for k, p in named.items() if k in global_shared]

        data = SiteData(cfg, sites, union_names, mu=self._mu(), prox_pairs=prox_pairs)
        torch.manual_seed(int(cfg.seed))
        run = Run(self.dir, keep_best=False)  # one round's local epochs: their best is not the federation's
        run.write_config(cfg)
        method = self.method_cls(cfg, sites, data)
        holder["method"] = method
        result = run_schedule(method, run, resume)
        trained = Checkpoint.load(self.dir / FILENAME)
        shared, kept = split_state(flatten(trained.modules), self.patterns)
        f = self.cfg.federate
        gen = torch.Generator().manual_seed(int(self.cfg.seed) * 7919 + round_ * 131 + self.site_index)
        released, dp = clip_and_noise(shared, global_shared, clip_norm=f.clip_norm,
                                      noise_multiplier=float(f.noise_multiplier), generator=gen)
        hist = result["history"]
        images = int(sum(h.get("images", 0) for h in hist))
        loss = sum(h.get("loss", 0.0) * h.get("steps", 0) for h in hist) / max(1, sum(h.get("steps", 0) for h in hist))
        return {"site": self.site.name, "shared": released, "local": kept,
                "meta": {k: trained.meta[k] for k in META_KEYS if k in trained.meta},
                "n_samples": len(data.datasets()[self.site.name]),
                "metrics": {"loss": round(float(loss), 5), "images": images, "units": len(hist),
                            "val_auc": hist[-1].get("val_auc") if hist else None,
                            "update_norm": round(dp["norm"], 6), "clip_scale": round(dp["scale"], 6),
                            "seconds": round(time.perf_counter() - t0, 2)}}

    # -- pieces --------------------------------------------------------------------------------------
    def _mu(self) -> float:
        f = self.cfg.federate
        return float(f.mu) if f.strategy == "fedprox" else 0.0

    def round_config(self, round_: int) -> DictConfig:
        """The pretrain config of this site's round: this site only, ``local_epochs`` units of the method's
        schedule (:meth:`Method.budget_overrides`), a seed per round, the site's own output folder."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.site_names = [self.site.name]
        cfg.out = str(self.dir)
        cfg.seed = int(self.cfg.seed) + 1000 * int(round_) + self.site_index
        cfg.resume = None
        apply_overrides(cfg, self.method_cls.budget_overrides(cfg, int(self.cfg.federate.local_epochs), 1))
        return cfg

    def template(self, union_names: list[str]) -> Checkpoint:
        """The method's model freshly built for this site (seeded by the run's seed, so every site starts
        alike), as a checkpoint: the structure the global and the local states are poured into."""
        key = tuple(union_names)
        if key not in self._templates:
            cfg = self.round_config(0)
            cfg.seed = int(self.cfg.seed)
            sites = {self.site.name: self.site}
            method = self.method_cls(cfg, sites, SiteData(cfg, sites, list(union_names)))
            torch.manual_seed(int(cfg.seed))
            method.setup(None)
            self._templates[key] = method.checkpoint(0, [], None).slim()
        return self._templates[key]


def audit_update(update: Any, *, image_size: int, forbidden: list[str] = ()) -> list[str]:
    """What is wrong with an update a site sent (empty: nothing): a tensor shaped like an image batch
    (its last two dimensions ``image_size × image_size``), or a string anywhere in it (keys included)
    that looks like a file path or contains one of ``forbidden`` (patient or image identifiers), or a
    floating tensor with NaN or ±inf (one such tensor turns the global model into NaN). The problems
    name where, never the identifier found: they go to the federation's log."""
    problems: list[str] = []

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            if x.ndim >= 3 and tuple(x.shape[-2:]) == (image_size, image_size):
                problems.append(f"{where}: tensor of shape {tuple(x.shape)} looks like images")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                problems.append(f"{where}: non-finite values (NaN or inf)")
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(k, f"{where}.<key>")
                walk(v, f"{where}.{k}")
        elif isinstance(x, (list, tuple, set)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, str):
            low = x.lower()
            if x.startswith(("/", "~")) or "\\" in x or any(low.endswith(e) for e in (".dcm", ".png", ".jpg", ".jpeg")):
                problems.append(f"{where}: {x!r} looks like a file path")
            for f in forbidden:
                if f and f in x:
                    problems.append(f"{where}: contains a patient or image identifier of this site")
                    break
        elif not isinstance(x, (int, float, bool, type(None))):
            problems.append(f"{where}: unexpected {type(x).__name__}")

    walk(update, "update")
    return problems
