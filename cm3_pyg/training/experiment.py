"""One complete run: data -> graph inputs -> model -> training -> metrics files.

With an output folder the run is crash-safe: a checkpoint is written atomically after every
epoch (``checkpoint.pt``), ``resume=True`` continues from it (bit-identically on CPU), and
a NaN/Inf loss still leaves ``metrics.json`` with the best metrics so far.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch_geometric.data import HeteroData

from cm3_pyg.data.hetero import content_hash
from cm3_pyg.data.idmaps import external_ids
from cm3_pyg.errors import CheckpointError, ConfigError, NonFiniteLossError
from cm3_pyg.io import FolderLock, atomic_write_text
from cm3_pyg.metrics import METRIC_NAMES, FullRankingEvaluator, popularity_scores
from cm3_pyg.models import get_model_class
from cm3_pyg.models.base import GraphInputs
from cm3_pyg.nn.parallel import RowShard
from cm3_pyg.nn.sparse import SparseAdjacency
from cm3_pyg.training.artifact import ARTIFACT_NAME, Artifact, load_artifact, save_artifact
from cm3_pyg.training.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from cm3_pyg.training.coldstart import apply_cold_items, cold_start_report
from cm3_pyg.training.curves import TensorBoardLog, plot_curves
from cm3_pyg.training.distributed import World, world_from_env
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.trainer import (
    EpochRecord,
    FaultInjector,
    FitResult,
    Trainer,
    seed_everything,
)
from cm3_pyg.training.user_metrics import TEST_USERS_NAME, write_user_metrics

__all__ = ["EpochCSV", "atomic_write_text", "popularity_baseline", "run_experiment"]

logger = logging.getLogger("cm3_pyg")


class EpochCSV:
    """Per-epoch log (``epochs.csv``), one flushed row per epoch.

    Created with the ``history`` of a resumed run, it rewrites the file (atomically) with
    exactly those epochs first, so rows of epochs that are redone after a crash never
    appear twice.
    """

    def __init__(
        self, path: Path, metric_keys: list[str], history: Sequence[EpochRecord] = ()
    ) -> None:
        self.path = path
        self.metric_keys = metric_keys
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(
            ["epoch", "train_loss", "train_seconds", "eval_seconds", "improved"]
            + [f"valid_{k}" for k in metric_keys]
        )
        for record in history:
            writer.writerow(self._row(record))
        atomic_write_text(path, buffer.getvalue())

    def _row(self, record: EpochRecord) -> list[Any]:
        return [
            record.epoch,
            f"{record.train_loss:.6f}",
            f"{record.train_seconds:.4f}",
            f"{record.eval_seconds:.4f}",
            int(record.improved),
        ] + [f"{record.valid[k]:.6f}" for k in self.metric_keys]

    def __call__(self, record: EpochRecord) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(self._row(record))


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


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files a killed run left behind (see :func:`cm3_pyg.io.atomic_write`)."""
    for name in (CHECKPOINT_NAME, "metrics.json", "epochs.csv", TEST_USERS_NAME):
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


#: What a run writes into its folder: a fresh run over an earlier one removes all of it
#: (with ``overwrite``), so the folder never describes two runs.
RUN_FILES = (
    CHECKPOINT_NAME,
    "metrics.json",
    "epochs.csv",
    ARTIFACT_NAME,
    TEST_USERS_NAME,
    "curves.png",
    "retain.pt",
    "unlearn.json",
    "tensorboard",
)


def clear_run_folder(folder: str | os.PathLike[str]) -> None:
    """Remove an earlier run's files (:data:`RUN_FILES`) from ``folder``."""
    for name in RUN_FILES:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_experiment(
    data: HeteroData,
    model_name: str,
    config: dict[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    dataset_name: str = "synthetic",
    progress: bool = True,
    resume: bool = False,
    checkpoint: bool = True,
    fault_injector: FaultInjector | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model_name`` on ``data`` with ``config``; write ``metrics.json`` and ``epochs.csv``.

    Returns the content of ``metrics.json``: ``dataset``, ``model``, ``config``,
    ``best_epoch`` (1-based), ``epochs_run``, ``stop_reason`` (``completed``,
    ``early_stopping`` or ``non_finite_loss``), ``valid`` and ``test`` (at the best
    validation epoch), ``epoch_seconds`` (training time of each epoch), and the
    ``popularity`` baseline's valid/test metrics on the same split.

    Args:
        data: the dataset (layout of ``docs/architecture.md``).
        model_name: a registered model.
        config: the full configuration (:func:`~cm3_pyg.training.load_config`).
        out_dir: where ``metrics.json``, ``epochs.csv``, ``checkpoint.pt`` (the last epoch),
            ``artifact.pt`` (the best validation epoch, for inference) and ``test_users.csv``
            (every test user's metrics at that epoch, :mod:`~cm3_pyg.training.user_metrics`)
            go.
        dataset_name: recorded in the outputs (and checked on resume).
        progress: per-epoch progress bars.
        resume: continue from ``out_dir/checkpoint.pt``; the checkpoint must come from the
            same model, dataset, data and configuration (``epochs`` may differ).
        checkpoint: write ``out_dir/checkpoint.pt`` after every epoch (needs ``out_dir``).
        fault_injector: test hook passed to :class:`~cm3_pyg.training.Trainer`.
        overwrite: let a fresh run replace an earlier run's files in ``out_dir``
            (otherwise a folder holding a run is refused, naming the files).

    Started by ``torchrun`` with several processes, the run trains on all of them
    (:mod:`cm3_pyg.training.distributed`); rank 0 writes the files, ``metrics.json``
    records ``world_size``.

    The output folder is locked while the run writes into it
    (:class:`~cm3_pyg.io.FolderLock`): a second run into it fails at once with a
    :class:`~cm3_pyg.errors.FolderBusyError` naming the holder.

    Raises:
        CheckpointError: ``resume`` without a usable, matching checkpoint.
        NonFiniteLossError: a NaN/Inf loss; ``metrics.json`` is written first (best metrics
            so far, ``stop_reason: non_finite_loss``) and the checkpoint of the last
            completed epoch is left intact.
    """
    world = world_from_env(str(config["device"]))
    writer = world is None or world.is_writer
    progress = progress and writer
    args = (data, model_name, config, out_dir, dataset_name, progress, resume, checkpoint)
    if out_dir is None or not writer:  # the other ranks read the folder at most (resume)
        return _run_experiment(*args, fault_injector, world)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    with FolderLock(out):
        if not resume:
            earlier = [name for name in RUN_FILES if (out / name).exists()]
            if earlier and not overwrite:
                raise ConfigError(
                    f"{out}: holds an earlier run ({', '.join(earlier)}); pass --overwrite to "
                    f"replace it, --resume {out} to continue it, or choose another --out"
                )
            if earlier:
                clear_run_folder(out)
        return _run_experiment(*args, fault_injector, world)


def _run_experiment(
    data: HeteroData,
    model_name: str,
    config: dict[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    dataset_name: str = "synthetic",
    progress: bool = True,
    resume: bool = False,
    checkpoint: bool = True,
    fault_injector: FaultInjector | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """:func:`run_experiment` once its folder is locked and checked (by rank 0: only it
    writes)."""
    writer = world is None or world.is_writer
    model_cls = get_model_class(model_name)
    model_cls.check_config(config)  # before any data work: a bad value fails at once
    source_hash = content_hash(data)  # what the run read, before any hold-out
    data = apply_cold_items(data, config, model_cls)
    seed_everything(int(config["seed"]))
    inputs = build_graph_inputs(
        data, config, uses_item_graph=model_cls.uses_item_graph, world=world
    )
    if world is not None:
        inputs = _same_kernels(inputs, world)
    if len(inputs.features) < model_cls.min_modalities:
        raise ConfigError(
            f"model {model_name!r} needs at least {model_cls.min_modalities} item modalities, "
            f"the data has {inputs.modalities}"
        )
    try:
        model = model_cls.from_config(config, inputs)
    except ValueError as exc:
        message = str(exc)
        if f"model {model_cls.name!r}" not in message:
            message = f"model {model_cls.name!r}: {message}"
        raise ConfigError(message) from None
    logger.info(
        "%s on %s: %d users, %d items, modalities %s",
        model,
        dataset_name,
        inputs.num_users,
        inputs.num_items,
        inputs.modalities,
    )
    splits = get_splits(data)
    out_path = Path(out_dir) if out_dir is not None else None
    if resume and out_path is None:
        raise CheckpointError("resume needs the output folder holding the run's checkpoint")
    ckpt_path = out_path / CHECKPOINT_NAME if out_path is not None else None
    write_path = out_path if writer else None  # every file this run writes goes here
    if write_path is not None and write_path.is_dir():
        _remove_stale_temporaries(write_path)
    fingerprint = data_fingerprint(inputs, splits) if ckpt_path is not None else ""
    saved = None
    if resume:
        assert ckpt_path is not None
        saved = load_checkpoint(ckpt_path)
        check_resumable(
            saved,
            ckpt_path,
            model=model_cls.name,
            dataset=dataset_name,
            config=config,
            data_fingerprint=fingerprint,
        )

    def save(trainer_state: dict[str, Any]) -> None:
        assert ckpt_path is not None
        save_checkpoint(
            ckpt_path,
            model=model_cls.name,
            dataset=dataset_name,
            config=config,
            data_fingerprint=fingerprint,
            trainer=trainer_state,
        )

    if world is not None and model_cls.row_local_features:
        # views, not the trainer's copies: this run keeps ``data``, which holds the full
        # tables, to its end, so a copy would only add the block (and of a mapped cache the
        # view's rows stay shared file pages)
        features = RowShard.of_each(inputs.features, world.split, copy=False)
        inputs = replace(inputs, features=features)
    trainer = Trainer(
        model,
        inputs,
        splits,
        config,
        progress=progress,
        checkpoint=save if checkpoint and write_path is not None else None,
        fault_injector=fault_injector,
        world=world,
    )
    # the trainer's inputs (on several processes possibly each one's feature rows only): this
    # function's reference to the full tables must not keep them alive
    inputs = trainer.inputs
    if saved is not None:
        try:
            trainer.load_state_dict(saved["trainer"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{ckpt_path}: the saved trainer state does not fit this run "
                f"({type(exc).__name__}: {reason})"
            ) from None
        logger.info("resuming %s after epoch %d", ckpt_path, trainer.epoch)
    cold = float(config.get("cold_items", 0.0) or 0.0) > 0.0
    best: dict[str, Any] = {}
    artifact_path = write_path / ARTIFACT_NAME if write_path is not None else None
    board: TensorBoardLog | None = None
    if write_path is not None:
        keys = [f"{m}@{k}" for m in METRIC_NAMES for k in config["topk"]]
        epoch_log = EpochCSV(write_path / "epochs.csv", keys, trainer.history)
        board = TensorBoardLog.open(write_path / "tensorboard")

        def on_epoch_end(record: EpochRecord) -> None:
            epoch_log(record)
            if board is not None:
                board(record)

        trainer.on_epoch_end = on_epoch_end
        if saved is None and artifact_path is not None:
            # A fresh run: an earlier run's artifact must not stand for this one.
            artifact_path.unlink(missing_ok=True)
    user_ids, item_ids = external_ids(data, "user"), external_ids(data, "item")

    def on_best(epoch: int, valid: dict[str, float], embeddings: Any) -> None:
        if cold:
            best["embeddings"] = (embeddings[0].detach().cpu(), embeddings[1].detach().cpu())
        if artifact_path is None:
            return
        artifact = Artifact.build(
            model=model_cls.name,
            dataset=dataset_name,
            epoch=epoch,
            valid=valid,
            config=config,
            user_embeddings=embeddings[0],
            item_embeddings=embeddings[1],
            train_edges=splits.train,
            user_ids=user_ids.external,
            item_ids=item_ids.external,
        )
        save_artifact(artifact, artifact_path)

    if writer:
        trainer.on_best = on_best

    failure: NonFiniteLossError | None = None
    try:
        result: FitResult = trainer.fit()
    except NonFiniteLossError as exc:
        failure = exc
        result = trainer.result(stop_reason="non_finite_loss")
        logger.error("%s; reporting the best epoch before it", exc)
    finally:
        if board is not None:
            board.close()
    metrics: dict[str, Any] = {
        "dataset": dataset_name,
        "data_hash": source_hash,
        "model": model_cls.name,
        "config": config,
        "modalities": inputs.modalities,
        # The kernels "auto" resolved to (pin sparse_backend to reproduce bit for bit).
        "sparse_backends": {
            name: getattr(adj, "backend", type(adj).__name__)
            for name, adj in (("ui", inputs.ui_adj), ("item", inputs.item_adj))
            if adj is not None
        },
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "stop_reason": result.stop_reason,
        "resumed_from_epoch": None if saved is None else int(saved["trainer"]["epoch"]),
        "valid": result.valid,
        "test": result.test,
        "epoch_seconds": result.epoch_seconds,
        "world_size": 1 if world is None else world.world_size,
        "popularity": popularity_baseline(data, config),
    }
    # the best epoch's embeddings: kept in memory (cold runs), else read once from the artifact
    embeddings = best.get("embeddings")
    if embeddings is None and artifact_path is not None and artifact_path.exists():
        stored = load_artifact(artifact_path)
        embeddings = (stored.user_embeddings, stored.item_embeddings)
    if cold and embeddings is not None:
        metrics["cold"] = cold_start_report(
            data, embeddings[0], embeddings[1], inputs.modalities, config["topk"]
        )
    if write_path is not None and embeddings is not None:
        # every test user's metrics at the best epoch, for paired significance tests between
        # runs; their means are metrics["test"]
        per_user = trainer.test_evaluator.evaluate_per_user(*embeddings)
        write_user_metrics(write_path / TEST_USERS_NAME, per_user, user_ids.external)
    if failure is not None:
        metrics["error"] = str(failure)
        # The value as a string: JSON has no NaN/Infinity.
        metrics["non_finite_loss"] = {
            "epoch": failure.epoch,
            "batch": failure.batch,
            "num_batches": failure.num_batches,
            "value": str(failure.value),
        }
    if write_path is not None:
        atomic_write_text(write_path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        # curves.png with the optional matplotlib; a plotting failure never fails a run
        try:
            plot_curves(result.history, write_path / "curves.png")
        except Exception as exc:  # noqa: BLE001
            logger.warning("curves.png not written (%s: %s)", type(exc).__name__, exc)
    if failure is not None:
        raise failure
    return metrics


def _same_kernels(inputs: GraphInputs, world: World) -> GraphInputs:
    """``inputs`` with rank 0's sparse kernels: ``sparse_backend: auto`` times the kernels
    on each process and could choose differently, and the processes must compute alike."""
    chosen = world.from_rank0(
        [getattr(adj, "backend", None) for adj in (inputs.ui_adj, inputs.item_adj)]
    )
    ui_adj, item_adj = (
        adj.with_backend(backend) if isinstance(adj, SparseAdjacency) and backend else adj
        for adj, backend in zip((inputs.ui_adj, inputs.item_adj), chosen, strict=True)
    )
    return replace(inputs, ui_adj=ui_adj, item_adj=item_adj)
