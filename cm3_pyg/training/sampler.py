"""Vectorised training batches with uniformly sampled negatives (MMRec's protocol)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Where negatives are drawn from: the items seen in training (MMRec's protocol) or all
#: ``I`` items (NBPO's).
NEGATIVE_POOLS = ("train_items", "all")


class NegativeSampler:
    """Uniform negatives per positive, excluding the user's own training items.

    Candidates are drawn for the whole batch at once; draws that hit one of the user's
    items are redrawn (only those) until none is left. Membership is a binary search in the
    sorted ``user * num_items + item`` keys of the training set.

    Args:
        train_edge_index: ``[2, E]`` (user, item) training interactions.
        num_items: number of items ``I``.
        pool: ``"train_items"`` (the items seen in training, MMRec's protocol) or ``"all"``.
    """

    def __init__(self, train_edge_index: Tensor, num_items: int, pool: str = "train_items") -> None:
        if pool not in NEGATIVE_POOLS:
            raise ValueError(f"pool must be one of {NEGATIVE_POOLS}, got {pool!r}")
        users, items = train_edge_index.long()
        self.num_items = num_items
        self.pool = pool
        self.keys = torch.unique(users * num_items + items)  # sorted
        if pool == "all":
            self.candidates = torch.arange(num_items, device=items.device)
        else:
            self.candidates = torch.unique(items)
        degree = torch.bincount(torch.div(self.keys, num_items, rounding_mode="floor"))
        if degree.numel() and int(degree.max()) >= self.candidates.numel():
            user = int(torch.argmax(degree))
            raise ValueError(
                f"user {user} interacted with all {self.candidates.numel()} training items: "
                "no negative item can be sampled for them"
            )

    def to(self, device: torch.device | str) -> NegativeSampler:
        self.keys = self.keys.to(device)
        self.candidates = self.candidates.to(device)
        return self

    def is_positive(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B]`` bool: whether each (user, item) is a training interaction."""
        query = users * self.num_items + items
        pos = torch.searchsorted(self.keys, query).clamp_max(self.keys.numel() - 1)
        return self.keys[pos] == query

    def sample(
        self, users: Tensor, generator: torch.Generator | None = None, num_negatives: int = 1
    ) -> Tensor:
        """Negative item ids for the ``[B]`` users: ``[B]`` for one per user (the same draws
        as always), ``[B, K]`` for ``num_negatives = K > 1``."""
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if num_negatives > 1:
            expanded = users.unsqueeze(1).expand(-1, num_negatives).reshape(-1)
            return self.sample(expanded, generator).view(-1, num_negatives)
        n = self.candidates.numel()
        draw = torch.randint(n, users.shape, generator=generator, device=users.device)
        neg = self.candidates[draw]
        bad = self.is_positive(users, neg).nonzero().flatten()
        while bad.numel() > 0:
            redraw = torch.randint(n, bad.shape, generator=generator, device=users.device)
            neg[bad] = self.candidates[redraw]
            still = self.is_positive(users[bad], neg[bad])
            bad = bad[still]
        return neg


def epoch_batches(
    num_rows: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Row indices of one shuffled epoch, in batches of ``batch_size`` (the last may be smaller).

    The permutation is drawn on the generator's device (a CUDA generator cannot drive a
    CPU ``randperm``), so the batches need no host-to-device copy.
    """
    device = generator.device if generator is not None else None
    perm = torch.randperm(num_rows, generator=generator, device=device)
    yield from perm.split(batch_size)
