"""A site the server does not control, one test per attack: NaN/inf updates, a huge self-reported
sample count, an oversized update, and a minority of outliers under robust aggregation; and the privacy
budget a DP run states. The last test runs a real federation in which one site sends NaN."""

import math

import pytest
import torch
from test_federate import corpus, fed_cfg, register  # noqa: F401  (module fixture reused)

from raycxr.federated import (
    audit_update,
    capped_weights,
    clip_and_noise,
    coordinate_median,
    epsilon,
    make_strategy,
    robust_aggregate,
    run_federate,
    trimmed_mean,
)
from raycxr.federated import server as fed_server


def test_a_nan_or_inf_update_is_refused_by_the_audit():
    clean = {"shared": {"model/w": torch.zeros(4)}, "metrics": {"loss": 0.1}}
    assert audit_update(clean, image_size=32) == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        upd = {"shared": {"model/w": torch.tensor([0.0, bad, 0.0, 0.0])}, "metrics": {"loss": 0.1}}
        problems = audit_update(upd, image_size=32)
        assert problems and "non-finite" in problems[0] and "model/w" in problems[0]
    assert audit_update({"shared": {"n": torch.tensor(3)}}, image_size=32) == []  # integers cannot be NaN


def test_the_audit_names_where_an_identifier_is_but_never_the_identifier():
    problems = audit_update({"meta": {"note": "patient P0042"}}, image_size=32, forbidden=["P0042"])
    assert problems and "identifier" in problems[0] and "P0042" not in " ".join(problems)


def test_clipping_refuses_a_nan_update_instead_of_passing_it_at_scale_one():
    ref = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="non-finite"):
        clip_and_noise({"w": torch.tensor([1.0, float("nan"), 0.0])}, ref, clip_norm=1.0)


def test_a_self_reported_sample_count_is_capped_and_must_be_a_positive_integer():
    w = capped_weights({"a": 100, "b": 120, "liar": 1e9}, 10.0)
    assert w["a"] == 100 and w["b"] == 120 and w["liar"] == pytest.approx(10 * 110)  # 10 x median(100, 120)
    assert capped_weights({"a": 100, "liar": 1e9}, None)["liar"] == 1e9  # null: no cap
    states = {"a": {"w": torch.tensor([0.0])}, "b": {"w": torch.tensor([0.0])}, "liar": {"w": torch.tensor([1.0])}}
    avg = robust_aggregate(states, {"a": 100, "b": 120, "liar": 1e9}, max_weight_ratio=10.0)
    assert float(avg["w"]) == pytest.approx(1100 / 1320)  # without the cap: 0.9999998
    for bad in (0, -5, 1.5, float("nan"), float("inf"), "12", True, None):
        with pytest.raises(ValueError, match="positive integer"):
            fed_server._sample_count(bad)
    assert fed_server._sample_count(12) == 12 and fed_server._sample_count(12.0) == 12


def test_trimmed_mean_and_median_hand_values_resist_a_minority_of_outliers():
    s = [{"w": torch.tensor([1.0, 10.0]), "n": torch.tensor(1)}, {"w": torch.tensor([2.0, 20.0]), "n": torch.tensor(4)},
         {"w": torch.tensor([3.0, 30.0]), "n": torch.tensor(2)}, {"w": torch.tensor([4.0, 40.0]), "n": torch.tensor(3)},
         {"w": torch.tensor([1000.0, -1000.0]), "n": torch.tensor(0)}]
    tm = trimmed_mean(s, 0.2)  # drops the largest and smallest per coordinate: mean of the middle three
    assert torch.allclose(tm["w"], torch.tensor([3.0, 20.0])) and int(tm["n"]) == 4
    med = coordinate_median(s)
    assert torch.allclose(med["w"], torch.tensor([3.0, 20.0]))
    assert torch.allclose(coordinate_median(s[:4])["w"], torch.tensor([2.5, 25.0]))  # even count: middle two
    assert torch.allclose(trimmed_mean(s, 0.0)["w"], torch.tensor([202.0, -180.0]))  # 0: the plain mean
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(s, 0.5)
    strategy = make_strategy("fedavg", "mixed", aggregator="median")
    out = strategy.aggregate({f"s{i}": x for i, x in enumerate(s)}, {f"s{i}": 1 for i in range(5)})
    assert torch.allclose(out["w"], torch.tensor([3.0, 20.0]))
    with pytest.raises(ValueError, match="aggregator"):
        make_strategy("fedavg", "mixed", aggregator="krum")


def test_robust_aggregation_refuses_a_non_finite_state():
    with pytest.raises(ValueError, match="site b: update has non-finite"):
        robust_aggregate({"a": {"w": torch.zeros(2)}, "b": {"w": torch.tensor([float("inf"), 0.0])}}, {"a": 1, "b": 1})


def test_the_privacy_budget_matches_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert epsilon(1.0, 3, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5))
    assert epsilon(1.0, 3, 1e-5) == pytest.approx(9.01, abs=0.01)
    assert epsilon(1.0, 6, 1e-5) > epsilon(1.0, 3, 1e-5) > epsilon(2.0, 3, 1e-5)  # rounds spend, noise saves
    assert epsilon(0.0, 3, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="dp_delta"):
        epsilon(1.0, 3, 0.0)


class PoisonedClients(fed_server.LocalClients):
    """The federation's real local clients, with sites under an attacker's control: ``nan`` sends NaN in
    its shared state, ``huge`` an update a million times the global model, ``liar`` claims a billion and a
    half training images."""

    attackers: dict[str, str] = {}

    def info(self, names):
        out = super().info(names)
        for n, mode in self.attackers.items():
            if mode == "liar" and isinstance(out.get(n), dict):
                out[n] = {**out[n], "n_train": 1e9 + 0.5}
        return out

    def fit(self, jobs, deadline):
        out = super().fit(jobs, deadline)
        for n, mode in self.attackers.items():
            res = out.get(n)
            if isinstance(res, dict) and mode in ("nan", "huge"):
                scale = float("nan") if mode == "nan" else 1e6
                res["shared"] = {k: (v * scale if v.is_floating_point() else v) for k, v in res["shared"].items()}
        return out


def assert_global_model_finite(out):
    from raycxr.checkpoint import Checkpoint

    ck = Checkpoint.load(out / "checkpoint.pt")
    floats = [t for m in ck.modules.values() for t in m.values() if t.is_floating_point()]
    assert floats and all(bool(torch.isfinite(t).all()) for t in floats)


def test_a_site_lying_about_its_size_is_left_out_and_dp_states_epsilon(corpus, tmp_path, monkeypatch):  # noqa: F811
    sites = register(tmp_path / "sites", "nih", "vindr", "siim")
    PoisonedClients.attackers = {"vindr": "liar"}
    monkeypatch.setattr(fed_server, "make_clients", lambda cfg: PoisonedClients(cfg))
    cfg = fed_cfg(corpus, sites, tmp_path / "out", "method=mixed", "rounds=1", "val.enabled=false",
                  "federate.clip_norm=5", "federate.noise_multiplier=0.01")
    record = run_federate(cfg)["history"][-1]
    assert record["participants"] == ["nih", "siim"]
    assert "n_train is not a positive integer" in record["failed"]["vindr"]
    assert_global_model_finite(tmp_path / "out")
    assert record["aggregator"] == "mean" and record["dp_epsilon"] == pytest.approx(epsilon(0.01, 1, 1e-5), rel=1e-3)


def test_the_server_refuses_nan_and_oversized_updates(corpus, tmp_path, monkeypatch):  # noqa: F811
    """One site sends NaN (what a NaN image did with ``val.enabled=false``), another an update far
    from the global model: both are refused, the honest site's update becomes the global model."""
    sites = register(tmp_path / "sites", "nih", "vindr", "siim")
    PoisonedClients.attackers = {"vindr": "nan", "siim": "huge"}
    monkeypatch.setattr(fed_server, "make_clients", lambda cfg: PoisonedClients(cfg))
    cfg = fed_cfg(corpus, sites, tmp_path / "out", "method=mixed", "rounds=1", "val.enabled=false",
                  "federate.max_update_norm=1000")
    record = run_federate(cfg)["history"][-1]
    assert record["participants"] == ["nih"] and record["aggregated"]
    assert "non-finite" in record["failed"]["vindr"]
    assert "above federate.max_update_norm" in record["failed"]["siim"]
    assert_global_model_finite(tmp_path / "out")
