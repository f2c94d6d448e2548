"""A site served by two replicas on a real local Ray cluster (no Train run: the actors and the stream only)."""

import time

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from raycxr.config import compose  # noqa: E402
from raycxr.ray.launch import (  # noqa: E402
    replica_policy,
    site_replicas,
    start_site_actors,
    start_site_pools,
    start_site_replicas,
)
from raycxr.ray.runner import ActorData  # noqa: E402
from raycxr.sites.config import SiteConfigError  # noqa: E402
from raycxr.train.local import select_sites  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def site_dir(tmp_path, small_corpus, replicas=None):
    d = tmp_path / "sites"
    d.mkdir(exist_ok=True)
    spec = {"name": "vindr", "adapter": "manifest", "root": str(small_corpus / "vindr")}
    if replicas is not None:
        spec["replicas"] = replicas
    (d / "vindr.yaml").write_text(yaml.safe_dump(spec))
    return d


def test_replicas_come_from_the_site_yaml_or_the_run(tmp_path, small_corpus):
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus)}", "ray.site_replicas=3"])
    assert site_replicas(cfg, select_sites(cfg)["vindr"]) == 3
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, 2)}", "ray.site_replicas=3"])
    assert site_replicas(cfg, select_sites(cfg)["vindr"]) == 2
    with pytest.raises(SiteConfigError, match="replicas must be a positive integer"):
        select_sites(compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, 0)}"]))
    # autoscaled: `auto` takes the run's bounds, {min, max} its own; a fixed count has no policy
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, 'auto')}", "ray.autoscale.max=3"])
    site = select_sites(cfg)["vindr"]
    assert site_replicas(cfg, site) == 1 and replica_policy(cfg, site).max_replicas == 3
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, {'min': 2, 'max': 5})}"])
    p = replica_policy(cfg, select_sites(cfg)["vindr"])
    assert (p.min_replicas, p.max_replicas) == (2, 5) and site_replicas(cfg, select_sites(cfg)["vindr"]) == 2
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, 2)}", "ray.site_replicas=auto"])
    assert replica_policy(cfg, select_sites(cfg)["vindr"]) is None  # the site's own count wins
    with pytest.raises(SiteConfigError, match="min must not exceed max"):
        select_sites(compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, {'min': 3, 'max': 2})}"]))
    with pytest.raises(ValueError, match="ray.site_replicas must be"):
        site_replicas(compose("pretrain", ["ray.site_replicas=0"]), site)


@pytest.mark.ray
def test_two_replicas_serve_disjoint_complete_batches_and_share_the_decode_cache(cluster, tmp_path, small_corpus):
    # augment=host: each replica draws its own augmentation (with device, the default, the trainer draws)
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, 2)}", "image_size=32",
                               "batch_size=3", "ray.prefetch=2", "transforms.cache.enabled=true",
                               f"transforms.cache.dir={tmp_path / 'cache'}", "transforms.augment=host"])
    pools = start_site_replicas(cfg, select_sites(cfg), "t-replicas")
    assert len(pools["vindr"]) == 2
    # the single-actor entry point (federated mode, Tune) still gives the site's named actor, replica 0
    assert start_site_actors(cfg, select_sites(cfg), "t-replicas")["vindr"]._actor_id == pools["vindr"][0]._actor_id
    data = ActorData(cfg, {"vindr": pools["vindr"][0]}, 0, 1, replicas=pools)
    n = ray.get(pools["vindr"][0].num_items.remote(data.union_names))
    stream = data.union_loader()
    stream.drop_last = False
    seen: list[str] = []
    for b in stream:
        assert b["image"].shape[1:] == (1, 32, 32) and b["image"].dtype == torch.float32
        seen += b["image_id"]
    assert len(seen) == len(set(seen)) == n  # every image once: disjoint and complete
    by_replica = [sorted(i for _, r, idx in stream.served if r == k for i in idx) for k in (0, 1)]
    assert by_replica[0] and by_replica[1] and not set(by_replica[0]) & set(by_replica[1])
    assert sorted(by_replica[0] + by_replica[1]) == list(range(n))
    stats = ray.get([a.stats.remote() for a in pools["vindr"]])
    assert [s["served"] for s in stats] == [len(by_replica[0]), len(by_replica[1])]
    # the two processes filled one cache: each image decoded once, then a second epoch only hits
    assert sum(s["cache"]["misses"] for s in stats) == n
    list(stream)
    stats = ray.get([a.stats.remote() for a in pools["vindr"]])
    assert sum(s["cache"]["misses"] for s in stats) == n and sum(s["cache"]["hits"] for s in stats) == n
    # a consumer that stops early (max_steps_per_epoch) leaves nothing counted as in flight
    it = iter(stream)
    next(it)
    assert sum(stream.inflight[0]) > 0
    it.close()
    assert stream.inflight == [[0, 0]]
    # replicas draw different augmentations of the same image; the evaluation view is the same
    kw = {"union_names": data.union_names}
    a, b = ray.get([p.batch.remote([0], **kw) for p in pools["vindr"]])
    assert not torch.equal(a["image"], b["image"])
    a, b = ray.get([p.batch.remote([0], train=False, **kw) for p in pools["vindr"]])
    assert torch.equal(a["image"], b["image"])


@pytest.mark.ray
def test_an_autoscaled_site_grows_when_its_consumer_waits(cluster, tmp_path, small_corpus):
    """A consumer that only takes batches waits for every one: the pool adds replicas up to its max, the new
    replica serves, and every image still comes exactly once."""
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, {'min': 1, 'max': 2})}",
                               "image_size=32", "batch_size=2", "ray.prefetch=1", "ray.autoscale.every=2"])
    sites = select_sites(cfg)
    pools = start_site_replicas(cfg, sites, "t-auto")
    assert len(pools["vindr"]) == 1
    scalers = start_site_pools(cfg, sites, "t-auto", pools)
    data = ActorData(cfg, {"vindr": pools["vindr"][0]}, 0, 1, replicas=pools, scalers=scalers)
    stream = data.union_loader()
    stream.drop_last = False
    n = ray.get(pools["vindr"][0].num_items.remote(data.union_names))
    served: set[int] = set()
    deadline = time.monotonic() + 120  # a pass takes well under a second; a new replica's process seconds
    while True:  # passes until the new replica is up, has served and its step up was judged
        seen = [i for b in stream for i in b["image_id"]]
        assert len(seen) == len(set(seen)) == n  # every pass: every image exactly once, whatever the pool did
        log = ray.get(scalers["vindr"].log.remote())
        served |= {r for _, r, _ in stream.served}
        if served == {0, 1} and any(h["reason"] in ("hold", "no gain") for h in log[1:]):
            break
        assert time.monotonic() < deadline, log[-3:]
    assert log[0]["was"] == 1 and log[0]["replicas"] == 2 and log[0]["wait_frac"] > 0.1 and log[0]["reason"] == "up"
    assert len(stream.pools[0]) == 2 and served == {0, 1}  # the new replica served
    # kept when the pass got >= 10 % faster (it should on 2 idle cores), else undone: the stream follows the pool
    undone = any(h["reason"] == "no gain" for h in log)
    assert stream.active == ([1] if undone else [2]) and stream.prefetch == stream.active[0]


@pytest.mark.ray
def test_an_autoscaling_window_spans_passes_without_the_pause_between_them(cluster, tmp_path, small_corpus):
    """A site whose pass is shorter than a window still reports (the window runs on into the next pass),
    and the consumer's time between passes (validation, checkpoints) is not counted as the site's."""
    cfg = compose("pretrain", [f"sites.sites_dir={site_dir(tmp_path, small_corpus, {'min': 1, 'max': 1})}",
                               "image_size=32", "batch_size=2", "ray.prefetch=1"])
    sites = select_sites(cfg)
    pools = start_site_replicas(cfg, sites, "t-window")
    scalers = start_site_pools(cfg, sites, "t-window", pools)
    data = ActorData(cfg, {"vindr": pools["vindr"][0]}, 0, 1, replicas=pools, scalers=scalers)
    stream = data.union_loader()
    per_pass = len(stream)
    stream.scale_every = per_pass + 1  # a window needs more batches than one pass has
    list(stream)  # the datasets are built in the actor on the first pass
    assert ray.get(scalers["vindr"].log.remote()) == []  # one pass: no window complete yet
    t0 = time.perf_counter()
    list(stream)
    pass_s = time.perf_counter() - t0
    time.sleep(1.5 + 2 * pass_s)  # the consumer's pause between passes
    list(stream)
    log = ray.get(scalers["vindr"].log.remote())
    assert len(log) >= 1  # reported across the pass boundary
    assert log[0]["window_s"] < 1.5 + 2 * pass_s  # the pause was left out of the window
