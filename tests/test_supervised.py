"""The shared fine-tuning loop (its cosine schedule, by hand) and fine-tuning's head prior and step floor."""

import math

import numpy as np
import pytest
import torch

from raycxr.engine.supervised import fit_supervised


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


def test_warm_up_then_cosine_by_hand():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def loss(m, b):
        seen.append(opt.param_groups[0]["lr"])
        return m(b["x"]).pow(2).mean()

    fit_supervised(model, [{"x": torch.ones(3, 2)}] * 10, loss, opt, epochs=1, progress=False, schedule="cosine",
                   warmup=0.2)
    # 2 warm-up steps (1/2, 2/2), then the cosine over the other 8 from the full rate
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert seen == pytest.approx(want)


def test_layer_decay_gives_each_vit_depth_its_own_rate():
    from raycxr.eval.transfer import encoder_groups
    from raycxr.models.encoders import ImageEncoder

    vit = ImageEncoder("vit_tiny_patch16_224", embed_dim=16, img_size=64, patch_size=8)
    plain = encoder_groups(vit, 1e-3)
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3
    groups = encoder_groups(vit, 1e-3, layer_decay=0.75)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in vit.parameters())  # every parameter, once
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    b = vit.backbone
    # the patch embedding at depth 0, block i at depth i + 1, the last of the 12 blocks at the full rate
    assert rate[id(b.patch_embed.proj.weight)] == pytest.approx(1e-3 * 0.75 ** 12)
    assert rate[id(b.blocks[0].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.75 ** 11)
    assert rate[id(b.blocks[-1].mlp.fc1.weight)] == pytest.approx(1e-3)
    assert rate[id(vit.token_mlp[0].weight)] == 1e-3  # raycxr's token MLP above the backbone: the full rate
    with pytest.raises(ValueError, match="names its layers"):
        encoder_groups(torch.nn.Linear(2, 2), 1e-3, layer_decay=0.75)


def test_prior_bias_by_hand():
    from raycxr.eval.transfer import prior_bias

    y = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], np.float32)
    m = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0]], np.float32)  # class 2 never annotated
    b = prior_bias(y, m)
    # class 0: 2 of 3 annotated rows positive -> log 2; class 1: 1 of 4 -> log(1/3); class 2: no rows -> 0
    assert b == pytest.approx([math.log(2), math.log(1 / 3), 0.0], abs=1e-6)
    assert prior_bias(np.zeros((5, 1)), np.ones((5, 1)))[0] == pytest.approx(math.log(1e-3 / (1 - 1e-3)))


def test_fine_tuning_starts_at_the_prior_and_runs_at_least_min_steps(small_sites):
    from raycxr.config import compose
    from raycxr.dataset import site_dataset
    from raycxr.eval.transfer import fine_tune_model, prior_bias
    from raycxr.models.factory import build_encoder
    from raycxr.train.local import select_sites

    cfg = compose("pretrain", [*small_sites, "image_size=32", "encoder.embed_dim=16"])
    site = select_sites(cfg)["vindr"]
    enc = build_encoder(cfg, checkpoint=False)
    idx = np.arange(6)  # one batch per epoch
    # 1 epoch of one batch, extended to 4 steps; a zero learning rate keeps the head where it started
    model, steps = fine_tune_model(enc, site, image_size=32, indices=idx, epochs=1, min_steps=4, lr=0.0,
                                   head_lr=0.0, batch_size=8)
    assert steps == 4
    ds = site_dataset(site, {"size": 32}, split="train", train=False, use_labels=True)
    assert model.model.head.bias.detach().numpy() == pytest.approx(prior_bias(ds.labels[idx], ds.label_mask[idx]))
    # max_steps still caps it; epochs win when they give more steps
    assert fine_tune_model(enc, site, image_size=32, indices=idx, epochs=1, min_steps=4, max_steps=2,
                           batch_size=8)[1] == 2
    assert fine_tune_model(enc, site, image_size=32, indices=idx, epochs=3, min_steps=2, batch_size=8)[1] == 3
