"""A real multi-node Ray cluster on one machine, the way Ray's own tests simulate one.

:func:`start_cluster` starts a head and one raylet per entry of ``nodes`` with ``ray.cluster_utils.Cluster``
(each node its own raylet and object store; logical CPUs; ``labels`` such as ``{"site": "nih"}``) and
connects the driver. All nodes share 127.0.0.1, so Ray Train reports ``node_rank=0`` everywhere.
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps ``ray.init`` from rewriting 127.0.0.1 to the host's IP.
End it with :func:`stop_cluster` in the fixture's teardown, which also restores that variable: left set,
it makes a later real ``ray start --address`` (the SLURM recipe's test) refuse to join as if on macOS.
"""

from __future__ import annotations

import os
from typing import Any

_SIMULATION_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved: dict[str, str | None] = {}


def start_cluster(nodes: list[dict[str, Any]], *, head_cpus: float = 1, connect: bool = True) -> Any:
    """Head (``head_cpus`` logical CPUs, no labels) plus ``nodes`` (``add_node`` keyword arguments each)."""
    _saved.setdefault("env", os.environ.get(_SIMULATION_ENV))
    os.environ[_SIMULATION_ENV] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    for spec in nodes:
        cluster.add_node(**spec)
    cluster.wait_for_nodes()
    if connect:
        ray.init(address=cluster.address, namespace="raycxr-test", log_to_driver=False)
    return cluster


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()
    if "env" in _saved:
        previous = _saved.pop("env")
        if previous is None:
            os.environ.pop(_SIMULATION_ENV, None)
        else:
            os.environ[_SIMULATION_ENV] = previous
