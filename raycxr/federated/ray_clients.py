"""``raycxr federate runner=ray``: each site's :class:`~raycxr.federated.client.SiteClient` in its own Ray
actor, placed with the site YAML's ``placement`` (node labels or custom resources), so the sites
train in parallel where their data lives. Only model state crosses the wire: the actor reads its
images itself and returns the update :meth:`SiteClient.fit` builds.

A site whose actor dies is left out of the round and gets a fresh actor the next round (the server
sends it the local state it kept, so nothing is lost); a site that misses ``federate.deadline_s`` has
its actor killed, so the next round does not queue behind the late one.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..ray.actor import NAMESPACE
from ..ray.launch import init_ray
from ..sites.config import SiteConfig
from .client import SiteClient


def client_actor_options(cfg: DictConfig, site: SiteConfig) -> dict[str, Any]:
    """Ray actor options of a site's client: its CPUs (``federate.cpus_per_site``), its GPU
    (``ray.use_gpu``) and the site's ``placement``."""
    opts: dict[str, Any] = {"namespace": NAMESPACE, "num_cpus": float(cfg.federate.cpus_per_site),
                            "num_gpus": 1 if cfg.ray.use_gpu else 0, "max_restarts": 0}
    placement = site.placement or {}
    if placement.get("label_selector"):
        opts["label_selector"] = dict(placement["label_selector"])
    if placement.get("resources"):
        opts["resources"] = dict(placement["resources"])
    return opts


class RayClients:
    """One :class:`SiteClient` actor per site; rounds run on all of them at once."""

    def __init__(self, cfg: DictConfig) -> None:
        import ray

        init_ray(cfg)
        self.ray = ray
        self.cfg = cfg
        self.container = OmegaConf.to_container(cfg, resolve=True)
        self.actors: dict[str, Any] = {}
        self.sites: dict[str, tuple[SiteConfig, int]] = {}

    def ensure(self, sites: dict[str, SiteConfig]) -> None:
        for i, (n, s) in enumerate(sites.items()):
            self.sites.setdefault(n, (s.resolved(), i))
            if n not in self.actors:
                site, index = self.sites[n]
                cls = self.ray.remote(SiteClient)
                self.actors[n] = cls.options(**client_actor_options(self.cfg, site)).remote(self.container, site, index)

    def _drop(self, name: str) -> None:
        actor = self.actors.pop(name, None)
        if actor is not None:
            self.ray.kill(actor, no_restart=True)

    def _gather(self, refs: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        ready_ids = set(ready)
        out: dict[str, Any] = {}
        for n, ref in refs.items():
            if ref not in ready_ids:
                out[n] = TimeoutError(f"missed the round deadline of {timeout} s")
                self._drop(n)
                continue
            try:
                out[n] = self.ray.get(ref)
            except Exception as e:  # the actor died, or the site's training raised
                out[n] = e
                if isinstance(e, self.ray.exceptions.RayActorError):
                    self.actors.pop(n, None)
        return out

    def call(self, name: str, method: str, *args: Any) -> Any:
        res = self._gather({name: getattr(self.actors[name], method).remote(*args)}, None)[name]
        if isinstance(res, BaseException):
            raise res
        return res

    def info(self, names: list[str]) -> dict[str, Any]:
        return self._gather({n: self.actors[n].info.remote() for n in names}, None)

    def fit(self, jobs: dict[str, tuple], deadline: float | None) -> dict[str, Any]:
        # the global model goes into the object store once, not once per site
        shared = {id(args[0]): self.ray.put(args[0]) for args in jobs.values()}
        refs = {n: self.actors[n].fit.remote(shared[id(args[0])], *args[1:]) for n, args in jobs.items()}
        return self._gather(refs, deadline)

    def close(self) -> None:
        for n in list(self.actors):
            self._drop(n)
