"""Small numerically careful functions shared by the layers and losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["feature_linear", "normalize_rows", "normalized_concat"]


#: Row norms inside this range are computed directly in the input dtype without overflow
#: or loss of precision; rows outside it take the rescaled path.
_SAFE_NORM = {torch.float32: (1e-18, 1e18), torch.float64: (1e-150, 1e150)}


def _unit_rows(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x / ||x||, divisor)`` row-wise, written into ``out`` when given.

    ``divisor`` is ``[..., 1]``: the row norm, or 1 for a zero row (which stays zero).
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    low, high = _SAFE_NORM.get(x.dtype, (0.0, float("inf")))
    # On CPU the range check is free; on an accelerator it would be a host sync per
    # call, so there the always-exact path runs (its extra passes are cheap there).
    # A zero norm may be an underflowed nonzero row: only (low, high) is trusted.
    if x.device.type == "cpu" and bool(((norm > low) & (norm < high)).all()):
        return torch.div(x, norm, out=out), norm
    # Rescale by each row's largest magnitude first: exact at any finite scale.
    peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # zero rows: 1
    scaled = x / peak
    inner = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    inner = torch.where(inner > 0, inner, torch.ones_like(inner))
    # The divisor may be inf in the dtype: it is only ever divided by.
    return torch.div(scaled, inner, out=out), peak * inner


class _NormalizeRows(torch.autograd.Function):
    """``x / ||x||`` with a hand-written backward (a handful of passes instead of a dozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out, divisor = _unit_rows(x)
        ctx.save_for_backward(out, divisor)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out, divisor = ctx.saved_tensors
        # d(x/|x|) = (g - y (y . g)) / |x|; zero rows (y = 0, divisor 1) pass g through.
        radial = (out * grad).sum(dim=-1, keepdim=True)
        return (grad - out * radial) / divisor


class _NormalizedConcat(torch.autograd.Function):
    """The blocks of :func:`normalized_concat` written straight into one output."""

    @staticmethod
    def forward(
        ctx: Any, row_sizes: tuple[int, ...], widths: tuple[int, ...], *pieces: Tensor
    ) -> Tensor:
        first = pieces[0]
        out = first.new_empty(sum(row_sizes), sum(widths))
        divisors = first.new_empty(out.size(0), len(widths))
        columns = _column_slices(widths)
        blocks = iter(pieces)
        for group, columns_of_group in enumerate(columns):
            start = 0
            for size in row_sizes:
                rows = slice(start, start + size)
                _, divisor = _unit_rows(next(blocks), out=out[rows, columns_of_group])
                divisors[rows, group] = divisor.squeeze(-1)
                start += size
        ctx.save_for_backward(out, divisors)
        ctx.row_sizes, ctx.widths = row_sizes, widths
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out, divisors = ctx.saved_tensors
        row_sizes, widths = ctx.row_sizes, ctx.widths
        n, groups = divisors.shape
        if len(set(widths)) == 1:  # all groups at once, as [N, groups, width]
            y = out.view(n, groups, widths[0])
            g = grad.reshape(n, groups, widths[0])
            radial = (y * g).sum(dim=-1, keepdim=True)
            full = torch.addcmul(g, y, radial, value=-1.0).div_(divisors.unsqueeze(-1))
            per_group = [full[:, k] for k in range(groups)]
        else:
            per_group = []
            for k, cols in enumerate(_column_slices(widths)):
                y, g = out[:, cols], grad[:, cols]
                radial = (y * g).sum(dim=-1, keepdim=True)
                per_group.append(torch.addcmul(g, y, radial, value=-1.0).div_(divisors[:, k, None]))
        grads: list[Tensor] = []
        for group_grad in per_group:
            start = 0
            for size in row_sizes:
                grads.append(group_grad[start : start + size])
                start += size
        return (None, None, *grads)


def _column_slices(widths: Sequence[int]) -> list[slice]:
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def normalized_concat(groups: Sequence[Sequence[Tensor]]) -> Tensor:
    r"""Stack each group's row blocks, L2-normalise the rows, concatenate the groups' columns.

    Equal to ``torch.cat([normalize_rows(torch.cat(g, dim=0)) for g in groups], dim=-1)``
    (same values, rows and zero-row rules as :func:`normalize_rows`), but every normalised
    block is written straight into its place in the output, and the backward treats all
    groups in a few passes over the ``[N, D]`` gradient instead of copying blocks around.
    CM3 builds its node input this way: one group per channel, the blocks being the user
    and item tables.

    Args:
        groups: ``G`` sequences of 2-D blocks; group ``k``'s blocks are ``[n_r, d_k]`` for
            the same row counts ``n_1, ..., n_R`` in every group.

    Returns:
        ``[n_1 + ... + n_R, d_1 + ... + d_G]``.
    """
    if len(groups) == 0 or any(len(group) == 0 for group in groups):
        raise ValueError("normalized_concat needs at least one group, each with a block")
    row_sizes = tuple(int(block.size(0)) for block in groups[0])
    widths: list[int] = []
    for k, group in enumerate(groups):
        if any(block.dim() != 2 for block in group):
            raise ValueError(f"normalized_concat: group {k} has a block that is not 2-D")
        sizes = tuple(int(block.size(0)) for block in group)
        if sizes != row_sizes:
            raise ValueError(
                f"normalized_concat: group {k} has blocks of {list(sizes)} rows, "
                f"group 0 has {list(row_sizes)}"
            )
        if len({int(block.size(1)) for block in group}) != 1:
            raise ValueError(f"normalized_concat: the blocks of group {k} differ in width")
        widths.append(int(group[0].size(1)))
    pieces = [block for group in groups for block in group]
    if len({(b.dtype, b.device) for b in pieces}) != 1:
        raise ValueError("normalized_concat: all blocks must share one dtype and device")
    return _NormalizedConcat.apply(row_sizes, tuple(widths), *pieces)


def normalize_rows(x: Tensor) -> Tensor:
    r"""L2-normalise the rows (last dimension) of ``x`` at any scale.

    ``F.normalize`` squares the entries, so in float32 rows beyond about ``1e19`` overflow
    (their norm is Inf and they collapse to 0) and rows below about ``1e-19`` underflow
    (they come out shorter than 1). Rows whose norm is outside a safe range are divided by
    their largest magnitude first, which makes the result exact at every finite scale;
    ordinary rows take the direct path. The backward is
    :math:`(g - \hat{x}\,(\hat{x}^\top g)) / \lVert x \rVert`.

    Rows that are exactly zero have no direction: they stay zero, and their gradient is
    the incoming gradient (``F.normalize`` would multiply it by ``1/eps = 1e12``).

    Args:
        x: ``[..., d]`` tensor.

    Returns:
        ``[..., d]`` unit rows (zero rows stay zero).
    """
    return _NormalizeRows.apply(x)


#: From this many input features on, :func:`feature_linear` forms the weight gradient as
#: ``(x^T g)^T`` on CPU.
WIDE_INPUT_FEATURES = 2048


class _FeatureLinear(torch.autograd.Function):
    """``x @ W^T + b`` whose weight gradient is the transpose of ``x^T g``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = (x.t() @ grad).t() if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def feature_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""``F.linear(x, weight, bias)`` for a tall ``[N, D]`` input such as a modality table.

    Same values and gradients as :func:`torch.nn.functional.linear`. For ``D >=``
    :data:`WIDE_INPUT_FEATURES` on CPU the weight gradient is computed as
    :math:`(x^\top g)^\top` (autograd forms :math:`g^\top x`, the weight's own layout):
    with MKL on this project's CPU that GEMM layout was faster for the 4096-d image
    features (CM3's baby-shaped backward about 7 ms less per step, BENCHMARKS.md); for
    narrower inputs the two layouts ran alike, so autograd's is kept.

    Args:
        x: ``[N, D]``.
        weight: ``[O, D]``.
        bias: ``[O]`` or ``None``.

    Returns:
        ``[N, O]``.
    """
    if x.dim() != 2 or x.device.type != "cpu" or x.size(1) < WIDE_INPUT_FEATURES:
        return torch.nn.functional.linear(x, weight, bias)
    return _FeatureLinear.apply(x, weight, bias)
