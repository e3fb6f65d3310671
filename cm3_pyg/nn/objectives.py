r"""Ranking objectives: modules from the scores of positives and negatives to a loss.

An objective is any module called as ``objective(pos_scores, neg_scores, batch)``, with
``pos_scores`` ``[B]`` for a batch's (user, positive item) pairs, ``neg_scores`` ``[B]`` or
``[B, K]`` for ``K`` sampled negatives per positive, and ``batch`` the
``(users, pos_items, neg_items)`` ids (objectives with per-pair parameters, NBPO's flip
model, read them; the others ignore it). Every objective sums over the ``B K``
(positive, negative) pairs, a positive's own term counted once per negative, and divides by
``B K`` for ``reduction="mean"`` (the default) or not for ``"sum"``.

Models pair with one by name through :func:`make_objective`:

* ``bpr``: Bayesian personalised ranking (pairwise).
* ``bpo``: the point-wise likelihood with every unvoted item a clean negative.
* ``nbpo``: noisy-label robust BPO (Yu & Qin, SIGIR 2020) in the form the paper reports:
  the surrogate likelihood with surrogate gradients, and a flip model
  :math:`\gamma_{ui} = P_u^\top Q_i` with its own factors.
* ``nbpo_original``: the original NBPO log-likelihood with the same flip model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from cm3_pyg.checks import check_choice, check_int, check_number, check_tensor
from cm3_pyg.nn.losses import bpr_loss
from cm3_pyg.nn.rows import RowTable

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def _pairs(pos_scores: Tensor, neg_scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(pos [B, K], neg [B, K])``: each positive's score beside each of its negatives."""
    check_tensor(pos_scores, "objective: pos_scores", floating=True)
    check_tensor(neg_scores, "objective: neg_scores", floating=True)
    if pos_scores.dim() != 1:
        raise ValueError(f"pos_scores must be 1-D [B], got shape {list(pos_scores.shape)}")
    if neg_scores.dim() == 1:
        neg_scores = neg_scores.unsqueeze(-1)
    if neg_scores.dim() != 2 or neg_scores.size(0) != pos_scores.size(0):
        raise ValueError(
            f"neg_scores must be [B] or [B, K] with B = {pos_scores.size(0)}, "
            f"got shape {list(neg_scores.shape)}"
        )
    return pos_scores.unsqueeze(-1).expand_as(neg_scores), neg_scores


def _reduce(per_pair: Tensor, reduction: str) -> Tensor:
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


class BPRLoss(torch.nn.Module):
    r"""Bayesian personalised ranking (Rendle et al., 2009).

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{(u, i, j)} \log \sigma(s_{ui} - s_{uj})

    over the ``N`` (user, positive, negative) triples of a batch (no ``1/N`` with
    ``reduction="sum"``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, pos_scores: Tensor, neg_scores: Tensor, batch: Any = None) -> Tensor:
        if self.reduction == "mean":
            return bpr_loss(pos_scores, neg_scores)
        pos, neg = _pairs(pos_scores, neg_scores)
        return -F.logsigmoid(pos - neg).sum()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class BPOLoss(torch.nn.Module):
    r"""Point-wise log-likelihood of the observed labels, unvoted items taken as negatives.

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{(u, i, j)}
        \big[\log \sigma(s_{ui}) + \log \sigma(-s_{uj})\big]
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, pos_scores: Tensor, neg_scores: Tensor, batch: Any = None) -> Tensor:
        pos, neg = _pairs(pos_scores, neg_scores)
        return _reduce(-(F.logsigmoid(pos) + F.logsigmoid(-neg)), self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class FlipModel(torch.nn.Module):
    r"""NBPO's label-flip model: :math:`\gamma_{ui} = P_u^\top Q_i`,
    :math:`\rho_{ui} = \sigma(\gamma_{ui})` = P(an unvoted (u, i) is a true positive).

    Its own low-rank factors, initialised as the NBPO code does
    (:math:`P \sim 5\,U[0, 1)/\sqrt{d}`, :math:`Q \sim -5\,U[0, 1)/\sqrt{d}`, so the initial
    :math:`\gamma \approx -6` and :math:`\rho \approx 0`). Ranking never reads it.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        dim: ``d`` (the paper's :math:`K_1 = 50`).
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 50) -> None:
        super().__init__()
        num_users = check_int(num_users, "FlipModel: num_users", minimum=1)
        num_items = check_int(num_items, "FlipModel: num_items", minimum=1)
        self.dim = check_int(dim, "FlipModel: dim", minimum=1)
        self.user_factors = Parameter(torch.empty(num_users, self.dim))
        self.item_factors = Parameter(torch.empty(num_items, self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = 5.0 / math.sqrt(self.dim)
        with torch.no_grad():
            self.user_factors.uniform_(0.0, 1.0).mul_(scale)
            self.item_factors.uniform_(0.0, 1.0).mul_(-scale)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``gamma`` of ``items`` (``[B]`` or ``[B, K]``) for the ``[B]`` ``users``."""
        for name, ids, table in (
            ("users", users, self.user_factors),
            ("items", items, self.item_factors),
        ):
            check_tensor(ids, f"flip model: {name}", integer=True)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.size(0)):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise ValueError(
                    f"flip model: {name} id {bad} is out of range [0, {table.size(0)})"
                )
        p = self.user_factors.index_select(0, users)
        q = self.item_factors.index_select(0, items.reshape(-1)).view(*items.shape, self.dim)
        if items.dim() == 2:
            p = p.unsqueeze(1)
        return (p * q).sum(-1)

    def row_tables(self) -> list[RowTable]:
        """The factor tables, one row per user and per item."""
        return [RowTable("user_factors", "user"), RowTable("item_factors", "item")]

    def extra_repr(self) -> str:
        return (
            f"num_users={self.user_factors.size(0)}, num_items={self.item_factors.size(0)}, "
            f"dim={self.dim}"
        )


class NBPOLoss(torch.nn.Module):
    r"""Noisy-label robust point-wise objective (Yu & Qin, SIGIR 2020).

    With the model's score :math:`x` and the flip model's :math:`\gamma`, the observed
    labels have :math:`P(y = 1) = \sigma(x)(1 - \rho)` and
    :math:`P(y = 0) = \sigma(-x) + \sigma(x)\rho`, :math:`\rho = \sigma(\gamma)`; positives
    are taken as clean.

    ``form="surrogate"`` (the reported NBPO): the likelihood without logs, differentiated
    with each sigmoid factor's derivative replaced by that of its log; as an autograd
    objective, with :math:`\mathrm{sg}` the stop-gradient, it maximises

    .. math::
        J^+ = \mathrm{sg}(\sigma(-\gamma_{ui})) \log\sigma(x_{ui})
              + \mathrm{sg}(\sigma(x_{ui})) \log\sigma(-\gamma_{ui}), \\
        J^- = \log\sigma(-x_{uj}) + \mathrm{sg}(\sigma(\gamma_{uj})) \log\sigma(x_{uj})
              + \mathrm{sg}(\sigma(x_{uj})) \log\sigma(\gamma_{uj}),

    ``form="original"``: the log-likelihood itself,
    :math:`J^+ = \log\sigma(x_{ui}) + \log\sigma(-\gamma_{ui})`,
    :math:`J^- = \log[\sigma(-x_{uj}) + \sigma(x_{uj})\sigma(\gamma_{uj})]`.
    The loss is :math:`-(J^+ + J^-)` per (positive, negative) pair, summed or averaged.
    The flip model's L2 weight is :attr:`weight_decay`, applied by the trainer's optimiser
    to :attr:`flip`'s parameters (its own parameter group).

    Args:
        num_users: ``U``.
        num_items: ``I``.
        flip_dim: the flip model's factor size.
        flip_weight_decay: :math:`\lambda_\phi`, the L2 weight of the flip factors.
        form: ``"surrogate"`` or ``"original"``.
        reduction: ``"mean"`` or ``"sum"``.
    """

    FORMS = ("surrogate", "original")

    def __init__(
        self,
        num_users: int,
        num_items: int,
        flip_dim: int = 50,
        flip_weight_decay: float = 5.0,
        form: str = "surrogate",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.form = check_choice(form, "NBPOLoss: form", self.FORMS)
        self.reduction = _check_reduction(reduction)
        self.weight_decay = check_number(
            flip_weight_decay, "NBPOLoss: flip_weight_decay", minimum=0
        )
        self.flip = FlipModel(num_users, num_items, flip_dim)

    def forward(self, pos_scores: Tensor, neg_scores: Tensor, batch: Any) -> Tensor:
        if batch is None:
            raise ValueError("NBPO reads the batch's (users, pos_items, neg_items) ids")
        x_pos, x_neg = _pairs(pos_scores, neg_scores)
        neg_items = batch.neg_items if batch.neg_items.dim() == 2 else batch.neg_items[:, None]
        g_pos = self.flip(batch.users, batch.pos_items).unsqueeze(-1).expand_as(x_pos)
        g_neg = self.flip(batch.users, neg_items)
        if self.form == "surrogate":
            j_pos = torch.sigmoid(-g_pos).detach() * F.logsigmoid(x_pos) + torch.sigmoid(
                x_pos
            ).detach() * F.logsigmoid(-g_pos)
            j_neg = (
                F.logsigmoid(-x_neg)
                + torch.sigmoid(g_neg).detach() * F.logsigmoid(x_neg)
                + torch.sigmoid(x_neg).detach() * F.logsigmoid(g_neg)
            )
        else:
            j_pos = F.logsigmoid(x_pos) + F.logsigmoid(-g_pos)
            # log[sigma(-x) + sigma(x) sigma(g)], both terms in log space
            j_neg = torch.logaddexp(F.logsigmoid(-x_neg), F.logsigmoid(x_neg) + F.logsigmoid(g_neg))
        return _reduce(-(j_pos + j_neg), self.reduction)

    def extra_repr(self) -> str:
        return (
            f"form={self.form!r}, reduction={self.reduction!r}, "
            f"flip_weight_decay={self.weight_decay}"
        )


def _nbpo_original(**options: Any) -> NBPOLoss:
    return NBPOLoss(**options, form="original")


#: Objective name -> factory. :func:`make_objective` passes each factory the options its
#: signature names.
OBJECTIVES: dict[str, Callable[..., torch.nn.Module]] = {
    "bpr": BPRLoss,
    "bpo": BPOLoss,
    "nbpo": NBPOLoss,
    "nbpo_original": _nbpo_original,
}


def objective_names() -> list[str]:
    """The registered objective names."""
    return sorted(OBJECTIVES)


def make_objective(name: str, **options: Any) -> torch.nn.Module:
    """The objective registered as ``name``, given those of ``options`` it takes.

    ``options`` may hold ``num_users``, ``num_items``, ``reduction``, ``flip_dim`` and
    ``flip_weight_decay``; each objective takes the ones its constructor names.

    Raises:
        ValueError: an unknown name or a bad option value.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {objective_names()}")
    factory = OBJECTIVES[name]
    target = NBPOLoss if factory is _nbpo_original else factory
    accepted = set(inspect.signature(target).parameters) - {"form"}
    return factory(**{k: v for k, v in options.items() if k in accepted})
