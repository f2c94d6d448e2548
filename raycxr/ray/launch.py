"""Starting a run on Ray, in one place: the cluster, the site actors and the Train ``TorchTrainer``.

``raycxr pretrain runner=ray`` (:mod:`raycxr.ray.runner`) and Tune trials that run as Train
runs (:mod:`raycxr.tune`) both launch through here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..sites.config import SiteConfig
from .actor import (
    NAMESPACE,
    PlacementError,
    await_sites,
    forget_handle,
    keep_handle,
    placement_options,
    replica_name,
    start_site_actor,
)
from .autoscale import ScalePolicy, SitePool, pool_name


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


def placement_timeout(cfg: DictConfig) -> float:
    """``ray.placement_timeout_s``: how long anything waits for a site's node before failing by name."""
    return float(cfg.ray.placement_timeout_s)


# What makes two launches the same run: a second launch into the same Train run (same name and storage)
# with any of these changed is refused unless it says resume=. The schedule's length, learning rates and
# Ray's own knobs may change (running again with one more round continues the run).
IDENTITY_FILE = "raycxr_run.json"


def run_identity(cfg: DictConfig, sites: dict[str, SiteConfig]) -> dict[str, Any]:
    """The fields that name what a run trains: its ``out``, method, encoder, image size and sites (by data)."""
    return {"out": str(Path(cfg.out).resolve()), "method": str(cfg.method), "encoder": str(cfg.encoder.name),
            "image_size": int(cfg.image_size), "sites": {n: str(s.manifest_path.resolve()) for n, s in sites.items()}}


def run_location(cfg: DictConfig) -> tuple[str, str | Path]:
    """The Train run's name and storage. The name is ``ray.run_name``, or by default the ``out`` folder's name
    plus a hash of its absolute path, so two runs with different ``out`` never share a Train run or site
    actors; the storage is ``ray.storage_path`` (a path, or a URI that pyarrow's file systems open, which
    stays a string), or by default ``<out>/ray``."""
    out = Path(cfg.out).resolve()
    name = cfg.ray.get("run_name") or f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"
    spec = cfg.ray.get("storage_path")
    if spec and "://" in str(spec):  # an object store or other pyarrow file system (s3://, gs://, file://)
        return str(name), str(spec).rstrip("/")
    storage = Path(spec).resolve() if spec else out / "ray"
    return str(name), storage


def claim_run(cfg: DictConfig, sites: dict[str, SiteConfig], name: str, storage: str | Path) -> None:
    """Record this launch's identity with its Train run; a run there already, started with other settings,
    is refused in one line saying what changed, unless the launch says ``resume=``."""
    from pyarrow import fs as pafs

    if isinstance(storage, Path):
        filesystem, base = pafs.LocalFileSystem(), str(storage)
    else:
        filesystem, base = pafs.FileSystem.from_uri(storage)
    folder = f"{base.rstrip('/')}/{name}"
    path = f"{folder}/{IDENTITY_FILE}"
    new = run_identity(cfg, sites)
    if filesystem.get_file_info(path).type == pafs.FileType.File and not cfg.get("resume"):
        with filesystem.open_input_stream(path) as f:
            old = json.loads(f.read().decode())
        changed = [f"{k}: {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]
        if changed:
            raise ValueError(f"Ray run '{name}' in {storage} was started with other settings ({'; '.join(changed)}); "
                             f"pass resume={old.get('out')} to continue it with these, or use another out= "
                             f"(or ray.run_name=) for a new run")
    filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(new, indent=1).encode())


def start_site_actors(cfg: DictConfig, sites: dict[str, SiteConfig], run_name: str) -> dict[str, Any]:
    """One named actor per site (``raycxr/<run_name>/<site>``), ready when this returns."""
    return {n: pool[0] for n, pool in start_site_replicas(cfg, sites, run_name, replicas=1).items()}


def replica_policy(cfg: DictConfig, site: SiteConfig) -> ScalePolicy | None:
    """The autoscaling bounds of ``site`` (``replicas: auto`` or ``{min, max}`` in its YAML, or
    ``ray.site_replicas: auto`` for every site without its own count), None for a fixed count."""
    spec = site.replicas if site.replicas is not None else cfg.ray.site_replicas
    if spec != "auto" and not isinstance(spec, dict):
        return None
    knobs = dict(OmegaConf.to_container(cfg.ray.autoscale, resolve=True))
    bounds = dict(spec) if isinstance(spec, dict) else {}
    lo, hi = knobs.pop("min"), knobs.pop("max")  # ray.autoscale's bounds, unless the site's YAML gives its own
    lo, hi = bounds.get("min", lo), bounds.get("max", hi)
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
    cpus = float(cfg.ray.site_cpus)
    pools = {n: [start_site_actor(s, transforms=transforms, site_index=i, seed=int(cfg.seed), run_name=run_name,
                                  max_restarts=cfg.ray.actor_max_restarts, replica=r, num_cpus=cpus)
                 for r in range(replicas or site_replicas(cfg, s))]
             for i, (n, s) in enumerate(sites.items())}
    pings = [(a.ping.remote(), sites[n]) for n, pool in pools.items() for a in pool]
    try:  # a site whose label no node has waits visibly, then fails by name (not a silent hang)
        await_sites([r for r, _ in pings], [s for _, s in pings], placement_timeout(cfg))
    except PlacementError:
        for pool in pools.values():  # not left pending under their names for the next launch
            for a in pool:
                ray.kill(a, no_restart=True)
        for n, s in sites.items():
            for r in range(len(pools[n])):
                forget_handle(replica_name(run_name, s.name, r))
        raise
    return pools


def start_site_pools(cfg: DictConfig, sites: dict[str, SiteConfig], run_name: str, replicas: dict[str, list[Any]],
                     consumers: int = 1) -> dict[str, Any]:
    """The pool actor (:class:`~raycxr.ray.autoscale.SitePool`) of every autoscaled site, holding the
    replicas :func:`start_site_replicas` started; ``consumers``: the streams that report (Train workers)."""
    import ray

    out = {}
    transforms = OmegaConf.to_container(cfg.transforms, resolve=True)
    for i, (n, s) in enumerate(sites.items()):
        policy = replica_policy(cfg, s)
        if policy is None:
            continue
        # the pool starts the site's replicas: it lives on the site's nodes, so it goes when a node goes and
        # comes back with one (always restarted; its calls retried). Restarted, it serves the replicas it was
        # given and starts the others again (those it owned went with it).
        opts = {"name": pool_name(run_name, n), "namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0,
                "max_restarts": -1, "max_task_retries": -1}
        if "label_selector" in placement_options(s):  # (a custom resource stays the replicas' to hold)
            opts["label_selector"] = placement_options(s)["label_selector"]
        out[n] = ray.remote(SitePool).options(**opts).remote(
            s.resolved(), transforms, i, int(cfg.seed), run_name, len(replicas[n]), asdict(policy), consumers,
            int(cfg.ray.actor_max_restarts), float(cfg.ray.site_cpus))
        # as for the site actors: the first handle owns the actor, so the driver keeps it (a resumed run in
        # the same process gets the same pool by name, with the replicas it started)
        keep_handle(opts["name"], out[n])
    await_sites([p.handles.remote() for p in out.values()], [sites[n] for n in out], placement_timeout(cfg))
    return out


def build_trainer(cfg: DictConfig, actors: dict[str, Any], loop: Callable[[dict], None], *, name: str,
                  storage: str | Path, method_cls: type | None = None, callbacks: list | None = None,
                  replicas: dict[str, list[Any]] | None = None, scalers: dict[str, Any] | None = None,
                  sites: dict[str, SiteConfig] | None = None) -> Any:
    """The ``TorchTrainer`` whose workers run ``loop`` (:func:`raycxr.ray.runner.train_loop_per_worker`).

    ``method_cls`` travels to the workers with the config, so a method registered outside raycxr (a
    plugin, or a test) runs there too; resume is Train V2's: the same ``name`` and ``storage``.
    ``replicas`` (:func:`start_site_replicas`): the actors that serve each site's batches (default: ``actors``);
    ``scalers`` (:func:`start_site_pools`): the pool actors of the autoscaled sites; ``sites``: the driver's
    site configs, so that the workers need not read ``sites.sites_dir`` on their nodes.
    With ``ray.use_gpu`` Ray Train sets up NCCL (one GPU per worker); on CPU, gloo."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "actors": actors,
                           "method_cls": method_cls, "replicas": replicas, "scalers": scalers or {},
                           "sites": sites},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks or None,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep)),
    )
