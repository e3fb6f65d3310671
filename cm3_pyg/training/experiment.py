"""One complete run: data -> graph inputs -> model -> training -> metrics files."""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torch_geometric.data import HeteroData

from cm3_pyg.metrics import FullRankingEvaluator, popularity_scores
from cm3_pyg.models import get_model_class
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.trainer import EpochRecord, FitResult, Trainer, seed_everything

logger = logging.getLogger("cm3_pyg")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EpochCSV:
    """Per-epoch log (``epochs.csv``), one flushed row per epoch."""

    def __init__(self, path: Path, metric_keys: list[str]) -> None:
        self.path = path
        self.metric_keys = metric_keys
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(
                ["epoch", "train_loss", "train_seconds", "eval_seconds", "improved"]
                + [f"valid_{k}" for k in metric_keys]
            )

    def __call__(self, record: EpochRecord) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(
                [
                    record.epoch,
                    f"{record.train_loss:.6f}",
                    f"{record.train_seconds:.4f}",
                    f"{record.eval_seconds:.4f}",
                    int(record.improved),
                ]
                + [f"{record.valid[k]:.6f}" for k in self.metric_keys]
            )


def popularity_baseline(data: HeteroData, config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Valid/test metrics of ranking every user's unseen items by training popularity."""
    splits = get_splits(data)
    num_items = int(data["item"].num_nodes)
    pop = popularity_scores(splits.train, num_items)
    out = {}
    for name, target in (("valid", splits.valid), ("test", splits.test)):
        evaluator = FullRankingEvaluator(num_items, splits.train, target, tuple(config["topk"]))
        out[name] = evaluator.evaluate_scores(lambda users: pop.expand(users.numel(), -1))
    return out


def run_experiment(
    data: HeteroData,
    model_name: str,
    config: dict[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    dataset_name: str = "synthetic",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model_name`` on ``data`` with ``config``; write ``metrics.json`` and ``epochs.csv``.

    Returns the content of ``metrics.json``: ``dataset``, ``model``, ``config``,
    ``best_epoch`` (1-based), ``epochs_run``, ``valid`` and ``test`` (at the best validation
    epoch), ``epoch_seconds`` (training time of each epoch), and the ``popularity``
    baseline's valid/test metrics on the same split.
    """
    model_cls = get_model_class(model_name)
    seed_everything(int(config["seed"]))
    inputs = build_graph_inputs(data, config, uses_item_graph=model_cls.uses_item_graph)
    if len(inputs.features) < model_cls.min_modalities:
        raise ValueError(
            f"model {model_name!r} needs at least {model_cls.min_modalities} item modalities, "
            f"the data has {inputs.modalities}"
        )
    model = model_cls.from_config(config, inputs)
    logger.info(
        "%s on %s: %d users, %d items, modalities %s",
        model,
        dataset_name,
        inputs.num_users,
        inputs.num_items,
        inputs.modalities,
    )
    out_path = Path(out_dir) if out_dir is not None else None
    callback = None
    if out_path is not None:
        keys = [f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map") for k in config["topk"]]
        callback = EpochCSV(out_path / "epochs.csv", keys)
    trainer = Trainer(
        model, inputs, get_splits(data), config, on_epoch_end=callback, progress=progress
    )
    result: FitResult = trainer.fit()
    metrics = {
        "dataset": dataset_name,
        "model": model_cls.name,
        "config": config,
        "modalities": inputs.modalities,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "valid": result.valid,
        "test": result.test,
        "epoch_seconds": result.epoch_seconds,
        "popularity": popularity_baseline(data, config),
    }
    if out_path is not None:
        atomic_write_text(out_path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
