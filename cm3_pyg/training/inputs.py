"""Turn a dataset's ``HeteroData`` into the tensors models read (:class:`GraphInputs`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.data.graphs import bipartite_normalized_adjacency, modality_weights
from cm3_pyg.data.transforms import ModalityKNNGraph
from cm3_pyg.errors import ConfigError, DataFormatError
from cm3_pyg.models.base import GraphInputs
from cm3_pyg.nn.sparse import to_adjacency
from cm3_pyg.training.config import training_defaults
from cm3_pyg.training.distributed import World, divided_cosine_topk

RATES = ("user", "rates", "item")


@dataclass
class Splits:
    """``[2, E]`` (user, item) edge indices of the three splits."""

    train: Tensor
    valid: Tensor
    test: Tensor

    def to(self, device: torch.device | str) -> Splits:
        return Splits(self.train.to(device), self.valid.to(device), self.test.to(device))


def get_splits(data: HeteroData) -> Splits:
    store = data[RATES]
    for key in ("edge_index", "valid_edge_index", "test_edge_index"):
        if key not in store:
            raise DataFormatError(
                f"HeteroData is missing {RATES}.{key}; build it with build_hetero_data()"
            )
    return Splits(store.edge_index, store.valid_edge_index, store.test_edge_index)


def select_modalities(data: HeteroData, wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` (checked against the data), or all of ``data.modalities``."""
    available = list(getattr(data, "modalities", None) or [])
    if wanted is None:
        return available
    missing = [m for m in wanted if m not in available]
    if missing:
        raise DataFormatError(
            f"modalities {missing} requested in config but the data has only {available}"
        )
    return list(wanted)


def build_graph_inputs(
    data: HeteroData,
    config: Mapping[str, Any],
    uses_item_graph: bool = True,
    world: World | None = None,
) -> GraphInputs:
    """Normalised adjacencies (built once) and feature tensors for a model.

    Reads ``knn_k``, ``mm_image_weight``, ``modality_weights``, ``modalities`` and
    ``sparse_backend`` from ``config``; keys it lacks take the training defaults. With a
    ``world`` (every process calls it with the same data) the item kNN search is divided
    among the processes (:func:`~cm3_pyg.training.distributed.divided_cosine_topk`); the
    graphs are the same.
    """
    config = {**training_defaults(), **config}
    modalities = select_modalities(data, config["modalities"])
    num_users = int(data["user"].num_nodes)
    num_items = int(data["item"].num_nodes)
    backend = str(config["sparse_backend"])
    train = get_splits(data).train
    ui_index, ui_weight = bipartite_normalized_adjacency(train, num_users, num_items)
    ui_adj = to_adjacency(ui_index, ui_weight, num_users + num_items, backend=backend)
    features = [data["item"][f"x_{m}"].float() for m in modalities]
    item_adj = None
    if uses_item_graph and modalities:
        view = HeteroData()
        view["item"].num_nodes = num_items
        view.modalities = modalities
        for m, x in zip(modalities, features, strict=True):
            view["item"][f"x_{m}"] = x
            if f"keep_{m}" in data["item"]:  # rows removed from the modality (unlearning)
                view["item"][f"keep_{m}"] = data["item"][f"keep_{m}"]
        try:  # the names are checked against the data here, where the data is known
            modality_weights(modalities, config["modality_weights"], config["mm_image_weight"])
        except ConfigError as exc:
            raise ConfigError(f"config key 'modality_weights': {exc}") from None
        knn = ModalityKNNGraph(
            k=int(config["knn_k"]),
            weights=config["modality_weights"],
            mm_image_weight=config["mm_image_weight"],
            **(
                {}
                if world is None
                else {"topk": functools.partial(divided_cosine_topk, split=world.split)}
            ),
        )(view)
        store = knn["item", "mm_knn", "item"]
        item_adj = to_adjacency(store.edge_index, store.edge_weight, num_items, backend=backend)
    return GraphInputs(
        num_users=num_users,
        num_items=num_items,
        features=features,
        modalities=modalities,
        ui_adj=ui_adj,
        item_adj=item_adj,
    )
