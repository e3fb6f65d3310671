"""Small numerically careful functions shared by the layers and losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["normalize_rows"]


#: Row norms inside this range are computed directly in the input dtype without overflow
#: or loss of precision; rows outside it take the rescaled path.
_SAFE_NORM = {torch.float32: (1e-18, 1e18), torch.float64: (1e-150, 1e150)}


class _NormalizeRows(torch.autograd.Function):
    """``x / ||x||`` with a hand-written backward (a handful of passes instead of a dozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        low, high = _SAFE_NORM.get(x.dtype, (0.0, float("inf")))
        # On CPU the range check is free; on an accelerator it would be a host sync per
        # call, so there the always-exact path runs (its extra passes are cheap there).
        # A zero norm may be an underflowed nonzero row: only (low, high) is trusted.
        if x.device.type != "cpu" or not bool(((norm > low) & (norm < high)).all()):
            # Rescale by each row's largest magnitude first: exact at any finite scale.
            peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
            peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # zero rows: 1
            scaled = x / peak
            inner = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
            inner = torch.where(inner > 0, inner, torch.ones_like(inner))
            out = scaled / inner
            norm = peak * inner  # may be inf in the dtype: only used as a divisor below
        else:
            out = x / norm
        ctx.save_for_backward(out, norm)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out, norm = ctx.saved_tensors
        # d(x/|x|) = (g - y (y . g)) / |x|; zero rows (y = 0, divisor 1) pass g through.
        radial = (out * grad).sum(dim=-1, keepdim=True)
        return (grad - out * radial) / norm


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
