"""Site replica autoscaling: the decision rule and the pool's bookkeeping, by hand (no Ray)."""

import pytest

from raycxr.ray.autoscale import ReplicaScaler, ScalePolicy, scale_decision

P = ScalePolicy(min_replicas=1, max_replicas=3, up_wait=0.1, down_util=0.5, patience=2)


def test_scale_decision_by_hand():
    assert scale_decision(1, P, wait_frac=0.3, busy_frac=1.0, low_windows=0) == 2  # starved: up
    assert scale_decision(3, P, wait_frac=0.3, busy_frac=1.0, low_windows=0) == 3  # at max
    assert scale_decision(2, P, wait_frac=0.05, busy_frac=0.9, low_windows=0) == 2  # some waiting: hold
    # nobody waits (<= up_wait / 10) and 1 replica would be 0.2 * 2 / 1 = 40 % busy (< 50 %): down, after patience
    assert scale_decision(2, P, wait_frac=0.0, busy_frac=0.2, low_windows=1) == 2
    assert scale_decision(2, P, wait_frac=0.0, busy_frac=0.2, low_windows=2) == 1
    assert scale_decision(2, P, wait_frac=0.0, busy_frac=0.3, low_windows=5) == 2  # 60 % with one fewer: hold
    assert scale_decision(1, P, wait_frac=0.0, busy_frac=0.0, low_windows=9) == 1  # at min
    with pytest.raises(ValueError, match="min"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="min_gain"):
        ScalePolicy(min_gain=1.0)
    assert scale_decision(1, P, wait_frac=0.3, busy_frac=1.0, low_windows=0, ceiling=1) == 1  # a step that did not help


def test_the_scaler_grows_waits_for_every_consumer_and_retires_the_newest():
    started = []

    def start(r):
        started.append(r)
        return f"replica{r}"

    sc = ReplicaScaler(["replica0"], start, P, consumers=2)
    assert sc.handles() == (["replica0"], 1)
    assert sc.report(waited_s=5, elapsed_s=10, busy_s=9) == (["replica0"], 1)  # one of two consumers: no decision
    assert sc.report(waited_s=0, elapsed_s=10, busy_s=9) == (["replica0", "replica1"], 2)  # the worst waited 50 %
    assert started == [1] and sc.log()[-1] == {"replicas": 2, "was": 1, "wait_frac": 0.5, "busy_frac": 1.8,
                                              "window_s": 10, "reason": "up"}
    # idle windows: busy (1 + 1) / (10 x 2) = 10 %, with one fewer 20 % < 50 %; patience 2
    sc.report(0, 10, 1)
    assert sc.report(0, 10, 1)[1] == 2  # the first idle window is not enough ...
    sc.report(0, 10, 1)
    handles, active = sc.report(0, 10, 1)
    assert active == 1 and handles == ["replica0", "replica1"]  # ... the second retires replica 1, kept started
    # demand again: the retired replica serves again, nothing new is started
    sc.report(8, 10, 10)
    assert sc.report(8, 10, 10) == (["replica0", "replica1"], 2) and started == [1]
    # a pool that starts below its minimum is filled up to it
    assert ReplicaScaler(["r0"], start, ScalePolicy(min_replicas=2, max_replicas=3)).handles()[1] == 2


def test_a_step_up_that_does_not_feed_the_trainer_is_undone_and_caps_the_pool():
    # a saturated machine: the second replica takes cores from the first, the window is no faster
    started = []
    sc = ReplicaScaler(["r0"], lambda r: started.append(r) or f"r{r}", P)
    assert sc.report(6, 10, 4)[1] == 2  # starved: up
    assert sc.report(6, 10, 8)[1] == 2  # the new replica's start-up window: not judged
    assert sc.report(6, 9.5, 8)[1] == 1  # 10 s -> 9.5 s per window is less than 10 % faster: undone
    assert [h["reason"] for h in sc.log()] == ["up", "settling", "no gain"] and sc.ceiling == 1
    assert sc.report(6, 10, 4)[1] == 1 and started == [1]  # still starved, but it does not grow again
    # a consumer with no work of its own waits ~all of every window, however fast the site: throughput decides.
    # 10 s -> 6 s per window (1.67x the batches/s) is kept, and 90 % waiting is still starved: up again
    sc = ReplicaScaler(["r0"], lambda r: f"r{r}", P)
    sc.report(9.5, 10, 9)
    sc.report(5.7, 6, 8)
    assert sc.report(5.7, 6, 8)[1] == 3 and sc.ceiling is None


def test_a_new_replica_serves_only_once_it_is_up_and_is_judged_from_then():
    up = set()
    sc = ReplicaScaler(["r0"], lambda r: f"r{r}", P, is_ready=lambda r: r in up)
    assert sc.report(6, 10, 4) == (["r0", "r1"], 1)  # started, but still starting: requests go to r0 only
    assert sc.report(6, 10, 8) == (["r0", "r1"], 1) and sc.log()[-1]["reason"] == "starting"
    up.add(1)
    assert sc.report(2, 10, 8)[1] == 2  # up: it serves; its first window is not judged
    assert sc.report(1, 10, 8)[1] == 2 and sc.ceiling is None  # 0.1 < 0.75 x 0.6: kept
    assert [h["reason"] for h in sc.log()] == ["up", "starting", "settling", "hold"]
