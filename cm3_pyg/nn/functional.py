"""Small numerically careful functions shared by the layers and losses."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_rows"]


def normalize_rows(x: Tensor) -> Tensor:
    r"""L2-normalise the rows (last dimension) of ``x`` at any scale.

    ``F.normalize`` squares the entries, so in float32 rows beyond about ``1e19`` overflow
    (their norm is Inf and they collapse to 0) and rows below about ``1e-19`` underflow
    (they come out shorter than 1). Dividing each row by its largest magnitude first makes
    the result exact at every finite scale; the divisor is detached because normalisation
    is scale-invariant (:math:`\partial\,\hat{x}/\partial x` is unchanged).

    Rows that are exactly zero have no direction: they stay zero, and their gradient is
    the incoming gradient (``F.normalize`` would multiply it by ``1/eps = 1e12``).

    Args:
        x: ``[..., d]`` tensor.

    Returns:
        ``[..., d]`` unit rows (zero rows stay zero).
    """
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    scaled = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    # Nonzero rows now have a norm in [1, sqrt(d)]; zero rows keep a zero norm.
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    return scaled / torch.where(norm > 0, norm, torch.ones_like(norm))
