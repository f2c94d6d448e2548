"""Score a site's split with a model: probabilities, targets and masks over the model's classes.

Images go through the evaluation transform (read, :func:`raycxr.readers.resize`), the same path
as the hospital runtime. Unreadable images are quarantined and left out (counted in ``skipped``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..dataset import SiteDataset, collate_skip_none, site_dataset
from ..labels import UnionLabelSpace
from ..sites.config import SiteConfig


@dataclass
class SitePredictions:
    """One site split scored over ``class_names`` (the model's classes). ``mask`` is 1 where the
    site annotates the class for that image (uncertain labels are masked out)."""

    site: str
    split: str
    class_names: list[str]
    probs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    meta: pd.DataFrame
    skipped: int = 0

    def annotated_classes(self) -> list[int]:
        """Columns the site annotates at all."""
        return [j for j in range(len(self.class_names)) if self.mask[:, j].any()]


def site_targets(site: SiteConfig, class_names: list[str], split: str | None, *,
                 image_size: int = 224, cache: bool = False) -> tuple[SiteDataset, np.ndarray, np.ndarray]:
    """The site's split (evaluation transform at ``image_size``) with its labels mapped onto
    ``class_names`` (by canonical name). ``cache`` reads the images through the site's decode cache."""
    manifest = site.load_manifest()
    space = UnionLabelSpace.onto(list(class_names), {site.name: manifest.label_names})
    settings = {"size": int(image_size), "cache": bool(cache)}
    ds = site_dataset(site, settings, split=split, train=False, label_space=space,
                      manifest=manifest, uncertain_policy="ignore")
    return ds, ds.targets, ds.target_mask


@torch.no_grad()
def predict_site(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], site: SiteConfig, class_names: list[str],
                 *, split: str | None = "test", image_size: int = 224, batch_size: int = 32,
                 progress: bool = True, limit: int | None = None, cache: bool = False) -> SitePredictions:
    """Run ``model`` (images → probabilities over ``class_names``) on a site's split (``cache``: through
    the site's decode cache, :mod:`raycxr.cache`)."""
    ds, targets, mask = site_targets(site, class_names, split, image_size=image_size, cache=cache)
    n = len(ds) if limit is None else min(limit, len(ds))
    subset = torch.utils.data.Subset(ds, range(n))
    dl = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none)
    device = None
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters(), torch.empty(0)).device  # the images go where the model is
    probs, ids = [], []
    for batch in tqdm(dl, desc=f"scoring {site.name}/{split or 'all'}", unit="batch", disable=not progress,
                      leave=False):
        if batch is None:
            continue
        images = batch["image"] if device is None else batch["image"].to(device, non_blocking=True)
        probs.append(model(images).float().cpu().numpy())
        ids.extend(batch["image_id"])
    row = {iid: i for i, iid in enumerate(ds.df["image_id"].to_numpy()[:n])}
    keep = np.array([row[i] for i in ids], dtype=np.int64)
    p = np.concatenate(probs) if probs else np.zeros((0, len(class_names)), np.float32)
    meta = ds.df.iloc[keep][["image_id", "patient_id", "sex", "age", "view", "path"]].reset_index(drop=True)
    return SitePredictions(site.name, split or "all", list(class_names), p, targets[keep], mask[keep], meta,
                           skipped=n - len(keep))
