"""A site's replicas, autoscaled from its consumers' demand (``replicas: auto`` / ``ray.site_replicas: auto``).

Every Train worker's :class:`~raycxr.ray.runner.ActorStream` measures, over a window of batches,
how long it waited for this site's part of a batch and how long each replica spent serving it (the
replica sends its serve time back with the batch, so nobody has to ask a busy actor). It reports that
window to the site's pool actor (``raycxr/<run>/<site>@pool``), which decides once every consumer has
reported (:func:`scale_decision`):

- **up** by one replica, up to ``max``, when a consumer waited more than ``up_wait`` of the window for
  this site: the trainer is starved and the site is the reason;
- **down** by one, to no fewer than ``min``, after ``patience`` windows in a row in which nobody
  waited and the replicas would stay under ``down_util`` busy with one fewer;
- **back** by one when a replica it added did not help: if, a window after the step up (the new
  replica's start-up is not held against it), the consumers' window did not get at least ``min_gain``
  faster (batches per second) and they still wait, the cluster has no room for it (every core already
  busy, as on a laptop), so the newest retires and the pool does not grow past that count again in this
  run. Throughput, not the share of time waited, is the test: a consumer with little work of its own
  waits most of every window however fast the site serves. This is what makes ``auto`` safe as the
  default: a pool grows only while growing feeds the trainer.

Replicas start with the site's ``placement`` (as every replica does), so pixels stay on the site's
nodes. A new replica gets no request until it is up (its ``ping`` answered): the consumers never
wait for a process start-up. A retired replica (always the newest, never replica 0, which keeps the
head) only stops getting requests: it stays idle until it is needed again or the run ends, so no
request in flight is lost.

The pool actor lives on the site's nodes and is always restarted (``max_restarts=-1``): when the site's
node is lost it waits, as the replicas do, for a node with the site's labels, and is rebuilt there from
the replicas the driver started (the ones it had started itself went with it, and start again on
demand). Its log then says ``restarted``; the consumers wait for it at most ``ray.placement_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScalePolicy:
    """When a site's pool grows or shrinks.

    Args:
        min_replicas, max_replicas: the bounds (the site starts at ``min_replicas``).
        up_wait: a consumer that waited more than this share of its window for the site adds a replica.
        down_util: with nobody waiting, retire one when ``n - 1`` replicas would be less busy than this.
        patience: windows in a row that must all say "down" before one replica retires.
        every: batches per consumer window (the report interval).
        min_gain: a step up is kept when, a window later, the consumers' batches per second rose by at
            least this share (or nobody waits any more); otherwise it is undone and becomes the pool's
            ceiling.
    """

    min_replicas: int = 1
    max_replicas: int = 4
    up_wait: float = 0.10
    down_util: float = 0.5
    patience: int = 3
    every: int = 20
    min_gain: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"site autoscaling: need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if not 0 < self.up_wait < 1 or not 0 < self.down_util < 1 or not 0 <= self.min_gain < 1:
            raise ValueError("site autoscaling: up_wait and down_util must be in (0, 1), min_gain in [0, 1)")
        if self.patience < 1 or self.every < 1:
            raise ValueError("site autoscaling: patience and every must be >= 1")


def scale_decision(n: int, policy: ScalePolicy, wait_frac: float, busy_frac: float, low_windows: int,
                   ceiling: int | None = None) -> int:
    """The replica count after one decision.

    Args:
        n: replicas serving now.
        wait_frac: the largest share of a window any consumer spent waiting for this site.
        busy_frac: the replicas' mean busy share over the window (serve seconds / (window × n)).
        low_windows: windows in a row, this one included, that qualified for a scale-down.
        ceiling: the most replicas that helped in this run (a step past it was undone), None = ``max``.
    """
    top = policy.max_replicas if ceiling is None else min(policy.max_replicas, ceiling)
    if wait_frac > policy.up_wait and n < top:
        return n + 1
    if low_windows >= policy.patience and n > policy.min_replicas and wants_fewer(n, policy, wait_frac, busy_frac):
        return n - 1
    return n


def wants_fewer(n: int, policy: ScalePolicy, wait_frac: float, busy_frac: float) -> bool:
    """A window that qualifies for a scale-down: (almost) no waiting, and ``n - 1`` replicas would do."""
    return n > 1 and wait_frac <= policy.up_wait / 10 and busy_frac * n / (n - 1) < policy.down_util


class ReplicaScaler:
    """The pool's logic, plain Python so it is testable without Ray (``SitePool`` wraps it).

    Args:
        replicas: the replicas started with the run (replica 0 first).
        start_replica: starts replica ``r`` (placed like the site) and returns its handle.
        policy: the bounds and thresholds.
        consumers: how many streams report (the Train workers); a decision waits for all of them.
        is_ready: whether replica ``r`` (a started one) is up; the replicas given at the start are.
    """

    def __init__(self, replicas: list[Any], start_replica: Callable[[int], Any], policy: ScalePolicy,
                 consumers: int = 1, is_ready: Callable[[int], bool] | None = None) -> None:
        self.replicas, self.start_replica, self.policy = list(replicas), start_replica, policy
        self._given = len(self.replicas)
        self._is_ready = is_ready or (lambda r: True)
        self._up: set[int] = set(range(self._given))
        self.active = max(policy.min_replicas, min(len(self.replicas), policy.max_replicas))
        while len(self.replicas) < self.active:
            self.replicas.append(self.start_replica(len(self.replicas)))
        self.consumers = max(1, int(consumers))
        self.low = 0
        self.ceiling: int | None = None  # set when a step up did not help
        self._trial: dict[str, Any] | None = None  # the last step up, until it is judged
        self._reports: list[tuple[float, float, float]] = []
        self.history: list[dict[str, Any]] = []  # every decision: for the run's log and the tests

    def serving(self) -> int:
        """How many replicas serve: the first ``active`` ones, up to the first that is not up yet."""
        n = 0
        while n < self.active and (n in self._up or self._is_ready(n)):
            self._up.add(n)
            n += 1
        return max(1, n)

    def handles(self) -> tuple[list[Any], int]:
        """Every replica started so far (in order) and how many of them serve (:meth:`serving`)."""
        return list(self.replicas), self.serving()

    def report(self, waited_s: float, elapsed_s: float, busy_s: float) -> tuple[list[Any], int]:
        """One consumer's window: seconds it waited for the site, the window's length, and the seconds
        the site's active replicas spent serving its requests. Decides once every consumer reported."""
        self._reports.append((float(waited_s), max(float(elapsed_s), 1e-9), float(busy_s)))
        if len(self._reports) >= self.consumers:
            wait = max(w / e for w, e, _ in self._reports)
            span = max(e for _, e, _ in self._reports)
            busy = sum(b for _, _, b in self._reports) / (span * self.serving())
            self.low = self.low + 1 if wants_fewer(self.active, self.policy, wait, busy) else 0
            n, reason = self._judge_trial(wait, span)
            if reason is None:
                n = scale_decision(self.active, self.policy, wait, busy, self.low, self.ceiling)
                reason = "up" if n > self.active else ("down" if n < self.active else "hold")
                if n > self.active:
                    self._trial = {"span": span, "was": self.active, "windows": 0}
            if n != self.active:
                self.low = 0
            while len(self.replicas) < n:
                self.replicas.append(self.start_replica(len(self.replicas)))
            self.history.append({"replicas": n, "was": self.active, "wait_frac": round(wait, 4),
                                 "busy_frac": round(busy, 4), "window_s": round(span, 3), "reason": reason})
            self.active = n
            self._reports = []
        return self.handles()

    def _judge_trial(self, wait: float, span: float) -> tuple[int, str | None]:
        """The last step up, judged on the second window in which its replica served (the first may hold
        the replica's warm-up): kept, or undone (and a ceiling)."""
        t = self._trial
        if t is None:
            return self.active, None
        if self.serving() < self.active:  # the new replica is still starting: it has not served yet
            return self.active, "starting"
        t["windows"] += 1
        if t["windows"] < 2:  # the new replica's start-up window
            return self.active, "settling"
        self._trial = None
        if wait <= self.policy.up_wait or t["span"] >= (1 + self.policy.min_gain) * span:
            return self.active, None  # it helped: decide as usual
        self.ceiling = t["was"]
        return t["was"], "no gain"

    def log(self) -> list[dict[str, Any]]:
        return list(self.history)


class SitePool:
    """The pool actor of one autoscaled site: a :class:`ReplicaScaler` whose new replicas are site actors
    started from here with the site's placement (this actor owns them, so they live as long as the run).

    Args:
        site: the site (absolute paths); transforms, site_index, seed, run_name: as for its site actors.
        replicas: how many replicas the driver started (named ``<run>/<site>``, ``...#1``...); a rebuilt pool
            starts from them.
        policy: :class:`ScalePolicy` fields; consumers: the Train workers that report.
        max_restarts, num_cpus: of the replicas it starts (``ray.actor_max_restarts``, ``ray.site_cpus``).
    """

    def __init__(self, site: Any, transforms: dict[str, Any], site_index: int, seed: int, run_name: str,
                 replicas: int, policy: dict[str, Any], consumers: int = 1, max_restarts: int = -1,
                 num_cpus: float = 0) -> None:
        import ray

        from .actor import NAMESPACE, replica_name, start_site_actor

        # the driver's replicas by name, not as handles in the arguments: arguments that Ray keeps in its object
        # store may be gone when the pool restarts on another node (ray-project/ray#53727)
        given = [ray.get_actor(replica_name(run_name, site.name, r), namespace=NAMESPACE) for r in range(replicas)]

        pings: dict[int, Any] = {}

        def start(r: int) -> Any:
            h = start_site_actor(site, transforms=transforms, site_index=site_index, seed=seed,
                                 run_name=run_name, max_restarts=max_restarts, replica=r, num_cpus=num_cpus)
            pings[r] = h.ping.remote()
            return h

        def is_ready(r: int) -> bool:
            return r in pings and bool(ray.wait([pings[r]], timeout=0, fetch_local=False)[0])

        self.scaler = ReplicaScaler(given, start, ScalePolicy(**policy), consumers, is_ready)
        if ray.get_runtime_context().was_current_actor_reconstructed:  # rebuilt after its node was lost
            self.scaler.history.append({"replicas": self.scaler.active, "was": None, "reason": "restarted"})

    def handles(self) -> tuple[list[Any], int]:
        return self.scaler.handles()

    def report(self, waited_s: float, elapsed_s: float, busy_s: float) -> tuple[list[Any], int]:
        return self.scaler.report(waited_s, elapsed_s, busy_s)

    def log(self) -> list[dict[str, Any]]:
        return self.scaler.log()

    def node(self) -> str:
        """The Ray node this pool runs on (one of its site's)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def pool_name(run_name: str, site: str) -> str:
    return f"{run_name}/{site}@pool"
