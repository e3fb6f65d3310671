r"""Pairwise kernels: the log-sum-exp of the uniformity losses over a tiled Gram matrix, and
InfoNCE over row blocks.

Neither allocates an index tensor of all pairs or keeps whole ``[N, N]`` autograd buffers;
both have their backward written out. Reference versions:
:func:`cm3_pyg.nn.reference.uniformity_loss`,
:func:`~cm3_pyg.nn.reference.calibrated_uniformity_loss` and
:func:`~cm3_pyg.nn.reference.info_nce_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cm3_pyg.nn.kernels import host_checks_are_free
from cm3_pyg.nn.precision import compute_dtype

__all__ = ["TILE_ROWS", "info_nce", "pairwise_log_sum_exp"]


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
    tiles: Sequence[Tensor],
    cuts: tuple[tuple[slice, slice], ...],
    y: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``M @ y`` for the symmetric ``M`` stored as its :func:`_symmetric_tiles` tiles
    (``dtype``: the products' operand dtype, float32 sums)."""
    if dtype is not None:
        low = y.to(dtype)
        out = y.new_zeros(y.shape)
        for tile, (rows, cols) in zip(tiles, cuts, strict=True):
            tile_low = tile.to(dtype)
            out[rows] += tile_low @ low[cols]
            if rows != cols:
                out[cols] += tile_low.t() @ low[rows]
        return out
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
        scaled = x * math.sqrt(2.0 * t)
        dtype = compute_dtype() if x.dtype == torch.float32 else None
        if dtype is None:  # one product of the augmented rows gives the whole exponent
            ones = torch.ones_like(sq_norm)
            left = torch.cat([scaled, bias, ones], dim=-1)
            right = torch.cat([scaled, ones, bias], dim=-1)

            def gram(rows: slice, cols: slice) -> Tensor:
                return left[rows] @ right[cols].t()

        else:  # reduced products: the Gram part in bf16, the row terms added in float32
            scaled_low = scaled.to(dtype)

            def gram(rows: slice, cols: slice) -> Tensor:
                tile = (scaled_low[rows] @ scaled_low[cols].t()).to(bias.dtype)
                return tile.add_(bias[rows]).add_(bias[cols].t())

        # A row paired with a copy of itself: distance exactly 0, weight m (m - 1).
        if counts is None:
            diagonal = torch.full_like(sq_norm.squeeze(-1), float("-inf"))
        else:
            diagonal = torch.log(counts * (counts - 1.0))
        cuts = _symmetric_tiles(x.size(0))
        shift = None
        if host_checks_are_free(x.device):
            if unit_features is not None:
                low = -1.0 if min_sim is None else max(min_sim, -1.0)
            else:
                low = 0.0 if sim is None else float(sim.min())
            top = 0.0 if counts is None else 2.0 * float(counts.max().log())
            shift = top - 2.0 * t * low
        args = (gram, diagonal, sim, unit_features, min_sim, max_sim, t, cuts, dtype)
        tiles, keeps, total, peak = _exp_tiles(*args, shift=shift)
        if shift is not None and not 1e-15 < float(total) < float("inf"):
            tiles, keeps, total, peak = _exp_tiles(*args, shift=None)
        ctx.cuts = cuts
        ctx.save_for_backward(x, total, unit_features, *tiles, *keeps)
        ctx.t = t
        ctx.dtype = dtype  # the backward's products follow the forward's, wherever it runs
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
            px = _symmetric_matmul(weights, cuts, torch.cat([x, ones], dim=-1), ctx.dtype)
            d = x.size(1)
            grad_x = (px[:, :d] - px[:, d:] * x) * (scale * 4.0 * t)
        if ctx.needs_input_grad[3]:
            # d cos_ab: only where the clamp passed it (as torch.clamp).
            masked = [w * k for w, k in zip(weights, keeps, strict=True)] if keeps else weights
            grad_features = _symmetric_matmul(masked, cuts, unit_features, ctx.dtype)
            grad_features.mul_(scale * -4.0 * t)
        return grad_x, None, grad_sim, grad_features, None, None, None


def _exp_tiles(
    gram: Callable[[slice, slice], Tensor],
    diagonal: Tensor,
    sim: Tensor | None,
    unit_features: Tensor | None,
    min_sim: float | None,
    max_sim: float | None,
    t: float,
    cuts: tuple[tuple[slice, slice], ...],
    dtype: torch.dtype | None,
    shift: float | None,
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    r"""The tiles of :math:`e^{\ell - c}`, the clamp masks, their total and the shift ``c``.

    ``gram(rows, cols)`` forms a fresh tile of the exponent before the similarity term;
    ``dtype`` is the operand dtype of the similarity products (``None``: the features' own).
    ``shift=None`` shifts by the exact maximum (all tiles are formed first); a number is
    applied to each tile as soon as it is formed.
    """
    tiles: list[Tensor] = []
    keeps: list[Tensor] = []
    total: Tensor | None = None
    features_low = None
    if dtype is not None and unit_features is not None:
        features_low = unit_features.detach().to(dtype)
    for rows, cols in cuts:
        tile = gram(rows, cols)
        if total is None:  # in the exponent's dtype
            total = tile.new_zeros(())
        part = None
        if unit_features is not None:
            if features_low is not None:
                part = (features_low[rows] @ features_low[cols].t()).to(unit_features.dtype)
            else:
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
    assert total is not None  # there is always at least one tile
    if shift is not None:
        return tiles, keeps, total, total.new_tensor(shift)
    peak = torch.stack([tile.max() for tile in tiles]).max()
    for tile, (rows, cols) in zip(tiles, cuts, strict=True):
        tile.sub_(peak).exp_()
        total = total + tile.sum() * (1.0 if rows == cols else 2.0)
    return tiles, keeps, total, peak


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
        dtype = compute_dtype() if anchor.dtype == torch.float32 else None
        a, o = (anchor, other) if dtype is None else (anchor.to(dtype), other.to(dtype))
        lse = anchor.new_empty(n)
        for start in range(0, n, block_rows):
            rows = slice(start, min(start + block_rows, n))
            lse[rows] = torch.logsumexp((a[rows] @ o.t()).to(anchor.dtype), dim=1)
        positive = (anchor * other).sum(dim=1)
        ctx.save_for_backward(anchor, other, lse)
        ctx.block_rows = block_rows
        ctx.dtype = dtype
        return (lse - positive).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        anchor, other, lse = ctx.saved_tensors
        n = anchor.size(0)
        dtype = ctx.dtype
        a, o = (anchor, other) if dtype is None else (anchor.to(dtype), other.to(dtype))
        grad_anchor = torch.empty_like(anchor)
        grad_other = torch.zeros_like(other)
        for start in range(0, n, ctx.block_rows):
            rows = slice(start, min(start + ctx.block_rows, n))
            logits = (a[rows] @ o.t()).to(anchor.dtype)
            weights = logits.sub_(lse[rows].unsqueeze(1)).exp_()
            if dtype is None:
                grad_anchor[rows] = weights @ other
                grad_other.addmm_(weights.t(), anchor[rows])
            else:
                low = weights.to(dtype)
                grad_anchor[rows] = low @ o
                grad_other += low.t() @ a[rows]
        scale = grad / n
        # d/d<a_i, o_i> of the positive term is -1 on the diagonal.
        grad_anchor = grad_anchor.sub_(other).mul_(scale)
        grad_other = grad_other.sub_(anchor).mul_(scale)
        return (
            grad_anchor if ctx.needs_input_grad[0] else None,
            grad_other if ctx.needs_input_grad[1] else None,
            None,
        )


def pairwise_log_sum_exp(
    x: Tensor,
    counts: Tensor | None,
    sim: Tensor | None,
    unit_features: Tensor | None,
    min_sim: float | None,
    max_sim: float | None,
    t: float,
) -> Tensor:
    r"""The log-sum-exp of :class:`_PairwiseLogSumExp` over ordered pairs of distinct batch
    positions: ``sim`` an exactly symmetric ``[N, N]`` matrix, or ``unit_features`` whose
    clamped cosines are formed inside, or neither."""
    return _PairwiseLogSumExp.apply(x, counts, sim, unit_features, min_sim, max_sim, t)


def info_nce(anchor: Tensor, other: Tensor, block_rows: int) -> Tensor:
    r"""Mean of :math:`\log\sum_j e^{\langle a_i, o_j \rangle} - \langle a_i, o_i \rangle`
    (``anchor`` already divided by the temperature) by :class:`_BlockwiseInfoNCE`."""
    return _BlockwiseInfoNCE.apply(anchor, other, block_rows)
