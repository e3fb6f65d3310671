r"""The unlearning procedure: reverse BPR on the forget set plus the model's loss on the rest.

From the trained parameters :math:`\theta_0`, each step minimises

.. math::
    \alpha \, \overline{-\log\sigma(x_{uj} - x_{ui})}_{(u,i) \in D_f}
    + (1 - \alpha) \, L_{\text{model}}(D_r)

where :math:`L_{\text{model}}` is the model's own training loss (its objective, auxiliary
terms and regulariser: BPR for the pairwise models, CM3's alignment + calibrated uniformity
for CM3) on a batch of the retain set, and :math:`j` is a sampled item the user has no train
edge with (forgotten ones included). Before the first step the rows of forgotten users and
items are reset to a fresh initialisation (the state a model that never saw them starts in),
drawn with :func:`reset_seed`, never the original run's own initial rows. A user left
without data keeps that row: the reverse term passes no gradient into it, as a retrained
model never trains it, so only the item side unlearns that user's edges.

Stopping needs no gold model: before the first step and every ``check_every`` steps (by
default every step: a few reverse steps already move the forget recall by several percent)
the forget set's Recall@k is measured (ranked over the items the user keeps no
train edge with) and the run stops once it is at or below the request's target:

* edges (the users keep data): the recall the original model gives the same users'
  held-out (validation) edges, i.e. how well it ranks pairs it never trained on;
* users (no data left): :func:`never_seen_recall`, the forget recall under rows that know
  nothing of their users (the reset rows, shuffled among the forgotten users), re-measured
  on the current model at every check;
* items (no data left): chance level, ``k`` over the user's candidate items.

A modality request has no forget edges: it runs ``min_epochs`` (at least one) of
retain-only passes. The loss weights and this rule are our design (the paper released
none); ``benchmarks/results/unlearning-tiktok.md`` has the measurements they rest on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3_pyg.checks import check_int, check_number
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models import Batch, GraphInputs, Recommender
from cm3_pyg.training.inputs import Splits
from cm3_pyg.training.sampler import NegativeSampler, epoch_batches
from cm3_pyg.training.trainer import Trainer

__all__ = [
    "ForgetTarget",
    "UnlearningResult",
    "UnlearningSettings",
    "forget_metrics",
    "forget_target",
    "never_seen_recall",
    "reset_seed",
    "unlearn",
]


@dataclass(frozen=True)
class UnlearningSettings:
    """The procedure's knobs (defaults measured in ``benchmarks/results/unlearning-tiktok.md``).

    Attributes:
        alpha: weight of the reverse term (``1 - alpha`` on the retain loss); ``0``: the
            retain loss only.
        max_epochs: most passes over the retain set.
        check_every: optimiser steps between two checks of the stopping rule.
        k: cut-off of the forget-set recall the rule reads.
        min_epochs: passes run before the rule may stop (a request without forget edges,
            i.e. a modality request, runs ``max(1, min_epochs)`` passes of the retain loss).
    """

    alpha: float = 0.5
    max_epochs: int = 5
    check_every: int = 1
    k: int = 20
    min_epochs: float = 0.0

    def __post_init__(self) -> None:
        check_number(self.alpha, "UnlearningSettings: alpha", minimum=0, maximum=1)
        for name in ("max_epochs", "check_every", "k"):
            check_int(getattr(self, name), f"UnlearningSettings: {name}", minimum=1)
        check_number(
            self.min_epochs, "UnlearningSettings: min_epochs", minimum=0, maximum=self.max_epochs
        )


@dataclass
class UnlearningResult:
    """What a run of :func:`unlearn` did.

    Attributes:
        steps: optimiser steps taken.
        seconds: wall time of the procedure (checks included).
        stop_reason: ``target`` (the rule fired), ``max_epochs`` or ``no_forget_set``.
        history: ``(step, forget recall@k, target)`` at every check.
    """

    steps: int
    seconds: float
    stop_reason: str
    history: list[tuple[int, float, float]] = field(default_factory=list)


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


def reset_seed(seed: int) -> int:
    """The seed the forgotten rows' fresh initialisation is drawn with.

    Not the run's own seed: that would redraw the rows the original model started from, and
    the trained item side is correlated with those (their items moved toward them from the
    first step), so a "reset" user would still rank its own items high.
    """
    return (int(seed) * 1_000_003 + 0x5EED) % (2**31 - 1)


@torch.no_grad()
def never_seen_recall(
    model: Recommender,
    inputs: GraphInputs,
    retain_train: Tensor,
    forget_edges: Tensor,
    k: int = 20,
    draws: int = 4,
    seed: int = 0,
) -> float:
    """Forget-set Recall@k under rows that know nothing of their users.

    Each forgotten user's targets are ranked with *another* forgotten user's (reset) row, a
    seeded derangement per draw, averaged over ``draws``: what users the model never saw
    get from the current item side. A model retrained without the users gives them such
    rows, so this estimates its forget recall without training it; what the current item
    side still holds of the forgotten edges shows up in both this and the real metric.
    Chance level (``k`` over the candidates) when fewer than two users were forgotten.
    """
    users = torch.unique(forget_edges[0].cpu())
    if users.numel() < 2:
        kept = int((retain_train[0] == users[0]).sum()) if users.numel() else 0
        return min(1.0, k / max(1, inputs.num_items - kept))
    user_emb, item_emb = model.embed(inputs)
    evaluator = FullRankingEvaluator(inputs.num_items, retain_train, forget_edges, (k,))
    generator = torch.Generator().manual_seed(seed)
    device = user_emb.device
    total = 0.0
    for _ in range(draws):
        order = users[torch.randperm(users.numel(), generator=generator)]
        shuffled = user_emb.clone()
        shuffled[order.to(device)] = user_emb[order.roll(1).to(device)]
        total += evaluator.evaluate(shuffled, item_emb)[f"recall@{k}"]
    return total / draws


@dataclass
class ForgetTarget:
    """The forget recall the stopping rule aims at (see the module doc).

    Attributes:
        rule: ``held_out`` (edge requests), ``never_seen`` (user requests) or ``chance``
            (item requests).
        value: the fixed target of ``held_out`` and ``chance``; ``None`` for ``never_seen``,
            which is re-measured on the current model by :meth:`current`.
        retain_train: the retain train edges (``never_seen``).
        forget_edges: the forget set (``never_seen``).
        k: the recall cut-off.
    """

    rule: str
    value: float | None = None
    retain_train: Tensor | None = None
    forget_edges: Tensor | None = None
    k: int = 20

    def current(self, model: Recommender, inputs: GraphInputs) -> float:
        if self.value is not None:
            return self.value
        assert self.retain_train is not None and self.forget_edges is not None
        return never_seen_recall(model, inputs, self.retain_train, self.forget_edges, self.k)


def forget_target(
    original: Recommender,
    original_inputs: GraphInputs,
    retain: Splits,
    forget_edges: Tensor,
    kind: str,
    k: int = 20,
) -> ForgetTarget | None:
    """The stopping rule's target for a request of ``kind`` (see the module doc); ``None``
    if there is no forget set (a modality request)."""
    if forget_edges.size(1) == 0:
        return None
    users = torch.unique(forget_edges[0])
    if kind == "users":
        return ForgetTarget("never_seen", retain_train=retain.train, forget_edges=forget_edges, k=k)
    if kind == "edges":
        held_out = retain.valid[:, torch.isin(retain.valid[0], users)]
        if held_out.size(1):
            with torch.no_grad():
                user_emb, item_emb = original.embed(original_inputs)
            evaluator = FullRankingEvaluator(
                original_inputs.num_items, retain.train, held_out, (k,)
            )
            return ForgetTarget("held_out", evaluator.evaluate(user_emb, item_emb)[f"recall@{k}"])
    kept = torch.bincount(retain.train[0], minlength=int(users.max()) + 1)[users]
    candidates = (original_inputs.num_items - kept).clamp_min(1).float()
    return ForgetTarget("chance", float((k / candidates).clamp_max(1.0).mean()), k=k)


def _pair_scores(
    model: Recommender, inputs: GraphInputs, batch: Batch, frozen: Tensor
) -> tuple[Tensor, Tensor]:
    """Scores of the batch's (user, positive) and (user, negative) pairs, with gradients;
    rows of users marked in ``frozen`` (``[num_users]`` bool) pass no gradient."""
    if model.objectives:
        rows = model.batch_rows(inputs, batch)
        user, pos, neg = rows.user, rows.pos, rows.neg
    else:
        user_emb, item_emb = model.compute_embeddings(inputs)
        user = user_emb.index_select(0, batch.users)
        pos = item_emb.index_select(0, batch.pos_items)
        neg = item_emb.index_select(0, batch.neg_items)
    hold = frozen[batch.users].unsqueeze(-1)
    user = torch.where(hold, user.detach(), user)
    return model.score(user, pos), model.score(user, neg)


def unlearn(
    model: Recommender,
    inputs: GraphInputs,
    splits: Splits,
    forget_edges: Tensor,
    config: dict,
    settings: UnlearningSettings,
    target: ForgetTarget | None,
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
            ``min_epochs`` (at least one epoch) of retain-only steps.
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
    # A forgotten user left without data keeps its reset row, as in a model retrained
    # without it: the reverse term moves only the item side for it. (Under Adam the row
    # would otherwise turn against its old items within a few steps, far below gold.)
    frozen = torch.ones(inputs.num_users, dtype=torch.bool, device=device)
    frozen[train[0]] = False
    batch_size = int(config["train_batch_size"])
    per_epoch = math.ceil(train.size(1) / batch_size)
    check_every = settings.check_every
    min_steps = math.ceil(settings.min_epochs * per_epoch)
    if target is None:
        min_steps = max(min_steps, per_epoch)
    history: list[tuple[int, float, float]] = []
    steps = 0

    def reached() -> bool:
        assert target is not None
        recall = forget_metrics(model, inputs, train, forget_edges, settings.k)
        aim = target.current(model, inputs)
        history.append((steps, recall[f"recall@{settings.k}"], aim))
        model.train()
        return history[-1][1] <= aim

    if target is not None and min_steps == 0 and reached():
        return UnlearningResult(0, time.perf_counter() - start, "target", history)
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
                x_pos, x_neg = _pair_scores(model, inputs, Batch(f_users, f_items, f_neg), frozen)
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
                if reached():
                    return UnlearningResult(steps, time.perf_counter() - start, "target", history)
    return UnlearningResult(steps, time.perf_counter() - start, "max_epochs", history)
