"""Federated mode: the aggregation maths by hand, FedProx's term, FedPer's local groups, DP clipping and
noise, the privacy audit, and real federations on tiny synthetic sites: dead and late sites, a site
joining between rounds, resume after a real ``kill -9`` of the driver, and ``runner=ray``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from raycxr.checkpoint import Checkpoint
from raycxr.config import compose
from raycxr.federated import SiteClient, audit_update, clip_and_noise, make_strategy, run_federate, weighted_average
from raycxr.federated.strategy import FedAvg, flatten, local_patterns, proximal_hook, split_state
from raycxr.methods import load_pretrained
from raycxr.train.local import select_sites

REPO = Path(__file__).resolve().parents[1]
SMALL = ["image_size=32", "batch_size=4", "encoder.embed_dim=16", "ark.proj_dim=16", "max_steps_per_epoch=1",
         "threads=1", "probe_size=0", "val.limit=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from raycxr.synth.generator import synthesize

    out = tmp_path_factory.mktemp("fedcorpus")
    synthesize(out, ["nih", "vindr", "siim"], n_per_site=12, seed=3, render_size=64, workers=1, progress=False)
    return out


def register(d: Path, *names: str, **extra) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n,
                                                    **extra.get(n, {})}))
    return d


def fed_cfg(corpus: Path, sites: Path, out: Path, *extra: str):
    return compose("federate", [*SMALL, f"sites.sites_dir={sites}", f"sites.data_root={corpus}", f"out={out}", *extra])


def log_rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "federate.jsonl").read_text().splitlines()]


# -- maths ------------------------------------------------------------------------------------------
def test_fedavg_weights_updates_by_samples_hand_values():
    a = {"model/w": torch.tensor([1.0, 0.0]), "model/bn.num_batches_tracked": torch.tensor(3)}
    b = {"model/w": torch.tensor([4.0, 8.0]), "model/bn.num_batches_tracked": torch.tensor(5)}
    avg = weighted_average([a, b], [1, 3])  # (1·1 + 3·4)/4 = 3.25, (0 + 3·8)/4 = 6
    assert torch.allclose(avg["model/w"], torch.tensor([3.25, 6.0]))
    assert int(avg["model/bn.num_batches_tracked"]) == 5  # integers are not averaged: the largest is kept
    s = FedAvg()
    out = s.aggregate({"nih": a, "vindr": b}, {"nih": 10, "vindr": 30})
    assert torch.allclose(out["model/w"], torch.tensor([3.25, 6.0])) and s.participation == {"nih": 1, "vindr": 1}
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([a], [0])


def test_fedprox_term_is_the_gradient_of_the_proximal_penalty():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    g = torch.randn(5)
    mu = 0.3
    x = torch.randn(5)
    # reference: autograd on f(w) + mu/2 ||w - g||^2
    ref = torch.autograd.grad((w * x).sum() + mu / 2 * (w - g).pow(2).sum(), w)[0]
    opt = torch.optim.SGD([w], lr=1.0)
    proximal_hook(opt, lambda: [(w, g)], mu)
    before = w.detach().clone()
    opt.zero_grad()
    (w * x).sum().backward()
    opt.step()  # the hook adds mu (w - g) to the gradient before the step
    assert torch.allclose(before - w.detach(), ref, atol=1e-6)
    assert make_strategy("fedprox", "mixed", mu=0.3).mu == 0.3 and make_strategy("fedavg", "mixed").mu == 0.0


def test_shared_and_local_parts_per_method_and_fedper_groups():
    state = {k: torch.zeros(1) for k in [
        "model/encoder.backbone.conv1.weight", "model/encoder.backbone.layer4.0.conv1.weight",
        "model/projector.0.weight", "model/heads.nih.weight", "teacher/encoder.backbone.conv1.weight",
        "model/query_networks.0.head.weight", "model/query_networks.1.head.weight", "model/gate.weight",
        "text_head/0.weight"]}
    shared, local = split_state(state, local_patterns("ark", share_projector=False))
    assert set(local) == {"model/projector.0.weight", "model/heads.nih.weight", "teacher/encoder.backbone.conv1.weight"}
    shared, local = split_state(state, local_patterns("unichest"))
    assert "model/query_networks.0.head.weight" in shared and "text_head/0.weight" in shared
    assert {"model/query_networks.1.head.weight", "model/gate.weight"} <= set(local)
    s = make_strategy("fedper", "mixed", local=["model/encoder.backbone.layer4.*"])
    shared, local = split_state(state, s.local)
    assert set(local) == {"model/encoder.backbone.layer4.0.conv1.weight"}
    with pytest.raises(ValueError, match="fedper needs federate.local"):
        make_strategy("fedper", "mixed")


def test_update_clipping_and_gaussian_noise():
    ref = {"w": torch.zeros(3), "n": torch.tensor(1)}
    upd = {"w": torch.tensor([3.0, 4.0, 0.0]), "n": torch.tensor(2)}  # delta norm 5
    out, info = clip_and_noise(upd, ref, clip_norm=1.0)
    assert info["norm"] == pytest.approx(5.0) and info["scale"] == pytest.approx(0.2)
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.8, 0.0])) and int(out["n"]) == 2
    out, _ = clip_and_noise(upd, ref, clip_norm=10.0)  # under the norm: unchanged
    assert torch.allclose(out["w"], upd["w"])
    big_ref, big = {"w": torch.zeros(200_000)}, {"w": torch.zeros(200_000)}
    gen = torch.Generator().manual_seed(0)
    out, _ = clip_and_noise(big, big_ref, clip_norm=0.5, noise_multiplier=2.0, generator=gen)
    assert float(out["w"].std()) == pytest.approx(1.0, rel=0.02)  # std = noise_multiplier x clip_norm
    with pytest.raises(ValueError, match="needs federate.clip_norm"):
        clip_and_noise(upd, ref, clip_norm=None, noise_multiplier=1.0)


def test_the_audit_refuses_images_paths_and_identifiers():
    clean = {"shared": {"model/encoder.backbone.conv1.weight": torch.zeros(8, 1, 7, 7)}, "meta": {"order": ["nih"]},
             "metrics": {"loss": 0.5}}
    assert audit_update(clean, image_size=32) == []
    assert "looks like images" in audit_update({"x": torch.zeros(2, 1, 32, 32)}, image_size=32)[0]
    assert "file path" in audit_update({"meta": {"src": "/data/nih/img.dcm"}}, image_size=32)[0]
    assert "identifier" in audit_update({"meta": {"note": "patient P0042"}}, image_size=32, forbidden=["P0042"])[0]


def test_client_sampling_is_seeded_by_the_round_and_respects_min_clients():
    from raycxr.federated.server import sample_sites

    sites = ["a", "b", "c", "d", "e"]
    picks = [sample_sites(sites, 0.4, 1, 0, r) for r in range(6)]
    assert all(len(p) == 2 and set(p) <= set(sites) for p in picks)
    assert picks == [sample_sites(sites, 0.4, 1, 0, r) for r in range(6)]  # a resumed round samples alike
    assert len({tuple(p) for p in picks}) > 1  # but rounds differ
    assert len(sample_sites(sites, 0.1, 3, 0, 0)) == 3 and sample_sites(sites, 1.0, 1, 0, 0) == sites
    assert sample_sites(["a"], 0.5, 4, 0, 0) == ["a"]  # never more than there are


# -- a real federation ---------------------------------------------------------------------------------
def test_ark_federation_dead_site_join_privacy_and_eval(corpus, tmp_path):
    """Round 0: nih and vindr train, a site whose data is gone is left out and logged. Between rounds siim
    is registered: it joins round 1 with the global model and a fresh head. The global encoder is the
    sample-weighted mean of the sites' trained encoders; heads stay per site; the result is a checkpoint
    that load_pretrained (eval, export) reads, and nothing a site sends carries ids or paths."""
    sites = register(tmp_path / "sites", "nih", "vindr", "gone")
    out = tmp_path / "run"
    res = run_federate(fed_cfg(corpus, sites, out, "method=ark", "rounds=1"))
    r0 = res["history"][0]
    assert r0["participants"] == ["nih", "vindr"] and "gone" in r0["failed"] and r0["aggregated"]
    assert {"round", "participants", "bytes_sent", "bytes_up_shared", "seconds"} <= set(r0) and r0["bytes_sent"] > 0
    ck = Checkpoint.load(out)
    fed = ck.meta["federated"]
    n = fed["samples"]
    key = "encoder.backbone.conv1.weight"
    site_w = {s: Checkpoint.load(out / "sites" / s).modules["model"][key] for s in ("nih", "vindr")}
    expect = (site_w["nih"] * n["nih"] + site_w["vindr"] * n["vindr"]) / (n["nih"] + n["vindr"])
    assert torch.allclose(ck.modules["model"][key], expect, atol=1e-6)  # FedAvg by training images
    assert not torch.allclose(site_w["nih"], site_w["vindr"])
    # heads are local: the global checkpoint carries each site's own head, as that site trained it
    head = "heads.nih.weight"
    assert torch.equal(ck.modules["model"][head], Checkpoint.load(out / "sites" / "nih").modules["model"][head])
    assert not any(k.startswith("heads.") for k in fed["shared_keys"])

    register(sites, "siim")  # joins between rounds
    res = run_federate(fed_cfg(corpus, sites, out, "method=ark", "rounds=2"))
    r1 = res["history"][-1]
    assert log_rounds(out) == [0, 1] and r1["joined"] == ["siim"]
    assert r1["participants"] == ["nih", "siim", "vindr"] and list(r1["failed"]) == ["gone"]
    ck = Checkpoint.load(out)
    assert "heads.siim.weight" in ck.modules["model"] and ck.meta["site_names"] == ["nih", "siim", "vindr"]
    pre = load_pretrained(out)
    assert pre.classifier(torch.rand(2, 1, 32, 32)).shape == (2, len(pre.class_names))
    assert load_pretrained(out / "sites" / "siim").method == "ark"  # the site's personalised model

    # what a site sends: model state and label-level facts only
    cfg = fed_cfg(corpus, sites, tmp_path / "probe", "method=ark")
    site = select_sites(cfg)["nih"].resolved()
    client = SiteClient(cfg, site, 0)
    union = fed["union"]
    update = client.fit(client.initial_state(union), None, union, 0)
    df = site.load_manifest().to_pandas()
    ids = [str(v) for c in ("patient_id", "image_id") if c in df for v in df[c].unique()]
    assert ids and audit_update(update, image_size=32, forbidden=ids) == []
    text = json.dumps({"meta": update["meta"], "metrics": update["metrics"], "keys": list(update["shared"])})
    assert str(corpus) not in text and str(site.root) not in text


UNICHEST = ["unichest.n_experts=2", "text.max_length=16",
            "unichest.query={n_layers: 1, n_heads: 2, ffn: 32, dropout: 0.0, lambda_local: 1.0, lambda_global: 0.4}"]


@pytest.mark.parametrize("method", ["unichest", "concurrent", "selfsup"])
def test_every_method_federates_and_its_global_model_loads(corpus, tmp_path, method):
    sites = register(tmp_path / "sites", "nih", "vindr")
    res = run_federate(fed_cfg(corpus, sites, tmp_path / "run", f"method={method}", "rounds=1", *UNICHEST))
    assert res["history"][0]["participants"] == ["nih", "vindr"] and res["history"][0]["failed"] == {}
    shared = Checkpoint.load(tmp_path / "run").meta["federated"]["shared_keys"]
    if method == "unichest":  # the experts stay at the sites, the shared query network does not
        assert not [k for k in shared if k.startswith("model/query_networks.1.")]
        assert [k for k in shared if k.startswith("model/query_networks.0.")]
    if method == "concurrent":
        assert not [k for k in shared if k.startswith("model/heads.")]
    pre = load_pretrained(tmp_path / "run")
    x = torch.rand(2, 1, 32, 32)
    if pre.classifier is not None:
        assert pre.classifier(x).shape == (2, len(pre.class_names))
    else:  # label-free pretraining: an encoder only
        assert pre.embedding_model(x).shape[0] == 2


def test_fedper_keeps_its_groups_local_and_a_late_round_is_left_out(corpus, tmp_path):
    sites = register(tmp_path / "sites", "nih", "vindr")
    out = tmp_path / "fedper"
    r0 = run_federate(fed_cfg(corpus, sites, out, "method=mixed", "rounds=1", "federate.strategy=fedper",
                              "federate.local=[model/encoder.backbone.layer4.*]", "federate.clip_norm=0.5",
                              "federate.noise_multiplier=0.01"))["history"][0]
    # DP-style release: the settings logged, each site's update clipped to norm 0.5 (it was larger)
    assert r0["clip_norm"] == 0.5 and r0["noise_multiplier"] == 0.01
    assert all(m["update_norm"] > 0.5 and m["clip_scale"] == pytest.approx(0.5 / m["update_norm"], rel=1e-3)
               for m in r0["site_metrics"].values())
    ck = Checkpoint.load(out)
    shared = set(ck.meta["federated"]["shared_keys"])
    layer4 = [k for k in flatten(ck.modules) if "layer4" in k and k.startswith("model/")]
    assert layer4 and not shared & set(layer4)
    nih, vindr = (Checkpoint.load(out / "sites" / s).modules["model"] for s in ("nih", "vindr"))
    keys = [k[len("model/"):] for k in layer4]
    assert all(torch.equal(ck.modules["site:nih"]["model/" + k], nih[k]) for k in keys)  # kept per site
    assert any(not torch.equal(nih[k], vindr[k]) for k in keys if nih[k].is_floating_point())
    # a round whose sites all miss the deadline: logged, not aggregated, the run goes on
    before = {kk: v.clone() for kk, v in ck.modules["model"].items()}
    res = run_federate(fed_cfg(corpus, sites, out, "method=mixed", "rounds=2", "federate.strategy=fedper",
                               "federate.local=[model/encoder.backbone.layer4.*]", "federate.deadline_s=0.001",
                               "federate.clip_norm=0.5", "federate.noise_multiplier=0.01"))
    r1 = res["history"][-1]
    assert r1["participants"] == [] and not r1["aggregated"] and all("deadline" in v for v in r1["failed"].values())
    after = Checkpoint.load(out).modules["model"]
    assert all(torch.equal(before[kk], after[kk]) for kk in before)
    with pytest.raises(ValueError, match="strategy 'fedper', not 'fedavg'"):
        run_federate(fed_cfg(corpus, sites, out, "method=mixed", "rounds=3"))
    # the global model exports like any run (ONNX with the parity check)
    from raycxr.export import export_onnx

    export_onnx(compose("export", [f"run={out}", f"out={tmp_path / 'onnx'}", f"sites.sites_dir={sites}",
                                   f"sites.data_root={corpus}", "limit=4"]))
    assert (tmp_path / "onnx" / "classifier.onnx").is_file()


def test_resume_after_kill_9_of_the_driver_loses_and_repeats_no_round(corpus, tmp_path):
    sites = register(tmp_path / "sites", "nih", "vindr")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "raycxr.cli", "federate", *SMALL, f"sites.sites_dir={sites}",
            f"sites.data_root={corpus}", f"out={out}", "method=mixed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "deploy"),
                                                                                 os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([*args, "rounds=3"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "federate.jsonl"
    t0 = time.time()
    while time.time() - t0 < 240 and not (log.exists() and log.read_text().strip()):
        assert proc.poll() is None, "the federation exited before its first round"
        time.sleep(0.2)
    time.sleep(1.0)  # well into round 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = log_rounds(out)
    assert done and done[-1] < 2, f"killed too late: {done}"
    subprocess.run([*args, "rounds=3"], env=env, cwd=REPO, check=True, timeout=300, capture_output=True)
    assert log_rounds(out) == [0, 1, 2]
    subprocess.run([*args, "rounds=4"], env=env, cwd=REPO, check=True, timeout=300, capture_output=True)
    assert log_rounds(out) == [0, 1, 2, 3]  # exactly one more round
    ck = Checkpoint.load(out)
    assert ck.position == 4 and [h["round"] for h in ck.history] == [0, 1, 2, 3]


@pytest.mark.ray
def test_ray_runner_trains_each_site_in_its_placed_actor_and_only_model_state_leaves(corpus, tmp_path):
    import ray

    sites = register(tmp_path / "sites", "nih", "vindr", nih={"placement": {"resources": {"site_nih": 1}}},
                     vindr={"placement": {"resources": {"site_vindr": 1}}})
    ray.init(num_cpus=2, resources={"site_nih": 1, "site_vindr": 1}, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 2**20)
    try:
        cfg = fed_cfg(corpus, sites, tmp_path / "run", "method=ark", "rounds=1", "runner=ray")
        res = run_federate(cfg)
        r0 = res["history"][0]
        assert r0["participants"] == ["nih", "vindr"] and r0["failed"] == {}  # the server's audit refused nothing
        # what an actor hands back, checked here too: no tensor shaped like an image batch
        from raycxr.federated.ray_clients import RayClients

        clients = RayClients(cfg)
        clients.ensure(select_sites(cfg))
        union = Checkpoint.load(tmp_path / "run").meta["federated"]["union"]
        init = clients.call("nih", "initial_state", union)
        update = clients.fit({"nih": (init, None, union, 0)}, None)["nih"]
        clients.close()
        assert isinstance(update, dict), update

        def tensors(x):
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, dict):
                for v in x.values():
                    yield from tensors(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    yield from tensors(v)

        shapes = [tuple(t.shape) for t in tensors(update)]
        assert shapes and not [s for s in shapes if len(s) >= 3 and s[-2:] == (32, 32)]
        # a round whose sites miss the deadline: their actors are killed, the round is left unaggregated,
        # and the next round starts fresh actors that train from the state the server kept
        late = run_federate(fed_cfg(corpus, sites, tmp_path / "run", "method=ark", "rounds=2", "runner=ray",
                                    "federate.deadline_s=0.05"))["history"][-1]
        assert late["participants"] == [] and not late["aggregated"]
        assert all("deadline" in v for v in late["failed"].values())
        again = run_federate(fed_cfg(corpus, sites, tmp_path / "run", "method=ark", "rounds=3",
                                     "runner=ray"))["history"]
        assert [h["round"] for h in again] == [0, 1, 2] and again[-1]["participants"] == ["nih", "vindr"]
    finally:
        ray.shutdown()
    assert load_pretrained(tmp_path / "run").classifier(torch.rand(1, 1, 32, 32)).shape[0] == 1
