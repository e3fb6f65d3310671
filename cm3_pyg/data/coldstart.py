"""Cold-start items: hold out whole items (all their interactions) to test unseen items.

:func:`hold_out_cold_items` moves every train, valid and test interaction of a seeded
fraction of the items into ``data['user', 'rates', 'item'].cold_edge_index`` and marks the
items in ``data['item'].cold``; their feature rows stay, so a model that reads features
(and the item kNN graph built from them) can embed them without a single interaction.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.data.hetero import RATED_BY, RATES, SPLIT_ATTRS
from cm3_pyg.errors import ConfigError, DataFormatError

__all__ = ["COLD_EDGES", "cold_edges", "hold_out_cold_items"]

#: attribute of ``data['user', 'rates', 'item']`` holding the held-out items' interactions
COLD_EDGES = "cold_edge_index"


def hold_out_cold_items(data: HeteroData, fraction: float, seed: int) -> HeteroData:
    """A copy of ``data`` with ``fraction`` of the items with train interactions (a draw
    seeded by ``seed``) held out whole.

    Raises:
        ConfigError: ``fraction`` outside ``(0, 1)``.
        DataFormatError: the hold-out leaves a split without interactions.
    """
    if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"config key 'cold_items' must lie in [0, 1), got {fraction!r}")
    store = data[RATES]
    splits = {name: store[attr] for name, attr in SPLIT_ATTRS.items()}
    candidates = torch.unique(splits["train"][1])
    generator = torch.Generator().manual_seed(int(seed))
    count = max(1, round(float(fraction) * candidates.numel()))
    cold = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]].sort().values
    out = data.clone()
    held: list[Tensor] = []
    for name, attr in SPLIT_ATTRS.items():
        edges = splits[name]
        mask = torch.isin(edges[1], cold)
        if bool(mask.all()):
            raise DataFormatError(f"holding out {count} cold items leaves no {name} interaction")
        out[RATES][attr] = edges[:, ~mask]
        held.append(edges[:, mask])
    out[RATED_BY].edge_index = out[RATES].edge_index.flip(0)
    together = torch.cat(held, dim=1)
    num_items = int(data["item"].num_nodes)
    order = torch.argsort(together[0] * num_items + together[1])
    out[RATES][COLD_EDGES] = together[:, order]
    flags = torch.zeros(num_items, dtype=torch.bool)
    flags[cold] = True
    out["item"].cold = flags
    return out


def cold_edges(data: HeteroData) -> tuple[Tensor, Tensor]:
    """``([2, E] held-out interactions, [C] cold item ids)`` of a held-out dataset."""
    store = data[RATES]
    if COLD_EDGES not in store or "cold" not in data["item"]:
        raise DataFormatError("the data holds no cold items (hold_out_cold_items makes them)")
    return store[COLD_EDGES], data["item"].cold.nonzero().flatten()
