"""A site as a Ray actor: it owns the site's data and head; raw pixels never leave it.

The actor holds the manifest, the reader, the MONAI transforms, the label space and the site's
task head (Ark) or query expert state. The trainer asks it for batches by index, so only training
tensors cross the wire: with ``transforms.augment=device`` (the default) the preprocessed pixels as the
decode cache stores them (uint8 / uint16), which the trainer augments on its device; with ``host``,
augmented here. Place it next to the data with the site YAML's ``placement``
(``label_selector`` for node labels, or ``resources`` for the legacy custom-resource way).

A site may serve from several replicas (``replicas:`` in its YAML, or ``ray.site_replicas``): the
same actor started N times with the same placement, so decoding and augmentation run in N processes
on the site's nodes. Replica 0 is the named actor ``raycxr/<run>/<site>`` that also keeps the head;
the others (``raycxr/<run>/<site>#<r>``) only serve batches, each with its own augmentation stream.
``replicas: auto`` grows and shrinks that pool from the consumers' demand (:mod:`raycxr.ray.autoscale`).

Every wait on a site's actors is visible and bounded (:func:`await_sites`): a site whose node is not
there (a label no node has, or a node lost and not back yet) says after a few seconds what it waits for
and which labels the cluster has, and fails after ``ray.placement_timeout_s`` in one line naming the site.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..dataset import SiteDataset, collate_skip_none, site_dataset
from ..labels import UnionLabelSpace
from ..quarantine import Quarantine
from ..sites.config import SiteConfig

NAMESPACE = "raycxr"
# Handles this driver created, by actor name. A non-detached actor lives as long as its original
# handle, so the driver keeps them: a second run in the same process reuses the same actors.
_HANDLES: dict[str, Any] = {}
NOTICE_S = 5.0  # a site not answering after this long says what it waits for (then waits on, to the deadline)



def keep_handle(name: str, handle: Any) -> Any:
    """Keep the first handle of the actor ``name`` for the life of this driver (the handle that owns a
    non-detached actor keeps it alive); returns the kept handle."""
    return _HANDLES.setdefault(name, handle)


def forget_handle(name: str) -> None:
    """Drop the kept handle of the actor ``name`` (it was killed, or never placed)."""
    _HANDLES.pop(name, None)


class PlacementError(RuntimeError):
    """A site's actors found no node, or did not answer, within ``ray.placement_timeout_s``."""


class SiteActorImpl:
    """The actor's logic, plain Python so it is testable without Ray (``SiteActor`` wraps it).

    Args:
        site: the site's own config (absolute paths, :meth:`SiteConfig.resolved`), passed as is so
            every key (a custom ``quarantine:`` path included) holds inside the actor. A node with its
            own ``$RAYCXR_DATA_ROOT`` resolves a relative root against it (:meth:`SiteConfig.on_node`).
        transforms: the run's ``transforms`` config node.
        site_index: the site's number in the run (UniChest's source id).
        seed: seeds the uncertain-label policy.
        head_dir: where the site keeps its head (default: ``heads/`` next to its manifest).
        replica: this actor's number among the site's replicas; it offsets the augmentation seed so
            that replicas do not repeat each other's random draws (labels stay the same).
    """

    def __init__(self, site: SiteConfig, transforms: dict[str, Any], site_index: int, seed: int = 0,
                 head_dir: str | None = None, replica: int = 0) -> None:
        self.site, self.replica = site.on_node(), int(replica)  # this node's data root, if it has its own
        self.served = 0  # images this actor has served (transformed)
        self.busy_s = 0.0  # seconds spent serving them
        self.manifest = self.site.load_manifest()
        self.transforms, self.site_index, self.seed = transforms, site_index, seed
        self.quarantine = Quarantine(self.site.quarantine_path, site=self.site.name)
        self.head_path = Path(head_dir or self.site.manifest_path.parent / "heads") / f"{self.site.name}.pt"
        self.datasets: dict[tuple, SiteDataset] = {}

    def info(self) -> dict[str, Any]:
        return {"name": self.site.name, "label_names": self.manifest.label_names, "images": len(self.manifest),
                "objective": self.site.objective, "quarantined": len(self.quarantine)}

    def _dataset(self, mode: str, union_names: tuple[str, ...] | None, train: bool, second_view: bool | str,
                 split: str) -> SiteDataset:
        key = (mode, union_names, train, second_view, split)
        if key not in self.datasets:
            # the coordinator's union keeps its class order; this site's columns map into it
            union = None if union_names is None else UnionLabelSpace.onto(
                list(union_names), {self.site.name: self.manifest.label_names}, strict=True)
            self.datasets[key] = site_dataset(self.site, self.transforms, split=split, train=train, label_space=union,
                                              second_view=second_view, site_index=self.site_index, seed=self.seed,
                                              manifest=self.manifest, quarantine=self.quarantine)
            if self.replica and self.datasets[key].transform is not None:
                self.datasets[key].transform.set_random_state(
                    seed=int(self.seed) * 1009 + int(self.site_index) + 7919 * self.replica)
        return self.datasets[key]

    def num_items(self, union_names: tuple[str, ...] | None = None, split: str = "train") -> int:
        return len(self._dataset("n", union_names, False, False, split))

    def batch(self, indices: list[int], *, union_names: tuple[str, ...] | None = None, train: bool = True,
              second_view: bool | str = False, split: str = "train", timed: bool = False) -> dict | None:
        """Transformed, collated samples; unreadable ones are quarantined here and left out. ``timed``:
        ``{"batch": ..., "serve_s": seconds}``, the serve time a stream needs for autoscaling."""
        t0 = time.perf_counter()
        ds = self._dataset("b", union_names, train, second_view, split)
        out = collate_skip_none([ds[i] for i in indices])
        self.served += 0 if out is None else len(out["image"])
        dt = time.perf_counter() - t0
        self.busy_s += dt
        return {"batch": out, "serve_s": dt} if timed else out

    def stats(self) -> dict[str, Any]:
        """What this replica did: images served, and its decode cache's hits and misses (if any)."""
        caches = {id(d.cache): d.cache for d in self.datasets.values() if d.cache is not None}
        return {"replica": self.replica, "served": self.served, "busy_s": round(self.busy_s, 4),
                "cache": {k: sum(c.stats[k] for c in caches.values()) for k in ("hits", "misses", "rebuilt")}
                if caches else None}

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

    def node(self) -> str:
        """The Ray node this actor runs on (where the site's pixels are read)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def site_actor_class():
    """``ray.remote(SiteActorImpl)``, built lazily so importing raycxr does not import Ray."""
    import ray

    return ray.remote(SiteActorImpl)


def replica_name(run_name: str, site: str, replica: int = 0) -> str:
    """``<run>/<site>`` for replica 0 (the site's actor), ``<run>/<site>#<r>`` for the others."""
    return f"{run_name}/{site}" if replica == 0 else f"{run_name}/{site}#{replica}"


def placement_options(site: SiteConfig) -> dict[str, Any]:
    """The ``.options()`` that put an actor on the site's nodes (its ``placement``)."""
    placement, opts = site.placement or {}, {}
    if placement.get("label_selector"):
        opts["label_selector"] = dict(placement["label_selector"])
    if placement.get("resources"):
        opts["resources"] = dict(placement["resources"])
    return opts


def start_site_actor(site: SiteConfig, *, transforms: dict[str, Any], site_index: int, seed: int, run_name: str,
                     max_restarts: int = -1, replica: int = 0, num_cpus: float = 0):
    """A named site actor (``raycxr/<run>/<site>``, or ``...#<replica>``), restarted by Ray if it dies (-1:
    always, so it comes back with its node), placed by the site's ``placement`` (``label_selector`` or
    ``resources``). Its requests are retried on the restarted actor (they only read, or write a head
    idempotently). ``num_cpus`` reserves cores for it (``ray.site_cpus``; 0 by default)."""
    opts: dict[str, Any] = {"name": replica_name(run_name, site.name, replica), "namespace": NAMESPACE,
                            "get_if_exists": True, "max_restarts": max_restarts, "max_task_retries": max_restarts,
                            "num_cpus": num_cpus, **placement_options(site)}
    # absolute paths: the actor may run in another working directory, or on another node (where a relative
    # root may resolve against that node's own data root instead, SiteConfig.on_node)
    handle = site_actor_class().options(**opts).remote(site.resolved(), transforms, site_index, seed, replica=replica)
    keep_handle(opts["name"], handle)
    return handle


def cluster_labels() -> list[dict[str, str]]:
    """The labels of the cluster's live nodes (Ray's own ``ray.io/...`` labels left out)."""
    import ray

    return [{k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")}
            for n in ray.nodes() if n.get("Alive")]


def wants(site: SiteConfig) -> str:
    """What the site's placement asks of a node, in words: ``site=nih``, ``resource site_nih``, or ''."""
    p = site.placement or {}
    parts = [f"{k}={v}" for k, v in (p.get("label_selector") or {}).items()]
    parts += [f"resource {k}" for k in (p.get("resources") or {})]
    return ", ".join(parts)


def _labels_text() -> str:
    labels = cluster_labels()
    return "; ".join(", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "(none)" for d in labels) or "no live node"


def waiting_line(site: SiteConfig) -> str:
    """``site nih: waiting for a node with site=nih; the cluster's nodes have labels ...``."""
    if wants(site):
        return (f"site {site.name}: waiting for a node with {wants(site)}; "
                f"the cluster's nodes have labels: {_labels_text()}")
    return f"site {site.name}: waiting for its actor to answer (its node may be starting or lost)"


def await_sites(refs: list[Any], owners: list[SiteConfig], timeout_s: float, *, notice_s: float = NOTICE_S) -> list:
    """``ray.get(refs)``, bounded: ``owners[i]`` is the site whose actor answers ``refs[i]``. A wait longer
    than ``notice_s`` prints, once per site, what it waits for (:func:`waiting_line`); one longer than
    ``timeout_s`` raises :class:`PlacementError` naming the late sites, what they need and the cluster's
    labels. The fast path is one plain ``ray.get``."""
    import ray
    from ray.exceptions import GetTimeoutError

    notice_s = min(notice_s, timeout_s / 2)
    try:
        return ray.get(refs, timeout=notice_s)
    except GetTimeoutError:
        pass

    def late() -> list[SiteConfig]:
        pending = set(ray.wait(list(refs), num_returns=len(refs), timeout=0, fetch_local=False)[1])
        return list({o.name: o for r, o in zip(refs, owners) if r in pending}.values())

    for site in late():
        print(waiting_line(site), file=sys.stderr, flush=True)
    try:
        return ray.get(refs, timeout=max(0.0, timeout_s - notice_s))
    except GetTimeoutError:
        sites = late() or owners[:1]
        what = "; ".join(f"site {s.name}: no node with {wants(s)}" if wants(s) else f"site {s.name}: no answer"
                         for s in sites)
        raise PlacementError(f"{what} within {timeout_s:g} s (ray.placement_timeout_s); the cluster's nodes have "
                             f"labels: {_labels_text()}") from None
