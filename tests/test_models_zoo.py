"""The baseline models (BPR-MF, LightGCN, VBPR, FREEDOM, BM3): shapes, losses re-derived with
dense float64 algebra, learning, determinism, complete runs and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cm3_pyg.data import make_synthetic
from cm3_pyg.models import MODELS, get_model_class
from cm3_pyg.training import (
    build_graph_inputs,
    load_config,
    run_experiment,
)
from tests.conftest import REPO
from tests.model_helpers import (
    DIM,
    a_batch,
    as_double,
    build,
    dense_ui_adjacency,
)

ZOO = ["bprmf", "lightgcn", "vbpr", "freedom", "bm3"]
ID_ONLY = ["bprmf", "lightgcn"]
MULTIMODAL = ["vbpr", "freedom", "bm3"]


@pytest.fixture(scope="module")
def mm_data():
    return make_synthetic(
        num_users=120, num_items=80, modality_dims={"image": 8, "text": 6}, seed=0
    )


@pytest.fixture(scope="module")
def id_data():
    return make_synthetic(num_users=120, num_items=80, modality_dims={}, seed=0)


# --- independent dense float64 re-derivations ---------------------------------------------


def dense_item_graph(data, k=10, image_weight=0.1) -> torch.Tensor:
    """FREEDOM's frozen graph: per modality top-k cosine rows of weight 1/k, mixed."""
    total = 0.0
    for m in data.modalities:
        x = data["item"][f"x_{m}"].double()
        xn = x / x.norm(dim=1, keepdim=True)
        top = (xn @ xn.t()).topk(k, dim=1).indices
        s = torch.zeros(x.size(0), x.size(0), dtype=torch.float64)
        s.scatter_(1, top, 1.0 / k)
        total = total + (image_weight if m == "image" else 1.0 - image_weight) * s
    return total


def lightgcn_mean(adj, users, items, layers):
    h = torch.cat([users, items])
    out = h
    for _ in range(layers):
        h = adj @ h
        out = out + h
    out = out / (layers + 1)
    return out[: users.size(0)], out[users.size(0) :]


def bpr_ref(u, i, j):
    return -torch.log(torch.sigmoid((u * i).sum(1) - (u * j).sum(1))).mean()


def norms_over_rows(*tables):
    return sum(t.pow(2).sum().sqrt() for t in tables) / tables[-1].size(0)


def cos_term(a, b):
    return 1.0 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def reference_loss(name, model, data, features, users, pos, neg):
    """The loss of each model written from its paper/reference with dense algebra."""
    adj = dense_ui_adjacency(data)
    if name == "bprmf":
        u, i, j = model.user_embedding[users], model.item_embedding[pos], model.item_embedding[neg]
        return bpr_ref(u, i, j) + model.reg_weight * norms_over_rows(u, i, j)
    if name == "lightgcn":
        p, q = model.user_embedding, model.item_embedding
        uu, qq = lightgcn_mean(adj, p, q, model.propagation.num_layers)
        reg = norms_over_rows(p[users], q[pos], q[neg])
        return bpr_ref(uu[users], qq[pos], qq[neg]) + model.reg_weight * reg
    if name == "vbpr":
        x = torch.cat(features, dim=1)
        w, b = model.projection.weight, model.projection.bias
        items = torch.cat([model.item_embedding, x @ w.t() + b], dim=1)
        u, i, j = model.user_embedding[users], items[pos], items[neg]
        return bpr_ref(u, i, j) + model.reg_weight * norms_over_rows(u, i, j)
    if name == "freedom":
        uu, qq = lightgcn_mean(
            adj, model.user_embedding, model.item_embedding, model.propagation.num_layers
        )
        s = dense_item_graph(data)
        side = model.item_embedding
        for _ in range(model.num_mm_layers):
            side = s @ side
        qq = qq + side
        loss = bpr_ref(uu[users], qq[pos], qq[neg])
        for m, x in enumerate(features):
            proj = model.projections[m]
            f = (x + model.feature_offsets.offsets[m]) @ proj.weight.t() + proj.bias
            loss = loss + model.reg_weight * bpr_ref(uu[users], f[pos], f[neg])
        return loss
    if name == "bm3":
        uu, qq = lightgcn_mean(
            adj, model.user_embedding, model.item_embedding, model.propagation.num_layers
        )
        qq = qq + model.item_embedding

        def g(x):
            return x @ model.predictor.weight.t() + model.predictor.bias

        u, i = uu[users], qq[pos]
        rec = cos_term(g(u), i.detach()) + cos_term(g(i), u.detach())
        inter = intra = 0.0
        for m, x in enumerate(features):
            enc = model.encoders[m]
            f = ((x + model.feature_offsets.offsets[m]) @ enc.weight.t() + enc.bias)[pos]
            inter = inter + cos_term(g(f), i.detach())
            intra = intra + cos_term(g(f), f.detach())
        reg = (uu.pow(2).sum().sqrt() + qq.pow(2).sum().sqrt()) / qq.size(0)
        return rec + model.cl_weight * (inter + intra) + model.reg_weight * reg
    raise KeyError(name)


# --- tests ----------------------------------------------------------------------------------


def test_registry_yaml_defaults_and_grids():
    assert set(ZOO) | {"cm3"} <= set(MODELS)
    for name in ZOO:
        cls = get_model_class(name.upper())
        assert cls.name == name
        defaults, grid = cls.default_config(), cls.default_grid()
        assert "grid" not in defaults and grid, name
        for key, values in grid.items():
            assert key in defaults, (name, key)
            for value in values:  # every grid point is a valid config
                assert load_config(defaults, overrides={key: value})[key] == value
    assert get_model_class("bm3").default_grid() == {
        "n_layers": [1, 2],
        "dropout": [0.3, 0.5],
        "reg_weight": [0.1, 0.01],
    }
    assert [get_model_class(n).min_modalities for n in ZOO] == [0, 0, 1, 1, 1]
    assert [n for n in ZOO if get_model_class(n).uses_item_graph] == ["freedom"]


@pytest.mark.parametrize("name", ZOO)
def test_shapes_embed_and_recommend(name, mm_data):
    model, inputs, _ = build(name, mm_data)
    assert repr(model).startswith(type(model).__name__ + "(")
    user, item = model.compute_embeddings(inputs)
    width = 2 * DIM if name == "vbpr" else DIM
    assert user.shape == (120, width) and item.shape == (80, width)
    users, pos, neg = a_batch(mm_data)
    loss = model.training_loss(inputs, users, pos, neg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    model.embed(inputs)
    top = model.recommend(torch.tensor([0, 5, 7]), k=10)
    assert top.shape == (3, 10) and top.dtype == torch.int64


@pytest.mark.parametrize("name", ID_ONLY)
def test_id_only_models_need_no_features(name, id_data):
    model, inputs, _ = build(name, id_data)
    assert inputs.features == [] and inputs.item_adj is None
    user, item = model.compute_embeddings(inputs)
    assert user.shape == (120, DIM) and item.shape == (80, DIM)
    assert torch.isfinite(model.training_loss(inputs, *a_batch(id_data)))


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_models_refuse_featureless_data(name, id_data, mm_data):
    cls = get_model_class(name)
    config = load_config(cls.default_config())
    inputs = build_graph_inputs(id_data, config, uses_item_graph=cls.uses_item_graph)
    with pytest.raises(ValueError, match="at least one item modality"):
        cls.from_config(config, inputs)
    # one modality is enough
    model, inputs, _ = build(name, mm_data, modalities=["text"])
    assert model.num_modalities == 1
    assert torch.isfinite(model.training_loss(inputs, *a_batch(mm_data)))


@pytest.mark.parametrize("name", ZOO)
def test_loss_and_gradients_match_dense_float64_derivation(name, mm_data):
    # non-default weights so every term of each loss matters; eval mode: no pruning/dropout
    extra = {"freedom": {"reg_weight": 0.5}, "bm3": {"reg_weight": 0.3, "n_layers": 2}}
    model, inputs, _ = build(name, mm_data, **extra.get(name, {}))
    model = model.double().eval()
    inputs64 = as_double(inputs)
    for offsets in getattr(getattr(model, "feature_offsets", None), "offsets", []):
        torch.nn.init.normal_(offsets, std=0.1)  # fine-tuned features enter the loss
    users, pos, neg = a_batch(mm_data)
    params = [p for p in model.parameters() if p.requires_grad]
    got = model.training_loss(inputs64, users, pos, neg)
    want = reference_loss(name, model, mm_data, inputs64.features, users, pos, neg)
    # the library's adjacency weights are float32 (cast to float64 here): ~1e-8 relative
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    # the scores are the dot products of the embeddings
    user, item = model.compute_embeddings(inputs64)
    if name == "bm3":  # BM3 scores with the predictor's outputs
        uu, qq = model(inputs64.ui_adj)
        torch.testing.assert_close(user, model.predictor(uu))
        torch.testing.assert_close(item, model.predictor(qq))


def test_bm3_ignores_negatives_and_perturbs_targets_only_in_training(mm_data):
    model, inputs, _ = build("bm3", mm_data)
    users, pos, neg = a_batch(mm_data)
    model.eval()
    clean = model.training_loss(inputs, users, pos, neg)
    torch.testing.assert_close(model.training_loss(inputs, users, pos, neg.flip(0)), clean)
    model.train()
    noisy = model.training_loss(inputs, users, pos, neg)
    assert torch.isfinite(noisy) and not torch.allclose(noisy, clean)
    undropped, inputs, _ = build("bm3", mm_data, dropout=0.0)
    undropped.train()
    a = undropped.training_loss(inputs, users, pos, neg)
    undropped.eval()
    torch.testing.assert_close(a, undropped.training_loss(inputs, users, pos, neg))
    parts = undropped.losses(undropped(inputs.ui_adj), inputs.features, users, pos)
    values = [float(p.detach()) for p in parts]
    assert min(values) >= 0.0 and values[1] <= 4.0  # inter: two terms in [0, 2]


def test_freedom_degree_sensitive_pruning_and_schedule(mm_data):
    model, inputs, _ = build("freedom", mm_data, dropout=0.5)
    train = mm_data["user", "rates", "item"].edge_index
    num_edges, nu = train.size(1), 120
    ui = inputs.ui_adj
    first = model.training_adjacency(ui)  # drawn lazily on first use
    assert model.training_adjacency(ui) is first  # kept within an epoch
    model.on_epoch_start(2, inputs)  # the trainer's per-epoch hook redraws
    assert model.training_adjacency(ui) is not first
    pruned = first.to_dense().double()
    full = dense_ui_adjacency(mm_data)
    assert torch.equal(pruned, pruned.t())
    kept = pruned[:nu, nu:] > 0
    assert int(kept.sum()) == int(num_edges * 0.5)
    assert bool((full[:nu, nu:][kept] > 0).all())  # a subset of the training edges
    # renormalised with the kept degrees
    deg_u, deg_i = kept.sum(1).double(), kept.sum(0).double()
    expect = kept.double() / (deg_u[:, None] * deg_i[None, :]).clamp_min(1.0).sqrt()
    torch.testing.assert_close(pruned[:nu, nu:], expect, rtol=1e-6, atol=1e-7)
    # degree-sensitive: kept edges have larger 1/sqrt(d_u d_i) weights on average
    weights = full[:nu, nu:]
    assert weights[kept].mean() > weights[weights > 0].mean()
    # training uses the pruned graph, evaluation the full one
    users, pos, neg = a_batch(mm_data)
    model.train()
    train_loss = model.training_loss(inputs, users, pos, neg)
    model.eval()
    assert not torch.allclose(train_loss, model.training_loss(inputs, users, pos, neg))
    no_drop, inputs, _ = build("freedom", mm_data, dropout=0.0)
    assert no_drop.training_adjacency(inputs.ui_adj) is inputs.ui_adj


@pytest.mark.parametrize("name", sorted(MODELS))
def test_run_experiment_two_epochs_every_registered_model(name, mm_data, id_data, tmp_path):
    cls = get_model_class(name)
    config = load_config(cls.default_config(), overrides={"epochs": 2, "train_batch_size": 512})
    data = id_data if cls.min_modalities == 0 else mm_data
    metrics = run_experiment(data, name, config, out_dir=tmp_path, progress=False)
    assert metrics["model"] == name and metrics["epochs_run"] == 2
    assert 0.0 <= metrics["test"]["recall@20"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == name
    if cls.min_modalities > 0:
        needs = f"needs at least {cls.min_modalities} item modalities"
        with pytest.raises(ValueError, match=needs):
            run_experiment(id_data, name, config, progress=False)


@pytest.mark.parametrize("name", ["bprmf", "vbpr"])  # one ID-only, one multimodal
def test_cli_trains_a_baseline(name, tmp_path):
    out = tmp_path / name
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train_cm3.py"),
            "--model",
            name,
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        # One intra-op thread: on a busy machine torch's OpenMP pool can make every tiny op
        # wait for all cores (measured 100x slower); results do not depend on it.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == name and metrics["epochs_run"] == 1
    assert metrics["dataset"] == "synthetic"


def test_feature_fine_tuning_can_be_switched_off(mm_data):
    tuned, inputs, _ = build("freedom", mm_data)
    frozen, _, _ = build("freedom", mm_data, finetune_features=False)
    n_tuned = sum(p.numel() for p in tuned.parameters())
    n_frozen = sum(p.numel() for p in frozen.parameters())
    assert n_tuned - n_frozen == 80 * (8 + 6)
    loss = tuned.training_loss(inputs, *a_batch(mm_data))
    loss.backward()
    assert any(o.grad is not None and o.grad.any() for o in tuned.feature_offsets.offsets)
