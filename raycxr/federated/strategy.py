"""Server-side federation maths: which parameters are shared, how updates are averaged, clipped and noised.

Everything here works on *flat* states: ``{"module/key": tensor}`` (``"model/encoder.backbone.conv1.weight"``,
``"teacher/projector.0.bias"``), the checkpoint's modules flattened, so that one pattern list says
what stays at a site. Each method declares its list (:meth:`raycxr.methods.Method.local_parameters`):

- Ark and the concurrent baseline keep each site's head (or objective) local, the EMA teacher local
  (Ark+, Extended Data Fig. 2), and the projector local unless ``federate.share_projector``;
- UniChest shares the encoder, the shared query network (``query_networks.0``) and the text
  projection, and keeps its experts (``query_networks.1..K``), gate and SCL head at the site;
- a method that declares nothing (the union-head baselines, label-free pretraining, a plug-in) shares
  everything (the union head is over the federation's union classes, the same shape at every site);
- FedPer adds the named groups of ``federate.local`` to the local ones.

Strategies: :class:`FedAvg` (sample-weighted mean), :class:`FedProx` (FedAvg on the server plus the
proximal term ``μ/2·||w - w_global||²`` in each site's loss, added as its gradient ``μ(w - w_global)``
by an optimiser pre-step hook, so every method's own loop stays unchanged) and :class:`FedPer`.

A site the server does not control can send anything, so aggregation is defensive (``federate.aggregator``):

- every update is refused before aggregation when a floating tensor holds NaN or ±inf
  (:func:`nonfinite_keys`), and, with ``federate.max_update_norm``, when its distance to the global
  model is larger (the server's check, independent of the sites' own clipping);
- a site's self-reported sample count is capped at ``federate.max_weight_ratio`` times the median of
  the other sites' counts (:func:`capped_weights`), so a claimed ``n_train=1e9`` cannot own the average;
- ``trimmed_mean`` drops the ``trim_fraction`` largest and smallest values of every coordinate before
  averaging, ``median`` takes the coordinate-wise median (Yin et al. 2018, "Byzantine-robust
  distributed learning: towards optimal statistical rates", §3; the same two are Flower's
  ``FedTrimmedAvg`` / ``FedMedian`` and NVFLARE's robust aggregators). Both are unweighted by design:
  a weight is a site's own claim.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SEP = "/"


def local_patterns(method: str | type, *, share_projector: bool = True, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The ``module/key`` patterns that never leave a site for ``method`` (a registered name or a method
    class; see :meth:`raycxr.methods.Method.local_parameters`), plus FedPer's ``extra``."""
    from ..methods import get_method

    cls = get_method(method) if isinstance(method, str) else method
    return tuple(cls.local_parameters(share_projector=share_projector)) + tuple(extra)


def flatten(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"model": {"a": t}}`` → ``{"model/a": t}``."""
    return {f"{m}{SEP}{k}": v for m, state in modules.items() for k, v in state.items()}


def unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        m, _, k = key.partition(SEP)
        out.setdefault(m, {})[k] = v
    return out


def is_local(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def split_state(flat: Mapping[str, torch.Tensor], patterns: Sequence[str]) -> tuple[dict, dict]:
    """``(shared, local)`` parts of a flat state."""
    shared = {k: v for k, v in flat.items() if not is_local(k, patterns)}
    local = {k: v for k, v in flat.items() if is_local(k, patterns)}
    return shared, local


def state_bytes(flat: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a state costs on the wire, framing aside)."""
    return int(sum(t.numel() * t.element_size() for t in flat.values()))


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ w_i·s_i / Σ w_i`` key by key over the keys every state has. Integer tensors (BatchNorm's
    ``num_batches_tracked``) cannot be averaged: the largest is kept."""
    if not states:
        raise ValueError("nothing to average: no state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    keys = set(states[0]).intersection(*map(set, states[1:]))
    out = {}
    for k in sorted(keys):
        ref = states[0][k]
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for s, w in zip(states, weights):
                acc += s[k].double() * (float(w) / total)
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = torch.stack([s[k] for s in states]).max(0).values
    return out


def nonfinite_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys of ``state`` whose floating tensor holds NaN or ±inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def capped_weights(samples: Mapping[str, float], max_ratio: float | None) -> dict[str, float]:
    """Each site's aggregation weight: its sample count, capped at ``max_ratio`` times the median of the
    *other* sites' counts (a site cannot raise the bar it is measured against). ``None``: no cap."""
    out = {s: float(n) for s, n in samples.items()}
    if max_ratio is None or len(out) < 2:
        return out
    for s, n in samples.items():
        others = sorted(float(v) for k, v in samples.items() if k != s)
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else 0.5 * (others[mid - 1] + others[mid])
        out[s] = min(float(n), float(max_ratio) * median)
    return out


def _coordinatewise(states: Sequence[Mapping[str, torch.Tensor]], reduce: Any) -> dict[str, torch.Tensor]:
    """``reduce(values sorted along dim 0)`` key by key over the keys every state has; integer tensors
    keep the largest value (as :func:`weighted_average`)."""
    if not states:
        raise ValueError("nothing to aggregate: no state")
    keys = set(states[0]).intersection(*map(set, states[1:]))
    out = {}
    for key in sorted(keys):
        ref = states[0][key]
        stacked = torch.stack([s[key] for s in states])
        if not ref.is_floating_point():
            out[key] = stacked.max(0).values
            continue
        out[key] = reduce(stacked.double().sort(dim=0).values).to(ref.dtype)
    return out


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: per coordinate, the ``floor(trim_fraction · n)`` largest and smallest
    values are dropped and the rest averaged (unweighted). Integer tensors keep the largest value."""
    if not 0.0 <= float(trim_fraction) < 0.5:
        raise ValueError(f"federate.trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(states)
    k = int(math.floor(float(trim_fraction) * n))
    return _coordinatewise(states, lambda ordered: ordered[k:n - k].mean(0))


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (the mean of the two middle values for an even count). Integer tensors
    keep the largest value."""
    n, mid = len(states), len(states) // 2
    return _coordinatewise(states, lambda ordered: ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid]))


AGGREGATORS = ("mean", "trimmed_mean", "median")


def robust_aggregate(states: Mapping[str, Mapping[str, torch.Tensor]], samples: Mapping[str, float], *,
                     aggregator: str = "mean", trim_fraction: float = 0.1,
                     max_weight_ratio: float | None = None) -> dict[str, torch.Tensor]:
    """The round's new shared state from the sites' ``states`` by ``aggregator`` (see the module
    docstring). Refuses a state with non-finite values: the server audits updates before this."""
    sites = sorted(states)
    for s in sites:
        bad = nonfinite_keys(states[s])
        if bad:
            raise ValueError(f"site {s}: update has non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}")
    if aggregator == "mean":
        w = capped_weights({s: samples[s] for s in sites}, max_weight_ratio)
        return weighted_average([states[s] for s in sites], [w[s] for s in sites])
    if aggregator == "trimmed_mean":
        return trimmed_mean([states[s] for s in sites], trim_fraction)
    if aggregator == "median":
        return coordinate_median([states[s] for s in sites])
    raise ValueError(f"unknown federate.aggregator '{aggregator}'; expected one of {', '.join(AGGREGATORS)}")


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over the floating tensors."""
    sq = sum(float((update[k].double() - reference[k].double()).pow(2).sum())
             for k in reference if k in update and reference[k].is_floating_point())
    return math.sqrt(sq)


def clip_and_noise(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
                   clip_norm: float | None, noise_multiplier: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """DP-style release of a site's update (DP-FedAvg, McMahan et al. 2018, applied at the site): the
    delta ``update - reference`` scaled to L2 norm at most ``clip_norm``, plus Gaussian noise of standard
    deviation ``noise_multiplier · clip_norm`` on every coordinate. Returns the released state and
    ``{"norm", "scale"}`` (the delta's norm before clipping and the factor applied)."""
    bad = nonfinite_keys(update)
    if bad:  # clipping cannot repair NaN/inf: scale·NaN is NaN, and the norm is NaN so the scale stays 1
        raise ValueError(f"update has non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}")
    norm = update_norm(update, reference)
    if clip_norm is None:
        if noise_multiplier > 0:
            raise ValueError("federate.noise_multiplier needs federate.clip_norm: the noise is scaled by the clip norm")
        return dict(update), {"norm": norm, "scale": 1.0}
    scale = min(1.0, float(clip_norm) / max(norm, 1e-12))
    sigma = float(noise_multiplier) * float(clip_norm)
    out = {}
    for k, v in update.items():
        ref = reference.get(k)
        if ref is None or not v.is_floating_point():
            out[k] = v
            continue
        delta = (v.double() - ref.double()) * scale
        if sigma > 0:
            delta = delta + sigma * torch.randn(delta.shape, generator=generator, dtype=torch.float64)
        out[k] = (ref.double() + delta).to(v.dtype)
    return out, {"norm": norm, "scale": scale}


def proximal_hook(optimizer: torch.optim.Optimizer, pairs: Any, mu: float) -> Any:
    """FedProx at a site: before every optimiser step add ``μ(w - w_global)`` to each shared parameter's
    gradient, the gradient of ``μ/2·||w - w_global||²``. ``pairs`` is a callable returning
    ``[(parameter, global tensor)]``, resolved at the first step (the method builds its parameters
    after its optimiser is wrapped). Returns the hook handle."""
    cache: list[tuple[nn.Parameter, torch.Tensor]] = []

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        if not cache:
            cache.extend(pairs())
        with torch.no_grad():
            for p, g in cache:
                if p.grad is not None:
                    p.grad.add_(p.detach() - g.to(p.device, p.dtype), alpha=float(mu))

    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.register_step_pre_hook(hook)


# -- strategies ---------------------------------------------------------------------------------------
@dataclass
class FedAvg:
    """Sample-weighted federated averaging (McMahan et al. 2017): the new global model is
    ``Σ n_k·w_k / Σ n_k`` over the round's participants, ``n_k`` a site's training images.

    Args:
        local: ``module/key`` patterns that stay at the sites (never averaged, never sent down).
        aggregator: ``mean`` (sample-weighted), ``trimmed_mean`` or ``median`` (see the module docstring).
        trim_fraction: share of the largest and of the smallest values per coordinate ``trimmed_mean`` drops.
        max_weight_ratio: a site's weight is capped at this multiple of the other sites' median count.
    """

    local: tuple[str, ...] = ()
    name: str = "fedavg"
    participation: dict[str, int] = field(default_factory=dict)  # rounds each site contributed to
    aggregator: str = "mean"
    trim_fraction: float = 0.1
    max_weight_ratio: float | None = 10.0

    @property
    def mu(self) -> float:
        return 0.0

    def aggregate(self, updates: Mapping[str, Mapping[str, torch.Tensor]],
                  samples: Mapping[str, int]) -> dict[str, torch.Tensor]:
        sites = sorted(updates)
        for s in sites:
            self.participation[s] = self.participation.get(s, 0) + 1
        return robust_aggregate({s: updates[s] for s in sites}, {s: float(samples[s]) for s in sites},
                                aggregator=self.aggregator, trim_fraction=self.trim_fraction,
                                max_weight_ratio=self.max_weight_ratio)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mu": self.mu, "local": list(self.local), "participation": dict(self.participation)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the run in out was federated with strategy '{state.get('name')}', not '{self.name}': "
                             "use the same federate.strategy or another out")
        self.participation = dict(state.get("participation") or {})


@dataclass
class FedProx(FedAvg):
    """FedAvg aggregation with the proximal term ``μ/2·||w - w_global||²`` in each site's local loss
    (Li et al. 2020), which bounds how far a round of local training drifts from the global model.

    Args:
        local: as :class:`FedAvg`.
        mu_value: μ (``federate.mu``).
    """

    mu_value: float = 0.01
    name: str = "fedprox"

    @property
    def mu(self) -> float:
        return float(self.mu_value)


@dataclass
class FedPer(FedAvg):
    """Personalisation by keeping named parameter groups local (Arivazhagan et al. 2019): the groups of
    ``federate.local`` (e.g. ``model/encoder.backbone.layer4.*``) join the method's own local parts.

    Args:
        local: the method's local patterns plus the personalised groups.
    """

    name: str = "fedper"


def make_strategy(name: str, method: str, *, mu: float = 0.0, share_projector: bool = True,
                  local: Sequence[str] = (), aggregator: str = "mean", trim_fraction: float = 0.1,
                  max_weight_ratio: float | None = 10.0) -> FedAvg:
    """``federate.strategy`` as a strategy object (``local`` only for ``fedper``)."""
    if aggregator not in AGGREGATORS:
        raise ValueError(f"unknown federate.aggregator '{aggregator}'; expected one of {', '.join(AGGREGATORS)}")
    if not 0.0 <= float(trim_fraction) < 0.5:
        raise ValueError(f"federate.trim_fraction must be in [0, 0.5), got {trim_fraction}")
    robust = {"aggregator": aggregator, "trim_fraction": float(trim_fraction),
              "max_weight_ratio": None if max_weight_ratio is None else float(max_weight_ratio)}
    if name == "fedavg":
        return FedAvg(local=local_patterns(method, share_projector=share_projector), **robust)
    if name == "fedprox":
        return FedProx(local=local_patterns(method, share_projector=share_projector), mu_value=float(mu), **robust)
    if name == "fedper":
        if not local:
            raise ValueError("federate.strategy=fedper needs federate.local: the parameter groups that stay at each "
                             "site, e.g. federate.local=[model/encoder.backbone.layer4.*]")
        return FedPer(local=local_patterns(method, share_projector=share_projector, extra=local), **robust)
    raise ValueError(f"unknown federate.strategy '{name}'; expected fedavg, fedprox or fedper")


def strategy_from_config(f: Any, method: str) -> FedAvg:
    """The strategy the ``federate`` config section describes (one place, for the server and the FL engines)."""
    return make_strategy(f.strategy, method, mu=float(f.mu), share_projector=bool(f.share_projector),
                         local=list(f.local), aggregator=str(f.aggregator),
                         trim_fraction=float(f.trim_fraction), max_weight_ratio=f.max_weight_ratio)
