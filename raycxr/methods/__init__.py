"""Pretraining methods: one module per method, registered by name (``raycxr pretrain method=<name>``).

- :mod:`.unichest`: UniChest, conquer then divide;
- :mod:`.ark`: Ark, cyclic rounds over the sites with an EMA teacher;
- :mod:`.baselines`: ``concurrent``, ``mixed`` and ``single``;
- :mod:`.selfsup`: label-free pretraining with one objective (SimCLR, MoCo v2, VICReg, CLIP, SLIP);
- :mod:`.umif`: UmiF, every supervision (reports, labels, boxes / masks, none) in one ViT.

A new method is one module with a :class:`~raycxr.methods.base.Method` subclass decorated with
:func:`register_method`, plus its section in ``raycxr/configs/pretrain.yaml`` (see CONTRIBUTING.md).
"""

from . import ark, baselines, selfsup, umif, unichest  # noqa: F401  (registers the built-in methods)
from .base import Method, Pretrained, Unit
from .registry import get_method, import_plugins, list_methods, load_pretrained, register_method

__all__ = ["Method", "Pretrained", "Unit", "get_method", "import_plugins", "list_methods", "load_pretrained",
           "register_method"]
