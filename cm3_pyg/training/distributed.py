r"""Training on several processes with ``torch.distributed``, launched by ``torchrun``.

Every process holds the whole model and the whole data and draws the same batches and random
numbers (one seed). Inside each step the row-wise work is divided (:mod:`cm3_pyg.nn.parallel`):
process ``r`` of ``P`` encodes its block of the item feature rows and forms its block of rows
of every sparse product of propagation; the blocks are all-gathered, and the batch's losses,
pairwise terms included, are computed on the whole global batch. Each process back-propagates
``loss / P`` and the parameter gradients are summed, so every step is the single-process step
at the same batch (equal up to floating-point summation order), and the parameters stay
identical on every process. Evaluation splits the evaluated users into ``P`` blocks and adds
up the metric sums.

Because the state is the same on every process, a checkpoint (written by rank 0) resumes with
any number of processes, one included. Rank 0 writes every file; the other ranks only read.

Launch: ``torchrun --nproc_per_node 2 -m cm3_pyg train ...`` (gloo on CPU, NCCL when the
configured device is CUDA: rank ``r`` then uses ``cuda:<LOCAL_RANK>``).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cm3_pyg.errors import ConfigError
from cm3_pyg.metrics import FullRankingEvaluator, RankingSums
from cm3_pyg.nn.parallel import RowSplit, record_reduce, row_bounds

__all__ = ["World", "world_from_env"]

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

    def all_reduce_gradients(self, parameters: Iterable[Tensor]) -> None:
        """Sum every parameter's gradient over the processes, in one flat buffer."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
        for group in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            record_reduce(flat.numel())
            offset = 0
            for grad in group:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

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


_WORLD: World | None = None


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
