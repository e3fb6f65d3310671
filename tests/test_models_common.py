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


def test_epoch_batches_follow_the_generator_device():
    from cm3_pyg.training.sampler import epoch_batches

    gen = torch.Generator().manual_seed(4)
    batches = list(epoch_batches(10, 4, gen))
    assert [b.numel() for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(10))
    # the same draw as a plain CPU randperm from the same seed (CPU results are unchanged)
    assert torch.equal(
        torch.cat(batches), torch.randperm(10, generator=torch.Generator().manual_seed(4))
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_epoch_and_evaluation_on_cuda(name, data):
    from cm3_pyg.training import Trainer, get_splits

    model, inputs, config = build(name, data)
    config = {**config, "device": "cuda", "epochs": 1, "train_batch_size": 256}
    trainer = Trainer(model, inputs, get_splits(data), config, progress=False)
    loss = trainer.train_epoch(1)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.device.type == "cuda" for p in model.parameters())
    metrics = trainer.evaluate("valid")
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
