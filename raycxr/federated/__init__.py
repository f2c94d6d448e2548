"""Federated mode (``raycxr federate``): sites train where their data lives, a server aggregates.

- :mod:`.strategy`: shared/local split per method, FedAvg / FedProx / FedPer, DP-style clipping and noise;
- :mod:`.client`: :class:`SiteClient`, one site's round of local training through the schedule driver;
- :mod:`.server`: :func:`run_federate`, rounds, deadline, sampling, checkpoint and resume;
- :mod:`.ray_clients`: ``runner=ray``, a site client per Ray actor, placed by the site's ``placement``.
"""

from .client import SiteClient, audit_update
from .server import run_federate
from .strategy import FedAvg, FedPer, FedProx, clip_and_noise, make_strategy, weighted_average

__all__ = ["FedAvg", "FedPer", "FedProx", "SiteClient", "audit_update", "clip_and_noise", "make_strategy",
           "run_federate", "weighted_average"]
