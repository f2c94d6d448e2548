"""``raycxr federate``: rounds of local training at the sites, then server aggregation, with resume.

A round: the sites in the catalogue now (a site registered since the last round joins with the
current global model and a fresh local head) → ``federate.client_fraction`` of them sampled (at
least ``federate.min_clients``, seeded by the round, so a resumed run samples as the first one would)
→ each trains ``federate.local_epochs`` units of the method's schedule at the site
(:class:`~raycxr.federated.client.SiteClient`, in this process or in a Ray actor per site) → the
server audits every update (:func:`~raycxr.federated.client.audit_update`), leaves out the sites that
failed, missed ``federate.deadline_s`` or sent something that is not model state, and aggregates the
rest (:mod:`raycxr.federated.strategy`) when at least ``min_clients`` remain. Updates with NaN/inf, or
farther from the global model than ``federate.max_update_norm``, are refused; a site's sample count must
be a positive integer and its weight is capped (``federate.max_weight_ratio``); ``federate.aggregator``
chooses a mean, a trimmed mean or a median. With DP noise, every record states the ε spent so far at
``federate.dp_delta`` (:mod:`raycxr.federated.privacy`).

``out`` holds, after every round:

- ``checkpoint.pt``: a normal raycxr checkpoint of the global model (shared parts averaged; each
  site's head, and the mean of the other local parts), which ``raycxr eval`` and ``raycxr export``
  read, and the server's state in the same atomic file: each site's local state (``site:<name>``
  modules), the round, the strategy's state and the round records (``meta["federated"]``);
- ``federate.jsonl``: one record per round (``round``, participants, failures, bytes sent, seconds);
- ``sites/<site>/checkpoint.pt``: the site's personalised model after its last round.

The same command resumes: with a finished ``rounds=2`` in ``out``, ``rounds=3`` trains one more round.
The log is rewritten from the checkpoint's records on resume, so a kill at any point neither loses
nor repeats a round.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..checkpoint import FILENAME, Checkpoint
from ..labels import UnionLabelSpace
from ..registry import import_plugins
from ..sites.config import SiteConfig
from ..train.local import select_sites
from .client import SiteClient, audit_update
from .privacy import epsilon
from .strategy import FedAvg, flatten, state_bytes, strategy_from_config, unflatten, update_norm, weighted_average

LOG = "federate.jsonl"
SITE_PREFIX = "site:"


class LocalClients:
    """Every site's :class:`SiteClient` in this process, one after the other. A site that raises is left
    out of the round; this runner cannot pre-empt a site, so a late one's update is discarded afterwards."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.clients: dict[str, SiteClient] = {}

    def ensure(self, sites: dict[str, SiteConfig]) -> None:
        for i, (n, s) in enumerate(sites.items()):
            if n not in self.clients:
                self.clients[n] = SiteClient(self.cfg, s.resolved(), i)

    def call(self, name: str, method: str, *args: Any) -> Any:
        return getattr(self.clients[name], method)(*args)

    def info(self, names: list[str]) -> dict[str, Any]:
        return {n: _attempt(lambda n=n: self.call(n, "info")) for n in names}

    def fit(self, jobs: dict[str, tuple], deadline: float | None) -> dict[str, Any]:
        out = {}
        for n, args in jobs.items():
            t0 = time.perf_counter()
            res = _attempt(lambda n=n, args=args: self.call(n, "fit", *args))
            if deadline is not None and time.perf_counter() - t0 > deadline and isinstance(res, dict):
                res = TimeoutError(f"missed the round deadline of {deadline} s ({time.perf_counter() - t0:.1f} s)")
            out[n] = res
        return out

    def close(self) -> None:
        pass


def _attempt(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a site's failure is that site's, never the run's
        return e


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _sample_count(value: Any) -> int:
    """A site's self-reported number of training images, refused unless a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise ValueError("n_train is not a positive integer")
    return int(value)


def _epsilon(fed: Federation) -> float | None:
    """The ε spent so far (rounds the most-sampled site took part in), ``None`` without DP noise."""
    f = fed.cfg.federate
    if not f.clip_norm or float(f.noise_multiplier) <= 0:
        return None
    rounds = max(fed.strategy.participation.values(), default=0)
    return round(epsilon(float(f.noise_multiplier), rounds, float(f.dp_delta)), 4)


def sample_sites(eligible: list[str], fraction: float, min_clients: int, seed: int, round_: int) -> list[str]:
    """``ceil(fraction · n)`` sites (at least ``min_clients``, at most all), the same for a round however
    often it is run."""
    k = min(len(eligible), max(int(min_clients), math.ceil(float(fraction) * len(eligible))))
    return sorted(random.Random(seed * 1_000_003 + round_).sample(sorted(eligible), k))


def global_modules(global_shared: Mapping[str, torch.Tensor], site_local: Mapping[str, Mapping[str, torch.Tensor]],
                   weights: Mapping[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    """The global model as a method's modules: the shared parameters, plus each local parameter that one
    site alone has (its head), and the weighted mean of the local parameters several sites have
    (a FedPer group, UniChest's experts, Ark's teacher and projector), so the checkpoint is whole."""
    flat = dict(global_shared)
    by_key: dict[str, list[str]] = {}
    for s, state in site_local.items():
        for k in state:
            by_key.setdefault(k, []).append(s)
    for k, owners in by_key.items():
        if len(owners) == 1:
            flat[k] = site_local[owners[0]][k]
    common = {k: o for k, o in by_key.items() if len(o) > 1}
    groups: dict[tuple[str, ...], list[str]] = {}
    for k, o in common.items():
        groups.setdefault(tuple(sorted(o)), []).append(k)
    for owners, keys in groups.items():
        flat.update(weighted_average([{k: site_local[s][k] for k in keys} for s in owners],
                                     [float(weights.get(s, 1.0)) for s in owners]))
    return unflatten(flat)


def merge_meta(metas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The sites' method metadata merged: dicts joined, lists concatenated without repeats, else the first."""
    out: dict[str, Any] = {}
    for meta in metas.values():
        for k, v in meta.items():
            if isinstance(v, Mapping):
                out[k] = {**out.get(k, {}), **v}
            elif isinstance(v, (list, tuple)):
                prev = list(out.get(k, []))
                out[k] = prev + [x for x in v if x not in prev]
            elif out.get(k) is None:
                out[k] = v
    return out


class Federation:
    """The server's state: the global shared parameters, each site's local state and metadata, the
    strategy, the union classes and the round records; saved as one checkpoint in ``out``.

    Args:
        cfg: the federate config.
        strategy: the aggregation strategy.
    """

    def __init__(self, cfg: DictConfig, strategy: FedAvg) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.out = Path(cfg.out)
        self.round = 0
        self.global_shared: dict[str, torch.Tensor] = {}
        self.site_local: dict[str, dict[str, torch.Tensor]] = {}
        self.site_meta: dict[str, dict] = {}
        self.samples: dict[str, int] = {}
        self.union: list[str] | None = None
        self.history: list[dict] = []

    # -- checkpoint ----------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        sites = sorted(self.site_local)
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        cfg["site_names"] = sites
        modules = global_modules(self.global_shared, self.site_local, self.samples)
        for s in sites:
            modules[SITE_PREFIX + s] = dict(self.site_local[s])
        meta = {**merge_meta({s: self.site_meta[s] for s in sites}), "site_names": sites,
                "federated": {"round": self.round, "strategy": self.strategy.state_dict(), "union": self.union,
                              "samples": dict(self.samples), "site_meta": self.site_meta,
                              "shared_keys": sorted(self.global_shared)}}
        return Checkpoint(method=str(self.cfg.method), config=cfg, position=self.round, modules=modules, meta=meta,
                          history=list(self.history))

    def save(self) -> Path:
        return self.checkpoint().save(self.out / FILENAME)

    @classmethod
    def resume(cls, cfg: DictConfig, strategy: FedAvg) -> Federation:
        """The federation in ``out`` (a fresh one when ``out`` holds none)."""
        fed = cls(cfg, strategy)
        path = fed.out / FILENAME
        if not path.is_file():
            return fed
        ck = Checkpoint.load(path)
        state = ck.meta.get("federated")
        if state is None:
            raise ValueError(f"{path} is a `raycxr pretrain` run, not a federation: give federate another out")
        if ck.method != cfg.method:
            raise ValueError(f"{path} federates method '{ck.method}', not '{cfg.method}': use the same method or "
                             "another out")
        strategy.load_state_dict(state["strategy"])
        flat = flatten({m: s for m, s in ck.modules.items() if not m.startswith(SITE_PREFIX)})
        fed.global_shared = {k: flat[k] for k in state["shared_keys"]}
        fed.site_local = {m[len(SITE_PREFIX):]: dict(s) for m, s in ck.modules.items() if m.startswith(SITE_PREFIX)}
        fed.site_meta = dict(state["site_meta"])
        fed.samples = {k: int(v) for k, v in state["samples"].items()}
        fed.union, fed.round, fed.history = state["union"], int(state["round"]), list(ck.history)
        return fed

    def rewrite_log(self) -> None:
        """``federate.jsonl`` as the checkpoint records it (drops a record written after the last save)."""
        tmp = self.out / (LOG + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.out / LOG)

    def log(self, record: dict) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_clients(cfg: DictConfig) -> Any:
    if cfg.runner == "local":
        return LocalClients(cfg)
    if cfg.runner == "ray":
        from .ray_clients import RayClients

        return RayClients(cfg)
    raise ValueError(f"unknown runner '{cfg.runner}'; expected local or ray")


def _forbidden(sites: dict[str, SiteConfig]) -> dict[str, list[str]]:
    """Per site, the identifiers that must never be in what it sends: patient and image ids."""
    out = {}
    for n, s in sites.items():
        try:
            df = s.load_manifest().to_pandas()
        except Exception:  # a broken site fails in its own client, where it is logged
            out[n] = []
            continue
        ids = set()
        for col in ("patient_id", "image_id", "study_id"):
            if col in df:
                ids.update(str(v) for v in df[col].dropna().unique() if len(str(v)) >= 4)
        out[n] = sorted(ids)
    return out


def run_federate(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the federation in ``cfg.out`` up to ``cfg.rounds`` rounds; returns the round records
    and the global checkpoint's path."""
    if cfg.runner == "ray":
        from ..ray.launch import absolute_paths

        absolute_paths(cfg)
    torch.set_num_threads(max(1, int(cfg.get("threads") or 1)))
    import_plugins(cfg.get("plugins"))  # the method's class says which parameters stay at the sites
    f = cfg.federate
    strategy = strategy_from_config(f, cfg.method)
    fed = Federation.resume(cfg, strategy)
    fed.out.mkdir(parents=True, exist_ok=True)
    (fed.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if fed.history or (fed.out / LOG).exists():
        fed.rewrite_log()
    clients = make_clients(cfg)
    rounds = int(cfg.rounds)
    bar = tqdm(total=rounds, initial=min(fed.round, rounds), desc=f"federate {cfg.method} ({strategy.name})",
               unit="round", dynamic_ncols=True)
    try:
        while fed.round < rounds:
            record = run_round(fed, clients)
            bar.set_postfix(participants=len(record["participants"]), loss=record.get("loss"))
            bar.update(1)
    finally:
        bar.close()
        clients.close()
    eps = _epsilon(fed)
    if eps is not None:
        print(f"privacy: site-level (epsilon={eps}, delta={float(f.dp_delta):g}) after {fed.round} round(s) "
              f"(clip_norm={f.clip_norm}, noise_multiplier={float(f.noise_multiplier)}; RDP accountant)")
    return {"history": fed.history, "checkpoint": str(fed.out / FILENAME)}


def run_round(fed: Federation, clients: Any) -> dict[str, Any]:
    """One round: sample, train at the sites, audit, aggregate, checkpoint, log."""
    cfg, f, r = fed.cfg, fed.cfg.federate, fed.round
    t0 = time.perf_counter()
    sites = select_sites(cfg)  # the catalogue as it is now: a site registered since the last round joins
    clients.ensure(sites)
    failed: dict[str, str] = {}
    new = [n for n in sites if n not in fed.samples]
    if new or fed.union is None:
        for n, info in clients.info(new or list(sites)).items():
            if isinstance(info, BaseException):
                failed[n] = _reason(info)
            else:
                try:
                    fed.samples[n] = _sample_count(info.get("n_train"))
                except ValueError as e:
                    failed[n] = f"info refused: {e}"
                    continue
                fed.site_meta.setdefault(n, {})["label_names"] = list(info["label_names"])
    if fed.union is None:  # fixed at the first round, so shared heads keep their shape
        labels = {n: fed.site_meta[n]["label_names"] for n in sites if n in fed.samples}
        if not labels:
            raise ValueError(f"no site could take part: {failed}")
        fed.union = UnionLabelSpace.build(labels).names
    eligible = [n for n in sites if n in fed.samples and n not in failed]
    if not fed.global_shared:
        for n in eligible:
            res = _attempt(lambda n=n: clients.call(n, "initial_state", fed.union))
            if isinstance(res, dict):
                fed.global_shared = res
                break
            failed[n] = _reason(res)
        if not fed.global_shared:
            raise ValueError(f"no site could build the initial model: {failed}")
    sampled = sample_sites(eligible, float(f.client_fraction), int(f.min_clients), int(cfg.seed), r)
    joined = [n for n in sampled if n not in fed.site_local]
    jobs = {n: (fed.global_shared, fed.site_local.get(n), fed.union, r) for n in sampled}
    results = clients.fit(jobs, float(f.deadline_s) if f.deadline_s else None)
    forbidden = _forbidden({n: sites[n] for n in sampled})
    ok: dict[str, dict] = {}
    for n, res in results.items():
        if isinstance(res, BaseException):
            failed[n] = _reason(res)
            continue
        problems = audit_update(res, image_size=int(cfg.image_size), forbidden=forbidden.get(n, []))
        if not problems and f.max_update_norm is not None:
            try:
                dist = update_norm(res["shared"], fed.global_shared)
            except Exception as e:  # missing or mis-shaped tensors: not this model's update
                problems.append(f"shared state does not match the global model ({type(e).__name__})")
            else:
                if dist > float(f.max_update_norm):
                    problems.append(f"update norm {dist:.4g} is above federate.max_update_norm={f.max_update_norm}")
        if problems:
            failed[n] = "update refused: " + "; ".join(problems[:3])
        else:
            ok[n] = res
    aggregated = len(ok) >= int(f.min_clients) and bool(ok)
    if aggregated:
        fed.global_shared = fed.strategy.aggregate({n: ok[n]["shared"] for n in ok}, {n: fed.samples[n] for n in ok})
        for n, res in ok.items():
            fed.site_local[n] = res["local"]
            fed.site_meta[n] = {**res["meta"], "label_names": fed.site_meta.get(n, {}).get("label_names", [])}
    down = state_bytes(fed.global_shared) * len(sampled) + sum(state_bytes(a[1] or {}) for a in jobs.values())
    up_shared = sum(state_bytes(res["shared"]) for res in ok.values())
    up = up_shared + sum(state_bytes(res["local"]) for res in ok.values())
    losses = [res["metrics"]["loss"] for res in ok.values()]
    record = {"round": r, "strategy": fed.strategy.name, "sampled": sampled, "participants": sorted(ok),
              "failed": failed, "joined": joined, "aggregated": aggregated,
              "weights": {n: fed.samples[n] for n in sorted(ok)},
              "loss": round(sum(losses) / len(losses), 5) if losses else None,
              "site_metrics": {n: ok[n]["metrics"] for n in sorted(ok)},
              "bytes_down": int(down), "bytes_up": int(up), "bytes_up_shared": int(up_shared),
              "bytes_sent": int(down + up), "clip_norm": f.clip_norm, "noise_multiplier": float(f.noise_multiplier),
              "mu": fed.strategy.mu, "aggregator": fed.strategy.aggregator,
              "seconds": round(time.perf_counter() - t0, 2)}
    if failed:
        print(f"round {r}: left out {failed}")
    fed.round = r + 1
    record["dp_epsilon"], record["dp_delta"] = _epsilon(fed), float(f.dp_delta)
    fed.history.append(record)
    fed.save()  # first: the log never runs ahead of the checkpoint (resume rewrites it from here)
    fed.log(record)
    return record
