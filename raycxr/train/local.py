"""``raycxr pretrain runner=local``: a method's schedule in one process, data read straight from the sites.

The driver (:mod:`raycxr.train.driver`) and the methods (:mod:`raycxr.methods`) are the same that the
Ray Train coordinator and Tune trials run; only the data plane differs (:class:`LocalData` here,
site actors there).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..checkpoint import Checkpoint
from ..dataset import SiteDataset, collate_skip_none, site_dataset
from ..labels import UnionLabelSpace
from ..methods import get_method, import_plugins
from ..sites.config import SiteConfig, select_sites  # noqa: F401 - select_sites: its old home, still imported from here
from ..transforms import BatchAugment, batch_augment_from_config
from .driver import Run, train_method


class DataWait:
    """Seconds a trainer spent waiting for its training batches, summed until taken: each data plane
    keeps one, its training loaders add to it, and the driver logs it per unit (``data_wait_s``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


_END = object()


class EpochLoader:
    """A DataLoader whose shuffle order is a function of (seed, epoch): ``set_epoch`` before iterating,
    so a resumed run sees every epoch in the order an uninterrupted run would. ``wait``: where the time
    spent waiting for each batch goes (training loaders); ``augment``: the batches' augmentation on the
    trainer's device (``transforms.augment=device``), applied where they are copied there
    (:func:`raycxr.engine.device.limited`)."""

    def __init__(self, ds: Dataset, cfg: DictConfig, *, shuffle: bool = True, wait: DataWait | None = None,
                 augment: BatchAugment | None = None) -> None:
        self.wait, self.augment = wait, augment
        self.seed = int(cfg.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.num_workers,
                                 collate_fn=collate_skip_none, drop_last=shuffle and len(ds) > cfg.batch_size,
                                 generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + int(epoch))

    def __iter__(self) -> Iterator:
        return iter(self.loader) if self.wait is None else self._timed()

    def _timed(self) -> Iterator:
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, _END)
            self.wait.add(time.perf_counter() - t0)
            if batch is _END:
                return
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


class LocalData:
    """The data plane of a single process: datasets read straight from the site folders.

    The Ray runner provides the same methods backed by site actors, so the methods are shared by both.
    """

    def __init__(self, cfg: DictConfig, sites: dict[str, SiteConfig]) -> None:
        self.cfg, self.sites = cfg, sites
        self.manifests = {n: s.load_manifest() for n, s in sites.items()}
        self.label_names = {n: m.label_names for n, m in self.manifests.items()}
        self.union = UnionLabelSpace.build(self.label_names)
        self.transforms = OmegaConf.to_container(cfg.transforms, resolve=True)
        self._val: EpochLoader | None = None
        self.wait = DataWait()

    def take_wait(self) -> float:
        """Seconds the trainer waited for training batches since the last call."""
        return self.wait.take()

    def datasets(self, *, split: str = "train", train: bool = True, union: bool = False,
                 second_view: bool | str = False) -> dict[str, SiteDataset]:
        """One dataset per site (:func:`raycxr.dataset.site_dataset`); unreadable images are quarantined."""
        return {n: site_dataset(s, self.transforms, split=split, train=train, label_space=self.union if union else None,
                                second_view=second_view, site_index=i, seed=int(self.cfg.seed),
                                manifest=self.manifests[n])
                for i, (n, s) in enumerate(self.sites.items())}

    def site_classes(self) -> dict[str, int]:
        return {n: len(names) for n, names in self.label_names.items()}

    def union_loader(self, second_view: bool | str = False) -> EpochLoader:
        """Every site's train split in one shuffled stream, union targets (``second_view`` as in
        :func:`raycxr.dataset.site_dataset`)."""
        return EpochLoader(ConcatDataset(list(self.datasets(union=True, second_view=second_view).values())), self.cfg,
                           wait=self.wait, augment=train_augment(self.cfg))

    def site_loaders(self, second_view: bool = True) -> dict[str, EpochLoader]:
        return {n: EpochLoader(d, self.cfg, wait=self.wait, augment=train_augment(self.cfg, stream=i))
                for i, (n, d) in enumerate(self.datasets(second_view=second_view).items())}

    def val_batches(self) -> Iterable | None:
        """Un-augmented val split of every site, union targets (``None`` when validation is off)."""
        if not val_enabled(self.cfg):
            return None
        if self._val is None:  # built once: every unit scores the same images
            sets: list[Dataset] = list(self.datasets(split=self.cfg.val.split, train=False,
                                                     union=True).values())
            limit = self.cfg.val.limit
            if limit:
                sets = [torch.utils.data.Subset(d, range(min(int(limit), len(d)))) for d in sets]
            self._val = EpochLoader(ConcatDataset(sets), self.cfg, shuffle=False)
        return self._val

    def probe(self) -> dict | None:
        """A fixed, un-augmented batch from every site: the same images scored after every unit."""
        n = int(self.cfg.probe_size)
        if n <= 0:
            return None
        ds = self.datasets(train=False, union=True)
        per = max(1, n // max(len(ds), 1))
        return collate_skip_none([d[i] for d in ds.values() for i in range(min(per, len(d)))])

    def distribute(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer  # one process: nothing to synchronise

    def site_heads(self) -> dict[str, dict]:
        return {}

    def hand_back_heads(self, heads: dict[str, dict], version: int) -> None:
        pass


def train_augment(cfg: DictConfig, rank: int = 0, stream: int = 0) -> BatchAugment | None:
    """A training loader's augmentation on the trainer's device (None with ``transforms.augment=host``),
    seeded per run, Train worker and loader so that a run repeats and no two draw the same."""
    return batch_augment_from_config(OmegaConf.to_container(cfg.transforms, resolve=True),
                                     seed=int(cfg.seed) * 1009 + 7919 * int(rank) + 104729 * int(stream))


def val_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.val.enabled)


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on the registered sites in this process; returns ``{"history", "checkpoint"}``."""
    import_plugins(cfg.get("plugins"))
    method_cls = get_method(cfg.method)
    sites = select_sites(cfg)
    resume = Checkpoint.load(cfg.resume) if cfg.get("resume") else None
    return train_method(cfg, sites, Run(cfg.out), resume, LocalData(cfg, sites), method_cls)
