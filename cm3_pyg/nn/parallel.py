r"""Row-parallel execution of the library's row-wise operations across processes.

Inside :func:`split_rows` every process of a ``torch.distributed`` group runs the same
model code on the same inputs, but the operations whose output rows are independent of each
other are divided: :func:`~cm3_pyg.nn.feature_linear` (the item feature encoders) and the
products of a :class:`~cm3_pyg.nn.SparseAdjacency` (propagation). Process ``r`` of ``P``
computes the contiguous block of output rows ``[n r / P, n (r + 1) / P)`` and the blocks are
gathered (:func:`gather_rows`), so every process continues with the full table. Everything
else is replicated: it is computed identically by every process (same seed, same inputs, same
order of random draws, since the divided operations draw no random numbers).

Gradients stay exact. With the loss of each process scaled by ``1 / P`` and the parameter
gradients summed over the processes afterwards (the trainer does both), the result is the
gradient of the single-process loss: the gradient of a gathered table arriving at each
process is its share of the loss's, and the backward of :func:`gather_rows` sums those
shares before handing each process the rows of its own block, so each divided operation
back-propagates the full gradient of its rows once, somewhere.

A table whose rows are only ever read by those operations can be held divided as well: a
:class:`RowShard` keeps only this process's block of rows (``1 / P`` of the memory), and
:func:`~cm3_pyg.nn.feature_linear` encodes it inside :func:`split_rows` like the full table.

This module knows nothing of training; :mod:`cm3_pyg.training.distributed` sets it up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "RowShard",
    "RowSplit",
    "Traffic",
    "active_split",
    "all_gather_blocks",
    "count_traffic",
    "gather_rows",
    "record_reduce",
    "reduce_scatter_blocks",
    "row_bounds",
    "split_rows",
]


def row_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of process ``rank``'s block of ``num_rows`` rows: contiguous blocks of
    ``ceil(num_rows / world_size)`` rows in rank order, the last ones shorter (or empty).

    Equal strides put block ``r`` at row ``r * ceil(n / P)`` of the all-gathered buffer, so
    the gathered table is that buffer's first ``n`` rows, with no copy to close up padding.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    stride = -(-num_rows // world_size)
    return min(num_rows, rank * stride), min(num_rows, (rank + 1) * stride)


@dataclass(frozen=True)
class RowSplit:
    """This process's place in a row-parallel group.

    Attributes:
        rank: this process's rank in ``group``.
        world_size: the number of processes ``P``.
        group: the ``torch.distributed`` process group (``None``: the default group).
    """

    rank: int
    world_size: int
    group: Any = None

    def bounds(self, num_rows: int) -> tuple[int, int]:
        """``[start, end)`` of this process's block of ``num_rows`` rows."""
        return row_bounds(num_rows, self.rank, self.world_size)


class RowShard:
    """Process ``split.rank``'s block of rows of a ``[num_rows, ...]`` table, the only rows it
    holds (:meth:`RowSplit.bounds`).

    It stands for the full table wherever the table is read only row-wise inside
    :func:`split_rows` of the same group (:func:`~cm3_pyg.nn.feature_linear`); ``shape``,
    ``size``, ``dim``, ``dtype`` and ``device`` describe the full table. Any other use needs the
    whole table and is an error, not a silent gather.

    Args:
        local: the block, ``[end - start, ...]``.
        num_rows: rows of the full table.
        split: the group the rows are divided over.
    """

    def __init__(self, local: Tensor, num_rows: int, split: RowSplit) -> None:
        start, end = split.bounds(num_rows)
        if local.dim() < 1 or local.size(0) != end - start:
            raise ValueError(
                f"RowShard: process {split.rank} of {split.world_size} holds rows [{start}, "
                f"{end}) of {num_rows}, got a block of shape {list(local.shape)}"
            )
        self.local, self.num_rows, self.split = local, num_rows, split

    @classmethod
    def of(cls, table: Tensor, split: RowSplit) -> RowShard:
        """This process's rows of ``table``, copied so that the full table can be freed."""
        start, end = split.bounds(table.size(0))
        return cls(table[start:end].clone(), table.size(0), split)

    @classmethod
    def view(cls, table: Tensor, split: RowSplit) -> RowShard:
        """This process's rows of ``table`` as a view, for a caller that keeps the full table
        alive anyway (a copy would only add the block). Of a memory-mapped table the rows stay
        shared file pages."""
        start, end = split.bounds(table.size(0))
        return cls(table[start:end], table.size(0), split)

    @classmethod
    def of_each(
        cls, tables: Sequence[Tensor | RowShard], split: RowSplit, copy: bool = True
    ) -> list[RowShard]:
        """Every table as this process's rows (those already a ``RowShard`` as they are):
        copied (:meth:`of`) or, with ``copy=False``, views (:meth:`view`)."""
        make = cls.of if copy else cls.view
        return [t if isinstance(t, RowShard) else make(t, split) for t in tables]

    @property
    def start(self) -> int:
        return self.split.bounds(self.num_rows)[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, *self.local.shape[1:]))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.local.dim()

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def to(self, target: torch.device | str | torch.dtype) -> RowShard:
        """The same rows on another device or in another dtype."""
        return RowShard(self.local.to(target), self.num_rows, self.split)

    def block(self) -> Tensor:
        """The rows to compute on: the block, inside :func:`split_rows` of this shard's group.

        Raises:
            ValueError: outside it, or inside another group's (the other rows are elsewhere).
        """
        if self.split.world_size == 1:  # split_rows is inert: the block is the table
            return self.local
        active = active_split()
        if active is None or (active.rank, active.world_size) != (
            self.split.rank,
            self.split.world_size,
        ):
            where = (
                "outside split_rows"
                if active is None
                else (f"inside split_rows of process {active.rank} of {active.world_size}")
            )
            raise ValueError(
                f"a RowShard of process {self.split.rank} of {self.split.world_size} holds "
                f"rows [{self.start}, {self.start + self.local.size(0)}) of {self.num_rows} only "
                f"and is read row-wise inside split_rows of its group; it was read {where}"
            )
        return self.local

    def __repr__(self) -> str:
        start = self.start
        return (
            f"RowShard(rows [{start}, {start + self.local.size(0)}) of {list(self.shape)}, "
            f"process {self.split.rank} of {self.split.world_size}, {self.dtype})"
        )


_ACTIVE: list[RowSplit] = []


@dataclass
class Traffic:
    """What this process handed to collectives inside :func:`count_traffic` (elements, not
    bytes: multiply by the element size).

    Attributes:
        gathers: all-gathers of row blocks (forward of :func:`gather_rows`).
        gathered: elements of the gathered tables (padded blocks: ``P * max block * width``).
        scatters: reduce-scatters of gathered tables' gradients (backward of
            :func:`gather_rows`).
        scattered: elements handed to them (padded, as ``gathered``).
        reduces: all-reduces reported through :func:`record_reduce` (none in the library's
            training step: :class:`~cm3_pyg.training.distributed.DividedOptimizer`
            reduce-scatters the parameter gradients).
        reduced: elements all-reduced.
    """

    gathers: int = 0
    gathered: int = 0
    scatters: int = 0
    scattered: int = 0
    reduces: int = 0
    reduced: int = 0


_COUNTERS: list[Traffic] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the collectives of the row-parallel operations (and of :func:`record_reduce`
    callers) run inside the block."""
    traffic = Traffic()
    _COUNTERS.append(traffic)
    try:
        yield traffic
    finally:
        _COUNTERS.remove(traffic)


def _record_gather(elements: int) -> None:
    for traffic in _COUNTERS:
        traffic.gathers += 1
        traffic.gathered += elements


def _record_scatter(elements: int) -> None:
    for traffic in _COUNTERS:
        traffic.scatters += 1
        traffic.scattered += elements


def record_reduce(elements: int) -> None:
    """Count one all-reduce of ``elements`` elements (see :func:`count_traffic`)."""
    for traffic in _COUNTERS:
        traffic.reduces += 1
        traffic.reduced += elements


@contextlib.contextmanager
def split_rows(split: RowSplit | None) -> Iterator[None]:
    """Divide the row-wise operations run inside the block across ``split``'s processes
    (``None`` or a single process: no effect). Every process must enter it and run the same
    operations in the same order (they are collective)."""
    if split is None or split.world_size == 1:
        yield
        return
    _ACTIVE.append(split)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_split() -> RowSplit | None:
    """The innermost :func:`split_rows` in effect, or ``None``."""
    return _ACTIVE[-1] if _ACTIVE else None


def all_gather_blocks(
    local: Tensor,
    num_rows: int,
    split: RowSplit,
    count: bool = True,
    stride: int | None = None,
) -> Tensor:
    """The ``[num_rows, ...]`` table from every process's block ``local`` (its rows
    :meth:`RowSplit.bounds`), not differentiable. Counted as a gather (:class:`Traffic`)
    unless ``count`` is false (traffic outside the training step, e.g. a checkpoint).
    ``stride`` (at least ``ceil(num_rows / P)``) gives other equal-stride blocks: process
    ``r`` then holds rows ``[r stride, min((r + 1) stride, num_rows))``."""
    least = -(-num_rows // split.world_size)
    if stride is None:
        stride = least
    elif stride < least:
        raise ValueError(f"all_gather_blocks: stride {stride} < ceil({num_rows} / P) = {least}")
    start = min(split.rank * stride, num_rows)
    if local.size(0) != min(start + stride, num_rows) - start:
        raise ValueError(
            f"all_gather_blocks: process {split.rank} of {split.world_size} holds rows "
            f"[{start}, {min(start + stride, num_rows)}), got {local.size(0)} rows"
        )
    # collectives want equal blocks: only the last blocks are short, padded with zeros
    if local.size(0) < stride:
        local = _pad_rows(local, stride)
    out = local.new_empty((stride * split.world_size, *local.shape[1:]))
    _all_gather_single(out, local.contiguous(), split.group)
    if count:
        _record_gather(out.numel())
    return out[:num_rows] if out.size(0) > num_rows else out


def reduce_scatter_blocks(full: Tensor, split: RowSplit) -> Tensor:
    """This process's block of rows (:meth:`RowSplit.bounds`) of the sum over the processes
    of their ``[n, ...]`` tables ``full``: half the bytes of an all-reduce, and no full-size
    result. Counted as a scatter (:class:`Traffic`)."""
    num_rows = full.size(0)
    start, end = split.bounds(num_rows)
    stride = -(-num_rows // split.world_size)
    if stride == 0:  # an empty table
        return full
    full = full.contiguous()
    blocks = list(full.split(stride))
    blocks += [full[:0]] * (split.world_size - len(blocks))
    # only the last blocks are short: pad those (a few rows), not the table
    blocks = [b if b.size(0) == stride else _pad_rows(b, stride) for b in blocks]
    own = full.new_empty((stride, *full.shape[1:]))
    dist.reduce_scatter(own, blocks, op=dist.ReduceOp.SUM, group=split.group)
    _record_scatter(own.numel() * split.world_size)
    return own[: end - start]


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks; backward: reduce-scatter, i.e. the sum of every process's
    gradient, of which each process receives its own block."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, num_rows: int, split: RowSplit) -> Tensor:  # type: ignore[override]
        ctx.split = split
        return all_gather_blocks(local, num_rows, split)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return reduce_scatter_blocks(grad, ctx.split), None, None


def _pad_rows(block: Tensor, rows: int) -> Tensor:
    padded = block.new_zeros((rows, *block.shape[1:]))
    padded[: block.size(0)] = block
    return padded


def _all_gather_single(out: Tensor, local: Tensor, group: Any) -> None:
    # all_gather_into_tensor is deprecated in favour of all_gather_single where it exists
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def gather_rows(local: Tensor, num_rows: int, split: RowSplit) -> Tensor:
    """The full ``[num_rows, ...]`` table from each process's block ``local`` (its rows
    :meth:`RowSplit.bounds`), differentiable as described in the module docstring."""
    start, end = split.bounds(num_rows)
    if local.size(0) != end - start:
        raise ValueError(
            f"gather_rows: process {split.rank} holds rows [{start}, {end}) of {num_rows}, "
            f"got a block of {local.size(0)} rows"
        )
    return _GatherRows.apply(local, num_rows, split)
