"""Sites as PyTorch datasets: manifest rows → transformed tensors and masked labels (:class:`SiteDataset`,
built by :func:`site_dataset`), and images paired with masks for segmentation (:class:`SegmentationDataset`).

A file that cannot be read is recorded in the site's quarantine (with the reason) and the sample
is dropped from its batch by :func:`collate_skip_none`; it never stops a run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .cache import DecodeCache, cache_options, open_cache
from .labels import UnionLabelSpace, apply_uncertain_policy, canonical_name
from .manifest import Manifest
from .quarantine import Quarantine, pixel_problem
from .readers import ImageReadError, read_image, resize
from .sites.config import PAIR_TYPES, SiteConfigError
from .transforms import (
    augment_place,
    eval_transforms,
    pack_pixels,
    segmentation_train_transforms,
    transforms_from_config,
)

if TYPE_CHECKING:
    from .sites.config import SiteConfig


class SiteDataset(Dataset):
    """One site's split. Each item is a dict:

    - ``image``: ``(1, H, W)`` float32 after ``transform``
    - ``labels`` / ``label_mask``: the site's own label space (uncertain policy applied; mask 0 where
      not annotated), for the site's own head (Ark)
    - ``targets`` / ``target_mask``: the union label space, if one is given (naive mixing, UniChest);
      then the site-space labels are left out, so batches that mix sites collate
    - ``site_index``, ``image_id``, ``report`` (empty string when absent)
    - ``image2``: a second view of the same image when ``second_view`` is given
    - ``annotation`` / ``has_annotation``: with ``annotation_size``, the row's boxes and lesion mask
      rendered here, inside the site (:func:`render_annotation`), so raw annotations never leave it;
      ``pair_offer``: which of image-report / image-class / image-segment the site offers (``pair_types``)

    With a ``cache`` (:class:`raycxr.cache.DecodeCache`) the image is read from it, already at the
    training resolution; the transforms (augmentation) run on the cached array.

    With ``raw_size`` (``transforms.augment=device``) nothing is augmented here: ``image`` is the site's
    pixels at that size as stored (the cache's uint8 / uint16, packed by :func:`~raycxr.transforms.pack_pixels`;
    float32 without a cache) with an ``augment`` flag, and a second view is the same pixels with
    ``augment2`` (``second_view_augmented``); the trainer augments the batch on its device
    (:func:`~raycxr.transforms.augment_batch`).
    """

    def __init__(self, manifest: Manifest, root: str | Path, *, transform: Callable | None = None,
                 split: str | None = None, label_space: UnionLabelSpace | None = None,
                 uncertain_policy: str = "ignore", site_index: int = 0, quarantine: Quarantine | None = None,
                 seed: int = 0, second_view: Callable | None = None, use_labels: bool = True,
                 cache: DecodeCache | None = None, annotation_size: int | None = None,
                 pair_types: Sequence[str] | None = None, raw_size: int | None = None,
                 second_view_augmented: bool | None = None) -> None:
        self.cache = cache
        self.raw_size, self.second_view_augmented = raw_size, second_view_augmented
        # with annotation_size (UmiF): which supervision a sample may offer as a pair (None: all it has)
        offered = set(pair_types) if pair_types is not None else set(PAIR_TYPES)
        self.pair_offer = torch.tensor([t in offered for t in PAIR_TYPES[:3]])
        self.annotation_size = annotation_size
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
        # the columns an item reads, as plain lists: a pandas row per item (df.iloc) cost a third of the
        # device data plane's host time (benchmarks/scaleout.py)
        self.columns = {c: self.df[c].tolist() for c in ("path", "image_id", "report", "mask_path", "boxes")
                        if c in self.df.columns}
        self.site_tensor, self.true, self.false = torch.tensor(site_index), torch.tensor(True), torch.tensor(False)
        raw = self.manifest.label_matrix()[keep]
        if not use_labels:  # a site trained by a self-supervised or report objective: its labels are not used
            raw = np.full_like(raw, np.nan)
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
        row = {c: v[i] for c, v in self.columns.items()}
        raw = self.raw_size is not None
        try:
            if self.cache is not None:
                image = self.cache.stored(row["path"]) if raw else self.cache.image(row["path"])
            else:
                image = read_image(self.root / row["path"])
            item = {"image": image[None]}
        except ImageReadError as e:
            self.quarantine.record(row["image_id"], row["path"], e.reason)
            return None
        if image.dtype.kind == "f":  # a NaN image would make the loss NaN, naming no file (a cache checked it)
            problem = pixel_problem(image, constant=False)
            if problem is not None:
                self.quarantine.record(row["image_id"], row["path"], problem)
                return None
        out: dict[str, Any] = {"site_index": self.site_tensor, "image_id": row["image_id"],
                               "report": row["report"] if isinstance(row["report"], str) else ""}
        if raw:  # augmented on the trainer's device
            if image.shape != (self.raw_size, self.raw_size):
                image = resize(image, self.raw_size)
            out["image"] = pack_pixels(image)
            out["augment"] = self.true
            if self.second_view_augmented is not None:
                out["image2"] = out["image"]
                out["augment2"] = self.true if self.second_view_augmented else self.false
        else:
            view2 = self.second_view(dict(item)) if self.second_view is not None else None
            if self.transform is not None:
                item = self.transform(item)
            out["image"] = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
            if view2 is not None:
                out["image2"] = torch.as_tensor(np.asarray(view2["image"]), dtype=torch.float32)
        if self.annotation_size:
            mask = self.root / row["mask_path"] if isinstance(row.get("mask_path"), str) else None
            positives = [n for n, v in zip(self.manifest.label_names, self.labels[i]) if v > 0.5]
            out["annotation"] = torch.from_numpy(render_annotation(
                row.get("boxes"), mask, self.annotation_size, mask_label=positives[0] if len(positives) == 1 else None))
            out["has_annotation"] = torch.tensor(has_annotation(row))
            out["pair_offer"] = self.pair_offer  # (report, class, segment) the site declares (pair_types)
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


def site_dataset(site: SiteConfig, transforms: Mapping[str, Any], *, split: str | None = "train", train: bool = True,
                 label_space: UnionLabelSpace | None = None, second_view: bool | str = False, site_index: int = 0,
                 seed: int = 0, manifest: Manifest | None = None, quarantine: Quarantine | None = None,
                 uncertain_policy: str | None = None, use_labels: bool | None = None) -> SiteDataset:
    """The one way a registered site becomes a dataset (local runs, site actors, evaluation, fine-tuning).

    Args:
        site: the registered site (root, manifest, uncertain policy, objective, quarantine file).
        transforms: a ``transforms`` config node (``{size, train: {...}}``).
        split: the manifest split (None: every row).
        train: augmented (training) or deterministic (evaluation) transforms.
        label_space: union targets in this space (e.g. :meth:`UnionLabelSpace.onto` a model's classes).
        second_view: also return ``image2``: a clean view for a supervised site (Ark's teacher input), a
            second augmented view for a site with a self-supervised objective; ``"augmented"``: a second
            augmented view whatever the site's objective (label-free pretraining of every site);
            ``"annotation"``: no second view, but the row's boxes / lesion mask rendered as an image
            (``annotation``, UmiF's segmentation-mask modality), built here inside the site.
        site_index: the site's number in the run (UniChest's source id).
        seed: seeds the uncertain-label policy (``lsr_ones``).
        manifest: an already loaded manifest (else read from the site).
        quarantine: shared quarantine (else the site's own file).
        uncertain_policy: overrides the site's policy (evaluation scores uncertain labels as missing).
        use_labels: keep the labels; default: unless the site trains by a self-supervised or report
            objective (its labels are then not training targets; evaluation always keeps them).

    ``transforms.cache`` (``true`` or ``{enabled, dir, dtype}``) reads the images through the site's
    decode cache (:mod:`raycxr.cache`) at ``transforms.size``. ``transforms.augment=device``: a training
    dataset serves its pixels un-augmented (``raw_size``); the trainer augments them on its device.
    """
    size = int(transforms["size"])
    on_device = train and augment_place(transforms) == "device"
    tf = None if on_device else transforms_from_config(transforms, train=train)
    manifest = manifest if manifest is not None else site.load_manifest()
    opts = cache_options(transforms)
    cache = None
    if opts is not None:
        cache = open_cache(site.name, site.root, site.manifest_path, manifest.to_pandas()["path"].tolist(),
                           size, dir=opts["dir"], dtype=opts["dtype"])
    if tf is not None:
        tf.set_random_state(seed=int(seed) * 1009 + int(site_index))  # seeded augmentation: a run repeats exactly
    view2 = None
    pair_types = None
    if second_view == "annotation" and site.pair_types is not None:  # UmiF: a declared subset, checked here
        pair_types = site_pair_types(manifest, site.pair_types, source=str(site.yaml_path or site.name))
    view2_augmented = None
    if second_view and second_view != "annotation":
        clean = second_view != "augmented" and site.objective == "supervised"
        view2 = eval_transforms(size) if clean else tf
        view2_augmented = not clean
    return SiteDataset(manifest, site.root, transform=tf,
                       split=split, label_space=label_space,
                       uncertain_policy=uncertain_policy or site.uncertain_policy, site_index=site_index,
                       quarantine=quarantine if quarantine is not None else Quarantine(site.quarantine_path,
                                                                                      site=site.name),
                       seed=seed, second_view=None if on_device else view2,
                       use_labels=use_labels if use_labels is not None else site.objective == "supervised" or not train,
                       cache=cache,
                       annotation_size=size if second_view == "annotation" else None,
                       pair_types=pair_types, raw_size=size if on_device else None,
                       second_view_augmented=view2_augmented if on_device else None)


# -- UmiF's supervision from a site's own annotations ---------------------------------------------------


def abnormality_intensity(label: str | None) -> float:
    """The grey level of one abnormality in a rendered annotation, the same at every site (from the
    canonical class name); in [0.25, 1], so never the black background. ``None``: a lesion of unknown
    class (a lesion mask on a row without exactly one positive label) gets the top level."""
    if label is None:
        return 1.0
    return 0.25 + 0.75 * (zlib.crc32(canonical_name(label).lower().encode()) % 64) / 63


def render_annotation(boxes: Sequence[Mapping[str, Any]] | None, mask_path: Path | None, size: int, *,
                      mask_label: str | None = None) -> np.ndarray:
    """A row's localisation as UmiF's segmentation-mask image ``(1, size, size)`` float32: black
    background, each abnormality filled with its own intensity (:func:`abnormality_intensity`).

    Boxes are ``{label, x0, y0, x1, y1}`` normalised to [0, 1]; a lesion mask (PNG, > 0 = lesion) is
    drawn with ``mask_label``'s intensity. Where regions overlap the higher intensity is kept.
    Deliberate difference: the paper draws an RGB image with one colour per abnormality; one channel
    with one grey level per abnormality lets the mask tokenizer share the radiology tokenizer's
    initialisation exactly (both see one-channel images)."""
    out = np.zeros((size, size), np.float32)
    if mask_path is not None:
        out = np.maximum(out, read_mask(mask_path, size) * abnormality_intensity(mask_label))
    for b in boxes if boxes is not None else []:
        x0, x1 = sorted((float(b["x0"]), float(b["x1"])))
        y0, y1 = sorted((float(b["y0"]), float(b["y1"])))
        c0, c1 = int(np.floor(np.clip(x0, 0, 1) * size)), int(np.ceil(np.clip(x1, 0, 1) * size))
        r0, r1 = int(np.floor(np.clip(y0, 0, 1) * size)), int(np.ceil(np.clip(y1, 0, 1) * size))
        region = out[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)]
        np.maximum(region, abnormality_intensity(str(b["label"])), out=region)
    return out[None]


def has_annotation(row: Mapping[str, Any]) -> bool:
    """Whether a manifest row carries localisation (boxes, possibly none found, or a lesion mask)."""
    boxes = row.get("boxes")
    return isinstance(row.get("mask_path"), str) or isinstance(boxes, (list, tuple, np.ndarray))


def site_pair_types(manifest: Manifest, declared: Sequence[str] | None = None, *, source: str = "") -> list[str]:
    """The UmiF pair types a site offers: a report → image-report, labels → image-class, boxes or lesion
    masks → image-segment; none of them → image-only. ``declared`` (the site YAML's ``pair_types``) narrows
    that to a subset; declaring a type the manifest cannot supply is an error naming ``source``."""
    df = manifest.to_pandas()
    out = []
    if df["report"].map(lambda r: isinstance(r, str) and bool(r.strip())).any():
        out.append("image-report")
    if manifest.label_names and (~np.isnan(manifest.label_matrix())).any():
        out.append("image-class")
    if df["mask_path"].notna().any() or df["boxes"].map(lambda b: isinstance(b, (list, tuple, np.ndarray))).any():
        out.append("image-segment")
    out = out or ["image-only"]
    if declared is None:
        return out
    missing = [t for t in declared if t not in out and t != "image-only"]
    if missing:
        raise SiteConfigError(f"site file {source}: pair_types declares {missing}, but its manifest supplies only "
                              f"{out} (image-report needs reports, image-class labels, image-segment boxes or masks)")
    return list(declared)


def pair_type_probabilities(counts: Mapping[str, int]) -> dict[str, float]:
    """Algorithm 1's first draw: a pair type with probability proportional to its data size."""
    total = sum(int(n) for n in counts.values())
    if total <= 0:
        raise ValueError(f"no pairs to sample from: {dict(counts)}")
    return {t: int(n) / total for t, n in counts.items()}


def sample_pairs(supported: Sequence[Sequence[str]], n: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """``n`` (sample, pair type) pairs from the samples at hand, as UmiF's Algorithm 1 draws them.

    A sample with k supervision types offers k pairs (``supported[j]``). Algorithm 1 draws a type with
    probability ∝ its data size (:func:`pair_type_probabilities`), then a pair of that type uniformly,
    i.e. every pair with the same probability; here the pairs are drawn uniformly, without replacement,
    from the pool the batch's samples offer, which is that distribution on the shuffled stream of
    samples a site plane delivers (a type's share of a batch is its share of the pairs in expectation).
    Fewer than ``n`` pairs in the pool: all of them."""
    pool = [(j, t) for j, types in enumerate(supported) for t in types]
    if not pool:
        return []
    pick = rng.choice(len(pool), size=min(int(n), len(pool)), replace=False)
    return [pool[int(k)] for k in sorted(pick)]


SEGMENTATION_TASKS = {"lungs": "lung_mask_path", "pneumothorax": "mask_path"}  # task -> manifest column


def read_mask(path: Path | None, size: int) -> np.ndarray:
    """A PNG mask (> 0 = foreground) resized nearest to ``(size, size)``; zeros for ``None``."""
    if path is None:
        return np.zeros((size, size), np.float32)
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 0
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)) > 0
    return m.astype(np.float32)



class SegmentationDataset(Dataset):
    """Images paired with their masks. Each item is a dict:

    - ``image``: ``(1, size, size)`` float32 in [0, 1] (the raycxr bilinear resize)
    - ``mask``: ``(1, size, size)`` float32 in {0, 1} (nearest resize; zeros where the row has no mask)
    - ``site``, ``image_id``

    An unreadable image gives ``None`` (dropped from its batch by :func:`collate_skip_none`) and is
    recorded in its site's quarantine when one is given.

    Args:
        records: dicts with ``image`` (path), ``mask`` (path or None), ``site`` and ``image_id``.
        size: output side in pixels.
        train: apply the light augmentation (affine on image and mask together, intensity jitter).
        seed: seed of the augmentation.
        quarantines: per site name, where unreadable images are recorded.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], *, size: int, train: bool = False, seed: int = 0,
                 quarantines: Mapping[str, Quarantine] | None = None) -> None:
        self.records = [dict(r) for r in records]
        self.quarantines = dict(quarantines or {})
        self.size = int(size)
        self.train = bool(train)
        self.transform = segmentation_train_transforms(self.size) if self.train else None
        self.set_random_state(seed)

    @classmethod
    def from_manifest(cls, manifest: Manifest | pd.DataFrame, root: str | Path, task: str, *, split: str | None,
                      size: int, train: bool = False, limit: int | None = None, seed: int = 0,
                      frontal_only: bool = True, site: str | None = None,
                      quarantine: Quarantine | None = None) -> SegmentationDataset:
        """The rows of ``split`` (all rows if None) of a manifest whose files lie under ``root``.

        ``lungs`` keeps the rows that have a lung mask; ``pneumothorax`` keeps every row (no mask = empty).
        ``limit`` picks that many rows at random (seeded). Raises ``ValueError`` when the manifest has no
        masks at all for the task."""
        if task not in SEGMENTATION_TASKS:
            raise ValueError(f"unknown segmentation task '{task}'; expected one of {sorted(SEGMENTATION_TASKS)}")
        df = manifest.to_pandas() if isinstance(manifest, Manifest) else manifest
        name = site or (str(df["site"].iloc[0]) if "site" in df.columns and len(df) else str(root))
        col = SEGMENTATION_TASKS[task]
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
        return cls(records, size=size, train=train, seed=seed,
                   quarantines={name: quarantine} if quarantine is not None else None)

    @classmethod
    def from_site(cls, site: SiteConfig, task: str, **kwargs: Any) -> SegmentationDataset:
        """:meth:`from_manifest` on a registered site's manifest (unreadable images go to its quarantine)."""
        return cls.from_manifest(site.load_manifest(), site.root, task, site=site.name,
                                 quarantine=Quarantine(site.quarantine_path, site=site.name), **kwargs)

    @classmethod
    def concat(cls, parts: Sequence[SegmentationDataset], *, seed: int = 0) -> SegmentationDataset:
        """Several sites' datasets as one (same size and mode)."""
        if not parts:
            raise ValueError("no datasets to concatenate")
        return cls([r for p in parts for r in p.records], size=parts[0].size, train=parts[0].train, seed=seed,
                   quarantines={k: q for p in parts for k, q in p.quarantines.items()})

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
        except ImageReadError as e:
            q = self.quarantines.get(r["site"])
            if q is not None:
                q.record(r["image_id"], str(r["image"]), e.reason)
            return None
        item = {"image": resize(image, self.size)[None], "mask": read_mask(r["mask"], self.size)[None]}
        if self.transform is not None:
            item = self.transform(item)
        return {"image": torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32),
                "mask": (torch.as_tensor(np.asarray(item["mask"])) > 0.5).float(),
                "site": r["site"], "image_id": r["image_id"]}
