"""Ranking objectives: modules from the scores of positives and negatives to a loss.

An objective is any module called as ``objective(pos_scores, neg_scores, batch)``, with
``pos_scores`` ``[B]``, ``neg_scores`` ``[B]`` (or ``[B, K]`` for ``K`` negatives per row) and
``batch`` the ``(users, pos_items, neg_items)`` ids (objectives with per-pair parameters read
them; others ignore it). Models pair with one by name through :func:`make_objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cm3_pyg.nn.losses import bpr_loss


class BPRLoss(torch.nn.Module):
    r"""Bayesian personalised ranking (Rendle et al., 2009).

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{(u, i, j)} \log \sigma(s_{ui} - s_{uj})

    over the ``N`` (user, positive, negative) triples of a batch.
    """

    def forward(self, pos_scores: Tensor, neg_scores: Tensor, batch: Any = None) -> Tensor:
        return bpr_loss(pos_scores, neg_scores)


#: Objective name -> factory. The factory takes the keyword options of
#: :func:`make_objective` it needs and ignores none silently.
OBJECTIVES: dict[str, Callable[..., torch.nn.Module]] = {"bpr": BPRLoss}


def objective_names() -> list[str]:
    """The registered objective names."""
    return sorted(OBJECTIVES)


def make_objective(name: str, **options: Any) -> torch.nn.Module:
    """The objective registered as ``name``, built with ``options``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {objective_names()}")
    return OBJECTIVES[name](**options)
