"""Trained models as the classifier that evaluation scores, export writes to ONNX and the runtime runs.

Each maps ``(B, 1, S, S)`` images in [0, 1] (the output of :func:`raycxr.readers.resize`) to
probabilities ``(B, C)``; a method module (:mod:`raycxr.methods`) says which one a run becomes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..labels import UnionLabelSpace
from .ark import ArkModel
from .encoders import ImageEncoder
from .unichest import UniChest


class Probabilities(nn.Module):
    """σ of a model that returns logits (the union-head baselines, fine-tuned classifiers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


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
    """Ark-style per-site heads averaged into the union label space: a union class's probability is
    the mean of σ(logit) over the heads that have that class (heads are kept by site name)."""

    def __init__(self, model: ArkModel, site_labels: dict[str, list[str]], union: UnionLabelSpace) -> None:
        super().__init__()
        self.model = model
        self.sites = [s for s in site_labels if s in model.heads]
        rows = sum(len(site_labels[s]) for s in self.sites)
        avg = torch.zeros(rows, len(union))
        r = 0
        for s in self.sites:
            for j in union.site_index[s]:
                if j >= 0:
                    avg[r, j] = 1.0
                r += 1
        # mean over the heads that annotate a class; classes no head has stay at 0
        avg = avg / avg.sum(0, keepdim=True).clamp_min(1.0)
        self.register_buffer("average", avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.model.projector(self.model.encoder(x)[0])
        probs = torch.cat([torch.sigmoid(self.model.heads[s](proj)) for s in self.sites], dim=1)
        return probs @ self.average


class TenCrop(nn.Module):
    """Test-time averaging over ten crops (Ark's test transform, references A.5): the image enlarged by
    ``scale`` (256/224), its four corners and its centre at the original size, each also mirrored; the
    output is the mean of the ten probability vectors.

    Args:
        classifier: images ``(B, 1, S, S)`` → probabilities.
        scale: the enlargement before cropping.
    """

    def __init__(self, classifier: nn.Module, scale: float = 256 / 224) -> None:
        super().__init__()
        self.classifier = classifier
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        big = int(round(s * self.scale))
        up = torch.nn.functional.interpolate(x, size=(big, big), mode="bilinear", align_corners=False)
        o = big - s
        crops = [up[..., :s, :s], up[..., :s, o:], up[..., o:, :s], up[..., o:, o:],
                 up[..., o // 2:o // 2 + s, o // 2:o // 2 + s]]
        views = torch.cat(crops + [c.flip(-1) for c in crops])
        return self.classifier(views).reshape(10, x.shape[0], -1).mean(0)


class EmbeddingModel(nn.Module):
    """The encoder alone: images → pooled embedding ``(B, D)`` (for ONNX export and linear probes)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]
