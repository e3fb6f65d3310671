"""Unlearn a finished run: a forget request in, an unlearned run folder and ``unlearn.json`` out.

The output folder is built in a temporary sibling and renamed into place at the end, so a
failed or interrupted request leaves nothing behind; the request is checked before any work.
The unlearned run loads like any run (:func:`cm3_pyg.load_run`): its ``retain.pt`` tells the
loader how the retain data differs from the dataset.

What the folder holds, and why none of it keeps forgotten data:

* ``checkpoint.pt``: the unlearned weights (the forgotten users' and items' rows reset to a
  fresh initialisation, drawn independently of the original's, then trained by the
  procedure) and a *fresh* optimiser state: the
  original run's Adam moments and the procedure's (which saw the forget set) are not saved;
  its data fingerprint is the retain data's.
* ``artifact.pt``: the unlearned embeddings for serving, the retain train edges to
  exclude, forgotten items marked never to recommend, and the external ids with the
  forgotten users' and items' blanked (``cm3-pyg recommend`` answers them as unknown).
* ``retain.pt``: the retain splits (the forgotten edges are not in them) and, per modality,
  a mask of the removed rows; no feature values.
* ``metrics.json`` / ``unlearn.json``: metrics and the request's kind and size, no ids.
* ``gold/`` (with ``--gold``): a run trained from scratch on the retain data.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import HeteroData

from cm3_pyg.data.idmaps import external_ids
from cm3_pyg.errors import ConfigError
from cm3_pyg.io import atomic_folder, atomic_write_text
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models import Recommender
from cm3_pyg.training.artifact import ARTIFACT_NAME, Artifact, save_artifact
from cm3_pyg.training.checkpoint import (
    CHECKPOINT_NAME,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from cm3_pyg.training.experiment import run_experiment
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.loading import load_run, source_data
from cm3_pyg.training.trainer import Trainer, seed_everything
from cm3_pyg.unlearning.procedure import (
    UnlearningSettings,
    forget_metrics,
    forget_target,
    reset_seed,
    unlearn,
)
from cm3_pyg.unlearning.retain import RETAIN_NAME, ForgetRequest, build_retain_data, save_retain

__all__ = ["unlearn_run"]


def unlearn_run(
    run_dir: str | os.PathLike[str],
    request: ForgetRequest,
    out_dir: str | os.PathLike[str],
    settings: UnlearningSettings | None = None,
    gold: bool = False,
    finetune: bool = False,
    gold_run: str | os.PathLike[str] | None = None,
    data: HeteroData | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Apply ``request`` to the run in ``run_dir``; write the unlearned run to ``out_dir``.

    Returns ``unlearn.json``'s content: ``request`` (kind and size), and for ``original``,
    ``unlearned``, ``gold`` (``--gold``, else ``None``) and ``finetune`` (the original
    trained ``max_epochs`` on the retain data only, no reset; else ``None``): ``forget``
    (Recall/NDCG@20 of the forgotten edges, ranked over the items each user keeps no train
    edge with; for a modality request, of the affected items' train edges, which stay),
    ``test`` (the retain data's test metrics) and ``seconds`` (the original's training
    time, gold's retraining time, the others' wall time); ``target``, the stopping rule's
    kind and fixed value. ``gold_run`` measures an existing gold run (trained on this
    request's retain data: its data fingerprint is checked) instead of retraining.

    Raises:
        RequestError: a request that does not fit the data (nothing is written).
        ConfigError: ``out_dir`` exists and is not empty.
        CheckpointError: ``run_dir`` holds no usable run.
    """
    settings = settings or UnlearningSettings()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose a new --out")
    saved = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
    config = dict(saved["config"])
    dataset = str(saved["dataset"])
    if float(config.get("cold_items", 0.0) or 0.0) > 0.0:
        raise ConfigError(
            f"{run_dir}: the run held out cold items (cold_items > 0); unlearning such a run "
            "is not supported"
        )
    if data is None:
        data = source_data(saved, data_root, cache_dir)
    retain = build_retain_data(data, request)
    original = load_run(run_dir, data=data)
    cls = type(original.model)
    inputs = build_graph_inputs(retain.data, config, uses_item_graph=cls.uses_item_graph)
    splits = get_splits(retain.data)

    test_evaluator = FullRankingEvaluator(
        inputs.num_items,
        splits.train,
        splits.test,
        tuple(config["topk"]),
        int(config["eval_batch_size"]),
    )

    # What "forget" measures: the forgotten edges; for a modality request (whose edges stay)
    # the affected items' train edges, so the unlearned model's use of those items can be
    # compared with gold's.
    if request.kind == "modality":
        affected = torch.isin(splits.train[1], request.ids.to(splits.train.device))
        measured, measured_train = splits.train[:, affected], splits.train[:, ~affected]
    else:
        measured, measured_train = retain.forget_edges, splits.train

    def measure(model: Recommender, model_inputs: Any, seconds: float) -> dict[str, Any]:
        user_emb, item_emb = model.embed(model_inputs)
        return {
            "forget": forget_metrics(model, model_inputs, measured_train, measured),
            "test": test_evaluator.evaluate(user_emb, item_emb),
            "seconds": seconds,
        }

    report: dict[str, Any] = {
        "request": request.describe(),
        "settings": vars(settings).copy(),
        "original": measure(
            original.model, original.inputs, float(sum(original.metrics.get("epoch_seconds", [])))
        ),
    }
    target = forget_target(
        original.model,
        original.inputs,
        splits,
        retain.forget_edges,
        request.kind,
        k=settings.k,
    )
    report["target"] = None if target is None else {"rule": target.rule, "value": target.value}

    def run_procedure(reset: bool, run_settings: UnlearningSettings, aim: Any) -> tuple:
        start = time.perf_counter()
        model = copy.deepcopy(original.model)
        if reset:
            seed_everything(reset_seed(int(config["seed"])))
            fresh = cls.from_config(config, inputs)
            model.copy_rows(fresh, retain.reset_users, retain.reset_items, retain.modality_index)
        result = unlearn(model, inputs, splits, retain.forget_edges, config, run_settings, aim)
        record = measure(model, inputs, time.perf_counter() - start)
        record.update(steps=result.steps, stop_reason=result.stop_reason, history=result.history)
        return model, record

    model, report["unlearned"] = run_procedure(True, settings, target)
    report["finetune"] = None
    if finetune:
        # The usual baseline: the original model trained on the retain data only, no reset,
        # for the procedure's whole budget.
        budget = float(settings.max_epochs)
        baseline = UnlearningSettings(
            alpha=0.0, max_epochs=settings.max_epochs, min_epochs=budget, k=settings.k
        )
        report["finetune"] = run_procedure(False, baseline, None)[1]

    with atomic_folder(out) as staging:
        report["gold"] = None
        if gold and gold_run is None:
            run_experiment(retain.data, cls.name, config, staging / "gold", dataset, progress=False)
            gold_run = staging / "gold"
        if gold_run is not None:
            trained = load_run(gold_run, data=retain.data)
            seconds = float(sum(trained.metrics.get("epoch_seconds", [])))
            report["gold"] = measure(trained.model, trained.inputs, seconds)
        fresh_trainer = Trainer(model, inputs, splits, config, progress=False)
        save_checkpoint(
            staging / CHECKPOINT_NAME,
            model=cls.name,
            dataset=dataset,
            config=config,
            data_fingerprint=data_fingerprint(inputs, splits),
            trainer=fresh_trainer.state_dict(),
        )
        save_retain(staging / RETAIN_NAME, retain.data)
        removed = torch.zeros(inputs.num_items, dtype=torch.bool)
        if request.kind == "items":
            removed[retain.reset_items] = True  # never recommended again
        with torch.no_grad():
            user_emb, item_emb = model.embed(inputs)
        artifact = Artifact.build(
            model=cls.name,
            dataset=dataset,
            epoch=int(saved["trainer"]["epoch"]),
            valid=fresh_trainer.evaluate("valid"),
            config=config,
            user_embeddings=user_emb,
            item_embeddings=item_emb,
            train_edges=splits.train,
            user_ids=external_ids(retain.data, "user").external,
            item_ids=external_ids(retain.data, "item").external,
            removed_items=removed,
        )
        save_artifact(artifact, staging / ARTIFACT_NAME)
        metrics = {
            "dataset": dataset,
            "model": cls.name,
            "config": config,
            "unlearned_from": str(Path(run_dir).resolve()),
            "valid": fresh_trainer.evaluate("valid"),
            "test": report["unlearned"]["test"],
        }
        atomic_write_text(staging / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(staging / "unlearn.json", json.dumps(report, indent=2) + "\n")
    return report
