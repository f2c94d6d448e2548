"""Federated mode (``raycxr federate``): sites train where their data lives, a server aggregates.

- :mod:`.strategy`: shared/local split per method, FedAvg / FedProx / FedPer, DP-style clipping and noise,
  robust aggregation (trimmed mean, median, capped weights);
- :mod:`.privacy`: the ε a DP run has spent (Opacus's RDP accountant);
- :mod:`.client`: :class:`SiteClient`, one site's round of local training through the schedule driver;
- :mod:`.server`: :func:`run_federate`, rounds, deadline, sampling, checkpoint and resume;
- :mod:`.ray_clients`: ``runner=ray``, a site client per Ray actor, placed by the site's ``placement``.
"""

from .client import SiteClient, audit_update
from .privacy import epsilon
from .server import run_federate
from .strategy import (
    AGGREGATORS,
    FedAvg,
    FedPer,
    FedProx,
    capped_weights,
    clip_and_noise,
    coordinate_median,
    make_strategy,
    robust_aggregate,
    trimmed_mean,
    weighted_average,
)

__all__ = ["AGGREGATORS", "FedAvg", "FedPer", "FedProx", "SiteClient", "audit_update", "capped_weights",
           "clip_and_noise", "coordinate_median", "epsilon", "make_strategy", "robust_aggregate", "run_federate",
           "trimmed_mean", "weighted_average"]
