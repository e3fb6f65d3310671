"""What every registered model must do on tiny synthetic data: learn and be reproducible."""

from __future__ import annotations

import pytest
import torch

from cm3_pyg.data import make_synthetic
from cm3_pyg.models import MODELS
from tests.model_helpers import a_batch, build, trained_embeddings


@pytest.fixture(scope="module")
def data():
    # Three modalities: enough for every model (ID-only models ignore the features).
    return make_synthetic(
        num_users=120, num_items=80, modality_dims={"image": 8, "text": 6, "audio": 5}, seed=0
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_few_optimizer_steps_lower_the_loss(name, data):
    model, inputs, _ = build(name, data)
    users, pos, neg = a_batch(data, size=256)

    def eval_loss():
        model.eval()
        torch.manual_seed(0)  # models that draw inside the loss (SEA's CLUB negatives)
        with torch.no_grad():
            return float(model.training_loss(inputs, users, pos, neg))

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(15):
        loss = model.training_loss(inputs, users, pos, neg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < before


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_under_a_fixed_seed(name, data):
    first = trained_embeddings(name, data, seed=5)
    second = trained_embeddings(name, data, seed=5)
    other = trained_embeddings(name, data, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], other[1])
