"""Sampler, configuration, early stopping, the trainer and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cm3_pyg.errors import ConfigError
from cm3_pyg.models import CM3
from cm3_pyg.training import (
    EarlyStopping,
    NegativeSampler,
    epoch_batches,
    load_config,
    parse_overrides,
    run_experiment,
)

REPO = Path(__file__).resolve().parents[1]


def test_negative_sampler_never_returns_a_training_item():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(50, (800,), generator=g)
    items = torch.randint(30, (800,), generator=g)
    train = torch.stack([users, items])
    sampler = NegativeSampler(train, num_items=40)  # items 30..39 never seen in training
    seen = {(u, i) for u, i in train.t().tolist()}
    query = torch.randint(50, (5000,), generator=g)
    neg = sampler.sample(query, torch.Generator().manual_seed(1))
    assert all((u, i) not in seen for u, i in zip(query.tolist(), neg.tolist(), strict=True))
    assert set(neg.tolist()) <= set(items.tolist())
    again = sampler.sample(query, torch.Generator().manual_seed(1))
    assert torch.equal(neg, again)
    # uniform over the allowed items: a user's counts are roughly flat
    one = sampler.sample(torch.zeros(30000, dtype=torch.long), torch.Generator().manual_seed(2))
    allowed = sorted(set(items.tolist()) - {i for u, i in seen if u == 0})
    counts = torch.bincount(one, minlength=40)[allowed].double()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_negative_sampler_rejects_user_with_every_item():
    train = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 0]])
    with pytest.raises(ValueError, match="user 0 interacted with all 3 training items"):
        NegativeSampler(train, num_items=3)


def test_epoch_batches_is_a_permutation():
    batches = list(epoch_batches(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_early_stopping_follows_mmrec_rule():
    stopper = EarlyStopping(patience=2)
    values = [0.1, 0.2, 0.2, 0.15, 0.19, 0.3]
    out = [stopper.step(v, e) for e, v in enumerate(values[:5], start=1)]
    assert out == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert stopper.best_epoch == 2 and stopper.best == 0.2


def test_config_layers_and_errors(tmp_path):
    config = load_config(
        CM3.default_config(), overrides=parse_overrides(["n_ui_layers=4", "gamma=1"])
    )
    assert (
        config["n_ui_layers"] == 4 and config["gamma"] == 1.0 and isinstance(config["gamma"], float)
    )
    assert config["knn_k"] == 10 and config["learning_rate"] == 0.001
    user = tmp_path / "c.yaml"
    user.write_text("max_sim: 0.8\ntopk: [10, 20]\n")
    assert load_config(CM3.default_config(), user)["topk"] == [10, 20]
    with pytest.raises(ConfigError, match=r"--set: unknown config key 'n_ui_layer'"):
        load_config(CM3.default_config(), overrides={"n_ui_layer": 3})
    with pytest.raises(ConfigError, match=r"key 'n_ui_layers' expects an integer"):
        load_config(CM3.default_config(), overrides={"n_ui_layers": "three"})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["gamma"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("gamma: [0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(CM3.default_config(), bad)
    bad.write_text("learning_rate: -1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(CM3.default_config(), bad)
    with pytest.raises(ConfigError, match="valid_metric"):
        load_config(CM3.default_config(), overrides={"valid_metric": "recall@7"})


def small_run(data, tmp_path: Path, name: str, **overrides):
    config = load_config(
        CM3.default_config(), overrides={"epochs": 3, "train_batch_size": 512, **overrides}
    )
    return run_experiment(data, "cm3", config, out_dir=tmp_path / name, progress=False)


def test_run_experiment_writes_metrics_and_is_deterministic(tiny_synthetic, tmp_path):
    first = small_run(tiny_synthetic, tmp_path, "a", seed=7)
    second = small_run(tiny_synthetic, tmp_path, "b", seed=7)
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in (
        "dataset",
        "model",
        "config",
        "best_epoch",
        "epochs_run",
        "valid",
        "test",
        "epoch_seconds",
    ):
        assert key in written
    assert written["epochs_run"] == 3 and len(written["epoch_seconds"]) == 3
    assert {"recall@20", "ndcg@20", "precision@5", "map@50"} <= set(written["test"])
    assert written["modalities"] == ["image", "text", "audio"]  # M = 3 trains end to end
    assert first["valid"] == second["valid"] and first["test"] == second["test"]
    rows = (tmp_path / "a" / "epochs.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 4
    third = small_run(tiny_synthetic, tmp_path, "c", seed=8)
    assert third["valid"] != first["valid"]


def test_cm3_beats_popularity_on_synthetic_data(tmp_path):
    from cm3_pyg.data import make_synthetic

    data = make_synthetic(num_users=800, num_items=500, seed=5)
    metrics = small_run(data, tmp_path, "pop", epochs=10, train_batch_size=2048, seed=1)
    assert metrics["test"]["recall@20"] > 1.3 * metrics["popularity"]["test"]["recall@20"]
    assert metrics["test"]["ndcg@20"] > 1.3 * metrics["popularity"]["test"]["ndcg@20"]


def test_cli_trains_and_reports_bad_config(tmp_path):
    script = REPO / "examples" / "train_cm3.py"
    bad = subprocess.run(
        [sys.executable, str(script), "--set", "gama=0.5", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown config key 'gama'" in bad.stderr
    missing = subprocess.run(
        [sys.executable, str(script), "--data-root", str(tmp_path), "--dataset", "nothing"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "nothing" in missing.stderr


@pytest.mark.parametrize("name", sorted(__import__("cm3_pyg.models", fromlist=["MODELS"]).MODELS))
def test_gradients_are_bit_identical_across_repeats(name, tiny_synthetic):
    # Guards against ops whose multi-threaded CPU backward is order-dependent (in torch
    # 2.13, the backward of x[idx] is; models gather rows with index_select instead).
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training import build_graph_inputs

    cls = get_model_class(name)
    config = load_config(cls.default_config())
    inputs = build_graph_inputs(tiny_synthetic, config, uses_item_graph=cls.uses_item_graph)
    train = tiny_synthetic["user", "rates", "item"].edge_index
    users, pos = train[:, :1024]
    neg = torch.randint(inputs.num_items, users.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(3):
        torch.manual_seed(0)
        model = cls.from_config(config, inputs)
        model.eval()  # no dropout or random fusion, so repeats must agree exactly
        model.training_loss(inputs, users, pos, neg).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0], f"{name}: no gradients"
    for other in grads[1:]:
        for key, value in grads[0].items():
            assert torch.equal(value, other[key]), (
                f"{name}: gradient of {key} differs between repeats"
            )


def test_train_epoch_max_batches_takes_that_many_steps(tiny_synthetic):
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training import build_graph_inputs, get_splits, load_config
    from cm3_pyg.training.trainer import Trainer

    cls = get_model_class("bprmf")
    config = load_config(cls.default_config(), overrides={"train_batch_size": 64})
    inputs = build_graph_inputs(tiny_synthetic, config, uses_item_graph=False)
    trainer = Trainer(
        cls.from_config(config, inputs), inputs, get_splits(tiny_synthetic), config, progress=False
    )
    steps = []
    original = trainer.optimizer.step

    def counting_step(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    trainer.optimizer.step = counting_step
    trainer.train_epoch(1, max_batches=3)
    assert len(steps) == 3
