"""Losses checked against values worked out by hand (math / numpy) on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raycxr.losses import (
    UNICHEST_ITC_SCALE,
    ark_consistency_loss,
    asymmetric_loss,
    combine_experts,
    cosine_schedule,
    ema_update,
    image_text_contrastive_loss,
    masked_bce_with_logits,
    moco_loss,
    nt_xent_loss,
    slip_loss,
    source_contrastive_loss,
    vicreg_loss,
    vicreg_terms,
)

D = torch.float64


def t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=D, requires_grad=grad)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# -- ASL ------------------------------------------------------------------------------------------------
def test_asl_hand_values_sum_and_mean_with_mask():
    # p: [pos 0.9, neg 0.2, neg 0.01, masked (target -1, p 0.999)]
    p = t([[0.9, 0.2], [0.01, 0.999]])
    y = t([[1.0, 0.0], [0.0, -1.0]])
    m = t([[1.0, 1.0], [1.0, 0.0]])
    pos = -math.log(0.9)  # gamma_pos = 0: weight 1
    neg = -math.log(0.85) * 0.15**6  # p- = 1 - 0.2 + 0.05 = 0.85, pt = 0.85, w = (1 - 0.85)^6
    tiny = 0.0  # p- = min(0.99 + 0.05, 1) = 1 -> log 1 = 0 (and w = 0)
    expected = pos + neg + tiny
    got = asymmetric_loss(p, y, m, from_probs=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got_mean = asymmetric_loss(p, y, m, from_probs=True, reduction="mean")
    assert got_mean.item() == pytest.approx(expected / 3, rel=1e-12)
    per = asymmetric_loss(p, y, m, from_probs=True, reduction="none")
    np.testing.assert_allclose(per.numpy(), [[pos, neg], [tiny, 0.0]], rtol=1e-12, atol=1e-15)
    # the masked entry is ignored exactly: anything there gives the same value
    p2, y2 = p.clone(), y.clone()
    p2[1, 1], y2[1, 1] = 0.0, float("nan")
    assert asymmetric_loss(p2, y2, m, from_probs=True).item() == got.item()
    # equals the authors' boolean indexing of the known entries
    keep = m != 0
    idx = asymmetric_loss(p[keep].view(-1, 1), y[keep].view(-1, 1), from_probs=True)
    assert idx.item() == pytest.approx(expected, rel=1e-12)


def test_asl_options_clip_gamma_pos_eps():
    p, y = t([[0.9, 0.2]]), t([[1.0, 0.0]])
    # clip = 0: p- = 0.8, w = 0.2^6
    got = asymmetric_loss(p, y, from_probs=True, clip=0.0)
    assert got.item() == pytest.approx(-math.log(0.9) - math.log(0.8) * 0.2**6, rel=1e-12)
    # gamma_pos = 1: positive weight (1 - 0.9)
    got = asymmetric_loss(p, y, from_probs=True, gamma_pos=1.0)
    assert got.item() == pytest.approx(-math.log(0.9) * 0.1 - math.log(0.85) * 0.15**6, rel=1e-12)
    # no focusing at all: plain (clipped) BCE
    got = asymmetric_loss(p, y, from_probs=True, gamma_neg=0.0, clip=0.0)
    assert got.item() == pytest.approx(-math.log(0.9) - math.log(0.8), rel=1e-12)
    # log clamped at eps: p = 0 for a positive gives -log(eps), finite
    got = asymmetric_loss(t([[0.0]]), t([[1.0]]), from_probs=True, eps=1e-8)
    assert got.item() == pytest.approx(-math.log(1e-8), rel=1e-12)


def test_asl_focal_weight_is_detached():
    # one negative, p = 0.3: p- = 0.75, w = (1 - 0.75)^6 = (p - clip)^6
    p = t([[0.3]], grad=True)
    asymmetric_loss(p, t([[0.0]]), from_probs=True).backward()
    w = 0.25**6
    assert p.grad.item() == pytest.approx(w / 0.75, rel=1e-12)  # d/dp[-log(1 - p + c)]·w, w constant
    # the undetached variant adds -log(p-)·dw/dp = -log(0.75)·6·0.25^5
    p = t([[0.3]], grad=True)
    asymmetric_loss(p, t([[0.0]]), from_probs=True, detach_focal=False).backward()
    assert p.grad.item() == pytest.approx(w / 0.75 - math.log(0.75) * 6 * 0.25**5, rel=1e-12)
    # through the sigmoid: chain rule with p(1 - p)
    x = t([[0.4]], grad=True)
    asymmetric_loss(x, t([[0.0]])).backward()
    q = 1 / (1 + math.exp(-0.4))
    qn = 1 - q + 0.05
    assert x.grad.item() == pytest.approx((1 - qn) ** 6 / qn * q * (1 - q), rel=1e-12)


def test_asl_logits_match_probabilities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=D) * 3
    y = (torch.rand(4, 5, generator=g, dtype=D) > 0.5).to(D)
    m = (torch.rand(4, 5, generator=g) > 0.3).to(D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = asymmetric_loss(xa, y, m)
    pb = torch.sigmoid(xb)
    lb = asymmetric_loss(pb, y, m, from_probs=True)
    assert la.item() == pytest.approx(lb.item(), rel=1e-12)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_asl_all_masked_is_finite_zero_with_zero_grad():
    p = t([[0.3, 0.7], [0.5, 0.9]], grad=True)
    y = torch.full((2, 2), -1.0, dtype=D)
    y[0, 0] = float("nan")
    m = torch.zeros(2, 2)
    for red in ("sum", "mean"):
        p.grad = None
        loss = asymmetric_loss(p, y, m, from_probs=True, reduction=red)
        assert loss.item() == 0.0 and torch.isfinite(loss)
        loss.backward()
        assert torch.equal(p.grad, torch.zeros_like(p))
    # one fully missing row among known ones: that row gets zero gradient
    x = t([[0.3, -0.2], [1.0, 2.0]], grad=True)
    asymmetric_loss(x, t([[1.0, 0.0], [-1.0, -1.0]]), t([[1, 1], [0, 0]]), reduction="mean").backward()
    assert torch.equal(x.grad[1], torch.zeros(2, dtype=D)) and torch.all(x.grad[0] != 0)


def test_asl_leaves_grad_mode_alone():
    p = t([[0.3]], grad=True)
    with torch.no_grad():
        loss = asymmetric_loss(p, t([[0.0]]), from_probs=True)
        assert not torch.is_grad_enabled()
    assert loss.grad_fn is None
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError):
        asymmetric_loss(p, t([[0.0]]), reduction="avg")


# -- image-text contrastive ------------------------------------------------------------------------------
def test_itc_default_scale_hand_value():
    assert UNICHEST_ITC_SCALE == pytest.approx(2.65926, abs=1e-5)
    s = math.log(1 / 0.07)
    img, txt = t([[1.0, 0.0], [0.0, 1.0]], grad=True), t([[1.0, 0.0], [1.0, 1.0]], grad=True)
    # L = s·[[1, 1], [0, 1]]; rows: log 2, log(1 + e^-s); columns: log(1 + e^-s), log 2
    expected = (math.log(2) + math.log(1 + math.exp(-s))) / 2
    loss = image_text_contrastive_loss(img, txt)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


def test_itc_equals_kl_form_and_options():
    img, txt = t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0, 0.0], [1.0, 1.0]])
    # temperature 0.5 -> s = 2, raw: L = 2·I Tᵀ = 2·[[2, 1], [0, 1]] = [[4, 2], [0, 2]]
    rows = [-4 + lse(4, 2), -2 + lse(0, 2)]
    cols = [-4 + lse(4, 0), -2 + lse(2, 2)]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    assert image_text_contrastive_loss(img, txt, 0.5).item() == pytest.approx(expected, rel=1e-12)
    # the authors' form [KL_sum(log_softmax(L), eye) + KL_sum(log_softmax(Lᵀ), eye)] / (2N) is the same number
    L = 2 * np.array([[2.0, 1.0], [0.0, 1.0]])
    logsm = L - np.log(np.exp(L).sum(1, keepdims=True))
    logsm_t = L.T - np.log(np.exp(L.T).sum(1, keepdims=True))
    kl = -(np.trace(logsm) + np.trace(logsm_t)) / 4
    assert kl == pytest.approx(expected, rel=1e-12)
    # normalize=True: T -> [[1, 0], [a, a]], a = 1/√2; default scale s
    s, a = math.log(1 / 0.07), 1 / math.sqrt(2)
    rows = [-s + lse(s, s * a), -s * a + lse(0, s * a)]
    cols = [-s + lse(s, 0), -s * a + lse(s * a, s * a)]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    got = image_text_contrastive_loss(img, txt, normalize=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_itc_batch_of_one_is_zero():
    img, txt = t([[3.0, -1.0]], grad=True), t([[0.5, 2.0]], grad=True)
    loss = image_text_contrastive_loss(img, txt)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    with pytest.raises(ValueError):
        image_text_contrastive_loss(t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]))


# -- source contrastive ------------------------------------------------------------------------------------
def test_scl_singleton_source_stays_in_denominators():
    # z0 = (1, 0), z1 = (0, 1), z2 = (0.6, 0.8); sources 0, 0, 1 (sample 2 has no partner)
    f = t([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], grad=True)
    ids = torch.tensor([0, 0, 1])
    # anchor 0, positive 1: -log(e^0 / (e^0 + e^0.6)); anchor 1, positive 0: -log(e^0 / (e^0 + e^0.8))
    expected = (math.log(1 + math.exp(0.6)) + math.log(1 + math.exp(0.8))) / 2
    loss = source_contrastive_loss(f, ids)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # τ = 0.5 doubles the similarities
    expected = (math.log(1 + math.exp(1.2)) + math.log(1 + math.exp(1.6))) / 2
    assert source_contrastive_loss(f, [0, 0, 1], 0.5).item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad[2].abs().sum() > 0  # the singleton gets gradient via denominators


def _scl_literal(f: np.ndarray, ids: list[int], tau: float) -> float:
    """The definition as written: S = exp(z zᵀ/τ), diagonal 0, mean over ordered positive pairs."""
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    S = np.exp(z @ z.T / tau)
    np.fill_diagonal(S, 0.0)
    terms = [-np.log(S[j, i] / S[:, i].sum()) for i in range(len(ids)) for j in range(len(ids))
             if j != i and ids[j] == ids[i]]
    return float(np.mean(terms))


def test_scl_pair_weighted_mean_and_stability():
    g = np.random.default_rng(0)
    f = g.normal(size=(5, 3))
    ids = [0, 0, 0, 1, 1]  # anchors of source 0 have 2 positives each, of source 1 one each: 8 pairs
    got = source_contrastive_loss(torch.tensor(f), torch.tensor(ids), 0.7).item()
    assert got == pytest.approx(_scl_literal(f, ids, 0.7), rel=1e-10)
    # per-anchor averaging would differ, so the pair weighting is really tested
    z = f / np.linalg.norm(f, axis=1, keepdims=True)
    S = np.exp(z @ z.T / 0.7)
    np.fill_diagonal(S, 0.0)
    per_anchor = np.mean([np.mean([-np.log(S[j, i] / S[:, i].sum()) for j in range(5) if j != i and ids[j] == ids[i]])
                          for i in range(5)])
    assert abs(per_anchor - got) > 1e-4
    # τ = 0.01 in float32: exp(100) overflows, the logsumexp form stays finite and right
    got32 = source_contrastive_loss(torch.tensor(f, dtype=torch.float32), torch.tensor(ids), 0.01)
    assert torch.isfinite(got32)
    assert got32.item() == pytest.approx(_scl_literal(f, ids, 0.01), rel=1e-4)


def test_scl_no_positive_pair_is_zero_with_graph():
    f = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], grad=True)
    loss = source_contrastive_loss(f, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    one = t([[1.0, 2.0]], grad=True)
    loss = source_contrastive_loss(one, [3])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))


# -- Eq. 5 ---------------------------------------------------------------------------------------------------
def test_combine_experts_values_and_layouts():
    s1 = t([[0.2, 0.4, 0.6], [0.1, 0.3, 0.5]], grad=True)
    e = [t([[1.0] * 3] * 2), t([[0.0] * 3] * 2), t([[0.5] * 3, [0.2, 0.4, 0.8]])]
    w = t([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]], grad=True)
    # row 0 mix = 0.5·1 + 0.25·0 + 0.25·0.5 = 0.625; row 1 mix = e3 row 1
    out = combine_experts(s1, e, w, 0.5)
    np.testing.assert_allclose(out.detach().numpy(), [[0.4125, 0.5125, 0.6125], [0.15, 0.35, 0.65]], rtol=1e-12)
    assert out.shape == (2, 3)
    # the stacked layout (K-1, B, C) gives the same
    torch.testing.assert_close(combine_experts(s1, torch.stack(e), w, 0.5), out)
    # authors' two independent ratios: main 0.7, bias 0.5
    out2 = combine_experts(s1, e, w, 0.7, bias_ratio=0.5)
    np.testing.assert_allclose(out2.detach().numpy(),
                               [[0.14 + 0.3125, 0.28 + 0.3125, 0.42 + 0.3125], [0.07 + 0.1, 0.21 + 0.2, 0.35 + 0.4]],
                               rtol=1e-12)
    # conquer-like (λ = 1, β = 0) is the shared network alone
    torch.testing.assert_close(combine_experts(s1, e, w, 1.0, bias_ratio=0.0), s1)
    # (B, C, 1) scores work too
    out3 = combine_experts(s1.unsqueeze(-1), [x.unsqueeze(-1) for x in e], w, 0.5)
    torch.testing.assert_close(out3.squeeze(-1), out)
    out.sum().backward()
    assert torch.allclose(s1.grad, torch.full_like(s1, 0.5))
    # d/dω[b,k] of Σ_c out = 0.5·Σ_c e_k[b, c]
    np.testing.assert_allclose(w.grad.numpy(), [[1.5, 0.0, 0.75], [1.5, 0.0, 0.7]], rtol=1e-12)


def test_combine_experts_shape_errors():
    s1 = torch.rand(2, 3)
    with pytest.raises(ValueError):
        combine_experts(s1, torch.rand(2, 4, 3), torch.rand(2, 4), 0.5)  # (B, K-1, C) is not the layout
    with pytest.raises(ValueError):
        combine_experts(s1, [torch.rand(2, 3)] * 3, torch.rand(2, 2), 0.5)


# -- Ark ---------------------------------------------------------------------------------------------------------
def test_masked_bce_hand_values():
    x = t([[0.0, 2.0], [-1.0, 5.0]], grad=True)
    y = t([[1.0, 0.0], [-1.0, 1.0]])
    m = t([[1, 1], [0, 1]])
    expected = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-5))) / 3
    loss = masked_bce_with_logits(x, y, m)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert x.grad[1, 0].item() == 0.0
    assert x.grad[0, 0].item() == pytest.approx((0.5 - 1) / 3, rel=1e-12)  # (σ(x) - y)/n
    # no mask: plain mean over all entries
    y_all = t([[1.0, 0.0], [0.0, 1.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-5))) / 4
    assert masked_bce_with_logits(x, y_all).item() == pytest.approx(expected, rel=1e-12)
    # nothing known: finite zero, zero gradient
    x.grad = None
    loss = masked_bce_with_logits(x, y, torch.zeros(2, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_ark_consistency_mse_teacher_detached():
    s = t([[1.0, 2.0], [3.0, 4.0]], grad=True)
    te = t([[0.0, 2.0], [3.0, 6.0]], grad=True)
    loss = ark_consistency_loss(s, te)
    assert loss.item() == pytest.approx((1 + 4) / 4, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(s.grad.numpy(), [[0.5, 0.0], [0.0, -1.0]])  # 2(s - t)/4
    assert te.grad is None


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)).double()


def test_ema_update_two_steps_buffers_untouched():
    teacher, student = _net(), _net()
    with torch.no_grad():
        teacher[0].weight.copy_(t([[1.0, 2.0]]))
        teacher[0].bias.fill_(0.0)
        teacher[1].weight.fill_(1.0)
        teacher[1].bias.fill_(0.0)
        teacher[1].running_mean.fill_(7.0)
        student[0].weight.copy_(t([[3.0, -1.0]]))
        student[0].bias.fill_(1.0)
        student[1].weight.fill_(2.0)
        student[1].bias.fill_(-1.0)
        student[1].running_mean.fill_(-3.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student[1].weight.requires_grad_(False)  # frozen student params are averaged too
    ema_update(teacher, student, 0.9)
    # θ = 0.9·θ_t + 0.1·θ_s
    np.testing.assert_allclose(teacher[0].weight.numpy(), [[1.2, 1.7]], rtol=1e-12)
    assert teacher[0].bias.item() == pytest.approx(0.1)
    assert teacher[1].weight.item() == pytest.approx(1.1)
    assert teacher[1].bias.item() == pytest.approx(-0.1)
    with torch.no_grad():
        student[0].weight.zero_()
        student[0].bias.zero_()
    ema_update(teacher, student, 0.5)
    np.testing.assert_allclose(teacher[0].weight.numpy(), [[0.6, 0.85]], rtol=1e-12)
    assert teacher[0].bias.item() == pytest.approx(0.05)
    assert teacher[1].weight.item() == pytest.approx(0.5 * 1.1 + 0.5 * 2.0)
    assert teacher[1].running_mean.item() == 7.0  # buffers untouched
    assert student[1].running_mean.item() == -3.0 and student[0].weight.abs().sum() == 0  # student untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    # m = 1 keeps the teacher, m = 0 copies the student
    before = teacher[0].weight.clone()
    ema_update(teacher, student, 1.0)
    assert torch.equal(teacher[0].weight, before)
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)


def test_ema_update_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(2, 1), nn.Linear(3, 1), 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Sequential(nn.Linear(2, 1)), nn.Sequential(nn.Identity(), nn.Linear(2, 1)), 0.9)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 1), nn.Linear(2, 1), 1.5)


def test_cosine_schedule_endpoints():
    m = cosine_schedule(0.9, 1.0, 2, 3)  # N = 6
    assert isinstance(m, np.ndarray) and m.shape == (6,)
    assert m[0] == 0.9
    assert m[3] == pytest.approx(0.95, rel=1e-12)  # cos(π/2) = 0
    assert m[-1] == pytest.approx(1 - 0.05 * (1 - math.sqrt(3) / 2), rel=1e-12)
    assert np.all(np.diff(m) > 0) and np.all(m < 1.0)
    c = cosine_schedule(0.0, 0.5, 200, 6)
    assert c[0] == 0.0 and c[600] == pytest.approx(0.25) and c[-1] < 0.5 and len(c) == 1200
    assert cosine_schedule(0.9, 1.0, 0, 6).shape == (0,)


# -- self-supervised --------------------------------------------------------------------------------------------
def test_nt_xent_hand_values():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # identical views: each view's positive at 1/τ, two negatives at 0
    for tau in (0.5, 0.1):
        got = nt_xent_loss(t([e1, e2]), t([e1, e2]), tau)
        assert got.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-12)
    # swapped views: positive at 0, the other image's view at 1/τ, one more at 0
    z1 = t([[3.0, 0.0], [0.0, 1.0]], grad=True)  # scale does not matter (normalised)
    got = nt_xent_loss(z1, t([e2, e1]), 0.5)
    assert got.item() == pytest.approx(math.log(2 + math.exp(2)), rel=1e-12)
    got.backward()
    assert torch.isfinite(z1.grad).all()
    assert nt_xent_loss(t([e1]), t([e2])).item() == 0.0  # N = 1: the positive is the only candidate


def test_moco_hand_values_and_constants():
    q = t([[2.0, 0.0]], grad=True)
    k = t([[1.0, 0.0]], grad=True)
    queue = t([[0.0, 1.0], [-1.0, 0.0]], grad=True)
    loss = moco_loss(q, k, queue, 0.2)  # logits [5, 0, -5], positive first
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-5) + math.exp(-10)), rel=1e-12)
    loss.backward()
    assert q.grad is not None and k.grad is None and queue.grad is None
    # two queries, one of them orthogonal to its key: logits [0, 1/τ(q·u)...]
    q2, k2 = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [1.0, 0.0]])
    got = moco_loss(q2, k2, t([[0.0, 1.0]]), 0.5)
    # sample 0: [2, 0] -> log(1 + e^-2); sample 1: [0, 2] -> -0 + log(1 + e^2)
    assert got.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2, rel=1e-12)
    assert moco_loss(q2, k2, torch.zeros(0, 2, dtype=D)).item() == 0.0


def test_vicreg_components_and_total():
    z1 = t([[1.0, 2.0], [3.0, 6.0]], grad=True)
    z2 = t([[0.1, 0.2], [0.3, 0.2]], grad=True)
    terms = vicreg_terms(z1, z2)
    # invariance: mean of (0.9², 1.8², 2.7², 5.8²)
    assert terms["invariance"].item() == pytest.approx((0.81 + 3.24 + 7.29 + 33.64) / 4, rel=1e-12)
    # z1 centred [[-1,-2],[1,2]]: var (2, 8) -> std > 1 -> 0; z2 centred [[-0.1,0],[0.1,0]]: var (0.02, 0)
    var2 = ((1 - math.sqrt(0.02 + 1e-4)) + (1 - math.sqrt(1e-4))) / 2
    assert terms["variance"].item() == pytest.approx(var2 / 2, rel=1e-12)
    # C1 = [[2, 4], [4, 8]] -> (16 + 16)/2; C2 = [[0.02, 0], [0, 0]] -> 0
    assert terms["covariance"].item() == pytest.approx(16.0, rel=1e-12)
    total = vicreg_loss(z1, z2)
    assert total.item() == pytest.approx(25 * 11.245 + 25 * var2 / 2 + 16.0, rel=1e-12)
    total.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    # collapsed identical views: only the variance hinge, 25·(1 - √1e-4)
    c = t([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]])
    assert vicreg_loss(c, c.clone()).item() == pytest.approx(25 * 0.99, rel=1e-12)
    with pytest.raises(ValueError):
        vicreg_loss(t([[1.0, 2.0]]), t([[1.0, 2.0]]))


def test_slip_is_clip_plus_scaled_simclr():
    img, txt = t([[1.0, 0.0], [0.0, 1.0]], grad=True), t([[2.0, 0.0], [1.0, 1.0]])
    z = t([[1.0, 0.0], [0.0, 1.0]], grad=True)
    s, a = 2.0, 1 / math.sqrt(2)  # τ = 0.5
    rows = [-s + lse(s, s * a), -s * a + lse(0, s * a)]
    cols = [-s + lse(s, 0), -s * a + lse(s * a, s * a)]
    clip_term = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    ssl_term = math.log(1 + 2 * math.exp(-2))
    loss = slip_loss(img, txt, z, z.detach().clone(), ssl_scale=0.3, temperature=0.5)
    assert loss.item() == pytest.approx(clip_term + 0.3 * ssl_term, rel=1e-12)
    loss.backward()
    assert img.grad is not None and z.grad is not None
    got = slip_loss(img, txt, z, z.detach().clone(), temperature=0.5, ssl_temperature=0.1)
    assert got.item() == pytest.approx(clip_term + math.log(1 + 2 * math.exp(-10)), rel=1e-12)


# -- gradients flow through every loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["asl", "itc", "scl", "bce", "ark", "simclr", "moco", "vicreg", "slip", "combine"])
def test_gradients_flow(name):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, 4, generator=g, requires_grad=True)
    y = (torch.rand(6, 4, generator=g) > 0.5).float()
    fns = {
        "asl": lambda: asymmetric_loss(a, y, (b > 0).float()),
        "itc": lambda: image_text_contrastive_loss(a, b),
        "scl": lambda: source_contrastive_loss(a, torch.tensor([0, 0, 1, 1, 2, 3])),
        "bce": lambda: masked_bce_with_logits(a, y, (b > 0).float()),
        "ark": lambda: ark_consistency_loss(a, b),
        "simclr": lambda: nt_xent_loss(a, b),
        "moco": lambda: moco_loss(a, b, torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)),
        "vicreg": lambda: vicreg_loss(a, b),
        "slip": lambda: slip_loss(a, b, a * 2, b * 2),
        "combine": lambda: combine_experts(torch.sigmoid(a), torch.sigmoid(b).expand(2, 6, 4),
                                           torch.softmax(a[:, :2], 1), 0.5).sum(),
    }
    loss = fns[name]()
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
