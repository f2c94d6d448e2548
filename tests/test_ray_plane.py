"""The Ray plane on a real local cluster (kept to one run pair: each TorchTrainer costs ~25 s)."""

import json
import os
import signal
import threading
import time

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from raycxr.config import compose  # noqa: E402
from raycxr.train.ray_runner import ActorStream, merge_batches, run_pretrain_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def test_merge_batches_and_stream_sharding():
    a = {"image": torch.zeros(2, 1), "image_id": ["a", "b"]}
    b = {"image": torch.ones(1, 1), "image_id": ["c"]}
    m = merge_batches([a, None, b])
    assert m["image"].shape == (3, 1) and m["image_id"] == ["a", "b", "c"]
    assert merge_batches([None]) is None
    s0 = ActorStream([None, None], [10, 7], 4, seed=0, rank=0, world=2)
    s1 = ActorStream([None, None], [10, 7], 4, seed=0, rank=1, world=2)
    c0, c1 = s0._chunks(), s1._chunks()
    assert len(c0) == len(c1) == 2  # 17 items -> 4 full batches, split evenly
    seen = [tuple(p) for c in c0 + c1 for p in c]
    assert len(seen) == len(set(seen)) == 16


@pytest.mark.ray
def test_ark_on_two_train_workers_hands_heads_back_and_resumes(cluster, small_corpus, tmp_path):
    d = tmp_path / "sites"
    d.mkdir()
    # a relative data root must still resolve inside the actors (their working directory differs)
    for n in ("nih", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    base = ["runner=ray", "method=ark", f"sites.sites_dir={d}", f"sites.data_root={os.path.relpath(small_corpus)}",
            "image_size=64", "batch_size=4", "ark.proj_dim=16", f"out={tmp_path / 'run'}",
            f"ray.storage_path={tmp_path / 'store'}", "ray.num_workers=2", "ray.run_name=t-ark",
            "max_steps_per_epoch=2", "ray.site_replicas=auto", "ray.autoscale.max=2", "ray.autoscale.every=1"]
    res = run_pretrain_ray(compose("pretrain", [*base, "ark.rounds=1"]))
    assert [h["site"] for h in res["history"]] == ["nih", "siim"]
    assert all(0 < h["data_wait_s"] <= h["seconds"] for h in res["history"])  # waited for the actors, logged
    # every site autoscaled: each pool decided on both workers' windows, within its bounds, and logged it
    log = json.loads((tmp_path / "run" / "autoscale.json").read_text())
    assert set(log) == {"nih", "siim"} and all(d and all(1 <= x["replicas"] <= 2 for x in d) for d in log.values())
    assert res["ray_checkpoint"] is not None and res["metrics"]["site"] == "siim"
    head = ray.get(res["actors"]["nih"].get_head.remote())
    assert head["version"] == 2 and head["state"]["weight"].shape == (14, 16)
    # the same run name again with one more round: Ray hands back the checkpoint and the run continues
    res = run_pretrain_ray(compose("pretrain", [*base, "ark.rounds=2"]))
    positions = [json.loads(line)["position"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert positions == [0, 1, 2, 3]
    assert ray.get(res["actors"]["siim"].get_head.remote())["version"] == 4


def _positions(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["position"] for line in path.read_text().splitlines() if line.strip()]


def _wait_for(cond, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.05)


@pytest.mark.ray
def test_killed_site_actor_and_train_worker_the_run_continues(cluster, small_corpus, tmp_path):
    """Kill a site actor after the first site-epoch and the Train worker after the second: Ray restarts
    the actor (its in-flight batch requests are retried), Train restarts the worker group from the last
    checkpoint, and the run ends with every position once (one at most twice: the epoch in flight)."""
    # the GCS actor table: ray.util.state would need the dashboard, which these test clusters leave off
    from ray._private.state import actors as actor_table

    d = tmp_path / "sites"
    d.mkdir()
    for n in ("nih", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    out = tmp_path / "run"
    cfg = compose("pretrain", ["runner=ray", "method=ark", "ark.rounds=3", f"sites.sites_dir={d}",
                               f"sites.data_root={small_corpus}", "image_size=64", "batch_size=4", "ark.proj_dim=16",
                               "max_steps_per_epoch=3", "val.enabled=false", f"out={out}",
                               f"ray.storage_path={tmp_path / 'store'}", "ray.run_name=t-kill", "ray.max_failures=2"])
    metrics = out / "metrics.jsonl"
    seen: dict = {}

    def killer() -> None:
        try:
            _wait_for(lambda: len(_positions(metrics)) >= 1)
            ray.kill(ray.get_actor("t-kill/nih", namespace="raycxr"), no_restart=False)
            seen["actor_killed_at"] = max(_positions(metrics))
            _wait_for(lambda: 1 in _positions(metrics))
            workers = [a for a in actor_table(actor_state_name="ALIVE").values()
                       if a["ActorClassName"] == "RayTrainWorker"]
            seen["worker_killed_at"], seen["pid"] = max(_positions(metrics)), workers[0]["Pid"]
            os.kill(workers[0]["Pid"], signal.SIGKILL)
        except Exception as e:  # reported by the assertions below
            seen["error"] = repr(e)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = run_pretrain_ray(cfg)
    thread.join(timeout=10)
    print(f"kills: {seen}, positions logged: {_positions(metrics)}")
    assert "error" not in seen, seen
    assert seen["actor_killed_at"] < 5 and seen["worker_killed_at"] < 5  # both kills landed mid-run
    p = _positions(metrics)
    assert sorted(set(p)) == list(range(6))  # every (round, site) position trained
    assert p.count(0) == 1 and len(p) - len(set(p)) <= 1  # continued from the checkpoint, not from scratch
    firsts = [x for i, x in enumerate(p) if x not in p[:i]]
    assert firsts == list(range(6))
    assert {(h["round"], h["site"]) for h in res["history"]} == {(r, s) for r in range(3) for s in ("nih", "siim")}
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)  # the worker that finished the run was a new one
    # the restarted site actor serves batches again and kept the heads handed back after its restart
    nih = res["actors"]["nih"]
    state = [a for a in actor_table().values() if a["Name"] == "t-kill/nih" and a["State"] == "ALIVE"]
    assert len(state) == 1 and state[0]["NumRestarts"] >= 1
    assert ray.get(nih.batch.remote([0, 1]))["image"].shape == (2, 1, 64, 64)
    assert ray.get(nih.get_head.remote())["version"] == 6
