"""Hydra configuration: every knob of a command is a value in ``configs/`` with a CLI override.

Commands compose their config with Hydra's compose API (no working-directory change, no
``outputs/`` folder of Hydra's own) so that ``raycxr synth out=DIR seed=3`` behaves like any other
Hydra override.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where raycxr caches what it derives once per machine (parsed tables, lung atlas, text models):
    ``$RAYCXR_CACHE``, else ``~/.cache/raycxr``."""
    return Path(os.environ.get("RAYCXR_CACHE", Path.home() / ".cache" / "raycxr"))


def config_dir() -> Path:
    """``$RAYCXR_CONFIG_DIR``, else the ``configs/`` folder of the checkout raycxr runs from."""
    d = Path(os.environ.get("RAYCXR_CONFIG_DIR", REPO_ROOT / "configs"))
    if not (d / "synth.yaml").is_file():
        raise FileNotFoundError(f"raycxr config folder not found at {d}; install raycxr from its checkout "
                                "(pip install -e .) or set RAYCXR_CONFIG_DIR")
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
    """Compose ``configs/<name>.yaml`` with Hydra overrides such as ``["seed=3", "+x=1"]``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(version_base=None, config_dir=str(config_dir())):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        detail = " ".join(str(e).split())  # Hydra's messages span lines; the user gets one
        raise ValueError(f"bad configuration for '{name}' with overrides {list(overrides)}: {detail}") from None
    OmegaConf.set_readonly(cfg, False)
    from .schema import validate

    validate(name, cfg)  # types and ranges: a bad value is one line naming its key
    return cfg
