"""Sparse adjacency matrices for propagation, and the kernel that multiplies them.

An adjacency here is a matrix ``A`` with ``out = A @ x``: row ``i`` of ``A`` lists what
node ``i`` aggregates. Two layouts are supported:

* ``"csr"``: a ``torch.sparse_csr_tensor`` multiplied with :func:`torch.sparse.mm` (always
  available, CPU and GPU);
* ``"torch_sparse"``: a ``torch_sparse.SparseTensor`` (when the optional ``sparse`` extra is
  installed), multiplied with ``torch_sparse.matmul``.

PyG's generic ``torch_geometric.utils.spmm`` is not used on the hot path: on a CSR tensor it
measured several times slower than calling :func:`torch.sparse.mm` directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from cm3_pyg.typing import WITH_TORCH_SPARSE

BACKENDS = ("csr", "torch_sparse")


def available_backends() -> list[str]:
    """The adjacency layouts usable in this installation."""
    return [b for b in BACKENDS if b != "torch_sparse" or WITH_TORCH_SPARSE]


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to a concrete backend and check that the requested one is installed."""
    if backend == "auto":
        return "csr"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown sparse backend {backend!r}; expected 'auto' or one of {BACKENDS}"
        )
    if backend == "torch_sparse" and not WITH_TORCH_SPARSE:
        raise ValueError(
            "sparse backend 'torch_sparse' needs the optional torch-sparse package "
            "(pip install 'cm3_pyg[sparse]')"
        )
    return backend


def to_adjacency(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_rows: int,
    num_cols: int | None = None,
    backend: str = "auto",
) -> Any:
    """Build a sparse ``[num_rows, num_cols]`` matrix with ``A[row, col] = weight``.

    Args:
        edge_index: ``[2, E]`` int64, ``edge_index[0]`` the row (aggregating node),
            ``edge_index[1]`` the column. Duplicate entries are summed.
        edge_weight: ``[E]`` values, or ``None`` for ones.
        num_rows: number of rows.
        num_cols: number of columns (default ``num_rows``).
        backend: ``"auto"``, ``"csr"`` or ``"torch_sparse"``.
    """
    num_cols = num_rows if num_cols is None else num_cols
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
    backend = resolve_backend(backend)
    if backend == "torch_sparse":
        from torch_sparse import SparseTensor

        return SparseTensor(
            row=edge_index[0],
            col=edge_index[1],
            value=edge_weight,
            sparse_sizes=(num_rows, num_cols),
        ).coalesce()
    coo = torch.sparse_coo_tensor(edge_index, edge_weight, (num_rows, num_cols)).coalesce()
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on mm
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


def spmm(adj: Any, x: Tensor) -> Tensor:
    """``adj @ x`` for a torch sparse (CSR/COO) tensor or a ``torch_sparse.SparseTensor``.

    Differentiable with respect to ``x``.
    """
    if isinstance(adj, Tensor):
        if not adj.is_sparse and adj.layout != torch.sparse_csr:
            raise TypeError(
                f"expected a sparse adjacency, got a dense tensor of layout {adj.layout}"
            )
        return torch.sparse.mm(adj, x)
    if WITH_TORCH_SPARSE:
        from torch_sparse import SparseTensor, matmul

        if isinstance(adj, SparseTensor):
            return matmul(adj, x)
    raise TypeError(f"unsupported adjacency type {type(adj).__name__}")


def adjacency_shape(adj: Any) -> tuple[int, int]:
    """``(rows, cols)`` of a supported adjacency."""
    if isinstance(adj, Tensor):
        return int(adj.size(0)), int(adj.size(1))
    return tuple(int(s) for s in adj.sparse_sizes())  # type: ignore[return-value]
