"""LIRDRec and SEA: the DCT, shapes, losses re-derived with dense float64 algebra, progressive
weight copying, the CLUB network's separate optimizer, learning, determinism and complete runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cm3_pyg.data import make_synthetic
from cm3_pyg.errors import ConfigError
from cm3_pyg.models import MODELS, SEA, Batch, GraphInputs, LIRDRec, get_model_class
from cm3_pyg.models.lirdrec import dct_matrix, dct_rows, progressive_mixing_weights
from cm3_pyg.models.sea import CLUB, gaussian_nll
from cm3_pyg.nn.parallel import RowShard, RowSplit
from cm3_pyg.training import (
    CHECKPOINT_NAME,
    NegativeSampler,
    Trainer,
    get_splits,
    load_checkpoint,
    load_config,
    run_experiment,
    seed_everything,
)
from tests.model_helpers import (
    DIM,
    a_batch,
    as_double,
    build,
    dense_ui_adjacency,
)

NAMES = ["lirdrec", "sea"]


@pytest.fixture(scope="module")
def data():
    return make_synthetic(
        num_users=120, num_items=80, modality_dims={"image": 8, "text": 6, "audio": 5}, seed=0
    )


# --- independent dense float64 re-derivations -------------------------------------------------


def layer_sum(adj, x, layers):
    out, h = x, x
    for _ in range(layers):
        h = adj @ h
        out = out + h
    return out


def linear(layer, x):
    return x @ layer.weight.t() + (0.0 if layer.bias is None else layer.bias)


def mlp(seq, x):  # Linear, LeakyReLU, Linear
    return linear(seq[2], F.leaky_relu(linear(seq[0], x), 0.01))


def naive_dct(x):
    """DCT-II (orthonormal) of each row by its definition, no phase reduction."""
    n = x.size(1)
    j = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return x @ (scale * basis).t()


def lirdrec_reference(model, data, inputs, users, pos, neg):
    adj = dense_ui_adjacency(data)
    s = inputs.item_adj.to_dense()
    feats = inputs.features
    channels = [mlp(enc, x) for enc, x in zip(model.encoders, feats, strict=True)]
    channels.append(mlp(model.dct_encoder, torch.cat([naive_dct(x) for x in feats], 1)))
    x0 = torch.cat(
        [
            F.normalize(torch.cat([model.user_embedding[c], z]), dim=1)
            for c, z in enumerate(channels)
        ],
        dim=1,
    )
    h = layer_sum(adj, x0, model.propagation.num_layers)
    nu = model.num_users
    user_parts = h[:nu].split(model.embedding_dim, dim=1)
    # PWC with the closed form of the mixing weights: w1/w2 = r0 * base^(e(e+1)/2)
    e = int(model.pwc.epoch)
    ratio = (
        model.pwc.decay_weight
        / (1 - model.pwc.decay_weight)
        * model.pwc.decay_base ** (e * (e + 1) / 2)
    )
    w1, w2 = ratio / (1 + ratio), 1 / (1 + ratio)
    scores = torch.cat(
        [
            linear(sc[2], F.leaky_relu(linear(sc[0], p), 0.01))
            for sc, p in zip(model.pwc.scorers, user_parts, strict=True)
        ],
        1,
    )
    att = torch.softmax(w1 * scores + w2 * model.pwc.theta, dim=1)
    user = torch.cat([att[:, c : c + 1] * p for c, p in enumerate(user_parts)], 1)
    item = h[nu:] + s @ h[nu:]
    u = user[users]
    bpr = -torch.log(torch.sigmoid((u * item[pos]).sum(1) - (u * item[neg]).sum(1))).mean()
    return bpr + model.reg_weight * ((user**2).mean() + (item**2).mean())


def batchnorm_eval(bn, x):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def head_eval(head, x):
    x = F.relu(batchnorm_eval(head[1], linear(head[0], x)))
    x = F.relu(batchnorm_eval(head[4], linear(head[3], x)))
    return F.normalize(linear(head[6], x), dim=1)


def club_bound_reference(club, x, y, perm):
    mu = linear(club.mu[2], F.relu(linear(club.mu[0], x)))
    logvar = torch.tanh(linear(club.logvar[2], F.relu(linear(club.logvar[0], x))))
    positive = (-((mu - y) ** 2) / logvar.exp() / 2.0 - logvar / 2.0).sum(1)
    negative = (-((mu - y[perm]) ** 2) / logvar.exp() / 2.0 - logvar / 2.0).sum(1)
    return torch.clamp((positive - negative).mean() / 2.0, min=0.0)


def sea_reference(model, data, inputs, users, pos, neg, perms):
    adj = dense_ui_adjacency(data)
    s = inputs.item_adj.to_dense()
    nu = model.num_users
    user_parts, item_parts, mi, proj = [], [], 0.0, []
    for m, x in enumerate(inputs.features):
        r = linear(model.representations[m], x)
        half = x.size(1) // 2
        g, uq = r[:, :half], r[:, half:]
        z = linear(model.item_mlps[m][2], F.leaky_relu(linear(model.item_mlps[m][0], r), 0.01))
        x0 = F.normalize(torch.cat([model.user_preference[m], z]), dim=1)
        h = layer_sum(adj, x0, model.propagation.num_layers)
        user_parts.append(h[:nu] * model.user_modality_weights[:, m : m + 1])
        item_parts.append(h[nu:])
        a, b = linear(model.generic_maps[m], g), linear(model.unique_maps[m], uq)
        mi = mi + club_bound_reference(model.club, a, b, perms[m])
        proj.append(head_eval(model.projection_heads[m], g))
    user = torch.cat(user_parts, 1)
    item = torch.cat(item_parts, 1)
    item = item + s @ item
    u = user[users]
    bpr = -torch.mean(torch.log2(torch.sigmoid((u * item[pos]).sum(1) - (u * item[neg]).sum(1))))
    align, pairs = 0.0, 0
    for a in range(len(proj)):
        for b in range(a + 1, len(proj)):
            v1, v2 = F.normalize(proj[b], dim=1), F.normalize(proj[a], dim=1)
            align = align - torch.diag(F.log_softmax(v1 @ v2.t() / model.temperature, dim=1)).mean()
            pairs += 1
    m = len(proj)
    return bpr + model.ureg * mi / m + model.alpha_contrast * align / pairs


# --- DCT ----------------------------------------------------------------------------------------


def test_dct_matrix_matches_the_definition_and_is_orthonormal():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8, 13):
        x = torch.randn(4, n, generator=g, dtype=torch.float64)
        # an independent O(n^2) evaluation with Python's math.cos
        want = torch.tensor(
            [
                [
                    (math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n))
                    * sum(
                        float(row[j]) * math.cos(math.pi * (2 * j + 1) * k / (2 * n))
                        for j in range(n)
                    )
                    for k in range(n)
                ]
                for row in x
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(dct_rows(x), want, rtol=0, atol=1e-12)
        c = dct_matrix(n)
        assert c.dtype == torch.float64 and c.shape == (n, n)
        torch.testing.assert_close(c @ c.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # large n: the exact phase reduction keeps it orthonormal to float64 precision
    c = dct_matrix(1500)
    torch.testing.assert_close(c @ c.t(), torch.eye(1500, dtype=torch.float64), rtol=0, atol=1e-11)
    x = torch.randn(3, 1500, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dct_rows(x), naive_dct(x), rtol=0, atol=1e-9)
    # energy preserved; constant rows map to the first coefficient only; float32 follows
    torch.testing.assert_close(dct_rows(x).norm(dim=1), x.norm(dim=1))
    const = dct_rows(torch.full((1, 6), 2.0))
    assert const.dtype == torch.float32
    torch.testing.assert_close(
        const, torch.tensor([[2.0 * math.sqrt(6.0), 0, 0, 0, 0, 0]]), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError):
        dct_matrix(0)


def test_lirdrec_dct_of_row_shards_is_the_rows_of_the_full_dct(data):
    """On several processes LIRDRec's DCT sees each process's feature rows only (RowShard):
    the transform is row-wise, so a shard's result is those rows of the full table's."""
    from cm3_pyg.training.inputs import build_graph_inputs

    config = load_config(LIRDRec.default_config())
    inputs = build_graph_inputs(data, config, uses_item_graph=True)
    model = LIRDRec.from_config(config, inputs)
    full = torch.cat([naive_dct(x.double()) for x in inputs.features], 1)
    split = RowSplit(1, 3)
    got = model.dct_features([RowShard.of(x, split) for x in inputs.features])
    assert isinstance(got, RowShard) and got.shape == full.shape and got.split == split
    start, end = split.bounds(inputs.num_items)
    torch.testing.assert_close(got.local.double(), full[start:end], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="either every feature table is a RowShard or none"):
        model.dct_features([RowShard.of(inputs.features[0], split), *inputs.features[1:]])


# --- registry, shapes ---------------------------------------------------------------------------


def test_registry_yaml_defaults_and_grids():
    assert set(NAMES) <= set(MODELS)
    assert (LIRDRec.min_modalities, SEA.min_modalities) == (1, 2)
    assert LIRDRec.uses_item_graph and SEA.uses_item_graph
    for name in NAMES:
        cls = get_model_class(name.upper())
        defaults, grid = cls.default_config(), cls.default_grid()
        assert load_config(defaults)["learning_rate"] == 1e-4  # the references' learning rate
        assert "grid" not in defaults and grid
        for key, values in grid.items():
            assert key in load_config(defaults), (name, key)
            for value in values:
                assert load_config(defaults, overrides={key: value})[key] == value


@pytest.mark.parametrize("name", NAMES)
def test_shapes_embed_and_recommend(name, data):
    model, inputs, _ = build(name, data)
    assert repr(model).startswith(type(model).__name__ + "(")
    user, item = model.compute_embeddings(inputs)
    width = {"lirdrec": 4 * DIM, "sea": 3 * DIM}[name]  # M + 1 channels / M modalities
    assert user.shape == (120, width) and item.shape == (80, width)
    loss = model.training_loss(inputs, *a_batch(data))
    assert loss.dim() == 0 and torch.isfinite(loss)
    model.embed(inputs)
    top = model.recommend(torch.tensor([0, 5, 7]), k=10)
    assert top.shape == (3, 10) and top.dtype == torch.int64
    # the item graph is required
    no_graph = GraphInputs(120, 80, inputs.features, inputs.modalities, inputs.ui_adj, None)
    with pytest.raises(ValueError, match="item graph"):
        model.compute_embeddings(no_graph)


def test_modality_requirements(data):
    one = build("lirdrec", data, modalities=["text"])[0]
    assert one.num_channels == 2
    with pytest.raises(ValueError, match="at least two item modalities"):
        build("sea", data, modalities=["text"])
    two, inputs, _ = build("sea", data, modalities=["image", "text"])
    assert two.num_modalities == 2 and torch.isfinite(two.training_loss(inputs, *a_batch(data)))
    cls = get_model_class("sea")
    config = load_config(cls.default_config(), overrides={"modalities": ["audio"], "epochs": 1})
    with pytest.raises(ConfigError, match="needs at least 2 item modalities"):
        run_experiment(data, "sea", config, progress=False)


# --- losses against dense float64 derivations ----------------------------------------------------


def _check_grads(got, want, params):
    got_grads = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_lirdrec_loss_and_gradients_match_dense_float64(data):
    model, inputs, _ = build("lirdrec", data, reg_weight=0.05, n_ui_layers=2)
    model = model.double().eval()
    with torch.no_grad():  # a later epoch: mixing weights away from the initial ones
        model.pwc.epoch.fill_(3)
        torch.nn.init.normal_(model.pwc.theta, std=0.5)
    inputs64 = as_double(inputs)
    users, pos, neg = a_batch(data)
    got = model.training_loss(inputs64, users, pos, neg)
    want = lirdrec_reference(model, data, inputs64, users, pos, neg)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    _check_grads(got, want, list(model.parameters()))


def test_sea_loss_and_gradients_match_dense_float64(data):
    model, inputs, _ = build("sea", data, ureg=0.5, alpha_contrast=0.3)  # three modalities
    model = model.double().eval()
    assert next(model.club.parameters()).dtype == torch.float64  # .double() reaches the CLUB
    inputs64 = as_double(inputs)
    users, pos, neg = a_batch(data)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(80, generator=g) for _ in range(3)]
    out = model(inputs64.features, inputs64.ui_adj, inputs64.item_adj)
    parts = model.losses(out, users, pos, neg, perms=perms)
    got = model.loss(parts)
    assert float(parts.mi.detach()) > 0  # the clamp is not active: the bound's gradient is tested
    want = sea_reference(model, data, inputs64, users, pos, neg, perms)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    _check_grads(got, want, model.outer_parameters())
    # the outer loss never writes gradients into the CLUB network
    got.backward()
    assert all(p.grad is None for p in model.club.parameters())


# --- LIRDRec: progressive weight copying --------------------------------------------------------


def test_progressive_mixing_weights_closed_form():
    for w0, base in ((0.9, 0.9), (0.95, 0.5), (0.99, 1.0)):
        for e in range(8):
            ratio = w0 / (1 - w0) * base ** (e * (e + 1) / 2)
            w1, w2 = progressive_mixing_weights(w0, base, e)
            assert math.isclose(w1, ratio / (1 + ratio), rel_tol=1e-12)
            assert math.isclose(w1 + w2, 1.0, rel_tol=1e-12)


def test_lirdrec_copies_the_last_attention_at_each_epoch_start(data):
    model, inputs, _ = build("lirdrec", data)
    splits = get_splits(data)
    num_edges = splits.train.size(1)
    pwc = model.pwc
    theta0 = pwc.theta.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    batch = 200
    last_att = None
    for epoch in (1, 2, 3):
        theta_before = pwc.theta.detach().clone()
        model.on_epoch_start(epoch, inputs)  # as the trainer does
        for start in range(0, num_edges, batch):
            rows = torch.arange(start, min(start + batch, num_edges))
            users, pos = splits.train[0, rows], splits.train[1, rows]
            neg = NegativeSampler(splits.train, 80).sample(users)
            loss = model.training_loss(inputs, users, pos, neg)
            if start == 0:  # the epoch started just before: theta <- last attention
                assert int(pwc.epoch) == epoch
                assert pwc.mixing_weights() == progressive_mixing_weights(0.95, 0.9, epoch)
                expected = theta0 if epoch == 1 else last_att
                torch.testing.assert_close(pwc.theta.detach(), expected)
                if epoch > 1:
                    assert not torch.equal(theta_before, expected)
            else:
                assert int(pwc.epoch) == epoch
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last_att = pwc.last_attention.clone()
    # the remembered attention is the softmax of the last training forward (rows sum to 1)
    torch.testing.assert_close(last_att.sum(1), torch.ones(120))
    # evaluation neither advances the epoch nor overwrites the remembered attention
    model.embed(inputs)
    model.eval()
    model.training_loss(inputs, *a_batch(data))
    assert int(pwc.epoch) == 3 and torch.equal(pwc.last_attention, last_att)
    # the state is saved with the model
    fresh, _, _ = build("lirdrec", data, seed=7)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.pwc.epoch) == 3 and torch.equal(fresh.pwc.last_attention, last_att)
    model.start_epoch()
    assert int(pwc.epoch) == 4 and torch.equal(pwc.theta.detach(), last_att)


def test_lirdrec_caches_the_dct_features(data):
    model, inputs, _ = build("lirdrec", data)
    first = model.dct_features(inputs.features)
    assert model.dct_features(inputs.features) is first
    torch.testing.assert_close(
        first,
        torch.cat([naive_dct(x.double()).float() for x in inputs.features], 1),
        atol=1e-5,
        rtol=1e-5,
    )
    copies = [x.clone() for x in inputs.features]
    assert model.dct_features(copies) is not first  # new tensors: recomputed


# --- SEA: the CLUB network and its own optimizer -------------------------------------------------


def test_sea_club_is_an_inner_problem_the_trainer_fits(data):
    model, inputs, config = build("sea", data)
    club_params = list(model.club.parameters())
    club_ids = {id(p) for p in club_params}
    # a registered submodule: .to(), state_dict() and checkpoints see it ...
    assert club_params and club_ids <= {id(p) for p in model.parameters()}
    assert any(isinstance(m, CLUB) for m in model.modules())
    # ... declared as an inner problem, so the outer optimiser never sees it
    (problem,) = model.inner_problems()
    assert problem.name == "club" and problem.module is model.club and problem.steps == 5
    assert not club_ids & {id(p) for p in model.outer_parameters()}
    trainer = Trainer(model, inputs, get_splits(data), {**config, "epochs": 1}, progress=False)
    outer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert outer == {id(p) for p in model.outer_parameters()} and not outer & club_ids
    inner = trainer.inner_optimizers["club"]
    assert {id(p) for group in inner.param_groups for p in group["params"]} == club_ids
    assert inner.param_groups[0]["lr"] == config["learning_rate"]  # club_lr: null

    users, pos, neg = a_batch(data)
    before = [p.detach().clone() for p in club_params]
    terms = model.loss_terms(inputs, Batch(users, pos, neg))
    # computing the loss alone never moves the CLUB network
    assert all(torch.equal(a, b) for a, b in zip(before, club_params, strict=True))
    samples = terms.inner_inputs["club"]
    assert len(samples) == model.num_modalities
    assert all(not a.requires_grad and not b.requires_grad for a, b in samples)

    def nll():
        with torch.no_grad():
            return float(model.inner_loss("club", samples))

    start = nll()
    trainer.fit_inner(problem, samples)
    assert not all(torch.equal(a, b) for a, b in zip(before, club_params, strict=True))
    assert nll() < start and all(p.grad is None for p in club_params)
    # the outer backward/step leaves the CLUB network alone (and the outer loss is usable
    # although the inner steps changed its weights in place)
    fitted = [p.detach().clone() for p in club_params]
    trainer.optimizer.zero_grad()
    terms.total.backward()
    trainer.optimizer.step()
    assert all(p.grad is None for p in club_params)
    assert all(torch.equal(a, b) for a, b in zip(fitted, club_params, strict=True))
    # the CLUB weights are in the model's state_dict, its optimiser's in the trainer's
    state = trainer.state_dict()
    assert any(key.startswith("club.") for key in state["model"])
    assert state["inner_optimizers"]["club"]["state"]
    fresh, _, _ = build("sea", data, seed=3)
    again = Trainer(fresh, inputs, get_splits(data), {**config, "epochs": 1}, progress=False)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.club.parameters(), club_params, strict=True))
    got_state = again.inner_optimizers["club"].state_dict()["state"]
    want_state = inner.state_dict()["state"]
    assert got_state.keys() == want_state.keys()
    for k in want_state:
        assert torch.equal(got_state[k]["exp_avg"], want_state[k]["exp_avg"])


def test_gaussian_nll_matches_autograd_of_the_formula():
    gen = torch.Generator().manual_seed(0)
    n, d = 7, 5
    mu, logvar, y = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = torch.rand(n, generator=gen, dtype=torch.float64)
    for t in (mu, logvar, y):
        t.requires_grad_(True)
    got = gaussian_nll(mu, logvar, y, weight)
    want = (0.5 * ((mu - y) ** 2 / torch.exp(logvar) + logvar)).sum(1).mul(weight).sum()
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(3.0 * got, (mu, logvar, y))
    g_want = torch.autograd.grad(3.0 * want, (mu, logvar, y))
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *t: gaussian_nll(*t, weight), (mu, logvar, y))
    # inputs that need no gradient get none; the inputs are not modified in place
    frozen_y = y.detach().clone()
    grads = torch.autograd.grad(gaussian_nll(mu, logvar, frozen_y, weight), (mu,))
    assert torch.allclose(3.0 * grads[0], g_want[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(frozen_y, y.detach())
    with pytest.raises(ValueError, match="row_weight must have shape"):
        gaussian_nll(mu, logvar, y, weight[:-1])
    with pytest.raises(ValueError, match="share one"):
        gaussian_nll(mu, logvar[:, :-1], y, weight)


def test_sea_inner_loss_on_stacked_pairs_equals_the_per_pair_sum(data):
    """The stacked, row-weighted inner loss has the per-pair sum's value and gradients, so
    one fitting step moves the network as a step on the sum over pairs would."""
    model, inputs, config = build("sea", data)
    model.double()
    gen = torch.Generator().manual_seed(1)
    dim = model.club.mu[0].in_features
    samples = [
        (
            torch.randn(n, dim, generator=gen, dtype=torch.float64),
            torch.randn(n, dim, generator=gen, dtype=torch.float64),
        )
        for n in (6, 11)
    ]
    reference = CLUB(dim, dim, model.club.mu[0].out_features * 2).double()
    reference.load_state_dict(model.club.state_dict())

    def plain_nll(club, x, y):
        mu = club.mu(x)
        logvar = club.logvar(x)
        return (0.5 * ((mu - y) ** 2 / logvar.exp() + logvar)).sum(1).mean()

    want = sum(plain_nll(reference, a, b) for a, b in samples)
    want.backward()
    optimizer = torch.optim.Adam(reference.parameters(), lr=config["learning_rate"])
    optimizer.step()
    got = float(model.inner_loss("club", samples).detach())
    assert math.isclose(got, float(want.detach()), rel_tol=1e-12)
    trainer = Trainer(model, as_double(inputs), get_splits(data), config, progress=False)
    (problem,) = model.inner_problems()
    trainer.fit_inner(replace(problem, steps=1), samples)
    for a, b in zip(model.club.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# --- learning, determinism, complete runs --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_run_experiment_and_bit_identical_resume(name, data, tmp_path):
    cls = get_model_class(name)
    overrides = {"epochs": 2, "train_batch_size": 512, "embedding_size": DIM}
    if name == "sea":
        overrides.update(club_steps=5, ureg=1.0)
    config = load_config(cls.default_config(), overrides=overrides)
    full = run_experiment(data, name, config, out_dir=tmp_path / "full", progress=False)
    assert full["model"] == name and full["epochs_run"] == 2
    assert 0.0 <= full["test"]["recall@20"] <= 1.0
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["model"] == name
    # one epoch, then resume from the checkpoint (PWC buffers / CLUB network included)
    run_experiment(data, name, {**config, "epochs": 1}, out_dir=tmp_path / "cut", progress=False)
    resumed = run_experiment(
        data, name, config, out_dir=tmp_path / "cut", progress=False, resume=True
    )
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    # the final weights (and the CLUB network / PWC state) are bit-identical too
    want = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)["trainer"]["model"]
    got = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["trainer"]["model"]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # SEA: the CLUB network's own optimiser moments too
    want_inner = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)["trainer"]["inner_optimizers"]
    got_inner = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["trainer"]["inner_optimizers"]
    assert got_inner.keys() == want_inner.keys() == ({"club"} if name == "sea" else set())
    for opt_name, opt_state in want_inner.items():
        for k, w in opt_state["state"].items():
            got_moments = got_inner[opt_name]["state"][k]
            assert torch.equal(got_moments["exp_avg"], w["exp_avg"])
            assert torch.equal(got_moments["exp_avg_sq"], w["exp_avg_sq"])


# --- fidelity options (issue 20) -----------------------------------------------------------------


def test_sea_cross_pairing_fits_the_reference_pairs_and_keeps_the_loss(data):
    """``club_pairing="cross"`` hands the CLUB fit the reference's pairs (modality m+1's
    parts -> modality m's, generic with generic and unique with unique; with two modalities
    exactly the reference's), computed here from the model's own maps; the outer loss does
    not change."""
    users, pos, neg = a_batch(data)
    within, inputs, _ = build("sea", data, seed=4)
    cross, _, _ = build("sea", data, seed=4, club_pairing="cross")
    assert cross.club_pairing == "cross" and "club_pairing='cross'" in repr(cross)
    cross.load_state_dict(within.state_dict())
    within.eval(), cross.eval()  # BatchNorm in the heads: the same statistics for both
    out = within(inputs.features, inputs.ui_adj, within.item_graph(inputs))
    perms = [torch.randperm(inputs.num_items) for _ in range(within.num_modalities)]
    got_within = within.losses(out, users, pos, neg, perms)
    got_cross = cross.losses(out, users, pos, neg, perms)
    for a, b in zip(got_within[:3], got_cross[:3], strict=True):
        assert torch.equal(a, b)
    num = cross.num_modalities
    generic = [cross.generic_maps[m](out.generic[m]) for m in range(num)]
    unique = [cross.unique_maps[m](out.unique[m]) for m in range(num)]
    want = []
    for m in range(num - 1):
        want += [(generic[m + 1], generic[m]), (unique[m + 1], unique[m])]
    assert len(got_cross.club_samples) == 2 * (num - 1)
    for (x, y), (wx, wy) in zip(got_cross.club_samples, want, strict=True):
        assert torch.allclose(x, wx) and torch.allclose(y, wy)
    for (x, y), m in zip(got_within.club_samples, range(num), strict=True):
        assert torch.allclose(x, generic[m]) and torch.allclose(y, unique[m])


def test_sea_cross_pairing_chains_any_number_of_modalities():
    from cm3_pyg.models.sea import cross_modal_pairs

    parts = [(torch.full((2, 1), 10.0 * m), torch.full((2, 1), 10.0 * m + 1)) for m in range(3)]
    got = [(int(x[0, 0]), int(y[0, 0])) for x, y in cross_modal_pairs(parts)]
    assert got == [(10, 0), (11, 1), (20, 10), (21, 11)]


def test_sea_club_pairing_choice_is_checked(data):
    with pytest.raises(ValueError, match=r"SEA: club_pairing must be one of \('within', 'cross'\)"):
        SEA(4, 4, [4, 4], club_pairing="reference")
    with pytest.raises(ConfigError, match=r"config key 'club_pairing' must be one of"):
        SEA.check_config({"club_pairing": "reference"})


def test_lirdrec_weight_decay_grid_axis_changes_training(data):
    """The reference lists weight_decay in LIRDRec's grid but never passes it to Adam; here
    it reaches the optimiser, so the axis's points train different models."""
    assert LIRDRec.default_grid()["weight_decay"] == [0.0, 1.0e-6, 1.0e-5]
    finals = []
    for weight_decay in (0.0, 1.0e-2):
        model, inputs, config = build("lirdrec", data, seed=0, weight_decay=weight_decay)
        trainer = Trainer(model, inputs, get_splits(data), {**config, "epochs": 1}, progress=False)
        assert trainer.optimizer.param_groups[0]["weight_decay"] == weight_decay
        seed_everything(0)
        trainer.train_epoch(1)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(finals[0], finals[1])


def test_sea_trains_with_cross_pairing(data):
    model, inputs, config = build("sea", data, club_pairing="cross")
    trainer = Trainer(model, inputs, get_splits(data), {**config, "epochs": 1}, progress=False)
    before = [p.detach().clone() for p in model.club.parameters()]
    loss = trainer.train_epoch(1, max_batches=2)
    assert math.isfinite(loss)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.club.parameters(), strict=True))


def test_sea_folded_forward_gives_the_same_loss_and_gradients(tiny_synthetic):
    """The training forward never forms the representation layer (its readers' first layers
    are composed with it); losses and every parameter's gradient equal the plain path's."""
    from cm3_pyg.models import SEA
    from cm3_pyg.models.base import Batch
    from cm3_pyg.training import load_config
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits

    config = load_config(SEA.default_config())
    inputs = build_graph_inputs(tiny_synthetic, config, uses_item_graph=True)
    splits = get_splits(tiny_synthetic)
    torch.manual_seed(0)
    model = SEA.from_config(config, inputs).double()
    inputs.features = [f.double() for f in inputs.features]
    inputs.ui_adj, inputs.item_adj = (
        inputs.ui_adj.to(torch.float64),
        inputs.item_adj.to(torch.float64),
    )
    users, pos = splits.train[0, :64], splits.train[1, :64]
    neg = torch.randint(0, inputs.num_items, (64,), generator=torch.Generator().manual_seed(1))
    perms = [torch.randperm(inputs.num_items) for _ in inputs.features]
    results = []
    for folded in (False, True):
        model.zero_grad()
        out = model(inputs.features, inputs.ui_adj, model.item_graph(inputs), folded=folded)
        parts = model.losses(out, users, pos, neg, perms=perms)
        model._terms(parts).total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((parts, grads))
    (plain, g_plain), (fold, g_fold) = results
    for field in ("bpr", "mi", "align"):
        torch.testing.assert_close(
            getattr(fold, field), getattr(plain, field), rtol=1e-10, atol=1e-12
        )
    for (a0, b0), (a1, b1) in zip(plain.club_samples, fold.club_samples, strict=True):
        torch.testing.assert_close(a1, a0) and torch.testing.assert_close(b1, b0)
    assert g_fold.keys() == g_plain.keys() and g_plain
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_fold[name], grad, rtol=1e-8, atol=1e-10, msg=name)
    # the trainer's path is the folded one
    terms = model.loss_terms(inputs, Batch(users, pos, neg))
    assert torch.isfinite(terms.total)
