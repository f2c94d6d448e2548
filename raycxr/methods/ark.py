"""Ark as a method: cyclic student-teacher pretraining with one head per site and an epoch-wise EMA teacher.

Schedule: ``ark.rounds`` rounds; each round trains one epoch on every site in ``ark.order`` (references
A.2). ``loss = (1-c)·sup + c·MSE(student_proj(v1), teacher_proj(v2))``, with the EMA momentum rising
0.9 → 1 and the consistency weight c rising 0 → 0.5 on cosines over rounds × sites (A.3, A.4).

Sites: a supervised site gets a head over its own labels (its YAML ``head:`` sets the kind, ``linear``
or ``mlp``, and ``hidden``); a site with another ``objective:`` (clip, simclr, mocov2, vicreg, slip)
trains through that objective instead (:mod:`raycxr.objectives`). A site added to a resumed run
gets a fresh head and joins at the end of each round (Ark's continual training, A.7). Heads are
handed back to the site actors after every unit. A finished run is every head averaged into the
union classes (:class:`~raycxr.models.classifiers.HeadsClassifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import Checkpoint
from ..engine.device import autocast, device_of, limited, place
from ..engine.schedule import adamw, batches_per_pass, fit_budget, set_epoch, steps_per_unit
from ..labels import UnionLabelSpace
from ..losses import ark_consistency_loss, cosine_schedule, ema_update, masked_bce_with_logits
from ..models.ark import ArkModel, make_teacher, same_shapes
from ..models.classifiers import HeadsClassifier, TenCrop
from ..models.factory import build_encoder, build_text_encoder
from ..objectives import REPORT_OBJECTIVES, make_objective
from ..sites.config import SiteConfig
from .base import PROJECTOR_PARAMETERS, LossLog, Method, Pretrained, Unit, check_resume
from .registry import register_method


def site_loss(model: ArkModel, site: str, batch: dict, *, key_features: torch.Tensor | None = None,
              text_encoder: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One site's own loss on a batch and the student's projection of view 1: the BCE of the site's
    head on its labels (missing masked), or the site's objective (``model.objectives[site]``).
    ``key_features`` is the momentum encoder's projection of view 2 (MoCo v2)."""
    if site not in model.objectives:
        proj, logits = model(batch["image"], site)
        return masked_bce_with_logits(logits.float(), batch["labels"], batch["label_mask"]), proj
    objective = model.objectives[site]
    proj = model.project(batch["image"])
    kw = {}
    if "features2" in objective.needs:
        kw["features2"] = model.project(batch.get("image2", batch["image"]))
    if "key_features" in objective.needs:
        if key_features is None:
            raise ValueError(f"site '{site}': objective {type(objective).__name__} needs a momentum (teacher) encoder")
        kw["key_features"] = key_features
    if "text_emb" in objective.needs:
        if text_encoder is None:
            raise ValueError(f"site '{site}' uses a report objective but no text encoder was given")
        kw["text_emb"] = text_encoder([r or "" for r in batch["report"]])
    loss, _ = objective(proj, batch, **kw)
    return loss, proj


def ark_site_epoch(student: ArkModel, teacher: ArkModel, site: str, loader: Iterable,
                   optimizer: torch.optim.Optimizer, *, consistency_weight: float, momentum: float,
                   ema_mode: str = "epoch", max_steps: int | None = None, on_step: Callable[[dict], None] | None = None,
                   text_encoder: nn.Module | None = None) -> dict[str, float]:
    """One Ark task-epoch on one site (references A.2–A.4).

    ``loss = (1-c)·sup + c·MSE(student_proj(v1), teacher_proj(v2))``; the teacher is updated by EMA at
    the end of the epoch (``ema_mode='epoch'``, Ark's default) or after every step (``'iteration'``).
    The teacher sees ``image2`` (a clean view, as Ark+ does) and the student the augmented ``image``;
    for a site trained without labels ``image2`` is a second augmented view.
    """
    student.train()
    log = LossLog()
    c = consistency_weight
    for batch in limited(loader, max_steps, device_of(student)):
        with autocast(student):
            with torch.no_grad():
                proj_t = teacher.project(batch.get("image2", batch["image"]))
            sup, proj_s = site_loss(student, site, batch, key_features=proj_t, text_encoder=text_encoder)
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


def head_options(site: SiteConfig) -> dict[str, Any]:
    """The site YAML's ``head:`` as :meth:`ArkModel.add_head` keywords."""
    return {"kind": site.head.get("kind", "linear"), "hidden": site.head.get("hidden")}


def head_specs(model: ArkModel, sites: dict[str, SiteConfig], old: dict[str, dict] | None = None) -> dict[str, dict]:
    """What rebuilds each head: classes, kind, hidden size (sites no longer registered keep their spec)."""
    old = old or {}
    return {n: {"n_classes": _out_features(model.heads[n]),
                **(head_options(sites[n]) if n in sites else {k: v for k, v in old.get(n, {}).items()
                                                                if k != "n_classes"})}
            for n in model.heads}


def _out_features(head: nn.Module) -> int:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def build_heads_model(cfg: DictConfig, sites: dict[str, SiteConfig], site_classes: dict[str, int],
                      resume: Checkpoint | None, *, encoder_checkpoint: bool = True) -> tuple[ArkModel, Any]:
    """Encoder + projector + one head (or objective) per site, restored from ``resume``; a site that the
    checkpoint does not know gets a fresh head. Returns the model and the text encoder that report
    objectives (clip, slip) need, or None. Used by Ark, the concurrent baseline and their classifiers."""
    a = cfg.ark
    model = ArkModel(build_encoder(cfg, checkpoint=encoder_checkpoint), {}, proj_dim=a.proj_dim,
                     mlp_projector=a.mlp_projector)
    specs, objectives = {}, {}
    if resume is not None:
        meta = resume.meta
        specs = meta.get("head_specs") or {n: {"n_classes": k} for n, k in (meta.get("site_classes") or {}).items()}
        objectives = dict(meta.get("site_objectives") or {})
    for n, spec in specs.items():
        model.add_head(n, int(spec["n_classes"]), kind=spec.get("kind", "linear"), hidden=spec.get("hidden"))
    for n, kind in objectives.items():
        model.add_objective(n, make_objective(kind, model.proj_dim, text_dim=model.proj_dim))
    if resume is not None:
        model.load_state_dict(resume.modules["model"])
    for n, k in site_classes.items():
        if n in model.heads or n in model.objectives:
            continue
        site = sites[n]  # a site joining: a fresh head (or objective); the shared encoder from the checkpoint
        if site.objective == "supervised":
            model.add_head(n, k, **head_options(site))
        else:
            model.add_objective(n, make_objective(site.objective, model.proj_dim, n_classes=k,
                                                  text_dim=model.proj_dim))
    text = None
    kinds = {**objectives, **{n: s.objective for n, s in sites.items()}}
    if any(kinds.get(n) in REPORT_OBJECTIVES for n in model.objectives):
        text = build_text_encoder(cfg, model.proj_dim)
        if resume is not None and resume.modules.get("text_head"):
            text.mlp_embed.load_state_dict(resume.modules["text_head"])
    return model, text


def heads_meta(model: ArkModel, sites: dict[str, SiteConfig], label_names: dict[str, list[str]],
               resume: Checkpoint | None) -> dict[str, Any]:
    """Checkpoint fields of a heads model: head specs, each head's label names, objectives by site."""
    old = resume.meta if resume is not None else {}
    labels = {n: list(label_names.get(n) or (old.get("site_labels") or {}).get(n, [])) for n in model.heads}
    objectives = {n: sites[n].objective if n in sites else (old.get("site_objectives") or {}).get(n, "?")
                  for n in model.objectives}
    return {"head_specs": head_specs(model, sites, old.get("head_specs")),
            "site_classes": {n: _out_features(model.heads[n]) for n in model.heads},
            "site_labels": labels, "site_objectives": objectives}


def heads_classifier(model: ArkModel, site_labels: dict[str, list[str]]) -> tuple[HeadsClassifier, list[str]]:
    labels = {s: list(site_labels[s]) for s in model.heads if s in site_labels}
    union = UnionLabelSpace.build(labels)
    return HeadsClassifier(model, labels, union).to(device_of(model)), union.names


def load_kept_heads(model: ArkModel, kept: dict[str, dict]) -> None:
    """Heads the site actors kept from an earlier run of the same name, where they still fit."""
    for n, state in kept.items():
        if n in model.heads and same_shapes(state, model.heads[n].state_dict()):
            model.heads[n].load_state_dict(state)


def pretrained_heads_model(cls: type[Method], ckpt: Checkpoint, cfg: DictConfig, *,
                           tencrop: bool = False) -> Pretrained:
    """A finished Ark or concurrent run: its heads averaged into the union classes (``tencrop``: averaged
    over ten crops at test time, as Ark's test transform)."""
    model, _ = build_heads_model(cfg, {}, {}, ckpt, encoder_checkpoint=False)
    site_labels = _site_labels(ckpt, cfg)
    classifier, names = heads_classifier(model, site_labels)
    if tencrop:
        classifier = TenCrop(classifier)
    return Pretrained(method=cls.name, classifier=classifier, encoder=model.encoder, class_names=names,
                      image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source,
                      site_labels=site_labels)


def _site_labels(ckpt: Checkpoint, cfg: DictConfig) -> dict[str, list[str]]:
    """Each head's label names: stored in the checkpoint, else read from the registered sites."""
    if ckpt.meta.get("site_labels"):
        return {k: list(v) for k, v in ckpt.meta["site_labels"].items()}
    from ..sites.config import discover_sites

    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    heads = ckpt.meta.get("site_classes") or {}
    missing = [s for s in heads if s not in sites]
    if missing:
        raise ValueError(f"checkpoint heads {missing} have no label names and no registered site to read them from")
    return {s: sites[s].load_manifest().label_names for s in heads}


@register_method
class ArkMethod(Method):
    """Foundation Ark (``method=ark``; knobs in ``ark:``)."""

    name = "ark"
    objectives = ("supervised", "clip", "simclr", "mocov2", "vicreg", "slip")
    unit_name = "site-epoch"
    # each site's head (or objective) and the EMA teacher stay at the site (Ark+, Extended Data Fig. 2)
    federated_local = ("model/heads.*", "model/objectives.*", "teacher/*")
    federated_projector = PROJECTOR_PARAMETERS

    @classmethod
    def budget_overrides(cls, cfg: DictConfig, units: int, n_sites: int) -> list[str]:
        """A unit is one site-epoch: ``units`` site-epochs are ``units / n_sites`` rounds."""
        return [f"ark.rounds={max(1, int(round(units / max(n_sites, 1))))}"]

    @classmethod
    def step_budget(cls, cfg: DictConfig, steps: int, train_sizes: dict[str, int]) -> list[str]:
        """Rounds of one site-epoch per site (each site's own batches of ``batch_size``): enough rounds for
        the budget, and the site-epochs capped so that the rounds add up to it (a site with fewer batches
        than the cap gives what it has)."""
        rounds, cap = fit_budget(cfg, steps, [batches_per_pass(n, int(cfg.batch_size)) for n in train_sizes.values()])
        return [f"ark.rounds={rounds}", f"max_steps_per_epoch={cap}"]

    def setup(self, resume: Checkpoint | None) -> int:
        a = self.section
        self.resume = resume
        if resume is not None:
            check_resume(resume, self.name)
        self.loaders = self.data.site_loaders(second_view=True)
        self.site_classes = self.data.site_classes()
        self.student, self.text = build_heads_model(self.cfg, self.sites, self.site_classes, resume)
        if resume is None:
            load_kept_heads(self.student, self.data.site_heads())
        place(self.cfg, self.student, self.text)
        self.teacher = make_teacher(self.student, seed=int(self.cfg.seed) + 1)
        if resume is not None:
            self.teacher.load_state_dict(resume.modules["teacher"], strict=False)  # new sites' heads stay fresh
        order = list(a.order) if a.get("order") else list(self.sites)
        start = resume.position if resume is not None else 0
        if resume is not None and not a.get("order"):
            # keep the run's order; new sites join at the end of each round (as Ark's continual training does)
            old = [n for n in resume.meta["order"] if n in self.sites]
            order = old + [n for n in self.sites if n not in old]
        unknown = [n for n in order if n not in self.sites]
        if unknown:
            raise ValueError(f"ark.order names unknown site(s) {unknown}; sites: {list(self.sites)}")
        if resume is not None and order != resume.meta["order"]:
            start = -(-start // len(resume.meta["order"])) * len(order)  # the set of sites changed: next full round
        self.order = order
        momentum = cosine_schedule(a.momentum_base, 1.0, a.rounds, len(order))
        weight = cosine_schedule(0.0, a.consistency_max, a.rounds, len(order))
        self.schedule = [Unit("ark", {"round": it // len(order), "site": order[it % len(order)],
                                      "momentum": float(momentum[it]), "consistency_weight": float(weight[it])})
                         for it in range(a.rounds * len(order))]
        trainable = list(self.student.parameters()) + (list(self.text.parameters()) if self.text is not None else [])
        if a.optimizer == "sgd":  # the authors' (A.6): SGD, momentum 0.9, Nesterov
            opt = torch.optim.SGD([p for p in trainable if p.requires_grad], lr=a.lr, momentum=0.9, nesterov=True,
                                  weight_decay=a.weight_decay)
        else:
            opt = adamw(trainable, a.lr, a.weight_decay)
        total = sum(steps_per_unit(self.loaders[u.fields["site"]], self.cfg) for u in self.schedule)
        self.use_optimizer(opt, total, resume,
                           restore=resume is not None and resume.meta.get("site_classes") == self.site_classes)
        return start

    def units(self) -> list[Unit]:
        return self.schedule

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        site = unit.fields["site"]
        set_epoch(self.loaders[site], position)
        return ark_site_epoch(self.student, self.teacher, site, self.loaders[site], self.optimizer,
                              consistency_weight=unit.fields["consistency_weight"],
                              momentum=unit.fields["momentum"], ema_mode=self.section.ema_mode,
                              max_steps=self.cfg.max_steps_per_epoch, text_encoder=self.text)

    def current_classifier(self) -> tuple[nn.Module, list[str]] | None:
        if not self.student.heads:
            return None
        return heads_classifier(self.student, self.data.label_names)

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"model": self.student, "teacher": self.teacher}
        if self.text is not None:
            out["text_head"] = self.text.mlp_embed
        return out

    def meta(self) -> dict[str, Any]:
        return {"order": self.order, **heads_meta(self.student, self.sites, self.data.label_names, self.resume)}

    def end_unit(self, unit: Unit, position: int, record: dict, checkpoint: Checkpoint, run: Any) -> None:
        self.data.hand_back_heads({n: self.student.head_state(n) for n in self.student.heads}, position + 1)

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        return pretrained_heads_model(cls, ckpt, cfg, tencrop=bool(cfg.ark.get("tencrop")))
