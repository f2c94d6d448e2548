"""UniChest as a method: conquer (shared query network) then divide (mixture of query-network experts).

Schedule: ``unichest.conquer_epochs`` conquer epochs, then ``unichest.divide_epochs`` divide epochs
(references U.7). Divide starts from the conquer epoch with the best val mean AUC (``conquer.pt``,
``unichest.divide_from: best``). The model is :class:`raycxr.models.unichest.UniChest`; the text
tower is frozen and only its projection (``mlp_embed``) is stored in checkpoints (``text_head``).
A finished run is the query networks of its last stage on the training sites' union class names,
with zero-shot on any class name or prompt and cross-attention maps.

Sites: labelled sites train through ASL on their classes; a site with ``objective: clip`` (reports,
no labels) trains through the image-text contrastive term only (its labels are not used), which
is UniChest's own report branch. Other self-supervised objectives are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import Checkpoint
from ..engine.device import autocast, clone_state, device_of, limited, place, to_device
from ..engine.schedule import adamw, set_epoch, steps_per_unit
from ..losses import asymmetric_loss, image_text_contrastive_loss, source_contrastive_loss
from ..models.classifiers import UniChestClassifier
from ..models.factory import build_encoder, build_text_encoder
from ..models.unichest import UniChest
from ..transforms import cross_site_fourier_mix
from .base import LossLog, Method, Pretrained, TuneKnob, Unit, check_resume
from .registry import register_method

STAGES = ("conquer", "divide")


@dataclass
class UniChestLossConfig:
    """Loss settings; defaults are the authors' (references U.4)."""

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
    fourier_space: str = "image"  # image: mix the [0, 1] images | normalized: the normalised batch, as coded (U.5)


def build_unichest(cfg: DictConfig, *, encoder_checkpoint: bool = True) -> UniChest:
    u = cfg.unichest
    return UniChest(build_encoder(cfg, checkpoint=encoder_checkpoint), n_experts=u.n_experts, lam=u.lam,
                    bias_ratio=u.bias_ratio, scl_dim=u.scl_dim, query=OmegaConf.to_container(u.query, resolve=True),
                    share_norm=bool(u.share_norm))


def batch_texts(batch: dict, class_names: Sequence[str]) -> list[str]:
    """UniChest text per sample: report entities, or the positive class names joined by [SEP]."""
    from ..reports import entity_text

    pos = (batch["targets"] * batch["target_mask"]) >= 0.5
    return [entity_text(r or None, [class_names[j] for j in torch.nonzero(p).flatten().tolist()])
            for r, p in zip(batch["report"], pos)]


def unichest_epoch(model: UniChest, text_encoder: nn.Module, class_names: Sequence[str], loader: Iterable,
                   optimizer: torch.optim.Optimizer, *, stage: str, cfg: UniChestLossConfig | None = None,
                   max_steps: int | None = None, generator: torch.Generator | None = None,
                   on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
    """One UniChest epoch in ``stage`` conquer or divide (references U.4, U.5, U.7).

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
    for batch in limited(loader, max_steps, device_of(model)):
        images, sites = batch["image"], batch["site_index"]
        if cfg.fourier_p > 0:
            if cfg.fourier_space == "normalized":  # the authors mix the normalised batch (U.5)
                mean, std = model.encoder.mean, model.encoder.std
                images = cross_site_fourier_mix((images - mean) / std, sites, p=cfg.fourier_p,
                                                generator=generator) * std + mean
            else:
                images = cross_site_fourier_mix(images, sites, p=cfg.fourier_p, generator=generator)
        with autocast(model):
            loss, terms = unichest_loss(model, text_encoder, class_names, batch, images, stage, cfg, asl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms = {"loss": loss.detach()} | {k: v.detach() for k, v in terms.items()}
        log.add(terms, len(images))
        if on_step:
            on_step(terms)
    return log.means()


def unichest_loss(model: UniChest, text_encoder: nn.Module, class_names: Sequence[str], batch: dict,
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


@torch.no_grad()
def probe_asl(model: UniChest, text: nn.Module, class_names: list[str], probe: dict | None,
              cfg: UniChestLossConfig, stage: str = "conquer") -> float | None:
    """Image ASL (mean over known labels) on the probe batch, in eval mode: a deterministic curve."""
    if probe is None:
        return None
    was = model.training, text.training
    model.eval()
    text.eval()
    probe = to_device(probe, device_of(model))
    prob = model(probe["image"], text(list(class_names)), stage=stage)["prob"].float()
    loss = asymmetric_loss(prob, probe["targets"], probe["target_mask"], gamma_neg=cfg.gamma_neg,
                           gamma_pos=cfg.gamma_pos, clip=cfg.clip, from_probs=True, reduction="mean")
    model.train(was[0])
    text.train(was[1])
    return round(float(loss), 6)


@register_method
class UniChestMethod(Method):
    """UniChest conquer-and-divide (``method=unichest``; knobs in ``unichest:``)."""

    name = "unichest"
    display_name = "UniChest"
    objectives = ("supervised", "clip")
    offers_zero_shot = True
    tune_space = {"lam": TuneKnob("unichest.lam", "tune.lam", "λ (shared-network weight)", "λ"),
                  "K": TuneKnob("unichest.n_experts", "tune.n_experts", "K (query networks)", "K"),
                  "lr": TuneKnob("unichest.lr", "tune.lr", "lr", "lr")}
    # λ and K act only in divide: trials are ranked there; conquer's spread is the run-to-run noise
    tune_ranked_stage, tune_reference_stage = "divide", "conquer"
    tune_metric = ("best val mean AUC over the divide epochs a trial ran (λ and K act only in divide; ASHA may stop "
                   "a trial early). The best conquer epoch is listed for reference: its spread between trials is the "
                   "run-to-run noise.")
    # the encoder, the shared query network (query_networks.0) and the text projection are averaged
    federated_local = ("model/query_networks.[1-9]*", "model/gate.*", "model/scl_head.*")

    @classmethod
    def tune_grid(cls, grid: dict[str, list]) -> dict[str, list]:
        grid = {"lam": [float(x) for x in grid["lam"]], "K": [int(x) for x in grid["K"]],
                "lr": [float(x) for x in grid["lr"]]}
        if any(not 0.0 <= lam <= 1.0 for lam in grid["lam"]):
            raise ValueError(f"tune.lam: λ must be in [0, 1], got {grid['lam']}")
        return grid

    @classmethod
    def tune_epochs(cls, cfg: DictConfig) -> int:
        return int(cfg.unichest.conquer_epochs) + int(cfg.unichest.divide_epochs)

    @classmethod
    def tune_first_rung(cls, cfg: DictConfig) -> int:
        """The first divide epoch: conquer epochs of trials that differ in λ and K differ by initialisation noise."""
        return int(cfg.unichest.conquer_epochs) + 1

    @classmethod
    def budget_overrides(cls, cfg: DictConfig, units: int, n_sites: int) -> list[str]:
        """``unichest.divide_share`` of the units in divide (0: conquer only), the rest in conquer."""
        divide = int(round(units * float(cfg.unichest.divide_share)))
        if float(cfg.unichest.divide_share) > 0:
            divide = min(max(divide, 1), units - 1)
        return [f"unichest.conquer_epochs={units - divide}", f"unichest.divide_epochs={divide}"]

    def setup(self, resume: Checkpoint | None) -> int:
        u = self.section
        self.union = self.data.union
        self.loader = self.data.union_loader()
        self.probe_batch = self.data.probe()
        self.model = build_unichest(self.cfg)
        self.text = build_text_encoder(self.cfg, self.model.encoder.dim)
        place(self.cfg, self.model, self.text)
        self.loss_cfg = UniChestLossConfig(**OmegaConf.to_container(u.loss, resolve=True))
        self.schedule = [Unit("conquer", {"stage": "conquer", "epoch": e}) for e in range(u.conquer_epochs)] + \
            [Unit("divide", {"stage": "divide", "epoch": e}) for e in range(u.divide_epochs)]
        self.resume, self.opt_stage = resume, None
        self.best_auc: float | None = None
        self.best_state: dict | None = None
        start = 0
        if resume is not None:
            check_resume(resume, self.name)
            self.model.load_state_dict(resume.modules["model"])
            self.text.mlp_embed.load_state_dict(resume.modules["text_head"])
            # the queries are class-name text: a site added on resume brings its classes with it
            self.best_auc = resume.meta.get("best_conquer_auc")
            start = resume.position
        self.generator = torch.Generator().manual_seed(int(self.cfg.seed) + start)
        return start

    def units(self) -> list[Unit]:
        return self.schedule

    def start_unit(self, unit: Unit, position: int) -> None:
        if self.opt_stage == unit.stage:
            return
        u = self.section
        if unit.stage == "divide" and position == u.conquer_epochs:
            if u.divide_from == "best":
                self._load_best_conquer()
            if u.expert_init == "copy":  # at the switch only: a divide resumed later keeps its trained experts
                self.model.copy_shared_to_experts()
                print("divide: experts start as copies of the shared query network, gate uniform")
        self.model.set_stage(unit.stage)
        r = self.resume
        n_stage = sum(1 for x in self.schedule if x.stage == unit.stage)
        self.use_optimizer(adamw(list(self.model.parameters()) + list(self.text.parameters()), u.lr, u.weight_decay),
                           n_stage * steps_per_unit(self.loader, self.cfg), r,
                           restore=r is not None and r.meta.get("stage") == unit.stage)
        self.opt_stage = unit.stage

    def _load_best_conquer(self) -> None:
        """Divide starts from the conquer epoch with the best val mean AUC, not simply the last one. The
        authors select by ChestX-ray14's val AUC (references U.6); deliberate difference: here the val
        split of every training site counts, since no site is privileged."""
        state = self.best_state
        snapshot = self.run.out / "conquer.pt" if self.run is not None else None
        if state is None and self.best_auc is not None and snapshot is not None and snapshot.is_file():
            c = Checkpoint.load(snapshot)  # resumed exactly at the stage boundary
            state = {"position": c.position, **c.modules}
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.text.mlp_embed.load_state_dict(state["text_head"])
        print(f"divide starts from conquer epoch {state['position'] - 1} (val AUC {self.best_auc})")

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        set_epoch(self.loader, position)
        return unichest_epoch(self.model, self.text, self.union.names, self.loader, self.optimizer, stage=unit.stage,
                              cfg=self.loss_cfg, max_steps=self.cfg.max_steps_per_epoch, generator=self.generator)

    def probe(self, unit: Unit | None) -> dict[str, Any]:
        stage = unit.stage if unit is not None else "conquer"
        return {"probe_asl": probe_asl(self.model, self.text, self.union.names, self.probe_batch, self.loss_cfg,
                                       stage=stage)}

    def current_classifier(self) -> tuple[nn.Module, list[str]]:
        with torch.no_grad():
            emb = self.text(list(self.union.names))
        return UniChestClassifier(self.model, emb, self.model.stage), list(self.union.names)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "text_head": self.text.mlp_embed}

    def meta(self) -> dict[str, Any]:
        return {"stage": self.model.stage, "class_names": list(self.union.names), "best_conquer_auc": self.best_auc,
                "site_index": {n: i for i, n in enumerate(self.sites)}}

    def after_unit(self, unit: Unit, position: int, record: dict) -> None:
        auc = record.get("val_auc")
        self.improved = unit.stage == "conquer" and auc is not None and (self.best_auc is None or auc >= self.best_auc)
        if self.improved:
            self.best_auc = auc

    def end_unit(self, unit: Unit, position: int, record: dict, checkpoint: Checkpoint, run: Any) -> None:
        if unit.stage != "conquer":
            return
        last_conquer = position + 1 == len(self.schedule) or self.schedule[position + 1].stage != "conquer"
        if self.improved:
            self.best_state = {"position": position + 1, "model": clone_state(checkpoint.modules["model"]),
                               "text_head": clone_state(checkpoint.modules["text_head"])}
            run.save(checkpoint.slim(), "conquer.pt")  # the best conquer epoch by val AUC: divide starts from it
        elif self.best_auc is None and last_conquer:
            run.save(checkpoint.slim(), "conquer.pt")  # no validation data: the last conquer epoch

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        model = build_unichest(cfg, encoder_checkpoint=False)
        model.load_state_dict(ckpt.modules["model"])
        text = build_text_encoder(cfg, model.encoder.dim)
        text.mlp_embed.load_state_dict(ckpt.modules["text_head"])
        text.eval()
        names = list(ckpt.meta["class_names"])
        model.set_stage(ckpt.meta.get("stage", "conquer"))
        with torch.no_grad():
            emb = text(names)
        classifier = UniChestClassifier(model, emb, model.stage)

        def zero_shot(prompts: list[str]) -> UniChestClassifier:
            with torch.no_grad():
                return UniChestClassifier(model, text(list(prompts)), model.stage)

        return Pretrained(method=cls.name, classifier=classifier, encoder=model.encoder, class_names=names,
                          image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source,
                          zero_shot=zero_shot, attention=classifier.attention, extra={"text": text})

