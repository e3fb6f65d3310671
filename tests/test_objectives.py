"""Ranking objectives (BPR, BPO, NBPO in both forms), the flip model, and the training
protocol they need (several negatives, the negative pool, summed losses, SGD, learning-rate
decay, no early stopping, F1@k)."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.nn.models import LightGCN as PyGLightGCN

from cm3_pyg.data import make_synthetic
from cm3_pyg.errors import ConfigError
from cm3_pyg.metrics import ranking_metrics
from cm3_pyg.models import Batch, get_model_class
from cm3_pyg.nn.objectives import BPOLoss, BPRLoss, FlipModel, NBPOLoss, make_objective
from cm3_pyg.training import (
    NegativeSampler,
    Trainer,
    get_splits,
    load_config,
    run_experiment,
)
from tests.model_helpers import a_batch, build

DT = torch.float64


def _scores(b=7, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = (3 * torch.randn(b, generator=gen, dtype=DT)).requires_grad_(True)
    neg = (3 * torch.randn(b, k, generator=gen, dtype=DT)).requires_grad_(True)
    return pos, neg


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=50, num_items=70, seed=11)


# --- values and gradients against independent computations ---------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bpr_and_bpo_match_their_formulas(reduction):
    pos, neg = _scores()
    n = neg.numel()
    scale = 1.0 if reduction == "sum" else 1.0 / n
    want_bpr = -torch.log(_sig(pos[:, None] - neg)).sum() * scale
    want_bpo = -(torch.log(_sig(pos[:, None])) + torch.log(1 - _sig(neg))).sum() * scale
    for module, want in ((BPRLoss(reduction), want_bpr), (BPOLoss(reduction), want_bpo)):
        got = module(pos, neg)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got, (pos, neg))
        g_want = torch.autograd.grad(want, (pos, neg))
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # one negative per positive: [B] and [B, 1] are the same objective
    torch.testing.assert_close(BPRLoss()(pos, neg[:, 0]), BPRLoss()(pos, neg[:, :1]))


def _nbpo(form, reduction="mean", users=7, items=9):
    torch.manual_seed(0)
    loss = NBPOLoss(users, items, flip_dim=4, form=form, reduction=reduction).double()
    with torch.no_grad():  # spread gamma so that both signs and large values occur
        loss.flip.user_factors.normal_(0, 1.5)
        loss.flip.item_factors.normal_(0, 1.5)
    gen = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.arange(users),
        torch.randint(items, (users,), generator=gen),
        torch.randint(items, (users, 3), generator=gen),
    )
    return loss, batch


def test_nbpo_original_is_the_log_likelihood():
    loss, batch = _nbpo("original", reduction="sum")
    pos, neg = _scores()
    got = loss(pos, neg, batch)
    flip = loss.flip
    g_pos = (flip.user_factors[batch.users] * flip.item_factors[batch.pos_items]).sum(-1)
    g_neg = (flip.user_factors[batch.users][:, None] * flip.item_factors[batch.neg_items]).sum(-1)
    rho_pos, rho_neg = _sig(g_pos), _sig(g_neg)
    # P(y=1) = sigma(x)(1 - rho), P(y=0) = 1 - sigma(x) + sigma(x) rho; positives counted
    # once per negative
    p1 = torch.log(_sig(pos) * (1 - rho_pos))[:, None].expand_as(neg)
    p0 = torch.log(1 - _sig(neg) + _sig(neg) * rho_neg)
    want = -(p1 + p0).sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = (pos, neg, flip.user_factors, flip.item_factors)
    for a, b in zip(
        torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_nbpo_surrogate_gradients_by_finite_differences():
    """The reported NBPO: each sigmoid factor of the surrogate likelihood (no logs) is
    differentiated through its log. Checked per factor with central differences of
    ``log sigmoid`` in float64."""
    loss, batch = _nbpo("surrogate")
    pos, neg = _scores(b=7, k=1)
    neg = neg[:, 0].detach().requires_grad_(True)
    flip = loss.flip
    g_pos = (flip.user_factors[batch.users] * flip.item_factors[batch.pos_items]).detach()
    g_pos = g_pos.sum(-1)
    g_neg = (flip.user_factors[batch.users] * flip.item_factors[batch.neg_items[:, 0]]).sum(-1)
    g_neg = g_neg.detach()
    one = Batch(batch.users, batch.pos_items, batch.neg_items[:, :1])
    got = loss(pos, neg, one)
    d_pos, d_neg = torch.autograd.grad(got, (pos, neg))

    h = 1e-6

    def dlog_sig(z):  # d/dz log sigma(z), numerically
        return (torch.log(_sig(z + h)) - torch.log(_sig(z - h))) / (2 * h)

    n = pos.numel()
    # positive, L = sigma(x) sigma(-g): d/dx -> sigma(-g) * dlog sigma(x)
    want_pos = -_sig(-g_pos) * dlog_sig(pos.detach()) / n
    # negative, L = sigma(-x) + sigma(x) sigma(g): d/dx -> dlog sigma(-x) * (-1) ... with
    # d/dx log sigma(-x) = -dlog_sig(-x), and sigma(g) * dlog sigma(x)
    x = neg.detach()
    want_neg = -(-dlog_sig(-x) + _sig(g_neg) * dlog_sig(x)) / n
    torch.testing.assert_close(d_pos, want_pos, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_neg, want_neg, rtol=1e-6, atol=1e-9)
    # the flip factors: gamma's surrogate gradient is sigma(x) dlog sigma(-g) at positives
    # and sigma(x) dlog sigma(g) at negatives, chained through gamma = P_u . Q_i
    got = loss(
        pos.detach(), neg.detach(), Batch(batch.users, batch.pos_items, batch.neg_items[:, :1])
    )
    (d_p,) = torch.autograd.grad(got, (flip.user_factors,))
    d_gamma_pos = -_sig(pos.detach()) * (-dlog_sig(-g_pos)) / n
    d_gamma_neg = -_sig(x) * dlog_sig(g_neg) / n
    want_p = torch.zeros_like(flip.user_factors)
    want_p.index_add_(0, batch.users, d_gamma_pos[:, None] * flip.item_factors[batch.pos_items])
    want_p.index_add_(
        0, batch.users, d_gamma_neg[:, None] * flip.item_factors[batch.neg_items[:, 0]]
    )
    torch.testing.assert_close(d_p, want_p.detach(), rtol=1e-6, atol=1e-9)


def test_flip_model_shapes_and_initial_rho():
    torch.manual_seed(0)
    flip = FlipModel(5, 8, dim=50)
    users = torch.tensor([0, 1, 4])
    assert flip(users, torch.tensor([2, 3, 7])).shape == (3,)
    gamma = flip(users, torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert gamma.shape == (3, 2)
    # P ~ 5 U/sqrt(d), Q ~ -5 U/sqrt(d): gamma ~ -25 d E[U]^2 / d = -6.25, rho ~ 0
    gamma = gamma.detach()
    assert -9.0 < float(gamma.mean()) < -4.0 and float(torch.sigmoid(gamma).max()) < 0.05
    torch.testing.assert_close(gamma[1, 0], (flip.user_factors[1] * flip.item_factors[2]).sum())
    with pytest.raises(ValueError, match="dim must be >= 1"):
        FlipModel(2, 2, dim=0)


def test_objective_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction must be one of"):
        BPRLoss("avg")
    with pytest.raises(ValueError, match="form must be one of"):
        NBPOLoss(2, 2, form="exact")
    with pytest.raises(ValueError, match=r"neg_scores must be \[B\] or \[B, K\]"):
        BPOLoss()(torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="reads the batch"):
        NBPOLoss(2, 2)(torch.zeros(2), torch.zeros(2), None)
    assert isinstance(make_objective("nbpo_original", num_users=3, num_items=4), NBPOLoss)
    assert make_objective("nbpo_original", num_users=3, num_items=4).form == "original"
    assert make_objective("bpr", num_users=3, reduction="sum").reduction == "sum"


# --- in models and in a plain PyG model -------------------------------------------------------


@pytest.mark.parametrize("objective", ["bpo", "nbpo", "nbpo_original"])
@pytest.mark.parametrize("name", ["bprmf", "lightgcn", "vbpr", "freedom", "lirdrec", "sea"])
def test_every_bpr_model_takes_the_objectives(name, objective, data):
    model, inputs, config = build(name, data, objective=objective, num_negatives=3)
    assert type(model.objective).__name__ == ("BPOLoss" if objective == "bpo" else "NBPOLoss")
    users, pos, _ = a_batch(data, size=32)
    neg = NegativeSampler(get_splits(data).train, inputs.num_items).sample(users, None, 3)
    loss = model.training_loss(inputs, users, pos, neg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    if objective != "bpo":  # the flip model is trained with the model
        assert model.objective.flip.user_factors.grad is not None


def test_ranking_ignores_the_flip_model(data):
    model, inputs, _ = build("bprmf", data, objective="nbpo")
    before = [t.clone() for t in model.embed(inputs)]
    with torch.no_grad():
        model.objective.flip.user_factors.add_(3.0)
    after = model.embed(inputs)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_nbpo_with_a_plain_pyg_model():
    """The objective needs scores and ids only: here PyG's own LightGCN."""
    torch.manual_seed(0)
    num_users, num_items = 6, 9
    gnn = PyGLightGCN(num_users + num_items, embedding_dim=8, num_layers=2)
    users = torch.tensor([0, 1, 2, 3, 4, 5])
    items = torch.tensor([0, 2, 4, 6, 8, 1])
    edge_index = torch.stack([users, items + num_users])
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    objective = NBPOLoss(num_users, num_items, flip_dim=4)
    neg = torch.tensor([[3, 5], [1, 7], [0, 8], [2, 4], [5, 6], [3, 7]])
    optimizer = torch.optim.Adam([*gnn.parameters(), *objective.parameters()], lr=0.05)
    losses = []
    for _ in range(20):
        emb = gnn.get_embedding(edge_index)
        u, i = emb[users], emb[items + num_users]
        j = emb[neg + num_users]
        loss = objective((u * i).sum(-1), (u[:, None] * j).sum(-1), Batch(users, items, neg))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# --- the training protocol --------------------------------------------------------------------


def test_sampler_draws_several_negatives_from_the_chosen_pool():
    train = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 3]])
    gen = torch.Generator().manual_seed(0)
    users = torch.tensor([0, 1, 2] * 200)
    only_train = NegativeSampler(train, num_items=6)
    everything = NegativeSampler(train, num_items=6, pool="all")
    neg = only_train.sample(users, gen, num_negatives=4)
    assert neg.shape == (600, 4)
    assert not only_train.is_positive(users.repeat_interleave(4), neg.reshape(-1)).any()
    assert set(neg.unique().tolist()) <= {0, 1, 2, 3}  # items 4 and 5 never trained
    neg_all = everything.sample(users, gen, num_negatives=4)
    assert not everything.is_positive(users.repeat_interleave(4), neg_all.reshape(-1)).any()
    assert {4, 5} <= set(neg_all.unique().tolist())
    # one negative: the same draws as before (shape [B])
    a = only_train.sample(users, torch.Generator().manual_seed(3))
    b = only_train.sample(users, torch.Generator().manual_seed(3), num_negatives=1)
    assert a.shape == (600,) and torch.equal(a, b)
    with pytest.raises(ValueError, match="pool must be one of"):
        NegativeSampler(train, 6, pool="popular")


def test_f1_matches_a_hand_computation():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = torch.tensor([[0, 0, 1, 1], [2, 4, 1, 3]])  # user 0: {2, 4}; user 1: {1, 3}
    got = ranking_metrics(scores, None, targets, ks=(2, 3))
    # user 0 top-2 {0, 1}: no hit; top-3 {0, 1, 3}: no hit -> F1 0
    # user 1 top-2 {4, 3}: 1 hit, P = 1/2, R = 1/2 -> F1 1/2; top-3 {4, 3, 2}: P = 1/3, R = 1/2
    assert math.isclose(got["f1@2"], (0 + 0.5) / 2)
    f1 = 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)
    assert math.isclose(got["f1@3"], (0 + f1) / 2)


def test_sgd_decay_groups_and_no_early_stopping(data):
    cls = get_model_class("bprmf")
    config = load_config(
        cls.default_config(),
        overrides={
            "objective": "nbpo",
            "optimizer": "sgd",
            "learning_rate": 0.05,
            "lr_decay": 0.9,
            "weight_decay": 0.5,
            "flip_weight_decay": 2.0,
            "epochs": 4,
            "stopping_step": 0,
            "early_stopping": False,
            "num_negatives": 2,
            "negative_pool": "all",
            "loss_reduction": "sum",
        },
    )
    model, inputs, _ = build("bprmf", data, **{k: config[k] for k in ("objective",)})
    model = cls.from_config(config, inputs)
    trainer = Trainer(model, inputs, get_splits(data), config, progress=False)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    groups = trainer.optimizer.param_groups
    flip = {id(p) for p in model.objective.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.5, 2.0]
    assert {id(p) for p in groups[1]["params"]} == flip
    result = trainer.fit()
    assert result.epochs_run == 4 and not result.stopped_early  # stopping_step 0 ignored
    assert math.isclose(groups[0]["lr"], 0.05 * 0.9**3) and groups[0]["lr"] == groups[1]["lr"]


def test_protocol_options_are_validated(data):
    cls = get_model_class("bprmf")
    for key, value, message in (
        ("loss_reduction", "avg", "'loss_reduction' must be one of"),
        ("negative_pool", "popular", "'negative_pool' must be one of"),
        ("optimizer", "lbfgs", "'optimizer' must be one of"),
        ("lr_decay", 1.5, r"'lr_decay' must lie in \(0, 1\]"),
        ("num_negatives", 0, "'num_negatives' must be a positive integer"),
        ("weight_decay", -1.0, "'weight_decay' must be >= 0"),
        ("valid_metric", "f2@20", "'valid_metric' must be"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(cls.default_config(), overrides={key: value})
    assert load_config(cls.default_config(), overrides={"valid_metric": "f1@20"})
    cm3 = get_model_class("cm3")
    config = load_config(cm3.default_config(), overrides={"num_negatives": 2, "epochs": 1})
    with pytest.raises(ConfigError, match="one negative per positive"):
        run_experiment(data, "cm3", config, progress=False)


def test_nbpo_training_lowers_the_loss_and_is_deterministic(data):
    cls = get_model_class("bprmf")
    config = load_config(
        cls.default_config(),
        overrides={"objective": "nbpo", "epochs": 5, "num_negatives": 2, "seed": 4},
    )
    first = run_experiment(data, "bprmf", config, progress=False)
    again = run_experiment(data, "bprmf", config, progress=False)
    assert first["valid"] == again["valid"] and first["test"] == again["test"]
    model, inputs, _ = build("bprmf", data, objective="nbpo", num_negatives=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    users, pos, neg = a_batch(data, size=64)
    neg = NegativeSampler(get_splits(data).train, inputs.num_items).sample(
        users, torch.Generator().manual_seed(0), 2
    )
    losses = []
    for _ in range(10):
        loss = model.training_loss(inputs, users, pos, neg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_flip_model_refuses_ids_that_would_wrap_around():

    flip = FlipModel(5, 4, dim=2)
    with pytest.raises(ValueError, match=r"users id -1 is out of range \[0, 5\)"):
        flip(torch.tensor([-1, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"items id 4 is out of range \[0, 4\)"):
        flip(torch.tensor([1, 0]), torch.tensor([[0], [4]]))
    assert flip(torch.tensor([4]), torch.tensor([[3, 0]])).shape == (1, 2)
