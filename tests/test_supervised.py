"""The shared fine-tuning loop: its cosine learning-rate schedule, by hand."""

import math

import pytest
import torch

from raycxr.train.supervised import fit_supervised


def test_cosine_schedule_decays_every_group_to_zero_over_the_run():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 1.0}])
    seen = []

    def loss(m, b):
        seen.append([g["lr"] for g in opt.param_groups])  # the rate this step trains with
        return m(b["x"]).pow(2).mean()

    batches = [{"x": torch.ones(3, 2)}] * 4  # 4 steps per epoch
    hist = fit_supervised(model, batches, loss, opt, epochs=2, max_steps=6, progress=False, schedule="cosine")
    assert len(hist) == 6
    for k, (w, b) in enumerate(seen):  # step k of 6: base * (1 + cos(pi k / 6)) / 2, for each group
        f = 0.5 * (1 + math.cos(math.pi * k / 6))
        assert w == pytest.approx(0.1 * f) and b == pytest.approx(1.0 * f)
    assert seen[0] == [0.1, 1.0] and seen[-1][1] == pytest.approx(0.5 * (1 + math.cos(5 * math.pi / 6)))
    # constant keeps the optimiser's rates; anything else is refused by name
    opt2 = torch.optim.SGD(model.parameters(), lr=0.3)
    fit_supervised(model, batches, lambda m, b: m(b["x"]).sum(), opt2, epochs=1, progress=False)
    assert opt2.param_groups[0]["lr"] == 0.3
    with pytest.raises(ValueError, match="constant or cosine"):
        fit_supervised(model, batches, loss, opt2, schedule="step", progress=False)
