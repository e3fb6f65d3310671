r"""Losses for contrastive and ranking objectives on unit-sphere embeddings.

All pairwise losses work on the Gram matrix of the batch and a triangular mask: nothing
allocates an index tensor of all pairs, and the ``log mean exp`` is evaluated with
``logsumexp`` so it cannot overflow or underflow.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cm3_pyg.nn.functional import normalize_rows


def alignment_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Alignment of positive pairs, :math:`\frac{1}{N}\sum_n \|x_n - y_n\|_2^{\alpha}`.

    Args:
        x: ``[N, d]`` (typically unit rows, e.g. users).
        y: ``[N, d]`` their positives (e.g. interacted items).
        alpha: exponent (2 in CM3).
    """
    if x.shape != y.shape:
        raise ValueError(
            "alignment_loss needs x and y of the same shape, "
            f"got {list(x.shape)} and {list(y.shape)}"
        )
    sq = (x - y).pow(2).sum(dim=-1)
    if alpha == 2:  # avoids the norm's undefined gradient at x == y
        return sq.mean()
    return sq.clamp_min(1e-30).pow(alpha / 2).mean()


def pairwise_sq_distances(x: Tensor) -> Tensor:
    r"""``[N, N]`` squared Euclidean distances from the Gram matrix, clamped at 0."""
    sq_norm = x.pow(2).sum(dim=-1)
    return (sq_norm.unsqueeze(0) + sq_norm.unsqueeze(1) - 2.0 * (x @ x.t())).clamp_min(0.0)


def cosine_similarity_matrix(
    x: Tensor, min_sim: float | None = None, max_sim: float | None = None
) -> Tensor:
    r"""``[N, N]`` cosine similarities of the rows of ``x``, optionally clamped.

    Exact at any row scale; a zero row has similarity 0 to every row.
    """
    xn = normalize_rows(x)
    sim = xn @ xn.t()
    if min_sim is not None or max_sim is not None:
        sim = sim.clamp(min=min_sim, max=max_sim)
    return sim


def _neg_scaled_sq_distances(x: Tensor, t: float) -> Tensor:
    r""":math:`-t \|x_a - x_b\|^2` for all pairs as ONE matrix product.

    :math:`-t\|x_a - x_b\|^2 = 2t\,x_a\cdot x_b - t n_a - t n_b` with :math:`n = \|x\|^2`
    is the inner product of :math:`[\sqrt{2t} x_a, -t n_a, 1]` and
    :math:`[\sqrt{2t} x_b, 1, -t n_b]`; one GEMM replaces a Gram matrix plus several
    ``[N, N]`` broadcasts (the losses' main cost on CPU).
    """
    sq_norm = x.pow(2).sum(dim=-1, keepdim=True)
    ones = torch.ones_like(sq_norm)
    scaled = x * math.sqrt(2.0 * t)
    left = torch.cat([scaled, -t * sq_norm, ones], dim=-1)
    right = torch.cat([scaled, ones, -t * sq_norm], dim=-1)
    return left @ right.t()


@functools.lru_cache(maxsize=8)
def _not_upper_mask(n: int, device: torch.device) -> Tensor:
    """``[n, n]`` bool, True on and below the diagonal (the entries a >= b)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


class _UpperLogSumExp(torch.autograd.Function):
    r""":math:`\log \sum_{a<b} \exp(L_{ab})` with a hand-written backward.

    The backward is the softmax over the strict upper triangle, kept from the forward
    pass, so forward plus backward touch the ``[N, N]`` matrix only a few times.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor) -> Tensor:
        masked = logits.masked_fill(_not_upper_mask(logits.size(0), logits.device), float("-inf"))
        peak = masked.max()
        weights = masked.sub_(peak).exp_()
        total = weights.sum()
        ctx.save_for_backward(weights, total)
        return peak + total.log()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        weights, total = ctx.saved_tensors
        return weights * (grad / total)


def _log_mean_exp_upper(logits: Tensor) -> Tensor:
    r""":math:`\log \frac{2}{N(N-1)} \sum_{a<b} \exp(\mathrm{logits}_{ab})` for a square matrix."""
    n = logits.size(0)
    return _UpperLogSumExp.apply(logits) - math.log(n * (n - 1) / 2)


def _no_pairs(x: Tensor) -> Tensor:
    # A batch of one row has no pairs: the loss is 0 (still connected to the graph so that
    # backward() works unchanged).
    return x.sum() * 0.0


def uniformity_loss(x: Tensor, t: float = 2.0) -> Tensor:
    r"""Uniformity on the hypersphere (Wang & Isola, 2020).

    .. math::
        \mathcal{L}_{\mathrm{unif}}(X) = \log \frac{2}{N(N-1)} \sum_{a<b}
            e^{-t \|x_a - x_b\|_2^2}

    Args:
        x: ``[N, d]`` rows (unit rows in CM3). Duplicate rows count as pairs at distance 0.
        t: temperature (2 in CM3).

    Returns:
        scalar; 0 when ``N < 2``.
    """
    if x.size(0) < 2:
        return _no_pairs(x)
    return _log_mean_exp_upper(_neg_scaled_sq_distances(x, t))


def calibrated_uniformity_loss(x: Tensor, sim: Tensor, t: float = 2.0) -> Tensor:
    r"""CM3's calibrated uniformity: repel pairs only beyond their multimodal similarity.

    .. math::
        \mathcal{L}_{\mathrm{cu}}(X) = \log \frac{2}{N(N-1)} \sum_{a<b}
            e^{-t (\|x_a - x_b\|_2^2 - 2 + 2 s_{ab})}

    For unit rows the exponent is :math:`2t(\cos(x_a, x_b) - s_{ab})`. With
    :math:`s_{ab} \in [s_{\min}, s_{\max}]`:
    :math:`\mathcal{L}_{\mathrm{unif}} + 2t(1 - s_{\max}) \le \mathcal{L}_{\mathrm{cu}}
    \le \mathcal{L}_{\mathrm{unif}} + 2t(1 - s_{\min})`.

    Args:
        x: ``[N, d]`` rows (unit rows in CM3).
        sim: ``[N, N]`` similarities, already clamped (only entries ``a < b`` are read).
        t: temperature.

    Returns:
        scalar; 0 when ``N < 2``.
    """
    n = x.size(0)
    if sim.shape != (n, n):
        raise ValueError(f"sim must have shape [{n}, {n}], got {list(sim.shape)}")
    if n < 2:
        return _no_pairs(x) + sim.sum() * 0.0
    # exponent -t(d^2 - 2 + 2 s) = -t d^2 - 2t s + 2t; the constant leaves the log-sum-exp.
    logits = _neg_scaled_sq_distances(x, t).sub_(sim, alpha=2.0 * t)
    return _log_mean_exp_upper(logits) + 2.0 * t


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian personalised ranking, :math:`-\frac{1}{N}\sum \log\sigma(s^+ - s^-)`.

    Args:
        pos_scores: ``[N]`` scores of observed (user, item) pairs.
        neg_scores: ``[N]`` (or ``[N, K]`` for K negatives per row) scores of sampled negatives.
    """
    if neg_scores.dim() == pos_scores.dim() + 1:
        pos_scores = pos_scores.unsqueeze(-1)
    return -F.logsigmoid(pos_scores - neg_scores).mean()
