"""UmiF: every kind of site supervision in one ViT (unified token space + flexible token grouping).

``method=umif`` (knobs in ``umif:``) trains one timm ViT (``umif.vit``) on image-supervision pairs
drawn from every site (paper: "Unify all common supervisions...", §3 and Algorithm 1):

- a pair is an image with one supervision: its report (image-report), its labels as a prompt
  (image-class, :func:`class_prompt`), the localisation the site rendered as a mask image inside the
  site actor (image-segment, :func:`raycxr.dataset.render_annotation`), or nothing (image-only);
- pair types are drawn with probability proportional to their data size, then pairs of that type
  (:func:`raycxr.dataset.sample_pairs`), so every pair has about the same chance and a batch mixes
  pair types and sites;
- the flexible token grouping splits each pair's tokens in two groups (r = 1 with probability ``p``,
  else r ~ U[0, 1]); the groups' CLS encodings f1, f0 are the positive pair of the alignment loss
  (Eq. 1) and both predict the EMA teacher's CLS on the complete sequence (Eq. 2).

A finished run is the image tower alone (:class:`~raycxr.models.umif.UmiFImageEncoder`, image tokens
only) with a linear head whose rows are the class prompts' text encodings through the same ViT
(zero-shot, no label fitting), so ``raycxr eval`` (linear probe too), ``raycxr export`` and the runtime
work as for the other methods.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import Checkpoint
from ..dataset import sample_pairs
from ..engine.device import autocast, device_of, limited, place, to_device
from ..engine.schedule import adamw, set_epoch, steps_per_unit
from ..losses import byol_consistency_loss, ema_update, umif_alignment_loss
from ..models.factory import build_text_encoder
from ..models.umif import UmiF, UmiFImageEncoder, sample_ratios, scheduled_p
from .base import LossLog, Method, Pretrained, TuneKnob, Unit, check_resume
from .registry import register_method

PROMPT = "Chest X-ray showing {}."  # own wording (the paper's templates are in its appendix A.3)
NEGATIVE_PROMPT = "Chest X-ray with none of the listed findings."


def class_prompt(names: Sequence[str], targets: torch.Tensor, mask: torch.Tensor, prompt: str = PROMPT,
                 negative: str = NEGATIVE_PROMPT) -> str:
    """One pair's labels as text: the known positive classes in one prompt, or the negative prompt."""
    pos = [n for n, t, m in zip(names, targets.tolist(), mask.tolist()) if m > 0 and t > 0.5]
    if not pos:
        return negative
    return prompt.format(pos[0] if len(pos) == 1 else ", ".join(pos[:-1]) + " and " + pos[-1])


def pair_types_of(batch: dict, *, segment: bool = True) -> list[list[str]]:
    """The pair types each sample of a batch supports (what its site sent with it)."""
    n = len(batch["image"])
    reports = batch.get("report") or [""] * n
    known = batch["target_mask"].sum(1) > 0 if "target_mask" in batch else torch.zeros(n, dtype=torch.bool)
    ann = batch.get("has_annotation")
    offer = batch.get("pair_offer")  # what the sample's site declares (site YAML pair_types); absent: all
    out = []
    for j in range(n):
        ok = offer[j].tolist() if offer is not None else [True, True, True]
        t = []
        if ok[0] and isinstance(reports[j], str) and reports[j].strip():
            t.append("image-report")
        if ok[1] and bool(known[j]):
            t.append("image-class")
        if ok[2] and segment and ann is not None and bool(ann[j]):
            t.append("image-segment")
        out.append(t or ["image-only"])
    return out


class UmiFTokenizer:
    """Language side of the unified token space: the text model's tokenizer (``cfg.text``), and its
    word-embedding table for :class:`~raycxr.models.umif.UmiF` (the text tower itself is not kept)."""

    def __init__(self, cfg: DictConfig) -> None:
        text = build_text_encoder(cfg, 8)
        self.tokenizer = text.tokenizer
        self.max_length = int(text.max_length)
        self.word_embeddings = text.backbone.get_input_embeddings().weight.detach().clone()

    def __call__(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.tokenizer([t or "" for t in texts], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt")
        return b["input_ids"].to(device), b["attention_mask"].to(device).bool()


class UmiFBatcher:
    """A collated site batch → the unified token inputs of B sampled pairs (Algorithm 1's batch).

    Args:
        tokenizer: the language tokenizer.
        class_names: the union class order of ``targets``.
        segment: image-segment pairs take part (off: the ablation without them).
    """

    def __init__(self, tokenizer: UmiFTokenizer, class_names: Sequence[str], *, segment: bool = True,
                 prompt: str = PROMPT, negative: str = NEGATIVE_PROMPT) -> None:
        self.tokenizer, self.names, self.segment = tokenizer, list(class_names), segment
        self.prompt, self.negative = prompt, negative

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict[str, Any]:
        device = batch["image"].device
        pairs = sample_pairs(pair_types_of(batch, segment=self.segment), len(batch["image"]), rng)
        idx = torch.tensor([j for j, _ in pairs], device=device)
        kinds = [t for _, t in pairs]
        texts = []
        for j, t in pairs:
            if t == "image-report":
                texts.append(batch["report"][j])
            elif t == "image-class":
                texts.append(class_prompt(self.names, batch["targets"][j], batch["target_mask"][j], self.prompt,
                                          self.negative))
            else:
                texts.append("")
        ids, att = self.tokenizer(texts, device)
        is_text = torch.tensor([t in ("image-report", "image-class") for t in kinds], device=device)
        out = {"images": batch["image"][idx], "text_ids": ids, "text_valid": att & is_text[:, None], "kinds": kinds}
        if "annotation" in batch:
            out["masks"] = batch["annotation"][idx]
            out["mask_valid"] = torch.tensor([t == "image-segment" for t in kinds], device=device)
        return out


def umif_step_losses(student: UmiF, teacher: UmiF | None, inputs: dict, *, p: float, tau: float,
                     con_weight: float, generator: torch.Generator | None = None,
                     r_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
    """L_align + λ·L_con on one batch of pairs (the teacher off: L_align alone)."""
    keys = ("text_ids", "text_valid", "masks", "mask_valid")
    tokens, v_i, v_s = student.tokens(inputs["images"], *(inputs.get(k) for k in keys))
    r = sample_ratios(len(tokens), p, generator, r_range)
    f1, f0 = student.grouped(tokens, v_i, v_s, r, generator)
    align = umif_alignment_loss(f1.float(), f0.float(), tau)
    out = {"align": align, "r_mean": r.mean()}
    loss = align
    if teacher is not None and con_weight > 0:
        with torch.no_grad():
            t_tokens, t_i, t_s = teacher.tokens(inputs["images"], *(inputs.get(k) for k in keys))
            t = teacher.complete(t_tokens, t_i, t_s)
        con = byol_consistency_loss(t.float(), f0.float(), f1.float())
        out["con"] = con
        loss = loss + con_weight * con
    out["loss"] = loss
    return out


class PromptHeadClassifier(nn.Module):
    """Image-only UmiF: ``σ(cos(CLS, prompt_c) / τ)`` per class, a linear head on the normalised CLS whose
    rows are the class prompts' encodings (group 0 over language tokens alone). Exports with image tokens only."""

    def __init__(self, encoder: UmiFImageEncoder, prompt_features: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(prompt_features.shape[1], prompt_features.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(prompt_features.float(), dim=1) / float(tau))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(F.normalize(self.encoder(x)[0], dim=1)))


@torch.no_grad()
def prompt_features(model: UmiF, tokenizer: UmiFTokenizer, names: Sequence[str], prompt: str = PROMPT) -> torch.Tensor:
    ids, att = tokenizer([prompt.format(n) for n in names], device_of(model))
    was = model.training
    model.eval()
    out = model.text_features(ids, att)
    model.train(was)
    return out


def build_umif(cfg: DictConfig, tokenizer: UmiFTokenizer) -> UmiF:
    """The student from the config (``umif.vit`` at ``transforms.size``)."""
    s = cfg.umif
    encoder = UmiFImageEncoder(str(s.vit), img_size=int(cfg.transforms.size), drop_path_rate=s.get("drop_path_rate"))
    return UmiF(encoder, tokenizer.word_embeddings, tokenizer.max_length)


@register_method
class UmiFMethod(Method):
    """UmiF (``method=umif``; knobs in ``umif:``)."""

    name = "umif"
    objectives = None  # every site takes part with whatever supervision its manifest has, whatever its objective
    offers_zero_shot = True
    # the grouping, the temperature and the r schedule
    tune_space = {"p": TuneKnob("umif.p", "tune.umif.p", "p (P(r = 1))"),
                  "tau": TuneKnob("umif.tau", "tune.umif.tau", "τ (alignment temperature)"),
                  "p_end": TuneKnob("umif.p_end", "tune.umif.p_end", "p_end (r schedule)")}
    segmentation_by_default = True  # it learns from localisation (image-segment pairs): eval checks what it gave

    @classmethod
    def tune_grid(cls, grid: dict[str, list]) -> dict[str, list]:
        grid = {col: [None if x is None else float(x) for x in vals] for col, vals in grid.items()}
        for col in ("p", "p_end"):
            if any(x is not None and not 0.0 <= x <= 1.0 for x in grid[col]):
                raise ValueError(f"tune.umif.{col}: must be in [0, 1], got {grid[col]}")
        if any(x is None or x <= 0 for x in grid["tau"]):
            raise ValueError(f"tune.umif.tau: τ must be > 0, got {grid['tau']}")
        return grid

    def setup(self, resume: Checkpoint | None) -> int:
        s = self.section
        if resume is not None:
            check_resume(resume, self.name)
        # the run's encoder is the UmiF ViT: recorded so a checkpoint's config names it (export metadata)
        OmegaConf.update(self.cfg, "encoder.name", str(s.vit), force_add=True)
        OmegaConf.update(self.cfg, "encoder.embed_dim", None)  # the ViT width: the CLS is the embedding
        self.tokenizer = UmiFTokenizer(self.cfg)
        self.model = build_umif(self.cfg, self.tokenizer)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False) if bool(s.teacher) else None
        if resume is not None:
            self.model.load_state_dict(resume.modules["model"])
            if self.teacher is not None and "teacher" in resume.modules:
                self.teacher.load_state_dict(resume.modules["teacher"])
        place(self.cfg, self.model, self.teacher)
        self.union = self.data.union
        self.batcher = UmiFBatcher(self.tokenizer, self.union.names, segment=bool(s.segment_pairs),
                                   prompt=str(s.prompt), negative=str(s.negative_prompt))
        self.loader = self.data.union_loader(second_view="annotation")  # masks rendered inside each site
        self.probe_batch = self.data.probe()
        self.steps_per_epoch = steps_per_unit(self.loader, self.cfg)
        self.total_steps = int(s.epochs) * self.steps_per_epoch
        self.p_at(0)  # a bad p / p_end fails here, not mid-run
        self._r_range()
        self.use_optimizer(adamw(self.model.parameters(), float(s.lr), float(s.weight_decay)), self.total_steps, resume)
        return resume.position if resume is not None else 0

    def units(self) -> list[Unit]:
        return [Unit("epoch", {"epoch": e}) for e in range(int(self.section.epochs))]

    def _r_range(self) -> tuple[float, float]:
        lo, hi = (float(x) for x in (self.section.get("r_range") or (0.0, 1.0)))
        return lo, hi

    def p_at(self, step: int) -> float:
        """P(r = 1) at optimiser step ``step`` of the run (the r schedule: ``umif.p`` → ``umif.p_end``)."""
        s = self.section
        return scheduled_p(float(s.p), s.get("p_end"), step / max(1, self.total_steps - 1))

    def _losses(self, inputs: dict, p: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        s = self.section
        return umif_step_losses(self.model, self.teacher, inputs, p=p, tau=float(s.tau),
                                con_weight=float(s.con_weight), generator=generator, r_range=self._r_range())

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        set_epoch(self.loader, position)
        self.model.train()
        rng = np.random.default_rng([int(self.cfg.seed), int(position)])  # pair sampling repeats on resume
        log, kinds = LossLog(), {}
        for i, batch in enumerate(limited(self.loader, self.cfg.max_steps_per_epoch, device_of(self.model))):
            inputs = self.batcher(batch, rng)
            p = self.p_at(position * self.steps_per_epoch + i)  # a function of the step: resume continues it
            with autocast(self.model):
                terms = self._losses(inputs, p)
            terms["p"] = torch.tensor(p)
            self.optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            self.optimizer.step()
            if self.teacher is not None:
                ema_update(self.teacher, self.model, float(self.section.momentum))
            log.add({k: v.detach() for k, v in terms.items()}, len(inputs["images"]))
            for k in inputs["kinds"]:
                kinds[k] = kinds.get(k, 0) + 1
        return log.means() | {f"pairs_{k.replace('-', '_')}": v for k, v in sorted(kinds.items())}

    @torch.no_grad()
    def probe(self, unit: Unit | None) -> dict[str, Any]:
        """The loss on the fixed probe batch with fixed pair sampling, grouping and teacher (eval mode)."""
        if self.probe_batch is None:
            return {}
        was = self.model.training
        self.model.eval()
        batch = to_device(self.probe_batch, device_of(self.model))
        inputs = self.batcher(batch, np.random.default_rng(0))
        g = torch.Generator().manual_seed(0)
        s = self.section
        terms = umif_step_losses(self.model, None, inputs, p=float(s.p), tau=float(s.tau), con_weight=0.0,
                                 generator=g, r_range=self._r_range())
        self.model.train(was)
        return {"probe_align": round(float(terms["align"]), 6)}

    def current_classifier(self) -> tuple[nn.Module, list[str]]:
        feats = prompt_features(self.model, self.tokenizer, self.union.names, str(self.section.prompt))
        return PromptHeadClassifier(self.model.encoder, feats, float(self.section.tau)).eval(), list(self.union.names)

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"model": self.model}
        if self.teacher is not None:
            out["teacher"] = self.teacher
        return out

    def meta(self) -> dict[str, Any]:
        return {"class_names": list(self.union.names), "vit": str(self.section.vit)}

    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        tokenizer = UmiFTokenizer(cfg)
        model = build_umif(cfg, tokenizer)
        model.load_state_dict(ckpt.modules["model"])
        model.eval()
        s = cfg.umif
        names = list(ckpt.meta["class_names"])

        def zero_shot(labels: list[str]) -> nn.Module:
            return PromptHeadClassifier(model.encoder, prompt_features(model, tokenizer, labels, str(s.prompt)),
                                        float(s.tau))

        @torch.no_grad()
        def encode_text(texts: list[str]) -> torch.Tensor:
            """Reports (any text) as group 0's CLS over their language tokens (image-report retrieval)."""
            return model.text_features(*tokenizer(list(texts), device_of(model)))

        return Pretrained(method=cls.name, classifier=zero_shot(names), encoder=model.encoder, class_names=names,
                          image_size=ckpt.image_size, sites=ckpt.site_names, config=ckpt.config, source=ckpt.source,
                          zero_shot=zero_shot,
                          extra={"umif": model, "tokenizer": tokenizer, "encode_text": encode_text})
