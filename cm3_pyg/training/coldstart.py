"""Cold-start evaluation: rank the held-out items for their users, against two baselines.

Each user with interactions on cold items (:mod:`cm3_pyg.data.coldstart`) ranks the cold
items only (none of them has a train interaction, so nothing is excluded); the targets are
those interactions. Beside the model:

* ``random``: the exact expectation under a uniformly random ranking (recall ``k / C``;
  NDCG ``|T_u| / C * sum_{r<=k} 1/log2(r+1)`` over the user's ideal DCG);
* ``feature_knn``: features only, each user the mean of the unit feature rows (all
  modalities side by side, each row-normalised) of its train items, scored by the dot
  product with the cold items' rows: the nearest-neighbour baseline any content model must
  beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.data.coldstart import cold_edges, hold_out_cold_items
from cm3_pyg.errors import ConfigError
from cm3_pyg.metrics import FullRankingEvaluator

__all__ = ["apply_cold_items", "cold_start_report", "feature_profiles"]


def apply_cold_items(data: HeteroData, config: dict[str, Any], model_cls: Any) -> HeteroData:
    """``data`` with the run's cold items held out (config ``cold_items`` > 0, drawn with
    the run's seed), once; unchanged when the key is 0.

    Raises:
        ConfigError: the model reads no item features, so it cannot embed an item it never
            saw interact.
    """
    fraction = float(config.get("cold_items", 0.0) or 0.0)
    if fraction == 0.0:
        return data
    if model_cls.min_modalities == 0:
        raise ConfigError(
            f"model {model_cls.name!r} reads no item features, so it cannot embed items "
            "unseen in training; cold_items needs a model with features (cm3, lirdrec, bm3, "
            "freedom, vbpr, sea)"
        )
    if "cold" in data["item"]:
        return data
    return hold_out_cold_items(data, fraction, int(config["seed"]))


def feature_profiles(
    data: HeteroData, modalities: Sequence[str], train: Tensor
) -> tuple[Tensor, Tensor]:
    """``(users [U, D], items [I, D])``: unit feature rows of every modality side by side
    (scaled by ``1/sqrt(M)``, so an item row has norm 1) and each user's mean over its
    train items."""
    blocks = [F.normalize(data["item"][f"x_{m}"].double(), dim=-1) for m in modalities]
    items = torch.cat(blocks, dim=1) / math.sqrt(len(blocks))
    num_users = int(data["user"].num_nodes)
    sums = torch.zeros(num_users, items.size(1), dtype=items.dtype)
    sums.index_add_(0, train[0], items[train[1]])
    counts = torch.bincount(train[0], minlength=num_users).clamp_min(1).unsqueeze(1)
    return sums / counts, items


def _random_expectation(targets_per_user: Tensor, num_cold: int, ks: Sequence[int]) -> dict:
    out: dict[str, float] = {}
    sizes = targets_per_user.double()
    for k in ks:
        k_eff = min(k, num_cold)
        out[f"recall@{k}"] = k_eff / num_cold
        gains = 1.0 / torch.log2(torch.arange(2, k_eff + 2, dtype=torch.double))
        ideal = torch.cumsum(gains, 0)[(sizes.clamp_max(k_eff) - 1).long()]
        out[f"ndcg@{k}"] = float((sizes / num_cold * gains.sum() / ideal).mean())
    return out


@torch.no_grad()
def cold_start_report(
    data: HeteroData,
    user_emb: Tensor,
    item_emb: Tensor,
    modalities: Sequence[str],
    ks: Sequence[int] = (10, 20, 50),
) -> dict[str, Any]:
    """The model's and the baselines' metrics on the cold items (see the module doc)."""
    edges, cold = cold_edges(data)
    num_cold = int(cold.numel())
    ks = [k for k in ks if k <= num_cold] or [num_cold]
    position = torch.full((int(data["item"].num_nodes),), -1, dtype=torch.long)
    position[cold] = torch.arange(num_cold)
    local = torch.stack([edges[0], position[edges[1]]])
    nothing = torch.zeros(2, 0, dtype=torch.long)
    evaluator = FullRankingEvaluator(num_cold, nothing, local, tuple(ks))
    index = cold.to(item_emb.device)
    report: dict[str, Any] = {
        "items": num_cold,
        "interactions": int(edges.size(1)),
        "users": int(torch.unique(edges[0]).numel()),
        "model": evaluator.evaluate(user_emb, item_emb.index_select(0, index)),
    }
    if modalities:
        train = data["user", "rates", "item"].edge_index
        users, items = feature_profiles(data, modalities, train)
        report["feature_knn"] = evaluator.evaluate(users, items[cold])
    per_user = torch.bincount(edges[0])
    report["random"] = _random_expectation(per_user[per_user > 0], num_cold, ks)
    return report
