"""Image encoder: any timm backbone by name, one input channel, pooled embedding + spatial tokens.

``ImageEncoder(x)`` takes ``(B, 1, H, W)`` images in [0, 1] (as :mod:`raycxr.readers` gives them),
normalises them inside the module (so an exported ONNX model needs no separate preprocessing), and
returns ``(pooled (B, D), tokens (B, N, D))``: tokens are the last feature map flattened (CNNs,
Swin) or the patch tokens (ViT, prefix tokens dropped); pooled is their mean. An optional token MLP
(``Linear → ReLU → Linear``, UniChest U.1) maps the backbone width to ``embed_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

# Small backbones for CPU runs, then the ones the papers use.
KNOWN_BACKBONES = {
    "resnet18": "small CNN for CPU runs",
    "resnet50": "UniChest default (ModelRes)",
    "densenet121": "UniChest alternative (ModelDense)",
    "swin_base_patch4_window7_224": "Ark (Swin-B)",
    "vit_base_patch16_224": "ViT-B",
    "vit_tiny_patch16_224": "small ViT for CPU runs",
    "swin_tiny_patch4_window7_224": "small Swin for CPU runs",
}


NORMS = ("default", "batch", "group")


def norm_layer(kind: str, backbone: str) -> type | Callable:
    """The normalisation layer ``norm`` asks a CNN backbone to use instead of BatchNorm.

    ``group``: GroupNorm (32 groups, or fewer for narrow layers). It does not depend on the batch, so
    a model trained on one site's batches at a time (Ark's site-epochs, the concurrent baseline's
    per-site batches) sees the same normalisation in training and evaluation; with BatchNorm the
    running statistics end up those of the last site trained, and the features of the others shift."""
    if kind not in NORMS:
        raise ValueError(f"encoder.norm must be one of {NORMS}, got '{kind}'")
    if not backbone.startswith(("resnet", "resnext", "seresnet", "wide_resnet")):
        raise ValueError(f"encoder.norm={kind} is offered for ResNet-family backbones; '{backbone}' uses its own "
                         "normalisation (ViT, Swin and ConvNeXt use LayerNorm, which does not depend on the batch)")

    def group_norm(channels: int, **_: object) -> nn.GroupNorm:
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)

    return group_norm


class ImageEncoder(nn.Module):
    """A timm backbone that returns ``(pooled, tokens)`` for one-channel radiographs."""

    def __init__(self, name: str = "resnet18", *, embed_dim: int | None = None, checkpoint: str | Path | None = None,
                 drop_path_rate: float | None = None, img_size: int | None = None, norm: str | None = None,
                 patch_size: int | None = None) -> None:
        super().__init__()
        kw: dict = {}
        if drop_path_rate is not None:
            kw["drop_path_rate"] = drop_path_rate
        if norm not in (None, "default", "batch"):
            kw["norm_layer"] = norm_layer(norm, name)
        if img_size is not None and ("vit" in name or "swin" in name):
            kw["img_size"] = img_size
        if patch_size is not None:
            if "vit" not in name:
                raise ValueError(f"encoder.patch_size is for ViT backbones; '{name}' has no patches")
            kw["patch_size"] = int(patch_size)  # the patch embedding is built for it (no pretrained weights here)
        try:
            # pretrained=False: no hub downloads at run time; weights come from `checkpoint`
            self.backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=1, **kw)
        except RuntimeError as e:
            raise ValueError(f"unknown timm backbone '{name}': {e}") from None
        self.name = name
        self.width = self.backbone.num_features
        self.nhwc = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        self.prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        # grey image = mean of the RGB channels, so the grey statistics are the channel means
        mean, std = (self.backbone.pretrained_cfg.get(k, (0.5,)) for k in ("mean", "std"))
        mean, std = sum(mean) / len(mean), sum(std) / len(std)
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.token_mlp = (nn.Sequential(nn.Linear(self.width, self.width), nn.ReLU(inplace=True),
                                        nn.Linear(self.width, embed_dim)) if embed_dim else nn.Identity())
        self.dim = embed_dim or self.width
        if checkpoint:
            self.load_backbone(checkpoint)

    def load_backbone(self, path: str | Path) -> None:
        """Load backbone weights from a file (a timm/torchvision state dict, or a raycxr checkpoint's
        ``encoder``); a 3-channel first convolution is folded to one channel as timm does."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("encoder", "state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        own = self.backbone.state_dict()
        for k, v in list(state.items()):
            if k in own and v.ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
                state[k] = timm.models.adapt_input_conv(1, v)
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if len(missing) > len(own) // 2:
            raise ValueError(f"encoder checkpoint {path} does not fit backbone '{self.name}' "
                             f"({len(missing)} of {len(own)} weights missing)")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone tokens ``(B, N, width)`` before the token MLP."""
        f = self.backbone.forward_features((x - self.mean) / self.std)
        if f.ndim == 4:
            f = f.flatten(1, 2) if self.nhwc else f.flatten(2).transpose(1, 2)
        elif self.prefix_tokens:
            f = f[:, self.prefix_tokens:]
        return f

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.token_mlp(self.tokens(x))
        return t.mean(1), t
