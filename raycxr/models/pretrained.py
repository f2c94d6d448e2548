"""A pretraining run as a model you can use: one classifier over the union classes, the encoder, metadata.

``load_pretrained(run)`` reads ``checkpoint.pt`` from a run folder (or a checkpoint dict) of any
method and returns a :class:`Pretrained` whose ``classifier`` maps ``(B, 1, S, S)`` images in
[0, 1] (the output of :func:`raycxr.readers.resize`) to probabilities ``(B, C)`` over
``class_names``. That module is what evaluation scores, what ``raycxr export`` writes to ONNX and
what the hospital runtime runs, so there is one definition of "the model's prediction":

- **UniChest**: the query networks of the checkpoint's stage (σ(s1) after conquer, Eq. 5 after
  divide) with the class-name text embeddings computed once and stored as a buffer.
- **Ark / concurrent**: every site head on the shared projection; a union class's probability is
  the mean of σ(logit) over the heads that have that class (the heads are kept by site name).
- **mixed / single**: σ of the union head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..labels import UnionLabelSpace
from .ark import ArkModel
from .encoders import ImageEncoder
from .unichest import UniChest


class UniChestClassifier(nn.Module):
    """UniChest with fixed class embeddings: images → probabilities (and attention maps on request)."""

    def __init__(self, model: UniChest, class_emb: torch.Tensor, stage: str) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_emb", class_emb.detach().clone())
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.class_emb, stage=self.stage)["prob"]

    @torch.no_grad()
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Last-layer cross-attention of the shared query network, ``(B, C, N)`` over image tokens."""
        return self.model(x, self.class_emb, stage="conquer")["attn"]


class HeadsClassifier(nn.Module):
    """Ark-style per-site heads averaged into the union label space."""

    def __init__(self, model: ArkModel, site_labels: dict[str, list[str]], union: UnionLabelSpace) -> None:
        super().__init__()
        self.model = model
        self.sites = [s for s in site_labels if s in model.heads]
        rows = sum(len(site_labels[s]) for s in self.sites)
        avg = torch.zeros(rows, len(union))
        r = 0
        for s in self.sites:
            for j in union.site_index[s]:
                avg[r, j] = 1.0
                r += 1
        # mean over the heads that annotate a class; classes no head has stay at 0
        avg = avg / avg.sum(0, keepdim=True).clamp_min(1.0)
        self.register_buffer("average", avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.model.projector(self.model.encoder(x)[0])
        probs = torch.cat([torch.sigmoid(self.model.heads[s](proj)) for s in self.sites], dim=1)
        return probs @ self.average


class UnionHeadClassifier(nn.Module):
    """Encoder + one linear head over the union classes (the mixing and single-site baselines)."""

    def __init__(self, encoder: ImageEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.encoder(x)[0]))


class EmbeddingModel(nn.Module):
    """The encoder alone: images → pooled embedding ``(B, D)`` (for ONNX export and linear probes)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


@dataclass
class Pretrained:
    """What a run produced, ready to use. ``classifier(x)`` returns probabilities over ``class_names``."""

    method: str
    classifier: nn.Module
    encoder: ImageEncoder
    class_names: list[str]
    image_size: int
    sites: list[str]
    config: dict
    source: str
    text: nn.Module | None = None
    site_labels: dict[str, list[str]] = field(default_factory=dict)

    @property
    def embedding_model(self) -> EmbeddingModel:
        return EmbeddingModel(self.encoder).eval()

    def zero_shot_classifier(self, names: list[str]) -> UniChestClassifier:
        """UniChest on any class names or prompts (text embeddings computed now)."""
        if self.method != "unichest" or self.text is None:
            raise ValueError(f"zero-shot needs a UniChest run with its text encoder; this run is '{self.method}'")
        with torch.no_grad():
            emb = self.text(list(names))
        return UniChestClassifier(self.classifier.model, emb, self.classifier.stage).eval()


def load_pretrained(run: str | Path | dict, *, text_model_dir: str | None = None) -> Pretrained:
    """Build a :class:`Pretrained` from a run folder, a ``checkpoint.pt`` or an already loaded state."""
    from ..train.local import build_encoder, build_text_encoder, load_checkpoint

    source = "<state>" if isinstance(run, dict) else str(run)
    state = run if isinstance(run, dict) else load_checkpoint(run)
    if "config" not in state or "method" not in state:
        raise ValueError(f"{source} is not a raycxr pretraining checkpoint (no 'method'/'config')")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(state["config"])
    if text_model_dir:
        cfg.text.model_dir = text_model_dir
    method = state["method"]
    encoder = build_encoder(OmegaConf.merge(cfg, {"encoder": {"checkpoint": None}}))
    size = int(cfg.transforms.size)
    text, site_labels = None, {}
    if method == "unichest":
        u = cfg.unichest
        model = UniChest(encoder, n_experts=u.n_experts, lam=u.lam, bias_ratio=u.bias_ratio, scl_dim=u.scl_dim,
                         query=OmegaConf.to_container(u.query, resolve=True))
        model.load_state_dict(state["model"])
        text = build_text_encoder(cfg, encoder.dim)
        text.load_state_dict(state["text_encoder"])
        text.eval()
        names = list(state["class_names"])
        with torch.no_grad():
            emb = text(names)
        model.set_stage(state.get("stage", "conquer"))
        classifier: nn.Module = UniChestClassifier(model, emb, model.stage)
    elif method in ("ark", "concurrent"):
        site_labels = _site_labels(state, cfg)
        model = ArkModel(encoder, {}, proj_dim=cfg.ark.proj_dim, mlp_projector=cfg.ark.mlp_projector)
        for s, n in state.get("site_classes", {s: len(v) for s, v in site_labels.items()}).items():
            model.add_head(s, n)
        if state.get("site_objectives"):
            from ..objectives import make_objective

            for s, kind in state["site_objectives"].items():
                model.add_objective(s, make_objective(kind, model.proj_dim, text_dim=model.proj_dim))
        model.load_state_dict(state["model"])
        union = UnionLabelSpace.build({s: site_labels[s] for s in model.heads})
        names = union.names
        classifier = HeadsClassifier(model, site_labels, union)
    elif method in ("mixed", "single"):
        names = list(state["class_names"])
        classifier = UnionHeadClassifier(encoder, len(names))
        classifier.load_state_dict(state["model"])
    else:
        raise ValueError(f"{source}: unknown method '{method}'")
    classifier.eval()
    sites = list(state.get("site_names") or cfg.get("site_names") or list(site_labels) or [])
    return Pretrained(method=method, classifier=classifier, encoder=encoder, class_names=list(names), image_size=size,
                      sites=sites, config=state["config"], source=source, text=text, site_labels=site_labels)


def _site_labels(state: dict, cfg: Any) -> dict[str, list[str]]:
    """Each head's label names: stored in new checkpoints, else read from the registered sites."""
    if state.get("site_labels"):
        return {k: list(v) for k, v in state["site_labels"].items()}
    from ..sites.config import discover_sites

    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    missing = [s for s in state["site_classes"] if s not in sites]
    if missing:
        raise ValueError(f"checkpoint heads {missing} have no label names and no registered site to read them from")
    return {s: sites[s].load_manifest().label_names for s in state["site_classes"]}
