"""raycxr on a real multi-node Ray cluster (``tests/ray_cluster.py``: a head, two labelled nodes and a plain
node standing in for a GPU node, on this machine): sites placed on their nodes, each resolving its data
root there; a site no node can hold failing by name; a site's node lost and back; a second run with
another ``out`` not resuming the first; a Train worker's node lost mid-run and the run resumed on a new
node; ``raycxr tune`` (a trial as a Train run) and ``raycxr study runner=ray`` completing on the same cluster.

One cluster for the module (starting one costs ~20 s); the kill test, the Tune trial and the study's Ray
cells were separate clusters before (tests/test_ray_plane.py, test_tune.py, test_study.py).
"""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from conftest import TUNE_TINY  # noqa: E402
from ray_cluster import start_cluster, stop_cluster  # noqa: E402

from raycxr.config import compose  # noqa: E402
from raycxr.ray.actor import PlacementError  # noqa: E402
from raycxr.ray.launch import start_site_pools, start_site_replicas  # noqa: E402
from raycxr.ray.runner import ActorData, run_pretrain_ray  # noqa: E402
from raycxr.sites.config import DATA_ROOT_ENV  # noqa: E402
from raycxr.train.local import select_sites  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def roots(small_corpus, tmp_path_factory):
    """Two data roots: the driver's holds siim only; the nih node's own (``$RAYCXR_DATA_ROOT``) holds nih."""
    driver, node = tmp_path_factory.mktemp("driver_root"), tmp_path_factory.mktemp("nih_node_root")
    (driver / "siim").symlink_to(small_corpus / "siim")
    (node / "nih").symlink_to(small_corpus / "nih")
    return {"driver": driver, "nih_node": node}


# the GPU node's stand-in: no site label, and the only node with TRAIN_CPUS logical CPUs, so that a Train
# worker asking for them (ray.cpus_per_worker) runs there
TRAIN_CPUS = 3
TRAIN_NODE = {"num_cpus": TRAIN_CPUS, "object_store_memory": 100 * 2**20}


def nih_node_args(roots) -> dict:
    return {"num_cpus": 1, "labels": {"site": "nih"}, "env_vars": {DATA_ROOT_ENV: str(roots["nih_node"])},
            "object_store_memory": 100 * 2**20}


@pytest.fixture(scope="module")
def cluster(roots):
    c = start_cluster([nih_node_args(roots),
                       {"num_cpus": 1, "labels": {"site": "siim"}, "object_store_memory": 100 * 2**20},
                       TRAIN_NODE], head_cpus=2)
    yield c
    stop_cluster(c)


@pytest.fixture
def sites_dir(tmp_path):
    """nih and siim pinned to their labelled nodes, both with a relative root."""
    d = tmp_path / "sites"
    d.mkdir()
    for n in ("nih", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n,
                                                     "placement": {"label_selector": {"site": n}}}))
    return d


def base(sites_dir, roots) -> list[str]:
    return [f"sites.sites_dir={sites_dir}", f"sites.data_root={roots['driver']}", "image_size=32", "batch_size=4"]


def stop(*groups) -> None:
    """Kill a test's actors (pools of handles, or dicts of them), so that they do not restart later."""
    for g in groups:
        for x in g.values():
            for a in x if isinstance(x, list) else [x]:
                ray.kill(a, no_restart=True)


def labelled_node(label: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and (n.get("Labels") or {}).get("site") == label)


def test_site_actors_run_on_their_labelled_nodes_and_read_their_own_data_root(cluster, sites_dir, roots, tmp_path):
    """Replicas and pools sit on their site's node; nih's relative root resolves against that node's
    ``$RAYCXR_DATA_ROOT`` (the driver's data root has no nih), siim's against the driver's. With the decode
    cache a training batch crosses the wire as the stored uint16 pixels (int16 bits), for the trainer to
    augment on its device."""
    cfg = compose("pretrain", [*base(sites_dir, roots), "ray.site_replicas=auto", "transforms.cache.enabled=true",
                               f"transforms.cache.dir={tmp_path / 'cache'}"])
    sites = select_sites(cfg)
    pools = start_site_replicas(cfg, sites, "t-place")
    scalers = start_site_pools(cfg, sites, "t-place", pools)
    for n in ("nih", "siim"):
        assert ray.get(pools[n][0].node.remote()) == labelled_node(n)
        assert ray.get(scalers[n].node.remote()) == labelled_node(n)
        assert ray.get(pools[n][0].info.remote())["images"] == 24
    assert ray.get(pools["nih"][0].batch.remote([0, 1], train=False))["image"].shape == (2, 1, 32, 32)
    raw = ray.get(pools["nih"][0].batch.remote([0, 1]))
    assert raw["image"].dtype == torch.int16 and raw["image"].shape == (2, 1, 32, 32) and bool(raw["augment"].all())
    stop(pools, scalers)


def test_a_site_no_node_can_hold_fails_by_name_within_the_timeout(cluster, tmp_path, small_corpus, capsys):
    d = tmp_path / "sites"
    d.mkdir()
    (d / "vindr.yaml").write_text(yaml.safe_dump({"name": "vindr", "adapter": "manifest", "root": "vindr",
                                                  "placement": {"label_selector": {"site": "vindr"}}}))
    cfg = compose("pretrain", [f"sites.sites_dir={d}", f"sites.data_root={small_corpus}",
                               "ray.placement_timeout_s=4"])
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as e:
        start_site_replicas(cfg, select_sites(cfg), "t-nowhere")
    assert time.monotonic() - t0 < 15
    msg = str(e.value)
    assert "\n" not in msg and "site vindr: no node with site=vindr within 4 s" in msg
    assert "site=nih" in msg and "site=siim" in msg  # the labels the cluster has
    assert "site vindr: waiting for a node with site=vindr" in capsys.readouterr().err  # said while it waited


def test_a_sites_node_lost_and_back_its_pool_is_rebuilt_and_serves(cluster, sites_dir, roots):
    """nih autoscaled (``site_replicas: auto``): its node is removed, so its replica and its pool actor go.
    While no nih node is there, a pass fails by name within the timeout; once a new nih node joins, the
    pool and the replica are rebuilt there and the same stream serves every image again."""
    cfg = compose("pretrain", [*base(sites_dir, roots), "site_names=[nih]", "ray.site_replicas=auto"])
    sites = select_sites(cfg)
    pools = start_site_replicas(cfg, sites, "t-lost")
    scalers = start_site_pools(cfg, sites, "t-lost", pools)
    data = ActorData(cfg, {"nih": pools["nih"][0]}, 0, 1, replicas=pools, scalers=scalers, sites=sites)
    stream = data.union_loader()
    stream.drop_last = False
    n = ray.get(pools["nih"][0].num_items.remote(data.union_names))
    seen = [i for b in stream for i in b["image_id"]]
    assert len(seen) == len(set(seen)) == n
    old = labelled_node("nih")
    cluster.remove_node(next(x for x in cluster.worker_nodes if x.node_id == old))
    stream.timeout_s = 3
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="site nih: no node with site=nih within 3 s"):
        list(stream)
    assert time.monotonic() - t0 < 15
    cluster.add_node(**nih_node_args(roots))
    stream.timeout_s = 120
    seen = [i for b in stream for i in b["image_id"]]
    assert len(seen) == len(set(seen)) == n
    new = labelled_node("nih")
    assert new != old and ray.get(pools["nih"][0].node.remote()) == new
    assert ray.get(scalers["nih"].node.remote()) == new
    assert any(h["reason"] == "restarted" for h in ray.get(scalers["nih"].log.remote()))
    stop(pools, scalers)


def test_a_second_run_with_another_out_does_not_resume_the_first(cluster, sites_dir, roots, tmp_path, monkeypatch):
    """Both runs on the defaults (no ray.run_name, no ray.storage_path): the second, with other sites and
    another out, trains its own epoch from position 0; the first's out with other sites is refused."""
    monkeypatch.chdir(tmp_path)  # the defaults' relative paths land here
    common = [*base(sites_dir, roots), "runner=ray", "method=mixed", "baseline.epochs=1", "max_steps_per_epoch=2",
              "val.enabled=false", "probe_size=0", "ray.site_replicas=1"]
    first = run_pretrain_ray(compose("pretrain", [*common, "site_names=[nih]", "out=runs/a"]))
    assert [h["position"] for h in first["history"]] == [0] and first["run_name"].startswith("a-")
    second = run_pretrain_ray(compose("pretrain", [*common, "site_names=[siim]", "out=runs/b"]))
    assert [h["position"] for h in second["history"]] == [0] and second["run_name"] != first["run_name"]
    assert (tmp_path / "runs/b/checkpoint.pt").is_file() and second["checkpoint"].endswith("runs/b/checkpoint.pt")
    assert json.loads((tmp_path / "runs/b/ray" / second["run_name"] / "raycxr_run.json").read_text())["sites"].keys() \
        == {"siim"}
    # the first run's out again, with other sites: refused before anything starts, saying what changed
    with pytest.raises(ValueError, match=r"other settings \(sites: \{'nih': .*\} -> \{'siim': .*\}\); pass resume="):
        run_pretrain_ray(compose("pretrain", [*common, "site_names=[siim]", "out=runs/a"]))


def _positions(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["position"] for line in path.read_text().splitlines() if line.strip()]


def _wait_for(cond, timeout: float = 240.0) -> None:
    """Wait for a run to get somewhere (start-up on a loaded machine can be slow); not an assertion."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.05)


def test_a_train_workers_node_lost_and_a_site_actor_killed_the_run_resumes(cluster, sites_dir, roots, tmp_path):
    """Ark, 3 rounds over nih and siim (each on its labelled node). After the first site-epoch nih's actor is
    killed (Ray restarts it; its in-flight requests are retried); after the second the Train worker's node
    is removed: Train restarts the worker group on the spare node (added here, the only other node that
    fits the worker) from the last checkpoint, and every position is trained once (one at most twice: the
    unit in flight). The spare joins before the run: ``Cluster.add_node`` works from the main thread only."""
    from ray._private.state import actors as actor_table  # the GCS table: the State API needs the dashboard

    out = tmp_path / "run"
    cfg = compose("pretrain", [*base(sites_dir, roots), "runner=ray", "method=ark", "ark.rounds=3", "ark.proj_dim=16",
                               "max_steps_per_epoch=3", "val.enabled=false", "probe_size=0", f"out={out}",
                               f"ray.storage_path={tmp_path / 'store'}", "ray.run_name=t-kill", "ray.max_failures=2",
                               "ray.site_replicas=1", f"ray.cpus_per_worker={TRAIN_CPUS}"])
    metrics = out / "metrics.jsonl"
    seen: dict = {}
    spare = cluster.add_node(**TRAIN_NODE)
    cluster.wait_for_nodes()

    def killer() -> None:
        try:
            _wait_for(lambda: len(_positions(metrics)) >= 1)
            ray.kill(ray.get_actor("t-kill/nih", namespace="raycxr"), no_restart=False)
            seen["actor_killed_at"] = max(_positions(metrics))
            _wait_for(lambda: 1 in _positions(metrics))
            (worker,) = [a for a in actor_table(actor_state_name="ALIVE").values()
                         if a["ActorClassName"] == "RayTrainWorker"]
            node = next(x for x in cluster.worker_nodes if x.node_id == worker["Address"]["NodeID"])
            seen["worker_killed_at"], seen["node"] = max(_positions(metrics)), node.node_id
            cluster.remove_node(node)
        except Exception as e:  # reported by the assertions below
            seen["error"] = repr(e)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = run_pretrain_ray(cfg)
    thread.join(timeout=10)
    print(f"kills: {seen}, positions logged: {_positions(metrics)}")
    assert "error" not in seen, seen
    assert seen["actor_killed_at"] < 5 and seen["worker_killed_at"] < 5  # both landed mid-run
    p = _positions(metrics)
    assert sorted(set(p)) == list(range(6))  # every (round, site) position trained
    assert p.count(0) == 1 and len(p) - len(set(p)) <= 1  # continued from the checkpoint, not from scratch
    assert [x for i, x in enumerate(p) if x not in p[:i]] == list(range(6))
    assert {(h["round"], h["site"]) for h in res["history"]} == {(r, s) for r in range(3) for s in ("nih", "siim")}
    # the worker's node is gone; the worker group that finished the run ran on the other one
    (left,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU") == TRAIN_CPUS]
    assert left != seen["node"] and left in {spare.node_id, *[x.node_id for x in cluster.worker_nodes]}
    assert left in {a["Address"]["NodeID"] for a in actor_table().values() if a["ActorClassName"] == "RayTrainWorker"}
    # the restarted site actor, still on its labelled node, serves again and kept the heads handed back
    state = [a for a in actor_table().values() if a["Name"] == "t-kill/nih" and a["State"] == "ALIVE"]
    assert len(state) == 1 and state[0]["NumRestarts"] >= 1
    nih = res["actors"]["nih"]
    assert ray.get(nih.node.remote()) == labelled_node("nih")
    assert ray.get(nih.batch.remote([0, 1], train=False))["image"].shape == (2, 1, 32, 32)
    assert ray.get(nih.get_head.remote())["version"] == 6
    stop(res["replicas"])


def test_a_tune_trial_as_a_train_run_completes_on_the_cluster(cluster, val_sites, tmp_path):
    """``raycxr tune`` with ``tune.trial_runner=ray``: the trial fits a TorchTrainer fed by its own site
    actors and reports to Tune; its Train run frees its workers when it ends."""
    from raycxr.tune import run_tune

    free = ray.available_resources().get("CPU", 0)
    try:
        res = run_tune(compose("tune", [*TUNE_TINY, *val_sites, "tune.lam=[0.5]", "tune.n_experts=[2]",
                                        "tune.lr=[1e-4]", f"tune.storage_path={tmp_path}", "tune.name=tr",
                                        "tune.trial_runner=ray"]))
        (row,) = res["rows"]
        assert row["epochs_run"] == 2 and row["error"] == "" and row["best_val_auc"] == row["best_val_auc"]  # not NaN
        ck = Path(row["last_checkpoint"])  # the Train run's checkpoint, under the sweep's folder
        assert tmp_path / "tr" / "train" in ck.parents and (ck / "checkpoint.pt").is_file()
        log = [json.loads(line) for line in open(tmp_path / "tr" / "runs" / row["trial"] / "metrics.jsonl")]
        assert [r["stage"] for r in log if r["position"] >= 0] == ["conquer", "divide"]
        # a trial Tune stops mid-fit would keep its workers reserved (no State API here): wait for them back
        t0 = time.monotonic()
        while ray.available_resources().get("CPU", 0) < free and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == free
    finally:
        shutil.rmtree(tmp_path / "tr", ignore_errors=True)  # ~0.8 GB of Train checkpoints


def test_a_study_runs_its_cells_as_ray_tasks_on_the_cluster(cluster, tmp_path):
    """``raycxr study runner=ray`` joins the running cluster (it does not start its own) and runs every cell."""
    from test_study import tiny

    from raycxr.study import run_study

    res = run_study(tiny(tmp_path / "s", tmp_path / "data", runner="ray", cpus_per_cell=1))
    assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 4  # still the module's cluster
    keys = sorted(json.loads(p.read_text())["key"] for p in (tmp_path / "s" / "cells").rglob("cell.json"))
    assert keys == ["embed/mixed", "embed/random", "ft/mixed/1/0", "ft/random/1/0", "lp/mixed/1/0", "lp/random/1/0",
                    "pretrain/mixed"]
    assert res["pretraining"]["mixed"]["steps"] == 2 and sorted(res["table"]) == ["ft/mixed/1", "ft/random/1",
                                                                                  "lp/mixed/1", "lp/random/1"]
    assert (tmp_path / "s" / "report.md").is_file()
