"""Small helpers shared by the models (not part of the public API)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import Parameter, ParameterList

from cm3_pyg.data.graphs import bipartite_normalized_adjacency
from cm3_pyg.nn.rows import RowTable
from cm3_pyg.nn.sparse import SparseAdjacency, to_adjacency


def embedding_norm_penalty(*embeddings: Tensor) -> Tensor:
    r"""MMRec's ``EmbLoss``: :math:`\frac{1}{N}\sum_k \lVert E_k \rVert_F`.

    The Frobenius norms are *not* squared, and the sum is divided by the number of rows
    ``N`` of the last tensor (the batch size when the tensors are batch rows).
    """
    if not embeddings:
        raise ValueError("embedding_norm_penalty needs at least one tensor")
    total = sum(torch.linalg.vector_norm(e) for e in embeddings)
    return total / embeddings[-1].size(0)


def split_users_items(h: Tensor, num_users: int) -> tuple[Tensor, Tensor]:
    """The user rows and the item rows of a propagated ``[U + I, F]`` node matrix.

    ``split``, not two slices: its backward concatenates the two gradients, where each
    slice's backward zero-fills a full ``[U + I, F]`` gradient.
    """
    user, item = h.split([num_users, h.size(0) - num_users])
    return user, item


def user_item_edges(ui_adj: SparseAdjacency, num_users: int) -> tuple[Tensor, Tensor]:
    """The user-item block of a normalised ``[U + I, U + I]`` adjacency (users first).

    Returns:
        ``(edge_index [2, E], weight [E])`` with row = user id, col = item id (``0..I-1``)
        and the stored normalised weights.
    """
    row, col, value = ui_adj.row, ui_adj.col, ui_adj.value
    mask = (row < num_users) & (col >= num_users)
    return torch.stack([row[mask], col[mask] - num_users]), value[mask]


def symmetric_bipartite_adjacency(
    edge_index: Tensor, num_users: int, num_items: int, backend: str
) -> SparseAdjacency:
    r""":math:`D^{-1/2} A D^{-1/2}` over the ``U + I`` nodes, as a sparse adjacency.

    The degrees are those of the given edges only (used after pruning edges); the
    normalisation is the data layer's :func:`~cm3_pyg.data.graphs.bipartite_normalized_adjacency`.
    """
    index, weight = bipartite_normalized_adjacency(edge_index, num_users, num_items)
    return to_adjacency(index, weight, num_users + num_items, backend=backend)


class FeatureOffsets(torch.nn.Module):
    r"""Trainable per-item corrections of frozen raw features: :math:`x_m + \Delta_m`.

    Several references fine-tune a trainable copy of each feature table
    (``nn.Embedding.from_pretrained(x, freeze=False)``). A zero-initialised offset gives the
    same optimisation trajectory (the gradient and every Adam update are identical) while
    the module is built from sizes alone and the features stay an input of ``forward``.

    Args:
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``.
        enabled: ``False`` keeps the features frozen (no parameters).
    """

    def __init__(self, num_items: int, feature_dims: Sequence[int], enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.offsets = ParameterList(
            Parameter(torch.empty(num_items, int(d))) for d in (feature_dims if enabled else [])
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for offset in self.offsets:
            torch.nn.init.zeros_(offset)

    def row_tables(self) -> list[RowTable]:
        """Each offset table: one row per item, derived from modality ``m``'s features."""
        return [RowTable(f"offsets.{m}", "item", 0, m) for m in range(len(self.offsets))]

    def forward(self, m: int, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """Modality ``m``'s features ``x`` (all items, or those in ``rows``), corrected."""
        if rows is not None:
            x = x.index_select(0, rows)
        if not self.enabled:
            return x
        return x + (self.offsets[m] if rows is None else self.offsets[m].index_select(0, rows))
