"""``raycxr cluster check`` on a real labelled multi-node Ray cluster (tests/ray_cluster.py)."""

import pytest
import yaml

from raycxr.cluster import placement_problems, selector_matches
from raycxr.config import compose

pytestmark = pytest.mark.ray


def test_selector_expressions_follow_rays_syntax():
    assert selector_matches("nih", "nih") and not selector_matches("nih", "vindr")
    assert not selector_matches("nih", None)  # a node without the label is not a match
    assert selector_matches("!nih", "vindr") and selector_matches("!nih", None) and not selector_matches("!nih", "nih")
    assert selector_matches("in(nih, vindr)", "vindr") and not selector_matches("in(nih,vindr)", "siim")
    assert selector_matches("!in(nih,vindr)", "siim") and not selector_matches("!in(nih,vindr)", "nih")
    node = {"Labels": {"site": "nih"}, "Resources": {"CPU": 1.0}}
    assert placement_problems({"label_selector": {"site": "nih"}}, node) == []
    assert placement_problems({"label_selector": {"site": "vindr"}, "resources": {"site_vindr": 0.001}}, node) == [
        "label site=vindr wanted, node has site=nih", "resource site_vindr: 0.001 wanted, node has 0"]


def test_no_cluster_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("a driver is connected in this process")
    from raycxr.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ov = _sites(tmp_path, {"nih": {}})
    assert main(["cluster", "check", *ov, "ray.address=127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raycxr cluster: no Ray cluster at ray.address=127.0.0.1:1") and "ray start --head" in err


@pytest.fixture(scope="module")
def cluster():
    import os

    from ray_cluster import start_cluster, stop_cluster

    # a raylet waits 15 s for its dashboard agent's ports: a loaded 2-core machine starts the agent slower
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")

    c = start_cluster([])
    for labels in ({"site": "nih"}, {"site": "vindr"}):
        for attempt in range(2):  # a raylet has Ray's fixed 30 s to register: a loaded 2-core machine can miss it
            try:
                c.add_node(num_cpus=1, labels=labels)
                break
            except Exception:
                if attempt:
                    raise
    c.wait_for_nodes()
    yield c
    stop_cluster(c)


def _sites(tmp_path, placements):
    """Site files only: the check reads placements, not images, so the sites need no corpus."""
    d = tmp_path / "sites"
    d.mkdir(exist_ok=True)
    for name, placement in placements.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "adapter": "manifest", "root": name,
                                                        "placement": placement}))
    return [f"sites.sites_dir={d}", f"sites.data_root={tmp_path}"]


def test_cluster_check_reports_nodes_placement_and_shared_storage(cluster, tmp_path, capsys):
    from raycxr.cli import main

    ov = _sites(tmp_path, {"nih": {"label_selector": {"site": "nih"}},
                                         "vindr": {"label_selector": {"site": "in(vindr,padchest)"}},
                                         "siim": {}})
    out, storage = tmp_path / "run", tmp_path / "shared" / "ray"
    assert main(["cluster", "check", *ov, f"out={out}", f"ray.storage_path=file://{storage}"]) == 0
    text = capsys.readouterr().out
    import ray

    n = len([x for x in ray.nodes() if x["Alive"]])
    assert f"{n} alive" in text and "site=nih" in text and "site=vindr" in text
    assert "shared out" in text and f"shared ray.storage_path = file://{storage}" in text and "ready" in text
    assert not list(storage.iterdir())  # the probe files are removed afterwards

    from raycxr.cluster import check_cluster

    report = check_cluster(compose("pretrain", [*ov, f"out={out}"]), storage=False)
    nih_node = next(n["id"][:8] for n in report["nodes"] if n["labels"] == {"site": "nih"})
    assert nih_node in report["sites"]["nih"]["nodes"] and all(  # the labelled node(s) only
        x["labels"] == {"site": "nih"} for x in report["nodes"] if x["id"][:8] in report["sites"]["nih"]["nodes"])
    assert len(report["sites"]["siim"]["nodes"]) == n  # no placement: anywhere


def test_an_unmatched_selector_is_reported_unplaceable_with_the_reason(cluster, tmp_path, capsys):
    from raycxr.cli import main

    ov = _sites(tmp_path, {"nih": {"label_selector": {"site": "nih"}},
                                         "padchest": {"label_selector": {"site": "padchest"}}})
    assert main(["cluster", "check", *ov, f"out={tmp_path / 'run'}", f"ray.storage_path={tmp_path / 'ray'}"]) == 1
    text = capsys.readouterr().out
    assert "NO" in text and "no node has label site=padchest" in text and "nih, vindr" in text
    assert "not ready" in text


def test_storage_that_nodes_do_not_share_fails(cluster, tmp_path):
    """pyarrow's mock:// file system lives in one process: what one node's task writes, another node's
    task cannot read, the way two nodes' local disks behave. And a path no node can write fails too."""
    import ray

    from raycxr.cluster import check_storage

    nodes = [n for n in ray.nodes() if n["Alive"]]
    c = check_storage("ray.storage_path", "mock:///runs", nodes)
    n = len(nodes)
    assert not c.shared and c.nodes == n >= 3
    assert sum("does not see what that node wrote" in p for p in c.problems) == n * (n - 1)  # each reader, each writer
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    c = check_storage("out", str(blocker / "run"), nodes)
    assert not c.shared and sum("cannot write" in p for p in c.problems) == n
