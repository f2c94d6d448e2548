"""``raycxr cluster check``: is this Ray cluster ready for a multi-site run, before one is launched?

It answers three questions against the live cluster (``ray.address``; ``auto`` when unset):

- **Nodes**: every alive node with its CPUs, GPUs and labels, and whether ``ray.num_workers`` Train
  workers (with ``ray.use_gpu``, ``ray.cpus_per_worker``) fit in the cluster's totals.
- **Placement**: which registered sites can be placed where. A site's ``placement.label_selector``
  is matched against the nodes' labels with Ray's selector syntax (``nih``, ``!nih``, ``in(a,b)``,
  ``!in(a,b)``) and its ``placement.resources`` against the nodes' resources; a site that no node
  takes is reported with the reason (which label or resource is missing, and what the nodes have).
- **Shared storage**: whether ``out`` and ``ray.storage_path`` are really shared. Each node writes a
  token there from a task pinned to it (``NodeAffinitySchedulingStrategy``), then each node reads every
  other node's token. A path is a mount (``/shared/runs``) or an object-store URI (``s3://bucket/runs``,
  ``gs://...``, ``file:///...``) opened with ``pyarrow.fs.FileSystem.from_uri``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

_RAY_LABEL_PREFIX = "ray.io/"  # Ray's own labels (node id, accelerator type...): shown apart from the user's


# ------------------------------------------------------------------------------------------ labels


def selector_matches(expr: str, value: str | None) -> bool:
    """Whether a node label ``value`` (``None``: the node lacks the label) satisfies one Ray label
    selector expression: ``x`` (equals), ``!x`` (not equal, or absent), ``in(a,b)``, ``!in(a,b)``."""
    negate = expr.startswith("!")
    body = expr[1:] if negate else expr
    if body.startswith("in(") and body.endswith(")"):
        hit = value is not None and value in {v.strip() for v in body[3:-1].split(",")}
    else:
        hit = value == body
    return not hit if negate else hit


def placement_problems(placement: dict[str, Any], node: dict[str, Any]) -> list[str]:
    """Why ``node`` (an entry of ``ray.nodes()``) cannot host a site with this ``placement``; empty if it can."""
    labels = node.get("Labels") or {}
    resources = node.get("Resources") or {}
    problems = []
    for key, expr in (placement.get("label_selector") or {}).items():
        if not selector_matches(str(expr), labels.get(key)):
            have = labels.get(key)
            problems.append(f"label {key}={expr} wanted, node has " + (f"{key}={have}" if have is not None
                                                                        else f"no '{key}' label"))
    for key, amount in (placement.get("resources") or {}).items():
        if resources.get(key, 0.0) < float(amount):
            problems.append(f"resource {key}: {amount} wanted, node has {resources.get(key, 0)}")
    return problems


# ------------------------------------------------------------------------------------------ storage


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``file:///...``: a location for ``pyarrow.fs``, not a local path."""
    return "://" in str(path)


def _open(location: str) -> tuple[Any, str]:
    """(filesystem, path inside it) for a mount path or a URI."""
    from pyarrow import fs

    if is_uri(location):
        return fs.FileSystem.from_uri(location)
    return fs.LocalFileSystem(), str(location)


def _write_token(location: str, probe: str, node_id: str, token: str) -> str | None:
    """Write ``token`` as ``<location>/<probe>/<node_id>``; the error as one line, or ``None``."""
    try:
        filesystem, base = _open(location)
        filesystem.create_dir(f"{base}/{probe}", recursive=True)
        with filesystem.open_output_stream(f"{base}/{probe}/{node_id}") as f:
            f.write(token.encode())
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer to "can this node write here?"
        return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _read_tokens(location: str, probe: str, expected: dict[str, str]) -> dict[str, str]:
    """Read every other node's token; ``{writer node id: "ok" | what went wrong}``."""
    out = {}
    try:
        filesystem, base = _open(location)
    except Exception as e:  # noqa: BLE001
        return {n: f"cannot open {location}: {type(e).__name__}: {e}" for n in expected}
    for node_id, token in expected.items():
        try:
            with filesystem.open_input_stream(f"{base}/{probe}/{node_id}") as f:
                got = f.read().decode()
            out[node_id] = "ok" if got == token else "a different file is there (another mount?)"
        except FileNotFoundError:
            out[node_id] = "file not found: this node does not see what that node wrote"
        except Exception as e:  # noqa: BLE001
            out[node_id] = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return out


def _clean(location: str, probe: str) -> None:
    try:
        filesystem, base = _open(location)
        filesystem.delete_dir(f"{base}/{probe}")
    except Exception:  # noqa: BLE001 - best effort: a probe folder left behind is harmless
        pass


@dataclass
class StorageCheck:
    """The shared-storage check of one location.

    Args:
        name: the config key (``out``, ``ray.storage_path``).
        location: the path or URI checked.
        shared: every node wrote and every node read every other node's token.
        problems: one line per failure (``node ...: ...``).
        nodes: how many nodes took part.
    """

    name: str
    location: str
    shared: bool
    problems: list[str] = field(default_factory=list)
    nodes: int = 0


def check_storage(name: str, location: str, nodes: list[dict[str, Any]], *, timeout_s: float = 60.0) -> StorageCheck:
    """Write a token from a task on each node, read all tokens from a task on each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def on(node_id: str):
        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)

    # num_cpus=0: a node with no free CPU (a busy or CPU-less head) still answers
    write = ray.remote(num_cpus=0, max_retries=0)(_write_token)
    read = ray.remote(num_cpus=0, max_retries=0)(_read_tokens)
    probe = f".raycxr-cluster-check-{uuid.uuid4().hex[:12]}"
    ids = [n["NodeID"] for n in nodes]
    short = {i: i[:8] for i in ids}
    tokens = {i: uuid.uuid4().hex for i in ids}
    problems = []
    try:
        errors = ray.get([write.options(scheduling_strategy=on(i)).remote(location, probe, i, tokens[i])
                          for i in ids], timeout=timeout_s)
        for i, err in zip(ids, errors):
            if err:
                problems.append(f"node {short[i]}: cannot write {location}: {err}")
        written = {i: tokens[i] for i, err in zip(ids, errors) if not err}
        results = ray.get([read.options(scheduling_strategy=on(i)).remote(
            location, probe, {w: t for w, t in written.items() if w != i}) for i in ids], timeout=timeout_s)
        for reader, seen in zip(ids, results):
            for writer, status in seen.items():
                if status != "ok":
                    problems.append(f"node {short[reader]} reading node {short[writer]}'s file: {status}")
    finally:
        if ids:
            ray.get(ray.remote(num_cpus=0, max_retries=0)(_clean).options(scheduling_strategy=on(ids[0]))
                    .remote(location, probe), timeout=timeout_s)
    return StorageCheck(name=name, location=location, shared=not problems, problems=problems, nodes=len(ids))


# ------------------------------------------------------------------------------------------ the check


def connect(cfg: DictConfig) -> None:
    """Join the cluster at ``ray.address`` (``auto`` when unset); never start one: the check is about a
    running cluster. A driver already connected (a test, a notebook) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or "auto"
    _reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster at ray.address={address}: {' '.join(str(e).split())[:200]}; start one "
                         "(`ray start --head`, see docs/cluster.md) or pass ray.address=HOST:PORT") from None


def _reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (``ray.init`` retries such an address for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if address in ("auto", "local") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"no Ray cluster at ray.address={address}: {e.strerror or e}; start one "
                         "(`ray start --head`, see docs/cluster.md) or pass ray.address=HOST:PORT") from None


def storage_locations(cfg: DictConfig) -> dict[str, str]:
    """``out`` and ``ray.storage_path`` as the run will use them: local paths made absolute on the driver
    (workers run in other folders), URIs as they are."""
    out = {}
    for key, value in (("out", cfg.out), ("ray.storage_path", cfg.ray.storage_path)):
        out[key] = str(value) if is_uri(str(value)) else str(Path(str(value)).expanduser().resolve())
    return out


def check_cluster(cfg: DictConfig, *, storage: bool = True) -> dict[str, Any]:
    """Nodes, site placement and shared storage of the cluster ``cfg`` would run on (a ``pretrain`` config).

    Returns ``{"nodes": [...], "sites": {name: {"placeable": bool, "nodes": [...], "why": str}},
    "train": {...}, "storage": [StorageCheck, ...], "ok": bool}``."""
    import ray

    from .sites.config import select_sites

    connect(cfg)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [{"id": n["NodeID"], "address": n.get("NodeManagerAddress", ""),
              "cpus": n.get("Resources", {}).get("CPU", 0.0), "gpus": n.get("Resources", {}).get("GPU", 0.0),
              "labels": {k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith(_RAY_LABEL_PREFIX)},
              "head": "node:__internal_head__" in (n.get("Resources") or {})} for n in alive]
    sites = {}
    for name, site in select_sites(cfg).items():
        placement = site.placement or {}
        fits, reasons = [], {}
        for n in alive:
            problems = placement_problems(placement, n)
            if problems:
                reasons[n["NodeID"][:8]] = problems
            else:
                fits.append(n["NodeID"][:8])
        if fits:
            why = "any node (no placement)" if not placement else f"{len(fits)} node(s) match"
        else:
            why = _unplaceable_reason(placement, alive)
        sites[name] = {"placeable": bool(fits), "nodes": fits, "why": why, "placement": placement}
    r = cfg.ray
    want_cpu = r.num_workers * float(r.cpus_per_worker)
    want_gpu = r.num_workers if r.use_gpu else 0
    have_cpu = sum(n["cpus"] for n in nodes)
    have_gpu = sum(n["gpus"] for n in nodes)
    train = {"num_workers": r.num_workers, "use_gpu": bool(r.use_gpu), "cpus": want_cpu, "gpus": want_gpu,
             "fits": want_cpu <= have_cpu and want_gpu <= have_gpu,
             "why": f"{r.num_workers} worker(s) need {want_cpu:g} CPU and {want_gpu} GPU; "
                    f"the cluster has {have_cpu:g} CPU and {have_gpu:g} GPU in all"}
    checks = [check_storage(k, v, alive) for k, v in storage_locations(cfg).items()] if storage else []
    ok = all(s["placeable"] for s in sites.values()) and train["fits"] and all(c.shared for c in checks)
    return {"nodes": nodes, "sites": sites, "train": train, "storage": checks, "ok": ok}


def _unplaceable_reason(placement: dict[str, Any], alive: list[dict[str, Any]]) -> str:
    """One line: which wanted label or resource no node offers, and what the nodes do have."""
    parts = []
    for key, expr in (placement.get("label_selector") or {}).items():
        if not any(selector_matches(str(expr), (n.get("Labels") or {}).get(key)) for n in alive):
            values = sorted({(n.get("Labels") or {})[key] for n in alive if key in (n.get("Labels") or {})})
            parts.append(f"no node has label {key}={expr} (nodes' '{key}' labels: "
                         + (", ".join(values) if values else "none") + ")")
    for key, amount in (placement.get("resources") or {}).items():
        if not any((n.get("Resources") or {}).get(key, 0.0) >= float(amount) for n in alive):
            parts.append(f"no node offers resource {key} >= {amount}")
    # each condition alone is met somewhere, but never all on one node
    return "; ".join(parts) or "no single node meets every condition of the placement"


def print_report(report: dict[str, Any]) -> None:
    """The check as tables (nodes, sites, storage) and a verdict line."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)  # long paths and reasons stay on one line (logs, grep)
    t = Table(title=f"Ray nodes ({len(report['nodes'])} alive)")
    for col in ("node", "address", "CPUs", "GPUs", "labels"):
        t.add_column(col)
    for n in report["nodes"]:
        t.add_row(n["id"][:8] + (" (head)" if n["head"] else ""), n["address"], f"{n['cpus']:g}", f"{n['gpus']:g}",
                  ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-")
    console.print(t)
    tr = report["train"]
    console.print(("[green]ok[/green]" if tr["fits"] else "[red]does not fit[/red]") + f" Train workers: {tr['why']}")
    t = Table(title="site placement")
    for col in ("site", "placement", "placeable", "where / why not"):
        t.add_column(col)
    for name, s in report["sites"].items():
        t.add_row(name, _placement_text(s["placement"]), "[green]yes[/green]" if s["placeable"] else "[red]NO[/red]",
                  (", ".join(s["nodes"]) + f" ({s['why']})") if s["placeable"] else s["why"])
    console.print(t)
    for c in report["storage"]:
        if c.shared:
            console.print(f"[green]shared[/green] {c.name} = {c.location}: every node of {c.nodes} read every "
                          "other node's file" + (" (one node: nothing to compare with)" if c.nodes < 2 else ""))
        else:
            console.print(f"[red]NOT shared[/red] {c.name} = {c.location}:")
            for p in c.problems:
                console.print(f"  {p}")
    console.print("cluster check: " + ("[green]ready[/green]" if report["ok"] else "[red]not ready[/red]"))


def _placement_text(placement: dict[str, Any]) -> str:
    if not placement:
        return "-"
    parts = [f"{k}={v}" for k, v in (placement.get("label_selector") or {}).items()]
    parts += [f"resource {k}>={v}" for k, v in (placement.get("resources") or {}).items()]
    return ", ".join(parts)
