"""Cold-start items: hold-out, the report's baselines, training and loading with cold items."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cm3_pyg.data.coldstart import cold_edges, hold_out_cold_items
from cm3_pyg.data.hetero import RATES, SPLIT_ATTRS
from cm3_pyg.data.synthetic import make_synthetic
from cm3_pyg.errors import ConfigError
from cm3_pyg.models import get_model_class
from cm3_pyg.training import load_config
from cm3_pyg.training.coldstart import _random_expectation, cold_start_report, feature_profiles
from cm3_pyg.training.experiment import run_experiment
from cm3_pyg.training.loading import load_run


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=300, num_items=200, seed=3)


def test_hold_out_moves_every_interaction_of_the_cold_items(data):
    out = hold_out_cold_items(data, 0.1, seed=7)
    edges, cold = cold_edges(out)
    assert cold.numel() == round(0.1 * torch.unique(data[RATES].edge_index[1]).numel())
    before = set()
    for attr in SPLIT_ATTRS.values():
        before |= {tuple(e) for e in data[RATES][attr].t().tolist()}
    after = set()
    for attr in SPLIT_ATTRS.values():
        split = out[RATES][attr]
        assert not torch.isin(split[1], cold).any()
        after |= {tuple(e) for e in split.t().tolist()}
    held = {tuple(e) for e in edges.t().tolist()}
    assert held == {e for e in before if e[1] in set(cold.tolist())}
    assert after | held == before and not after & held
    assert torch.equal(out["item", "rated_by", "user"].edge_index, out[RATES].edge_index.flip(0))
    again, _ = cold_edges(hold_out_cold_items(data, 0.1, seed=7))
    assert torch.equal(again, edges)  # seeded
    for bad in (0.0, 1.0, -0.2, True):
        with pytest.raises(ConfigError, match="cold_items"):
            hold_out_cold_items(data, bad, seed=7)


def test_random_expectation_matches_enumerating_every_ranking():
    num_cold, k = 4, 2
    for targets in ({0}, {1, 3}, {0, 1, 2}):
        recalls, ndcgs = [], []
        for ranking in itertools.permutations(range(num_cold)):
            top = ranking[:k]
            hits = [1.0 / math.log2(r + 2) for r, item in enumerate(top) if item in targets]
            ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(targets))))
            recalls.append(sum(item in targets for item in top) / len(targets))
            ndcgs.append(sum(hits) / ideal)
        got = _random_expectation(torch.tensor([len(targets)]), num_cold, [k])
        assert got["recall@2"] == pytest.approx(sum(recalls) / len(recalls))
        assert got["ndcg@2"] == pytest.approx(sum(ndcgs) / len(ndcgs))


def test_feature_knn_baseline_matches_a_direct_computation(data):
    out = hold_out_cold_items(data, 0.1, seed=1)
    train = out[RATES].edge_index
    users, items = feature_profiles(out, ["image", "text"], train)
    u = 5
    mine = train[1, train[0] == u].tolist()
    expected = torch.zeros(items.size(1), dtype=torch.double)
    for i in mine:
        parts = [out["item"][f"x_{m}"][i].double() for m in ("image", "text")]
        expected += torch.cat([p / p.norm() for p in parts]) / math.sqrt(2)
    torch.testing.assert_close(users[u], expected / len(mine))
    assert torch.allclose(items.norm(dim=1), torch.ones(items.size(0), dtype=torch.double))


def test_report_ranks_only_the_cold_items(data):
    out = hold_out_cold_items(data, 0.2, seed=2)
    edges, cold = cold_edges(out)
    gen = torch.Generator().manual_seed(0)
    user_emb = torch.randn(300, 8, generator=gen)
    item_emb = torch.randn(200, 8, generator=gen)
    report = cold_start_report(out, user_emb, item_emb, ["image"], ks=(10,))
    # brute force: per user, the cold items by score
    recalls = []
    for user in torch.unique(edges[0]).tolist():
        scores = {int(i): float(user_emb[user] @ item_emb[i]) for i in cold}
        top = sorted(scores, key=lambda i: -scores[i])[:10]
        targets = set(edges[1, edges[0] == user].tolist())
        recalls.append(len(targets & set(top)) / len(targets))
    assert report["model"]["recall@10"] == pytest.approx(sum(recalls) / len(recalls))
    assert report["items"] == cold.numel() and report["interactions"] == edges.size(1)
    assert report["random"]["recall@10"] == pytest.approx(10 / cold.numel())


def test_training_with_cold_items_reports_them_and_loads_back(data, tmp_path):
    cls = get_model_class("cm3")
    config = load_config(cls.default_config(), None, {"cold_items": 0.3, "epochs": 4, "seed": 5})
    metrics = run_experiment(data, "cm3", config, tmp_path / "run", progress=False)
    cold = metrics["cold"]
    # the synthetic features carry the preference signal: far above a random ranking
    assert cold["model"]["recall@20"] > 1.5 * cold["random"]["recall@20"]
    assert cold["feature_knn"]["recall@20"] > cold["random"]["recall@20"]
    run = load_run(tmp_path / "run", data=data)  # the same hold-out is applied again
    assert not torch.isin(
        run.splits.train[1], cold_edges(hold_out_cold_items(data, 0.3, 5))[1]
    ).any()
    lightgcn = load_config(get_model_class("lightgcn").default_config(), None, {"cold_items": 0.1})
    with pytest.raises(ConfigError, match="cannot embed items unseen in training"):
        run_experiment(data, "lightgcn", lightgcn, None, progress=False)
    with pytest.raises(ConfigError, match="cold_items"):
        load_config(cls.default_config(), None, {"cold_items": 1.5})
