"""Optimizer construction shared by the training loop and models with inner optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def make_adam(params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with PyTorch's fused kernel where every parameter allows it.

    The fused implementation is the same update rule as the per-tensor loop (one kernel
    per step instead of about a dozen per parameter; on CPU that is 3-5x less optimizer time
    for CM3). It needs dense floating-point parameters on CPU or CUDA; anything else gets
    the default implementation.
    """
    params = list(params)
    return torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay, fused=_fused_allowed(params) or None
    )


def _fused_allowed(params: list[Tensor]) -> bool:
    """Whether every parameter allows the fused Adam kernel (dense floating point on CPU or
    CUDA)."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and not p.is_sparse
        for p in params
    )


#: Optimisers :func:`make_optimizer` builds.
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """``"adam"`` (fused where possible, see :func:`make_adam`) or plain ``"sgd"`` (no
    momentum) over parameter ``groups`` (``{"params": [...], "weight_decay": w}`` each).

    Weight decay is the L2 gradient term :math:`w \\theta` for both, so SGD with it takes
    :math:`\\theta \\leftarrow \\theta - \\eta (\\nabla + w \\theta)` every step.
    """
    groups = [g for g in groups if g["params"]]
    if name == "adam":
        params = [p for g in groups for p in g["params"]]
        return torch.optim.Adam(groups, lr=lr, fused=_fused_allowed(params) or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
