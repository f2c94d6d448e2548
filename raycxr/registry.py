"""One registry for everything raycxr looks up by name: methods, site objectives, site adapters and
export targets (ONNX exporters), timm style: a decorator registers, a lookup finds, a list lists.

    WIDGETS = Registry("widget")

    @WIDGETS.decorator("mine")
    class Mine: ...

    WIDGETS.get("mine")        # the class; an unknown name lists the registered ones
    WIDGETS.names()            # registration order

The four registries and their decorators: ``raycxr.methods.registry.METHOD_REGISTRY``
(``@register_method``, the class's ``name``), ``raycxr.objectives.OBJECTIVE_REGISTRY``
(``@register_objective("<name>")``), ``raycxr.sites.adapters.ADAPTER_REGISTRY``
(``@register_adapter("<name>")``) and ``raycxr.export.EXPORTER_REGISTRY`` (``@register_exporter("<name>")``).

**Plug-ins.** Code outside raycxr registers the same way; its module only has to be imported first.
Two ways, for every kind:

- the config key ``plugins: [my_lab.plugins]`` (the pretraining family of commands: pretrain, tune,
  federate; the driver, Ray Train workers, Tune trials and federated sites import them, and a finished
  run's checkpoint remembers them for eval and export);
- an entry point in the group ``raycxr.plugins`` of an installed package
  (``[project.entry-points."raycxr.plugins"] my_lab = "my_lab.plugins"``): imported the first time any
  registry is consulted, in every process, whatever the command.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "raycxr.plugins"
_loaded_entry_points: set[str] = set()
_scanned = False


def import_plugins(modules: Iterable[str] | None) -> None:
    """Import the modules that register methods, objectives, adapters or exporters outside raycxr
    (config ``plugins``)."""
    for mod in modules or ():
        try:
            importlib.import_module(str(mod))
        except ImportError as e:
            raise ValueError(f"plugin module '{mod}' cannot be imported: {e}") from None


def load_entry_points(again: bool = False) -> None:
    """Import every ``raycxr.plugins`` entry point not imported yet. The installed packages are scanned
    once per process, and again (``again``) when a name is missing, so a package installed or put on the
    path since is found."""
    global _scanned
    if _scanned and not again:
        return
    _scanned = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _loaded_entry_points:
            continue
        _loaded_entry_points.add(key)  # before loading: a failing plug-in is reported once, not on every lookup
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of foreign code becomes one line naming it
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            raise ValueError(f"plugin '{ep.value}' (entry point '{ep.name}' in group {ENTRY_POINT_GROUP} of "
                             f"package {dist}) cannot be imported: {type(e).__name__}: {e}") from None


def _origin(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj))


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what is registered, as messages name it ("method", "site adapter", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; a second, different entry under the same name is an error
        (the same class imported again, e.g. by a Ray worker, is not)."""
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name")
        old = self.entries.get(name)
        if old is not None and old is not obj and _origin(old) != _origin(obj):
            raise ValueError(f"{self.kind} '{name}' is already registered by {'.'.join(_origin(old))}")
        self.entries[name] = obj
        return obj

    def decorator(self, name: str):
        """``@registry.decorator("name")``: register the decorated class or function."""
        def deco(obj: T) -> T:
            return self.register(name, obj)
        return deco

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name lists the registered ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} '{name}'; registered: {self.names()}")
        return self.entries[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        load_entry_points()
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        load_entry_points()
        if name not in self.entries:
            load_entry_points(again=True)
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
