"""Server-side federation maths: which parameters are shared, how updates are averaged, clipped and noised.

Everything here works on *flat* states: ``{"module/key": tensor}`` (``"model/encoder.backbone.conv1.weight"``,
``"teacher/projector.0.bias"``), the checkpoint's modules flattened, so that one pattern list says
what stays at a site for every method:

- Ark and the concurrent baseline keep each site's head (or objective) local, the EMA teacher local
  (Ark+, Extended Data Fig. 2), and the projector local unless ``federate.share_projector``;
- UniChest shares the encoder, the shared query network (``query_networks.0``) and the text
  projection, and keeps its experts (``query_networks.1..K``), gate and SCL head at the site;
- ``mixed`` / ``single`` / ``selfsup`` / a plug-in method share everything (the union head is over the
  federation's union classes, the same shape at every site);
- FedPer adds the named groups of ``federate.local`` to the local ones.

Strategies: :class:`FedAvg` (sample-weighted mean), :class:`FedProx` (FedAvg on the server plus the
proximal term ``μ/2·||w - w_global||²`` in each site's loss, added as its gradient ``μ(w - w_global)``
by an optimiser pre-step hook, so every method's own loop stays unchanged) and :class:`FedPer`.
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
# what stays at the site, per method (``module/key`` globs); a method not listed shares everything
METHOD_LOCAL: dict[str, tuple[str, ...]] = {
    "ark": ("model/heads.*", "model/objectives.*", "teacher/*"),
    "concurrent": ("model/heads.*", "model/objectives.*"),
    "unichest": ("model/query_networks.[1-9]*", "model/gate.*", "model/scl_head.*"),
}
PROJECTOR = ("model/projector.*", "teacher/projector.*")


def local_patterns(method: str, *, share_projector: bool = True, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The ``module/key`` patterns that never leave a site for ``method`` (plus FedPer's ``extra``)."""
    pats = list(METHOD_LOCAL.get(method, ()))
    if not share_projector and method in ("ark", "concurrent"):
        pats += PROJECTOR
    return tuple(pats) + tuple(extra)


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
    """

    local: tuple[str, ...] = ()
    name: str = "fedavg"
    participation: dict[str, int] = field(default_factory=dict)  # rounds each site contributed to

    @property
    def mu(self) -> float:
        return 0.0

    def aggregate(self, updates: Mapping[str, Mapping[str, torch.Tensor]],
                  samples: Mapping[str, int]) -> dict[str, torch.Tensor]:
        sites = sorted(updates)
        for s in sites:
            self.participation[s] = self.participation.get(s, 0) + 1
        return weighted_average([updates[s] for s in sites], [float(samples[s]) for s in sites])

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
                  local: Sequence[str] = ()) -> FedAvg:
    """``federate.strategy`` as a strategy object (``local`` only for ``fedper``)."""
    if name == "fedavg":
        return FedAvg(local=local_patterns(method, share_projector=share_projector))
    if name == "fedprox":
        return FedProx(local=local_patterns(method, share_projector=share_projector), mu_value=float(mu))
    if name == "fedper":
        if not local:
            raise ValueError("federate.strategy=fedper needs federate.local: the parameter groups that stay at each "
                             "site, e.g. federate.local=[model/encoder.backbone.layer4.*]")
        return FedPer(local=local_patterns(method, share_projector=share_projector, extra=local))
    raise ValueError(f"unknown federate.strategy '{name}'; expected fedavg, fedprox or fedper")
