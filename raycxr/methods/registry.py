"""The method registry, the way timm registers models: a decorator, a lookup and a list.

    @register_method
    class MyMethod(Method):
        name = "mine"
        ...

``raycxr pretrain method=mine`` then finds it. A method that lives outside raycxr is made known by
naming its module in the config (``plugins: [my_package.my_method]``): every process that looks a
method up (the driver, Ray Train workers, Tune trials) imports those modules first; or by an entry point
of an installed package (group ``raycxr.plugins``; see :mod:`raycxr.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import Registry, import_plugins

if TYPE_CHECKING:
    from .base import Method, Pretrained

METHOD_REGISTRY: Registry[type[Method]] = Registry("method")

__all__ = ["METHOD_REGISTRY", "get_method", "import_plugins", "list_methods", "load_pretrained", "register_method"]


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name`` (a second class under the same name is an error)."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set it to the value of `method=` that selects it")
    return METHOD_REGISTRY.register(name, cls)


def list_methods() -> list[str]:
    return sorted(METHOD_REGISTRY.names())


def get_method(name: str) -> type[Method]:
    """The registered method class; an unknown name lists the registered ones."""
    if name not in METHOD_REGISTRY:
        raise ValueError(f"unknown method '{name}'; registered: {list_methods()}")
    return METHOD_REGISTRY.entries[name]


def load_pretrained(run: str | Path | Any, *, text_model_dir: str | None = None) -> Pretrained:
    """A run folder (its ``best.pt``, the unit with the best val AUC, where it has one, else its
    ``checkpoint.pt``), a checkpoint file or :class:`~raycxr.checkpoint.Checkpoint` as a
    :class:`Pretrained` (the classifier that evaluation scores, export writes and the runtime runs)."""
    from omegaconf import OmegaConf

    from ..checkpoint import Checkpoint

    ckpt = run if isinstance(run, Checkpoint) else (Checkpoint.from_dict(run) if isinstance(run, dict)
                                                      else Checkpoint.load(run, best=True))
    cfg = OmegaConf.create(ckpt.config)
    if text_model_dir:
        cfg.text.model_dir = text_model_dir
    import_plugins(cfg.get("plugins"))
    pre = get_method(ckpt.method).pretrained(ckpt, cfg)
    if pre.classifier is not None:
        pre.classifier.eval()
    pre.encoder.eval()
    return pre
