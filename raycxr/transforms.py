"""Augmentation for CXR training (batched on the training device, or per sample on the host with MONAI
dictionary transforms), the evaluation preprocessing, and the Fourier amplitude mix.

Images arrive from :mod:`raycxr.readers` as float32 in [0, 1], one channel. Sizes and strengths come
from the ``transforms`` config node (``raycxr/configs/pretrain.yaml``); ``transforms.augment`` says where the
training augmentation runs:

- ``device`` (pretraining's default): the sites only read (from the decode cache: the stored uint8 /
  uint16 pixels, untouched) and collate; :class:`BatchAugment` draws the same augmentations batched on
  the trainer's device after the host-to-device copy (:func:`augment_batch`). A site then serves
  ~10x the images per host core (``benchmarks/scaleout.py``).
- ``host``: :func:`train_transforms`, per sample in the site's process (fine-tuning's own loop uses it).
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

from .readers import resize

AUGMENT_PLACES = ("device", "host")  # transforms.augment: where training augmentation runs


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


def augment_strengths(**overrides: Any) -> dict[str, Any]:
    """The augmentation strengths: ``transforms.train``'s defaults (their one home is :mod:`raycxr.schema`)
    with ``overrides``; an unknown name is a ``ValueError`` naming it."""
    from .schema import default

    strengths = default("transforms.train")
    unknown = sorted(set(overrides) - set(strengths))
    if unknown:
        raise ValueError(f"transforms.train: unknown augmentation setting(s) {unknown}; known: {sorted(strengths)}")
    strengths.update(overrides)
    strengths["contrast_gamma"] = tuple(float(g) for g in strengths["contrast_gamma"])
    return strengths


def train_transforms(size: int, *, keys: str = "image", **strengths: Any) -> Compose:
    """Resize, light affine, contrast (gamma) and intensity jitter, a little noise; clipped to [0, 1].

    ``strengths`` override :func:`augment_strengths` (``rotate_deg``, ``scale``, ``translate`` as a fraction
    of the side, ``affine_prob``, ``contrast_gamma``, ``contrast_prob``, ``intensity_scale``,
    ``intensity_shift``, ``intensity_prob``, ``noise_std``, ``noise_prob``)."""
    k = augment_strengths(**strengths)
    rotate_deg, scale, translate, affine_prob = k["rotate_deg"], k["scale"], k["translate"], k["affine_prob"]
    contrast_gamma, contrast_prob, noise_std, noise_prob = (k["contrast_gamma"], k["contrast_prob"], k["noise_std"],
                                                            k["noise_prob"])
    intensity_scale, intensity_shift, intensity_prob = k["intensity_scale"], k["intensity_shift"], k["intensity_prob"]
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
    """Build from a ``transforms`` config node: ``{size, train: {...strengths}}`` (``train`` may leave out
    any strength, or be absent: :func:`augment_strengths` fills it)."""
    size = int(cfg["size"])
    if not train:
        return eval_transforms(size)
    return train_transforms(size, **(cfg.get("train") or {}))


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


# -- the device data plane: raw pixels from the sites, augmentation batched on the trainer's device --------


def pack_pixels(image: np.ndarray) -> torch.Tensor:
    """A site's image as it travels to the trainer: ``(1, H, W)``, uint8 or float32 as stored, uint16 as
    int16 with the same bits (torch cannot pickle uint16 tensors, so Ray could not ship them);
    :func:`unit_float` undoes it on the device."""
    a = np.ascontiguousarray(image)[None]
    return torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a)


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """:func:`pack_pixels`'s tensors as float32 in [0, 1] (uint8 / 255, int16-packed uint16 / 65535)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.dtype == torch.int16:
        return images.to(torch.int32).bitwise_and_(0xFFFF).float().div_(65535.0)
    return images.float()


class BatchAugment:
    """:func:`train_transforms`'s augmentation on a whole batch, on whatever device the batch is on: the
    same draws per image, from the same distributions (MONAI's ``RandAffine``, ``RandAdjustContrast``,
    ``RandScaleIntensity``, ``RandShiftIntensity``, ``RandGaussianNoise`` with its sampled std), then
    clipped to [0, 1]. The affine maps output to input pixels as MONAI's does (translate, rotate, scale
    about the centre; bilinear, zeros outside); ``tests/test_dataset_transforms.py`` compares the two.

    Args:
        seed: seeds the draws (one generator per device), so a run repeats.
        strengths: override :func:`augment_strengths`, as for :func:`train_transforms`.
    """

    def __init__(self, *, seed: int = 0, **strengths: Any) -> None:
        k = augment_strengths(**strengths)
        self.rotate, self.scale = float(np.deg2rad(k["rotate_deg"])), float(k["scale"])
        self.translate = float(k["translate"])
        self.affine_prob, self.contrast_prob = float(k["affine_prob"]), float(k["contrast_prob"])
        self.gamma = k["contrast_gamma"]
        self.intensity_scale, self.intensity_shift = float(k["intensity_scale"]), float(k["intensity_shift"])
        self.intensity_prob = float(k["intensity_prob"])
        self.noise_std, self.noise_prob = float(k["noise_std"]), float(k["noise_prob"])
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return torch.rand(n, device=like.device, generator=g) * (high - low) + low

    def _chance(self, n: int, p: float, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return torch.rand(n, device=like.device, generator=g) < p

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(B, C, H, W)`` float in [0, 1]; returns new augmented images (float32)."""
        x = images.float()
        n, dev = x.shape[0], x.device
        if n == 0:
            return x
        g = self._generator(dev)
        view = (n, 1, 1, 1)
        # affine (MONAI: output pixel -> input pixel = T R S about the centre, pixel units, dims (row, col))
        hit = self._chance(n, self.affine_prob, x, g)
        angle = self._uniform(n, -self.rotate, self.rotate, x, g)
        s_row, s_col = (1.0 + self._uniform(n, -self.scale, self.scale, x, g) for _ in range(2))
        h, w = x.shape[-2:]
        t_row = self._uniform(n, -self.translate * h, self.translate * h, x, g)
        t_col = self._uniform(n, -self.translate * w, self.translate * w, x, g)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # R S in (row, col), then written for affine_grid's (x = col, y = row) normalised coordinates
        a_rr, a_rc, a_cr, a_cc = cos * s_row, -sin * s_col, sin * s_row, cos * s_col
        theta = torch.stack([torch.stack([a_cc, a_cr * h / w, 2 * t_col / w], 1),
                             torch.stack([a_rc * w / h, a_rr, 2 * t_row / h], 1)], 1)
        eye = torch.eye(2, 3, device=dev).expand(n, 2, 3)
        theta = torch.where(hit[:, None, None], theta, eye)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        moved = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = torch.where(hit.view(view), moved, x)
        # contrast: ((x - min) / range) ** gamma * range + min, per image
        hit = self._chance(n, self.contrast_prob, x, g).view(view)
        gamma = self._uniform(n, *self.gamma, x, g).view(view)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
        x = torch.where(hit, ((x - lo) / (span + 1e-7)) ** gamma * span + lo, x)
        # intensity scale, then shift (each its own chance)
        hit = self._chance(n, self.intensity_prob, x, g).view(view)
        factor = 1.0 + self._uniform(n, -self.intensity_scale, self.intensity_scale, x, g).view(view)
        x = torch.where(hit, x * factor, x)
        hit = self._chance(n, self.intensity_prob, x, g).view(view)
        x = torch.where(hit, x + self._uniform(n, -self.intensity_shift, self.intensity_shift, x, g).view(view), x)
        # Gaussian noise with std ~ U(0, noise_std) per image (MONAI's sample_std)
        hit = self._chance(n, self.noise_prob, x, g).view(view)
        std = self._uniform(n, 0.0, self.noise_std, x, g).view(view)
        noise = torch.randn(x.shape, device=dev, generator=g) * std
        x = torch.where(hit, x + noise, x)
        return x.clamp_(0.0, 1.0)


def batch_augment_from_config(cfg: Mapping[str, Any], seed: int = 0) -> BatchAugment | None:
    """The trainer's :class:`BatchAugment` from a ``transforms`` node, or None when ``augment`` is ``host``."""
    if augment_place(cfg) != "device":
        return None
    return BatchAugment(seed=seed, **(cfg.get("train") or {}))


def augment_place(cfg: Mapping[str, Any]) -> str:
    """``transforms.augment`` (``device`` or ``host``); a node without it (fine-tuning builds its own) is ``host``."""
    place = str(cfg.get("augment") or "host")
    if place not in AUGMENT_PLACES:
        raise ValueError(f"transforms.augment must be one of {list(AUGMENT_PLACES)}, got '{place}'")
    return place


def augment_batch(batch: dict[str, Any], augment: BatchAugment | None) -> dict[str, Any]:
    """A batch from a device-augmented site (it carries ``augment``) made ready to train on: its images as
    float32 in [0, 1] and augmented where its per-sample flags say (``augment`` for ``image``,
    ``augment2`` for ``image2``; a clean second view stays un-augmented). Other batches pass unchanged."""
    if "augment" not in batch:
        return batch
    if augment is None:
        raise ValueError("a batch of un-augmented pixels reached a loop without a BatchAugment "
                         "(transforms.augment=device needs the data plane's loaders)")
    out = dict(batch)
    for key, flag in (("image", "augment"), ("image2", "augment2")):
        if key not in out:
            continue
        x = unit_float(out[key])
        hit = out.get(flag)
        if hit is not None and bool(hit.any()):
            hit = hit.to(x.device).bool()
            if bool(hit.all()):
                x = augment(x)
            else:
                x = x.clone()  # a float batch's unit_float is the batch's own tensor
                x[hit] = augment(x[hit])
        out[key] = x
    out.pop("augment", None)
    out.pop("augment2", None)
    return out
