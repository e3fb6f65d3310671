r"""The unlearning procedure: reverse BPR on the forget set plus the model's loss on the rest.

From the trained parameters :math:`\theta_0`, each step minimises

.. math::
    \alpha \, \overline{-\log\sigma(x_{uj} - x_{ui})}_{(u,i) \in D_f}
    + (1 - \alpha) \, L_{\text{model}}(D_r)

where :math:`L_{\text{model}}` is the model's own training loss (its objective, auxiliary
terms and regulariser: BPR for the pairwise models, CM3's alignment + calibrated uniformity
for CM3) on a batch of the retain set, and :math:`j` is a sampled item the user has no train
edge with (forgotten ones included). Before the first step the rows of forgotten users and
items are reset to a fresh initialisation (the state a model that never saw them starts in).

Stopping needs no gold model: every ``1 / checks_per_epoch`` of an epoch the forget set's
Recall@k is measured (ranked over the items the user keeps no train edge with) and the run
stops once it is at or below :func:`forget_target`: the recall the original model gives the
same users' held-out (validation) edges for an edge request, chance level (``k`` over the
user's candidate items) when the forgotten users or items have no data left at all. The loss
weights and this rule are our design (the paper released none); the first TikTok
measurements (``benchmarks/results/unlearning-tiktok.md``) show the chance-level target
overshooting for user requests, so both are provisional.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models import Batch, GraphInputs, Recommender
from cm3_pyg.training.inputs import Splits
from cm3_pyg.training.sampler import NegativeSampler, epoch_batches
from cm3_pyg.training.trainer import Trainer

__all__ = ["UnlearningResult", "UnlearningSettings", "forget_metrics", "forget_target", "unlearn"]


@dataclass(frozen=True)
class UnlearningSettings:
    """The procedure's knobs (provisional defaults: see ``results/unlearning-tiktok.md``).

    Attributes:
        alpha: weight of the reverse term (``1 - alpha`` on the retain loss); ``0`` is the
            retain-only fine-tuning baseline.
        max_epochs: most passes over the retain set.
        checks_per_epoch: how often per epoch the stopping rule is checked.
        k: cut-off of the forget-set recall the rule reads.
        min_epochs: passes run before the rule may stop (when the request has no forget
            edges, e.g. a modality request, exactly this many are run).
    """

    alpha: float = 0.5
    max_epochs: int = 5
    checks_per_epoch: int = 4
    k: int = 20
    min_epochs: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.max_epochs < 1 or self.checks_per_epoch < 1 or self.k < 1:
            raise ValueError("max_epochs, checks_per_epoch and k must be >= 1")
        if not 0.0 <= self.min_epochs <= self.max_epochs:
            raise ValueError(f"min_epochs must be in [0, max_epochs], got {self.min_epochs}")


@dataclass
class UnlearningResult:
    """What a run of :func:`unlearn` did.

    Attributes:
        steps: optimiser steps taken.
        seconds: wall time of the procedure (checks included).
        stop_reason: ``target`` (the rule fired), ``max_epochs`` or ``no_forget_set``.
        history: ``(step, forget recall@k)`` at every check.
    """

    steps: int
    seconds: float
    stop_reason: str
    history: list[tuple[int, float]] = field(default_factory=list)


@torch.no_grad()
def forget_metrics(
    model: Recommender,
    inputs: GraphInputs,
    retain_train: Tensor,
    forget_edges: Tensor,
    k: int = 20,
) -> dict[str, float]:
    """Recall/NDCG@k of the forgotten edges as targets, ranked over the items each user
    keeps no train edge with (``{}`` when nothing was forgotten)."""
    if forget_edges.size(1) == 0:
        return {}
    user_emb, item_emb = model.embed(inputs)
    evaluator = FullRankingEvaluator(inputs.num_items, retain_train, forget_edges, (k,))
    return evaluator.evaluate(user_emb, item_emb)


def forget_target(
    original: Recommender,
    original_inputs: GraphInputs,
    retain: Splits,
    forget_edges: Tensor,
    users_have_data: bool,
    k: int = 20,
) -> float | None:
    """The forget-set recall the stopping rule aims at (see the module doc); ``None`` if
    there is no forget set."""
    if forget_edges.size(1) == 0:
        return None
    users = torch.unique(forget_edges[0])
    if users_have_data:
        held_out = retain.valid[:, torch.isin(retain.valid[0], users)]
        if held_out.size(1):
            with torch.no_grad():
                user_emb, item_emb = original.embed(original_inputs)
            evaluator = FullRankingEvaluator(
                original_inputs.num_items, retain.train, held_out, (k,)
            )
            return evaluator.evaluate(user_emb, item_emb)[f"recall@{k}"]
    kept = torch.bincount(retain.train[0], minlength=int(users.max()) + 1)[users]
    candidates = (original_inputs.num_items - kept).clamp_min(1).float()
    return float((k / candidates).clamp_max(1.0).mean())


def _pair_scores(model: Recommender, inputs: GraphInputs, batch: Batch) -> tuple[Tensor, Tensor]:
    """Scores of the batch's (user, positive) and (user, negative) pairs, with gradients."""
    if model.objectives:
        rows = model.batch_rows(inputs, batch)
        return model.score(rows.user, rows.pos), model.score(rows.user, rows.neg)
    user_emb, item_emb = model.compute_embeddings(inputs)
    user = user_emb.index_select(0, batch.users)
    return (
        model.score(user, item_emb.index_select(0, batch.pos_items)),
        model.score(user, item_emb.index_select(0, batch.neg_items)),
    )


def unlearn(
    model: Recommender,
    inputs: GraphInputs,
    splits: Splits,
    forget_edges: Tensor,
    config: dict,
    settings: UnlearningSettings,
    target: float | None,
) -> UnlearningResult:
    """Run the procedure on ``model`` in place (rows already reset) over the retain data.

    Args:
        model: the trained model, its forgotten rows reset.
        inputs: graph inputs built from the retain data.
        splits: the retain splits.
        forget_edges: ``[2, F]`` the forget set.
        config: the run's configuration (learning rate, batch size, optimiser, ...).
        settings: the procedure's weights and stopping rule.
        target: the forget recall to stop at (:func:`forget_target`); ``None``: run
            ``min_epochs`` (at least one check's worth) of retain-only steps.
    """
    start = time.perf_counter()
    # A fresh optimiser: no moment of the original run's optimiser is carried over.
    trainer = Trainer(model, inputs, splits, config, progress=False)
    model, inputs, device = trainer.model, trainer.inputs, trainer.device
    forget_edges = forget_edges.to(device)
    alpha = settings.alpha if forget_edges.size(1) else 0.0
    train = trainer.splits.train
    # Reverse-term negatives: items the user had no train edge with, forgotten ones included.
    everything = torch.cat([train, forget_edges], dim=1)
    forget_sampler = NegativeSampler(everything, inputs.num_items, "all") if alpha else None
    batch_size = int(config["train_batch_size"])
    per_epoch = math.ceil(train.size(1) / batch_size)
    check_every = max(1, per_epoch // settings.checks_per_epoch)
    min_steps = math.ceil(settings.min_epochs * per_epoch)
    if target is None:
        min_steps = max(min_steps, check_every)
    history: list[tuple[int, float]] = []
    steps = 0
    model.train()
    for epoch in range(1, settings.max_epochs + 1):
        model.on_epoch_start(epoch, inputs)
        for rows in epoch_batches(train.size(1), batch_size, trainer.generator):
            rows = rows.to(device)
            users, pos = train[0, rows], train[1, rows]
            neg = trainer.sampler.sample(users, trainer.generator, trainer.num_negatives)
            terms = model.loss_terms(inputs, Batch(users, pos, neg))
            loss = (1.0 - alpha) * terms.total
            if forget_sampler is not None:
                pick = torch.randint(
                    forget_edges.size(1),
                    (min(batch_size, forget_edges.size(1)),),
                    generator=trainer.generator,
                    device=device,
                )
                f_users, f_items = forget_edges[0, pick], forget_edges[1, pick]
                f_neg = forget_sampler.sample(f_users, trainer.generator)
                x_pos, x_neg = _pair_scores(model, inputs, Batch(f_users, f_items, f_neg))
                loss = loss + alpha * -F.logsigmoid(x_neg - x_pos).mean()
            for problem in trainer.inner_problems:
                trainer.fit_inner(problem, terms.inner_inputs[problem.name])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            steps += 1
            if steps % check_every == 0 and steps >= min_steps:
                if target is None:
                    return UnlearningResult(
                        steps, time.perf_counter() - start, "no_forget_set", history
                    )
                recall = forget_metrics(model, inputs, train, forget_edges, settings.k)
                history.append((steps, recall[f"recall@{settings.k}"]))
                model.train()
                if history[-1][1] <= target:
                    return UnlearningResult(steps, time.perf_counter() - start, "target", history)
    return UnlearningResult(steps, time.perf_counter() - start, "max_epochs", history)
