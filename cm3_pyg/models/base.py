"""The small interface every recommender in :mod:`cm3_pyg.models` implements.

A model is built from plain numbers (``from_config``) and run on :class:`GraphInputs`,
a bundle of tensors (features and pre-normalised adjacencies). Models never see a
dataset; the training package converts a ``HeteroData`` into ``GraphInputs`` once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import Tensor


@dataclass
class GraphInputs:
    """Everything a model's forward pass reads, as tensors.

    Attributes:
        num_users: ``U``.
        num_items: ``I``.
        features: per modality ``[I, d_m]`` float tensors, in fusion order.
        modalities: names of ``features``.
        ui_adj: normalised ``[U + I, U + I]`` user-item adjacency (users first), sparse.
        item_adj: normalised ``[I, I]`` item-item graph (``out = item_adj @ h``), or ``None``.
    """

    num_users: int
    num_items: int
    features: list[Tensor]
    modalities: list[str]
    ui_adj: Any
    item_adj: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dims(self) -> list[int]:
        return [int(f.size(1)) for f in self.features]

    def to(self, device: torch.device | str) -> GraphInputs:
        """A copy with every tensor on ``device``."""
        return GraphInputs(
            num_users=self.num_users,
            num_items=self.num_items,
            features=[f.to(device) for f in self.features],
            modalities=list(self.modalities),
            ui_adj=self.ui_adj.to(device),
            item_adj=None if self.item_adj is None else self.item_adj.to(device),
            extras={k: v.to(device) if hasattr(v, "to") else v for k, v in self.extras.items()},
        )


class Recommender(torch.nn.Module):
    """Base class: training loss on a batch, deterministic embeddings, top-k recommendation.

    Subclasses set ``name`` and implement :meth:`from_config`, :meth:`training_loss` and
    :meth:`embed`. Scores are dot products of the embeddings ``embed`` returns.
    """

    name: ClassVar[str] = ""
    #: Feature modalities the model needs (``0`` for ID-only models).
    min_modalities: ClassVar[int] = 0
    #: Whether the model reads ``GraphInputs.item_adj`` (the modality kNN graph).
    uses_item_graph: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._cached_embeddings: tuple[Tensor, Tensor] | None = None
        self._cache_version: int | None = None

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """The model's defaults, read from the YAML file beside its module."""
        path = Path(sys.modules[cls.__module__].__file__ or "").with_suffix(".yaml")
        if not path.exists():
            return {}
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
        config.pop("grid", None)
        return config

    @classmethod
    def default_grid(cls) -> dict[str, list[Any]]:
        """The hyper-parameter search space listed under ``grid`` in the model's YAML."""
        path = Path(sys.modules[cls.__module__].__file__ or "").with_suffix(".yaml")
        if not path.exists():
            return {}
        with open(path, encoding="utf-8") as fh:
            return dict((yaml.safe_load(fh) or {}).get("grid", {}))

    @classmethod
    def from_config(cls, config: dict[str, Any], inputs: GraphInputs) -> Recommender:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, inputs: GraphInputs) -> None:
        """Called by the trainer before the first batch of every epoch (``epoch`` is 1-based).

        The default does nothing; models with per-epoch state override it (FREEDOM redraws
        its pruned training graph, LIRDRec advances its progressive weight copying). After a
        resume the trainer calls it for the next epoch exactly as an uninterrupted run would.
        """

    def training_loss(
        self, inputs: GraphInputs, users: Tensor, pos_items: Tensor, neg_items: Tensor
    ) -> Tensor:
        """The loss of one batch of ``(user, positive item, negative item)`` rows (each ``[B]``)."""
        raise NotImplementedError

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        """``(user [U, D], item [I, D])`` scoring embeddings in the current mode."""
        raise NotImplementedError

    def _param_version(self) -> int:
        # Parameters' in-place version counters move on every optimizer step, which
        # tells us cached embeddings are stale.
        return sum(p._version for p in self.parameters())

    @torch.no_grad()
    def embed(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        """Deterministic scoring embeddings (evaluation mode), cached for :meth:`recommend`."""
        was_training = self.training
        self.eval()
        try:
            user_emb, item_emb = self.compute_embeddings(inputs)
        finally:
            self.train(was_training)
        self._cached_embeddings = (user_emb, item_emb)
        self._cache_version = self._param_version()
        return user_emb, item_emb

    @torch.no_grad()
    def recommend(
        self,
        users: Tensor,
        k: int,
        exclude: Tensor | None = None,
        embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Top-``k`` item ids for each user, highest score first.

        Args:
            users: ``[B]`` user ids.
            k: list length.
            exclude: optional ``[2, E]`` (user id, item id) pairs never to recommend
                (typically the training interactions). Rows whose user is not in
                ``users`` are ignored.
            embeddings: ``(user, item)`` from :meth:`embed`; default: the embeddings cached
                by the last :meth:`embed` call (an error if parameters changed since).

        Returns:
            ``[B, k]`` int64 item ids.
        """
        if embeddings is None:
            if self._cached_embeddings is None or self._cache_version != self._param_version():
                raise RuntimeError(
                    "no up-to-date embeddings: call model.embed(inputs) after training, "
                    "or pass embeddings=(user_emb, item_emb)"
                )
            embeddings = self._cached_embeddings
        user_emb, item_emb = embeddings
        num_items = item_emb.size(0)
        if not 0 < k <= num_items:
            raise ValueError(f"k must be in [1, {num_items}], got {k}")
        users = users.to(user_emb.device)
        scores = user_emb[users] @ item_emb.t()
        if exclude is not None and exclude.numel() > 0:
            exclude = exclude.to(user_emb.device)
            # map global user ids to rows of this batch (users may repeat: mask all copies)
            order = torch.argsort(users)
            sorted_users = users[order]
            lo = torch.searchsorted(sorted_users, exclude[0], right=False)
            hi = torch.searchsorted(sorted_users, exclude[0], right=True)
            counts = hi - lo
            rows = order[torch.repeat_interleave(lo, counts) + _ranges(counts)]
            cols = torch.repeat_interleave(exclude[1], counts)
            scores[rows, cols] = float("-inf")
        return scores.topk(k, dim=-1).indices


def _ranges(counts: Tensor) -> Tensor:
    """``cat([arange(c) for c in counts])`` without a Python loop."""
    if counts.numel() == 0:
        return counts
    offsets = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(
        offsets, counts
    )
