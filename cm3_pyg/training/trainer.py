"""The training loop: batches, negatives, optimiser steps, evaluation, early stopping."""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cm3_pyg.errors import DataFormatError, NonFiniteLossError
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models.base import Batch, GraphInputs, InnerProblem, LossTerms, Recommender
from cm3_pyg.nn.optim import make_adam, make_optimizer
from cm3_pyg.nn.parallel import RowShard, split_rows
from cm3_pyg.nn.precision import matmul_precision
from cm3_pyg.training.checkpoint import capture_rng_state, restore_rng_state
from cm3_pyg.training.distributed import DividedOptimizer, World
from cm3_pyg.training.inputs import Splits
from cm3_pyg.training.sampler import NegativeSampler, epoch_batches

logger = logging.getLogger("cm3_pyg")


__all__ = [
    "EarlyStopping",
    "EpochRecord",
    "FaultInjector",
    "FitResult",
    "NonFiniteLossError",
    "Trainer",
    "seed_everything",
]

#: ``(epoch, batch, loss) -> loss``: a test hook that may replace a batch's loss.
FaultInjector = Callable[[int, int, torch.Tensor], torch.Tensor]


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
    #: Mean over the epoch's batches of each loss term (:class:`~cm3_pyg.models.LossTerms`).
    train_terms: dict[str, float] = field(default_factory=dict)


#: ``on_best(epoch, valid_metrics, (user_emb, item_emb))``
BestCallback = Callable[[int, dict[str, float], tuple[torch.Tensor, torch.Tensor]], None]


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
    #: Why training ended: "completed" (all epochs), "early_stopping" or "non_finite_loss".
    stop_reason: str = "completed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parameter_groups(model: Recommender, weight_decay: float) -> list[dict[str, Any]]:
    """The outer optimiser's groups: the model's parameters with the run's weight decay, and
    the objective's own parameters (if any) with the objective's ``weight_decay``."""
    objective = model.objective
    own = list(objective.parameters()) if objective is not None else []
    own_ids = {id(p) for p in own}
    rest = [p for p in model.outer_parameters() if id(p) not in own_ids]
    groups: list[dict[str, Any]] = [{"params": rest, "weight_decay": weight_decay}]
    if own:
        groups.append({"params": own, "weight_decay": float(getattr(objective, "weight_decay", 0))})
    return groups


def _accumulate(totals: dict[str, torch.Tensor], terms: LossTerms) -> None:
    """Add each of a batch's loss terms (detached) to ``totals``."""
    parts = {"ranking": terms.ranking, **terms.auxiliary}
    reg = terms.regularization
    if isinstance(reg, torch.Tensor):
        parts["regularization"] = reg
    for name, value in parts.items():
        value = value.detach()
        totals[name] = totals[name] + value if name in totals else value.clone()


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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


class Trainer:
    """Train a :class:`~cm3_pyg.models.Recommender` with full-ranking early stopping.

    Each epoch shuffles the training interactions, draws one negative per row, and takes
    one Adam step per batch of ``train_batch_size`` rows on the model's
    :meth:`~cm3_pyg.models.Recommender.loss_terms`. The trainer owns every optimiser: the
    outer Adam over :meth:`~cm3_pyg.models.Recommender.outer_parameters`, and one Adam per
    declared :class:`~cm3_pyg.models.InnerProblem`, stepped ``problem.steps`` times after
    each batch's loss and before the outer step. After the epoch the model is
    evaluated from a fresh deterministic forward (:meth:`Recommender.embed`) on the
    validation split; whenever ``valid_metric`` improves the test split is evaluated too,
    so the reported test metrics are those of the best validation epoch.

    Resumable: :meth:`state_dict` holds everything the remaining epochs depend on (model,
    optimizer, every RNG state including the trainer's own generator, early stopping, best
    metrics, history), so ``load_state_dict`` followed by :meth:`fit` continues exactly
    where the saved run was (bit-identical on CPU). With ``checkpoint`` set, that state is
    saved after every epoch (see :mod:`cm3_pyg.training.checkpoint`).

    Args:
        model: the recommender.
        inputs: its graph inputs.
        splits: train/valid/test edge indices (valid and test must be non-empty).
        config: the run's configuration (see ``training/defaults.yaml``).
        on_epoch_end: optional callback receiving each :class:`EpochRecord`.
        progress: show a tqdm bar per epoch.
        checkpoint: optional ``save(trainer_state)`` callable run after every epoch (before
            ``on_epoch_end``), e.g. a :func:`~cm3_pyg.training.checkpoint.save_checkpoint`
            partial.
        fault_injector: for tests only: ``(epoch, batch, loss) -> loss`` is applied to every
            batch's loss (1-based epoch and batch), e.g. to inject a NaN.
        world: train on several processes (:mod:`cm3_pyg.training.distributed`): every
            process runs this trainer with the same arguments; each step's row-wise work is
            divided among them, each back-propagates ``loss / P`` and the gradients are
            summed, and evaluation divides the users. The parameters stay identical
            everywhere; the optimiser state is divided (:class:`DividedOptimizer`), so
            :meth:`state_dict` is collective: :meth:`fit` gathers it on every process after
            each epoch, and ``checkpoint`` (set where the file is written) saves it.
            For a model with ``row_local_features`` each process keeps only its block of the
            feature tables' rows (:class:`~cm3_pyg.nn.parallel.RowShard`, in
            ``self.inputs``); the full tables are freed once nothing else holds them.

    The attribute ``on_best``, when set, is called as ``on_best(epoch, valid, embeddings)``
    whenever validation improves, before that epoch's checkpoint (so a crash in between
    redoes the epoch rather than leaving the best epoch's state unwritten).

    Raises:
        DataFormatError: an empty validation or test split.
    """

    def __init__(
        self,
        model: Recommender,
        inputs: GraphInputs,
        splits: Splits,
        config: dict[str, Any],
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
        progress: bool = True,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        fault_injector: FaultInjector | None = None,
        world: World | None = None,
    ) -> None:
        for name, edges in (("valid", splits.valid), ("test", splits.test)):
            if edges.numel() == 0:
                raise DataFormatError(
                    f"the {name} split is empty; expected at least one (user, item) pair to "
                    f"evaluate on (MMRec keeps only {name} rows of users with a train row)"
                )
        self.config = config
        self.world = world
        self.split = world.split if world is not None else None
        self.device = (
            world.device(config["device"]) if world is not None else torch.device(config["device"])
        )
        self.model = model.to(self.device)
        if world is not None:
            world.broadcast_state(self.model)
        if self.split is not None and model.row_local_features:
            # this process's rows before the copy to the device: a GPU holds only its block
            inputs = replace(inputs, features=RowShard.of_each(inputs.features, self.split))
        self.inputs = inputs.to(self.device)
        self.splits = splits.to(self.device)
        self.on_epoch_end = on_epoch_end
        self.on_best: (
            Callable[[int, dict[str, float], tuple[torch.Tensor, torch.Tensor]], None] | None
        ) = None
        self.progress = progress
        self.checkpoint = checkpoint
        self.fault_injector = fault_injector
        # operand precision of the encoders' and pairwise losses' products (float32 default)
        self.precision = str(config["precision"])
        self.ks = tuple(config["topk"])
        self.valid_metric = str(config["valid_metric"]).lower()
        lr = float(config["learning_rate"])
        self.base_lr = lr
        # The outer optimiser trains every parameter except the inner problems' networks,
        # each of which gets an Adam of its own (no weight decay, as the references). An
        # objective with parameters of its own (NBPO's flip model) gets its own weight decay.
        groups = _parameter_groups(model, float(config["weight_decay"]))
        make = functools.partial(make_optimizer, str(config["optimizer"]), lr=lr)
        self.optimizer: torch.optim.Optimizer | DividedOptimizer
        if world is None:
            self.optimizer = make(groups)
        else:  # each process keeps the optimiser state of its block of the parameters
            self.optimizer = DividedOptimizer(groups, make, world)
        self.inner_problems = model.inner_problems()
        self.inner_optimizers = {
            problem.name: make_adam(
                problem.module.parameters(), lr=lr if problem.lr is None else problem.lr
            )
            for problem in self.inner_problems
        }
        num_items = inputs.num_items
        self.sampler = NegativeSampler(self.splits.train, num_items, str(config["negative_pool"]))
        self.num_negatives = int(config["num_negatives"])
        batch = int(config["eval_batch_size"])
        self.valid_evaluator = FullRankingEvaluator(
            num_items, self.splits.train, self.splits.valid, self.ks, batch
        )
        self.test_evaluator = FullRankingEvaluator(
            num_items, self.splits.train, self.splits.test, self.ks, batch
        )
        # with several processes, each evaluates its block of the users
        self.user_blocks: dict[str, FullRankingEvaluator | None] = {}
        if world is not None:
            for name, target in (("valid", self.splits.valid), ("test", self.splits.test)):
                self.user_blocks[name] = world.user_block(
                    num_items, self.splits.train, target, self.ks, batch
                )
        # A dedicated generator makes batch order and negatives depend on the seed only.
        self.generator = torch.Generator(device=self.device).manual_seed(int(config["seed"]))
        # Progress of fit(); all of it is part of state_dict().
        self.epoch = 0  # last completed epoch (1-based)
        self.stopper = EarlyStopping(int(config["stopping_step"]))
        self.history: list[EpochRecord] = []
        self.best_valid: dict[str, float] = {}
        self.best_test: dict[str, float] = {}
        self.stopped_early = False
        self.last_train_terms: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`fit` needs to continue after the last completed epoch (on several
        processes: collective, the same on every process)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "inner_optimizers": {k: o.state_dict() for k, o in self.inner_optimizers.items()},
            "generator": self.generator.get_state(),
            "rng": capture_rng_state(),
            "early_stopping": self.stopper.state_dict(),
            "best_valid": dict(self.best_valid),
            "best_test": dict(self.best_test),
            "history": [asdict(r) for r in self.history],
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (including the global RNG states).

        Raises:
            KeyError, RuntimeError, ValueError, TypeError: a state that does not fit this
                trainer's model/optimizer (callers name the file, see ``run_experiment``).
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        inner = state["inner_optimizers"]
        if set(inner) != set(self.inner_optimizers):
            raise KeyError(
                f"inner optimizers {sorted(inner)} saved, this model has "
                f"{sorted(self.inner_optimizers)}"
            )
        for name, optimizer in self.inner_optimizers.items():
            optimizer.load_state_dict(inner[name])
        self.generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.epoch = int(state["epoch"])
        self.best_valid = dict(state["best_valid"])
        self.best_test = dict(state["best_test"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.stopped_early = bool(state["stopped_early"])

    # ------------------------------------------------------------------ training
    def train_epoch(self, epoch: int, max_batches: int | None = None) -> float:
        """One pass over the training interactions; returns the mean batch loss.

        ``max_batches`` stops after that many batches (benchmarks time a few steps of a
        large epoch with it); the mean is then over the batches taken.

        Raises:
            NonFiniteLossError: a batch's loss is NaN or infinite (checked before the
                optimizer step, so that batch never updates the model).
        """
        self.model.train()
        with split_rows(self.split), matmul_precision(self.precision):
            self.model.on_epoch_start(epoch, self.inputs)
        decay = float(self.config["lr_decay"])
        if decay != 1.0:  # exponential decay per epoch, a function of the epoch alone
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * decay ** (epoch - 1)
        train = self.splits.train
        batch_size = int(self.config["train_batch_size"])
        num_batches = math.ceil(train.size(1) / batch_size)
        total = torch.zeros((), device=self.device)
        term_totals: dict[str, torch.Tensor] = {}
        batches = epoch_batches(train.size(1), batch_size, self.generator)
        bar = tqdm(
            batches,
            total=num_batches,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not self.progress,
        )
        for batch_idx, rows in enumerate(bar, start=1):
            if max_batches is not None and batch_idx > max_batches:
                num_batches = max_batches
                bar.close()
                break
            rows = rows.to(self.device)
            users, pos = train[0, rows], train[1, rows]
            neg = self.sampler.sample(users, self.generator, self.num_negatives)
            with split_rows(self.split), matmul_precision(self.precision):
                terms = self.model.loss_terms(self.inputs, Batch(users, pos, neg))
            loss = terms.total
            if self.fault_injector is not None:
                loss = self.fault_injector(epoch, batch_idx, loss)
            if not torch.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(epoch, batch_idx, num_batches, float(loss.detach()))
            for problem in self.inner_problems:
                self.fit_inner(problem, terms.inner_inputs[problem.name])
            self.optimizer.zero_grad(set_to_none=True)
            if self.world is None:
                loss.backward()
            else:  # each process's share; the optimiser sums the gradients
                (loss / self.world.world_size).backward()
            self.optimizer.step()
            total += loss.detach()
            _accumulate(term_totals, terms)
        self.last_train_terms = {k: float(v) / num_batches for k, v in term_totals.items()}
        return float(total) / num_batches

    def fit_inner(self, problem: InnerProblem, data: Any) -> None:
        """``problem.steps`` steps of its own optimiser on ``model.inner_loss(name, data)``."""
        optimizer = self.inner_optimizers[problem.name]
        with torch.enable_grad(), matmul_precision(self.precision):
            for _ in range(problem.steps):
                loss = self.model.inner_loss(problem.name, data)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # leave no gradients behind

    def evaluate(
        self, split: str, embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Full-ranking metrics of ``split`` (``"valid"`` or ``"test"``) from ``embeddings``
        (default: fresh ones from :meth:`Recommender.embed`)."""
        evaluator = {"valid": self.valid_evaluator, "test": self.test_evaluator}[split]
        user_emb, item_emb = self.embed() if embeddings is None else embeddings
        if self.world is None:
            return evaluator.evaluate(user_emb, item_emb)
        block = self.user_blocks[split]
        sums = None if block is None else block.evaluate_sums(user_emb, item_emb)
        return self.world.reduce_sums(sums, evaluator.ks).averages()

    def embed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's evaluation embeddings (:meth:`Recommender.embed`), its row-wise work
        divided among the processes when there are several."""
        with split_rows(self.split), matmul_precision(self.precision):
            return self.model.embed(self.inputs)

    def fit(self) -> FitResult:
        """Train until ``epochs`` epochs are done or early stopping triggers.

        Continues from the last completed epoch after :meth:`load_state_dict`.

        Raises:
            NonFiniteLossError: see :meth:`train_epoch`; the trainer's state (and the last
                checkpoint) still describe the last completed epoch, so :meth:`result`
                gives the best metrics so far.
        """
        epochs = int(self.config["epochs"])
        while not self.stopped_early and self.epoch < epochs:
            epoch = self.epoch + 1
            start = time.perf_counter()
            loss = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            embeddings = self.embed()
            valid = self.evaluate("valid", embeddings)
            improved, stop = self.stopper.step(valid[self.valid_metric], epoch)
            stop = stop and bool(self.config["early_stopping"])
            if improved:
                self.best_valid = valid
                self.best_test = self.evaluate("test", embeddings)
                if self.on_best is not None:
                    self.on_best(epoch, valid, embeddings)
            eval_seconds = time.perf_counter() - start
            record = EpochRecord(
                epoch, loss, train_seconds, eval_seconds, valid, improved, self.last_train_terms
            )
            self.history.append(record)
            self.epoch = epoch
            self.stopped_early = stop
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
            # Checkpoint first: if the process dies in the callback, the epoch is saved.
            if self.checkpoint is not None or self.world is not None:
                state = self.state_dict()  # collective on several processes: all take part
                if self.checkpoint is not None:
                    self.checkpoint(state)
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
        return self.result()

    def result(self, stop_reason: str | None = None) -> FitResult:
        """The outcome so far (best validation epoch's metrics, history)."""
        if stop_reason is None:
            stop_reason = "early_stopping" if self.stopped_early else "completed"
        return FitResult(
            best_epoch=self.stopper.best_epoch,
            epochs_run=len(self.history),
            valid=dict(self.best_valid),
            test=dict(self.best_test),
            epoch_seconds=[r.train_seconds for r in self.history],
            history=list(self.history),
            stopped_early=self.stopped_early,
            stop_reason=stop_reason,
        )
