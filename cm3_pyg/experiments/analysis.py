r"""The CM3 paper's embedding analysis: alignment and uniformity of a trained run.

With unit rows :math:`\tilde u = u / \|u\|`, :math:`\tilde i = i / \|i\|`:

.. math::
    \mathcal{L}_{\text{align}} = \frac{1}{|T|} \sum_{(u, i) \in T} \|\tilde u - \tilde i\|^2,
    \qquad
    \mathcal{L}_{\text{unif}}(X) =
        \log \frac{2}{N(N-1)} \sum_{a<b} e^{-2\|\tilde x_a - \tilde x_b\|^2}

over the test pairs :math:`T`, and over the users and over the items (a seeded sample of at
most ``max_rows`` rows each, so large catalogues stay cheap). Lower is better for both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3_pyg.nn.losses import alignment_loss, uniformity_loss
from cm3_pyg.plotting import pyplot, save_figure

__all__ = ["embedding_geometry", "plot_geometry"]


@torch.no_grad()
def embedding_geometry(
    user_emb: Tensor,
    item_emb: Tensor,
    pairs: Tensor,
    max_rows: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """``{"align", "unif_users", "unif_items", "pairs", "users", "items"}`` of a run.

    Args:
        user_emb: ``[U, d]`` user embeddings.
        item_emb: ``[I, d]`` item embeddings.
        pairs: ``[2, T]`` (user, item) pairs to align (the test split).
        max_rows: uniformity over at most this many users and items (seeded sample).
        seed: the sample's seed.
    """
    if pairs.dim() != 2 or pairs.size(0) != 2 or pairs.size(1) == 0:
        raise ValueError(f"pairs must be a non-empty [2, T] tensor, got {tuple(pairs.shape)}")
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2, got {max_rows}")
    users = F.normalize(user_emb.double(), dim=-1)
    items = F.normalize(item_emb.double(), dim=-1)
    pairs = pairs.to(users.device)
    align = alignment_loss(users[pairs[0]], items[pairs[1]])
    generator = torch.Generator().manual_seed(seed)

    def sample(x: Tensor) -> Tensor:
        if x.size(0) <= max_rows:
            return x
        pick = torch.randperm(x.size(0), generator=generator)[:max_rows]
        return x[pick.to(x.device)]

    u_rows, i_rows = sample(users), sample(items)
    return {
        "align": float(align),
        "unif_users": float(uniformity_loss(u_rows)),
        "unif_items": float(uniformity_loss(i_rows)),
        "pairs": int(pairs.size(1)),
        "users": int(u_rows.size(0)),
        "items": int(i_rows.size(0)),
    }


def plot_geometry(
    report: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]
) -> Path | None:
    """The alignment-uniformity plane: one point per run (x: L_unif of items and, hollow,
    of users; y: L_align), labelled with the model. ``None`` (nothing written) when
    matplotlib, an optional dependency (``pip install 'cm3_pyg[plot]'``), is missing."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for run, row in report.items():
        (point,) = ax.plot(row["unif_items"], row["align"], "o")
        ax.plot(row["unif_users"], row["align"], "o", mfc="none", color=point.get_color())
        ax.annotate(
            str(row.get("model", run)),
            (row["unif_items"], row["align"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("uniformity (filled: items, hollow: users; lower is more uniform)")
    ax.set_ylabel("alignment of test pairs (lower is better)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
