"""A site as a Ray actor: it owns the site's data and head; raw pixels never leave it.

The actor holds the manifest, the reader, the MONAI transforms, the label space and the site's
task head (Ark) or query expert state. The trainer asks it for *transformed batches* by index, so
only training tensors cross the wire. Place it next to the data with the site YAML's ``placement``
(``label_selector`` for node labels, or ``resources`` for the legacy custom-resource way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset import SiteDataset, collate_skip_none
from ..labels import UnionLabelSpace
from ..quarantine import Quarantine
from ..transforms import eval_transforms, transforms_from_config
from .config import SiteConfig

NAMESPACE = "raycxr"
# Handles this driver created, by actor name. A non-detached actor lives as long as its original
# handle, so the driver keeps them: a second run in the same process reuses the same actors.
_HANDLES: dict[str, Any] = {}


class SiteActorImpl:
    """The actor's logic, plain Python so it is testable without Ray (``SiteActor`` wraps it)."""

    def __init__(self, site: dict[str, Any], data_root: str, transforms: dict[str, Any], site_index: int,
                 seed: int = 0, head_dir: str | None = None) -> None:
        self.site = SiteConfig.from_dict(site, data_root=data_root)
        self.manifest = self.site.load_manifest()
        self.transforms, self.site_index, self.seed = transforms, site_index, seed
        self.quarantine = Quarantine(self.site.quarantine_path, site=self.site.name)
        self.head_path = Path(head_dir or self.site.manifest_path.parent / "heads") / f"{self.site.name}.pt"
        self.datasets: dict[tuple, SiteDataset] = {}

    def info(self) -> dict[str, Any]:
        return {"name": self.site.name, "label_names": self.manifest.label_names, "images": len(self.manifest),
                "objective": self.site.objective, "quarantined": len(self.quarantine)}

    def _dataset(self, mode: str, union_names: tuple[str, ...] | None, train: bool, second_view: bool,
                 split: str) -> SiteDataset:
        key = (mode, union_names, train, second_view, split)
        if key not in self.datasets:
            union = None
            if union_names is not None:
                # the coordinator's union keeps its class order; this site's columns map into it
                union = UnionLabelSpace.build({self.site.name: self.manifest.label_names})
                union = _reindex(union, list(union_names), self.site.name)
            tf = transforms_from_config(self.transforms, train=train)
            view2 = None
            if second_view:
                view2 = eval_transforms(int(self.transforms.get("size", 224))) \
                    if self.site.objective == "supervised" else tf
            self.datasets[key] = SiteDataset(self.manifest, self.site.root, transform=tf, split=split,
                                             label_space=union, uncertain_policy=self.site.uncertain_policy,
                                             site_index=self.site_index, quarantine=self.quarantine, seed=self.seed,
                                             second_view=view2)
        return self.datasets[key]

    def num_items(self, union_names: tuple[str, ...] | None = None, split: str = "train") -> int:
        return len(self._dataset("n", union_names, False, False, split))

    def batch(self, indices: list[int], *, union_names: tuple[str, ...] | None = None, train: bool = True,
              second_view: bool = False, split: str = "train") -> dict | None:
        """Transformed, collated samples; unreadable ones are quarantined here and left out."""
        ds = self._dataset("b", union_names, train, second_view, split)
        return collate_skip_none([ds[i] for i in indices])

    def get_head(self) -> dict[str, Any] | None:
        """The head this site keeps (state dict and version), or None."""
        if not self.head_path.is_file():
            return None
        return torch.load(self.head_path, map_location="cpu", weights_only=True)

    def set_head(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Persist a head handed back by the coordinator (atomically); returns the stored version."""
        self.head_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.head_path.with_suffix(".tmp")
        torch.save({"state": state, "version": int(version)}, tmp)
        tmp.replace(self.head_path)
        return int(version)

    def ping(self) -> str:
        return self.site.name


def _reindex(union: UnionLabelSpace, names: list[str], site: str) -> UnionLabelSpace:
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in union.names if n not in index]
    if missing:
        raise ValueError(f"site '{site}': classes {missing} are not in the run's union label space")
    site_ix = np.array([index[union.names[j]] for j in union.site_index[site]], dtype=np.int64)
    return UnionLabelSpace(list(names), dict(union.site_names), {site: site_ix})


def site_actor_class():
    """``ray.remote(SiteActorImpl)``, built lazily so importing raycxr does not import Ray."""
    import ray

    return ray.remote(SiteActorImpl)


def start_site_actor(site: SiteConfig, *, data_root: str, transforms: dict[str, Any], site_index: int, seed: int,
                     run_name: str, max_restarts: int = 3):
    """A named site actor (``raycxr/<run>/<site>``), restarted by Ray if it dies, placed by the site's
    ``placement`` (``label_selector`` or ``resources``)."""
    opts: dict[str, Any] = {"name": f"{run_name}/{site.name}", "namespace": NAMESPACE, "get_if_exists": True,
                            "max_restarts": max_restarts, "max_task_retries": max_restarts, "num_cpus": 0}
    placement = site.placement or {}
    if placement.get("label_selector"):
        opts["label_selector"] = dict(placement["label_selector"])
    if placement.get("resources"):
        opts["resources"] = dict(placement["resources"])
    d = site.to_dict()
    # absolute paths: the actor may run in another working directory, or on another node
    d["root"], d["manifest"] = str(site.root.resolve()), str(site.manifest_path.resolve())
    d.pop("description", None)
    handle = site_actor_class().options(**opts).remote(d, data_root, transforms, site_index, seed)
    _HANDLES.setdefault(opts["name"], handle)
    return handle
