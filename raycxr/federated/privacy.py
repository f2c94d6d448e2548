"""The privacy budget a DP federation has spent, from Opacus's Rényi-DP accountant.

With ``federate.clip_norm`` C and ``federate.noise_multiplier`` σ, each site releases its update
clipped to L2 norm C plus Gaussian noise of standard deviation σ·C (:func:`.strategy.clip_and_noise`):
one Gaussian mechanism per round the site takes part in, with sensitivity C when the site's whole data
is added or removed (site-level DP, the unit of DP-FedAvg: McMahan et al. 2018, "Learning
differentially private recurrent language models", §2). Composing the rounds with the Rényi-DP
accountant (Mironov 2017, "Rényi differential privacy", §3; Opacus's ``RDPAccountant``) gives the
ε a run states for a given δ.

The sampling rate is taken as 1: sampling sites (``federate.client_fraction``) amplifies privacy only
when which sites were sampled stays secret, which a federation's own logs do not promise. The figure is
therefore an upper bound for the guarantee the mechanism gives, not a promise about the training data
of individual patients inside a site (that needs per-example DP-SGD at the site).
"""

from __future__ import annotations

import math


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` Gaussian releases with noise multiplier ``noise_multiplier`` at ``delta``
    (``inf`` without noise, ``0`` for no round)."""
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"federate.dp_delta must be in (0, 1), got {delta}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(rounds))]
    return float(accountant.get_epsilon(delta=float(delta)))
