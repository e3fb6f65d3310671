r"""Training on several processes with ``torch.distributed``, launched by ``torchrun``.

Every process holds the whole model and the whole data and draws the same batches and random
numbers (one seed). Inside each step the row-wise work is divided (:mod:`cm3_pyg.nn.parallel`):
process ``r`` of ``P`` encodes its block of the item feature rows and forms its block of rows
of every sparse product of propagation; the blocks are all-gathered, and the batch's losses,
pairwise terms included, are computed on the whole global batch. Each process back-propagates
``loss / P``; :class:`DividedOptimizer` sums the parameter gradients (reduce-scatter), steps
each process's block of the parameters and gathers the blocks, so every step is the
single-process step at the same batch (equal up to floating-point summation order), and the
parameters stay identical on every process. Evaluation splits the evaluated users into ``P``
blocks and adds up the metric sums.

A checkpoint (written by rank 0) holds the parameters and the undivided optimiser state, so
it resumes with any number of processes, one included. Rank 0 writes every file; the other
ranks only read.

Launch: ``torchrun --nproc_per_node 2 -m cm3_pyg train ...`` (gloo on CPU, NCCL when the
configured device is CUDA: rank ``r`` then uses ``cuda:<LOCAL_RANK>``).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cm3_pyg.data.graphs import cosine_topk, default_block_size
from cm3_pyg.errors import ConfigError
from cm3_pyg.metrics import FullRankingEvaluator, RankingSums
from cm3_pyg.nn.parallel import (
    RowSplit,
    all_gather_blocks,
    reduce_scatter_blocks,
    row_bounds,
)

__all__ = ["DividedOptimizer", "World", "divided_cosine_topk", "world_from_env"]

logger = logging.getLogger("cm3_pyg")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: this process's rank (``0`` writes the files).
        world_size: the number of processes ``P``.
        local_rank: its rank on this machine (selects its GPU).
    """

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def split(self) -> RowSplit:
        """The row-parallel group of :mod:`cm3_pyg.nn.parallel` (the default group)."""
        return RowSplit(self.rank, self.world_size)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> torch.device:
        """The configured device, each process on its own GPU for CUDA."""
        device = torch.device(configured)
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Make every tensor of ``module``'s state rank 0's (the same seed gives the same
        initialisation; this guarantees it)."""
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if isinstance(tensor, Tensor):
                    dist.broadcast(tensor, src=0)

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def user_block(
        self,
        num_items: int,
        train_edges: Tensor,
        target_edges: Tensor,
        ks: tuple[int, ...],
        batch_size: int,
    ) -> FullRankingEvaluator | None:
        """An evaluator of this process's block of the evaluated users (the sorted users of
        ``target_edges``), same masks and cut-offs; ``None`` when the block is empty."""
        users = torch.unique(target_edges[0].cpu())
        start, end = row_bounds(users.numel(), self.rank, self.world_size)
        if start == end:
            return None
        keep = torch.isin(target_edges[0].cpu(), users[start:end])
        return FullRankingEvaluator(
            num_items, train_edges, target_edges[:, keep.to(target_edges.device)], ks, batch_size
        )

    def reduce_sums(self, sums: RankingSums | None, ks: tuple[int, ...]) -> RankingSums:
        """The sum over the processes of their blocks' :class:`RankingSums` (``None``: an
        empty block)."""
        if sums is None:
            sums = RankingSums(
                ks, torch.zeros(5, len(ks), dtype=torch.float64), torch.zeros((), dtype=torch.long)
            )
        total = sums.sums.double().clone()
        count = sums.num_users.to(total.device, torch.float64).reshape(1)
        packed = torch.cat([total.reshape(-1), count])
        if dist.get_backend() == "nccl":
            packed = packed.cuda(self.local_rank)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.cpu()
        return RankingSums(
            ks, packed[:-1].view_as(sums.sums), packed[-1].round().to(torch.long).reshape(())
        )


#: State entries that are not per element (Adam's step count).
_SCALAR_STATE = ("step",)


class DividedOptimizer:
    """An element-wise optimiser (Adam, SGD) whose state each process keeps for its block of
    the parameters only.

    Per parameter group, the parameters are laid end to end and process ``r`` owns the
    elements of block ``r`` (:func:`~cm3_pyg.nn.parallel.row_bounds` over their total
    size). After the backward, :meth:`step` reduce-scatters the flattened gradients, so each
    process receives the sum over the processes of its block only, steps an optimiser made
    by ``make`` over views of that block (Adam's moments: ``1 / P`` of their memory), and
    all-gathers the updated blocks into every process's parameters. An element-wise
    optimiser takes the same step on a block as on the whole parameter, so training equals
    the undivided optimiser's. A parameter without a gradient is skipped, as by the
    optimiser itself (every process has the same ones).

    :meth:`state_dict` and :meth:`load_state_dict` use the undivided optimiser's format, so a
    checkpoint resumes on any number of processes; :meth:`state_dict` is collective (every
    process calls it).

    Args:
        groups: parameter groups as for ``torch.optim`` (``{"params": [...], ...}``); the
            parameters of a group share a dtype and device and are contiguous.
        make: builds the optimiser over groups (the same for the block and for the whole).
        world: the processes.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        world: World,
    ) -> None:
        self.world, self._make = world, make
        self._groups = [dict(g, params=list(g["params"])) for g in groups if g["params"]]
        #: per group: (its parameters, [(parameter, offset, start, end, view of its block)])
        self._layout: list[tuple[list[Tensor], list[tuple[Tensor, int, int, int, Tensor]]]] = []
        inner_groups = []
        split = world.split
        for index, group in enumerate(self._groups):
            params = group["params"]
            kinds = {(p.dtype, p.device) for p in params}
            if len(kinds) > 1 or not all(p.is_contiguous() for p in params):
                raise ValueError(
                    f"DividedOptimizer: parameter group {index} mixes dtypes or devices "
                    f"({sorted(str(k) for k in kinds)}) or holds a non-contiguous parameter"
                )
            lo, hi = split.bounds(sum(p.numel() for p in params))
            pieces, offset = [], 0
            for p in params:
                start, end = max(lo - offset, 0), min(hi - offset, p.numel())
                if start < end:
                    # a view: the optimiser updates the parameter in place, and a change the
                    # model makes to it (LIRDRec's per-epoch attention) is what it steps
                    piece = p.detach().view(-1)[start:end]
                    pieces.append((p, offset, start, end, piece))
                offset += p.numel()
            self._layout.append((params, pieces))
            hyper = {k: v for k, v in group.items() if k != "params"}
            inner_groups.append({**hyper, "params": [piece[-1] for piece in pieces]})
        # the hyper-parameters the caller sets (lr decay), one dict per group
        self.param_groups: list[dict[str, Any]] = [
            {k: v for k, v in g.items() if k != "params"} for g in self._groups
        ]
        self._owned = [i for i, g in enumerate(inner_groups) if g["params"]]
        self.inner = make([inner_groups[i] for i in self._owned]) if self._owned else None

    @property
    def parameters(self) -> list[Tensor]:
        """Every parameter, in group order."""
        return [p for params, _ in self._layout for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        """Sum the gradients (reduce-scatter), step this process's block, gather the blocks."""
        split = self.world.split
        for params, pieces in self._layout:
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            )
            own = reduce_scatter_blocks(flat, split)
            base = pieces[0][1] + pieces[0][2] if pieces else 0
            for p, offset, start, end, piece in pieces:
                at = offset + start - base
                piece.grad = None if p.grad is None else own[at : at + end - start]
        if self.inner is not None:
            for inner_group, index in zip(self.inner.param_groups, self._owned, strict=True):
                inner_group.update(self.param_groups[index])
            self.inner.step()
        with torch.no_grad():
            for params, pieces in self._layout:
                local = torch.cat([piece[-1].detach() for piece in pieces]) if pieces else None
                if local is None:
                    local = params[0].new_empty(0)
                full = all_gather_blocks(local, sum(p.numel() for p in params), split)
                offset = 0
                for p in params:
                    p.view(-1).copy_(full[offset : offset + p.numel()])
                    offset += p.numel()

    def _whole(self) -> torch.optim.Optimizer:
        """The undivided optimiser over the whole parameters, with the current
        hyper-parameters and no state."""
        whole = self._make([dict(g) for g in self._groups])
        for group, hyper in zip(whole.param_groups, self.param_groups, strict=True):
            group.update(hyper)
        return whole

    def state_dict(self) -> dict[str, Any]:
        """The undivided optimiser's ``state_dict`` (collective: every process calls it)."""
        split = self.world.split
        whole = self._whole()
        state = self.inner.state if self.inner is not None else {}
        # which parameters have state, with their per-parameter entries, from the process
        # owning each parameter's first element (rank order: the earliest owner wins)
        scalars: dict[tuple[int, int], dict[str, Any]] = {}
        for g, (params, pieces) in enumerate(self._layout):
            index = {id(p): i for i, p in enumerate(params)}
            for p, _, start, _, piece in pieces:
                if start == 0 and piece in state:
                    scalars[(g, index[id(p)])] = {
                        k: v.cpu() if torch.is_tensor(v) else v
                        for k, v in state[piece].items()
                        if k in _SCALAR_STATE
                    } | {"__keys__": sorted(state[piece])}
        every: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(every, scalars)
        known: dict[tuple[int, int], dict[str, Any]] = {}
        for part in every:
            for key, value in part.items():
                known.setdefault(key, value)
        out_state: dict[int, dict[str, Any]] = {}
        number = 0
        for g, (params, pieces) in enumerate(self._layout):
            keys = sorted(
                {k for (gg, _), v in known.items() if gg == g for k in v["__keys__"]}
                - set(_SCALAR_STATE)
            )
            total = sum(p.numel() for p in params)
            gathered = {}
            for key in keys:
                local = [
                    state[piece][key] if piece in state else torch.zeros_like(piece)
                    for *_, piece in pieces
                ]
                block = torch.cat(local) if local else params[0].new_empty(0)
                gathered[key] = all_gather_blocks(block.detach(), total, split, count=False)
            offset = 0
            for i, p in enumerate(params):
                entry = known.get((g, i))
                if entry is not None:
                    values = {k: v for k, v in entry.items() if k != "__keys__"}
                    for key in keys:
                        flat = gathered[key][offset : offset + p.numel()]
                        values[key] = flat.view_as(p).clone()
                    out_state[number + i] = values
                offset += p.numel()
            number += len(params)
        result = whole.state_dict()
        result["state"] = out_state
        return result

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this process's block of an undivided optimiser's ``state_dict``."""
        whole = self._whole()
        whole.load_state_dict(state)  # checks the layout and moves the tensors
        for hyper, group in zip(self.param_groups, whole.param_groups, strict=True):
            # the settings a caller sets (lr, the group's own); implementation flags such as
            # ``fused`` stay those of the optimiser made for this process's block
            hyper.update({k: group[k] for k in {*hyper, "lr"} if k in group})
        if self.inner is None:
            return
        self.inner.state.clear()
        for _, pieces in self._layout:
            for p, _, start, end, piece in pieces:
                saved = whole.state.get(p)
                if not saved:
                    continue
                self.inner.state[piece] = {
                    k: (
                        v.reshape(-1)[start:end].clone()
                        if torch.is_tensor(v) and k not in _SCALAR_STATE
                        else (v.clone() if torch.is_tensor(v) else v)
                    )
                    for k, v in saved.items()
                }


_WORLD: World | None = None


def divided_cosine_topk(
    x: Tensor, k: int, block_size: int | None = None, *, split: RowSplit
) -> tuple[Tensor, Tensor]:
    """:func:`~cm3_pyg.data.graphs.cosine_topk` of every row, each process searching only
    for its share of the query rows and the shares all-gathered: on every process the
    undivided call's ``[N, k]`` result, bit for bit, for about ``1 / P`` of the similarity
    products each. The shares are whole blocks of ``block_size`` rows (the same default as
    the undivided call), so every block product is the one the undivided call forms. Every
    process must call it with the same ``x`` (a bad ``x`` fails on all of them alike, before
    any exchange). Not counted as training traffic."""
    num_rows = x.size(0) if x.dim() > 0 else 0
    if block_size is None and num_rows > 0:
        block_size = default_block_size(num_rows)
    blocks = -(-num_rows // block_size) if block_size else 0  # a bad size fails below
    stride = -(-blocks // split.world_size) * block_size if blocks else 0
    start = min(split.rank * stride, num_rows)
    end = min(start + stride, num_rows)
    values, indices = cosine_topk(x, k, block_size=block_size, rows=(start, end))
    return (
        all_gather_blocks(values, num_rows, split, count=False, stride=stride),
        all_gather_blocks(indices, num_rows, split, count=False, stride=stride),
    )


def world_from_env(configured_device: str = "cpu") -> World | None:
    """The :class:`World` of a process started by ``torchrun`` (``WORLD_SIZE > 1``), its
    process group initialised once (gloo on CPU, NCCL for a CUDA device); ``None`` for a
    single process.

    Raises:
        ConfigError: a CUDA device without NCCL or with fewer GPUs than local ranks.
    """
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    if _WORLD is not None:
        return _WORLD
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(configured_device).type == "cuda"
    if cuda and (not dist.is_nccl_available() or torch.cuda.device_count() <= local_rank):
        raise ConfigError(
            f"device {configured_device!r} on {size} processes needs NCCL and a GPU per "
            f"process on each machine; local rank {local_rank} found "
            f"{torch.cuda.device_count()} GPU(s)"
        )
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_shutdown)
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise ConfigError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the "
            f"environment says {rank} of {size}"
        )
    if rank != 0:  # one process reports
        logger.setLevel(logging.WARNING)
    _WORLD = World(rank, size, local_rank)
    return _WORLD


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
