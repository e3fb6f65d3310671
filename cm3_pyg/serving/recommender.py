"""Top-K recommendations from a trained-run artifact, in the dataset's own ids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cm3_pyg.data.idmaps import IdMap
from cm3_pyg.errors import RequestError
from cm3_pyg.training.artifact import Artifact, load_artifact

__all__ = ["TopK", "UnknownUserError"]


class UnknownUserError(RequestError, KeyError):
    """A user id the run does not know (or has forgotten)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TopK:
    """Ranks items for users of a trained run.

    Scores are dot products of the artifact's embeddings; a user's train items and the
    run's removed (forgotten) items are never recommended, so a list can be shorter than
    ``k`` when few items are left.

    Args:
        artifact: the run's artifact, or its folder / file.
        max_k: the largest list length a request may ask for.
    """

    def __init__(self, artifact: Artifact | str | os.PathLike[str], max_k: int = 1000) -> None:
        if not isinstance(artifact, Artifact):
            artifact = load_artifact(artifact)
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"max_k must be a positive int, got {max_k!r}")
        self.artifact = artifact
        self.max_k = min(max_k, artifact.num_items)
        self.users = IdMap(artifact.user_ids)
        self.items = IdMap(artifact.item_ids)

    def __repr__(self) -> str:
        return f"TopK({self.artifact!r}, max_k={self.max_k})"

    def user_index(self, user: str | int) -> int:
        """The internal id of external id ``user`` (ints are read as their string form)."""
        key = str(user)
        if key not in self.users:
            raise UnknownUserError(f"unknown user {key!r}: not a user of this run")
        return self.users.to_internal(key)

    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise RequestError(f"k must be an integer in [1, {self.max_k}], got {k!r}")
        return k

    def top_internal(
        self, users: Tensor, k: int, exclude_train: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``([B, k] item ids, [B, k] scores)`` for internal ``users``; excluded entries
        that still had to fill a row score ``-inf``."""
        k = self.check_k(k)
        art = self.artifact
        scores = art.user_embeddings[users] @ art.item_embeddings.t()
        scores[:, art.removed_items] = float("-inf")
        if exclude_train:
            start, stop = art.exclude_ptr[users], art.exclude_ptr[users + 1]
            counts = stop - start
            rows = torch.repeat_interleave(torch.arange(users.numel()), counts)
            offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts
            )
            cols = art.exclude_items[torch.repeat_interleave(start, counts) + offsets]
            scores[rows, cols] = float("-inf")
        values, indices = scores.topk(k, dim=1)
        return indices, values

    def recommend(
        self, users: Sequence[str | int], k: int = 20, exclude_train: bool = True
    ) -> list[dict[str, Any]]:
        """One ``{"user", "items", "scores"}`` record per user, in external ids.

        Raises:
            UnknownUserError: a user the run does not know.
            RequestError: ``k`` outside ``[1, max_k]``.
        """
        k = self.check_k(k)
        index = torch.tensor([self.user_index(u) for u in users], dtype=torch.long)
        if index.numel() == 0:
            return []
        items, scores = self.top_internal(index, k, exclude_train)
        records = []
        for user, row_items, row_scores in zip(users, items.tolist(), scores.tolist(), strict=True):
            kept = [
                (i, s) for i, s in zip(row_items, row_scores, strict=True) if s != float("-inf")
            ]
            records.append(
                {
                    "user": str(user),
                    "items": [self.items.to_external(i) for i, _ in kept],
                    "scores": [round(s, 6) for _, s in kept],
                }
            )
        return records
