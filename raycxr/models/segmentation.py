"""A raycxr encoder backbone as a multi-scale feature extractor under a MONAI UNet decoder (``raycxr segment``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from ..checkpoint import Checkpoint

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
MIN_LOADED_FRACTION = 0.9  # of the feature extractor's tensors that must come from the run


def _key_candidates(key: str) -> list[str]:
    """Names a ``features_only`` tensor may have in the plain model: itself, without the ``model.`` prefix of
    timm's FeatureGetterNet, and with one ``_`` of its first component back to ``.`` (timm flattens
    ``layers.0`` into ``layers_0``, ``features.conv0`` into ``features_conv0``)."""
    out = []
    for k in dict.fromkeys([key, key.removeprefix("model.")]):
        out.append(k)
        head, dot, rest = k.partition(".")
        out += [head[:i] + "." + head[i + 1:] + dot + rest for i, ch in enumerate(head) if ch == "_"]
    return out


def is_plain_vit(name: str) -> bool:
    """A timm ViT with one feature scale (``vit_*``; not Swin or other hierarchical transformers)."""
    return name.startswith("vit_")


class ViTPyramid(nn.Module):
    """ViTDet's simple feature pyramid: the ViT's stride-``p`` token map → maps at strides p/4 … 2p
    (for patch 16: 4, 8, 16, 32), each scale half the previous one, as the UNet decoder needs."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.strides = [patch // 4, patch // 2, patch, patch * 2]
        self.channels = [dim // 4, dim // 2, dim, dim]
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.same = nn.Conv2d(dim, dim, 1)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), self.same(x), self.down2(self.same(x))]


class SegmentationModel(nn.Module):
    """A raycxr encoder backbone as a multi-scale feature extractor under a MONAI UNet decoder.

    Args:
        name: timm backbone name (the pretraining run's ``encoder.name``). It must be hierarchical (each
            feature map half the size of the previous one: ResNet, DenseNet, ConvNeXt, EfficientNet, Swin);
            a plain ViT (``vit_*``, e.g. a UmiF run's) gets a simple feature pyramid on its last tokens
            (:class:`ViTPyramid`, trained with the decoder).
        n_classes: output channels; each is an independent binary mask (sigmoid).
        decoder_channels: decoder width per upsampling step, deepest first; the first ``len(features)``
            are used, as MONAI's ``FlexibleUNet`` does.
        freeze_encoder: train the decoder only; the encoder also keeps its BatchNorm statistics.
        img_size: input size for backbones that fix it (ViT/Swin); ignored by CNNs.

    Input ``(B, 1, H, W)`` in [0, 1] (as :func:`raycxr.readers.read_image` gives), normalised inside as
    :class:`raycxr.models.encoders.ImageEncoder` does; output logits ``(B, n_classes, H, W)``.
    """

    def __init__(self, name: str = "resnet18", n_classes: int = 1, *,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS, freeze_encoder: bool = False,
                 img_size: int | None = None) -> None:
        super().__init__()
        kw = {"img_size": img_size} if img_size is not None and ("vit" in name or "swin" in name) else {}
        self.pyramid: ViTPyramid | None = None
        try:
            # pretrained=False: no hub downloads; the weights come from the run
            if is_plain_vit(name):
                # a plain ViT has one scale: a simple feature pyramid (ViTDet) on its last tokens gives the UNet
                # decoder its scales; the pyramid is decoder-side (it trains when the encoder is frozen)
                self.encoder = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=1,
                                                 **kw)
                self.pyramid = ViTPyramid(int(self.encoder.embed_dim), int(self.encoder.patch_embed.patch_size[0]))
            else:
                self.encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=1, **kw)
        except RuntimeError as e:
            raise ValueError(f"backbone '{name}' has no timm features_only form: {e}") from None
        if self.pyramid is not None:
            strides, channels = self.pyramid.strides, self.pyramid.channels
        else:
            strides = list(self.encoder.feature_info.reduction())
            channels = list(self.encoder.feature_info.channels())
        if len(strides) < 2 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"backbone '{name}' gives feature maps at strides {strides}; a UNet decoder needs "
                             "each scale half the previous one (a CNN or Swin, not a plain ViT)")
        if len(decoder_channels) < len(channels):
            raise ValueError(f"decoder_channels {list(decoder_channels)} has fewer entries than the "
                             f"{len(channels)} encoder scales of '{name}'")
        fmt = getattr(self.encoder, "output_fmt", "NCHW")
        self.nhwc = getattr(fmt, "value", fmt) == "NHWC"  # Swin gives channels last
        self.name = name
        self.n_classes = int(n_classes)
        self.strides = strides
        dec = [int(c) for c in decoder_channels[:len(channels)]]
        # MONAI's FlexibleUNet decoder; its first encoder channel is a placeholder for the input (never a skip)
        self.decoder = UNetDecoder(spatial_dims=2, encoder_channels=[1, *channels], decoder_channels=dec,
                                   act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
                                   dropout=0.0, bias=False, upsample="nontrainable", pre_conv="default",
                                   interp_mode="nearest", align_corners=None, is_pad=True)
        self.head = UnetOutBlock(spatial_dims=2, in_channels=dec[-1], out_channels=self.n_classes)
        # grey image = mean of the RGB channels, so the grey statistics are the channel means (as ImageEncoder)
        cfg = getattr(self.encoder, "pretrained_cfg", None) or {}
        mean, std = (cfg.get(k, (0.5,)) for k in ("mean", "std"))
        self.register_buffer("mean", torch.tensor(float(sum(mean) / len(mean))), persistent=False)
        self.register_buffer("std", torch.tensor(float(sum(std) / len(std))), persistent=False)
        self.freeze_encoder = bool(freeze_encoder)
        self.encoder.requires_grad_(not self.freeze_encoder)
        self.source = "random"
        self.n_loaded = 0

    @classmethod
    def from_run(cls, run: str | Path, n_classes: int = 1, **kwargs: Any) -> SegmentationModel:
        """Build the model on a pretraining run's encoder (a run folder, whose ``best.pt`` is used where
        it has one, or a checkpoint file).

        ``kwargs`` go to the constructor; ``img_size`` defaults to the run's ``image_size``."""
        ckpt = Checkpoint.load(run, best=True)
        kwargs.setdefault("img_size", ckpt.image_size)
        model = cls(ckpt.encoder_name, n_classes, **kwargs)
        model.load_encoder_state(ckpt.encoder_state(), source=ckpt.source)
        model.source = ckpt.source
        return model

    @classmethod
    def random_init(cls, name: str, n_classes: int = 1, **kwargs: Any) -> SegmentationModel:
        """The baseline: the same backbone with timm's random initialisation."""
        return cls(name, n_classes, **kwargs)

    def load_encoder_state(self, state: Mapping[str, torch.Tensor], *, source: str = "<state>") -> int:
        """Load an :class:`ImageEncoder` state dict (``backbone.*``; the token MLP is not used) or a plain timm
        state dict into the feature extractor. Returns how many tensors were loaded; raises ``ValueError``
        if fewer than 90 % of the feature extractor's tensors find a same-shaped source."""
        src = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("token_mlp.")}
        own = self.encoder.state_dict()
        mapped, missing = {}, []
        for key, t in own.items():
            hit = next((c for c in _key_candidates(key) if c in src), None)
            v = src[hit] if hit is not None else None
            if v is not None and v.ndim == 4 and v.shape[1] == 3 and t.ndim == 4 and t.shape[1] == 1:
                v = timm.models.adapt_input_conv(1, v)  # an RGB first convolution folded to grey, as timm does
            if v is not None and v.shape == t.shape:
                mapped[key] = v
            else:
                missing.append(key)
        if len(mapped) < MIN_LOADED_FRACTION * len(own):
            raise ValueError(f"{source}: only {len(mapped)} of {len(own)} encoder tensors fit the '{self.name}' "
                             f"feature extractor (missing e.g. {missing[:5]}); is it a checkpoint of this backbone?")
        self.encoder.load_state_dict(mapped, strict=False)
        self.n_loaded = len(mapped)
        return len(mapped)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics too
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps ``(B, C_i, H / s_i, W / s_i)``, shallowest first."""
        if self.pyramid is not None:
            tokens = self.encoder.forward_features((x - self.mean) / self.std)[:, self.encoder.num_prefix_tokens:]
            h, w = self.encoder.patch_embed.grid_size
            return self.pyramid(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        feats = self.encoder((x - self.mean) / self.std)
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats] if self.nhwc else list(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        y = self.head(self.decoder(feats, len(feats) - 1))
        if y.shape[-2:] != x.shape[-2:]:
            # backbones whose first map is at stride 4 (Swin, ConvNeXt) end at half resolution
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y

