"""Loading a finished (or interrupted) run back: its model, inputs and metrics, ready to rank."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.data.loading import load_dataset
from cm3_pyg.errors import CheckpointError
from cm3_pyg.models import GraphInputs, Recommender, get_model_class
from cm3_pyg.training.checkpoint import CHECKPOINT_NAME, data_fingerprint, load_checkpoint
from cm3_pyg.training.coldstart import apply_cold_items
from cm3_pyg.training.inputs import Splits, build_graph_inputs, get_splits

__all__ = ["TrainedRun", "load_run", "source_data"]


@dataclass
class TrainedRun:
    """A trained model with the inputs and splits it was trained on.

    Attributes:
        model: the recommender in evaluation mode, embeddings computed.
        inputs: its graph inputs.
        splits: the train/valid/test edges of the data.
        config: the run's configuration.
        metrics: the run's ``metrics.json`` (``{}`` if the run wrote none yet).
        epoch: the last completed epoch the checkpoint holds.
    """

    model: Recommender
    inputs: GraphInputs
    splits: Splits
    config: dict[str, Any]
    metrics: dict[str, Any]
    epoch: int

    def recommend(self, users: Tensor, k: int = 20, exclude_train: bool = True) -> Tensor:
        """``[B, k]`` top-``k`` item ids for ``users``, training items excluded by default."""
        return self.model.recommend(users, k, exclude=self.splits.train if exclude_train else None)


def source_data(
    saved: Mapping[str, Any], data_root: str | None = None, cache_dir: str | None = None
) -> HeteroData:
    """The dataset the run of checkpoint ``saved`` read, read again: the embedded synthetic
    data, or its folder under ``data_root`` / ``$CM3_DATA_ROOT``, with the run's modalities
    and duplicate policy."""
    dataset = str(saved["dataset"])
    config = saved["config"]
    data, _ = load_dataset(
        data_root if dataset != "synthetic" else None,
        dataset if dataset != "synthetic" else None,
        cache_dir=cache_dir,
        modalities=config["modalities"],
        duplicates=config["duplicate_interactions"],
    )
    return data


def load_run(
    run_dir: str | os.PathLike[str],
    data: HeteroData | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
) -> TrainedRun:
    """The model a run in ``run_dir`` trained, in another process.

    The model is rebuilt from the checkpoint's configuration and its weights loaded (the
    state after the last completed epoch; ``torch.load(weights_only=True)``, so loading
    never runs code). The data is ``data`` if given, else the run's dataset read again (the
    embedded synthetic data, or the folder under ``data_root`` / ``$CM3_DATA_ROOT``); it must
    be the data the run trained on (checked by the checkpoint's data fingerprint); for an
    unlearned run (:func:`cm3_pyg.unlearning.unlearn_run`) it is the source data, and the
    run's ``retain.pt`` removes what was forgotten.

    Raises:
        CheckpointError: no usable checkpoint, a model it does not fit, or other data.
    """
    folder = Path(run_dir)
    path = folder / CHECKPOINT_NAME
    saved = load_checkpoint(path)
    config = dict(saved["config"])
    if data is None:
        data = source_data(saved, data_root, cache_dir)
    retain_path = folder / "retain.pt"
    if retain_path.exists():
        # An unlearned run: the data minus what was forgotten (cm3_pyg.unlearning).
        from cm3_pyg.unlearning.retain import apply_retain, load_retain

        data = apply_retain(data, load_retain(retain_path))
    model_cls = get_model_class(str(saved["model"]))
    data = apply_cold_items(data, config, model_cls)  # the run's held-out items, if any
    inputs = build_graph_inputs(data, config, uses_item_graph=model_cls.uses_item_graph)
    splits = get_splits(data)
    if data_fingerprint(inputs, splits) != saved["data_fingerprint"]:
        raise CheckpointError(
            f"{path}: the run trained on other data than given (dataset {saved['dataset']!r}; "
            "the graph inputs or splits differ)"
        )
    try:
        model = model_cls.from_config(config, inputs)
        model.load_state_dict(saved["trainer"]["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: the saved model does not fit {model_cls.name!r} ({reason})"
        ) from None
    model.eval()
    with torch.no_grad():
        model.embed(inputs)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    return TrainedRun(
        model=model,
        inputs=inputs,
        splits=splits,
        config=config,
        metrics=metrics,
        epoch=int(saved["trainer"]["epoch"]),
    )
