r"""Transforms that add derived graphs to the CM3 :class:`~torch_geometric.data.HeteroData`.

See ``docs/architecture.md`` for the layout these read and write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.transforms import BaseTransform

from cm3_pyg.data.graphs import (
    combine_weighted,
    cosine_topk,
    knn_normalized_adjacency,
    modality_weights,
)
from cm3_pyg.errors import ConfigError, DataFormatError

__all__ = ["ModalityKNNGraph"]

#: Name of the combined graph: its relation is ``f"{MM_NAME}_knn"``, so no modality may
#: be called this.
MM_NAME = "mm"
MM_RELATION = f"{MM_NAME}_knn"


class ModalityKNNGraph(BaseTransform):
    r"""Adds the frozen item-item cosine k-NN graphs of CM3 to a ``HeteroData``.

    For every modality :math:`m` in ``data.modalities`` it reads the raw item features
    ``data['item'][f'x_{m}']`` (:math:`[I, d_m]`), takes for each item its ``k`` most
    cosine-similar items (itself included, block-wise, see
    :func:`~cm3_pyg.data.graphs.cosine_topk`) and stores the normalised directed graph

    .. math::
        (S_m)_{ij} = d_i^{-1/2} d_j^{-1/2} \quad (= 1/k)
        \text{ for } j \in \operatorname{topk}_m(i)

    as ``data['item', f'{m}_knn', 'item'].edge_index`` ``[2, kI]`` /
    ``.edge_weight`` ``[kI]``. The combination :math:`S = \sum_m w_m S_m` (weights from
    :func:`~cm3_pyg.data.graphs.modality_weights`) goes to
    ``data['item', 'mm_knn', 'item']``; with one modality it equals that modality's graph.
    An optional bool mask ``data['item'][f'keep_{m}']`` limits modality :math:`m`'s graph to
    the rows it marks (the others get no edges and are nobody's neighbour).
    Row ``edge_index[0]`` is the item being updated: :math:`h_i \leftarrow \sum_j S_{ij}
    h_j`.

    Args:
        k: Neighbours per item (reference ``knn_k = 10``).
        weights: Optional explicit modality -> weight map (must name every modality).
        mm_image_weight: Image weight when there are exactly two modalities, one of them
            ``'image'`` (the training default, 0.1, is the reference's); ``None`` for
            uniform weights. Checked by :func:`~cm3_pyg.data.graphs.modality_weights`.
        block_size: Rows per similarity block (default: ~256 MiB per block).
        topk: The neighbour search, called as ``topk(x, k, block_size=...)`` with
            :func:`~cm3_pyg.data.graphs.cosine_topk`'s contract (the default); e.g.
            :func:`cm3_pyg.training.distributed.divided_cosine_topk`, which divides the
            query rows among processes.
    """

    def __init__(
        self,
        k: int = 10,
        weights: Mapping[str, float] | None = None,
        mm_image_weight: float | None = None,
        block_size: int | None = None,
        topk: Callable[..., tuple[Tensor, Tensor]] = cosine_topk,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive int, got {k!r}")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise ConfigError(f"block_size must be a positive int or None, got {block_size!r}")
        self.k = k
        if isinstance(weights, Mapping):
            weights = dict(weights)
        self.weights = weights  # anything else is refused by modality_weights
        self.mm_image_weight = mm_image_weight
        self.block_size = block_size
        self.topk = topk

    def forward(self, data: HeteroData) -> HeteroData:
        """Compute and attach the per-modality and combined item-item graphs.

        Args:
            data: A CM3 ``HeteroData`` with ``data.modalities`` and the item features.

        Returns:
            The same (shallow-copied by ``BaseTransform.__call__``) object with the
            ``(item, <m>_knn, item)`` and ``(item, mm_knn, item)`` edge stores added.

        Raises:
            DataFormatError: if ``data.modalities`` or a modality's features are missing,
                malformed, or inconsistent with ``data['item'].num_nodes``.
            ConfigError: if the weights do not fit the modalities or ``k`` exceeds the
                number of items.
        """
        modalities = getattr(data, "modalities", None)
        if modalities is None or isinstance(modalities, str) or len(modalities) == 0:
            raise DataFormatError(
                "ModalityKNNGraph needs data.modalities, a non-empty list of modality names"
            )
        modalities = list(modalities)
        if MM_NAME in modalities:
            raise DataFormatError(
                f"a modality may not be called {MM_NAME!r}: "
                f"its graph would collide with the combined {MM_RELATION!r} graph"
            )
        w = modality_weights(modalities, self.weights, self.mm_image_weight)

        item = data["item"]
        num_items = item.num_nodes if "num_nodes" in item else None
        graphs = []
        for m in modalities:
            key = f"x_{m}"
            x = item.get(key)
            if x is None:
                raise DataFormatError(
                    f"modality {m!r} is listed in data.modalities but data['item'].{key} is missing"
                )
            if x.dim() != 2:
                raise DataFormatError(
                    f"data['item'].{key} must be 2-D [num_items, d], got {tuple(x.shape)}"
                )
            if num_items is None:
                num_items = x.size(0)
            elif x.size(0) != num_items:
                raise DataFormatError(
                    f"data['item'].{key} has {x.size(0)} rows but there are {num_items} items"
                )
            keep = item.get(f"keep_{m}")
            if keep is None:
                if self.k > num_items:
                    raise ConfigError(
                        f"k={self.k} (config key 'knn_k') exceeds the number of items ({num_items})"
                    )
                _, idx = self.topk(x, self.k, block_size=self.block_size)
                edge_index, edge_weight = knn_normalized_adjacency(idx, num_items)
            else:
                edge_index, edge_weight = self._graph_of_kept_rows(x, keep, m)
            store = data["item", f"{m}_knn", "item"]
            store.edge_index = edge_index
            store.edge_weight = edge_weight
            graphs.append((edge_index, edge_weight))

        mm_index, mm_weight = combine_weighted(graphs, w, num_items)
        store = data["item", MM_RELATION, "item"]
        store.edge_index = mm_index
        store.edge_weight = mm_weight
        return data

    def _graph_of_kept_rows(self, x: Tensor, keep: Tensor, m: str) -> tuple[Tensor, Tensor]:
        """The k-NN graph among the rows ``keep`` marks; the other rows get no edges and are
        nobody's neighbour (rows removed from the modality, e.g. by unlearning)."""
        if keep.dtype != torch.bool or keep.shape != (x.size(0),):
            raise DataFormatError(
                f"data['item'].keep_{m} must be a bool [{x.size(0)}] mask, got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
        kept = keep.nonzero().flatten()
        if self.k > kept.numel():
            raise ConfigError(f"k={self.k} exceeds the {kept.numel()} items left in modality {m!r}")
        _, idx = self.topk(x.index_select(0, kept), self.k, block_size=self.block_size)
        local_index, edge_weight = knn_normalized_adjacency(idx, kept.numel())
        # ``kept`` is increasing, so the mapped graph stays sorted by row, then column.
        return kept[local_index], edge_weight

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(k={self.k}, weights={self.weights}, "
            f"mm_image_weight={self.mm_image_weight}, block_size={self.block_size})"
        )
