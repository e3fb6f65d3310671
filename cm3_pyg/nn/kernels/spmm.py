r"""CSR kernels of :class:`~cm3_pyg.nn.SparseAdjacency`: one product with a prebuilt
transpose, all layers of a propagation in one autograd node, and the batch rows of a
bipartite propagation.

Autograd's own backward of :func:`torch.sparse.mm` re-transposes (sorts) the matrix on every
call; these keep the transpose (a symmetric matrix is its own) and write the backward out.
Reference versions: :func:`cm3_pyg.nn.reference.sparse_matmul`,
:func:`~cm3_pyg.nn.reference.propagate` and :func:`~cm3_pyg.nn.reference.propagate_rows`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["batch_rows_layer_sum", "csr_layer_sum", "csr_matrix", "csr_product", "gather_rows"]


def csr_matrix(row: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR tensor of coalesced (row-major sorted, unique) entries."""
    counts = torch.bincount(row, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=row.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on mm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, value, shape, check_invariants=False)


def _csr_mm(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for a CSR ``matrix`` (no autograd).

    On CPU the ``reduce="sum"`` kernel is used: it writes the rows directly, where the
    default CPU path zero-fills the output and copies operands around the same product
    (BENCHMARKS.md). Other devices have no such kernel and take the default path.
    """
    if x.device.type == "cpu":
        return torch.sparse.mm(matrix, x.contiguous(), "sum")
    return torch.sparse.mm(matrix, x)


class _CSRProduct(torch.autograd.Function):
    """``A @ x`` whose backward is ``A^T @ grad`` with a prebuilt ``A^T``."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, matrix_t: Tensor, x: Tensor) -> Tensor:
        ctx.matrix_t = matrix_t
        return _csr_mm(matrix, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor | None]:
        if not ctx.needs_input_grad[2]:
            return None, None, None
        return None, None, _csr_mm(ctx.matrix_t, grad)


class _CSRLayerSum(torch.autograd.Function):
    r"""``combine(x, A x, ..., A^L x)`` with a hand-written backward (``combine``: sum, mean
    or last).

    Autograd through a loop of products keeps one output and one running total per layer
    and adds gradients into fresh buffers; here the forward accumulates in place and the
    backward is Horner's rule, :math:`r \leftarrow g + A^\top r` (``L`` products, ``L``
    in-place adds, no copy of the input or the gradient), with nothing saved but the
    matrices.
    """

    @staticmethod
    def forward(
        ctx: Any, matrix: Tensor, matrix_t: Tensor, x: Tensor, num_layers: int, combine: str
    ) -> Tensor:
        ctx.matrix_t, ctx.num_layers, ctx.combine = matrix_t, num_layers, combine
        if num_layers == 0:
            return x.clone()
        h = _csr_mm(matrix, x)
        # The first sum allocates the total (no separate copy of x); later layers add in place.
        total = x + h if combine != "last" else None
        for _ in range(num_layers - 1):
            h = _csr_mm(matrix, h)
            if total is not None:
                total.add_(h)
        if total is None:
            return h
        return total.div_(num_layers + 1) if combine == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None
        grad = grad.contiguous()
        if ctx.combine == "mean":
            grad = grad / (ctx.num_layers + 1)
        if ctx.num_layers == 0:
            return None, None, grad.clone(), None, None
        result = grad  # never written to: every step below allocates a new product first
        for _ in range(ctx.num_layers):
            result = _csr_mm(ctx.matrix_t, result)
            if ctx.combine != "last":
                result.add_(grad)
        return None, None, result, None, None


class _BatchRowsLayerSum(torch.autograd.Function):
    r"""The rows ``users`` and all item rows of ``combine(x, A x, ..., A^L x)`` for a symmetric
    bipartite ``A = [[0, R], [R^T, 0]]`` (users first), ``L >= 1``.

    Layers ``1 .. L-1`` are full products; the last one is formed only for the requested
    rows: :math:`R_{B,:} h_I` for the users ``B`` and :math:`R^\top h_U` for the items.
    The backward starts with the transpose of that restricted step,
    :math:`[R\,G_I;\ R^\top G_B]` (``G_B`` embedded in zeros), then continues with
    Horner's rule over the full matrix as :class:`_CSRLayerSum` does. So the forward's last
    layer skips the other users' rows (their products and sums); the backward costs what
    the full propagation's does.
    """

    @staticmethod
    def forward(
        ctx: Any,
        matrix: Tensor,
        user_item: Tensor,
        item_user: Tensor,
        batch: Tensor,
        x: Tensor,
        users: Tensor,
        num_layers: int,
        combine: str,
    ) -> tuple[Tensor, Tensor]:
        num_users = user_item.size(0)
        keep = combine != "last"
        h = x
        if keep:
            total_users = x.index_select(0, users)
            total_items = x[num_users:].clone()
        for _ in range(num_layers - 1):
            h = _csr_mm(matrix, h)
            if keep:
                total_users.add_(h.index_select(0, users))
                total_items.add_(h[num_users:])
        last_users = _csr_mm(batch, h[num_users:])
        last_items = _csr_mm(item_user, h[:num_users])
        ctx.matrix, ctx.user_item, ctx.item_user = matrix, user_item, item_user
        ctx.num_layers, ctx.combine = num_layers, combine
        ctx.save_for_backward(users)
        if not keep:
            return last_users, last_items
        total_users.add_(last_users)
        total_items.add_(last_items)
        if combine == "mean":
            total_users.div_(num_layers + 1)
            total_items.div_(num_layers + 1)
        return total_users, total_items

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_users: Tensor | None, grad_items: Tensor | None) -> tuple[Any, ...]:
        if not ctx.needs_input_grad[4]:
            return (None,) * 8
        (users,) = ctx.saved_tensors
        user_item, item_user, matrix = ctx.user_item, ctx.item_user, ctx.matrix
        num_users, num_items = user_item.shape
        width = (grad_users if grad_users is not None else grad_items).size(1)
        if grad_users is None:
            grad_users = user_item.values().new_zeros(users.numel(), width)
        if grad_items is None:
            grad_items = grad_users.new_zeros(num_items, width)
        if ctx.combine == "mean":
            grad_users = grad_users / (ctx.num_layers + 1)
            grad_items = grad_items / (ctx.num_layers + 1)
        keep = ctx.combine != "last"
        # Transpose of the restricted last layer (A is symmetric): R G_I for the users and
        # R^T G_B for the items, the latter as a CSR product over the batch users' rows
        # embedded in zeros (batch users hold most entries: a scatter is slower).
        embedded = grad_users.new_zeros(num_users, width)
        embedded.index_add_(0, users, grad_users)
        result_items = _csr_mm(item_user, embedded)
        result_users = _csr_mm(user_item, grad_items)
        if keep:
            result_users.add_(embedded)
            result_items.add_(grad_items)
        result = torch.cat([result_users, result_items])
        for _ in range(ctx.num_layers - 1):
            result = _csr_mm(matrix, result)
            if keep:
                result[num_users:].add_(grad_items)
                result.index_add_(0, users, grad_users)
        return (None, None, None, None, result, None, None, None)


def gather_rows(matrix: Tensor, rows: Tensor) -> Tensor:
    """The rows ``rows`` of a CSR ``matrix``, as a CSR ``[len(rows), C]`` tensor."""
    crow, col, value = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    starts = crow.index_select(0, rows)
    lengths = crow.index_select(0, rows + 1) - starts
    batch_crow = torch.zeros(rows.numel() + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(lengths, 0, out=batch_crow[1:])
    total = int(batch_crow[-1])
    entries = torch.repeat_interleave(starts - batch_crow[:-1], lengths, output_size=total)
    entries += torch.arange(total, device=crow.device)
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on mm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            batch_crow,
            col.index_select(0, entries),
            value.index_select(0, entries),
            (rows.numel(), matrix.size(1)),
            check_invariants=False,
        )


def csr_product(matrix: Tensor, matrix_t: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x``, differentiable in ``x`` through the prebuilt ``matrix_t``."""
    return _CSRProduct.apply(matrix, matrix_t, x)


def csr_layer_sum(
    matrix: Tensor, matrix_t: Tensor, x: Tensor, num_layers: int, combine: str
) -> Tensor:
    """``combine(x, A x, ..., A^L x)`` by :class:`_CSRLayerSum`."""
    return _CSRLayerSum.apply(matrix, matrix_t, x, num_layers, combine)


def batch_rows_layer_sum(
    matrix: Tensor,
    user_item: Tensor,
    item_user: Tensor,
    x: Tensor,
    users: Tensor,
    num_layers: int,
    combine: str,
) -> tuple[Tensor, Tensor]:
    """The rows ``users`` and the item rows of ``combine(x, A x, ..., A^L x)`` for the
    bipartite ``A = [[0, R], [R^T, 0]]`` (``user_item = R``, ``L >= 1``), by
    :class:`_BatchRowsLayerSum`."""
    batch = gather_rows(user_item, users)
    return _BatchRowsLayerSum.apply(
        matrix, user_item, item_user, batch, x, users, num_layers, combine
    )
