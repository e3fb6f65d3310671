"""Tests of cm3_pyg.metrics: MMRec ranking metrics and the batched full-ranking evaluator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from cm3_pyg.errors import ConfigError, DataFormatError
from cm3_pyg.metrics import (
    METRIC_NAMES,
    FullRankingEvaluator,
    PerUserMetrics,
    RankingSums,
    popularity_scores,
    ranking_metric_sums,
    ranking_metrics,
)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def reference_metrics(
    scores: list[list[float]],
    exclude: set[tuple[int, int]],
    target: set[tuple[int, int]],
    ks: list[int],
) -> dict[str, float]:
    """Independent loop/set implementation of MMRec's four metrics and per-user F1.

    Excluded items are removed from the candidate list, so a top-k list may be shorter
    than k when a user has fewer unmasked items (they can then never be hits).
    """
    totals = {f"{m}@{k}": 0.0 for m in METRIC_NAMES for k in ks}
    counted = 0
    for u, row in enumerate(scores):
        relevant = {i for (v, i) in target if v == u}
        if not relevant:
            continue
        counted += 1
        candidates = [i for i in range(len(row)) if (u, i) not in exclude]
        ranking = sorted(candidates, key=lambda i, row=row: -row[i])
        for k in ks:
            top = ranking[:k]
            rel = [1 if i in relevant else 0 for i in top]
            hits = sum(rel)
            totals[f"recall@{k}"] += hits / len(relevant)
            totals[f"precision@{k}"] += hits / k
            dcg = sum(r / math.log2(pos + 2) for pos, r in enumerate(rel))
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(len(relevant), k)))
            totals[f"ndcg@{k}"] += dcg / idcg
            ap = 0.0
            seen = 0
            for pos, r in enumerate(rel):
                if r:
                    seen += 1
                    ap += seen / (pos + 1)
            totals[f"map@{k}"] += ap / min(len(relevant), k)
            recall, precision = hits / len(relevant), hits / k
            if hits:
                totals[f"f1@{k}"] += 2 * precision * recall / (precision + recall)
    assert counted > 0
    return {key: value / counted for key, value in totals.items()}


def random_pairs(gen: torch.Generator, num_users: int, num_items: int, p: float) -> Tensor:
    """Each (user, item) pair independently with probability ``p``, as [2, E]."""
    mask = torch.rand(num_users, num_items, generator=gen) < p
    return mask.nonzero().t().contiguous()


def pairs_to_set(index: Tensor) -> set[tuple[int, int]]:
    return {(int(u), int(i)) for u, i in index.t().tolist()}


def assert_close(got: dict[str, float], expected: dict[str, float], tol: float = 1e-6) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tol), key


# ----------------------------------------------------------------------------------------
# (a) brute force reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_users, num_items = 17, 23
    ks = [1, 2, 5, 7, 12]
    scores = torch.randn(num_users, num_items, generator=gen, dtype=torch.float64)
    # dense exclusion for some users so that fewer than max(ks) items stay unmasked
    exclude = random_pairs(gen, num_users, num_items, 0.3 if seed % 2 else 0.7)
    target = random_pairs(gen, num_users, num_items, 0.15)
    # duplicate some target pairs: they must count once
    target = torch.cat([target, target[:, :5]], dim=1)
    before = scores.clone()

    got = ranking_metrics(scores, exclude, target, ks)
    expected = reference_metrics(scores.tolist(), pairs_to_set(exclude), pairs_to_set(target), ks)
    assert_close(got, expected)
    assert torch.equal(scores, before)  # input never mutated


def test_no_exclusion_matches_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(9, 30, generator=gen, dtype=torch.float64)
    target = random_pairs(gen, 9, 30, 0.2)
    ks = [3, 10, 30]
    got = ranking_metrics(scores, None, target, ks)
    assert_close(got, reference_metrics(scores.tolist(), set(), pairs_to_set(target), ks))


# ----------------------------------------------------------------------------------------
# (b) hand-worked case
# ----------------------------------------------------------------------------------------
def test_hand_worked_example() -> None:
    # 3 users, 6 items, ks = (1, 2, 3).
    # user 0: scores descend with item id; item 0 excluded; targets {1, 3, 5} (1 duplicated)
    #   ranking 1,2,3,4,5 -> top3 = [1, 2, 3], rel = [1, 0, 1], |T| = 3
    #   k=1: R=1/3 P=1   NDCG=1/1 = 1                                MAP=1/1 = 1
    #   k=2: R=1/3 P=1/2 NDCG=1/(1+1/log2 3) = 0.613147              MAP=1/2
    #   k=3: R=2/3 P=2/3 NDCG=(1+1/2)/(1+1/log2 3+1/2) = 0.703918    MAP=(1+2/3)/3 = 5/9
    # user 1: scores ascend with item id; item 5 excluded; targets {3, 5} (5 is excluded
    #   but still counts in |T| = 2). ranking 4,3,2,1,0 -> top3 = [4, 3, 2], rel = [0, 1, 0]
    #   k=1: all 0
    #   k=2: R=1/2 P=1/2 NDCG=(1/log2 3)/(1+1/log2 3) = 0.386853     MAP=(1/2)/2 = 1/4
    #   k=3: R=1/2 P=1/3 NDCG=0.386853 (IDCG over min(2,3)=2 ranks)  MAP=(1/2)/2 = 1/4
    # user 2: no target -> ignored. Averages over users 0 and 1:
    #   recall    1/6, 5/12, 7/12      precision 1/2, 1/2, 1/2
    #   ndcg      1/2, 1/2 (the two terms sum to 1), (0.703918 + 0.386853)/2 = 0.545386
    #   map       1/2, 3/8, (5/9 + 1/4)/2 = 29/72
    #   f1 = 2PR/(P+R), 0 without a hit: user 0 1/2, 2/5, 2/3; user 1 0, 1/2, 2/5
    #             1/4, 9/20, 8/15
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.3, 0.1, 0.2, 0.6, 0.5, 0.4],
        ]
    )
    exclude = torch.tensor([[0, 1, 2], [0, 5, 3]])
    target = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 3, 5, 1, 3, 5]])
    got = ranking_metrics(scores, exclude, target, ks=(1, 2, 3))
    inv = 1 / math.log2(3)
    expected = {
        "recall@1": 1 / 6, "recall@2": 5 / 12, "recall@3": 7 / 12,
        "precision@1": 1 / 2, "precision@2": 1 / 2, "precision@3": 1 / 2,
        "ndcg@1": 1 / 2, "ndcg@2": 1 / 2,
        "ndcg@3": (1.5 / (1 + inv + 0.5) + inv / (1 + inv)) / 2,
        "map@1": 1 / 2, "map@2": 3 / 8, "map@3": 29 / 72,
        "f1@1": 1 / 4, "f1@2": 9 / 20, "f1@3": 8 / 15,
    }  # fmt: skip
    assert_close(got, expected)
    assert got["ndcg@3"] == pytest.approx(0.545386, abs=1e-6)

    sums = ranking_metric_sums(scores, exclude, target, ks=(3, 1, 2, 2))
    assert isinstance(sums, RankingSums)
    assert sums.ks == (1, 2, 3)
    assert sums.sums.shape == (5, 3) and sums.sums.dtype == torch.float64
    assert int(sums.num_users) == 2
    assert_close(sums.averages(), expected)


# ----------------------------------------------------------------------------------------
# (c) cross-check with torch_geometric.metrics
# ----------------------------------------------------------------------------------------
# Where the definitions agree (read from torch_geometric/metrics/link_pred.py, PyG 2.8.1):
#  * Recall@k = hits / label_count and Precision@k = hits / k: identical to MMRec as long
#    as target pairs are unique (PyG counts duplicate pairs in label_count, we dedupe).
#  * NDCG@k: PyG's IDCG is cumsum(1/log2(r+1))[min(label_count, k)], i.e. MMRec's IDCG.
#  * MAP@k: PyG divides sum_r P@r * rel_r by label_count.clamp(max=k) = min(|T_u|, k),
#    which is exactly MMRec's MAP (it does *not* differ).
#  * Users are averaged over label_count > 0 in both.
# Exclusion is outside PyG's scope: it receives a ready top-k list. Passing the top-k
# *after* masking and the full target set (excluded targets included, still counted in
# |T_u|) reproduces MMRec, provided every user keeps >= max(k) unmasked items (otherwise
# masked items fill the list and PyG would count an excluded target there as a hit).
# Differences: duplicate targets (shown below), and PyG works in float32.
def _pyg_metrics(top_index: Tensor, target: Tensor, ks: list[int]) -> dict[str, float]:
    from torch_geometric.metrics import LinkPredMAP, LinkPredNDCG, LinkPredPrecision, LinkPredRecall

    out: dict[str, float] = {}
    for name, cls in [
        ("recall", LinkPredRecall),
        ("ndcg", LinkPredNDCG),
        ("precision", LinkPredPrecision),
        ("map", LinkPredMAP),
    ]:
        for k in ks:
            metric = cls(k=k)
            metric.update(top_index, target)
            out[f"{name}@{k}"] = float(metric.compute())
    return out


@pytest.mark.parametrize("with_exclusion", [False, True])
def test_agrees_with_torch_geometric(with_exclusion: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    num_users, num_items, ks = 25, 60, [1, 5, 10, 20]
    scores = torch.randn(num_users, num_items, generator=gen)
    target = random_pairs(gen, num_users, num_items, 0.1)
    exclude = random_pairs(gen, num_users, num_items, 0.3) if with_exclusion else None
    masked = scores.clone()
    if exclude is not None:
        masked[exclude[0], exclude[1]] = -math.inf
        assert bool(((masked > -math.inf).sum(1) >= max(ks)).all())
    top_index = masked.topk(max(ks), dim=1).indices
    ours = ranking_metrics(scores, exclude, target, ks)
    pyg = _pyg_metrics(top_index, target, ks)
    assert_close({k: ours[k] for k in pyg}, pyg, tol=1e-5)


def test_duplicate_targets_differ_from_torch_geometric() -> None:
    # one user whose single relevant item 0 is listed twice and ranked first:
    # MMRec/ours count it once (recall@1 = 1); PyG's label_count is 2 (recall@1 = 1/2).
    scores = torch.tensor([[1.0, 0.0, -1.0]])
    target = torch.tensor([[0, 0], [0, 0]])
    assert ranking_metrics(scores, None, target, ks=[1])["recall@1"] == 1.0
    pyg = _pyg_metrics(scores.topk(1).indices, target, [1])
    assert pyg["recall@1"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------
# (d) the batched evaluator
# ----------------------------------------------------------------------------------------
def _evaluator_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    num_users, num_items, dim = 13, 40, 8
    user_emb = torch.randn(num_users, dim, generator=gen, dtype=torch.float64)
    item_emb = torch.randn(num_items, dim, generator=gen, dtype=torch.float64)
    train = random_pairs(gen, num_users, num_items, 0.25)
    target = random_pairs(gen, num_users, num_items, 0.1)
    # users 0, 4, 7 have no target; shuffle so that nothing relies on sorted input
    keep = ~torch.isin(target[0], torch.tensor([0, 4, 7]))
    target = target[:, keep]
    target = target[:, torch.randperm(target.size(1), generator=gen)]
    train = train[:, torch.randperm(train.size(1), generator=gen)]
    return user_emb, item_emb, train, target, num_items


@pytest.mark.parametrize("batch_size", [1, 3, 13, 4096])
def test_evaluator_matches_single_batch(batch_size: int) -> None:
    user_emb, item_emb, train, target, num_items = _evaluator_data()
    ks = (1, 5, 10, 20)
    expected = ranking_metrics(user_emb @ item_emb.t(), train, target, ks)
    evaluator = FullRankingEvaluator(num_items, train, target, ks=ks, batch_size=batch_size)
    assert evaluator.num_eval_users == int(torch.unique(target[0]).numel())
    assert not bool(torch.isin(evaluator.eval_users, torch.tensor([0, 4, 7])).any())
    assert_close(evaluator.evaluate(user_emb, item_emb), expected, tol=1e-9)
    # evaluate twice gives the same result (no state leaks between calls)
    assert_close(evaluator.evaluate(user_emb, item_emb), expected, tol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_evaluator_batches_with_repeated_and_excluded_targets_match_bruteforce(seed: int) -> None:
    """The batches share one score buffer and one target-mask buffer: a mark left behind by
    one batch, a repeated target pair or a target that is also a training pair must not
    change any later batch's metrics (checked against the loop reference)."""
    user_emb, item_emb, train, target, num_items = _evaluator_data(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    train_users = torch.isin(train[0], torch.unique(target[0]))
    overlap = train[:, train_users][:, :6]  # training pairs of evaluated users, also targets
    repeated = target[:, torch.randint(target.size(1), (8,), generator=gen)]
    target = torch.cat([target, overlap, repeated], dim=1)
    ks = (1, 5, 10, 20)
    expected = reference_metrics(
        (user_emb @ item_emb.t()).tolist(), pairs_to_set(train), pairs_to_set(target), list(ks)
    )
    for batch_size in (1, 2, 5):
        evaluator = FullRankingEvaluator(num_items, train, target, ks=ks, batch_size=batch_size)
        assert_close(evaluator.evaluate(user_emb, item_emb), expected, tol=1e-9)
        per_user = evaluator.evaluate_per_user(user_emb, item_emb)
        assert_close(per_user.averages(), expected, tol=1e-9)


def test_evaluator_rejects_mixed_dtypes() -> None:
    user_emb, item_emb, train, target, num_items = _evaluator_data()
    evaluator = FullRankingEvaluator(num_items, train, target, ks=(5,))
    with pytest.raises(ValueError, match="share dtype and device"):
        evaluator.evaluate(user_emb.float(), item_emb)


@pytest.mark.parametrize("batch_size", [1, 3, 4096])
def test_per_user_metrics_match_the_reference_user_by_user(batch_size: int) -> None:
    user_emb, item_emb, train, target, num_items = _evaluator_data(2)
    ks = (1, 5, 10)
    evaluator = FullRankingEvaluator(num_items, train, target, ks=ks, batch_size=batch_size)
    got = evaluator.evaluate_per_user(user_emb, item_emb)
    assert isinstance(got, PerUserMetrics)
    assert torch.equal(got.users, torch.unique(target[0]))
    assert list(got.values) == list(evaluator.evaluate(user_emb, item_emb))
    scores = (user_emb @ item_emb.t()).tolist()
    exclude, targets = pairs_to_set(train), pairs_to_set(target)
    for row, user in enumerate(got.users.tolist()):
        # the reference on this user alone: its mean is the user's own value
        alone = reference_metrics(
            [scores[user]],
            {(0, i) for (u, i) in exclude if u == user},
            {(0, i) for (u, i) in targets if u == user},
            list(ks),
        )
        for key, value in alone.items():
            assert math.isclose(float(got.values[key][row]), value, rel_tol=1e-12, abs_tol=1e-12)
    # their mean is what evaluate reports
    assert_close(got.averages(), evaluator.evaluate(user_emb, item_emb), tol=1e-12)
    with pytest.raises(ValueError, match="must share d"):
        evaluator.evaluate_per_user(user_emb[:, :3], item_emb)


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_evaluate_scores_popularity(batch_size: int) -> None:
    _, _, train, target, num_items = _evaluator_data(1)
    pop = popularity_scores(train, num_items)
    assert pop.shape == (num_items,) and pop.dtype == torch.float32
    assert torch.equal(pop, torch.bincount(train[1], minlength=num_items).float())
    # break ties deterministically so batched and full top-k orders coincide
    pop = pop + torch.arange(num_items) * 1e-3
    before = pop.clone()
    num_users = int(target[0].max()) + 1
    expected = ranking_metrics(
        pop.expand(num_users, -1), train[:, train[0] < num_users], target, (5, 10)
    )
    evaluator = FullRankingEvaluator(num_items, train, target, ks=(5, 10), batch_size=batch_size)
    got = evaluator.evaluate_scores(lambda users: pop.expand(len(users), -1))
    assert_close(got, expected, tol=1e-6)
    assert torch.equal(pop, before)


def test_requires_grad_scores() -> None:
    scores = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([[0, 1], [2, 3]])
    out = ranking_metrics(scores, torch.tensor([[0], [1]]), target, ks=(2,))
    assert set(out) == {f"{m}@2" for m in METRIC_NAMES}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluator_on_cuda() -> None:
    user_emb, item_emb, train, target, num_items = _evaluator_data(2)
    expected = ranking_metrics(user_emb @ item_emb.t(), train, target, (5, 10))
    evaluator = FullRankingEvaluator(num_items, train, target, ks=(5, 10), batch_size=4)
    got = evaluator.evaluate(user_emb.cuda(), item_emb.cuda())
    assert evaluator.device.type == "cuda"
    assert_close(got, expected, tol=1e-9)
    scores = (user_emb @ item_emb.t()).cuda()
    assert_close(ranking_metrics(scores, train.cuda(), target.cuda(), (5, 10)), expected)


# ----------------------------------------------------------------------------------------
# (e) bad inputs
# ----------------------------------------------------------------------------------------
def test_bad_inputs() -> None:
    scores = torch.randn(3, 5)
    target = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match=r"max\(ks\) = 6 .* number of items \(5\)"):
        ranking_metrics(scores, None, target, ks=(1, 6))
    with pytest.raises(ConfigError, match="positive int"):
        ranking_metrics(scores, None, target, ks=(0, 2))
    with pytest.raises(ConfigError, match="at least one"):
        ranking_metrics(scores, None, target, ks=())
    with pytest.raises(DataFormatError, match=r"target_index\[1\] \(item id\).*\[0, 5\)"):
        ranking_metrics(scores, None, torch.tensor([[0], [5]]), ks=(1,))
    with pytest.raises(DataFormatError, match=r"target_index\[0\] \(local user\).*\[0, 3\)"):
        ranking_metrics(scores, None, torch.tensor([[3], [0]]), ks=(1,))
    with pytest.raises(DataFormatError, match=r"exclude_index\[1\]"):
        ranking_metrics(scores, torch.tensor([[0], [-1]]), target, ks=(1,))
    with pytest.raises(DataFormatError, match=r"shape \[2, E\]"):
        ranking_metrics(scores, None, torch.tensor([0, 1]), ks=(1,))
    with pytest.raises(DataFormatError, match="integer"):
        ranking_metrics(scores, None, target.float(), ks=(1,))
    with pytest.raises(ValueError, match=r"\[B, I\]"):
        ranking_metrics(torch.randn(5), None, target, ks=(1,))
    with pytest.raises(ValueError, match="no user has a target"):
        ranking_metrics(scores, None, torch.zeros(2, 0, dtype=torch.long), ks=(1,))
    # all config/data errors are ValueErrors too
    assert issubclass(ConfigError, ValueError) and issubclass(DataFormatError, ValueError)


def test_evaluator_bad_inputs() -> None:
    train = torch.tensor([[0, 1], [0, 1]])
    target = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ConfigError, match="max"):
        FullRankingEvaluator(4, train, target, ks=(5,))
    with pytest.raises(DataFormatError, match=r"train_edge_index\[1\]"):
        FullRankingEvaluator(4, torch.tensor([[0], [4]]), target, ks=(2,))
    with pytest.raises(DataFormatError, match=r"target_edge_index\[0\]"):
        FullRankingEvaluator(4, train, torch.tensor([[-1], [0]]), ks=(2,))
    with pytest.raises(DataFormatError, match="empty"):
        FullRankingEvaluator(4, train, torch.zeros(2, 0, dtype=torch.long), ks=(2,))
    with pytest.raises(ConfigError, match="batch_size"):
        FullRankingEvaluator(4, train, target, ks=(2,), batch_size=0)
    evaluator = FullRankingEvaluator(4, train, target, ks=(2,))
    with pytest.raises(ValueError, match="item_emb has 3 rows"):
        evaluator.evaluate(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="user id 1"):
        evaluator.evaluate(torch.randn(1, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        evaluator.evaluate_scores(lambda users: torch.zeros(len(users), 3))
    with pytest.raises(DataFormatError, match="item id"):
        popularity_scores(torch.tensor([[0], [9]]), 4)
