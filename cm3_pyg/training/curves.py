"""A run's curves: ``curves.png`` (optional matplotlib) and TensorBoard scalars (optional
``tensorboard``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cm3_pyg.plotting import pyplot, save_figure
from cm3_pyg.training.trainer import EpochRecord

__all__ = ["TensorBoardLog", "plot_curves"]


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
    plt = pyplot()
    if plt is None:
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
    return save_figure(fig, path, dpi=110)


class TensorBoardLog:
    """Per-epoch TensorBoard scalars (``tensorboard/`` in the run folder): the loss, each
    loss term and the validation metrics. :meth:`open` gives ``None`` when the optional
    ``tensorboard`` package is not installed."""

    def __init__(self, writer: object) -> None:
        self.writer = writer

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> TensorBoardLog | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module needs the tensorboard package
            return None
        return cls(SummaryWriter(log_dir=str(folder)))

    def __call__(self, record: EpochRecord) -> None:
        add = self.writer.add_scalar  # type: ignore[attr-defined]
        add("train/loss", record.train_loss, record.epoch)
        for name, value in record.train_terms.items():
            add(f"train/{name}", value, record.epoch)
        for name, value in record.valid.items():
            add(f"valid/{name}", value, record.epoch)
        self.writer.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()  # type: ignore[attr-defined]
