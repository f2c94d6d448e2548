"""``raycxr segment``: downstream segmentation on top of the pretrained raycxr image encoder, with MONAI.

The pretraining run's timm backbone becomes a multi-scale feature extractor (timm ``features_only``,
the run's weights loaded into it) under a MONAI UNet decoder (:class:`monai.networks.nets.flexible_unet.UNetDecoder`,
the decoder of MONAI's ``FlexibleUNet``) and a 1x1 :class:`monai.networks.blocks.UnetOutBlock`. For each task
the same model is trained and tested twice with identical settings and seed: from the pretrained encoder
and from random initialisation. The difference is what pretraining buys downstream.

Tasks:

- ``lungs``: both lungs as one mask, from each manifest row's ``lung_mask_path`` (any site that has them).
- ``pneumothorax``: SIIM's ``mask_path``; a row without one is a negative and has an empty mask.

Metrics, per test image (and per output channel) at ``image_size`` pixels:

- Dice (MONAI ``DiceMetric``) over the images whose ground truth is **not** empty. Dice is undefined on an
  empty ground truth (MONAI returns nan), so those images are reported apart: ``empty_gt_dice`` is the
  fraction of them with an empty prediction (the SIIM convention: Dice 1 when both are empty, else 0).
- HD95 (MONAI ``HausdorffDistanceMetric``, 95th percentile, in pixels) over the images where both the
  ground truth and the prediction are non-empty (MONAI returns nan/inf otherwise); ``n_hd95`` says how
  many, ``n_missed`` counts non-empty ground truths with an empty prediction.

Outputs in ``cfg.out``: ``segmentation.json`` (settings, rows, per-site Dice, training losses),
``segmentation.md`` (the table) and ``segmentation.png`` (test images with the ground-truth and predicted
contours of every init).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.blocks import UnetOutBlock
from monai.networks.nets.flexible_unet import UNetDecoder
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..dataset import collate_skip_none
from ..manifest import Manifest
from ..readers import ImageReadError, read_image, resize
from ..sites.config import SiteConfig, discover_sites
from .report import jsonable

# task → the manifest column that holds its mask (relative to the site folder)
TASKS = {"lungs": "lung_mask_path", "pneumothorax": "mask_path"}
INITS = ("pretrained", "random")
DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
MIN_LOADED_FRACTION = 0.9  # of the feature extractor's tensors that must come from the run


# ------------------------------------------------------------------------------------------------ model


def resolve_checkpoint(run: str | Path) -> Path:
    """``run/checkpoint.pt`` for a run folder, the path itself for a file; a clear error if it does not exist."""
    path = Path(run)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"pretraining run {run} not found: no checkpoint at {path} "
                                "(set run= to a folder written by `raycxr pretrain`, or its checkpoint.pt)")
    return path


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
        path = resolve_checkpoint(run)
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "encoder" not in state or "config" not in state:
            raise ValueError(f"{path} is not a raycxr pretraining checkpoint (no 'encoder' / 'config')")
        config = state["config"]
        try:
            name = config["encoder"]["name"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: its config has no encoder.name") from None
        kwargs.setdefault("img_size", config.get("image_size"))
        model = cls(name, n_classes, **kwargs)
        model.load_encoder_state(state["encoder"], source=str(path))
        model.source = str(path)
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


# ------------------------------------------------------------------------------------------------- data


def _read_mask(path: Path | None, size: int) -> np.ndarray:
    """A PNG mask (> 0 = foreground) resized nearest to ``(size, size)``; zeros for ``None``."""
    if path is None:
        return np.zeros((size, size), np.float32)
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 0
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)) > 0
    return m.astype(np.float32)


def _augment(size: int) -> Callable:
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandAdjustContrastd,
        RandAffined,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ScaleIntensityRanged,
    )

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


class SegmentationDataset(Dataset):
    """Images paired with their masks. Each item is a dict:

    - ``image``: ``(1, size, size)`` float32 in [0, 1] (the raycxr bilinear resize)
    - ``mask``: ``(1, size, size)`` float32 in {0, 1} (nearest resize; zeros where the row has no mask)
    - ``site``, ``image_id``

    An unreadable image gives ``None`` (dropped from its batch by :func:`raycxr.dataset.collate_skip_none`).

    Args:
        records: dicts with ``image`` (path), ``mask`` (path or None), ``site`` and ``image_id``.
        size: output side in pixels.
        train: apply the light augmentation (affine on image and mask together, intensity jitter).
        seed: seed of the augmentation.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], *, size: int, train: bool = False, seed: int = 0) -> None:
        self.records = [dict(r) for r in records]
        self.size = int(size)
        self.train = bool(train)
        self.transform = _augment(self.size) if self.train else None
        self.set_random_state(seed)

    @classmethod
    def from_manifest(cls, manifest: Manifest | pd.DataFrame, root: str | Path, task: str, *, split: str | None,
                      size: int, train: bool = False, limit: int | None = None, seed: int = 0,
                      frontal_only: bool = True, site: str | None = None) -> SegmentationDataset:
        """The rows of ``split`` (all rows if None) of a manifest whose files lie under ``root``.

        ``lungs`` keeps the rows that have a lung mask; ``pneumothorax`` keeps every row (no mask = empty).
        ``limit`` picks that many rows at random (seeded). Raises ``ValueError`` when the manifest has no
        masks at all for the task."""
        if task not in TASKS:
            raise ValueError(f"unknown segmentation task '{task}'; expected one of {sorted(TASKS)}")
        df = manifest.to_pandas() if isinstance(manifest, Manifest) else manifest
        name = site or (str(df["site"].iloc[0]) if "site" in df.columns and len(df) else str(root))
        col = TASKS[task]
        if col not in df.columns or not df[col].notna().any():
            what = "lung masks" if task == "lungs" else "pneumothorax masks"
            raise ValueError(f"site '{name}' has no {what}: its manifest's '{col}' column is "
                             f"{'missing' if col not in df.columns else 'empty'}; the {task} task needs it")
        if split is not None:
            df = df[df["split"] == split]
        if frontal_only and "view" in df.columns:
            df = df[~df["view"].astype(str).str.upper().isin(["LAT", "LATERAL", "LL", "RL"])]
        if task == "lungs":
            df = df[df[col].notna()]
        if limit is not None and len(df) > int(limit):
            df = df.sample(n=int(limit), random_state=seed).sort_index()
        root = Path(root)
        records = [{"image": root / r["path"], "mask": root / r[col] if isinstance(r[col], str) else None,
                    "site": name, "image_id": str(r.get("image_id", r["path"]))} for r in df.to_dict("records")]
        return cls(records, size=size, train=train, seed=seed)

    @classmethod
    def from_site(cls, site: SiteConfig, task: str, **kwargs: Any) -> SegmentationDataset:
        """:meth:`from_manifest` on a registered site's manifest."""
        return cls.from_manifest(site.load_manifest(), site.root, task, site=site.name, **kwargs)

    @classmethod
    def concat(cls, parts: Sequence[SegmentationDataset], *, seed: int = 0) -> SegmentationDataset:
        """Several sites' datasets as one (same size and mode)."""
        if not parts:
            raise ValueError("no datasets to concatenate")
        return cls([r for p in parts for r in p.records], size=parts[0].size, train=parts[0].train, seed=seed)

    def set_random_state(self, seed: int) -> None:
        """Reset the augmentation's random state (identical augmentations for every init)."""
        if self.transform is not None:
            self.transform.set_random_state(seed=int(seed))

    @property
    def has_mask(self) -> np.ndarray:
        """Whether each row has a mask file (rows without one have an empty mask)."""
        return np.array([r["mask"] is not None for r in self.records], dtype=bool)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        r = self.records[i]
        try:
            image = read_image(r["image"])
        except ImageReadError:
            return None
        item = {"image": resize(image, self.size)[None], "mask": _read_mask(r["mask"], self.size)[None]}
        if self.transform is not None:
            item = self.transform(item)
        return {"image": torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32),
                "mask": (torch.as_tensor(np.asarray(item["mask"])) > 0.5).float(),
                "site": r["site"], "image_id": r["image_id"]}


# ---------------------------------------------------------------------------------------------- training


class DiceBCELoss(nn.Module):
    """MONAI soft Dice (sigmoid, over the whole batch) plus binary cross-entropy, per output channel.

    The Dice term is computed over the batch (``batch=True``) so that images with an empty mask (SIIM
    negatives) do not give a 0/0 Dice each. For one channel this is MONAI ``DiceCELoss(sigmoid=True)``."""

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = float(lambda_dice), float(lambda_bce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def train_segmentation(model: SegmentationModel, dataset: Dataset, *, epochs: int = 5, batch_size: int = 16,
                       lr: float = 1e-3, encoder_lr: float | None = None, weight_decay: float = 1e-4,
                       max_steps_per_epoch: int | None = None, seed: int = 0, num_workers: int = 0,
                       desc: str = "segment") -> list[dict[str, float]]:
    """Train with Dice + BCE (:class:`DiceBCELoss`) and AdamW for a fixed number of epochs (and steps).

    The model stays on its device; batches follow it. The shuffling is seeded by ``seed``.
    Returns one record per step: ``{"epoch", "step", "loss"}``."""
    device = _device_of(model)
    g = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=True, generator=g, num_workers=int(num_workers),
                        drop_last=len(dataset) > int(batch_size), collate_fn=collate_skip_none)
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    groups = [{"params": rest, "lr": lr}] + ([{"params": enc, "lr": encoder_lr or lr}] if enc else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    loss_fn = DiceBCELoss()
    per_epoch = len(loader) if max_steps_per_epoch is None else min(len(loader), int(max_steps_per_epoch))
    history: list[dict[str, float]] = []
    bar = tqdm(total=int(epochs) * per_epoch, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    for epoch in range(int(epochs)):
        model.train()
        for step, batch in enumerate(loader):
            if step >= per_epoch:
                break
            if batch is None:
                continue
            x, y = batch["image"].to(device), batch["mask"].to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"epoch": epoch, "step": len(history), "loss": float(loss.detach())})
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    return history


# ---------------------------------------------------------------------------------------------- metrics


def per_image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Dice and HD95 of binary masks ``(N, C, H, W)``, one value per image and channel (arrays ``(N, C)``).

    ``dice`` is nan where the ground truth is empty; ``hd95`` (pixels) is nan unless both the ground
    truth and the prediction are non-empty. ``gt_empty`` / ``pred_empty`` say which."""
    pred, target = pred.detach().bool().cpu(), target.detach().bool().cpu()
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) masks of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    gt_empty = ~target.flatten(2).any(-1)
    pred_empty = ~pred.flatten(2).any(-1)
    dice = torch.full(gt_empty.shape, math.nan)
    hd95 = torch.full(gt_empty.shape, math.nan)
    if (~gt_empty).any():
        d = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred.float(), target.float())
        dice = torch.where(gt_empty, torch.tensor(math.nan), d.float())
    both = ~gt_empty & ~pred_empty
    if both.any():
        n, c = both.nonzero(as_tuple=True)
        # only the pairs where HD95 is defined go to MONAI (it warns and returns nan/inf on the others)
        with warnings.catch_warnings():
            # MONAI >= 1.5 passes its own deprecated `always_return_as_numpy` inside the metric
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            h = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                pred[n, c][:, None].float(), target[n, c][:, None].float())
        hd95[n, c] = h[:, 0].float()
    return {"dice": dice.numpy(), "hd95": hd95.numpy(), "gt_empty": gt_empty.numpy(), "pred_empty": pred_empty.numpy()}


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def summarize_metrics(per: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The table row of :func:`per_image_metrics` (see the module docstring for the empty-mask rules)."""
    dice, hd95 = np.asarray(per["dice"], float).ravel(), np.asarray(per["hd95"], float).ravel()
    gt_empty, pred_empty = np.asarray(per["gt_empty"], bool).ravel(), np.asarray(per["pred_empty"], bool).ravel()
    pos = dice[~gt_empty]
    hd = hd95[np.isfinite(hd95)]
    return {
        "n_test": int(len(dice)),
        "n_positive": int((~gt_empty).sum()),
        "n_empty_gt": int(gt_empty.sum()),
        "dice_mean": _mean(pos),
        "dice_std": float(np.std(pos)) if len(pos) else None,
        "dice_median": float(np.median(pos)) if len(pos) else None,
        "hd95_mean": _mean(hd),
        "hd95_median": float(np.median(hd)) if len(hd) else None,
        "n_hd95": int(len(hd)),
        "n_missed": int((~gt_empty & pred_empty).sum()),
        # Dice on an empty ground truth: 1 when the prediction is empty too, else 0
        "empty_gt_dice": _mean(pred_empty[gt_empty].astype(float)),
    }


@torch.no_grad()
def predict_masks(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                  threshold: float = 0.5) -> torch.Tensor:
    """Binary masks ``(B, C, H, W)`` from a model's logits: sigmoid > ``threshold``."""
    if isinstance(model, nn.Module):
        model.eval()
    return torch.sigmoid(model(images.to(_device_of(model))).float()).cpu() > threshold


@torch.no_grad()
def evaluate_segmentation(model: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, *, batch_size: int = 16,
                          threshold: float = 0.5, num_workers: int = 0,
                          desc: str = "test") -> dict[str, Any]:
    """Dice and HD95 of a model (any callable images → logits) on a dataset of ``{"image", "mask"}`` items.

    Returns ``{"summary": summarize_metrics(...), "per_site": {site: {"n", "dice_mean"}}, "per_image": [...]}``;
    each per-image record has ``site``, ``image_id``, ``dice``, ``hd95``, ``gt_empty``, ``pred_empty``
    (channel 0; the summary covers every channel)."""
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                        collate_fn=collate_skip_none)
    parts: list[dict[str, np.ndarray]] = []
    records: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        if batch is None:
            continue
        pred = predict_masks(model, batch["image"], threshold=threshold)
        per = per_image_metrics(pred, batch["mask"] > 0.5)
        parts.append(per)
        n = len(pred)
        sites, ids = batch.get("site", [""] * n), batch.get("image_id", [str(len(records) + i) for i in range(n)])
        for i in range(n):
            records.append({"site": str(sites[i]), "image_id": str(ids[i]), "dice": _nan_none(per["dice"][i, 0]),
                            "hd95": _nan_none(per["hd95"][i, 0]), "gt_empty": bool(per["gt_empty"][i, 0]),
                            "pred_empty": bool(per["pred_empty"][i, 0])})
    if not parts:
        raise ValueError("no readable test images to evaluate")
    per_all = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    per_site: dict[str, dict[str, Any]] = {}
    for s in dict.fromkeys(r["site"] for r in records):
        d = [r["dice"] for r in records if r["site"] == s and r["dice"] is not None]
        per_site[s] = {"n": sum(r["site"] == s for r in records), "dice_mean": _mean(np.asarray(d, float))}
    return {"summary": summarize_metrics(per_all), "per_site": per_site, "per_image": records}


def _nan_none(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- the run


def _resolve_device(spec: Any) -> torch.device:
    d = str(spec or "auto")
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(d)


def _task_datasets(cfg: DictConfig, task: str, sites: Sequence[SiteConfig]) -> tuple[SegmentationDataset,
                                                                                        SegmentationDataset]:
    common = {"size": int(cfg.image_size), "seed": int(cfg.seed), "frontal_only": bool(cfg.frontal_only)}
    train = [SegmentationDataset.from_site(s, task, split="train", train=bool(cfg.augment),
                                           limit=cfg.get("n_train_limit"), **common) for s in sites]
    test = [SegmentationDataset.from_site(s, task, split="test", limit=cfg.get("n_test_limit"), **common)
            for s in sites]
    train_ds = SegmentationDataset.concat(train, seed=int(cfg.seed))
    test_ds = SegmentationDataset.concat(test, seed=int(cfg.seed))
    names = [s.name for s in sites]
    if not len(train_ds) or not len(test_ds):
        raise ValueError(f"task '{task}' on sites {names}: {len(train_ds)} train and {len(test_ds)} test images; "
                         "both splits need images with masks")
    return train_ds, test_ds


def _figure_indices(ds: SegmentationDataset, n: int) -> list[int]:
    """The first ``n`` test rows that have a mask, then rows without (SIIM negatives)."""
    has = ds.has_mask
    return ([i for i in range(len(ds)) if has[i]] + [i for i in range(len(ds)) if not has[i]])[:max(0, int(n))]


def _build(init: str, cfg: DictConfig, checkpoint: Path, name: str) -> SegmentationModel:
    kw = {"decoder_channels": list(cfg.decoder_channels), "freeze_encoder": bool(cfg.freeze_encoder),
          "img_size": int(cfg.image_size)}
    torch.manual_seed(int(cfg.seed))  # the same decoder initialisation for every init
    if init == "pretrained":
        return SegmentationModel.from_run(checkpoint, 1, **kw)
    return SegmentationModel.random_init(name, 1, **kw)


def run_segmentation(cfg: DictConfig) -> dict[str, Any]:
    """Train and test a segmentation model per task and init; write ``segmentation.json``, ``segmentation.md``
    and ``segmentation.png`` in ``cfg.out`` and return the results (``rows``: one per task x init)."""
    checkpoint = resolve_checkpoint(cfg.run)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    try:
        encoder_name = state["config"]["encoder"]["name"]
    except (KeyError, TypeError):
        raise ValueError(f"{checkpoint} is not a raycxr pretraining checkpoint (no config.encoder.name)") from None
    del state
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True) if cfg.get("tasks") else {}
    if not isinstance(tasks, dict):
        raise ValueError(f"tasks must map a task ({', '.join(TASKS)}) to a list of sites, got {tasks!r}")
    tasks = {t: list(s) for t, s in tasks.items() if s}  # `tasks.pneumothorax=null` drops a task
    if not tasks:
        raise ValueError("no segmentation task left: tasks maps every task to null or []")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown segmentation task(s) {unknown}; expected some of {sorted(TASKS)}")
    inits = list(cfg.inits)
    if not inits or any(i not in INITS for i in inits):
        raise ValueError(f"inits must be a non-empty subset of {list(INITS)}, got {inits}")
    registered = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    for task, names in tasks.items():
        missing = [s for s in names if s not in registered]
        if missing:
            raise ValueError(f"task '{task}': site(s) {missing} not registered in "
                             f"{cfg.sites.sites_dir}; registered: {sorted(registered)}")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = _resolve_device(cfg.get("device"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in ("image_size", "epochs", "max_steps_per_epoch", "batch_size", "lr", "encoder_lr",
                          "weight_decay", "freeze_encoder", "decoder_channels", "augment", "threshold", "frontal_only",
                          "n_train_limit", "n_test_limit", "seed")}
    results: dict[str, Any] = {"run": str(cfg.run), "checkpoint": str(checkpoint), "encoder": encoder_name,
                               "device": str(device), "settings": settings, "tasks": tasks, "rows": []}
    # every task's data first: a site without masks fails before any training
    data = {task: _task_datasets(cfg, task, [registered[s] for s in names]) for task, names in tasks.items()}
    panels: list[dict[str, Any]] = []
    for task, names in tasks.items():
        train_ds, test_ds = data[task]
        fig_idx = _figure_indices(test_ds, int(cfg.n_figure))
        fig_items = [test_ds[i] for i in fig_idx]
        fig_items = [it for it in fig_items if it is not None]
        panel = {"task": task, "items": fig_items, "pred": {}, "dice": {}}
        for init in inits:
            t0 = time.perf_counter()
            model = _build(init, cfg, checkpoint, encoder_name).to(device)
            train_ds.set_random_state(int(cfg.seed))
            history = train_segmentation(model, train_ds, epochs=int(cfg.epochs), batch_size=int(cfg.batch_size),
                                         lr=float(cfg.lr), encoder_lr=cfg.get("encoder_lr"),
                                         weight_decay=float(cfg.weight_decay),
                                         max_steps_per_epoch=cfg.get("max_steps_per_epoch"), seed=int(cfg.seed),
                                         num_workers=int(cfg.num_workers), desc=f"{task} / {init}")
            ev = evaluate_segmentation(model, test_ds, batch_size=int(cfg.batch_size), threshold=float(cfg.threshold),
                                       num_workers=int(cfg.num_workers), desc=f"{task} / {init} test")
            losses = [h["loss"] for h in history]
            k = max(1, min(5, len(losses) // 4))  # smooth the first / last loss over a few steps
            results["rows"].append({
                "task": task, "init": init, "sites": list(names), **ev["summary"], "n_train": len(train_ds),
                "steps": len(history), "encoder_tensors_loaded": model.n_loaded,
                "train_loss_first": _mean(np.asarray(losses[:k])), "train_loss_last": _mean(np.asarray(losses[-k:])),
                "seconds": round(time.perf_counter() - t0, 1), "per_site": ev["per_site"],
                "per_image": ev["per_image"]})
            if fig_items:
                images = torch.stack([it["image"] for it in fig_items])
                panel["pred"][init] = predict_masks(model, images, threshold=float(cfg.threshold))[:, 0].numpy()
                by_id = {r["image_id"]: r["dice"] for r in ev["per_image"]}
                panel["dice"][init] = [by_id.get(it["image_id"]) for it in fig_items]
            del model
        panels.append(panel)
    (out / "segmentation.json").write_text(json.dumps(jsonable(results), indent=1))
    plot_segmentations(panels, out / "segmentation.png")
    (out / "segmentation.md").write_text(render_markdown(results, figure="segmentation.png"))
    _print_table(results)
    print(f"wrote {out / 'segmentation.json'}, {out / 'segmentation.md'} and {out / 'segmentation.png'}")
    return results


# ----------------------------------------------------------------------------------------------- report


def _fmt(x: Any, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


TABLE_HEADER = ["task", "init", "sites", "Dice mean ± std", "HD95 mean (px)", "n test", "n empty GT",
                "Dice on empty GT", "train loss first → last"]


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """The results table as strings, one row per task x init (columns: :data:`TABLE_HEADER`)."""
    return [[r["task"], r["init"], ", ".join(r["sites"]),
             f"{_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])}" if r["n_positive"] else "–",
             f"{_fmt(r['hd95_mean'], 1)} (n={r['n_hd95']})", str(r["n_test"]), str(r["n_empty_gt"]),
             _fmt(r["empty_gt_dice"]) if r["n_empty_gt"] else "–",
             f"{_fmt(r['train_loss_first'])} → {_fmt(r['train_loss_last'])}"] for r in results["rows"]]


def render_markdown(results: Mapping[str, Any], *, figure: str | None = None) -> str:
    """``segmentation.md``: settings, the table, how empty masks are counted, the figure."""
    s = results["settings"]
    lines = [f"# raycxr segmentation: {results['encoder']} encoder from {results['run']} vs random initialisation",
             "",
             f"MONAI UNet decoder on the encoder's feature maps; Dice + BCE, AdamW lr {s['lr']}, {s['epochs']} epochs "
             f"(at most {s['max_steps_per_epoch']} steps each), batch {s['batch_size']}, {s['image_size']} px, "
             f"encoder {'frozen' if s['freeze_encoder'] else 'fine-tuned'}, seed {s['seed']}; "
             "identical for both inits.",
             "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["",
              "- Dice: mean ± std over the test images whose ground-truth mask is not empty (MONAI `DiceMetric`).",
              "- HD95: 95th-percentile Hausdorff distance in pixels at the image size above (MONAI "
              "`HausdorffDistanceMetric`), over the images where both the ground truth and the prediction are "
              "non-empty (n in brackets); it is undefined otherwise.",
              "- Dice on empty GT: images with an empty ground truth (SIIM negatives) count 1 when the prediction is "
              "empty too, else 0; they are not in the Dice mean."]
    per_site = [(r["task"], r["init"], r["per_site"]) for r in results["rows"] if len(r["per_site"]) > 1]
    if per_site:
        lines += ["", "Dice per site:", ""]
        lines += [f"- {t} / {i}: " + ", ".join(f"{k} {_fmt(v['dice_mean'])} (n={v['n']})" for k, v in ps.items())
                  for t, i, ps in per_site]
    if figure:
        lines += ["", f"![test images: ground truth (green) and predicted contours]({figure})"]
    return "\n".join(lines) + "\n"


INIT_COLOURS = {"pretrained": "tab:red", "random": "tab:blue"}


def _closed(mask: np.ndarray) -> np.ndarray:
    """The mask with a background frame, so that a mask touching the border still draws a closed contour."""
    m = np.asarray(mask, dtype=float).copy()
    m[[0, -1], :] = 0.0
    m[:, [0, -1]] = 0.0
    return m


def plot_segmentations(panels: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per task and init: test images with the ground-truth (green) and predicted contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(p, init) for p in panels for init in p["pred"]] or [(p, None) for p in panels]
    ncol = max([len(p["items"]) for p in panels] + [1])
    fig, axes = plt.subplots(max(len(rows), 1), ncol, figsize=(2.4 * ncol, 2.6 * max(len(rows), 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (p, init) in enumerate(rows):
        for c, it in enumerate(p["items"]):
            ax = axes[r, c]
            gt = it["mask"][0].numpy()
            ax.imshow(it["image"][0].numpy(), cmap="gray", vmin=0, vmax=1)
            if gt.any():
                ax.contour(_closed(gt), levels=[0.5], colors="lime", linewidths=1.0)
            if init is not None:
                pred = p["pred"][init][c]
                if pred.any():
                    ax.contour(_closed(pred), levels=[0.5], colors=INIT_COLOURS.get(init, "red"), linewidths=1.0)
                d = p["dice"][init][c]
                score = (f"Dice {_fmt(d, 2)}" if d is not None else
                         "empty GT, " + ("empty prediction" if not pred.any() else "false positive"))
                ax.set_title(f"{p['task']} / {init}\n{it['image_id']} {score}", fontsize=7)
            else:
                ax.set_title(f"{p['task']}\n{it['image_id']}", fontsize=7)
    fig.suptitle("ground truth (green); prediction: pretrained (red), random init (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _print_table(results: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raycxr segment: {results['encoder']} from {results['run']}")
    for col in TABLE_HEADER:
        table.add_column(col)
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)
