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

This module knows nothing of training; :mod:`cm3_pyg.training.distributed` sets it up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "RowSplit",
    "Traffic",
    "active_split",
    "count_traffic",
    "gather_rows",
    "record_reduce",
    "row_bounds",
    "split_rows",
]


def row_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of process ``rank``'s block of ``num_rows`` rows: contiguous blocks
    whose sizes differ by at most one row, in rank order."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


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


_ACTIVE: list[RowSplit] = []


@dataclass
class Traffic:
    """What this process handed to collectives inside :func:`count_traffic` (elements, not
    bytes: multiply by the element size).

    Attributes:
        gathers: all-gathers of row blocks (forward of :func:`gather_rows`).
        gathered: elements of the gathered tables (padded blocks: ``P * max block * width``).
        reduces: all-reduces (backward of :func:`gather_rows`, and the gradients' sum).
        reduced: elements all-reduced.
    """

    gathers: int = 0
    gathered: int = 0
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


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks; backward: sum of every process's gradient, own block kept."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, num_rows: int, split: RowSplit) -> Tensor:  # type: ignore[override]
        ctx.split, ctx.num_rows = split, num_rows
        sizes = [
            end - start
            for start, end in (
                row_bounds(num_rows, r, split.world_size) for r in range(split.world_size)
            )
        ]
        width = max(sizes)
        # gloo's all_gather wants equal shapes: pad every block to the largest.
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.size(0)] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=split.group)
        _record_gather(padded.numel() * len(parts))
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        split = ctx.split
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=split.group)
        record_reduce(total.numel())
        start, end = split.bounds(ctx.num_rows)
        return total[start:end], None, None


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
