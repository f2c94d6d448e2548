"""Starting a run on Ray, in one place: the cluster, the site actors and the Train ``TorchTrainer``.

``raycxr pretrain runner=ray`` (:mod:`raycxr.train.ray_runner`) and Tune trials that run as Train
runs (:mod:`raycxr.tune`) both launch through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..sites.actor import _HANDLES, NAMESPACE, start_site_actor
from ..sites.autoscale import ScalePolicy, SitePool, pool_name
from ..sites.config import SiteConfig


def init_ray(cfg: DictConfig) -> None:
    """Join ``ray.address`` or start a local cluster (``ray.num_cpus``, ``ray.object_store_mb``), once."""
    import ray

    if ray.is_initialized():
        return
    r = cfg.ray
    ray.init(address=r.address, num_cpus=r.num_cpus, include_dashboard=False, log_to_driver=r.log_to_driver,
             object_store_memory=int(r.object_store_mb) * 2**20 if r.object_store_mb else None)


def absolute_paths(cfg: DictConfig) -> None:
    """Make the run's paths absolute: workers and actors run in other folders, possibly on other nodes."""
    cfg.out = str(Path(cfg.out).resolve())
    cfg.sites.data_root = str(Path(cfg.sites.data_root).resolve())
    cfg.sites.sites_dir = str(Path(cfg.sites.sites_dir).resolve())


def start_site_actors(cfg: DictConfig, sites: dict[str, SiteConfig], run_name: str) -> dict[str, Any]:
    """One named actor per site (``raycxr/<run_name>/<site>``), ready when this returns."""
    return {n: pool[0] for n, pool in start_site_replicas(cfg, sites, run_name, replicas=1).items()}


def replica_policy(cfg: DictConfig, site: SiteConfig) -> ScalePolicy | None:
    """The autoscaling bounds of ``site`` (``replicas: auto`` or ``{min, max}`` in its YAML, or
    ``ray.site_replicas: auto`` for every site without its own count), None for a fixed count."""
    spec = site.replicas if site.replicas is not None else cfg.ray.get("site_replicas")
    if spec != "auto" and not isinstance(spec, dict):
        return None
    knobs = dict(OmegaConf.to_container(cfg.ray.autoscale, resolve=True)) if cfg.ray.get("autoscale") else {}
    bounds = dict(spec) if isinstance(spec, dict) else {}
    lo, hi = bounds.get("min", knobs.pop("min", 1)), bounds.get("max", knobs.pop("max", 4))  # the pops always run
    return ScalePolicy(min_replicas=int(lo), max_replicas=int(hi), **knobs)


def site_replicas(cfg: DictConfig, site: SiteConfig) -> int:
    """How many actors serve ``site`` at the start: its YAML's ``replicas``, else ``ray.site_replicas``
    (default auto); an autoscaled site starts at its minimum."""
    run = cfg.ray.get("site_replicas")
    if run is not None and run != "auto" and (not isinstance(run, int) or isinstance(run, bool) or run < 1):
        raise ValueError(f"ray.site_replicas must be a positive integer or auto, got {run!r}")
    policy = replica_policy(cfg, site)
    if policy is not None:
        return policy.min_replicas
    return int(site.replicas or run or 1)


def start_site_replicas(cfg: DictConfig, sites: dict[str, SiteConfig], run_name: str,
                        replicas: int | None = None) -> dict[str, list[Any]]:
    """Each site's replicas (:func:`site_replicas`, or ``replicas`` for every site), all placed by the
    site's ``placement``; element 0 is the site's named actor. Ready when this returns."""
    import ray

    transforms = OmegaConf.to_container(cfg.transforms, resolve=True)
    cpus = float(cfg.ray.get("site_cpus") or 0)
    pools = {n: [start_site_actor(s, transforms=transforms, site_index=i, seed=int(cfg.seed), run_name=run_name,
                                  max_restarts=cfg.ray.actor_max_restarts, replica=r, num_cpus=cpus)
                 for r in range(replicas or site_replicas(cfg, s))]
             for i, (n, s) in enumerate(sites.items())}
    ray.get([a.ping.remote() for pool in pools.values() for a in pool])
    return pools


def start_site_pools(cfg: DictConfig, sites: dict[str, SiteConfig], run_name: str, replicas: dict[str, list[Any]],
                     consumers: int = 1) -> dict[str, Any]:
    """The pool actor (:class:`~raycxr.sites.autoscale.SitePool`) of every autoscaled site, holding the
    replicas :func:`start_site_replicas` started; ``consumers``: the streams that report (Train workers)."""
    import ray

    out = {}
    transforms = OmegaConf.to_container(cfg.transforms, resolve=True)
    for i, (n, s) in enumerate(sites.items()):
        policy = replica_policy(cfg, s)
        if policy is None:
            continue
        opts = {"name": pool_name(run_name, n), "namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0}
        if (s.placement or {}).get("label_selector"):  # the pool starts the site's replicas: keep it on its nodes
            opts["label_selector"] = dict(s.placement["label_selector"])
        out[n] = ray.remote(SitePool).options(**opts).remote(
            s.resolved(), transforms, i, int(cfg.seed), run_name, replicas[n], asdict(policy), consumers,
            int(cfg.ray.actor_max_restarts), float(cfg.ray.get("site_cpus") or 0))
        # as for the site actors: the first handle owns the actor, so the driver keeps it (a resumed run in
        # the same process gets the same pool by name, with the replicas it started)
        _HANDLES.setdefault(opts["name"], out[n])
    ray.get([p.handles.remote() for p in out.values()])
    return out


def build_trainer(cfg: DictConfig, actors: dict[str, Any], loop: Callable[[dict], None], *, name: str,
                  storage: str | Path, method_cls: type | None = None, callbacks: list | None = None,
                  replicas: dict[str, list[Any]] | None = None, scalers: dict[str, Any] | None = None) -> Any:
    """The ``TorchTrainer`` whose workers run ``loop`` (:func:`raycxr.train.ray_runner.train_loop_per_worker`).

    ``method_cls`` travels to the workers with the config, so a method registered outside raycxr (a
    plugin, or a test) runs there too; resume is Train V2's: the same ``name`` and ``storage``.
    ``replicas`` (:func:`start_site_replicas`): the actors that serve each site's batches (default: ``actors``);
    ``scalers`` (:func:`start_site_pools`): the pool actors of the autoscaled sites.
    With ``ray.use_gpu`` Ray Train sets up NCCL (one GPU per worker); on CPU, gloo."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "actors": actors,
                           "method_cls": method_cls, "replicas": replicas, "scalers": scalers or {}},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks or None,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep)),
    )
