"""Site replica autoscaling: the decision rule and the pool's bookkeeping, by hand (no Ray)."""

import pytest

from raycxr.sites.autoscale import ReplicaScaler, ScalePolicy, scale_decision

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


def test_the_scaler_grows_waits_for_every_consumer_and_retires_the_newest():
    started = []

    def start(r):
        started.append(r)
        return f"replica{r}"

    sc = ReplicaScaler(["replica0"], start, P, consumers=2)
    assert sc.handles() == (["replica0"], 1)
    assert sc.report(waited_s=5, elapsed_s=10, busy_s=9) == (["replica0"], 1)  # one of two consumers: no decision
    assert sc.report(waited_s=0, elapsed_s=10, busy_s=9) == (["replica0", "replica1"], 2)  # the worst waited 50 %
    assert started == [1] and sc.log()[-1] == {"replicas": 2, "was": 1, "wait_frac": 0.5, "busy_frac": 1.8}
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
