"""One checkpoint format for every method: what a pretraining run saves, and how anything reads it.

A :class:`Checkpoint` holds only what cannot be rebuilt from the config:

- ``modules``: named state dicts of the trained modules. ``modules["model"]`` is the method's main
  model, whose image encoder sits under the ``encoder.`` prefix, so the encoder is stored once
  (:meth:`Checkpoint.encoder_state` reads it from there). Frozen parts are left out: a method stores
  only the trainable head of a frozen text encoder, and rebuilds the frozen tower from the config.
- ``optimizer``: the optimiser state, for an exact resume (stage snapshots such as ``conquer.pt`` are
  saved without it, :meth:`Checkpoint.slim`).
- ``meta``: the method's own small fields (stage, class names, heads, round order...).
- ``position`` (schedule units done), ``history`` (one record per unit), ``val_auc`` and ``config``
  (the resolved pretraining config: encoder name, image size, every knob).

A run folder holds ``checkpoint.pt`` (the latest unit: what a resume reads) and ``best.pt`` (the unit
with the best val AUC, without optimiser state: what evaluation and export read, ``load(best=True)``).

Save is atomic (a temporary file renamed over the old one), and load gives one clear error naming
the file for a missing, truncated or foreign file. Checkpoints written before this format (a plain
dict with ``method`` and ``config``) are read too.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2
FILENAME = "checkpoint.pt"
BEST_FILENAME = "best.pt"  # the unit with the best val AUC over the whole schedule: what eval and export use
ENCODER_PREFIX = "encoder."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A pretraining checkpoint of any method (see the module docstring for the fields)."""

    method: str
    config: dict[str, Any]
    position: int = 0
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    val_auc: float | None = None
    format_version: int = FORMAT_VERSION
    source: str = "<memory>"

    # -- what evaluation, export, segmentation and tune need ---------------------------------------
    @property
    def encoder_name(self) -> str:
        try:
            return str(self.config["encoder"]["name"])
        except (KeyError, TypeError):
            raise CheckpointError(f"checkpoint {self.source}: its config has no encoder.name") from None

    @property
    def image_size(self) -> int:
        size = (self.config.get("transforms") or {}).get("size", self.config.get("image_size"))
        if size is None:
            raise CheckpointError(f"checkpoint {self.source}: its config has no image size")
        return int(size)

    @property
    def site_names(self) -> list[str]:
        """The sites the run trained on."""
        return list(self.meta.get("site_names") or self.config.get("site_names") or [])

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The image encoder's state dict (``backbone.*``, ``token_mlp.*``), read from the main model."""
        prefix = self.meta.get("encoder_prefix", ENCODER_PREFIX)
        state = {k[len(prefix):]: v for k, v in self.modules.get("model", {}).items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint {self.source}: no encoder weights under '{prefix}' in its model")
        return state

    # -- files -------------------------------------------------------------------------------------
    def slim(self) -> Checkpoint:
        """The same checkpoint without the optimiser state (for stage snapshots and export)."""
        return replace(self, optimizer=None)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "method": self.method, "config": self.config,
                "position": self.position, "modules": self.modules, "optimizer": self.optimizer,
                "meta": self.meta, "history": self.history, "val_auc": self.val_auc}

    def save(self, path: str | Path) -> Path:
        """Write atomically: a kill mid-write leaves the previous file intact (and a ``.tmp`` that
        :meth:`load` never reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.to_dict(), tmp)
        tmp.replace(path)
        return path

    @staticmethod
    def find(run: str | Path, *, best: bool = False) -> Path:
        """``run/checkpoint.pt`` for a run folder (``best``: ``run/best.pt`` where the run has one), the
        path itself for a file; a clear error otherwise."""
        path = Path(run)
        if path.is_dir():
            path = path / (BEST_FILENAME if best and (path / BEST_FILENAME).is_file() else FILENAME)
        if not path.is_file():
            partial = path.with_suffix(path.suffix + ".tmp")
            note = (f"; {partial.name} there is a save that was interrupted, not a checkpoint"
                    if partial.exists() else "")
            raise FileNotFoundError(f"pretraining run {run} not found: no checkpoint at {path} (give a folder "
                                    f"written by `raycxr pretrain`, or its checkpoint.pt){note}")
        return path

    @classmethod
    def load(cls, run: str | Path, *, best: bool = False) -> Checkpoint:
        """Read a run folder's ``checkpoint.pt`` (``best``: its ``best.pt`` where it has one; resuming
        reads the latest) or a checkpoint file."""
        path = cls.find(run, best=best)
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the run was killed while writing it; "
                                  "resume from an earlier copy or start again")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:200]
            raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file: "
                                  f"{type(e).__name__}: {reason})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "<dict>") -> Checkpoint:
        if isinstance(raw, Checkpoint):
            return raw
        if not isinstance(raw, dict) or "method" not in raw or "config" not in raw:
            raise CheckpointError(f"{source} is not a raycxr pretraining checkpoint (no 'method'/'config')")
        if raw.get("format_version") is None:
            return _from_legacy(raw, source)
        if int(raw["format_version"]) > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {source} has format {raw['format_version']}; this raycxr reads up to "
                                  f"{FORMAT_VERSION}: upgrade raycxr")
        return cls(method=raw["method"], config=raw["config"], position=int(raw.get("position", 0)),
                   modules=dict(raw.get("modules") or {}), optimizer=raw.get("optimizer"),
                   meta=dict(raw.get("meta") or {}), history=list(raw.get("history") or []),
                   val_auc=raw.get("val_auc"), format_version=int(raw["format_version"]), source=source)


# keys of the pre-format-2 dicts that are not method metadata
_LEGACY_MODULES = ("model", "teacher")
_LEGACY_DROPPED = ("encoder", "heads", "format_version", "method", "config", "position", "optimizer", "history",
                   "val_auc", "text_encoder")


def _from_legacy(raw: dict[str, Any], source: str) -> Checkpoint:
    """A checkpoint written before format 2 (every field at the top level, the encoder stored twice)."""
    modules = {k: raw[k] for k in _LEGACY_MODULES if isinstance(raw.get(k), dict)}
    if isinstance(raw.get("text_encoder"), dict):
        modules["text_head"] = {k: v for k, v in raw["text_encoder"].items() if not k.startswith("backbone.")}
    meta = {k: v for k, v in raw.items() if k not in _LEGACY_DROPPED and k not in _LEGACY_MODULES}
    return Checkpoint(method=raw["method"], config=raw["config"], position=int(raw.get("position", 0)),
                      modules=modules, optimizer=raw.get("optimizer"), meta=meta,
                      history=list(raw.get("history") or []), val_auc=raw.get("val_auc"), format_version=1,
                      source=source)
