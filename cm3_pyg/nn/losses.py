r"""Losses for contrastive and ranking objectives on unit-sphere embeddings.

The pairwise losses work on one Gram matrix of the batch inside a fused kernel with a
hand-written backward (:mod:`cm3_pyg.nn.kernels.pairwise`): nothing allocates an index
tensor of all pairs, the ``log mean exp`` is shifted by a bound of its terms (or their
maximum) so it cannot overflow or underflow, and repeated rows can be passed once with
their multiplicity. Their plain versions are in :mod:`cm3_pyg.nn.reference`;
:func:`cm3_pyg.nn.kernels.use_kernel` picks one per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3_pyg.checks import check_int, check_number, check_tensor
from cm3_pyg.nn import reference
from cm3_pyg.nn.functional import normalize_rows
from cm3_pyg.nn.kernels import gaussian, pairwise, use_kernel


def alignment_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Alignment of positive pairs, :math:`\frac{1}{N}\sum_n \|x_n - y_n\|_2^{\alpha}`.

    Args:
        x: ``[N, d]`` (typically unit rows, e.g. users).
        y: ``[N, d]`` their positives (e.g. interacted items).
        alpha: exponent (2 in CM3).
    """
    check_tensor(x, "alignment_loss: x", dims=2, floating=True)
    check_tensor(y, "alignment_loss: y", dims=2, floating=True)
    alpha = check_number(alpha, "alignment_loss: alpha", minimum=0, exclusive_minimum=True)
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
    check_tensor(x, "pairwise_sq_distances: x", dims=2, floating=True)
    sq_norm = x.pow(2).sum(dim=-1)
    return (sq_norm.unsqueeze(0) + sq_norm.unsqueeze(1) - 2.0 * (x @ x.t())).clamp_min(0.0)


def cosine_similarity_matrix(
    x: Tensor, min_sim: float | None = None, max_sim: float | None = None
) -> Tensor:
    r"""``[N, N]`` cosine similarities of the rows of ``x``, optionally clamped.

    Exact at any row scale; a zero row has similarity 0 to every row.
    """
    check_tensor(x, "cosine_similarity_matrix: x", dims=2, floating=True)
    min_sim, max_sim = check_similarity_bounds(min_sim, max_sim, "cosine_similarity_matrix")
    xn = normalize_rows(x)
    sim = xn @ xn.t()
    if min_sim is not None or max_sim is not None:
        sim = sim.clamp(min=min_sim, max=max_sim)
    return sim


class ClampedCosineSimilarity(NamedTuple):
    r"""The matrix :math:`s_{ab} = \mathrm{clamp}(\cos(f_a, f_b), s_{\min}, s_{\max})`, unevaluated.

    Passed as ``sim`` to :func:`calibrated_uniformity_loss`, which then forms it inside its
    fused kernel: one Gram product forward and one backward (autograd through
    :func:`cosine_similarity_matrix` needs two backward products and keeps more ``[N, N]``
    buffers). Same values and gradients as the explicit matrix.

    Attributes:
        features: ``[N, k]`` rows (any scale; normalised with
            :func:`~cm3_pyg.nn.normalize_rows`).
        min_sim: lower clamp (``None``: none).
        max_sim: upper clamp (``None``: none).
    """

    features: Tensor
    min_sim: float | None = None
    max_sim: float | None = None


def check_similarity_bounds(
    min_sim: float | None, max_sim: float | None, where: str
) -> tuple[float | None, float | None]:
    """The clamp bounds as floats after checking each is ``None`` or a finite number and
    ``min_sim <= max_sim``."""
    if min_sim is not None:
        min_sim = check_number(min_sim, f"{where}: min_sim")
    if max_sim is not None:
        max_sim = check_number(max_sim, f"{where}: max_sim")
    if min_sim is not None and max_sim is not None and min_sim > max_sim:
        raise ValueError(f"{where}: min_sim ({min_sim:g}) must be <= max_sim ({max_sim:g})")
    return min_sim, max_sim


def _pairwise_uniformity(
    x: Tensor,
    t: float,
    counts: Tensor | None,
    sim: Tensor | ClampedCosineSimilarity | None,
    offset: float = 0.0,
) -> Tensor:
    r"""Shared body of the two uniformity losses: :math:`\log` of the mean of
    :math:`e^{\ell_{ab}}` over ordered pairs of distinct batch positions, plus ``offset``
    (0 when the batch has no pairs)."""
    where = "uniformity_loss" if sim is None else "calibrated_uniformity_loss"
    check_tensor(x, f"{where}: x", dims=2, floating=True)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"the uniformity temperature t must be a number, got {t!r}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"the uniformity temperature t must be a finite number > 0, got {t!r}")
    n = x.size(0)
    if counts is None:
        size = float(n)
    else:
        check_tensor(counts, f"{where}: counts")
        if counts.shape != (n,):
            raise ValueError(f"counts must have shape [{n}], got {list(counts.shape)}")
        counts = counts.to(x.dtype)
        if bool((counts < 1).any()):
            raise ValueError("counts must be >= 1 (multiplicity of each row in the batch)")
        if bool((counts != counts.round()).any()):
            raise ValueError("counts must be whole numbers (multiplicity of each row in the batch)")
        size = float(counts.sum())
    if isinstance(sim, ClampedCosineSimilarity):
        check_tensor(sim.features, f"{where}: sim.features", dims=2, floating=True)
        check_similarity_bounds(sim.min_sim, sim.max_sim, where)
        if sim.features.size(0) != n:
            raise ValueError(
                f"sim.features must have {n} rows (one per row of x), got {sim.features.size(0)}"
            )
    elif sim is not None:
        check_tensor(sim, f"{where}: sim", floating=True)
        if sim.shape != (n, n):
            raise ValueError(f"sim must have shape [{n}, {n}], got {list(sim.shape)}")
    if not use_kernel("pairwise_log_sum_exp", x):
        if sim is None:
            return reference.uniformity_loss(x, t, counts)
        return reference.calibrated_uniformity_loss(x, sim, t, counts)
    features = min_sim = max_sim = None
    sim_tensor = None
    if isinstance(sim, ClampedCosineSimilarity):
        features = normalize_rows(sim.features)
        min_sim, max_sim = sim.min_sim, sim.max_sim
    elif sim is not None:
        # Only the upper triangle (and, for repeated rows, the diagonal) is read; mirroring
        # it makes the matrix exactly symmetric, which the fused backward relies on.
        upper = torch.triu(sim, diagonal=1)
        sim_tensor = upper + upper.t() + torch.diag_embed(sim.diagonal())
    if size < 2:
        # No pairs: the loss is 0 (still connected to the graph so backward() works).
        zero = x.sum() * 0.0
        if features is not None:
            zero = zero + features.sum() * 0.0
        if sim_tensor is not None:
            zero = zero + sim_tensor.sum() * 0.0
        return zero
    lse = pairwise.pairwise_log_sum_exp(x, counts, sim_tensor, features, min_sim, max_sim, t)
    return lse - math.log(size * (size - 1.0)) + offset


def uniformity_loss(x: Tensor, t: float = 2.0, counts: Tensor | None = None) -> Tensor:
    r"""Uniformity on the hypersphere (Wang & Isola, 2020).

    .. math::
        \mathcal{L}_{\mathrm{unif}}(X) = \log \frac{2}{B(B-1)} \sum_{a<b}
            e^{-t \|x_a - x_b\|_2^2}

    over the ``B`` rows of a batch. Duplicate rows count as pairs at distance 0; pass each
    distinct row once with its multiplicity in ``counts`` for the same value and gradient
    at less cost (``B = counts.sum()``).

    Args:
        x: ``[N, d]`` rows (unit rows in CM3).
        t: temperature (2 in CM3).
        counts: optional ``[N]`` multiplicities (>= 1) of the rows in the batch.

    Returns:
        scalar; 0 when ``B < 2``.
    """
    return _pairwise_uniformity(x, t, counts, None)


def calibrated_uniformity_loss(
    x: Tensor,
    sim: Tensor | ClampedCosineSimilarity,
    t: float = 2.0,
    counts: Tensor | None = None,
) -> Tensor:
    r"""CM3's calibrated uniformity: repel pairs only beyond their multimodal similarity.

    .. math::
        \mathcal{L}_{\mathrm{cu}}(X) = \log \frac{2}{B(B-1)} \sum_{a<b}
            e^{-t (\|x_a - x_b\|_2^2 - 2 + 2 s_{ab})}

    For unit rows the exponent is :math:`2t(\cos(x_a, x_b) - s_{ab})`. With
    :math:`s_{ab} \in [s_{\min}, s_{\max}]`:
    :math:`\mathcal{L}_{\mathrm{unif}} + 2t(1 - s_{\max}) \le \mathcal{L}_{\mathrm{cu}}
    \le \mathcal{L}_{\mathrm{unif}} + 2t(1 - s_{\min})`.

    Args:
        x: ``[N, d]`` rows (unit rows in CM3).
        sim: ``[N, N]`` similarities, already clamped (only entries ``a < b`` are read, and
            the diagonal for repeated rows), or a :class:`ClampedCosineSimilarity` of
            ``[N, k]`` features (faster: formed inside the fused kernel).
        t: temperature.
        counts: optional ``[N]`` multiplicities of the rows in the batch (see
            :func:`uniformity_loss`); a row paired with its own copy uses ``s_aa``.

    Returns:
        scalar; 0 when ``B < 2``.
    """
    if sim is None:
        raise ValueError("calibrated_uniformity_loss needs sim (use uniformity_loss without)")
    # exponent -t(d^2 - 2 + 2 s) = -t d^2 - 2t s + 2t; the constant leaves the log-sum-exp.
    return _pairwise_uniformity(x, t, counts, sim, offset=2.0 * t)


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    r"""Bayesian personalised ranking, :math:`-\frac{1}{N}\sum \log\sigma(s^+ - s^-)`.

    Args:
        pos_scores: ``[N]`` scores of observed (user, item) pairs.
        neg_scores: ``[N]`` (or ``[N, K]`` for K negatives per row) scores of sampled negatives.
    """
    check_tensor(pos_scores, "bpr_loss: pos_scores", dims=1, floating=True)
    check_tensor(neg_scores, "bpr_loss: neg_scores", dims=(1, 2), floating=True)
    if neg_scores.dim() == pos_scores.dim() + 1:
        pos_scores = pos_scores.unsqueeze(-1)
    if pos_scores.shape[0] != neg_scores.shape[0] or pos_scores.dim() != neg_scores.dim():
        raise ValueError(
            "bpr_loss needs pos_scores [N] and neg_scores [N] or [N, K], got "
            f"{list(pos_scores.shape)} and {list(neg_scores.shape)}"
        )
    return -F.logsigmoid(pos_scores - neg_scores).mean()


#: Logits formed at once by :func:`info_nce_loss` when ``block_rows`` is not given (8 MiB of
#: float32): blocks of this size stay in cache between their passes (BENCHMARKS.md).
INFO_NCE_BLOCK_ELEMENTS = 2**21


def info_nce_loss(
    anchor: Tensor, other: Tensor, temperature: float = 1.0, block_rows: int | None = None
) -> Tensor:
    r"""InfoNCE of ``anchor`` rows against ALL ``other`` rows, positives on the diagonal.

    .. math::
        -\frac{1}{N}\sum_i \log \frac{\exp(\langle a_i, o_i\rangle / \tau)}
            {\sum_j \exp(\langle a_i, o_j\rangle / \tau)}

    Inputs are used as given (normalise them first for cosine logits). The ``[N, N]``
    logits are processed ``block_rows`` rows at a time in forward and backward (the backward
    recomputes them), so memory is ``O(block_rows * N)`` and each block is touched while it
    is in cache; the value and gradients are those of
    ``(torch.logsumexp(a @ o.T / t, 1) - (a * o).sum(1) / t).mean()``.

    Args:
        anchor: ``[N, k]`` rows.
        other: ``[N, k]`` rows; row ``i`` is the positive of ``anchor[i]``.
        temperature: :math:`\tau > 0`.
        block_rows: rows of the logits formed at once (default: about
            :data:`INFO_NCE_BLOCK_ELEMENTS` logits, at least 64 rows).

    Returns:
        scalar.
    """
    check_tensor(anchor, "info_nce_loss: anchor", dims=2, floating=True)
    check_tensor(other, "info_nce_loss: other", dims=2, floating=True)
    if anchor.shape != other.shape or anchor.dtype != other.dtype:
        raise ValueError(
            "info_nce_loss needs two [N, k] tensors of the same shape and dtype, got "
            f"{list(anchor.shape)} of {anchor.dtype} and {list(other.shape)} of {other.dtype}"
        )
    temperature = check_number(
        temperature, "info_nce_loss: temperature", minimum=0, exclusive_minimum=True
    )
    if block_rows is None:
        block_rows = max(64, INFO_NCE_BLOCK_ELEMENTS // max(other.size(0), 1))
    block_rows = check_int(block_rows, "info_nce_loss: block_rows", minimum=1)
    if anchor.size(0) == 0:
        return (anchor.sum() + other.sum()) * 0.0
    if not use_kernel("info_nce", anchor):
        return reference.info_nce_loss(anchor, other, temperature)
    return pairwise.info_nce(anchor / temperature, other, int(block_rows))


def gaussian_nll(mu: Tensor, logvar: Tensor, y: Tensor, row_weight: Tensor) -> Tensor:
    r"""Row-weighted Gaussian negative log-likelihood (CLUB's variational network, SEA).

    .. math::
        \sum_i w_i \sum_j \tfrac12\left[(\mu_{ij} - y_{ij})^2 e^{-\ell_{ij}} + \ell_{ij}\right]

    for ``mu``, ``logvar`` (:math:`\ell`) and ``y`` of shape ``[N, d]`` and ``row_weight``
    (:math:`w`, ``[N]``, not differentiated). The kernel
    (:mod:`cm3_pyg.nn.kernels.gaussian`) makes eight elementwise passes where autograd
    makes about twenty: SEA evaluates it 50 times per batch.
    """
    for name, value in (("mu", mu), ("logvar", logvar), ("y", y), ("row_weight", row_weight)):
        check_tensor(value, f"gaussian_nll: {name}", floating=True)
    if not (mu.shape == logvar.shape == y.shape) or mu.dim() != 2:
        raise ValueError(
            f"gaussian_nll: mu, logvar and y must share one [N, d] shape, got "
            f"{tuple(mu.shape)}, {tuple(logvar.shape)}, {tuple(y.shape)}"
        )
    if row_weight.shape != (mu.size(0),):
        raise ValueError(
            f"gaussian_nll: row_weight must have shape [{mu.size(0)}], "
            f"got {tuple(row_weight.shape)}"
        )
    if not use_kernel("gaussian_nll", mu):
        return reference.gaussian_nll(mu, logvar, y, row_weight)
    return gaussian.gaussian_nll(mu, logvar, y, row_weight.detach())
