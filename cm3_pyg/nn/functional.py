"""Small numerically careful functions shared by the layers and losses.

Each dispatches between its kernel (:mod:`cm3_pyg.nn.kernels.rows`) and its reference version
(:mod:`cm3_pyg.nn.reference`) by :func:`cm3_pyg.nn.kernels.use_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from cm3_pyg.checks import check_tensor
from cm3_pyg.nn import reference
from cm3_pyg.nn.kernels import WIDE_INPUT_FEATURES, rows, use_kernel
from cm3_pyg.nn.parallel import RowShard, active_split, gather_rows
from cm3_pyg.nn.precision import compute_dtype, reduced_linear

__all__ = ["WIDE_INPUT_FEATURES", "feature_linear", "normalize_rows", "normalized_concat"]


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
    if isinstance(groups, Tensor) or not isinstance(groups, Sequence):
        raise TypeError(
            "normalized_concat: groups must be a sequence of sequences of 2-D tensors, "
            f"got {type(groups).__name__}"
        )
    for k, group in enumerate(groups):
        if isinstance(group, Tensor) or not isinstance(group, Sequence):
            raise TypeError(
                f"normalized_concat: groups[{k}] must be a sequence of 2-D tensors, "
                f"got {type(group).__name__}"
            )
        for r, block in enumerate(group):
            check_tensor(block, f"normalized_concat: groups[{k}][{r}]", dims=2, floating=True)
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
    if not use_kernel("normalized_concat", pieces[0]):
        return reference.normalized_concat(groups)
    return rows.normalized_concat(row_sizes, tuple(widths), pieces)


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
    check_tensor(x, "normalize_rows: x", floating=True)
    if x.dim() == 0:
        raise ValueError("normalize_rows: x must have at least one dimension (the rows' last)")
    if not use_kernel("normalize_rows", x):
        return reference.normalize_rows(x)
    return rows.normalize_rows(x)


def feature_linear(x: Tensor | RowShard, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""``F.linear(x, weight, bias)`` for a tall ``[N, D]`` input such as a modality table.

    Same values and gradients as :func:`torch.nn.functional.linear`. For ``D >=``
    :data:`~cm3_pyg.nn.kernels.WIDE_INPUT_FEATURES` on CPU the weight gradient is computed
    as :math:`(x^\top g)^\top` (autograd forms :math:`g^\top x`, the weight's own layout):
    with MKL that GEMM layout was the faster one for wide feature tables such as 4096-d
    images (BENCHMARKS.md); for narrower inputs autograd's is kept. Inside
    :func:`cm3_pyg.nn.parallel.split_rows` each process computes its block of rows; ``x`` may
    then be a :class:`~cm3_pyg.nn.parallel.RowShard` holding only that block. Inside
    :func:`cm3_pyg.nn.precision.matmul_precision` ``("bf16")`` the product takes bfloat16
    operands and returns float32 (the bias added in float32).

    Args:
        x: ``[N, D]`` (or this process's rows of it, as a ``RowShard``).
        weight: ``[O, D]``.
        bias: ``[O]`` or ``None``.

    Returns:
        ``[N, O]``.
    """
    shard = x if isinstance(x, RowShard) else None
    if shard is not None:
        x = shard.block()
    check_tensor(x, "feature_linear: x", dims=2, floating=True)
    check_tensor(weight, "feature_linear: weight", dims=2, floating=True)
    if weight.size(1) != x.size(1):
        raise ValueError(
            f"feature_linear: weight {list(weight.shape)} needs x with {weight.size(1)} "
            f"columns, got x {list(x.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "feature_linear: bias", dims=1, floating=True)
        if bias.size(0) != weight.size(0):
            raise ValueError(
                f"feature_linear: bias must have shape [{weight.size(0)}], got {list(bias.shape)}"
            )
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"feature_linear: x, weight and bias must share one dtype, got {x.dtype} and "
            f"{weight.dtype}" + ("" if bias is None else f" and {bias.dtype}")
        )
    split = active_split()
    if shard is not None and split is not None:  # the block is all this process holds
        return gather_rows(_feature_linear(x, weight, bias), shard.num_rows, split)
    if split is not None:  # row-parallel (cm3_pyg.nn.parallel): this process's rows
        start, end = split.bounds(x.size(0))
        return gather_rows(_feature_linear(x[start:end], weight, bias), x.size(0), split)
    return _feature_linear(x, weight, bias)


def _feature_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    dtype = compute_dtype()
    if dtype is not None and x.dtype != dtype:
        # matmul_precision("bf16"): bf16 operands (a constant table converted once), the
        # product back in float32 before the bias, float32 gradients for the weight.
        return reduced_linear(x, weight, bias)
    if not use_kernel("feature_linear", x):
        return reference.feature_linear(x, weight, bias)
    return rows.feature_linear(x, weight, bias)
