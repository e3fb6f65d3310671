"""CM3 model: shapes, an independent dense float64 forward, the loss, recommend()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cm3_pyg.data import bipartite_normalized_adjacency, make_synthetic
from cm3_pyg.models import CM3, get_model_class
from cm3_pyg.nn import to_adjacency
from cm3_pyg.training import build_graph_inputs, load_config
from tests.test_fusion import reference_two_modality_mix, textbook_slerp

NU, NI = 12, 9


def tiny_graph(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.cat([torch.arange(NU), torch.randint(NU, (30,), generator=g)])
    items = torch.cat([torch.arange(NU) % NI, torch.randint(NI, (30,), generator=g)])
    index, weight = bipartite_normalized_adjacency(torch.stack([users, items]), NU, NI)
    item_index = torch.stack(
        [torch.arange(NI).repeat_interleave(2), torch.randint(NI, (2 * NI,), generator=g)]
    )
    item_weight = torch.rand(2 * NI, generator=g)
    return index, weight, item_index, item_weight


def dense(index, weight, n):
    a = torch.zeros(n, n, dtype=torch.float64)
    a.index_put_((index[0], index[1]), weight.double(), accumulate=True)
    return a


def independent_forward(model: CM3, feats, ui_dense, item_dense, t):
    """CM3's forward written from the spec with dense float64 algebra."""
    chans = []
    for enc, x in zip(model.encoders, feats, strict=True):
        lin1, _, lin2 = enc
        chans.append(F.linear(F.leaky_relu(F.linear(x, lin1.weight, lin1.bias)), lin2.weight))
    projs = [
        F.normalize(F.linear(x, p.weight, p.bias), dim=1)
        for p, x in zip(model.projections, feats, strict=True)
    ]
    if len(projs) == 2:
        fused = reference_two_modality_mix(projs[0], projs[1], t)
    elif len(projs) == 3:
        fused = textbook_slerp(
            textbook_slerp(projs[0], projs[1], t), textbook_slerp(projs[1], projs[2], t), t
        )
    else:
        fused = projs[0]
    chans.append(fused)
    x0 = torch.cat(
        [
            F.normalize(torch.cat([model.user_embedding[c], chans[c]]), dim=1)
            for c in range(len(chans))
        ],
        dim=1,
    )
    h, total = x0, x0
    for _ in range(model.propagation.num_layers):
        h = ui_dense @ h
        total = total + h
    users, items = total[:NU], total[NU:]
    w = torch.softmax(model.user_channel_logits, dim=1)
    d = model.embedding_dim
    users = torch.cat(
        [w[:, c : c + 1] * users[:, c * d : (c + 1) * d] for c in range(len(chans))], dim=1
    )
    items = items + item_dense @ items
    return users, items, fused


@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_forward_matches_independent_dense_computation(num_modalities):
    torch.manual_seed(num_modalities)
    dims = [7, 5, 4][:num_modalities]
    model = CM3(NU, NI, dims, embedding_dim=6, num_ui_layers=2).double()
    feats = [torch.randn(NI, dm, dtype=torch.float64) for dm in dims]
    index, weight, item_index, item_weight = tiny_graph()
    ui = to_adjacency(index, weight.double(), NU + NI)
    item = to_adjacency(item_index, item_weight.double(), NI)
    t = torch.rand(NI, 1, dtype=torch.float64)
    out = model(feats, ui, item, t=t)
    assert out.user.shape == (NU, (num_modalities + 1) * 6)
    assert out.item.shape == (NI, (num_modalities + 1) * 6)
    eu, ei, ef = independent_forward(
        model, feats, dense(index, weight, NU + NI), dense(item_index, item_weight, NI), t
    )
    torch.testing.assert_close(out.user, eu)
    torch.testing.assert_close(out.item, ei)
    torch.testing.assert_close(out.fused, ef)


def test_loss_matches_pairwise_formulas():
    torch.manual_seed(0)
    model = CM3(NU, NI, [7, 5], embedding_dim=6, gamma=0.5, max_sim=0.8).double()
    feats = [torch.randn(NI, 7, dtype=torch.float64), torch.randn(NI, 5, dtype=torch.float64)]
    index, weight, item_index, item_weight = tiny_graph(1)
    out = model(
        feats,
        to_adjacency(index, weight.double(), NU + NI),
        to_adjacency(item_index, item_weight.double(), NI),
    )
    users = torch.tensor([0, 1, 2, 2, 5, 7])
    pos = torch.tensor([0, 1, 2, 3, 5, 7])
    neg = torch.tensor([8, 6, 4, 4, 1, 0])
    u = F.normalize(out.user, dim=1)[users]
    i = F.normalize(out.item, dim=1)[pos]
    j = F.normalize(out.item, dim=1)[neg]
    a, b = torch.triu_indices(6, 6, 1)
    m = F.normalize(out.fused[neg], dim=1)
    sim = (m @ m.t()).clamp(0.0, 0.8)[a, b]
    align = (u - i).norm(dim=1).pow(2).mean()
    unif = torch.pdist(u).pow(2).mul(-2).exp().mean().log()
    cu = (torch.pdist(j).pow(2) - 2 + 2 * sim).mul(-2).exp().mean().log()
    torch.testing.assert_close(model.loss(out, users, pos, neg), align + 0.5 * (unif + cu) / 2)


def test_training_loss_equals_loss_of_a_full_forward():
    # training_loss weights only the batch's distinct users; the same loss and gradients as
    # model.loss on a full forward (same fusion draw: same seed before each).
    from cm3_pyg.models.base import GraphInputs

    torch.manual_seed(0)
    model = CM3(NU, NI, [7, 5], embedding_dim=6).double()
    feats = [torch.randn(NI, 7, dtype=torch.float64), torch.randn(NI, 5, dtype=torch.float64)]
    index, weight, item_index, item_weight = tiny_graph(2)
    ui = to_adjacency(index, weight.double(), NU + NI)
    item_adj = to_adjacency(item_index, item_weight.double(), NI)
    inputs = GraphInputs(NU, NI, feats, ["a", "b"], ui, item_adj)
    users = torch.tensor([3, 0, 3, 7, 11, 0, 3])
    pos = torch.tensor([1, 2, 1, 8, 0, 5, 4])
    neg = torch.tensor([6, 6, 2, 0, 7, 3, 6])
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    fast = model.training_loss(inputs, users, pos, neg)
    fast_grads = torch.autograd.grad(fast, params)
    torch.manual_seed(5)
    full = model.loss(model(feats, ui, item_adj), users, pos, neg)
    full_grads = torch.autograd.grad(full, params)
    torch.testing.assert_close(fast, full)
    for a, b in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)
    # the users= forward gives exactly those rows of the full table
    model.eval()
    rows = torch.tensor([7, 3, 0])
    torch.testing.assert_close(
        model(feats, ui, item_adj, users=rows).user, model(feats, ui, item_adj).user[rows]
    )


def test_eval_forward_is_deterministic_and_train_forward_is_not():
    torch.manual_seed(0)
    model = CM3(NU, NI, [4, 3])
    feats = [torch.randn(NI, 4), torch.randn(NI, 3)]
    index, weight, *_ = tiny_graph()
    ui = to_adjacency(index, weight, NU + NI)
    model.eval()
    torch.testing.assert_close(model(feats, ui).item, model(feats, ui).item)
    model.train()
    assert not torch.allclose(model(feats, ui).fused, model(feats, ui).fused)


def test_recommend_excludes_and_sorts(tiny_synthetic):
    config = load_config(CM3.default_config())
    inputs = build_graph_inputs(tiny_synthetic, config)
    torch.manual_seed(0)
    model = CM3.from_config(config, inputs)
    with pytest.raises(RuntimeError, match="embed"):
        model.recommend(torch.tensor([0]), k=5)
    user_emb, item_emb = model.embed(inputs)
    train = tiny_synthetic["user", "rates", "item"].edge_index
    users = torch.tensor([3, 0, 3, 17])
    top = model.recommend(users, k=10, exclude=train)
    assert top.shape == (4, 10)
    torch.testing.assert_close(top[0], top[2])
    for row, user in enumerate(users.tolist()):
        seen = set(train[1, train[0] == user].tolist())
        assert not seen & set(top[row].tolist())
        scores = user_emb[user] @ item_emb.t()
        scores[list(seen)] = float("-inf")
        # brute force: the same items, in decreasing score order
        assert top[row].tolist() == torch.argsort(scores, descending=True)[:10].tolist()
    # the cache is invalidated by a parameter update
    with torch.no_grad():
        model.user_embedding.add_(1.0)
    with pytest.raises(RuntimeError, match="up-to-date"):
        model.recommend(users, k=5)
    assert model.recommend(users, k=5, embeddings=(user_emb, item_emb)).shape == (4, 5)


def test_recommend_refuses_ids_that_would_wrap_around(tiny_synthetic):
    config = load_config(CM3.default_config())
    inputs = build_graph_inputs(tiny_synthetic, config)
    model = CM3.from_config(config, inputs)
    model.embed(inputs)
    train = tiny_synthetic["user", "rates", "item"].edge_index
    num_users, num_items = inputs.num_users, inputs.num_items
    cases = [
        (dict(users=torch.tensor([-1])), ValueError, r"users: user id -1 is out of range"),
        (dict(users=torch.tensor([num_users])), ValueError, "out of range"),
        (dict(users=torch.tensor([[0, 1]])), ValueError, "1-D tensor of user ids"),
        (dict(users=torch.tensor([0.0])), TypeError, "integer user ids"),
        (dict(exclude=train.t().contiguous()), ValueError, r"\[2, E\] tensor"),
        (dict(exclude=train[0]), ValueError, r"\[2, E\] tensor"),
        (dict(exclude=torch.tensor([[0], [-1]])), ValueError, "exclude\\[1\\]: item id -1"),
        (dict(exclude=torch.tensor([[0], [num_items]])), ValueError, "out of range"),
        (dict(k=0), ValueError, "k must be an int"),
        (dict(k=2.0), ValueError, "k must be an int"),
    ]
    for change, error, message in cases:
        args = {"users": torch.tensor([0, 1]), "k": 5, "exclude": train, **change}
        with pytest.raises(error, match=message):
            model.recommend(args["users"], k=args["k"], exclude=args["exclude"])


def test_reset_parameters_repr_and_registry():
    model = CM3(NU, NI, [4, 3], embedding_dim=8)
    before = model.user_embedding.detach().clone()
    model.reset_parameters()
    assert not torch.equal(before, model.user_embedding)
    assert "CM3(num_users=12, num_items=9, feature_dims=[4, 3], embedding_dim=8" in repr(model)
    assert get_model_class("CM3") is CM3
    with pytest.raises(KeyError, match="unknown model"):
        get_model_class("nope")
    with pytest.raises(ValueError, match="at least one item modality"):
        CM3(NU, NI, [])


def test_a_few_steps_lower_the_loss():
    data = make_synthetic(
        num_users=200, num_items=150, modality_dims={"image": 8, "text": 6}, seed=1
    )
    config = load_config(CM3.default_config())
    inputs = build_graph_inputs(data, config)
    torch.manual_seed(0)
    model = CM3.from_config(config, inputs)
    train = data["user", "rates", "item"].edge_index
    users, pos = train[
        :, torch.randperm(train.size(1), generator=torch.Generator().manual_seed(0))[:512]
    ]
    neg = torch.randint(inputs.num_items, users.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()  # fixed t so the losses are comparable
    first = float(model.training_loss(inputs, users, pos, neg).detach())
    for _ in range(20):
        opt.zero_grad()
        model.training_loss(inputs, users, pos, neg).backward()
        opt.step()
    assert float(model.training_loss(inputs, users, pos, neg).detach()) < first - 0.1
