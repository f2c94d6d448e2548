"""The method registry, the way timm registers models: a decorator, a lookup and a list.

    @register_method
    class MyMethod(Method):
        name = "mine"
        ...

``raycxr pretrain method=mine`` then finds it. A method that lives outside raycxr is made known by
naming its module in the config (``plugins: [my_package.my_method]``): every process that looks a
method up (the driver, Ray Train workers, Tune trials) imports those modules first.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Method, Pretrained

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name`` (a second class under the same name is an error)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set it to the value of `method=` that selects it")
    old = _METHODS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method '{name}' is already registered by {old.__module__}.{old.__qualname__}")
    _METHODS[name] = cls
    return cls


def import_plugins(modules: Iterable[str] | None) -> None:
    """Import the modules that register methods or objectives outside raycxr (config ``plugins``)."""
    for mod in modules or ():
        try:
            importlib.import_module(str(mod))
        except ImportError as e:
            raise ValueError(f"plugin module '{mod}' cannot be imported: {e}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    """The registered method class; an unknown name lists the registered ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}'; registered: {list_methods()}")
    return _METHODS[name]


def load_pretrained(run: str | Path | Any, *, text_model_dir: str | None = None) -> Pretrained:
    """A run folder, ``checkpoint.pt`` or :class:`~raycxr.checkpoint.Checkpoint` as a :class:`Pretrained`
    (the classifier that evaluation scores, export writes and the runtime runs)."""
    from omegaconf import OmegaConf

    from ..checkpoint import Checkpoint

    ckpt = run if isinstance(run, Checkpoint) else (Checkpoint.from_dict(run) if isinstance(run, dict)
                                                      else Checkpoint.load(run))
    cfg = OmegaConf.create(ckpt.config)
    if text_model_dir:
        cfg.text.model_dir = text_model_dir
    import_plugins(cfg.get("plugins"))
    pre = get_method(ckpt.method).pretrained(ckpt, cfg)
    if pre.classifier is not None:
        pre.classifier.eval()
    pre.encoder.eval()
    return pre
