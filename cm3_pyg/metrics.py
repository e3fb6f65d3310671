r"""Full-ranking top-k evaluation with MMRec's metric definitions.

Every user is ranked against *all* items; the items the user interacted with in the
training split are masked out of the ranking first. For a user :math:`u` with target set
:math:`T_u` (the validation or test items) and a top-:math:`k` list, let
:math:`\mathrm{rel}_r \in \{0, 1\}` say whether the item at (1-based) rank :math:`r` is in
:math:`T_u` and :math:`H_u(k) = \sum_{r \le k} \mathrm{rel}_r`. Then, exactly as in
MMRec (``utils/metrics.py``):

.. math::

    \mathrm{Recall@}k &= H_u(k) / |T_u| \\
    \mathrm{Precision@}k &= H_u(k) / k \\
    \mathrm{NDCG@}k &= \frac{\sum_{r \le k} \mathrm{rel}_r / \log_2(r + 1)}
                            {\sum_{r \le \min(|T_u|, k)} 1 / \log_2(r + 1)} \\
    \mathrm{MAP@}k &= \frac{\sum_{r \le k} P_u(r)\, \mathrm{rel}_r}{\min(|T_u|, k)},
        \qquad P_u(r) = H_u(r) / r \\
    \mathrm{F1@}k &= \frac{2\,\mathrm{Precision@}k\,\mathrm{Recall@}k}
                          {\mathrm{Precision@}k + \mathrm{Recall@}k}
        \quad (0 \text{ without a hit; NBPO's per-user F1})

and every metric is averaged over the users with :math:`|T_u| \ge 1` (users without a
target are skipped).

Conventions (documented deviations and tie rules):

* A target that is also a training item of the same user still counts in :math:`|T_u|`
  (MMRec behaviour), although it can never be recommended.
* Duplicate ``(user, item)`` target pairs count once.
* Masked (excluded) items are never hits. They only reach the top-:math:`k` list when a
  user has fewer than :math:`k` unmasked items; MMRec would then count an excluded
  target sitting at score :math:`-10^{10}` as a hit, here it is not, so the result does
  not depend on how ties between masked items are ordered.
* Ties between equal scores are ordered however :func:`torch.topk` orders them, which is
  not guaranteed to be stable or identical across devices.
* Sums are accumulated in ``float64``.

This module imports only :mod:`torch`, :mod:`numpy` and :mod:`cm3_pyg.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cm3_pyg.errors import ConfigError, DataFormatError

__all__ = [
    "METRIC_NAMES",
    "PerUserMetrics",
    "RankingSums",
    "ranking_metric_sums",
    "ranking_metrics",
    "FullRankingEvaluator",
    "popularity_scores",
]

#: The metric names, in the row order of :attr:`RankingSums.sums`.
METRIC_NAMES: tuple[str, ...] = ("recall", "ndcg", "precision", "map", "f1")

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------
def _check_ks(ks: Sequence[int], num_items: int) -> tuple[int, ...]:
    """Return ``ks`` as a sorted tuple of distinct positive ints, at most ``num_items``."""
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    values = list(ks)
    if len(values) == 0:
        raise ConfigError("ks must name at least one cut-off k, got an empty sequence")
    out: set[int] = set()
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise ConfigError(f"every k in ks must be a positive int, got {k!r} in {values!r}")
        out.add(int(k))
    max_k = max(out)
    if max_k > num_items:
        raise ConfigError(
            f"max(ks) = {max_k} is larger than the number of items ({num_items}); "
            f"a top-{max_k} list cannot be formed, use smaller ks"
        )
    return tuple(sorted(out))


def _check_edge_index(
    index: Tensor,
    name: str,
    num_rows: int,
    num_cols: int,
    row_name: str,
    device: torch.device | None = None,
) -> Tensor:
    """Validate a ``[2, E]`` integer index with rows in ``[0, num_rows)`` and columns in
    ``[0, num_cols)``; return it as int64 on ``device`` (unchanged device if ``None``)."""
    if not isinstance(index, Tensor):
        raise DataFormatError(f"{name} must be a torch.Tensor of shape [2, E], got {type(index)}")
    if index.dim() != 2 or index.size(0) != 2:
        raise DataFormatError(f"{name} must have shape [2, E], got {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise DataFormatError(f"{name} must hold integer ids, got dtype {index.dtype}")
    index = index.to(dtype=torch.long, device=device)
    if index.numel() > 0:
        lo = index.amin(dim=1).tolist()
        hi = index.amax(dim=1).tolist()
        if lo[0] < 0 or hi[0] >= num_rows:
            raise DataFormatError(
                f"{name}[0] ({row_name}) must lie in [0, {num_rows}), "
                f"got values in [{lo[0]}, {hi[0]}]"
            )
        if lo[1] < 0 or hi[1] >= num_cols:
            raise DataFormatError(
                f"{name}[1] (item id) must lie in [0, {num_cols}), got values in [{lo[1]}, {hi[1]}]"
            )
    return index


def _check_scores(scores: Tensor, check_nan: bool = True) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores)
        raise ValueError(f"scores must be a [B, I] tensor, got {shape}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    if not check_nan:
        return
    nan_rows = torch.isnan(scores).any(dim=1)
    if bool(nan_rows.any()):
        row = int(nan_rows.nonzero()[0])
        raise ValueError(
            f"scores hold NaN (first in row {row}): a NaN cannot be ranked, so the metrics "
            "would be meaningless"
        )


# ----------------------------------------------------------------------------------------
# metric sums
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankingSums:
    """Per-metric sums over users, to be accumulated across batches and averaged once.

    Attributes:
        ks: the sorted distinct cut-offs, length ``K``.
        sums: float64 ``[5, K]``; ``sums[m, j]`` is :math:`\\sum_u \\mathrm{metric}_m@k_j(u)`
            over the counted users, rows ordered as :data:`METRIC_NAMES`.
        num_users: int64 0-dim tensor, the number of users with at least one target.
    """

    ks: tuple[int, ...]
    sums: Tensor
    num_users: Tensor

    def __add__(self, other: RankingSums) -> RankingSums:
        if self.ks != other.ks:
            raise ValueError(f"cannot add RankingSums with ks {self.ks} and {other.ks}")
        return RankingSums(
            self.ks,
            self.sums + other.sums.to(self.sums.device),
            self.num_users + other.num_users.to(self.num_users.device),
        )

    def averages(self) -> dict[str, float]:
        """Average every metric over the counted users.

        Returns:
            ``{"recall@k": ..., "ndcg@k": ..., "precision@k": ..., "map@k": ...,
            "f1@k": ...}`` for
            every ``k`` in :attr:`ks` (metric-major order).

        Raises:
            ValueError: if no user had a target (the averages would be undefined).
        """
        n = int(self.num_users.item())
        if n == 0:
            raise ValueError(
                "no user has a target item: ranking metrics are undefined "
                "(target_index is empty or refers to no user of this batch)"
            )
        avg = (self.sums.double().cpu() / n).tolist()
        return {
            f"{name}@{k}": float(avg[m][j])
            for m, name in enumerate(METRIC_NAMES)
            for j, k in enumerate(self.ks)
        }


@dataclass(frozen=True)
class PerUserMetrics:
    """Metrics of every evaluated user (the terms whose mean :class:`RankingSums` gives).

    Attributes:
        users: int64 ``[N]`` global user ids, sorted, each with at least one target.
        values: ``{"recall@k": float64 [N], ...}`` in the key order of :func:`ranking_metrics`.
    """

    users: Tensor
    values: dict[str, Tensor]

    def averages(self) -> dict[str, float]:
        """The mean of every metric over the users (as :meth:`RankingSums.averages`)."""
        return {key: float(column.mean()) for key, column in self.values.items()}


def _metric_sums_unchecked(
    scores: Tensor,
    exclude_index: Tensor | None,
    target_index: Tensor,
    ks: tuple[int, ...],
    copy: bool,
    target_mask: Tensor | None = None,
) -> RankingSums:
    """Core of :func:`ranking_metric_sums` on already validated inputs (no host sync).

    Shapes: ``scores`` [B, I]; ``exclude_index`` [2, E_x] and ``target_index`` [2, E_t]
    int64 on ``scores.device`` with local user rows. If ``copy`` is ``False`` the masking
    writes into ``scores`` itself (used when the caller owns a freshly computed tensor).
    ``target_mask``: an all-``False`` bool buffer of at least ``[B, I]`` to work in (it is
    all-``False`` again on return), so that batch after batch allocates nothing of
    ``B x I``; ``None`` allocates one.
    """
    per_user, counted = _per_user_unchecked(
        scores, exclude_index, target_index, ks, copy, target_mask
    )
    return RankingSums(ks, per_user.sum(dim=1), counted.sum())


def _per_user_unchecked(
    scores: Tensor,
    exclude_index: Tensor | None,
    target_index: Tensor,
    ks: tuple[int, ...],
    copy: bool,
    target_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(per_user [5, B, K] float64, counted [B] bool)``: every metric of every user of the
    batch (rows as :data:`METRIC_NAMES`; 0 for a user without a target, who is not
    ``counted``). Inputs as :func:`_metric_sums_unchecked`."""
    device = scores.device
    num_users, num_items = scores.shape
    max_k = ks[-1]

    # |T_u| over distinct pairs, incl. excluded targets (MMRec). Counted from the pairs: a
    # row sum of a dense [B, I] bool mask costs more than the score GEMM at Elec scale.
    keys = torch.unique(target_index[0] * num_items + target_index[1])
    num_targets = torch.bincount(keys // num_items, minlength=num_users)  # [B]

    # [B, I] target membership, set and later cleared at the target pairs only.
    if target_mask is None:
        target_mask = torch.zeros(num_users, num_items, dtype=torch.bool, device=device)
    else:
        target_mask = target_mask[:num_users]
    target_mask[target_index[0], target_index[1]] = True
    if exclude_index is not None and exclude_index.numel() > 0:
        masked = scores.clone() if copy else scores
        masked[exclude_index[0], exclude_index[1]] = -math.inf
        # Excluded items never count as hits, even if they fill the top-k (see module doc).
        target_mask[exclude_index[0], exclude_index[1]] = False
    else:
        masked = scores

    top_index = masked.topk(max_k, dim=1, largest=True, sorted=True).indices  # [B, K_max]
    hits = target_mask.gather(1, top_index).to(torch.float64)  # rel_r, [B, K_max]
    target_mask[target_index[0], target_index[1]] = False  # all-False again for the caller

    ranks = torch.arange(1, max_k + 1, dtype=torch.float64, device=device)  # r = 1..K_max
    discount = 1.0 / torch.log2(ranks + 1.0)  # 1 / log2(r + 1)
    cum_hits = hits.cumsum(dim=1)  # H_u(r)
    cum_dcg = (hits * discount).cumsum(dim=1)  # sum_{s<=r} rel_s / log2(s + 1)
    cum_ap = (cum_hits / ranks * hits).cumsum(dim=1)  # sum_{s<=r} P_u(s) rel_s
    idcg_table = torch.cat([discount.new_zeros(1), discount.cumsum(0)])  # [K_max + 1]

    k_long = torch.tensor(ks, dtype=torch.long, device=device)  # [K]
    k_float = k_long.to(torch.float64)
    col = k_long - 1
    h_k = cum_hits[:, col]  # [B, K]
    n_t = num_targets.unsqueeze(1)  # [B, 1]
    ideal = torch.minimum(n_t, k_long.unsqueeze(0))  # min(|T_u|, k), [B, K]
    valid = (num_targets > 0).to(torch.float64).unsqueeze(1)  # [B, 1]
    safe_n = n_t.clamp(min=1).to(torch.float64)
    safe_ideal = ideal.clamp(min=1)

    recall = h_k / safe_n
    ndcg = cum_dcg[:, col] / idcg_table[safe_ideal]
    precision = h_k / k_float
    ap = cum_ap[:, col] / safe_ideal.to(torch.float64)
    # F1 per user, 2PR / (P + R); 0 without a hit (NBPO's definition)
    f1 = torch.where(h_k > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), 0.0)

    per_user = torch.stack([recall, ndcg, precision, ap, f1], dim=0) * valid  # [5, B, K]
    return per_user, num_targets > 0


def ranking_metric_sums(
    scores: Tensor,
    exclude_index: Tensor | None,
    target_index: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> RankingSums:
    r"""Sum Recall/NDCG/Precision/MAP@k over the users of one batch (see module doc).

    Args:
        scores: ``[B, I]`` floating scores of ``B`` users for all ``I`` items (not
            modified; masking happens on a copy).
        exclude_index: ``[2, E_x]`` integer pairs ``(local user 0..B-1, item id)`` to mask
            out of the ranking (the users' training items), or ``None``.
        target_index: ``[2, E_t]`` integer pairs ``(local user, item id)``, the relevant
            items :math:`T_u`.
        ks: cut-offs; deduplicated and sorted, ``max(ks)`` must not exceed ``I``.

    Returns:
        :class:`RankingSums` with float64 ``sums`` ``[4, K]`` and the number of users with
        at least one target. Sums of several batches add up exactly (``a + b``).

    Raises:
        ConfigError: if ``ks`` is empty, non-positive or ``max(ks) > I``.
        DataFormatError: if an index has the wrong shape/dtype or an id out of range.
        ValueError: if ``scores`` is not a floating ``[B, I]`` tensor.
    """
    _check_scores(scores)
    num_users, num_items = scores.shape
    ks_t = _check_ks(ks, num_items)
    device = scores.device
    target = _check_edge_index(
        target_index, "target_index", num_users, num_items, "local user", device
    )
    exclude = None
    if exclude_index is not None:
        exclude = _check_edge_index(
            exclude_index, "exclude_index", num_users, num_items, "local user", device
        )
    with torch.no_grad():
        return _metric_sums_unchecked(scores.detach(), exclude, target, ks_t, copy=True)


def ranking_metrics(
    scores: Tensor,
    exclude_index: Tensor | None,
    target_index: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    r"""Full-ranking Recall/NDCG/Precision/MAP@k averaged over users with a target.

    Args:
        scores: ``[B, I]`` floating scores (not modified).
        exclude_index: ``[2, E_x]`` int ``(local user, item)`` pairs masked to
            :math:`-\infty` before ranking (training items), or ``None``.
        target_index: ``[2, E_t]`` int ``(local user, item)`` relevant pairs.
        ks: cut-offs (default ``(5, 10, 20, 50)``); ``max(ks)`` must not exceed ``I``.

    Returns:
        ``{"recall@k", "ndcg@k", "precision@k", "map@k"}`` for every ``k``, as floats,
        each the mean over the users with :math:`|T_u| \ge 1`.

    Raises:
        ValueError: if no user has a target (plus the errors of
            :func:`ranking_metric_sums`).
    """
    return ranking_metric_sums(scores, exclude_index, target_index, ks).averages()


# ----------------------------------------------------------------------------------------
# batched evaluator
# ----------------------------------------------------------------------------------------
def _group_by_batch(
    index: Tensor, eval_users: Tensor, batch_size: int, num_batches: int
) -> tuple[Tensor, list[int]]:
    """Map ``[2, E]`` (global user, item) pairs of evaluated users to batches.

    Returns the pairs as ``[2, E']`` (local user within its batch, item), sorted by batch,
    and a pointer list of length ``num_batches + 1`` so that batch ``b`` owns columns
    ``ptr[b]:ptr[b + 1]``. Pairs whose user is not evaluated are dropped.
    """
    n = eval_users.numel()
    user, item = index[0], index[1]
    pos = torch.searchsorted(eval_users, user).clamp(max=max(n - 1, 0))
    keep = eval_users[pos] == user if n > 0 else torch.zeros_like(user, dtype=torch.bool)
    pos, item = pos[keep], item[keep]
    batch = pos // batch_size
    order = torch.argsort(batch, stable=True)
    pos, item, batch = pos[order], item[order], batch[order]
    counts = torch.bincount(batch, minlength=num_batches)
    ptr = [0, *torch.cumsum(counts, 0).tolist()]
    local = pos - batch * batch_size
    return torch.stack([local, item], dim=0), ptr


class FullRankingEvaluator:
    r"""Batched full-ranking evaluation of one split (validation or test).

    Only users with at least one target are evaluated. They are split into batches of
    ``batch_size``; for each batch the scores ``[B, I]`` are computed, the batch's training
    items are set to :math:`-\infty`, and the :class:`RankingSums` are accumulated, so the
    result equals :func:`ranking_metrics` over all users at once.

    The local (in-batch) exclude/target indices of every batch are precomputed in
    ``__init__`` with one sort + ``searchsorted`` + ``bincount`` (no per-user loops) and
    moved to the scoring device once.

    Args:
        num_items: number of items ``I``.
        train_edge_index: ``[2, E]`` int (global user id, item id) pairs to mask.
        target_edge_index: ``[2, E']`` int (global user id, item id) pairs of the split.
        ks: cut-offs, ``max(ks) <= I``.
        batch_size: number of users scored at once (memory ``~ batch_size * I``).
    """

    def __init__(
        self,
        num_items: int,
        train_edge_index: Tensor,
        target_edge_index: Tensor,
        ks: Sequence[int] = DEFAULT_KS,
        batch_size: int = 4096,
    ) -> None:
        if (
            isinstance(num_items, bool)
            or not isinstance(num_items, (int, np.integer))
            or num_items < 1
        ):
            raise ConfigError(f"num_items must be a positive int, got {num_items!r}")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.ks = _check_ks(ks, self.num_items)

        cpu = torch.device("cpu")
        big = torch.iinfo(torch.long).max
        train = _check_edge_index(
            train_edge_index, "train_edge_index", big, self.num_items, "user id", cpu
        )
        target = _check_edge_index(
            target_edge_index, "target_edge_index", big, self.num_items, "user id", cpu
        )
        if target.size(1) == 0:
            raise DataFormatError("target_edge_index is empty: there is no user to evaluate")

        #: sorted global ids of the evaluated users (those with >= 1 target), ``[N]``.
        self.eval_users: Tensor = torch.unique(target[0])
        self._max_user = int(self.eval_users[-1])
        n = self.eval_users.numel()
        self.num_batches: int = (n + self.batch_size - 1) // self.batch_size
        self._exclude, self._exclude_ptr = _group_by_batch(
            train, self.eval_users, self.batch_size, self.num_batches
        )
        self._target, self._target_ptr = _group_by_batch(
            target, self.eval_users, self.batch_size, self.num_batches
        )
        self.device: torch.device = cpu

    @property
    def num_eval_users(self) -> int:
        """Number of evaluated users ``N`` (users with at least one target)."""
        return int(self.eval_users.numel())

    def to(self, device: torch.device | str) -> FullRankingEvaluator:
        """Move the precomputed indices to ``device`` (no-op if already there)."""
        device = torch.device(device)
        if device != self.device:
            self.eval_users = self.eval_users.to(device)
            self._exclude = self._exclude.to(device)
            self._target = self._target.to(device)
            self.device = device
        return self

    def _batches(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(global user ids [B], exclude [2, E_x], target [2, E_t])`` per batch."""
        out = []
        for b in range(self.num_batches):
            start = b * self.batch_size
            users = self.eval_users[start : start + self.batch_size]
            exc = self._exclude[:, self._exclude_ptr[b] : self._exclude_ptr[b + 1]]
            tgt = self._target[:, self._target_ptr[b] : self._target_ptr[b + 1]]
            out.append((users, exc, tgt))
        return out

    def _scored_batches(
        self, score_batch: Callable[[Tensor], Tensor], check_nan: bool
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(users, scores, exclude, target)`` per batch, the scores checked."""
        for users, exc, tgt in self._batches():
            scores = score_batch(users)
            expected = (users.numel(), self.num_items)
            if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores)
                raise ValueError(f"scores of a batch must have shape {expected}, got {got}")
            _check_scores(scores, check_nan)
            if scores.device != self.device:
                self.to(scores.device)
                exc = exc.to(scores.device)
                tgt = tgt.to(scores.device)
            yield users, scores.detach(), exc, tgt

    @property
    def _batch_rows(self) -> int:
        """Rows of the largest batch: the height of an evaluation's work buffers."""
        return min(self.batch_size, self.num_eval_users)

    def _target_mask(self, scores: Tensor, mask: Tensor | None) -> Tensor:
        """The all-``False`` ``[batch rows, I]`` bool work buffer of one evaluation: made at
        its first batch, on the scores' device, and reused by every later batch."""
        if mask is None or mask.device != scores.device:
            shape = (self._batch_rows, self.num_items)
            mask = torch.zeros(shape, dtype=torch.bool, device=scores.device)
        return mask

    def _accumulate(
        self, score_batch: Callable[[Tensor], Tensor], copy: bool, check_nan: bool = True
    ) -> RankingSums:
        total: RankingSums | None = None
        mask: Tensor | None = None
        for _, scores, exc, tgt in self._scored_batches(score_batch, check_nan):
            mask = self._target_mask(scores, mask)
            part = _metric_sums_unchecked(scores, exc, tgt, self.ks, copy, mask)
            total = part if total is None else total + part
        assert total is not None  # __init__ guarantees at least one batch
        return total

    def _per_user(
        self, score_batch: Callable[[Tensor], Tensor], copy: bool, check_nan: bool = True
    ) -> PerUserMetrics:
        users, parts = [], []
        mask: Tensor | None = None
        for batch_users, scores, exc, tgt in self._scored_batches(score_batch, check_nan):
            mask = self._target_mask(scores, mask)
            per_user, _ = _per_user_unchecked(scores, exc, tgt, self.ks, copy, mask)
            users.append(batch_users.cpu())
            parts.append(per_user.cpu())
        table = torch.cat(parts, dim=1)  # [5, N, K]; every evaluated user has a target
        values = {
            f"{name}@{k}": table[m, :, j]
            for m, name in enumerate(METRIC_NAMES)
            for j, k in enumerate(self.ks)
        }
        return PerUserMetrics(torch.cat(users), values)

    @torch.no_grad()
    def evaluate(self, user_emb: Tensor, item_emb: Tensor) -> dict[str, float]:
        r"""Evaluate dot-product scores :math:`s_{ui} = \mathbf{e}_u^\top \mathbf{e}_i`.

        Args:
            user_emb: ``[U, d]`` user embeddings (``U`` > every evaluated user id).
            item_emb: ``[I, d]`` item embeddings, on the same device.

        Returns:
            The averaged metrics, keys as in :func:`ranking_metrics`.
        """
        return self.evaluate_sums(user_emb, item_emb).averages()

    @torch.no_grad()
    def evaluate_sums(self, user_emb: Tensor, item_emb: Tensor) -> RankingSums:
        """The :class:`RankingSums` whose averages :meth:`evaluate` returns: sums of
        evaluators over disjoint user sets add up (distributed evaluation does so)."""
        # The scores are this evaluation's own buffer, so masking may write into it
        # (copy=False); finite embeddings were checked, so the per-batch NaN scan is skipped.
        score = self._dot_scorer(user_emb, item_emb)
        return self._accumulate(score, copy=False, check_nan=False)

    @torch.no_grad()
    def evaluate_per_user(self, user_emb: Tensor, item_emb: Tensor) -> PerUserMetrics:
        """Every evaluated user's metrics from dot-product scores (what :meth:`evaluate`
        averages): the input of paired significance tests between models.

        Args:
            user_emb, item_emb: as :meth:`evaluate`.

        Returns:
            :class:`PerUserMetrics` over :attr:`eval_users`, in their sorted order.
        """
        score = self._dot_scorer(user_emb, item_emb)
        return self._per_user(score, copy=False, check_nan=False)

    def _dot_scorer(self, user_emb: Tensor, item_emb: Tensor) -> Callable[[Tensor], Tensor]:
        """``users -> user_emb[users] @ item_emb.T``, written into one ``[batch, I]`` buffer
        that every batch reuses: a fresh ``B x I`` result per batch costs page faults that,
        at Elec scale, take as long as the GEMM itself."""
        item_t = self._check_embeddings(user_emb, item_emb)
        out = item_t.new_empty(self._batch_rows, self.num_items)

        def score(users: Tensor) -> Tensor:
            return torch.mm(user_emb[users], item_t, out=out[: users.numel()])

        return score

    def _check_embeddings(self, user_emb: Tensor, item_emb: Tensor) -> Tensor:
        """The checks of :meth:`evaluate`; returns ``item_emb.t()`` on the evaluator's device."""
        if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.size(1) != item_emb.size(1):
            raise ValueError(
                f"user_emb [U, d] and item_emb [I, d] must share d, got "
                f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
            )
        if item_emb.size(0) != self.num_items:
            raise ValueError(
                f"item_emb has {item_emb.size(0)} rows, the evaluator has {self.num_items} items"
            )
        if user_emb.size(0) <= self._max_user:
            raise ValueError(
                f"user_emb has {user_emb.size(0)} rows but user id {self._max_user} is evaluated"
            )
        if user_emb.dtype != item_emb.dtype or user_emb.device != item_emb.device:
            raise ValueError(
                f"user_emb and item_emb must share dtype and device, got {user_emb.dtype} on "
                f"{user_emb.device} and {item_emb.dtype} on {item_emb.device}"
            )
        for name, table in (("user_emb", user_emb), ("item_emb", item_emb)):
            if not table.dtype.is_floating_point:
                raise ValueError(f"{name} must be floating point, got dtype {table.dtype}")
            bad_rows = ~torch.isfinite(table).all(dim=1)
            if bool(bad_rows.any()):
                raise ValueError(
                    f"{name} holds NaN or infinite values (first in row "
                    f"{int(bad_rows.nonzero()[0])}): the model diverged or was not trained"
                )
        self.to(item_emb.device)
        return item_emb.t()

    @torch.no_grad()
    def evaluate_scores(self, score_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Evaluate an arbitrary scorer.

        Args:
            score_fn: maps a batch of global user ids ``[B]`` (int64, on :attr:`device`,
                see :meth:`to`) to scores ``[B, I]``. Its output is never modified (it may
                be a view, e.g. ``pop.expand(len(users), -1)``).

        Returns:
            The averaged metrics, keys as in :func:`ranking_metrics`.
        """
        return self._accumulate(score_fn, copy=True).averages()


def popularity_scores(train_edge_index: Tensor, num_items: int) -> Tensor:
    """Training interaction count of every item, ``pop[i] = |{u : (u, i) in train}|``.

    Duplicate pairs are counted as often as they occur.

    Args:
        train_edge_index: ``[2, E]`` int (user id, item id) pairs.
        num_items: number of items ``I``.

    Returns:
        float32 ``[I]`` on the device of ``train_edge_index``. A popularity baseline is
        ``score_fn = lambda users: pop.expand(len(users), -1)``.
    """
    big = torch.iinfo(torch.long).max
    index = _check_edge_index(train_edge_index, "train_edge_index", big, num_items, "user id")
    return torch.bincount(index[1], minlength=num_items).to(torch.float32)
