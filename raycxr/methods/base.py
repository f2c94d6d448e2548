"""What a pretraining method is, for the schedule driver, evaluation and export.

A method is one class, registered by name (:func:`raycxr.methods.register_method`), that owns:

- building its model(s) from the config and restoring them from a :class:`~raycxr.checkpoint.Checkpoint`
  (:meth:`Method.setup`);
- its schedule as a list of :class:`Unit` (UniChest: conquer then divide epochs; Ark: one site-epoch
  per site per round; baselines: epochs), each trained by :meth:`Method.run_unit`;
- the fields it adds to a checkpoint (:meth:`Method.modules`, :meth:`Method.optimizer_state`,
  :meth:`Method.meta`) and what it does between units (:meth:`Method.end_unit`);
- the classifier it is now (:meth:`Method.current_classifier`, scored for ``val_auc``) and what a
  finished run becomes (:meth:`Method.pretrained`): the classifier evaluation, export and the
  runtime use, plus any extra evaluation it offers (zero-shot, attention maps).
- what the other commands need to know about it, so that no module outside ``raycxr/methods/`` names a
  method: its ``raycxr tune`` grid and ranking (:attr:`Method.tune_space`, :meth:`Method.tune_grid`,
  :attr:`Method.tune_ranked_stage`...), the parameters that stay at a site under ``raycxr federate``
  (:meth:`Method.local_parameters`) and the evaluation it asks for by default
  (:attr:`Method.segmentation_by_default`).

The driver (:func:`raycxr.train.driver.run_schedule`) owns everything else: positions, the progress
bar, metrics, validation, checkpoint files and resume. The data plane (local datasets or site
actors) is passed in, so the same method runs in one process, in Ray Train workers and in Tune trials.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..checkpoint import Checkpoint
from ..engine.schedule import LRSchedule, attach_schedule, batches_per_pass, epoch_budget
from ..models.classifiers import EmbeddingModel
from ..models.encoders import ImageEncoder
from ..sites.config import SiteConfig

# the projector's parameters (Ark, concurrent), local under ``federate.share_projector=false``
PROJECTOR_PARAMETERS = ("model/projector.*", "teacher/projector.*")


@dataclass(frozen=True)
class TuneKnob:
    """One knob of a method's ``raycxr tune`` grid.

    Args:
        key: the pretraining config key a trial sets (``unichest.lam``).
        grid: where the grid's values are in the tune config (``tune.lam``).
        label: the heat-map axis label (default: the column name).
        heading: the results table's column heading (default: the column name).
    """

    key: str
    grid: str
    label: str = ""
    heading: str = ""


@dataclass(frozen=True)
class Unit:
    """One unit of a schedule: what one call of :meth:`Method.run_unit` trains.

    ``fields`` go into the unit's metrics record (e.g. ``{"stage": "conquer", "epoch": 0}`` or
    ``{"round": 1, "site": "nih"}``); ``stage`` groups units that share an optimiser."""

    stage: str
    fields: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of a pretraining method (subclass it and decorate with ``@register_method``).

    Args:
        cfg: the pretraining config (``raycxr/configs/pretrain.yaml`` with overrides); the method's own
            section is ``cfg[<name>]`` (or ``cfg[config_key]``).
        sites: the run's sites by name, in registration order.
        data: the data plane: ``union``, ``label_names``, ``union_loader()``, ``site_loaders()``,
            ``site_classes()``, ``probe()``, ``val_batches()``, ``distribute(optimizer)``,
            ``site_heads()``, ``hand_back_heads()``, ``take_wait()`` (seconds waited for training batches,
            logged per unit) (:class:`raycxr.train.local.LocalData` or the Ray runner's site-actor plane).
    """

    name: ClassVar[str] = ""
    config_key: ClassVar[str | None] = None  # the config section; default: the name
    # site objectives the method can train (``objective:`` in a site YAML); others are refused. None: any
    # registered one, plug-ins included (a method that does not train the site's own objective)
    objectives: ClassVar[tuple[str, ...] | None] = ("supervised",)
    unit_name: ClassVar[str] = "epoch"  # progress-bar unit
    offers_zero_shot: ClassVar[bool] = False  # a finished run scores any class name (``Pretrained.zero_shot``)
    display_name: ClassVar[str] = ""  # how reports name the method (default: its name)

    # -- raycxr tune (an empty tune_space: the method offers no sweep) ------------------------------
    # result column -> knob, in order: the first two are the heat-map's axes
    tune_space: ClassVar[dict[str, TuneKnob]] = {}
    # the stage whose epochs rank a trial (None: every epoch), and one whose best is listed for reference
    tune_ranked_stage: ClassVar[str | None] = None
    tune_reference_stage: ClassVar[str | None] = None
    tune_metric: ClassVar[str] = ("best val mean AUC (the run's classifier) over the epochs a trial ran (ASHA may "
                                  "stop a trial early).")

    # -- raycxr federate -----------------------------------------------------------------------------
    # ``module/key`` globs of the parameters that never leave a site (site heads, teacher, experts); the rest
    # is averaged. Extra globs that stay local under ``federate.share_projector=false``.
    federated_local: ClassVar[tuple[str, ...]] = ()
    federated_projector: ClassVar[tuple[str, ...]] = ()

    # -- raycxr eval ---------------------------------------------------------------------------------
    # ``segmentation.enabled=auto`` runs the frozen-encoder segmentation (a method that learns from masks)
    segmentation_by_default: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, sites: dict[str, SiteConfig], data: Any) -> None:
        self.cfg, self.sites, self.data = cfg, sites, data
        self.optimizer: Any = None
        self.lr_schedule: LRSchedule | None = None  # attach_schedule(): its step count is checkpointed
        self.run: Any = None  # the run folder (set by the driver): stage snapshots go there
        bad = {n: s.objective for n, s in sites.items()
               if self.objectives is not None and s.objective not in self.objectives}
        if bad:
            raise ValueError(f"method '{self.name}' cannot train site objective(s) {bad}: it supports "
                             f"{list(self.objectives)} (set the site's `objective:` or use another method)")

    @property
    def section(self) -> DictConfig:
        return self.cfg[self.config_key or self.name]

    # -- training: the driver calls these ----------------------------------------------------------
    def setup(self, resume: Checkpoint | None) -> int:
        """Build the models (restoring them from ``resume``); return the first schedule position to train."""
        raise NotImplementedError

    def units(self) -> list[Unit]:
        """The whole schedule (positions index into it)."""
        raise NotImplementedError

    def use_optimizer(self, optimizer: Any, total_steps: int, resume: Checkpoint | None,
                      restore: bool = True) -> bool:
        """Make ``optimizer`` the run's: distributed over the data plane (gradient sync under Ray), its state
        restored from ``resume`` when ``restore`` says the saved state fits (same parameters, same stage),
        and the run's ``schedule`` over ``total_steps`` steps, continued from the saved step. Returns
        whether the state was restored."""
        self.optimizer = self.data.distribute(optimizer)
        same = resume is not None and bool(resume.optimizer) and bool(restore)
        if same:
            self.optimizer.load_state_dict(resume.optimizer)
        self.lr_schedule = attach_schedule(self.optimizer, self.cfg, int(total_steps),
                                           int(resume.meta.get("lr_step") or 0) if same else 0)
        return same

    def start_unit(self, unit: Unit, position: int) -> None:
        """Before a unit: switch stage, build the stage's optimiser... (default: nothing)."""

    def run_unit(self, unit: Unit, position: int) -> dict[str, float]:
        """Train one unit; return its mean loss terms (``loss`` at least) plus ``steps`` and ``images``."""
        raise NotImplementedError

    def probe(self, unit: Unit | None) -> dict[str, Any]:
        """Deterministic figures on a fixed probe batch (``unit`` None: before training); default none."""
        return {}

    def current_classifier(self) -> tuple[nn.Module, list[str]] | None:
        """The model as it is now, as images → probabilities, and its class names (None: nothing to score)."""
        return None

    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint stores, by name; ``"model"`` holds the encoder as ``model.encoder``."""
        raise NotImplementedError

    def module_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """State dicts of :meth:`modules` (a method that keeps frozen parts overrides it to leave them out)."""
        return {k: m.state_dict() for k, m in self.modules().items()}

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict() if self.optimizer is not None else None

    def meta(self) -> dict[str, Any]:
        """The method's own checkpoint fields (small and JSON-like)."""
        return {}

    def after_unit(self, unit: Unit, position: int, record: dict) -> None:
        """After a unit is trained and scored, before its checkpoint is made: update what the checkpoint
        records (e.g. the best val AUC so far). Default: nothing."""

    def end_unit(self, unit: Unit, position: int, record: dict, checkpoint: Checkpoint, run: Any) -> None:
        """After the unit's checkpoint is saved (so a crash here loses nothing): stage snapshots, heads
        handed back to the site actors... Default: nothing."""

    def checkpoint(self, position: int, history: list[dict], val_auc: float | None) -> Checkpoint:
        return Checkpoint(method=self.name, config=OmegaConf.to_container(self.cfg, resolve=True), position=position,
                          modules=self.module_state(), optimizer=self.optimizer_state(),
                          meta={"site_names": list(self.sites), **self.meta(),
                                "lr_step": self.lr_schedule.step if self.lr_schedule is not None else None},
                          history=list(history),
                          val_auc=val_auc)

    # -- a study's budget --------------------------------------------------------------------------
    @classmethod
    def budget_overrides(cls, cfg: DictConfig, units: int, n_sites: int) -> list[str]:
        """Config overrides that give this method ``units`` schedule units of at most
        ``max_steps_per_epoch`` steps each, on ``n_sites`` sites: how ``raycxr study`` puts every row on
        the same budget of optimiser steps × batch. Default: ``<section>.epochs=units``."""
        return [f"{cls.config_key or cls.name}.epochs={int(units)}"]

    @classmethod
    def step_budget(cls, cfg: DictConfig, steps: int, train_sizes: dict[str, int]) -> list[str]:
        """Config overrides that give this method ``steps`` optimiser steps (or the fewest above) on sites
        whose training splits hold ``train_sizes`` images: how ``raycxr study`` puts every row on the same
        budget, whatever the sites' sizes. Default: epochs over the sites' pooled images, one batch of
        ``batch_size`` a step (:meth:`budget_overrides` turns them into the method's units)."""
        return epoch_budget(cls, cfg, steps, batches_per_pass(sum(train_sizes.values()), int(cfg.batch_size)),
                            len(train_sizes))

    # -- raycxr tune ------------------------------------------------------------------------------------
    @classmethod
    def tune_grid(cls, grid: dict[str, list]) -> dict[str, list]:
        """The sweep's values (``{column: values}`` from the tune config) checked and typed; default: as given."""
        return grid

    @classmethod
    def tune_epochs(cls, cfg: DictConfig) -> int:
        """The epochs one trial trains (ASHA's ``max_t``); default ``<section>.epochs``."""
        return int(cfg[cls.config_key or cls.name].epochs)

    @classmethod
    def tune_first_rung(cls, cfg: DictConfig) -> int:
        """ASHA's default grace period: the first epoch at which the swept knobs can have acted (default 1)."""
        return 1

    # -- raycxr federate --------------------------------------------------------------------------------
    @classmethod
    def local_parameters(cls, share_projector: bool = True) -> tuple[str, ...]:
        """The ``module/key`` globs that never leave a site in a federation (FedPer's groups come on top)."""
        return cls.federated_local + (() if share_projector else cls.federated_projector)

    # -- a finished run ----------------------------------------------------------------------------
    @classmethod
    def pretrained(cls, ckpt: Checkpoint, cfg: DictConfig) -> Pretrained:
        """The run as a :class:`Pretrained` (classifier, encoder, class names)."""
        raise NotImplementedError


@dataclass
class Pretrained:
    """What a run produced, ready to use. ``classifier(x)`` returns probabilities over ``class_names``.

    ``zero_shot`` (a method that can score any class name or prompt) and ``attention`` (a method
    with attention maps over the image) are ``None`` when the method has no such evaluation."""

    method: str
    classifier: nn.Module | None  # None: the method trains an encoder only (label-free pretraining)
    encoder: ImageEncoder
    class_names: list[str]
    image_size: int
    sites: list[str]
    config: dict
    source: str
    site_labels: dict[str, list[str]] = field(default_factory=dict)
    zero_shot: Callable[[list[str]], nn.Module] | None = None
    attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_model(self) -> EmbeddingModel:
        return EmbeddingModel(self.encoder).eval()

    @property
    def encoder_name(self) -> str:
        return str(self.config["encoder"]["name"])

    def zero_shot_classifier(self, names: list[str]) -> nn.Module:
        """The run on any class names or prompts (a method that supports zero-shot)."""
        if self.zero_shot is None:
            raise ValueError("zero-shot needs a method that scores class names (UniChest); "
                             f"this run is '{self.method}'")
        return self.zero_shot(list(names)).eval()


# -- pieces the method loops share -------------------------------------------------------------------
@dataclass
class LossLog:
    """Running sums of named loss terms; ``means()`` for the unit's summary."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n: int = 0
    steps: list[float] = field(default_factory=list)
    images: int = 0

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in terms.items():
            self.sums[k] += float(v)
        self.n += 1
        self.images += batch_size
        self.steps.append(float(terms["loss"]))

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()} | {"steps": self.n, "images": self.images}


def check_resume(ckpt: Checkpoint, method: str) -> None:
    if ckpt.method != method:
        raise ValueError(f"cannot resume a '{ckpt.method}' checkpoint ({ckpt.source}) as '{method}'")
