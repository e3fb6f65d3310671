"""Sparse adjacency matrices for propagation, and the kernels that multiply them.

An adjacency here is a fixed matrix ``A`` with ``out = A @ x`` (row ``i`` lists what node
``i`` aggregates), differentiable with respect to ``x``. :func:`to_adjacency` builds a
:class:`SparseAdjacency` for one of three kernels:

* ``"csr"``: ``torch.sparse_csr_tensor`` products (:func:`torch.sparse.mm`, on CPU its
  ``reduce="sum"`` kernel) in both directions. The transpose is built once, so the
  backward pass is one more CSR product; autograd's own backward of ``torch.sparse.mm``
  re-transposes (sorts) the matrix on every call, which cost as much as the products
  themselves on the TikTok graph. A symmetric matrix (the normalised user-item graph) is
  its own transpose and is stored once.
* ``"edge_index"``: PyG's :class:`torch_geometric.EdgeIndex` with its cached CSR/CSC
  metadata (``EdgeIndex.matmul``).
* ``"torch_sparse"``: ``torch_sparse.SparseTensor`` (optional ``sparse`` extra).

``"auto"`` times each installed kernel, forward plus backward, on the matrix itself and
keeps the fastest (see :func:`choose_backend`). PyG's generic
``torch_geometric.utils.spmm`` is not offered: on a CSR tensor it adds conversions around
the same product (``benchmarks/`` measures it).

:func:`spmm` also accepts a plain torch sparse (CSR/COO) tensor or a ``SparseTensor``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


def _csr(row: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR tensor of coalesced (row-major sorted, unique) entries."""
    counts = torch.bincount(row, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=row.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # "CSR support is in beta": we rely only on mm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, value, shape, check_invariants=False)


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


def _csr_mm(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` for a CSR ``matrix`` (no autograd).

    On CPU the ``reduce="sum"`` kernel is used: it writes the rows directly, where the
    default CPU path zero-fills the output and copies operands around the same product
    (about 4x slower on the TikTok graph, see BENCHMARKS.md). Other devices have no such
    kernel and take the default path.
    """
    if x.device.type == "cpu":
        return torch.sparse.mm(matrix, x.contiguous(), "sum")
    return torch.sparse.mm(matrix, x)


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
        self._kernel: Callable[[Tensor], Tensor] = self._build()

    def _build(self) -> Callable[[Tensor], Tensor]:
        if self.backend == "csr":
            matrix = _csr(self.row, self.col, self.value, self.shape)
            if self.symmetric:
                matrix_t = matrix
            else:
                t_row, t_col, t_value = _coalesce(
                    torch.stack([self.col, self.row]), self.value, self.shape[::-1]
                )
                matrix_t = _csr(t_row, t_col, t_value, self.shape[::-1])
            self._csr_pair = (matrix, matrix_t)
            return lambda x: _CSRProduct.apply(matrix, matrix_t, x)
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
        """``A @ x`` for ``x`` ``[C, F]``."""
        if x.size(0) != self.shape[1]:
            raise ValueError(
                f"adjacency of shape {list(self.shape)} cannot multiply x with {x.size(0)} rows"
            )
        return self._kernel(x)

    __matmul__ = matmul

    def propagate(self, x: Tensor, num_layers: int, combine: str = "sum") -> Tensor:
        r"""``combine(x, A x, ..., A^L x)`` with ``combine`` ``"sum"``, ``"mean"`` or ``"last"``.

        The CSR backend runs all ``L`` products in one autograd node (in-place totals,
        Horner's rule backward); other backends loop over :meth:`matmul`. Both compute the
        same values.
        """
        self._check_propagation(x, combine)
        if self._csr_pair is not None:
            matrix, matrix_t = self._csr_pair
            return _CSRLayerSum.apply(matrix, matrix_t, x, num_layers, combine)
        return combine_layers(self._kernel, x, num_layers, combine)

    def _check_propagation(self, x: Tensor, combine: str) -> None:
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
                    user_item = _csr(
                        row[:head], col[:head] - num_users, value[:head], (num_users, n - num_users)
                    )
                    item_user = _csr(
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
        (:class:`_BatchRowsLayerSum`): the same values and gradients as the full
        propagation's rows. Otherwise this is the full propagation, split and gathered.

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
        blocks = self._bipartite_blocks(num_users) if x.device.type == "cpu" else None
        if blocks is None or num_layers == 0:
            out = self.propagate(x, num_layers, combine)
            user_rows, item_rows = out.split([num_users, out.size(0) - num_users])
            return user_rows.index_select(0, users), item_rows
        self._check_propagation(x, combine)
        user_item, item_user = blocks
        batch = _gather_rows(user_item, users)
        matrix = self._csr_pair[0]  # set for the csr backend
        return _BatchRowsLayerSum.apply(
            matrix, user_item, item_user, batch, x, users, num_layers, combine
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


def _gather_rows(matrix: Tensor, rows: Tensor) -> Tensor:
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
    num_cols = num_rows if num_cols is None else num_cols
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
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


def spmm(adj: Any, x: Tensor) -> Tensor:
    """``adj @ x`` for a :class:`SparseAdjacency`, a torch sparse (CSR/COO) tensor or a
    ``torch_sparse.SparseTensor``; differentiable with respect to ``x``."""
    if isinstance(adj, SparseAdjacency):
        return adj.matmul(x)
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
    if isinstance(adj, SparseAdjacency):
        return adj.shape
    if isinstance(adj, Tensor):
        return int(adj.size(0)), int(adj.size(1))
    return tuple(int(s) for s in adj.sparse_sizes())  # type: ignore[return-value]
