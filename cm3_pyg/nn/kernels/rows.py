"""Row kernels: L2 normalisation (alone or written into a concatenation) and the wide linear
layer's transposed weight gradient.

Reference versions: :func:`cm3_pyg.nn.reference.normalize_rows`,
:func:`~cm3_pyg.nn.reference.normalized_concat`, :func:`~cm3_pyg.nn.reference.feature_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cm3_pyg.nn.kernels import host_checks_are_free

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
    if host_checks_are_free(x.device) and bool(((norm > low) & (norm < high)).all()):
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


def normalize_rows(x: Tensor) -> Tensor:
    """:func:`cm3_pyg.nn.normalize_rows` by :class:`_NormalizeRows`."""
    return _NormalizeRows.apply(x)


def normalized_concat(
    row_sizes: tuple[int, ...], widths: tuple[int, ...], pieces: Sequence[Tensor]
) -> Tensor:
    """:func:`cm3_pyg.nn.normalized_concat` of the validated blocks (groups in order, each
    group's blocks in row order) by :class:`_NormalizedConcat`."""
    return _NormalizedConcat.apply(row_sizes, widths, *pieces)


def feature_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`cm3_pyg.nn.feature_linear` by :class:`_FeatureLinear`."""
    return _FeatureLinear.apply(x, weight, bias)
