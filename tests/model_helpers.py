"""Helpers shared by the model test files: building a model on tiny data, batches, float64."""

from __future__ import annotations

import torch

from cm3_pyg.models import GraphInputs, get_model_class
from cm3_pyg.training import NegativeSampler, build_graph_inputs, load_config, seed_everything

DIM = 16


def build(name, data, seed=0, **overrides):
    """``(model, inputs, config)`` for model ``name`` on ``data`` with small settings."""
    cls = get_model_class(name)
    config = load_config(cls.default_config(), overrides={"embedding_size": DIM, **overrides})
    if name == "sea":  # keep the tests quick: a few inner CLUB steps, small heads
        config.update(club_steps=5, proj_hidden_dim=8, proj_out_dim=8, club_dim=8)
    seed_everything(seed)
    inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    return cls.from_config(config, inputs), inputs, config


def a_batch(data, size=96, seed=0):
    """``(users, positives, negatives)`` of ``size`` random training rows."""
    train = data["user", "rates", "item"].edge_index
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(train.size(1), generator=g)[:size]
    users, pos = train[0, rows], train[1, rows]
    neg = NegativeSampler(train, int(data["item"].num_nodes)).sample(users, g)
    return users, pos, neg


def as_double(inputs: GraphInputs) -> GraphInputs:
    """``inputs`` with float64 features and adjacencies (for exact comparisons)."""
    return GraphInputs(
        num_users=inputs.num_users,
        num_items=inputs.num_items,
        features=[f.double() for f in inputs.features],
        modalities=list(inputs.modalities),
        ui_adj=inputs.ui_adj.to(torch.float64),
        item_adj=None if inputs.item_adj is None else inputs.item_adj.to(torch.float64),
    )


def dense_ui_adjacency(data) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the training graph, users first, from the raw edge list."""
    nu, ni = int(data["user"].num_nodes), int(data["item"].num_nodes)
    users, items = data["user", "rates", "item"].edge_index
    a = torch.zeros(nu + ni, nu + ni, dtype=torch.float64)
    a[users, nu + items] = 1.0
    a[nu + items, users] = 1.0
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1.0).rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * a * inv[None, :]


def trained_embeddings(name, data, seed):
    """Embeddings after three Adam steps from seed ``seed`` (for determinism checks)."""
    model, inputs, _ = build(name, data, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(3):
        loss = model.training_loss(inputs, *a_batch(data, size=64, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.embed(inputs)
