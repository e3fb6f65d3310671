"""Sparse adjacency matrices for propagation, and the kernels that multiply them.

An adjacency here is a fixed matrix ``A`` with ``out = A @ x`` (row ``i`` lists what node
``i`` aggregates), differentiable with respect to ``x``. :func:`to_adjacency` builds a
:class:`SparseAdjacency` for one of three kernels:

* ``"csr"``: ``torch.sparse_csr_tensor`` products (:func:`torch.sparse.mm`, on CPU its
  ``reduce="sum"`` kernel) in both directions. The transpose is built once, so the
  backward pass is one more CSR product; autograd's own backward of ``torch.sparse.mm``
  re-transposes (sorts) the matrix on every call (BENCHMARKS.md). A symmetric matrix (the
  normalised user-item graph) is its own transpose and is stored once. The kernels are in
  :mod:`cm3_pyg.nn.kernels.spmm`.
* ``"edge_index"``: PyG's :class:`torch_geometric.EdgeIndex` with its cached CSR/CSC
  metadata (``EdgeIndex.matmul``).
* ``"torch_sparse"``: ``torch_sparse.SparseTensor`` (optional ``sparse`` extra).

``"auto"`` times each installed kernel, forward plus backward, on the matrix itself and
keeps the fastest (see :func:`choose_backend`). PyG's generic
``torch_geometric.utils.spmm`` is not offered: on a CSR tensor it adds conversions around
the same product (``benchmarks/`` measures it).

:class:`SparseAdjacency` (alias :data:`Adjacency`) is the one adjacency type of
:mod:`cm3_pyg.nn`; :func:`as_adjacency` converts a torch sparse (CSR/COO) tensor or a
``SparseTensor`` to it, once, at the boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cm3_pyg.checks import check_int, check_tensor
from cm3_pyg.nn import reference
from cm3_pyg.nn.kernels import spmm as csr_kernels
from cm3_pyg.nn.kernels import use_kernel
from cm3_pyg.nn.parallel import active_split, gather_rows, row_bounds
from cm3_pyg.typing import WITH_TORCH_SPARSE

logger = logging.getLogger(__name__)

BACKENDS = ("csr", "edge_index", "torch_sparse")

#: A measured alternative must beat ``"csr"`` by this factor to be chosen, so that the
#: choice does not flip between runs on timing noise.
AUTO_MARGIN = 0.9
#: Below this many stored entries ``"auto"`` takes ``"csr"`` without measuring: the
#: kernels differ by fractions of a millisecond there, and a fixed choice keeps small runs
#: bit-reproducible (kernels sum in different orders).
AUTO_MIN_NNZ = 200_000


def available_backends() -> list[str]:
    """The kernels usable in this installation, in order of preference."""
    return [b for b in BACKENDS if b != "torch_sparse" or WITH_TORCH_SPARSE]


def check_backend(backend: str) -> str:
    """Validate a backend name (``"auto"`` or one of :data:`BACKENDS` that is installed)."""
    if backend == "auto":
        return backend
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


def _coalesce(
    edge_index: Tensor, edge_weight: Tensor, shape: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Row-major sorted, duplicate-summed ``(row, col, value)``."""
    for axis, (name, size) in enumerate((("row", shape[0]), ("column", shape[1]))):
        if edge_index.size(1) and (
            int(edge_index[axis].min()) < 0 or int(edge_index[axis].max()) >= size
        ):
            raise ValueError(
                f"edge_index[{axis}] has a {name} index outside [0, {size}) "
                f"(min {int(edge_index[axis].min())}, max {int(edge_index[axis].max())})"
            )
    # Bounds are checked above, so torch's per-call invariant check is not needed.
    coo = torch.sparse_coo_tensor(edge_index, edge_weight, shape, check_invariants=False).coalesce()
    index = coo.indices()
    return index[0], index[1], coo.values()


#: How the layers ``x, A x, ..., A^L x`` of a propagation are combined.
COMBINE_MODES = ("sum", "mean", "last")


def combine_layers(
    step: Callable[[Tensor], Tensor], x: Tensor, num_layers: int, combine: str
) -> Tensor:
    """``combine(x, step(x), ..., step^L(x))`` through autograd, one ``step`` per layer.

    The generic path of a layer-combining propagation (``combine`` in
    :data:`COMBINE_MODES`); never returns ``x`` itself, so callers may modify the result.
    """
    if num_layers == 0:
        return x.clone()
    h = x
    total = x if combine != "last" else None
    for _ in range(num_layers):
        h = step(h)
        if total is not None:
            total = total + h
    if total is None:
        return h
    return total / (num_layers + 1) if combine == "mean" else total


class SparseAdjacency:
    """A fixed sparse ``[R, C]`` matrix prepared for one kernel; ``adj @ x`` is differentiable.

    Build it with :func:`to_adjacency`. It keeps the coalesced COO entries (``row``,
    ``col``, ``value``) for graph surgery such as FREEDOM's edge pruning.

    Attributes:
        backend: ``"csr"``, ``"edge_index"`` or ``"torch_sparse"``.
        shape: ``(R, C)``.
        symmetric: ``A == A^T`` exactly (then one CSR serves both directions).
    """

    def __init__(
        self,
        row: Tensor,
        col: Tensor,
        value: Tensor,
        shape: tuple[int, int],
        backend: str,
        symmetric: bool | None = None,
    ) -> None:
        if check_backend(backend) == "auto":
            raise ValueError(f"a SparseAdjacency needs a concrete backend, one of {BACKENDS}")
        self.row, self.col, self.value = row, col, value
        self.shape = (int(shape[0]), int(shape[1]))
        self.backend = backend
        if symmetric is None:  # known when re-preparing the same entries
            symmetric = self.shape[0] == self.shape[1] and _is_symmetric(row, col, value)
        self.symmetric = symmetric
        self._csr_pair: tuple[Tensor, Tensor] | None = None
        self._bipartite: dict[int, tuple[Tensor, Tensor] | None] = {}
        self._row_blocks: dict[tuple[int, int], SparseAdjacency] = {}
        self._product: Callable[[Tensor], Tensor] = self._build()

    def __getstate__(self) -> dict[str, object]:
        # Only the entries travel (pickle, torch.save): the kernel's prepared matrices and
        # caches are derived from them and the product is a closure, rebuilt on load.
        return {
            name: getattr(self, name)
            for name in ("row", "col", "value", "shape", "backend", "symmetric")
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)  # type: ignore[misc, arg-type]

    def _build(self) -> Callable[[Tensor], Tensor]:
        """The backend's differentiable ``x -> A @ x``."""
        if self.backend == "csr":
            matrix = csr_kernels.csr_matrix(self.row, self.col, self.value, self.shape)
            if self.symmetric:
                matrix_t = matrix
            else:
                t_row, t_col, t_value = _coalesce(
                    torch.stack([self.col, self.row]), self.value, self.shape[::-1]
                )
                matrix_t = csr_kernels.csr_matrix(t_row, t_col, t_value, self.shape[::-1])
            self._csr_pair = (matrix, matrix_t)
            return lambda x: csr_kernels.csr_product(matrix, matrix_t, x)
        if self.backend == "edge_index":
            from torch_geometric import EdgeIndex

            index = EdgeIndex(
                torch.stack([self.row, self.col]),
                sparse_size=self.shape,
                sort_order="row",
                is_undirected=False,
            )
            index.fill_cache_()
            value = self.value
            return lambda x: index.matmul(x, input_value=value)
        from torch_sparse import SparseTensor, matmul

        tensor = SparseTensor(
            row=self.row, col=self.col, value=self.value, sparse_sizes=self.shape, is_sorted=True
        )
        tensor.fill_cache_()
        return lambda x: matmul(tensor, x)

    @property
    def nnz(self) -> int:
        return int(self.value.numel())

    @property
    def device(self) -> torch.device:
        return self.value.device

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def matmul(self, x: Tensor) -> Tensor:
        """``A @ x`` for ``x`` ``[C, F]`` (inside :func:`cm3_pyg.nn.parallel.split_rows`:
        this process's block of rows, then every process's)."""
        check_tensor(x, "adjacency matmul: x", dims=2, floating=True)
        if x.size(0) != self.shape[1]:
            raise ValueError(
                f"adjacency of shape {list(self.shape)} cannot multiply x with {x.size(0)} rows"
            )
        split = active_split()
        if split is not None:
            # row-parallel (cm3_pyg.nn.parallel): this process's rows, then all of them
            block = self.row_block(split.rank, split.world_size)
            return gather_rows(block._local_matmul(x), self.shape[0], split)
        return self._local_matmul(x)

    __matmul__ = matmul

    def _local_matmul(self, x: Tensor) -> Tensor:
        if use_kernel("sparse_product", x, backend=self.backend):
            return self._product(x)
        return reference.sparse_matmul(self, x)

    def row_block(self, rank: int, world_size: int) -> SparseAdjacency:
        """Process ``rank``'s block of rows (:func:`cm3_pyg.nn.parallel.row_bounds`) as an
        ``[end - start, C]`` adjacency of the same backend (cached)."""
        key = (rank, world_size)
        if key not in self._row_blocks:
            start, end = row_bounds(self.shape[0], rank, world_size)
            # entries are row-major sorted: the block's entries are one slice
            lo, hi = torch.searchsorted(self.row, torch.tensor([start, end], device=self.device))
            lo, hi = int(lo), int(hi)
            self._row_blocks[key] = SparseAdjacency(
                self.row[lo:hi] - start,
                self.col[lo:hi],
                self.value[lo:hi],
                (end - start, self.shape[1]),
                self.backend,
                symmetric=False,
            )
        return self._row_blocks[key]

    def propagate(self, x: Tensor, num_layers: int, combine: str = "sum") -> Tensor:
        r"""``combine(x, A x, ..., A^L x)`` with ``combine`` ``"sum"``, ``"mean"`` or ``"last"``.

        The CSR backend runs all ``L`` products in one autograd node (in-place totals,
        Horner's rule backward, :mod:`cm3_pyg.nn.kernels.spmm`); other backends loop over
        their product. Both compute the same values as
        :func:`cm3_pyg.nn.reference.propagate`, which runs instead inside
        :func:`~cm3_pyg.nn.use_reference_math`.
        """
        self._check_propagation(x, num_layers, combine)
        if active_split() is not None:  # row-parallel: each layer's product is divided
            return combine_layers(self.matmul, x, num_layers, combine)
        if use_kernel("csr_layer_sum", x, backend=self.backend) and self._csr_pair is not None:
            matrix, matrix_t = self._csr_pair
            return csr_kernels.csr_layer_sum(matrix, matrix_t, x, num_layers, combine)
        if use_kernel("sparse_product", x, backend=self.backend):
            return combine_layers(self._product, x, num_layers, combine)
        return reference.propagate(self, x, num_layers, combine)

    def _check_propagation(self, x: Tensor, num_layers: int, combine: str) -> None:
        check_tensor(x, "propagate: x", dims=2, floating=True)
        check_int(num_layers, "propagate: num_layers", minimum=0)
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"propagate needs a square adjacency, got shape {list(self.shape)}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if x.size(0) != self.shape[1]:
            raise ValueError(
                f"adjacency of shape {list(self.shape)} cannot multiply x with {x.size(0)} rows"
            )

    def _bipartite_blocks(self, num_users: int) -> tuple[Tensor, Tensor] | None:
        """CSR ``R`` ``[U, I]`` and ``R^T`` ``[I, U]`` when this is a symmetric CSR matrix
        ``[[0, R], [R^T, 0]]`` with ``U = num_users``; ``None`` otherwise (cached)."""
        if num_users not in self._bipartite:
            blocks = None
            n = self.shape[0]
            if self.backend == "csr" and self.symmetric and 0 < num_users < n:
                in_user_rows = self.row < num_users
                if bool(((self.col >= num_users) == in_user_rows).all()):
                    row, col, value = self.row, self.col, self.value
                    # Entries are row-major sorted: the user rows come first.
                    head = int(in_user_rows.sum())
                    user_item = csr_kernels.csr_matrix(
                        row[:head], col[:head] - num_users, value[:head], (num_users, n - num_users)
                    )
                    item_user = csr_kernels.csr_matrix(
                        row[head:] - num_users, col[head:], value[head:], (n - num_users, num_users)
                    )
                    blocks = (user_item, item_user)
            self._bipartite[num_users] = blocks
        return self._bipartite[num_users]

    def propagate_rows(
        self,
        x: Tensor,
        num_layers: int,
        combine: str,
        num_users: int,
        users: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``(out[users], out[num_users:])`` of :meth:`propagate` for a user-item graph.

        For a symmetric bipartite CSR matrix (the normalised user-item graph, users first)
        on CPU, the last layer is formed only for the rows ``users`` and the items
        (:func:`cm3_pyg.nn.kernels.spmm.batch_rows_layer_sum`): the same values and gradients
        as the full propagation's rows. Otherwise this is the full propagation
        (:meth:`propagate`), split and gathered, as in
        :func:`cm3_pyg.nn.reference.propagate_rows`.

        Args:
            x: ``[N, F]`` node input (users first).
            num_layers: ``L``.
            combine: as :meth:`propagate`.
            num_users: ``U``.
            users: ``[B]`` user ids in ``[0, U)``.
        """
        if users.dim() != 1 or users.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                "users must be a 1-D integer tensor, "
                f"got shape {list(users.shape)} of {users.dtype}"
            )
        # Checked where it is free: on an accelerator it would be a host sync per batch.
        on_cpu = users.device.type == "cpu"
        if on_cpu and users.numel() and (int(users.min()) < 0 or int(users.max()) >= num_users):
            raise ValueError(
                f"users must lie in [0, {num_users}), got ids from {int(users.min())} "
                f"to {int(users.max())}"
            )
        blocks = None
        if (
            num_layers > 0
            and active_split() is None  # row-parallel: the full, divided propagation
            and use_kernel("csr_batch_rows", x, backend=self.backend)
        ):
            blocks = self._bipartite_blocks(num_users)
        if blocks is None:
            out = self.propagate(x, num_layers, combine)
            user_rows, item_rows = out.split([num_users, out.size(0) - num_users])
            return user_rows.index_select(0, users), item_rows
        self._check_propagation(x, num_layers, combine)
        user_item, item_user = blocks
        matrix = self._csr_pair[0]  # set for the csr backend
        return csr_kernels.batch_rows_layer_sum(
            matrix, user_item, item_user, x, users, num_layers, combine
        )

    def to(self, target: torch.device | str | torch.dtype) -> SparseAdjacency:
        """A copy on another device (``torch.device``/str) or with another value dtype."""
        if isinstance(target, torch.dtype):
            if target == self.value.dtype:
                return self
            row, col, value = self.row, self.col, self.value.to(target)
        else:
            device = torch.device(target)
            if device == self.device:
                return self
            row, col, value = self.row.to(device), self.col.to(device), self.value.to(device)
        return SparseAdjacency(row, col, value, self.shape, self.backend, self.symmetric)

    def with_backend(self, backend: str) -> SparseAdjacency:
        """The same matrix prepared for another kernel."""
        if backend == self.backend:
            return self
        return SparseAdjacency(self.row, self.col, self.value, self.shape, backend, self.symmetric)

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.value.dtype, device=self.device)
        out[self.row, self.col] = self.value
        return out

    def __repr__(self) -> str:
        return (
            f"SparseAdjacency(shape={list(self.shape)}, nnz={self.nnz}, backend={self.backend!r}, "
            f"symmetric={self.symmetric})"
        )


def _is_symmetric(row: Tensor, col: Tensor, value: Tensor) -> bool:
    """Exact symmetry test on coalesced entries (one sort)."""
    if row.numel() == 0:
        return True
    n = int(torch.maximum(row.max(), col.max())) + 1
    order = torch.argsort(col * n + row)
    return bool(
        torch.equal(col[order], row)
        and torch.equal(row[order], col)
        and torch.equal(value[order], value)
    )


# Measured choices, keyed by (device type, shape, nnz, width, candidates).
_CHOICES: dict[tuple[Any, ...], str] = {}


def time_forward_backward(
    product: Callable[[Tensor], Tensor], x: Tensor, repeats: int = 3
) -> list[float]:
    """Seconds of ``product(x).sum().backward()`` for each of ``repeats`` runs after a warm-up.

    ``x`` must require grad; its gradient is reset before every run.
    """

    def run() -> None:
        x.grad = None
        product(x).sum().backward()

    run()  # warm-up (lazy caches, allocator)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        run()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return times


#: Layers of the propagation timed for a square adjacency (LightGCN-style models use 1-4).
MEASURED_LAYERS = 3


def measure_backends(
    adj: SparseAdjacency, width: int = 64, repeats: int = 3, backends: list[str] | None = None
) -> dict[str, float]:
    """Seconds of a forward + backward pass with a random ``[C, width]`` input, per kernel.

    What is timed is what models run: for a square adjacency the multi-layer
    :meth:`SparseAdjacency.propagate` (:data:`MEASURED_LAYERS` layers, summed), where the
    CSR kernel fuses all layers into one autograd node; otherwise one product. The best of
    ``repeats`` timed runs after one warm-up; every kernel sees the same input.
    """
    backends = available_backends() if backends is None else backends
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(adj.shape[1], width, generator=generator, dtype=adj.value.dtype)
    x = x.to(adj.device).requires_grad_()
    times = {}
    for backend in backends:
        prepared = adj.with_backend(backend)
        if adj.shape[0] == adj.shape[1]:

            def product(h: Tensor, prepared: SparseAdjacency = prepared) -> Tensor:
                return prepared.propagate(h, MEASURED_LAYERS, "sum")

        else:
            product = prepared.matmul
        times[backend] = min(time_forward_backward(product, x, repeats))
    return times


def choose_backend(adj: SparseAdjacency, width: int = 64) -> str:
    """The fastest installed kernel for ``adj`` by measurement (cached per shape and device).

    ``"csr"`` is kept unless another kernel takes less than :data:`AUTO_MARGIN` of its
    time, so that close calls do not flip between runs, and below :data:`AUTO_MIN_NNZ`
    entries without measuring. Kernels sum in different orders: for bit-identical repeats
    of a large run, pin the backend (``run_experiment`` records the one chosen).
    """
    candidates = available_backends()
    key = (adj.device.type, adj.shape, adj.nnz, width, tuple(candidates))
    if key not in _CHOICES:
        if len(candidates) == 1 or adj.nnz < AUTO_MIN_NNZ:
            _CHOICES[key] = candidates[0]
        else:
            times = measure_backends(adj, width)
            best = min(times, key=times.__getitem__)
            choice = best if times[best] < AUTO_MARGIN * times["csr"] else "csr"
            logger.info(
                "sparse backend for %s nnz=%d: %s (%s)",
                list(adj.shape),
                adj.nnz,
                choice,
                ", ".join(f"{b} {t * 1e3:.2f} ms" for b, t in times.items()),
            )
            _CHOICES[key] = choice
    return _CHOICES[key]


def to_adjacency(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_rows: int,
    num_cols: int | None = None,
    backend: str = "auto",
    width: int = 64,
) -> SparseAdjacency:
    """Build a sparse ``[num_rows, num_cols]`` matrix with ``A[row, col] = weight``.

    Args:
        edge_index: ``[2, E]`` int64, ``edge_index[0]`` the row (aggregating node),
            ``edge_index[1]`` the column. Duplicate entries are summed.
        edge_weight: ``[E]`` values, or ``None`` for ones.
        num_rows: number of rows.
        num_cols: number of columns (default ``num_rows``).
        backend: ``"auto"`` (fastest by measurement), ``"csr"``, ``"edge_index"`` or
            ``"torch_sparse"``.
        width: feature width used when ``"auto"`` measures the kernels.
    """
    num_rows = check_int(num_rows, "to_adjacency: num_rows", minimum=0)
    num_cols = (
        num_rows if num_cols is None else check_int(num_cols, "to_adjacency: num_cols", minimum=0)
    )
    check_tensor(edge_index, "to_adjacency: edge_index", integer=True)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
    check_tensor(edge_weight, "to_adjacency: edge_weight", floating=True)
    if edge_weight.shape != (edge_index.size(1),):
        raise ValueError(
            f"edge_weight must have shape [{edge_index.size(1)}], got {list(edge_weight.shape)}"
        )
    check_backend(backend)
    shape = (int(num_rows), int(num_cols))
    row, col, value = _coalesce(edge_index, edge_weight, shape)
    if backend != "auto":
        return SparseAdjacency(row, col, value, shape, backend)
    adj = SparseAdjacency(row, col, value, shape, "csr")
    return adj.with_backend(choose_backend(adj, width))


#: The one adjacency type of :mod:`cm3_pyg.nn`: every layer and function that multiplies by a
#: graph takes a :class:`SparseAdjacency`. Other sparse representations are converted once,
#: at the boundary, by :func:`as_adjacency`.
Adjacency = SparseAdjacency


def as_adjacency(adj: object, name: str = "adj") -> SparseAdjacency:
    """``adj`` as a :class:`SparseAdjacency`.

    A :class:`SparseAdjacency` is returned as it is. A torch sparse tensor (COO or CSR) is
    converted to the ``"csr"`` backend, a ``torch_sparse.SparseTensor`` to
    ``"torch_sparse"`` (same entries, duplicates summed; the values are not differentiated).
    A conversion costs a sort of the entries: convert once and keep the result rather than
    passing a raw tensor on every call.

    Args:
        adj: the adjacency.
        name: the argument's name, for the error message.

    Raises:
        TypeError: for anything else (a dense tensor, an ``EdgeIndex``, ...), naming
            ``name`` and the expected type.
    """
    if isinstance(adj, SparseAdjacency):
        return adj
    if isinstance(adj, Tensor) and adj.layout in (torch.sparse_coo, torch.sparse_csr):
        if adj.dim() != 2:
            raise TypeError(f"{name}: expected a 2-D sparse adjacency, got {adj.dim()} dims")
        shape = (int(adj.size(0)), int(adj.size(1)))
        if adj.layout == torch.sparse_csr:
            crow = adj.crow_indices()
            row = torch.repeat_interleave(
                torch.arange(shape[0], device=crow.device), crow[1:] - crow[:-1]
            )
            index, value = torch.stack([row, adj.col_indices()]), adj.values()
        else:
            coalesced = adj.coalesce()
            index, value = coalesced.indices(), coalesced.values()
        row, col, value = _coalesce(index, value.detach(), shape)
        return SparseAdjacency(row, col, value, shape, "csr")
    if WITH_TORCH_SPARSE:
        from torch_sparse import SparseTensor

        if isinstance(adj, SparseTensor):
            row, col, value = adj.coo()
            if value is None:
                value = torch.ones(row.numel(), device=row.device)
            shape = (int(adj.sparse_size(0)), int(adj.sparse_size(1)))
            row, col, value = _coalesce(torch.stack([row, col]), value.detach(), shape)
            return SparseAdjacency(row, col, value, shape, "torch_sparse")
    if isinstance(adj, Tensor):
        kind = f"a dense tensor of layout {adj.layout}"
        if type(adj).__name__ == "EdgeIndex":
            kind = "an EdgeIndex (build one with to_adjacency(..., backend='edge_index'))"
    else:
        kind = type(adj).__name__
    raise TypeError(
        f"{name}: expected a sparse adjacency (a SparseAdjacency from "
        f"cm3_pyg.nn.to_adjacency, or a torch sparse COO/CSR tensor or "
        f"torch_sparse.SparseTensor to convert), got {kind}"
    )


def spmm(adj: Adjacency, x: Tensor) -> Tensor:
    """``adj @ x``, differentiable with respect to ``x`` (other sparse representations are
    converted by :func:`as_adjacency`)."""
    return as_adjacency(adj, "adj").matmul(x)


def adjacency_shape(adj: Adjacency) -> tuple[int, int]:
    """``(rows, cols)`` of an adjacency (converted by :func:`as_adjacency` if need be)."""
    return as_adjacency(adj, "adj").shape
