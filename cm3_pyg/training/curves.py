"""``curves.png``: a run's loss and validation metrics per epoch (optional matplotlib)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from cm3_pyg.io import atomic_write
from cm3_pyg.training.trainer import EpochRecord

__all__ = ["plot_curves"]


def plot_curves(
    history: Sequence[EpochRecord],
    path: str | os.PathLike[str],
    metrics: Sequence[str] = ("recall@20", "ndcg@20"),
) -> Path | None:
    """Training loss (left) and validation ``metrics`` (right) against the epoch, the best
    epochs marked. ``None`` (nothing written) when matplotlib is missing or there is no
    epoch yet."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [r.epoch for r in history]
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    loss_ax.plot(epochs, [r.train_loss for r in history])
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss (mean per batch)")
    for key in metrics:
        if key in history[0].valid:
            valid_ax.plot(epochs, [r.valid[key] for r in history], label=f"valid {key}")
    best = [r.epoch for r in history if r.improved]
    if best:
        valid_ax.axvline(best[-1], color="grey", linestyle=":", label=f"best epoch {best[-1]}")
    valid_ax.set_xlabel("epoch")
    valid_ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
    return Path(path)
