"""Config errors reach users as one line naming the key or the file, never a traceback."""

import pytest
import torch

from raycxr.checkpoint import Checkpoint
from raycxr.cli import main
from raycxr.config import compose
from raycxr.schema import SCHEMAS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_config_matches_its_schema(name):
    compose(name, [])  # a key the YAML has and the schema lacks (or the reverse) fails here


@pytest.mark.parametrize("override,message", [
    ("image_size=-5", "image_size: must be >= 1, got -5"),
    ("baseline.epochs=two", "baseline.epochs: 'two' is not an integer"),
    ("image_size=abc", "image_size: 'abc' is not an integer"),
    ("unichest.loss.gamma_neg=x", "unichest.loss.gamma_neg: 'x' is not a float"),
    ("runner=slurm", "runner: must be one of ['local', 'ray'], got 'slurm'"),
    ("+unichest.tpyo=1", "unichest.tpyo: unknown key"),
    ("ark.ema_mode=sometimes", "ark.ema_mode: must be one of ['epoch', 'iteration']"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message, capsys):
    assert main(["pretrain", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_plugin_methods_own_section_passes():
    assert compose("pretrain", ["+mine.lr=0.1"]).mine.lr == 0.1


def test_truncated_and_interrupted_checkpoints_are_named(small_sites, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    Checkpoint(method="mixed", config={"encoder": {"name": "resnet18"}, "image_size": 64}).save(good / "checkpoint.pt")
    (good / "checkpoint.pt.tmp").write_bytes(b"")  # a save killed half-way: never read
    assert Checkpoint.load(good).method == "mixed"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": torch.zeros(1000)}, bad / "full.pt")
    (bad / "checkpoint.pt").write_bytes((bad / "full.pt").read_bytes()[:300])  # truncated zip
    for argv in (["pretrain", f"resume={bad}", *small_sites, f"out={tmp_path / 'o'}"],
                 ["export", f"run={bad}", *small_sites]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{bad / 'checkpoint.pt'} cannot be read (truncated" in err and len(err.splitlines()) == 1
    only_tmp = tmp_path / "killed"
    only_tmp.mkdir()
    (only_tmp / "checkpoint.pt.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt.tmp there is a save that was interrupted"):
        Checkpoint.load(only_tmp)


@pytest.mark.parametrize("extra,message", [
    ({"labels": {"uncertain_polcy": "ones"}}, "labels: unknown keys ['uncertain_polcy']"),
    ({"placement": {"label_selecter": {"site": "a"}}}, "placement: unknown keys ['label_selecter']"),
    ({"placement": {"label_selector": "site=a"}}, "placement.label_selector must be a mapping"),
])
def test_nested_site_yaml_typos_are_refused(extra, message):
    from raycxr.sites.config import SiteConfig, SiteConfigError

    with pytest.raises(SiteConfigError, match="site file a.yaml: " + message.replace("[", r"\[").replace("]", r"\]")):
        SiteConfig.from_dict({"name": "a", "adapter": "manifest", "root": "a", **extra}, source="a.yaml")


def yaml_disagreements(data: dict, schema: type, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Keys of a config file's values without a dataclass field, or restating a default differently."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    hints, own = typing.get_type_hints(schema), {f.name: f for f in dataclasses.fields(schema)}
    if defaults is None:  # a section's defaults come from its parent (a command may change some: demo.synth)
        defaults = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
    problems = []
    for key, value in data.items():
        if key not in own:
            problems.append(f"{prefix}{key}: no field in {schema.__name__}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            problems += yaml_disagreements(value, hints[key], f"{prefix}{key}.", defaults[key])
        elif value != defaults[key] and not own[key].metadata.get("preset"):
            problems.append(f"{prefix}{key}: the YAML says {value!r}, the dataclass default is {defaults[key]!r}")
    return problems


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_yaml_key_has_a_field_and_restates_its_default(name):
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(compose(name), resolve=False)
    assert yaml_disagreements(data, SCHEMAS[name]) == []


def test_the_yaml_check_can_fail():
    from raycxr.schema import PretrainConfig

    bad = {"image_size": 999, "ray": {"bucket_mb": 25, "bucket_mbb": 25}, "tpyo": {"x": 1}}
    assert yaml_disagreements(bad, PretrainConfig) == [
        "image_size: the YAML says 999, the dataclass default is 128",
        "ray.bucket_mbb: no field in RaySection", "tpyo: no field in PretrainConfig"]


def test_the_dataclasses_carry_each_knobs_range_once():
    from raycxr.schema import default, knobs

    assert default("ray.bucket_mb") == 25 and default("unichest.n_experts") == 4
    ranges = {key: f.metadata.get("range") for key, f, _ in knobs(SCHEMAS["pretrain"])}
    assert ranges["unichest.n_experts"] == (2, None) and ranges["ray.bucket_mb"] == (0.001, None)
    with pytest.raises(ValueError, match="unichest.n_experts: must be >= 2, got 1"):
        compose("pretrain", ["unichest.n_experts=1"])


def test_the_configs_ship_inside_the_wheel(tmp_path):
    """A wheel built from the checkout composes every command's config with no checkout on the path."""
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    (whl,) = (tmp_path / "wheel").glob("raycxr-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert {f"raycxr/configs/{n}.yaml" for n in SCHEMAS} <= set(names)
    zipfile.ZipFile(whl).extractall(tmp_path / "site")
    site = str(tmp_path / "site")
    code = ("import raycxr; from raycxr.config import compose; from raycxr.schema import SCHEMAS\n"
            f"assert raycxr.__file__.startswith({site!r}), raycxr.__file__\n"
            "print(sorted(n for n in SCHEMAS if compose(n) is not None))")
    env = {k: v for k, v in os.environ.items() if k != "RAYCXR_CONFIG_DIR"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(sorted(SCHEMAS))
