r"""Losses for contrastive and ranking objectives on unit-sphere embeddings.

The pairwise losses work on one Gram matrix of the batch inside a fused kernel with a
hand-written backward: nothing allocates an index tensor of all pairs, the ``log mean exp``
is shifted by a bound of its terms (or their maximum) so it cannot overflow or underflow,
and repeated rows can be passed once with their multiplicity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

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


#: Rows per tile of the pairwise matrix. The upper half of the symmetric ``[N, N]`` matrix is
#: formed tile by tile (``p (p + 1) / 2`` tiles for ``p = ceil(N / TILE_ROWS)`` row bands):
#: each tile's product, shift, ``exp`` and sum run while it is in cache, about half the
#: square's FLOPs are spent (``(p + 1) / 2p`` of them), and tiles of this size run the GEMM
#: faster than one ``[N, N]`` product (BENCHMARKS.md).
TILE_ROWS = 512


def _symmetric_tiles(n: int) -> tuple[tuple[slice, slice], ...]:
    """Row/column slices of the tiles covering the upper half of a symmetric ``[n, n]`` matrix."""
    parts = max(1, -(-n // TILE_ROWS))
    bounds = [(k * n) // parts for k in range(parts + 1)]
    bands = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return tuple((bands[i], bands[j]) for i in range(parts) for j in range(i, parts))


def _symmetric_matmul(
    tiles: Sequence[Tensor], cuts: tuple[tuple[slice, slice], ...], y: Tensor
) -> Tensor:
    """``M @ y`` for the symmetric ``M`` stored as its :func:`_symmetric_tiles` tiles."""
    if len(tiles) == 1:
        return tiles[0] @ y
    out = y.new_zeros(y.shape)
    for tile, (rows, cols) in zip(tiles, cuts, strict=True):
        out[rows].addmm_(tile, y[cols])
        if rows != cols:
            out[cols].addmm_(tile.t(), y[rows])
    return out


class _PairwiseLogSumExp(torch.autograd.Function):
    r""":math:`\log \sum_{a \ne b} m_a m_b e^{\ell_{ab}} + \sum_a m_a (m_a - 1) e^{\ell_{aa}}`.

    :math:`\ell_{ab} = -t\|x_a - x_b\|^2 - 2t\,s_{ab}` over ``N`` distinct rows ``x`` with
    multiplicities ``m``: the sum over ordered pairs of distinct positions of a batch in
    which row ``a`` occurs ``m_a`` times (a repeated row pairs with itself at distance 0).

    Forward: matrix products of augmented rows give every
    :math:`-t\|x_a - x_b\|^2 + \log m_a + \log m_b`
    (:math:`2t\,x_a \cdot x_b - t n_a - t n_b` is the inner product of
    :math:`[\sqrt{2t}\,x_a, -t n_a + \log m_a, 1]` and
    :math:`[\sqrt{2t}\,x_b, 1, -t n_b + \log m_b]`), then a few in-place passes
    (similarity, diagonal, shift, exp, sum), tile by tile over the upper half of the
    symmetric matrix (:func:`_symmetric_tiles`; off-diagonal tiles count twice).

    The shift that keeps ``exp`` in range is an upper bound of every exponent, known before
    any tile is formed: by Cauchy-Schwarz :math:`-t\|x_a - x_b\|^2 \le 0`, so
    :math:`\ell_{ab} + \log m_a m_b \le 2 \max \log m - 2t\,s_{\min}`. Each tile is then
    finished while it is in cache. For unit rows (CM3) the largest term is at least
    :math:`e^{-4t - 2t(s_{\max} - s_{\min}) - 2\log \max m}`, far from underflow; when the
    sum still comes out non-finite or tiny (huge rows, rounding beyond the bound), or on an
    accelerator (where checking would be a host sync), the exact maximum is used instead,
    at the cost of one more pass.

    Backward: with :math:`P = e^{\ell}/\sum e^{\ell}` (symmetric),
    :math:`\partial/\partial x_a = -4t\,(\sum_b P_{ab}\,x_a - (P x)_a)`: one product
    :math:`P\,[x, 1]` gives both terms (the diagonal cancels). A clamped-cosine similarity
    adds one product forward and one backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        counts: Tensor | None,
        sim: Tensor | None,
        unit_features: Tensor | None,
        min_sim: float | None,
        max_sim: float | None,
        t: float,
    ) -> Tensor:
        sq_norm = x.pow(2).sum(dim=-1, keepdim=True)
        bias = sq_norm.mul(-t)
        if counts is not None:
            bias = bias + counts.log().unsqueeze(-1)
        ones = torch.ones_like(sq_norm)
        scaled = x * math.sqrt(2.0 * t)
        left = torch.cat([scaled, bias, ones], dim=-1)
        right = torch.cat([scaled, ones, bias], dim=-1)
        # A row paired with a copy of itself: distance exactly 0, weight m (m - 1).
        if counts is None:
            diagonal = torch.full_like(sq_norm.squeeze(-1), float("-inf"))
        else:
            diagonal = torch.log(counts * (counts - 1.0))
        cuts = _symmetric_tiles(x.size(0))
        shift = None
        if x.device.type == "cpu":
            if unit_features is not None:
                low = -1.0 if min_sim is None else max(min_sim, -1.0)
            else:
                low = 0.0 if sim is None else float(sim.min())
            top = 0.0 if counts is None else 2.0 * float(counts.max().log())
            shift = top - 2.0 * t * low
        args = (left, right, diagonal, sim, unit_features, min_sim, max_sim, t, cuts)
        tiles, keeps, total, peak = _exp_tiles(*args, shift=shift)
        if shift is not None and not 1e-15 < float(total) < float("inf"):
            tiles, keeps, total, peak = _exp_tiles(*args, shift=None)
        ctx.cuts = cuts
        ctx.save_for_backward(x, total, unit_features, *tiles, *keeps)
        ctx.t = t
        return peak + total.log()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, total, unit_features, *rest = ctx.saved_tensors
        cuts, t = ctx.cuts, ctx.t
        weights, keeps = rest[: len(cuts)], rest[len(cuts) :]
        scale = grad / total
        grad_x = grad_sim = grad_features = None
        if ctx.needs_input_grad[2]:
            n = x.size(0)
            grad_sim = weights[0].new_empty(n, n)
            for tile, (rows, cols) in zip(weights, cuts, strict=True):
                grad_sim[rows, cols] = tile
                if rows != cols:
                    grad_sim[cols, rows] = tile.t()
            grad_sim.mul_(scale * -2.0 * t)
        if ctx.needs_input_grad[0]:
            ones = torch.ones_like(x[:, :1])
            px = _symmetric_matmul(weights, cuts, torch.cat([x, ones], dim=-1))
            d = x.size(1)
            grad_x = (px[:, :d] - px[:, d:] * x) * (scale * 4.0 * t)
        if ctx.needs_input_grad[3]:
            # d cos_ab: only where the clamp passed it (as torch.clamp).
            masked = [w * k for w, k in zip(weights, keeps, strict=True)] if keeps else weights
            grad_features = _symmetric_matmul(masked, cuts, unit_features) * (scale * -4.0 * t)
        return grad_x, None, grad_sim, grad_features, None, None, None


def _exp_tiles(
    left: Tensor,
    right: Tensor,
    diagonal: Tensor,
    sim: Tensor | None,
    unit_features: Tensor | None,
    min_sim: float | None,
    max_sim: float | None,
    t: float,
    cuts: tuple[tuple[slice, slice], ...],
    shift: float | None,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    r"""The tiles of :math:`e^{\ell - c}`, the clamp masks, their total and the shift ``c``.

    ``shift=None`` shifts by the exact maximum (all tiles are formed first); a number is
    applied to each tile as soon as it is formed.
    """
    tiles: list[Tensor] = []
    keeps: list[Tensor] = []
    total = left.new_zeros(())
    for rows, cols in cuts:
        tile = left[rows] @ right[cols].t()
        part = None
        if unit_features is not None:
            part = unit_features[rows] @ unit_features[cols].t()
            if (min_sim, max_sim) != (None, None):
                if unit_features.requires_grad:
                    # torch.clamp's gradient rule: it passes where min <= cos <= max, i.e.
                    # where the clamp leaves cos unchanged. The in-place comparison turns
                    # the raw tile into that 0/1 mask in its own dtype (bool masks are
                    # several times slower on N^2 entries).
                    raw = part
                    part = raw.clamp(min=min_sim, max=max_sim)
                    keeps.append(raw.eq_(part))
                else:
                    part.clamp_(min=min_sim, max=max_sim)
        elif sim is not None:
            part = sim[rows, cols]
        if part is not None:
            tile.sub_(part, alpha=2.0 * t)
        if rows == cols:
            on_diagonal = diagonal[rows]
            if part is not None:
                on_diagonal = on_diagonal - 2.0 * t * part.diagonal()
            tile.diagonal().copy_(on_diagonal)
        if shift is not None:
            tile.sub_(shift).exp_()
            total = total + tile.sum() * (1.0 if rows == cols else 2.0)
        tiles.append(tile)
    if shift is not None:
        return tiles, keeps, total, left.new_tensor(shift)
    peak = torch.stack([tile.max() for tile in tiles]).max()
    for tile, (rows, cols) in zip(tiles, cuts, strict=True):
        tile.sub_(peak).exp_()
        total = total + tile.sum() * (1.0 if rows == cols else 2.0)
    return tiles, keeps, total, peak


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
    n = x.size(0)
    if counts is None:
        size = float(n)
    else:
        if counts.shape != (n,):
            raise ValueError(f"counts must have shape [{n}], got {list(counts.shape)}")
        counts = counts.to(x.dtype)
        if bool((counts < 1).any()):
            raise ValueError("counts must be >= 1 (multiplicity of each row in the batch)")
        size = float(counts.sum())
    features = min_sim = max_sim = None
    sim_tensor = None
    if isinstance(sim, ClampedCosineSimilarity):
        if sim.features.size(0) != n:
            raise ValueError(
                f"sim.features must have {n} rows (one per row of x), got {sim.features.size(0)}"
            )
        features = normalize_rows(sim.features)
        min_sim, max_sim = sim.min_sim, sim.max_sim
    elif sim is not None:
        if sim.shape != (n, n):
            raise ValueError(f"sim must have shape [{n}, {n}], got {list(sim.shape)}")
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
    lse = _PairwiseLogSumExp.apply(x, counts, sim_tensor, features, min_sim, max_sim, t)
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
    if neg_scores.dim() == pos_scores.dim() + 1:
        pos_scores = pos_scores.unsqueeze(-1)
    return -F.logsigmoid(pos_scores - neg_scores).mean()


class _BlockwiseInfoNCE(torch.autograd.Function):
    r"""Mean over rows of :math:`\log\sum_j e^{\langle a_i, o_j \rangle} - \langle a_i, o_i\rangle`.

    The ``[N, N]`` logits are never held whole: the forward keeps only each row's
    log-sum-exp, and the backward recomputes the logits ``block_rows`` rows at a time, turns
    them into softmax weights in place and multiplies them out. Autograd through
    ``torch.logsumexp`` instead keeps several full ``[N, N]`` buffers and makes
    about ten passes over them.
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, other: Tensor, block_rows: int) -> Tensor:
        n = anchor.size(0)
        lse = anchor.new_empty(n)
        for start in range(0, n, block_rows):
            rows = slice(start, min(start + block_rows, n))
            lse[rows] = torch.logsumexp(anchor[rows] @ other.t(), dim=1)
        positive = (anchor * other).sum(dim=1)
        ctx.save_for_backward(anchor, other, lse)
        ctx.block_rows = block_rows
        return (lse - positive).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        anchor, other, lse = ctx.saved_tensors
        n = anchor.size(0)
        grad_anchor = torch.empty_like(anchor)
        grad_other = torch.zeros_like(other)
        for start in range(0, n, ctx.block_rows):
            rows = slice(start, min(start + ctx.block_rows, n))
            weights = (anchor[rows] @ other.t()).sub_(lse[rows].unsqueeze(1)).exp_()
            grad_anchor[rows] = weights @ other
            grad_other.addmm_(weights.t(), anchor[rows])
        scale = grad / n
        # d/d<a_i, o_i> of the positive term is -1 on the diagonal.
        grad_anchor = grad_anchor.sub_(other).mul_(scale)
        grad_other = grad_other.sub_(anchor).mul_(scale)
        return (
            grad_anchor if ctx.needs_input_grad[0] else None,
            grad_other if ctx.needs_input_grad[1] else None,
            None,
        )


def info_nce_loss(
    anchor: Tensor, other: Tensor, temperature: float = 1.0, block_rows: int = 1024
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
        block_rows: rows of the logits formed at once.

    Returns:
        scalar.
    """
    if anchor.shape != other.shape or anchor.dim() != 2:
        raise ValueError(
            "info_nce_loss needs two [N, k] tensors of the same shape, got "
            f"{list(anchor.shape)} and {list(other.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if anchor.size(0) == 0:
        return (anchor.sum() + other.sum()) * 0.0
    return _BlockwiseInfoNCE.apply(anchor / temperature, other, int(block_rows))
