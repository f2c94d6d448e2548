"""A Ray run's identity and storage without a cluster: ``ray.storage_path`` may be a path or a URI that
pyarrow opens (an object store in production, ``file://`` here), and a second launch with other sites into
the same run is refused in one line unless it says ``resume=``."""

from pathlib import Path

import pytest

from raycxr.config import compose
from raycxr.ray.launch import IDENTITY_FILE, claim_run, run_location
from raycxr.sites.config import SiteConfig


def sites(root: Path, *names: str) -> dict[str, SiteConfig]:
    return {n: SiteConfig.from_dict({"name": n, "adapter": "manifest", "root": n}, data_root=root) for n in names}


@pytest.mark.parametrize("uri", [False, True])
def test_storage_path_may_be_a_uri_and_a_changed_relaunch_is_refused(tmp_path, uri):
    store = tmp_path / "store"
    spec = f"file://{store}" if uri else str(store)
    cfg = compose("pretrain", [f"out={tmp_path / 'run'}", f"ray.storage_path={spec}"])
    name, storage = run_location(cfg)
    assert name.startswith("run-") and (storage == spec if uri else storage == store.resolve())
    claim_run(cfg, sites(tmp_path, "nih"), name, storage)
    assert (store / name / IDENTITY_FILE).is_file()
    claim_run(cfg, sites(tmp_path, "nih"), name, storage)  # the same launch again: its own run, resumed
    with pytest.raises(ValueError, match=r"started with other settings \(sites: .*pass resume="):
        claim_run(cfg, sites(tmp_path, "nih", "siim"), name, storage)
    cfg.resume = str(tmp_path / "run")
    claim_run(cfg, sites(tmp_path, "nih", "siim"), name, storage)  # said explicitly: allowed


def test_the_default_run_name_and_storage_come_from_out(tmp_path):
    a = run_location(compose("pretrain", [f"out={tmp_path / 'a'}"]))
    b = run_location(compose("pretrain", [f"out={tmp_path / 'b' / 'a'}"]))
    assert a[0] != b[0] and a[1] == (tmp_path / "a" / "ray").resolve()
