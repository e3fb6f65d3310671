"""The training loop: batches, negatives, optimiser steps, evaluation, early stopping."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models.base import GraphInputs, Recommender
from cm3_pyg.training.inputs import Splits
from cm3_pyg.training.sampler import NegativeSampler, epoch_batches

logger = logging.getLogger("cm3_pyg")


class NonFiniteLossError(RuntimeError):
    """Raised when a batch's loss is NaN or infinite."""

    def __init__(self, epoch: int, batch: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch}, batch {batch}: training stopped")
        self.epoch = epoch
        self.batch = batch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpochRecord:
    """What one epoch did (``epoch`` is 1-based)."""

    epoch: int
    train_loss: float
    train_seconds: float
    eval_seconds: float
    valid: dict[str, float]
    improved: bool


@dataclass
class FitResult:
    """Outcome of :meth:`Trainer.fit`; ``test`` is measured at the best validation epoch."""

    best_epoch: int
    epochs_run: int
    valid: dict[str, float]
    test: dict[str, float]
    epoch_seconds: list[float]
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EarlyStopping:
    """MMRec's rule: stop once the metric has not improved for ``patience + 1`` evaluations."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> tuple[bool, bool]:
        """Record ``value``; returns ``(improved, should_stop)``."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs > self.patience


class Trainer:
    """Train a :class:`~cm3_pyg.models.Recommender` with full-ranking early stopping.

    Each epoch shuffles the training interactions, draws one negative per row, and takes
    one Adam step per batch of ``train_batch_size`` rows. After the epoch the model is
    evaluated from a fresh deterministic forward (:meth:`Recommender.embed`) on the
    validation split; whenever ``valid_metric`` improves the test split is evaluated too,
    so the reported test metrics are those of the best validation epoch.

    Args:
        model: the recommender.
        inputs: its graph inputs.
        splits: train/valid/test edge indices.
        config: the run's configuration (see ``training/defaults.yaml``).
        on_epoch_end: optional callback receiving each :class:`EpochRecord`.
        progress: show a tqdm bar per epoch.
    """

    def __init__(
        self,
        model: Recommender,
        inputs: GraphInputs,
        splits: Splits,
        config: dict[str, Any],
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.device = torch.device(config.get("device", "cpu"))
        self.model = model.to(self.device)
        self.inputs = inputs.to(self.device)
        self.splits = splits.to(self.device)
        self.on_epoch_end = on_epoch_end
        self.progress = progress
        self.ks = tuple(config["topk"])
        self.valid_metric = str(config["valid_metric"]).lower()
        self.optimizer = torch.optim.Adam(
            model.parameters(),
            lr=float(config["learning_rate"]),
            weight_decay=float(config["weight_decay"]),
        )
        num_items = inputs.num_items
        self.sampler = NegativeSampler(self.splits.train, num_items)
        batch = int(config["eval_batch_size"])
        self.valid_evaluator = FullRankingEvaluator(
            num_items, self.splits.train, self.splits.valid, self.ks, batch
        )
        self.test_evaluator = FullRankingEvaluator(
            num_items, self.splits.train, self.splits.test, self.ks, batch
        )
        # A dedicated generator makes batch order and negatives depend on the seed only.
        self.generator = torch.Generator(device=self.device).manual_seed(int(config["seed"]))

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training interactions; returns the mean batch loss."""
        self.model.train()
        train = self.splits.train
        batch_size = int(self.config["train_batch_size"])
        num_batches = math.ceil(train.size(1) / batch_size)
        total = torch.zeros((), device=self.device)
        batches = epoch_batches(train.size(1), batch_size, self.generator)
        bar = tqdm(
            batches,
            total=num_batches,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not self.progress,
        )
        for batch_idx, rows in enumerate(bar):
            rows = rows.to(self.device)
            users, pos = train[0, rows], train[1, rows]
            neg = self.sampler.sample(users, self.generator)
            loss = self.model.training_loss(self.inputs, users, pos, neg)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(epoch, batch_idx, float(loss))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
        return float(total) / num_batches

    def evaluate(self, split: str) -> dict[str, float]:
        """Full-ranking metrics of ``split`` (``"valid"`` or ``"test"``) from fresh embeddings."""
        evaluator = {"valid": self.valid_evaluator, "test": self.test_evaluator}[split]
        user_emb, item_emb = self.model.embed(self.inputs)
        return evaluator.evaluate(user_emb, item_emb)

    def fit(self) -> FitResult:
        epochs = int(self.config["epochs"])
        stopper = EarlyStopping(int(self.config["stopping_step"]))
        history: list[EpochRecord] = []
        best_valid: dict[str, float] = {}
        best_test: dict[str, float] = {}
        stopped = False
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            loss = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            user_emb, item_emb = self.model.embed(self.inputs)
            valid = self.valid_evaluator.evaluate(user_emb, item_emb)
            improved, stop = stopper.step(valid[self.valid_metric], epoch)
            if improved:
                best_valid = valid
                best_test = self.test_evaluator.evaluate(user_emb, item_emb)
            eval_seconds = time.perf_counter() - start
            record = EpochRecord(epoch, loss, train_seconds, eval_seconds, valid, improved)
            history.append(record)
            logger.info(
                "epoch %d: loss %.4f, valid %s %.4f%s (train %.2fs, eval %.2fs)",
                epoch,
                loss,
                self.valid_metric,
                valid[self.valid_metric],
                " *" if improved else "",
                train_seconds,
                eval_seconds,
            )
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
            if stop:
                stopped = True
                break
        return FitResult(
            best_epoch=stopper.best_epoch,
            epochs_run=len(history),
            valid=best_valid,
            test=best_test,
            epoch_seconds=[r.train_seconds for r in history],
            history=history,
            stopped_early=stopped,
        )
