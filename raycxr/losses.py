"""Loss functions, schedules and the EMA update for Ark, UniChest and the self-supervised baselines.

Plain functions on tensors; nothing here owns parameters. Defaults follow the authors' code as
summarised in ``docs/references.md`` (UniChest: U.3 Eq. 5, U.4; Ark: A.3, A.4); where the paper
differs and its variant is useful it is offered as a keyword. Deliberate differences from the
authors' code are marked "Deliberate difference" in the docstrings:

- :func:`asymmetric_loss` never touches torch's global grad mode (the authors' ASL calls
  ``torch.set_grad_enabled(True)``, re-enabling grad inside ``no_grad``); the focal weight is
  detached by computing it from ``p.detach()`` instead.
- :func:`source_contrastive_loss` returns a zero that keeps the autograd graph when the batch has
  no same-source pair (the authors' code raises ``RuntimeError`` on an empty ``torch.stack``).
- :func:`combine_experts` uses the paper's ``1-λ`` for the expert weight unless ``bias_ratio`` is
  given (the authors pass two independent ratios, 0.5 / 0.5, which equals λ = 0.5).
- The release bugs of UniChest (U.11) are not reproduced.

Conventions: ``mask`` tensors have the shape of the targets, nonzero = label known, 0 = missing or
not annotated by the source; masked entries contribute nothing to the value and receive exactly
zero gradient, whatever their target holds (-1, NaN, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNICHEST_ITC_SCALE",
    "DiceBCELoss",
    "ark_consistency_loss",
    "asymmetric_loss",
    "byol_consistency_loss",
    "combine_experts",
    "cosine_schedule",
    "ema_update",
    "image_text_contrastive_loss",
    "masked_bce_with_logits",
    "moco_loss",
    "nt_xent_loss",
    "slip_loss",
    "source_contrastive_loss",
    "umif_alignment_loss",
    "vicreg_loss",
    "vicreg_terms",
]

#: UniChest/KAD's image-text logit multiplier ``ln(1/0.07)``, used as is (never exponentiated, never
#: learned), i.e. an effective temperature of about 0.376 (references U.4).
UNICHEST_ITC_SCALE: float = math.log(1 / 0.07)

_REDUCTIONS = ("sum", "mean", "none")


def _known(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Boolean mask broadcast-checked against ``like`` (None stays None)."""
    if mask is None:
        return None
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from targets shape {tuple(like.shape)}")
    return mask.to(device=like.device) != 0


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to the graph of ``tensors`` (gradient exactly zero, never NaN)."""
    return sum((t.sum() * 0.0 for t in tensors), start=torch.zeros((), device=tensors[0].device,
                                                                    dtype=tensors[0].dtype))


# -- UniChest ---------------------------------------------------------------------------------------
def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None, *,
                    gamma_neg: float = 6.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                    from_probs: bool = False, reduction: str = "sum", detach_focal: bool = True) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) as UniChest codes it (references U.4).

    With ``p = σ(logits)`` (or ``p = logits`` when ``from_probs=True``, UniChest's path on the Eq. 5
    mixed probabilities) and targets ``y`` in [0, 1], per entry::

        p₋   = min(1 - p + clip, 1)                      (p₋ = 1 - p when clip <= 0)
        pt   = p·y + p₋·(1 - y)
        γ    = γ₊·y + γ₋·(1 - y)
        w    = (1 - pt)^γ                                 (detached: a constant for autograd)
        ℓ    = -[y·log(max(p, eps)) + (1 - y)·log(max(p₋, eps))] · w

    The focal weight ``w`` is only applied when ``γ₋ > 0`` or ``γ₊ > 0``.

    Args:
        logits: scores ``(…)``; logits, or probabilities when ``from_probs``.
        targets: same shape, in [0, 1] (soft labels allowed) where known.
        mask: same shape; nonzero = known, 0 = missing. Missing entries are dropped, which equals the
            authors' boolean indexing ``pred[label != -1]``. ``None``: every entry counts.
        reduction: ``"sum"`` (authors' default: no division by the count), ``"mean"`` (mean over the
            known entries; 0 when none is known) or ``"none"`` (per entry, 0 at masked entries).
        detach_focal: ``True`` (authors' ``disable_torch_grad_focal_loss=True``) treats ``w`` as a
            constant; ``False`` back-propagates through it (the ASL paper's plain formula).

    Deliberate difference: the authors compute ``w`` under ``torch.set_grad_enabled(False)`` and then
    call ``set_grad_enabled(True)`` unconditionally, which flips the global grad mode even inside
    ``torch.no_grad()``; here ``w`` is computed from detached tensors and grad mode is never touched.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from targets shape {tuple(targets.shape)}")
    known = _known(mask, targets)
    y = targets.to(logits.dtype)
    if known is not None:  # neutralise whatever the missing entries hold (-1, NaN) before any arithmetic
        y = torch.where(known, y, torch.zeros_like(y))

    def _parts(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_neg = 1.0 - p
        if clip is not None and clip > 0:
            p_neg = (p_neg + clip).clamp(max=1.0)
        return p, p_neg

    p = logits if from_probs else torch.sigmoid(logits)
    p_pos, p_neg = _parts(p)
    loss = y * torch.log(p_pos.clamp(min=eps)) + (1.0 - y) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        q_pos, q_neg = _parts(p.detach()) if detach_focal else (p_pos, p_neg)
        yw = y.detach() if detach_focal else y
        pt = q_pos * yw + q_neg * (1.0 - yw)
        gamma = gamma_pos * yw + gamma_neg * (1.0 - yw)
        loss = loss * torch.pow(1.0 - pt, gamma)
    loss = -loss
    if known is not None:
        loss = torch.where(known, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    n = known.sum() if known is not None else torch.tensor(loss.numel(), device=loss.device)
    return total / n.clamp(min=1).to(total.dtype)


def image_text_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                                temperature: float | torch.Tensor | None = None, *,
                                normalize: bool = False) -> torch.Tensor:
    """Symmetric image-text InfoNCE over the local batch (UniChest/KAD ``ClipLoss``, references U.4).

    With ``I, T`` of shape ``(N, D)`` (row i of ``I`` matches row i of ``T``) and logits
    ``L = s · I Tᵀ``::

        loss = ½ [ CE(L, diag) + CE(Lᵀ, diag) ]        (CE = mean cross-entropy over the N rows)

    which equals the authors' ``[KL_sum(log_softmax(L), eye) + KL_sum(log_softmax(Lᵀ), eye)] / (2N)``.

    Args:
        temperature: ``None`` (authors' default): the fixed multiplier ``s = ln(1/0.07) ≈ 2.659``,
            not exponentiated (effective temperature ≈ 0.376). Otherwise ``s = 1 / temperature``
            (a tensor, e.g. a learnable one, is accepted).
        normalize: ``False`` (authors): raw embeddings. ``True``: L2-normalise both first
            (CLIP / ConVIRT, and the paper's description).

    A batch of one gives 0 (a single candidate), an empty batch gives 0; negatives are local (no
    all-gather), as in the authors' single-process ``ClipLoss``.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb and text_emb must both be (N, D); got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        return _zero(image_emb, text_emb)
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    if temperature is None:
        scale: float | torch.Tensor = UNICHEST_ITC_SCALE
    else:
        if not isinstance(temperature, torch.Tensor) and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scale = 1.0 / temperature
    logits = scale * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def source_contrastive_loss(features: torch.Tensor, source_ids: torch.Tensor | Sequence[int],
                            temperature: float = 1.0) -> torch.Tensor:
    """UniChest's source contrastive loss (SCL, ``moe_cl_loss``; references U.4).

    ``z = f / ‖f‖``, ``S = exp(z zᵀ / τ)`` with the diagonal set to 0. For every ordered pair
    (anchor i, positive j ≠ i) from the same source::

        ℓ_ij = -log( S[j,i] / Σ_{k≠i} S[k,i] )
             = logsumexp_{k≠i}(z_k·z_i / τ) - z_j·z_i / τ          (the stable form computed here)

    and ``loss = mean of ℓ_ij over all positive pairs`` (pair-weighted, not averaged per anchor).
    The denominator runs over every other sample, positives included. A sample whose source has no
    other sample in the batch is no anchor (and no positive) but stays in the others' denominators.

    Args:
        features: ``(B, D)`` (UniChest: ``Linear(K-1, 32)`` on the gate vector).
        source_ids: ``(B,)`` integer source (``dataset_label``) per sample.
        temperature: τ; the authors call it with the default 1.0.

    Deliberate difference: a batch with no positive pair returns a 0 connected to the graph (zero
    gradient) instead of raising ``RuntimeError`` as the authors' code does.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (B, D), got {tuple(features.shape)}")
    src = torch.as_tensor(source_ids, device=features.device)
    if src.shape != features.shape[:1]:
        raise ValueError(f"source_ids must have shape ({features.shape[0]},), got {tuple(src.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = features.shape[0]
    if b < 2:
        return _zero(features)
    z = F.normalize(features, dim=1)
    sim = z @ z.t() / temperature  # symmetric, so column i (anchor i) equals row i
    eye = torch.eye(b, dtype=torch.bool, device=features.device)
    log_denom = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=0)  # (B,) over k ≠ i, per anchor i
    pos = (src[:, None] == src[None, :]) & ~eye  # pos[j, i]: j is a positive of anchor i
    terms = torch.where(pos, log_denom[None, :] - sim, torch.zeros_like(sim))
    n_pos = pos.sum()
    return terms.sum() / n_pos.clamp(min=1).to(terms.dtype)  # 0 (graph kept) when no positive pair


def combine_experts(s1: torch.Tensor, expert_scores: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor,
                    lam: float, *, bias_ratio: float | None = None) -> torch.Tensor:
    """UniChest Eq. 5: ``out = λ·s1 + β·Σ_k ω_k·s_k`` with ``β = 1-λ`` (paper) or ``bias_ratio`` (code).

    Args:
        s1: shared query-network probabilities ``(B, C)`` (any ``(B, …)`` works).
        expert_scores: the K-1 expert probabilities, either a list of tensors shaped like ``s1`` or
            one tensor of layout **(K-1, B, …)** (expert first, i.e. ``torch.stack(list, 0)``).
        weights: gate ``ω`` of shape ``(B, K-1)`` (softmax over experts).
        lam: λ, the weight of the shared network (UniChest divide/test: 0.5).
        bias_ratio: the expert weight β. ``None`` uses ``1 - λ`` (paper). The authors' code passes two
            independent ratios, ``main_ratio=0.5, bias_ratio=0.5``; at λ = 0.5 both give the same output.

    Returns:
        ``(B, …)`` mixed scores (probabilities when the inputs are, as in UniChest, where ASL then takes
        them with ``from_probs=True``).
    """
    experts = torch.stack(list(expert_scores), 0) if not isinstance(expert_scores, torch.Tensor) else expert_scores
    if experts.shape[1:] != s1.shape:
        raise ValueError(f"expert_scores must be (K-1, *s1.shape) = (K-1, {', '.join(map(str, s1.shape))}); "
                         f"got {tuple(experts.shape)}")
    n_exp, b = experts.shape[0], s1.shape[0]
    if weights.shape != (b, n_exp):
        raise ValueError(f"weights must be (B, K-1) = ({b}, {n_exp}), got {tuple(weights.shape)}")
    w = weights.t().reshape(n_exp, b, *([1] * (s1.ndim - 1))).to(experts.dtype)
    mixed = (w * experts).sum(0)
    beta = 1.0 - lam if bias_ratio is None else bias_ratio
    return lam * s1 + beta * mixed


# -- Ark ----------------------------------------------------------------------------------------------
def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over the known entries::

        loss = Σ_known BCE(x, y) / #known           (0 when nothing is known)

    ``BCE(x, y) = max(x, 0) - x·y + log(1 + e^{-|x|})``. ``mask=None`` is torch's plain mean (Ark's
    ``BCEWithLogitsLoss``). Masked entries get exactly zero gradient whatever their target holds.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from targets shape {tuple(targets.shape)}")
    known = _known(mask, targets)
    y = targets.to(logits.dtype)
    if known is not None:
        y = torch.where(known, y, torch.zeros_like(y))
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    if known is None:
        return loss.sum() / max(loss.numel(), 1)
    loss = torch.where(known, loss, torch.zeros_like(loss))
    return loss.sum() / known.sum().clamp(min=1).to(loss.dtype)


def ark_consistency_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Ark's student-teacher consistency (references A.4): ``mean_{B×P} (s - t)²`` between the
    projector outputs of the student (view 1) and the teacher (view 2). The teacher output is
    detached (the authors' teacher has ``requires_grad=False``; same gradient)."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student_out {tuple(student_out.shape)} and teacher_out {tuple(teacher_out.shape)} differ")
    return F.mse_loss(student_out, teacher_out.detach().to(student_out.dtype))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place ``θ_t ← m·θ_t + (1-m)·θ_s`` for every parameter (references A.3).

    Parameters are paired by name (the authors zip ``parameters()`` in order, which is the same
    pairing for identically built models) and all of them are updated, frozen or not; buffers
    (e.g. BatchNorm statistics) are left untouched, as in Ark.

    Raises:
        ValueError: if the parameter names or shapes differ, or ``momentum`` is outside [0, 1].
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        only_t = sorted(t_params.keys() - s_params.keys())
        only_s = sorted(s_params.keys() - t_params.keys())
        raise ValueError(f"teacher and student parameters differ: only in teacher {only_t[:5]}, "
                         f"only in student {only_s[:5]}")
    bad = [(n, tuple(t_params[n].shape), tuple(p.shape)) for n, p in s_params.items() if p.shape != t_params[n].shape]
    if bad:
        raise ValueError(f"teacher/student parameter shapes differ (name, teacher, student): {bad[:5]}")
    for name, ps in s_params.items():
        pt = t_params[name]
        pt.mul_(momentum).add_(ps.detach().to(device=pt.device, dtype=pt.dtype), alpha=1.0 - momentum)


def cosine_schedule(base: float, final: float, rounds: int, steps_per_round: int) -> np.ndarray:
    """Ark/DINO cosine schedule without warm-up (references A.3)::

        sched[k] = final + ½(base - final)(1 + cos(π k / N)),   k = 0 … N-1,   N = rounds · steps_per_round

    ``sched[0] == base``; ``final`` is approached but never reached. Ark indexes it with
    ``it = round · n_datasets + task`` for the EMA momentum (0.9 → 1) and the consistency weight (0 → 0.5).
    """
    if rounds < 0 or steps_per_round < 0:
        raise ValueError(f"rounds and steps_per_round must be >= 0, got {rounds}, {steps_per_round}")
    n = int(rounds) * int(steps_per_round)
    k = np.arange(n, dtype=np.float64)
    return final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * k / max(n, 1)))


# -- Self-supervised baselines ------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views (Chen et al. 2020).

    ``z = normalize([z1; z2])`` ``(2N, D)``, ``sim = z zᵀ / τ``; for each view a its positive is the
    other view of the same image, the candidates are the 2N-1 other views::

        loss = mean_a [ -sim[a, pos(a)] + log Σ_{b≠a} exp(sim[a, b]) ]

    N = 1 gives 0 (the positive is the only candidate); an empty batch gives 0.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    if n == 0:
        return _zero(z1, z2)
    z = F.normalize(torch.cat([z1, z2], 0), dim=1)
    sim = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    idx = torch.arange(n, device=z.device)
    labels = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, labels)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v2 InfoNCE (He et al. 2020; Chen et al. 2020).

    ``q, k`` ``(N, D)`` are L2-normalised here; ``queue`` ``(K, D)`` holds past keys, already
    normalised as MoCo stores them. Logits ``[q·k, q·queueᵀ] / τ`` ``(N, 1+K)``, positive at index 0::

        loss = mean_n [ -q_n·k_n/τ + log( exp(q_n·k_n/τ) + Σ_j exp(q_n·u_j/τ) ) ]

    ``k`` and ``queue`` come from the momentum encoder and are treated as constants (detached).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (N, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.shape[0] == 0:
        return _zero(q)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1).to(q.dtype)
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.detach().to(device=q.device, dtype=q.dtype).t()
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, *, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """The three unweighted VICReg terms (Bardes et al. 2022), as in the official implementation.

    With batch size N ≥ 2, D features, and centred ``z̄ = z - mean_N z``::

        invariance = mean_{N×D} (z1 - z2)²
        variance   = ½ [ mean_d relu(1 - √(Var(z1_d) + eps)) + mean_d relu(1 - √(Var(z2_d) + eps)) ]
        covariance = Σ_{i≠j} C1[i,j]² / D + Σ_{i≠j} C2[i,j]² / D,     C = z̄ᵀ z̄ / (N - 1)

    (Var unbiased.) Raises ``ValueError`` for N < 2, where variance and covariance are undefined.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n, d = z1.shape
    if n < 2:
        raise ValueError(f"VICReg needs a batch of at least 2 (variance/covariance undefined), got {n}")
    invariance = F.mse_loss(z1, z2)
    off = ~torch.eye(d, dtype=torch.bool, device=z1.device)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        zc = z - z.mean(0)
        std = torch.sqrt(zc.var(0) + eps)
        variance = variance + F.relu(1.0 - std).mean() / 2
        cov = zc.t() @ zc / (n - 1)
        covariance = covariance + cov[off].pow(2).sum() / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> torch.Tensor:
    """VICReg total ``λ·invariance + μ·variance + ν·covariance`` with the paper's λ = μ = 25, ν = 1
    (terms as in :func:`vicreg_terms`)."""
    t = vicreg_terms(z1, z2)
    return sim_coeff * t["invariance"] + std_coeff * t["variance"] + cov_coeff * t["covariance"]


def slip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
              ssl_scale: float = 1.0, temperature: float = 0.1, *,
              ssl_temperature: float | None = None) -> torch.Tensor:
    """SLIP (Mu et al. 2022): ``CLIP(image, text) + ssl_scale · NT-Xent(z1, z2)``.

    The CLIP term is :func:`image_text_contrastive_loss` with ``normalize=True`` and the fixed
    ``temperature`` (SLIP learns it; a fixed one is used here). The SimCLR term uses
    ``ssl_temperature`` (default: ``temperature``; SLIP's is 0.1).
    """
    clip_term = image_text_contrastive_loss(image_emb, text_emb, temperature, normalize=True)
    ssl_term = nt_xent_loss(z1, z2, temperature if ssl_temperature is None else ssl_temperature)
    return clip_term + ssl_scale * ssl_term


class DiceBCELoss(nn.Module):
    """MONAI soft Dice (sigmoid, over the whole batch) plus binary cross-entropy, per output channel.

    The Dice term is computed over the batch (``batch=True``) so that images with an empty mask (SIIM
    negatives) do not give a 0/0 Dice each. For one channel this is MONAI ``DiceCELoss(sigmoid=True)``."""

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        from monai.losses import DiceLoss

        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = float(lambda_dice), float(lambda_bce)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


# -- UmiF -------------------------------------------------------------------------------------------
def umif_alignment_loss(f1: torch.Tensor, f0: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """UmiF's alignment loss (Eq. 1): SimCLR's loss between the two token groups' CLS encodings.

    The 2B points are ``[f1; f0]``; each point's positive is the other group of the same pair and the
    candidates are the 2B-1 other points (cosine similarity over τ)::

        L_align = 1/B Σ_pairs ℓ(f1_i, f0_i) + ℓ(f0_i, f1_i)  =  2 · nt_xent_loss(f1, f0, τ)

    (NT-Xent averages over the 2B points, Eq. 1 sums both directions and divides by B.)
    """
    return 2.0 * nt_xent_loss(f1, f0, temperature)


def byol_consistency_loss(teacher: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
    """UmiF's consistency loss (Eq. 2, BYOL's): the student's group encodings ``f0``, ``f1`` predict the
    EMA teacher's CLS ``t`` on the complete token sequence::

        L_con = 1/B Σ_i (2 - 2 cos(t_i, f0_i)) + (2 - 2 cos(t_i, f1_i))

    The teacher is a target: no gradient flows into it. An empty batch gives 0.
    """
    if teacher.ndim != 2 or teacher.shape != f0.shape or f0.shape != f1.shape:
        raise ValueError(f"teacher, f0 and f1 must all be (B, D); got {tuple(teacher.shape)}, {tuple(f0.shape)}, "
                         f"{tuple(f1.shape)}")
    if teacher.shape[0] == 0:
        return _zero(f0, f1)
    t = F.normalize(teacher.detach(), dim=1)
    cos0 = (t * F.normalize(f0, dim=1)).sum(1)
    cos1 = (t * F.normalize(f1, dim=1)).sum(1)
    return ((2 - 2 * cos0) + (2 - 2 * cos1)).mean()
