"""Hydra configuration: every knob of a command is a value in ``raycxr/configs/`` with a CLI override.

Commands compose their config with Hydra's compose API (no working-directory change, no
``outputs/`` folder of Hydra's own) so that ``raycxr synth out=DIR seed=3`` behaves like any other
Hydra override.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the wheel: no checkout needed


def cache_dir() -> Path:
    """Where raycxr caches what it derives once per machine (parsed tables, lung atlas, text models):
    ``$RAYCXR_CACHE``, else ``~/.cache/raycxr``."""
    return Path(os.environ.get("RAYCXR_CACHE", Path.home() / ".cache" / "raycxr"))


def config_dir() -> Path:
    """``$RAYCXR_CONFIG_DIR``, else the ``raycxr/configs/`` folder installed with the package."""
    d = Path(os.environ.get("RAYCXR_CONFIG_DIR", PACKAGE_CONFIGS))
    if not (d / "synth.yaml").is_file():
        raise FileNotFoundError(f"raycxr config folder not found at {d} (no synth.yaml there); unset "
                                "RAYCXR_CONFIG_DIR or point it at a copy of raycxr/configs")
    return d


def compose_preset(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`compose` with a named preset: ``preset=study`` applies ``presets.study`` first, then the
    command line's own overrides (which win)."""
    cfg = compose(name, overrides)
    preset = cfg.get("preset")
    if not preset:
        return cfg
    if preset not in cfg.presets:
        raise ValueError(f"unknown {name} preset '{preset}'; defined: {sorted(cfg.presets)}")
    values = OmegaConf.to_container(cfg.presets[preset], resolve=True)
    return compose(name, [*(f"{k}={hydra_value(v)}" for k, v in values.items()), *overrides])


def hydra_value(v: object) -> str:
    """A Python value in Hydra's override grammar (``{a: 1, b: [x, "y z"]}``)."""
    import json

    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(hydra_value(x) for x in v) + "]"
    if v is None:
        return "null"
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def compose(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``raycxr/configs/<name>.yaml`` with Hydra overrides such as ``["seed=3", "+x=1"]``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(version_base=None, config_dir=str(config_dir())):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        detail = " ".join(str(e).split())  # Hydra's messages span lines; the user gets one
        raise ValueError(f"bad configuration for '{name}' with overrides {list(overrides)}: {detail}"
                         + _nearest_keys(name, detail)) from None
    OmegaConf.set_readonly(cfg, False)
    from .schema import check_config

    check_config(name, cfg)  # types and ranges: a bad value is one line naming its key
    from .registry import import_plugins

    import_plugins(cfg.get("plugins"))  # methods, objectives, adapters, export targets from outside raycxr
    return cfg


def _nearest_keys(name: str, detail: str) -> str:
    """``; nearest keys: ...`` for an override of a key the config lacks (``epochs`` -> ``unichest.conquer_epochs``)."""
    import difflib
    import re

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    m = re.search(r"(?:Could not override|Key) '([^']+)'", detail)
    if not m:
        return ""
    key = m.group(1)
    try:
        with initialize_config_dir(version_base=None, config_dir=str(config_dir())):
            base = OmegaConf.to_container(hydra_compose(config_name=name), resolve=False)
    except Exception:  # noqa: BLE001 - a hint only; the error itself is already clear
        return ""
    keys: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        if prefix:
            keys.append(prefix.rstrip("."))

    walk(base, "")
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf or k.rsplit(".", 1)[-1].endswith("_" + leaf)]
    near += difflib.get_close_matches(key, keys, 3) + difflib.get_close_matches(leaf, keys, 2)
    near = [k for k in dict.fromkeys(near) if k != key][:6]
    return f"; nearest keys: {', '.join(near)}" if near else ""
