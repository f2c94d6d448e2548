"""MONAI dictionary transforms for CXR training and evaluation, plus the Fourier amplitude mix.

Images arrive from :mod:`raycxr.readers` as float32 in [0, 1], one channel. Sizes and
strengths come from the ``transforms`` config node (see ``configs/data.yaml``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

from .readers import read_image, resize


class LoadCXRd(MapTransform):
    """Read ``d[key]`` (a path) with the raycxr reader into a ``(1, H, W)`` float32 array.

    Unreadable files raise :class:`raycxr.readers.ImageReadError`; the dataset quarantines them.
    """

    def __init__(self, keys: str | list[str] = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_image(d[key])[None]
        return d


class ResizeCXRd(MapTransform):
    """Resize ``(1, H, W)`` to ``(1, size, size)`` with :func:`raycxr.readers.resize`, the resize the
    ONNX runtime applies (MONAI's ``Resized`` would differ from it by interpolation details)."""

    def __init__(self, keys: str | list[str], size: int) -> None:
        super().__init__(keys)
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = resize(np.asarray(d[key])[0], self.size)[None]
        return d


def train_transforms(size: int = 224, *, rotate_deg: float = 10.0, scale: float = 0.1, translate: float = 0.05,
                     affine_prob: float = 0.8, contrast_gamma: tuple[float, float] = (0.7, 1.5),
                     contrast_prob: float = 0.5, intensity_scale: float = 0.1, intensity_shift: float = 0.05,
                     intensity_prob: float = 0.5, noise_std: float = 0.01, noise_prob: float = 0.2,
                     keys: str = "image") -> Compose:
    """Resize, light affine, contrast (gamma) and intensity jitter, a little noise; clipped to [0, 1]."""
    rot = float(np.deg2rad(rotate_deg))
    return Compose([
        ResizeCXRd(keys, size),
        RandAffined(keys, prob=affine_prob, rotate_range=(rot,), scale_range=(scale, scale),
                    translate_range=(translate * size, translate * size), padding_mode="zeros"),
        RandAdjustContrastd(keys, prob=contrast_prob, gamma=contrast_gamma),
        RandScaleIntensityd(keys, factors=intensity_scale, prob=intensity_prob),
        RandShiftIntensityd(keys, offsets=intensity_shift, prob=intensity_prob),
        RandGaussianNoised(keys, prob=noise_prob, std=noise_std),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ])


def eval_transforms(size: int = 224, *, keys: str = "image") -> Compose:
    """Deterministic: resize only (the same preprocessing the ONNX runtime applies)."""
    return Compose([
        ResizeCXRd(keys, size),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ])


def transforms_from_config(cfg: Mapping[str, Any], train: bool) -> Compose:
    """Build from a ``transforms`` config node: ``{size, train: {...strengths}}``."""
    size = int(cfg.get("size", 224))
    if not train:
        return eval_transforms(size)
    kw = dict(cfg.get("train", {}) or {})
    for k in ("contrast_gamma",):
        if k in kw:
            kw[k] = tuple(kw[k])
    return train_transforms(size, **kw)


def segmentation_train_transforms(size: int) -> Compose:
    """Light augmentation of an image and its mask together (``{"image", "mask"}``, both ``(1, S, S)``):
    geometry on both (nearest for the mask), intensity on the image only."""
    # geometry on image and mask together (nearest for the mask), intensity on the image only
    return Compose([
        RandAffined(["image", "mask"], prob=0.8, rotate_range=(float(np.deg2rad(10.0)),), scale_range=(0.1, 0.1),
                    translate_range=(0.05 * size, 0.05 * size), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.5)),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(["image", "mask"], dtype=torch.float32, track_meta=False),
    ])


def fourier_amplitude_mix(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mix the Fourier amplitude of each image with its partner's, keeping its own phase.

    ``x_i <- Re(ifft2((lam_i |F x_i| + (1 - lam_i) |F x_p(i)|) * exp(i angle F x_i)))``, per channel over
    the last two dims (UniChest, U.5). The phase carries the anatomy, the amplitude much of the
    scanner's style, so this swaps style between sources without changing labels.
    """
    f = torch.fft.fft2(images.float())
    amp, phase = f.abs(), torch.angle(f)
    lam = lam.view(-1, *([1] * (images.dim() - 1))).to(amp)
    mixed = lam * amp + (1 - lam) * amp[partners]
    return torch.fft.ifft2(mixed * torch.exp(1j * phase)).real.to(images.dtype)


def cross_site_fourier_mix(images: torch.Tensor, site_ids: torch.Tensor, *, p: float = 0.5,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply :func:`fourier_amplitude_mix` to a batch with probability ``p``.

    Differs from UniChest on purpose: UniChest pairs each image with a random partner from the
    batch; here the partner is drawn from a *different* site whenever the batch has one, since
    the point of the mix is to move style across sources. ``lam ~ U(0, 1)`` per image.
    """
    if torch.rand((), generator=generator).item() > p or images.shape[0] < 2:
        return images
    n = images.shape[0]
    partners = torch.empty(n, dtype=torch.long)
    for i in range(n):
        other = torch.nonzero(site_ids != site_ids[i]).flatten()
        pool = other if len(other) else torch.tensor([j for j in range(n) if j != i])
        partners[i] = pool[torch.randint(len(pool), (), generator=generator)]
    lam = torch.rand(n, generator=generator)
    return fourier_amplitude_mix(images, partners.to(images.device), lam.to(images.device))
