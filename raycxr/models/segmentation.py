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


class SegmentationModel(nn.Module):
    """A raycxr encoder backbone as a multi-scale feature extractor under a MONAI UNet decoder.

    Args:
        name: timm backbone name (the pretraining run's ``encoder.name``). It must be hierarchical (each
            feature map half the size of the previous one: ResNet, DenseNet, ConvNeXt, EfficientNet, Swin);
            a plain ViT has one scale and is refused.
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
        try:
            # pretrained=False: no hub downloads; the weights come from the run
            self.encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=1, **kw)
        except RuntimeError as e:
            raise ValueError(f"backbone '{name}' has no timm features_only form: {e}") from None
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
        """Build the model on a pretraining run's encoder (a run folder or its ``checkpoint.pt``).

        ``kwargs`` go to the constructor; ``img_size`` defaults to the run's ``image_size``."""
        ckpt = Checkpoint.load(run)
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
        feats = self.encoder((x - self.mean) / self.std)
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats] if self.nhwc else list(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        y = self.head(self.decoder(feats, len(feats) - 1))
        if y.shape[-2:] != x.shape[-2:]:
            # backbones whose first map is at stride 4 (Swin, ConvNeXt) end at half resolution
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y

