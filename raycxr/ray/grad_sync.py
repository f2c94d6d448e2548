"""Gradient synchronisation across Train workers, with DDP's numerics and without DDP's wrapper.

:class:`BucketedGradSync` wraps the method's optimiser (``data.distribute(optimizer)``), so the models
are never wrapped and keep their own methods (``model.encoder``, ``set_stage``, ``heads``). Like
``torch.nn.parallel.DistributedDataParallel`` it

- broadcasts rank 0's parameters when it is built, so every worker starts from the same weights;
- packs gradients into buckets (``bucket_mb``, parameters in reverse registration order: the order
  the backward pass produces them) and all-reduces a bucket asynchronously as soon as its last
  gradient is accumulated (``Tensor.register_post_accumulate_grad_hook``), so communication
  overlaps the rest of the backward pass;
- launches buckets in a fixed order on every worker (bucket ``k`` only after ``k - 1``), so the
  collectives match whatever order the hooks fire in;
- averages: each bucket is divided by the world size and summed (DDP's default communication hook).

Parameters that get no gradient in a step keep ``grad = None`` (the optimiser then skips them, as it
would in one process; DDP's ``find_unused_parameters`` would hand them zeros, which weight decay and
momentum would act on). The bucket plan is rebuilt from the parameters that did get a gradient
whenever that set changes (Ark trains one site's head at a time), identically on every worker.

Limits: one ``backward()`` per ``step()`` (no gradient accumulation: a second accumulation into a
gradient whose bucket is already in flight raises); every worker must run the same graph each step
(the same units, steps and heads), as for DDP; buffers (BatchNorm statistics) are not synchronised,
use ``encoder.norm=group`` where that matters.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["BucketedGradSync", "GradAllReduce"]

# live syncs in this process: a new one on the same parameters (UniChest's divide-stage optimiser)
# retires the old one, whose hooks would otherwise reduce every gradient twice
_LIVE: weakref.WeakSet = weakref.WeakSet()


class GradAllReduce:
    """The previous scheme, kept to measure against: one blocking all-reduce per parameter tensor after
    the backward pass (no bucketing, no overlap). ``ray.grad_sync=per_tensor`` selects it.

    Args:
        optimizer: the optimiser to step after the gradients are averaged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, closure: Any = None) -> Any:
        import torch.distributed as dist

        world = dist.get_world_size()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        return self.optimizer.step(closure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


class BucketedGradSync:
    """Optimiser wrapper: bucketed, overlapped gradient all-reduce (see the module docstring).

    Args:
        optimizer: the method's optimiser; its parameters are the ones synchronised.
        bucket_mb: largest bucket in MiB (DDP's ``bucket_cap_mb``); None: the knob ``ray.bucket_mb``'s default.
        group: the process group (default: the world).
        broadcast: copy rank 0's parameters to every worker now, as DDP does when it wraps a model.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, bucket_mb: float | None = None, group: Any = None,
                 broadcast: bool = True) -> None:
        import torch.distributed as dist

        self.optimizer, self.group = optimizer, group
        self.world = dist.get_world_size(group)
        if bucket_mb is None:
            from ..schema import default

            bucket_mb = default("ray.bucket_mb")
        self.bucket_bytes = max(1, int(float(bucket_mb) * 2**20))
        seen: set[int] = set()
        self.params: list[torch.nn.Parameter] = []
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        for old in list(_LIVE):
            if seen & set(old.index):
                old.close()
        _LIVE.add(self)
        if broadcast:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        self.closed = False
        self.stats = {"steps": 0, "buckets": 0, "launched_in_backward": 0}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._plan(list(range(len(self.params))))
        self._reset()

    # -- the bucket plan ---------------------------------------------------------------------------
    def _plan(self, present: list[int]) -> None:
        """The buckets for the parameters that get gradients (``present``, indices)."""
        self.buckets = self._make_buckets(present)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.expected = frozenset(present)

    def _make_buckets(self, indices: list[int]) -> list[list[int]]:
        """Reverse order (the backward pass's), at most ``bucket_bytes``, one dtype and device per bucket."""
        buckets: list[list[int]] = []
        cur: list[int] = []
        size = 0
        for i in reversed(indices):
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            if cur and (size + nbytes > self.bucket_bytes or p.dtype != self.params[cur[0]].dtype
                        or p.device != self.params[cur[0]].device):
                buckets.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += nbytes
        if cur:
            buckets.append(cur)
        return buckets

    def _reset(self) -> None:
        self.waiting = [len(b) for b in self.buckets]
        self.next_bucket = 0
        self.arrived: set[int] = set()
        self.works: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []
        self.in_backward = True

    # -- during the backward pass -----------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if self.closed:
            return
        i = self.index[id(p)]
        if i in self.arrived:
            raise RuntimeError("BucketedGradSync: a gradient was accumulated twice before step(); gradient "
                               "accumulation over several backward passes is not supported (step after each)")
        self.arrived.add(i)
        b = self.bucket_of.get(i)
        if b is None:  # outside the plan: reduced in step(), and the plan is rebuilt
            return
        self.waiting[b] -= 1
        while self.next_bucket < len(self.buckets) and self.waiting[self.next_bucket] == 0:
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1

    def _launch(self, idx: list[int]) -> None:
        import torch.distributed as dist

        ps = [self.params[i] for i in idx if self.params[i].grad is not None]
        if not ps:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in ps]).div_(self.world)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.works.append((work, flat, ps))
        self.stats["buckets"] += 1
        self.stats["launched_in_backward"] += int(self.in_backward)

    # -- at the step ------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Launch what is left (buckets whose parameters did not all get a gradient, then gradients
        outside the plan), wait for every bucket and write the averages back into ``.grad``."""
        self.in_backward = False
        while self.next_bucket < len(self.buckets):
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1
        extra = sorted(self.arrived - self.expected)
        for b in self._make_buckets(extra):
            self._launch(b)
        for work, flat, ps in self.works:
            work.wait()
            offset = 0
            for p in ps:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        present = sorted(self.arrived)
        if frozenset(present) != self.expected:
            self._plan(present)
        self.stats["steps"] += 1
        self._reset()

    def step(self, closure: Any = None) -> Any:
        self.synchronize()
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the hooks (a newer sync took over these parameters)."""
        self.closed = True
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __getattr__(self, name: str) -> Any:
        # state_dict, load_state_dict, param_groups, register_step_post_hook... are the optimiser's
        return getattr(self.optimizer, name)
