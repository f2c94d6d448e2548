"""Model factories: the one place a config becomes an image encoder, a text encoder or a linear classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .encoders import ImageEncoder


def build_encoder(cfg: Any, *, checkpoint: bool = True) -> ImageEncoder:
    """The run's image encoder from ``cfg.encoder`` at ``cfg.transforms.size``.

    ``checkpoint=False`` ignores ``encoder.checkpoint`` (a finished run's weights replace it anyway)."""
    e = cfg.encoder
    return ImageEncoder(e.name, embed_dim=e.get("embed_dim"), checkpoint=e.get("checkpoint") if checkpoint else None,
                        img_size=cfg.transforms.size, drop_path_rate=e.get("drop_path_rate"), norm=e.get("norm"),
                        patch_size=e.get("patch_size"))


def build_text_encoder(cfg: Any, dim: int) -> nn.Module:
    """The frozen BERT-family text tower with a trainable projection to ``dim`` (``cfg.text``)."""
    from ..text import TextEncoder, text_model_dir

    t = cfg.text
    model_dir = t.model_dir or text_model_dir(t.kind)
    return TextEncoder(model_dir, embed_dim=dim, max_length=t.max_length, freeze=True,
                       cache_size=int(t.cache_size or 0), train_projection=bool(t.train_projection))


class LinearClassifier(nn.Module):
    """Image encoder + one linear head on the pooled embedding; ``forward`` returns logits ``(B, C)``.

    The model of the union-head baselines (``mixed``, ``single``) and of downstream fine-tuning.

    Args:
        encoder: the image encoder (its ``dim`` is the head's input).
        n_classes: outputs of the head.
    """

    def __init__(self, encoder: ImageEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[0])
