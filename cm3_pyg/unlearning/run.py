"""Unlearn a finished run: a forget request in, an unlearned run folder and ``unlearn.json`` out.

The output folder is built in a temporary sibling and renamed into place at the end, so a
failed or interrupted request leaves nothing behind; the request is checked before any work.
The unlearned run loads like any run (:func:`cm3_pyg.load_run`): its ``retain.pt`` tells the
loader how the retain data differs from the dataset.

What the folder holds, and why none of it keeps forgotten data:

* ``checkpoint.pt``: the unlearned weights (the forgotten users' and items' rows reset to a
  fresh initialisation, then trained by the procedure) and a *fresh* optimiser state: the
  original run's Adam moments and the procedure's (which saw the forget set) are not saved;
  its data fingerprint is the retain data's.
* ``retain.pt``: the retain splits (the forgotten edges are not in them) and, per modality,
  a mask of the removed rows; no feature values.
* ``metrics.json`` / ``unlearn.json``: metrics and the request's kind and size, no ids.
* ``gold/`` (with ``--gold``): a run trained from scratch on the retain data.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch_geometric.data import HeteroData

from cm3_pyg.errors import ConfigError
from cm3_pyg.io import atomic_write_text
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models import Recommender
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
    data: HeteroData | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Apply ``request`` to the run in ``run_dir``; write the unlearned run to ``out_dir``.

    Returns ``unlearn.json``'s content: ``request`` (kind and size), and for ``original``,
    ``unlearned``, ``gold`` (``--gold``, else ``None``) and ``finetune`` (the retain-only
    baseline, else ``None``): ``forget`` (Recall/NDCG@20 of the forgotten edges, ranked over
    the items each user keeps no train edge with), ``test`` (the retain data's test
    metrics) and ``seconds`` (the original's training time, the others' wall time).

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

    def measure(model: Recommender, model_inputs: Any, seconds: float) -> dict[str, Any]:
        user_emb, item_emb = model.embed(model_inputs)
        return {
            "forget": forget_metrics(model, model_inputs, splits.train, retain.forget_edges),
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
        users_have_data=request.kind == "edges",
        k=settings.k,
    )
    report["target_forget_recall"] = target

    def procedure(alpha: float) -> tuple[Recommender, dict[str, Any]]:
        start = time.perf_counter()
        model = copy.deepcopy(original.model)
        seed_everything(int(config["seed"]))
        fresh = cls.from_config(config, inputs)
        model.copy_rows(fresh, retain.reset_users, retain.reset_items, retain.modality_index)
        run_settings = UnlearningSettings(**{**vars(settings), "alpha": alpha})
        result = unlearn(model, inputs, splits, retain.forget_edges, config, run_settings, target)
        seconds = time.perf_counter() - start
        record = measure(model, inputs, seconds)
        record.update(steps=result.steps, stop_reason=result.stop_reason, history=result.history)
        return model, record

    model, report["unlearned"] = procedure(settings.alpha)
    report["finetune"] = procedure(0.0)[1] if finetune else None

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        report["gold"] = None
        if gold:
            start = time.perf_counter()
            run_experiment(retain.data, cls.name, config, staging / "gold", dataset, progress=False)
            seconds = time.perf_counter() - start
            gold_run = load_run(staging / "gold", data=retain.data)
            report["gold"] = measure(gold_run.model, gold_run.inputs, seconds)
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
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
