"""``raycxr pretrain runner=ray``: the same method schedules, on Ray.

- Every site runs as a named :class:`~raycxr.ray.actor.SiteActorImpl` actor that keeps its pixels,
  transforms and head, plus optional replicas placed like it (``replicas:``, ``ray.site_replicas``); the
  trainer pulls transformed batches by index from the least busy replica, a bounded window ahead.
- A Ray Train ``TorchTrainer`` (Train V2) runs :func:`train_loop_per_worker` on N workers (gloo on
  CPU). The loop calls :func:`raycxr.train.driver.train_method`, the same driver and method the local
  runner runs, with an actor-backed data plane and a checkpoint sink that reports through
  ``ray.train.report``. Gradients are averaged across workers by :class:`~raycxr.ray.grad_sync.BucketedGradSync`
  (DDP's numerics: bucketed, overlapped with the backward pass), so the models keep their own methods.
- Launching (cluster, site actors, trainer) is :mod:`raycxr.ray.launch`, shared with Tune.
- Resume: run again with the same ``out`` (or ``ray.run_name`` / ``ray.storage_path``); Ray hands the
  latest checkpoint back (``ray.train.get_checkpoint``). A run's Train name comes from its ``out``, and a
  second launch into a run started with another method, encoder, image size or sites is refused unless
  it says ``resume=`` (:func:`~raycxr.ray.launch.claim_run`). ``FailureConfig(max_failures)`` restarts a failed
  worker group from it, and site actors are restarted by Ray (``max_restarts``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import FILENAME, Checkpoint
from ..labels import UnionLabelSpace
from ..methods import get_method, import_plugins
from ..sites.config import SiteConfig
from ..train.driver import Run, best_summary, describe_best, train_method
from ..train.local import DataWait, select_sites, train_augment, val_enabled
from .actor import await_sites
from .grad_sync import BucketedGradSync, GradAllReduce
from .launch import (
    absolute_paths,
    build_trainer,
    claim_run,
    init_ray,
    placement_timeout,
    run_location,
    start_site_pools,
    start_site_replicas,
)


def merge_batches(parts: list[dict]) -> dict | None:
    """Concatenate collated batches from several sites (tensors along dim 0, lists joined)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = torch.cat(vals) if isinstance(vals[0], torch.Tensor) else [x for v in vals for x in v]
    return out


class ActorStream:
    """Batches drawn from site actors: one shuffled pass per iteration, a bounded window of requests in flight.

    Each pass permutes all (site, item) pairs with a seed that changes per pass, cuts them into
    batches, keeps every ``world``-th batch for this worker, and asks each site for its part. A site
    with several replicas (``replicas``) gets each request at the replica with the fewest requests of
    this stream in flight, so the replicas decode in parallel; ``prefetch`` requests per replica are in
    flight (back-pressure: no more are sent until the trainer takes a batch). Batches come back in
    order, so the data a worker sees does not depend on which replica served it (only the random
    augmentation draws do).

    Args:
        actors: one actor per site (the site's named actor).
        sizes: items per site.
        batch_size: items per batch (summed over sites).
        seed: seeds the order of each pass, with the pass number (:meth:`set_epoch`).
        rank, world: this Train worker and how many there are.
        prefetch: requests in flight per replica.
        drop_last: leave out the last, partial batch.
        replicas: per site, the actors that serve its batches (default: ``[actor]``).
        scalers: per site, its autoscaling pool actor (:mod:`raycxr.ray.autoscale`) or None; every
            ``scale_every`` batches the stream reports how long it waited for each such site and how long
            its replicas served, and routes to the pool the answer names. A window runs on across passes,
            without the time between them.
        wait: where the seconds waited for each batch go (the data plane's :class:`DataWait`).
        augment: the batches' augmentation on the trainer's device (``transforms.augment=device``),
            applied where they are copied there (:func:`raycxr.engine.device.limited`).
        owners: per site, its :class:`~raycxr.sites.config.SiteConfig` (its name and placement), and
        timeout_s: with both, a wait on a site (its node lost, say) says what it waits for after a few
            seconds and fails by name after ``timeout_s`` (``ray.placement_timeout_s``) instead of hanging.
        **batch_kw: passed to ``SiteActorImpl.batch`` (``union_names``, ``train``, ``split``...).
    """

    def __init__(self, actors: list, sizes: list[int], batch_size: int, *, seed: int, rank: int = 0,
                 world: int = 1, prefetch: int = 4, drop_last: bool = True, replicas: list[list] | None = None,
                 scalers: list | None = None, scale_every: int = 20, wait: DataWait | None = None,
                 owners: list | None = None, timeout_s: float | None = None, augment: Any = None,
                 **batch_kw: Any) -> None:
        self.actors, self.sizes, self.batch_size = actors, sizes, batch_size
        self.augment = augment
        self.owners, self.timeout_s = owners, timeout_s
        self.wait = wait
        self.pools = [list(p) for p in replicas] if replicas else [[a] for a in actors]
        self.active = [len(p) for p in self.pools]  # the first active[a] replicas of site a serve
        self.scalers = list(scalers) if scalers and any(x is not None for x in scalers) else None
        self.scale_every = max(1, int(scale_every))
        self.seed, self.rank, self.world = seed, rank, world
        self.prefetch_per_replica = max(1, prefetch)
        self.drop_last, self.batch_kw = drop_last, batch_kw
        self.epoch = 0
        self.inflight = [[0] * len(p) for p in self.pools]
        self._turn = [0] * len(self.pools)
        self.served: list[tuple[int, int, list[int]]] = []  # this pass's requests: (site, replica, indices)
        # An autoscaling window spans passes (a site whose pass is shorter than ``scale_every`` batches
        # would otherwise never report); the time between two passes is not counted in it.
        self._paused_at: float | None = None
        self._window()

    @property
    def prefetch(self) -> int:
        """Requests in flight: ``prefetch`` per replica of the widest site (grows with its pool)."""
        return self.prefetch_per_replica * max(self.active or [1])

    def _window(self) -> None:
        """Start an autoscaling window: per site, seconds waited for it and its replicas' serve seconds."""
        self._win_start, self._win_batches = time.perf_counter(), 0
        self._win_wait = [0.0] * len(self.pools)
        self._win_busy = [0.0] * len(self.pools)

    def _get(self, refs: list, sites: list[int]) -> list:
        """``ray.get(refs)`` (``refs[i]`` answered by site ``sites[i]``), bounded when the stream has a timeout."""
        import ray

        if self.owners is None or self.timeout_s is None:
            return ray.get(refs)
        return await_sites(refs, [self.owners[a] for a in sites], self.timeout_s)

    def _apply(self, a: int, handles: list, active: int) -> None:
        """A site's pool as its scaler has it now: new replicas are appended (order is stable), and a replica
        its pool started again (the pool was rebuilt after its node was lost) replaces the old handle."""
        for r, h in enumerate(handles):
            if r < len(self.pools[a]):
                self.pools[a][r] = h
            else:
                self.pools[a].append(h)
                self.inflight[a].append(0)
        self.active[a] = max(1, min(int(active), len(self.pools[a])))

    def _refresh(self) -> None:
        if self.scalers:
            sites = [a for a, sc in enumerate(self.scalers) if sc is not None]
            got = self._get([self.scalers[a].handles.remote() for a in sites], sites)
            for a, (handles, active) in zip(sites, got):
                self._apply(a, handles, active)

    def _report(self) -> None:
        """This window's demand to each autoscaled site's pool; its answer is the pool from now on."""
        elapsed = time.perf_counter() - self._win_start
        sites = [a for a, sc in enumerate(self.scalers or []) if sc is not None]
        got = self._get([self.scalers[a].report.remote(self._win_wait[a], elapsed, self._win_busy[a]) for a in sites],
                        sites)
        for a, (handles, active) in zip(sites, got):
            self._apply(a, handles, active)
        self._window()

    def set_epoch(self, epoch: int) -> None:
        """The next pass's order is a function of (seed, epoch), as for the local loaders."""
        self.epoch = int(epoch)

    def _chunks(self) -> list[list[tuple[int, int]]]:
        pairs = np.array([(a, i) for a, n in enumerate(self.sizes) for i in range(n)], dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        pairs = pairs[rng.permutation(len(pairs))] if len(pairs) else pairs
        n = len(pairs) // self.batch_size if self.drop_last else -(-len(pairs) // self.batch_size)
        chunks = [pairs[k * self.batch_size:(k + 1) * self.batch_size].tolist() for k in range(n)]
        n_even = (len(chunks) // self.world) * self.world or len(chunks)  # same step count on every worker
        return chunks[:n_even][self.rank::self.world]

    def _replica(self, a: int) -> int:
        """The least busy active replica of site ``a`` (ties: the next in turn)."""
        n = self.active[a]
        r = min(range(n), key=lambda r: (self.inflight[a][r], (r - self._turn[a]) % n))
        self._turn[a] = (r + 1) % n
        return r

    def _request(self, chunk: list[tuple[int, int]]) -> list[tuple[int, int, Any]]:
        by_actor: dict[int, list[int]] = {}
        for a, i in chunk:
            by_actor.setdefault(a, []).append(i)
        out = []
        for a, idx in sorted(by_actor.items()):
            r = self._replica(a)
            self.inflight[a][r] += 1
            self.served.append((a, r, idx))
            out.append((a, r, self.pools[a][r].batch.remote(idx, timed=True, **self.batch_kw)))
        return out

    def __iter__(self) -> Iterator[dict | None]:
        import ray

        self._refresh()
        chunks = self._chunks()
        self.epoch += 1
        self.served = []
        if self._paused_at is not None:  # the window runs on across passes; the pause between them is
            self._win_start += time.perf_counter() - self._paused_at  # the consumer's, not the site's: left out
            self._paused_at = None
        pending: deque = deque()
        it = iter(chunks)
        try:
            while True:
                while len(pending) < self.prefetch:  # back-pressure: a bounded window in flight
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    pending.append(self._request(nxt))
                if not pending:
                    break
                parts = pending[0]
                refs = [ref for _, _, ref in parts]
                t0 = time.perf_counter()
                late = set(ray.wait(refs, num_returns=len(refs), timeout=0)[1]) if self.scalers else set()
                got = self._get(refs, [a for a, _, _ in parts])
                dt = time.perf_counter() - t0
                if self.wait is not None:
                    self.wait.add(dt)
                slow = {a for a, _, ref in parts if ref in late}  # the sites this batch waited for
                for a in slow:
                    self._win_wait[a] += dt / len(slow)
                for (a, _, _), g in zip(parts, got):
                    self._win_busy[a] += float(g["serve_s"])
                self._done(pending.popleft())
                self._win_batches += 1
                if self.scalers and self._win_batches >= self.scale_every:
                    self._report()
                yield merge_batches([g["batch"] for g in got])
        finally:  # a consumer that stops early (max_steps_per_epoch) leaves requests behind: not in flight for us
            while pending:
                self._done(pending.popleft())
            self._paused_at = time.perf_counter()

    def _done(self, parts: list[tuple[int, int, Any]]) -> None:
        for a, r, _ in parts:
            self.inflight[a][r] -= 1

    def __len__(self) -> int:
        return len(self._chunks())


class ActorData:
    """The data plane inside a Train worker: site actors instead of local datasets."""

    def __init__(self, cfg: DictConfig, actors: dict[str, Any], rank: int, world: int,
                 replicas: dict[str, list[Any]] | None = None, scalers: dict[str, Any] | None = None,
                 sites: dict[str, SiteConfig] | None = None) -> None:
        self.cfg, self.actors, self.rank, self.world = cfg, actors, rank, world
        self.scalers = dict(scalers or {})
        self.replicas = {n: list((replicas or {}).get(n) or [a]) for n, a in actors.items()}
        # who answers for each site, so that a wait on it is bounded and says what it waits for
        self.owners = {n: (sites or {}).get(n) or SimpleNamespace(name=n, placement={}) for n in actors}
        self.timeout_s = placement_timeout(cfg)
        self.info = dict(zip(actors, self._get({n: a.info.remote() for n, a in actors.items()})))
        self.label_names = {n: list(i["label_names"]) for n, i in self.info.items()}
        self.union = UnionLabelSpace.build(self.label_names)
        self.union_names = tuple(self.union.names)
        self.wait = DataWait()

    def _get(self, refs: dict[str, Any]) -> list:
        """The answers of the sites' actors (site name -> ref), bounded (:func:`~raycxr.ray.actor.await_sites`)."""
        return await_sites(list(refs.values()), [self.owners[n] for n in refs], self.timeout_s)

    def take_wait(self) -> float:
        """Seconds the trainer waited for training batches since the last call."""
        return self.wait.take()

    def site_classes(self) -> dict[str, int]:
        return {n: len(i["label_names"]) for n, i in self.info.items()}

    def _stream(self, names: list[str], stream: int = 0, **kw: Any) -> ActorStream:
        union_names = kw.get("union_names")
        sizes = self._get({n: self.actors[n].num_items.remote(union_names) for n in names})
        return ActorStream([self.actors[n] for n in names], sizes, self.cfg.batch_size, seed=int(self.cfg.seed),
                           rank=self.rank, world=self.world, prefetch=int(self.cfg.ray.prefetch),
                           replicas=[self.replicas[n] for n in names],
                           scalers=[self.scalers.get(n) for n in names],
                           scale_every=int(OmegaConf.select(self.cfg, "ray.autoscale.every", default=20)),
                           wait=self.wait, owners=[self.owners[n] for n in names], timeout_s=self.timeout_s,
                           augment=train_augment(self.cfg, self.rank, stream), **kw)

    def union_loader(self, second_view: bool | str = False) -> ActorStream:
        return self._stream(list(self.actors), union_names=self.union_names, second_view=second_view)

    def site_loaders(self, second_view: bool = True) -> dict[str, ActorStream]:
        return {n: self._stream([n], stream=i, second_view=second_view) for i, n in enumerate(self.actors)}

    def val_batches(self) -> ActorStream | None:
        """The val split, un-augmented, from the site actors; every worker scores all of it."""
        if not val_enabled(self.cfg):
            return None
        names = list(self.actors)
        split = self.cfg.val.split
        sizes = self._get({n: self.actors[n].num_items.remote(self.union_names, split) for n in names})
        if self.cfg.val.limit:
            sizes = [min(int(self.cfg.val.limit), s) for s in sizes]
        return ActorStream([self.actors[n] for n in names], sizes, self.cfg.batch_size, seed=int(self.cfg.seed),
                           prefetch=int(self.cfg.ray.prefetch), drop_last=False, union_names=self.union_names,
                           train=False, split=split, replicas=[self.replicas[n] for n in names],
                           owners=[self.owners[n] for n in names], timeout_s=self.timeout_s)

    def probe(self) -> dict | None:
        n = int(self.cfg.probe_size)
        if n <= 0:
            return None
        per = max(1, n // len(self.actors))
        sizes = self._get({n: a.num_items.remote(self.union_names) for n, a in self.actors.items()})
        return merge_batches(self._get({n: a.batch.remote(list(range(min(per, s))), union_names=self.union_names,
                                                          train=False)
                                        for (n, a), s in zip(self.actors.items(), sizes)}))

    def distribute(self, optimizer: torch.optim.Optimizer) -> Any:
        """``ray.grad_sync``: ``bucketed`` (DDP's numerics, overlapped with the backward pass) or
        ``per_tensor`` (one blocking all-reduce per tensor after it, the earlier scheme)."""
        if self.world == 1:
            return optimizer
        if self.cfg.ray.grad_sync == "per_tensor":
            return GradAllReduce(optimizer)
        return BucketedGradSync(optimizer, bucket_mb=float(self.cfg.ray.bucket_mb))

    def site_heads(self) -> dict[str, dict]:
        heads = dict(zip(self.actors, self._get({n: a.get_head.remote() for n, a in self.actors.items()})))
        return {n: h["state"] for n, h in heads.items() if h is not None}

    def hand_back_heads(self, heads: dict[str, dict], version: int) -> None:
        if self.rank == 0:
            self._get({n: self.actors[n].set_head.remote(h, version) for n, h in heads.items() if n in self.actors})


class RayRun(Run):
    """Checkpoint sink inside a Train worker: rank 0 writes the run folder; every worker reports."""

    def __init__(self, out: str | Path, rank: int) -> None:
        self.rank = rank
        self.last: dict = {}
        self.keep_best = True  # only rank 0 writes it (save); every rank follows the same schedule
        if rank == 0:
            super().__init__(out)
        else:
            self.out, self.metrics, self.tracker = Path(out), Path(out) / "metrics.jsonl", None

    def write_config(self, cfg: DictConfig) -> None:
        if self.rank == 0:
            super().write_config(cfg)

    def log(self, record: dict) -> None:
        self.last = record
        if self.rank == 0:
            super().log(record)

    def discard(self, name: str) -> None:
        if self.rank == 0:
            super().discard(name)

    def save(self, checkpoint: Checkpoint, name: str = FILENAME) -> Path:
        import ray.train

        path = super().save(checkpoint, name) if self.rank == 0 else self.out / name
        if name != FILENAME:  # stage snapshots (conquer.pt) and best.pt stay in the run folder only
            return path
        metrics = {k: v for k, v in self.last.items() if isinstance(v, (int, float, str))}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                checkpoint.save(Path(d) / FILENAME)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        return path


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: resume from Ray's checkpoint if any, then the schedule."""
    import ray.train

    cfg = OmegaConf.create(config["cfg"])
    if cfg.ray.use_gpu:
        import ray.train.torch

        cfg.device = str(ray.train.torch.get_device())  # this worker's GPU
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(cfg.seed) + rank)
    sites = config.get("sites") or select_sites(cfg)  # the driver's: this node need not hold sites_dir
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = Checkpoint.load(Path(d) / FILENAME)
    elif cfg.get("resume"):
        resume = Checkpoint.load(cfg.resume)
    data = ActorData(cfg, config["actors"], rank, world, replicas=config.get("replicas"),
                     scalers=config.get("scalers"), sites=sites)
    train_method(cfg, sites, RayRun(cfg.out, rank), resume, data, config.get("method_cls"))


def run_pretrain_ray(cfg: DictConfig, method_cls: type | None = None) -> dict[str, Any]:
    """Start (or join) a Ray cluster, start the site actors (and the pools of autoscaled sites), fit the
    TorchTrainer."""
    import ray

    import_plugins(cfg.get("plugins"))
    method_cls = method_cls or get_method(cfg.method)
    r = cfg.ray
    sites = select_sites(cfg)
    absolute_paths(cfg)
    name, storage = run_location(cfg)
    claim_run(cfg, sites, name, storage)  # before anything starts: a mismatched second run fails at once
    init_ray(cfg)
    replicas = start_site_replicas(cfg, sites, name)
    scalers = start_site_pools(cfg, sites, name, replicas, consumers=int(r.num_workers))
    actors = {n: pool[0] for n, pool in replicas.items()}
    trainer = build_trainer(cfg, actors, train_loop_per_worker, name=name, storage=storage,
                            method_cls=method_cls, replicas=replicas, scalers=scalers, sites=sites)
    result = trainer.fit()
    autoscale = {n: ray.get(p.log.remote()) for n, p in scalers.items()}
    if autoscale:  # every decision of every autoscaled site, beside the run's metrics
        (Path(cfg.out) / "autoscale.json").write_text(json.dumps(autoscale, indent=1))
    metrics = Path(cfg.out) / "metrics.jsonl"
    history = [json.loads(line) for line in open(metrics)] if metrics.exists() else []
    ckpt = Path(cfg.out) / FILENAME
    history = [h for h in history if h.get("position", 0) >= 0]
    best = best_summary(history, cfg.out)
    if best is not None:
        print(f"{cfg.method}: {describe_best(best)}")
    return {"history": history, "checkpoint": str(ckpt) if ckpt.is_file() else None, "best": best, "run_name": name,
            "ray_checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": result.metrics, "sites": list(sites), "actors": actors, "replicas": replicas,
            "autoscale": autoscale}
