"""The Ray plane on a real local cluster (kept to one run pair: each TorchTrainer costs ~25 s). A killed site
actor and a Train worker's lost node: tests/test_cluster.py (the multi-node cluster)."""

import json
import os

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from raycxr.config import compose  # noqa: E402
from raycxr.ray.runner import ActorStream, merge_batches, run_pretrain_ray  # noqa: E402


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
