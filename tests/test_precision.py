"""Reduced-precision products (cm3_pyg.nn.precision, config key ``precision``): bfloat16
operands against float64 computations of the same rounded operands, float32 elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from cm3_pyg.errors import ConfigError
from cm3_pyg.models import get_model_class
from cm3_pyg.nn import (
    ClampedCosineSimilarity,
    calibrated_uniformity_loss,
    feature_linear,
    info_nce_loss,
    reference,
    uniformity_loss,
    use_reference_math,
)
from cm3_pyg.nn import precision as precision_module
from cm3_pyg.nn.precision import (
    PRECISIONS,
    check_precision,
    compute_dtype,
    low_precision,
    matmul_precision,
    precision_supported,
    reduced_linear,
    reduced_matmul,
)
from cm3_pyg.training import load_config

BF16 = torch.bfloat16


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16, in float64."""
    return x.to(BF16).double()


def test_the_context_sets_and_restores_the_operand_dtype():
    assert compute_dtype() is None
    with matmul_precision("bf16"):
        assert compute_dtype() is BF16
        with matmul_precision("float32"):
            assert compute_dtype() is None
        assert compute_dtype() is BF16
    assert compute_dtype() is None
    with pytest.raises(ValueError, match="precision must be one of"), matmul_precision("fp16"):
        pass
    assert PRECISIONS == ("float32", "bf16")


def test_a_constant_table_is_converted_once_until_it_changes():
    x = torch.randn(6, 5)
    first = low_precision(x, BF16)
    assert first.dtype is BF16 and torch.equal(first.double(), _bf16_exact(x))
    assert low_precision(x, BF16) is first  # reused
    x.mul_(2.0)  # in place: the saved copy is stale
    second = low_precision(x, BF16)
    assert second is not first and torch.equal(second.double(), _bf16_exact(x))
    # a tensor autograd tracks is converted every time, differentiably
    w = torch.randn(3, 5, requires_grad=True)
    copy = low_precision(w, BF16)
    assert copy is not low_precision(w, BF16) and copy.requires_grad
    copy.float().sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert low_precision(first, BF16) is first


def test_reduced_matmul_rounds_the_operands_only():
    a, b = torch.randn(40, 64, dtype=torch.float32), torch.randn(64, 30)
    assert torch.equal(reduced_matmul(a, b), a @ b)  # no context: float32
    with matmul_precision("bf16"):
        out = reduced_matmul(a, b)
    assert out.dtype is torch.float32
    exact = _bf16_exact(a) @ _bf16_exact(b)
    # the bf16 product's result is rounded once more (8 bits of mantissa)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max())
    assert not torch.equal(out, a @ b)


@pytest.mark.parametrize("wide", [False, True])
def test_feature_linear_in_bf16_against_float64(wide):
    torch.manual_seed(0)
    d = 2304 if wide else 96  # both sides of the wide-input kernel's threshold
    x = torch.randn(300, d)
    weight = (torch.randn(24, d) / d**0.5).requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    with matmul_precision("bf16"):
        out = feature_linear(x, weight, bias)
    assert out.dtype is torch.float32
    exact = _bf16_exact(x) @ _bf16_exact(weight.detach()).t() + bias.detach().double()
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)
    fp32 = feature_linear(x, weight, bias)
    assert (out - fp32).abs().max() > 0  # the bf16 path ran
    grad_out = torch.randn_like(out)
    out.backward(grad_out)  # outside the context: the saved bf16 operands decide
    assert weight.grad.dtype is torch.float32
    exact_grad = _bf16_exact(grad_out).t() @ _bf16_exact(x)
    torch.testing.assert_close(
        weight.grad.double(), exact_grad, rtol=2e-2, atol=2e-2 * exact_grad.abs().max()
    )
    torch.testing.assert_close(bias.grad, grad_out.sum(0))  # the bias is added in float32


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _grads_close(ours: torch.Tensor, exact: torch.Tensor) -> None:
    """bf16 operands: the gradient's direction within ~6 degrees, its size within 10% (its
    terms nearly cancel on random rows, which amplifies the operands' 2**-9 rounding; the
    float32 kernels agree to ~1e-6)."""
    cos = torch.nn.functional.cosine_similarity(ours.double().flatten(), exact.flatten(), dim=0)
    rel = (ours.double() - exact).norm() / exact.norm()
    assert cos > 0.995 and rel < 0.1, (float(cos), float(rel))


@pytest.mark.parametrize("rows", [300, 1100])  # one tile, and several (TILE_ROWS = 512)
def test_uniformity_losses_in_bf16_against_float64(rows):
    x = _unit(rows, 48, 1).requires_grad_()
    features = _unit(rows, 20, 2).requires_grad_()
    counts = torch.randint(1, 4, (rows,)).float()
    x64 = x.detach().double().requires_grad_()
    f64 = features.detach().double().requires_grad_()
    exact_u = reference.uniformity_loss(x64, 2.0, counts=counts.double())
    exact_c = reference.calibrated_uniformity_loss(
        x64, ClampedCosineSimilarity(f64, 0.0, 1.0), 2.0, counts=counts.double()
    )
    (exact_u + exact_c).backward()
    with matmul_precision("bf16"):
        ours_u = uniformity_loss(x, 2.0, counts=counts)
        ours_c = calibrated_uniformity_loss(
            x, ClampedCosineSimilarity(features, 0.0, 1.0), 2.0, counts=counts
        )
    (ours_u + ours_c).backward()
    # exponents of unit rows carry about 4t * 2**-9 of rounding: the losses agree to ~1e-2
    assert abs(ours_u.item() - exact_u.item()) < 2e-2
    assert abs(ours_c.item() - exact_c.item()) < 2e-2
    _grads_close(x.grad, x64.grad)
    _grads_close(features.grad, f64.grad)
    # and float32 agrees far more closely: the bf16 path really ran
    with torch.no_grad():
        fp32 = uniformity_loss(x.detach(), 2.0, counts=counts)
    assert abs(fp32.item() - exact_u.item()) < 1e-5 < abs(ours_u.item() - exact_u.item())


def test_info_nce_in_bf16_against_float64():
    a = _unit(700, 32, 3).mul(3.0).requires_grad_()
    o = _unit(700, 32, 4).requires_grad_()
    a64 = a.detach().double().requires_grad_()
    o64 = o.detach().double().requires_grad_()
    exact = reference.info_nce_loss(a64, o64, 0.5)
    exact.backward()
    with matmul_precision("bf16"):
        ours = info_nce_loss(a, o, 0.5)
    ours.backward()
    assert abs(ours.item() - exact.item()) < 2e-2
    _grads_close(a.grad, a64.grad)
    _grads_close(o.grad, o64.grad)


def test_the_reference_math_stays_float32():
    x = torch.randn(50, 2304)
    w = torch.randn(8, 2304)
    with use_reference_math(), matmul_precision("bf16"):
        out = feature_linear(x, w)
        direct = reduced_linear(x, w)  # the fine-tuned encoders' path as well
        assert compute_dtype() is None
    torch.testing.assert_close(out, x @ w.t())
    torch.testing.assert_close(direct, x @ w.t())


def test_the_precision_key_is_checked(monkeypatch):
    cls = get_model_class("cm3")
    with pytest.raises(ConfigError, match="config key 'precision'.*one of"):
        load_config(cls.default_config(), overrides={"precision": "fp16"})
    assert load_config(cls.default_config())["precision"] == "float32"
    monkeypatch.setattr(precision_module, "precision_supported", lambda p, d="cpu": p == "float32")
    with pytest.raises(ConfigError, match="config key 'precision'.*AVX-512 BF16"):
        load_config(cls.default_config(), overrides={"precision": "bf16"})
    check_precision("float32")  # always available


@pytest.mark.skipif(
    not precision_supported("bf16", "cpu"), reason="no native bfloat16 products on this CPU"
)
def test_cm3_trains_in_bf16_close_to_float32():
    from cm3_pyg.data import make_synthetic
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits
    from cm3_pyg.training.trainer import Trainer, seed_everything

    data = make_synthetic(num_users=120, num_items=90, modality_dims={"image": 2304, "text": 40})
    cls = get_model_class("cm3")
    losses, valid = {}, {}
    for side in PRECISIONS:
        config = load_config(
            cls.default_config(), overrides={"precision": side, "train_batch_size": 256}
        )
        seed_everything(int(config["seed"]))
        inputs = build_graph_inputs(data, config, uses_item_graph=True)
        trainer = Trainer(
            cls.from_config(config, inputs), inputs, get_splits(data), config, progress=False
        )
        assert trainer.precision == side
        losses[side] = [trainer.train_epoch(epoch) for epoch in (1, 2, 3)]
        valid[side] = trainer.evaluate("valid")["recall@20"]
    # the same seed and data: the two runs differ by the rounding of the products only
    torch.testing.assert_close(
        torch.tensor(losses["bf16"]), torch.tensor(losses["float32"]), rtol=1e-2, atol=1e-2
    )
    assert losses["bf16"] != losses["float32"]
    assert abs(valid["bf16"] - valid["float32"]) < 0.1


# --- the accuracy comparison of benchmarks/precision_accuracy.py ----------------------------


def _fake_runs(folder, seeds, shift, precision, user_values=None):
    from cm3_pyg.metrics import PerUserMetrics
    from cm3_pyg.training import TEST_USERS_NAME, write_user_metrics

    for i, seed in enumerate(seeds):
        run = folder / f"seed{seed}"
        run.mkdir(parents=True)
        test = {m: 0.1 + 0.01 * i + shift for m in ("recall@20", "ndcg@20", "recall@10", "ndcg@10")}
        metrics = {
            "config": {"seed": seed, "precision": precision, "gamma": 0.9},
            "stop_reason": "early_stopping",
            "valid": {"recall@20": 0.11 + shift},
            "test": test,
            "best_epoch": 10 + i,
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
        if user_values is not None:
            values = {m: user_values + shift for m in test}
            per_user = PerUserMetrics(torch.arange(len(user_values)), values)
            write_user_metrics(run / TEST_USERS_NAME, per_user, [str(u) for u in range(4)])


def test_the_accuracy_report_pairs_seeds_and_users(tmp_path):
    import math

    from benchmarks.precision_accuracy import report

    users = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    _fake_runs(tmp_path / "a", [1, 2, 3], 0.0, "float32", users)
    _fake_runs(tmp_path / "b", [1, 2, 3], -0.002, "bf16", users)
    text = report(tmp_path / "a", tmp_path / "b", samples=200)
    assert "| 1 | 0.1100 | 0.1080 | 0.1000 | 0.0980 |" in text
    # every seed (and user) differs by exactly +0.002: zero spread, p = 0
    seeds_row = next(line for line in text.splitlines() if line.startswith("| recall@20 | seeds"))
    assert "| 3 | 0.1100 | 0.1080 | +0.0020 | +inf | 0 |" in seeds_row
    assert any(line.startswith("| recall@20 | users | 4 |") for line in text.splitlines())
    # a point that differs in more than precision is refused
    (tmp_path / "c").mkdir()
    _fake_runs(tmp_path / "c", [1, 2], 0.0, "bf16")
    saved = json.loads((tmp_path / "c" / "seed1" / "metrics.json").read_text())
    saved["config"]["gamma"] = 0.5
    (tmp_path / "c" / "seed1" / "metrics.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"differ in more than precision: \['gamma'\]"):
        report(tmp_path / "a", tmp_path / "c")
    assert math.isfinite(float(seeds_row.split("|")[4]))


@pytest.mark.parametrize("name", ["cm3", "lirdrec", "sea", "bm3", "freedom", "vbpr", "directau"])
def test_every_model_with_wide_products_takes_the_setting(name):
    """The models whose feature encoders or pairwise losses are covered change by rounding
    only under bf16: their loss moves, but by less than 1e-2 relative."""
    from cm3_pyg.data import make_synthetic
    from cm3_pyg.models import Batch
    from tests.model_helpers import a_batch, build

    data = make_synthetic(num_users=80, num_items=60, modality_dims={"image": 300, "text": 40})
    model, inputs, _ = build(name, data)
    model.train()
    batch = Batch(*a_batch(data, size=64))
    losses = {}
    for side in PRECISIONS:
        torch.manual_seed(0)  # the same dropout masks and fusion draws both times
        with torch.no_grad(), matmul_precision(side):
            losses[side] = model.loss_terms(inputs, batch).total.item()
    assert losses["bf16"] != losses["float32"], name
    assert abs(losses["bf16"] - losses["float32"]) <= 1e-2 * abs(losses["float32"]) + 1e-4
