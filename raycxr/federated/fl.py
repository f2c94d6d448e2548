"""raycxr sites under real FL engines (optional extra ``raycxr[fl]``): MONAI FL, NVIDIA FLARE and Flower.

- :class:`RaycxrClientAlgo`: a site as a MONAI FL ``ClientAlgo`` (``initialize / train / get_weights /
  evaluate / finalize`` with ``ExchangeObject``), the interface ``monai-nvflare``'s
  ``ClientAlgoExecutor`` drives under NVIDIA FLARE. It wraps the same
  :class:`~raycxr.federated.client.SiteClient` as ``raycxr federate``: the method's own schedule, its
  shared/local split (heads stay at the site), DP clipping. Only the shared parameters are exchanged;
  FedAvg's weight is the site's number of training images (``NUM_EXECUTED_ITERATIONS``).
- :class:`RaycxrPersistor`: an NVFLARE model persistor that gives the server the initial shared model and
  writes the global model as a raycxr checkpoint (``out/checkpoint.pt``) that ``raycxr eval`` and
  ``raycxr export`` read (complete for methods that share every parameter, e.g. ``mixed``; a heads
  method's personalised models are the sites' ``out/sites/<site>/checkpoint.pt``).
- :func:`flower_client_app` / :func:`flower_server_app`: a Flower ``ClientApp`` over the same
  ``ClientAlgo`` class, and a ``ServerApp`` running Flower's FedAvg that saves the same raycxr checkpoint.

A client named like a catalogue site (``nih``) is that site; an engine's generic name (``site-1``,
Flower's partition id) is the catalogue's n-th site. The config is ``raycxr/configs/federate.yaml`` with
overrides, given to every component as a list of strings (they travel in NVFLARE's job JSON).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.fl.client import ClientAlgo  # MONAI is a core dependency; the engines are the extra
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from omegaconf import DictConfig

from ..checkpoint import FILENAME, Checkpoint
from ..config import compose
from ..engine.validation import validation_auc
from ..labels import UnionLabelSpace
from ..sites.config import SiteConfig
from ..train.local import select_sites
from .client import META_KEYS, SiteClient, SiteData
from .server import Federation
from .strategy import strategy_from_config, unflatten


def federation_config(overrides: Sequence[str] = ()) -> DictConfig:
    return compose("federate", list(overrides))


def catalogue(cfg: DictConfig) -> dict[str, SiteConfig]:
    return select_sites(cfg)


def union_names(sites: Mapping[str, SiteConfig]) -> list[str]:
    """The federation's union classes: every catalogue site's label names (class names, no patient data)."""
    return UnionLabelSpace.build({n: s.load_manifest().label_names for n, s in sites.items()}).names


def resolve_site(name: str | int, sites: Mapping[str, SiteConfig]) -> tuple[str, int]:
    """A client name as a catalogue site and its index: the site of that name, else ``site-N`` / ``N``
    (1-based for NVFLARE's ``site-N``, 0-based for a Flower partition id) as the n-th site."""
    names = list(sites)
    if isinstance(name, str) and name in sites:
        return name, names.index(name)
    if isinstance(name, int):
        return names[name % len(names)], name % len(names)
    m = re.search(r"(\d+)$", str(name))
    if not m:
        raise ValueError(f"client '{name}' is no catalogue site ({names}) and has no number")
    i = (int(m.group(1)) - 1) % len(names)
    return names[i], i


def _tensors(weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in weights.items()}


def initial_shared(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The shared part of the method's fresh model (every site builds the same from the seed)."""
    sites = catalogue(cfg)
    name = next(iter(sites))
    return SiteClient(cfg, sites[name].resolved(), 0).initial_state(union_names(sites))


def global_checkpoint(cfg: DictConfig, shared: Mapping[str, Any], out: str | Path | None = None) -> Path:
    """Write the global shared parameters an engine aggregated as a raycxr checkpoint in ``out``
    (default ``cfg.out``); the metadata (class names, stage...) is the method's fresh model's."""
    sites = catalogue(cfg)
    union = union_names(sites)
    name = next(iter(sites))
    template = SiteClient(cfg, sites[name].resolved(), 0).template(union)
    f = cfg.federate
    fed = Federation(cfg, strategy_from_config(f, cfg.method))
    fed.global_shared, fed.union = _tensors(shared), union
    fed.site_meta = {name: {k: template.meta[k] for k in META_KEYS if k in template.meta}}
    ck = fed.checkpoint()
    ck.meta.update({k: template.meta[k] for k in META_KEYS if k in template.meta})
    ck.meta["site_names"] = list(sites)
    ck.meta["federated"]["engine"] = True
    return ck.save(Path(out or cfg.out) / FILENAME)


class RaycxrClientAlgo(ClientAlgo):
    """A raycxr site as a MONAI FL ``ClientAlgo``.

    Args:
        overrides: ``raycxr/configs/federate.yaml`` overrides (method, sites, sizes, ``federate.*``).
        site: the catalogue site this client is; default: from the FL engine's client name.
    """

    def __init__(self, overrides: Sequence[str] = (), site: str | None = None) -> None:
        self.overrides, self.site_name = list(overrides), site
        self.client: SiteClient | None = None
        self.local: dict[str, torch.Tensor] | None = None
        self.update: dict[str, Any] | None = None
        self.round = 0

    def initialize(self, extra: dict | None = None) -> None:
        extra = extra or {}
        self.cfg = federation_config(self.overrides)
        sites = catalogue(self.cfg)
        name, index = resolve_site(self.site_name or extra.get(ExtraItems.CLIENT_NAME, 0), sites)
        self.site_name, self.union = name, union_names(sites)
        self.client = SiteClient(self.cfg, sites[name].resolved(), index)

    def _global(self, data: Any) -> dict[str, torch.Tensor]:
        weights = getattr(data, "weights", None) or {}
        if not weights:  # an engine with no initial model: the method's fresh one (the same at every site)
            return self.client.initial_state(self.union)
        return _tensors(weights)

    def train(self, data: Any, extra: dict | None = None) -> None:
        """One round of local training from the global weights in ``data``."""
        if self.client is None:
            self.initialize(extra)
        self.update = self.client.fit(self._global(data), self.local, self.union, self.round)
        self.local = self.update["local"]  # heads and other local parts stay here, for the next round
        self.round += 1

    def get_weights(self, extra: dict | None = None) -> Any:
        """The shared parameters after the last round (the global ones before any), as ``WEIGHTS``."""
        if self.update is None:
            weights = self.client.initial_state(self.union) if self.client is not None else {}
            return ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS, statistics={})
        return ExchangeObject(weights=dict(self.update["shared"]), weight_type=WeightType.WEIGHTS,
                              metrics={k: v for k, v in self.update["metrics"].items() if isinstance(v, (int, float))},
                              statistics={FlStatistics.NUM_EXECUTED_ITERATIONS: int(self.update["n_samples"])})

    def evaluate(self, data: Any, extra: dict | None = None) -> Any:
        """Val mean AUC of the global weights in ``data`` with this site's local parts (``val_auc``)."""
        if self.client is None:
            self.initialize(extra)
        c = self.client
        base = c.template(self.union)
        flat = {f"{m}/{k}": v for m, s in base.modules.items() for k, v in s.items()}
        flat.update(self.local or {})
        flat.update({k: v for k, v in self._global(data).items() if k in flat})
        cfg = c.round_config(self.round)
        sites = {c.site.name: c.site}
        data_plane = SiteData(cfg, sites, self.union)
        method = c.method_cls(cfg, sites, data_plane)
        resume = Checkpoint(method=base.method, config=base.config, modules=unflatten(flat), meta=dict(base.meta))
        method.setup(resume)
        current = method.current_classifier()
        batches = data_plane.val_batches()
        if current is None or batches is None:
            return ExchangeObject(metrics={"val_auc": 0.0, "val_images": 0})
        res = validation_auc(current[0], current[1], batches, data_plane.union.names)
        return ExchangeObject(metrics={"val_auc": float(res["val_auc"] or 0.0), "val_images": res["val_images"]})

    def abort(self, extra: dict | None = None) -> None:
        pass

    def finalize(self, extra: dict | None = None) -> None:
        """Nothing to release: the site's personalised model is already in ``out/sites/<site>``."""


# -- NVIDIA FLARE --------------------------------------------------------------------------------------
def nvflare_persistor_class() -> type:
    """:class:`RaycxrPersistor`, built on NVFLARE's ``ModelPersistor`` (imported only with the extra)."""
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.abstract.model_persistor import ModelPersistor

    class _Persistor(ModelPersistor):
        def __init__(self, overrides: list[str] | None = None) -> None:
            super().__init__()
            self.overrides = list(overrides or [])

        def load_model(self, fl_ctx: Any) -> Any:
            cfg = federation_config(self.overrides)
            shared = initial_shared(cfg)
            return make_model_learnable({k: v.numpy() for k, v in shared.items()}, {})

        def save_model(self, model: Any, fl_ctx: Any) -> None:
            global_checkpoint(federation_config(self.overrides), model["weights"])

    return _Persistor


def nvflare_executor_class() -> type:
    """monai-nvflare's ``ClientAlgoExecutor`` with its train result readable by NVFLARE 2.7's ``FedAvg``:
    monai-nvflare 0.4.0 stores the key metric before training as a float in ``INITIAL_METRICS``, which
    NVFLARE 2.7 reads as a metrics dict and, failing, drops the site's whole result (nothing averaged)."""
    from monai_nvflare.client_algo_executor import ClientAlgoExecutor
    from nvflare.apis.dxo import MetaKey, from_shareable

    class _Executor(ClientAlgoExecutor):
        def train(self, shareable: Any, fl_ctx: Any, abort_signal: Any) -> Any:
            result = super().train(shareable, fl_ctx, abort_signal)
            try:
                dxo = from_shareable(result)
            except ValueError:
                return result  # an error reply: passed on as it is
            metric = dxo.meta.get(MetaKey.INITIAL_METRICS)
            if metric is not None and not isinstance(metric, dict):
                dxo.meta[MetaKey.INITIAL_METRICS] = {self.key_metric: metric}
            return dxo.to_shareable()

    return _Executor


_ENGINE_CLASSES = {"RaycxrPersistor": nvflare_persistor_class, "RaycxrClientAlgoExecutor": nvflare_executor_class}


def __getattr__(name: str) -> Any:
    if name in _ENGINE_CLASSES:  # NVFLARE's job JSON names a class by its path: built on first use
        cls = _ENGINE_CLASSES[name]()
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# -- Flower ----------------------------------------------------------------------------------------------
def flower_client_app(overrides: Sequence[str]) -> Any:
    """A Flower ``ClientApp`` whose node is a :class:`RaycxrClientAlgo` (the node's ``partition-id`` picks
    the catalogue site); it trains on the arrays it receives and replies with the shared ones and
    ``num-examples`` (Flower's FedAvg weight)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    algos: dict[int, RaycxrClientAlgo] = {}

    def algo(context: Context) -> RaycxrClientAlgo:
        pid = int(context.node_config.get("partition-id", 0))
        if pid not in algos:
            a = RaycxrClientAlgo(overrides)
            a.initialize({ExtraItems.CLIENT_NAME: pid})
            algos[pid] = a
        return algos[pid]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        a = algo(context)
        # the node's local parts (heads) live in its Context, whichever process serves it this round
        if "raycxr_local" in context.state:
            a.local = context.state["raycxr_local"].to_torch_state_dict()
            a.round = int(context.state["raycxr_round"]["round"])
        a.train(ExchangeObject(weights=msg.content["arrays"].to_torch_state_dict()))
        if a.local:
            context.state["raycxr_local"] = ArrayRecord(a.local)
        context.state["raycxr_round"] = ConfigRecord({"round": a.round})
        eo = a.get_weights()
        # the same keys from every node (Flower refuses to aggregate otherwise): no val AUC, which may be None
        metrics = {"loss": float(eo.metrics["loss"]), "images": int(eo.metrics["images"]),
                   "num-examples": int(eo.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS])}
        return Message(RecordDict({"arrays": ArrayRecord(eo.weights), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        a = algo(context)
        eo = a.evaluate(ExchangeObject(weights=msg.content["arrays"].to_torch_state_dict()))
        n = a.client.info()["n_train"] if a.client is not None else 1
        return Message(RecordDict({"metrics": MetricRecord({**eo.metrics, "num-examples": int(n)})}), reply_to=msg)

    return app


def flower_server_app(overrides: Sequence[str], rounds: int, n_sites: int) -> Any:
    """A Flower ``ServerApp``: Flower's FedAvg over ``n_sites`` nodes for ``rounds`` rounds from the method's
    fresh shared model; the result is written as a raycxr checkpoint in the config's ``out``."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = federation_config(overrides)
        strategy = FlowerFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_sites,
                                min_evaluate_nodes=n_sites, min_available_nodes=n_sites)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_shared(cfg)), num_rounds=int(rounds))
        global_checkpoint(cfg, result.arrays.to_torch_state_dict())

    return app
