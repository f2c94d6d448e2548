"""A site's images as a PyTorch dataset: manifest rows → transformed tensors and masked labels.

A file that cannot be read is recorded in the site's quarantine (with the reason) and the sample
is dropped from its batch by :func:`collate_skip_none`; it never stops a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .labels import UnionLabelSpace, apply_uncertain_policy
from .manifest import Manifest
from .quarantine import Quarantine
from .readers import ImageReadError, read_image


class SiteDataset(Dataset):
    """One site's split. Each item is a dict:

    - ``image``: ``(1, H, W)`` float32 after ``transform``
    - ``labels`` / ``label_mask``: the site's own label space (uncertain policy applied; mask 0 where
      not annotated), for the site's own head (Ark)
    - ``targets`` / ``target_mask``: the union label space, if one is given (naive mixing, UniChest);
      then the site-space labels are left out, so batches that mix sites collate
    - ``site_index``, ``image_id``, ``report`` (empty string when absent)
    - ``image2``: a second view of the same image when ``second_view`` is given
    """

    def __init__(self, manifest: Manifest, root: str | Path, *, transform: Callable | None = None,
                 split: str | None = None, label_space: UnionLabelSpace | None = None,
                 uncertain_policy: str = "ignore", site_index: int = 0, quarantine: Quarantine | None = None,
                 seed: int = 0, second_view: Callable | None = None) -> None:
        self.manifest = manifest.split(split) if split else manifest
        self.root = Path(root)
        self.transform = transform
        self.second_view = second_view  # e.g. Ark's teacher view (clean) or SimCLR's second crop
        self.site = manifest.site
        self.site_index = site_index
        self.label_space = label_space
        self.quarantine = quarantine if quarantine is not None else Quarantine(None, site=self.site)
        df = self.manifest.to_pandas()
        skip = self.quarantine.image_ids()
        keep = ~df["image_id"].isin(skip).to_numpy()
        self.df = df[keep].reset_index(drop=True)
        raw = self.manifest.label_matrix()[keep]
        # resolved once per build, so a stochastic policy (lsr_ones) is fixed per sample
        self.labels = apply_uncertain_policy(raw, uncertain_policy, rng=np.random.default_rng(seed))
        self.label_mask = (~np.isnan(self.labels)).astype(np.float32)
        self.labels = np.nan_to_num(self.labels, nan=0.0)
        if label_space is not None:
            self.targets, self.target_mask = label_space.to_union(self.site, raw, policy=uncertain_policy,
                                                                   rng=np.random.default_rng(seed))

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        row = self.df.iloc[i]
        path = self.root / row["path"]
        try:
            item = {"image": read_image(path)[None]}
        except ImageReadError as e:
            self.quarantine.record(row["image_id"], row["path"], e.reason)
            return None
        view2 = self.second_view(dict(item)) if self.second_view is not None else None
        if self.transform is not None:
            item = self.transform(item)
        out = {
            "image": torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32),
            "site_index": torch.tensor(self.site_index),
            "image_id": row["image_id"],
            "report": row["report"] if isinstance(row["report"], str) else "",
        }
        if view2 is not None:
            out["image2"] = torch.as_tensor(np.asarray(view2["image"]), dtype=torch.float32)
        if self.label_space is not None:
            out["targets"] = torch.from_numpy(self.targets[i])
            out["target_mask"] = torch.from_numpy(self.target_mask[i])
        else:
            out["labels"] = torch.from_numpy(self.labels[i])
            out["label_mask"] = torch.from_numpy(self.label_mask[i])
        return out


def collate_skip_none(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Default collation after dropping quarantined (None) samples; None if nothing is left."""
    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None
