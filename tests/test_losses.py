"""Losses against brute-force float64 computations (pdist over explicit pairs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3_pyg.nn import (
    ClampedCosineSimilarity,
    alignment_loss,
    bpr_loss,
    calibrated_uniformity_loss,
    cosine_similarity_matrix,
    pairwise_sq_distances,
    uniformity_loss,
)


def brute_uniformity(x: torch.Tensor, t: float) -> torch.Tensor:
    n = x.size(0)
    terms = [torch.exp(-t * (x[a] - x[b]).pow(2).sum()) for a in range(n) for b in range(a + 1, n)]
    return torch.log(torch.stack(terms).mean())


def brute_calibrated(x: torch.Tensor, sim: torch.Tensor, t: float) -> torch.Tensor:
    n = x.size(0)
    terms = [
        torch.exp(-t * ((x[a] - x[b]).pow(2).sum() - 2 + 2 * sim[a, b]))
        for a in range(n)
        for b in range(a + 1, n)
    ]
    return torch.log(torch.stack(terms).mean())


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_uniformity_value_and_gradient(t):
    x = unit(25, 6, 0).requires_grad_()
    got = uniformity_loss(x, t)
    expected = brute_uniformity(x, t)
    torch.testing.assert_close(got, expected)
    g1 = torch.autograd.grad(got, x)[0]
    g2 = torch.autograd.grad(expected, x)[0]
    torch.testing.assert_close(g1, g2)


def test_uniformity_non_unit_rows_and_duplicates():
    x = torch.randn(12, 4, dtype=torch.float64) * 3
    x[5] = x[2]  # duplicate rows are a pair at distance 0
    torch.testing.assert_close(uniformity_loss(x), brute_uniformity(x, 2.0))


def test_calibrated_uniformity_value_and_gradients():
    x = unit(20, 5, 1).requires_grad_()
    feats = torch.randn(20, 7, dtype=torch.float64, requires_grad=True)
    sim = cosine_similarity_matrix(feats, 0.0, 0.8)
    got = calibrated_uniformity_loss(x, sim)
    expected = brute_calibrated(x, sim, 2.0)
    torch.testing.assert_close(got, expected)
    ours = torch.autograd.grad(got, (x, feats), retain_graph=True)
    for a, b in zip(ours, torch.autograd.grad(expected, (x, feats)), strict=True):
        torch.testing.assert_close(a, b)


def test_only_upper_triangle_of_sim_is_read():
    x = unit(10, 4, 2)
    sim = torch.rand(10, 10, dtype=torch.float64)
    garbage = sim.clone()
    garbage.tril_(0).add_(torch.triu(sim, 1))  # same upper triangle, arbitrary lower part
    garbage += torch.tril(torch.full_like(sim, 7.0))
    torch.testing.assert_close(
        calibrated_uniformity_loss(x, sim), calibrated_uniformity_loss(x, garbage)
    )


def _expanded(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return rows.repeat_interleave(counts, dim=0)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_uniformity_with_counts_equals_repeated_rows(t):
    # A batch with repeated rows, given once each with multiplicities: same value and the
    # same gradient (summed over the copies) as brute force over every pair of positions.
    base = unit(9, 5, 3)
    counts = torch.tensor([1, 3, 1, 2, 1, 1, 4, 1, 2])
    x = base.clone().requires_grad_()
    got = uniformity_loss(x, t, counts=counts)
    y = base.clone().requires_grad_()
    expected = brute_uniformity(_expanded(y, counts), t)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(expected, y)[0])


@pytest.mark.parametrize(("s_min", "s_max"), [(0.0, 1.0), (0.1, 0.6), (None, None)])
def test_calibrated_fused_cosine_matches_brute_force_with_counts(s_min, s_max):
    base_x, base_f = unit(8, 6, 4), torch.randn(8, 5, dtype=torch.float64) * 2
    counts = torch.tensor([2, 1, 1, 3, 1, 1, 2, 1])
    x, f = base_x.clone().requires_grad_(), base_f.clone().requires_grad_()
    got = calibrated_uniformity_loss(x, ClampedCosineSimilarity(f, s_min, s_max), counts=counts)
    # Brute force over explicit positions; a row paired with its own copy uses the
    # clamped self-similarity, exactly as pdist + clamp(cos) over the repeated batch.
    y, g = base_x.clone().requires_grad_(), base_f.clone().requires_grad_()
    ye, ge = _expanded(y, counts), _expanded(g, counts)
    gn = ge / ge.norm(dim=-1, keepdim=True)
    sim = gn @ gn.t()
    if s_min is not None:
        sim = sim.clamp(s_min, s_max)
    expected = brute_calibrated(ye, sim, 2.0)
    torch.testing.assert_close(got, expected)
    ours = torch.autograd.grad(got, (x, f))
    theirs = torch.autograd.grad(expected, (y, g))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_fused_cosine_equals_explicit_similarity_matrix():
    x = unit(30, 6, 5).requires_grad_()
    f = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    a = calibrated_uniformity_loss(x, ClampedCosineSimilarity(f, 0.0, 0.7))
    b = calibrated_uniformity_loss(x, cosine_similarity_matrix(f, 0.0, 0.7))
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (x, f))
    gb = torch.autograd.grad(b, (x, f))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v)


def test_fused_cosine_clamp_gradient_at_the_bounds_follows_torch_clamp():
    # Axis-aligned features give cosines of exactly 0 and 1, equal to the clamp bounds:
    # torch.clamp passes the gradient there (min <= cos <= max), and so must the fused
    # kernel; a negative cosine (below min) gets none.
    f0 = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    x0 = unit(5, 4, 11)
    x, f = x0.clone().requires_grad_(), f0.clone().requires_grad_()
    got = calibrated_uniformity_loss(x, ClampedCosineSimilarity(f, 0.0, 1.0))
    y, g = x0.clone().requires_grad_(), f0.clone().requires_grad_()
    gn = g / g.norm(dim=-1, keepdim=True)
    expected = brute_calibrated(y, (gn @ gn.t()).clamp(0.0, 1.0), 2.0)
    torch.testing.assert_close(got, expected)
    ours, theirs = torch.autograd.grad(got, (x, f)), torch.autograd.grad(expected, (y, g))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_counts_validation():
    x = unit(4, 3, 6)
    with pytest.raises(ValueError, match="counts must have shape"):
        uniformity_loss(x, counts=torch.ones(3))
    with pytest.raises(ValueError, match="counts must be >= 1"):
        uniformity_loss(x, counts=torch.tensor([1, 0, 1, 1]))
    with pytest.raises(ValueError, match="sim.features must have 4 rows"):
        calibrated_uniformity_loss(x, ClampedCosineSimilarity(torch.randn(3, 2)))
    # one distinct row seen twice is one pair at distance 0: log(e^0) = 0
    torch.testing.assert_close(
        uniformity_loss(x[:1], counts=torch.tensor([2])), torch.zeros((), dtype=x.dtype)
    )


def test_cosine_similarity_matrix_clamped():
    f = torch.randn(9, 3, dtype=torch.float64)
    sim = cosine_similarity_matrix(f, 0.0, 0.5)
    dense = F.cosine_similarity(f.unsqueeze(1), f.unsqueeze(0), dim=-1).clamp(0.0, 0.5)
    torch.testing.assert_close(sim, dense)


def test_pairwise_sq_distances_matches_cdist():
    x = torch.randn(15, 6, dtype=torch.float64)
    torch.testing.assert_close(
        pairwise_sq_distances(x), torch.cdist(x, x).pow(2), atol=1e-10, rtol=0
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 12),
    s_min=st.floats(-1, 1),
    width=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_calibrated_uniformity_bounds(n, s_min, width, seed):
    s_max = min(1.0, s_min + width)
    x = unit(n, 5, seed)
    g = torch.Generator().manual_seed(seed + 1)
    sim = s_min + (s_max - s_min) * torch.rand(n, n, generator=g, dtype=torch.float64)
    t = 2.0
    unif = float(uniformity_loss(x, t))
    cu = float(calibrated_uniformity_loss(x, sim, t))
    assert unif + 2 * t * (1 - s_max) - 1e-9 <= cu <= unif + 2 * t * (1 - s_min) + 1e-9


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_calibrated_uniformity_constant_similarity(c):
    x = unit(16, 4, 5)
    sim = torch.full((16, 16), c, dtype=torch.float64)
    torch.testing.assert_close(
        calibrated_uniformity_loss(x, sim), uniformity_loss(x) + 2 * 2.0 * (1 - c)
    )


def test_extreme_scales_stay_finite():
    # all rows identical (collapsed) and far apart rows: log-sum-exp keeps both finite
    same = torch.ones(8, 4, dtype=torch.float32)
    assert float(uniformity_loss(same)) == pytest.approx(0.0, abs=1e-6)
    far = torch.eye(8, 8) * 1e4
    value = uniformity_loss(far)
    assert torch.isfinite(value)
    assert float(value) == pytest.approx(-2.0 * 2e8, rel=1e-4)


def test_shift_bound_falls_back_to_the_exact_maximum(monkeypatch):
    # On CPU each tile is shifted by an upper bound of the exponents known in advance; if
    # the sum then underflows (rows far apart) the exact maximum is used instead.
    from cm3_pyg.nn.kernels import pairwise

    shifts = []
    original = pairwise._exp_tiles

    def spy(*args, shift):
        shifts.append(shift)
        return original(*args, shift=shift)

    monkeypatch.setattr(pairwise, "_exp_tiles", spy)
    x = unit(12, 5, 3)
    counts = torch.tensor([1, 2, 1, 4, 1, 1, 1, 1, 3, 1, 1, 1])
    f = torch.randn(12, 4, dtype=torch.float64)
    value = calibrated_uniformity_loss(x, ClampedCosineSimilarity(f, 0.1, 0.9), counts=counts)
    # bound: 2 log max(m) - 2t min_sim, one pass only
    assert shifts == [pytest.approx(2 * math.log(4) - 2 * 2.0 * 0.1)]
    xe, fe = _expanded(x, counts), F.normalize(_expanded(f, counts), dim=-1)
    expected = brute_calibrated(xe, (fe @ fe.t()).clamp(0.1, 0.9), 2.0)
    torch.testing.assert_close(value, expected)

    shifts.clear()
    value = uniformity_loss(torch.eye(8, 8, dtype=torch.float64) * 1e4)
    assert shifts == [0.0, None]
    assert float(value) == pytest.approx(-2.0 * 2e8, rel=1e-9)


def test_single_row_batches_are_zero_and_differentiable():
    x = torch.randn(1, 4, requires_grad=True)
    loss = uniformity_loss(x) + calibrated_uniformity_loss(x, torch.ones(1, 1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros(1, 4))


def test_alignment_and_bpr():
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(alignment_loss(x, y), ((x - y).norm(dim=1) ** 2).mean())
    torch.testing.assert_close(alignment_loss(x, y, alpha=1), (x - y).norm(dim=1).mean())
    pos, neg = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    manual = (
        -sum(
            math.log(1 / (1 + math.exp(-(p - q))))
            for p, q in zip(pos.tolist(), neg.tolist(), strict=True)
        )
        / 10
    )
    assert float(bpr_loss(pos, neg)) == pytest.approx(manual, rel=1e-12)
    many = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(bpr_loss(pos, many), -F.logsigmoid(pos.unsqueeze(1) - many).mean())
    x.requires_grad_()
    alignment_loss(x, x.detach()).backward()
    assert torch.isfinite(x.grad).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        alignment_loss(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"sim must have shape \[3, 3\]"):
        calibrated_uniformity_loss(torch.randn(3, 2), torch.randn(2, 2))


@pytest.mark.parametrize("n", [8, 9])
@pytest.mark.parametrize("tile_rows", [3, 4, 10**9])
def test_upper_half_tiles_match_brute_force(monkeypatch, n, tile_rows):
    # The kernel forms the upper half of the symmetric pairwise matrix tile by tile; the
    # tile size is lowered here so small, brute-forceable inputs take that path (unequal
    # bands for N = 8 with 3 rows per tile, N = 9 with 4), or raised to one whole tile.
    from cm3_pyg.nn.kernels import pairwise

    monkeypatch.setattr(pairwise, "TILE_ROWS", tile_rows)
    parts = -(-n // tile_rows)
    assert len(pairwise._symmetric_tiles(n)) == parts * (parts + 1) // 2
    counts = torch.tensor([2, 1, 3, 1, 1, 2, 1, 1, 4][:n])
    base_x, base_f = unit(n, 6, 21), torch.randn(n, 5, dtype=torch.float64)
    base_s = torch.rand(n, n, dtype=torch.float64)
    base_s = (base_s + base_s.t()) / 2

    x, f, s = (base_x.clone().requires_grad_(), base_f.clone().requires_grad_(), base_s.clone())
    s.requires_grad_()
    got = (
        uniformity_loss(x, 2.0, counts=counts)
        + calibrated_uniformity_loss(x, ClampedCosineSimilarity(f, 0.0, 0.8), counts=counts)
        + calibrated_uniformity_loss(x, s, counts=counts)
    )
    y, g, r = (base_x.clone().requires_grad_(), base_f.clone().requires_grad_(), base_s.clone())
    r.requires_grad_()
    ye, ge = _expanded(y, counts), _expanded(g, counts)
    gn = ge / ge.norm(dim=-1, keepdim=True)
    re = r[torch.repeat_interleave(torch.arange(n), counts)][
        :, torch.repeat_interleave(torch.arange(n), counts)
    ]
    expected = (
        brute_uniformity(ye, 2.0)
        + brute_calibrated(ye, (gn @ gn.t()).clamp(0.0, 0.8), 2.0)
        + brute_calibrated(ye, re, 2.0)
    )
    torch.testing.assert_close(got, expected)
    ours = torch.autograd.grad(got, (x, f, s))
    theirs = torch.autograd.grad(expected, (y, g, r))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1024])
@pytest.mark.parametrize("temperature", [0.2, 1.0, 0.01])
def test_info_nce_blocks_match_full_logsumexp(block_rows, temperature):
    from cm3_pyg.nn import info_nce_loss

    g = torch.Generator().manual_seed(3)
    base_a = F.normalize(torch.randn(50, 6, generator=g, dtype=torch.float64), dim=-1)
    base_o = F.normalize(torch.randn(50, 6, generator=g, dtype=torch.float64), dim=-1)
    a, o = base_a.clone().requires_grad_(), base_o.clone().requires_grad_()
    got = info_nce_loss(a, o, temperature, block_rows=block_rows)
    b, p = base_a.clone().requires_grad_(), base_o.clone().requires_grad_()
    logits = b @ p.t() / temperature
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    torch.testing.assert_close(got, expected)
    ours, theirs = torch.autograd.grad(got, (a, o)), torch.autograd.grad(expected, (b, p))
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y)


def test_info_nce_default_blocks_hold_about_the_configured_logits(monkeypatch):
    import cm3_pyg.nn.losses as losses

    seen: list[int] = []
    kernel = losses.pairwise.info_nce

    def spy(a, o, block_rows):
        seen.append(block_rows)
        return kernel(a, o, block_rows)

    monkeypatch.setattr(losses.pairwise, "info_nce", spy)
    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(300, 5, generator=g, dtype=torch.float64), dim=-1)
    o = F.normalize(torch.randn(300, 5, generator=g, dtype=torch.float64), dim=-1)
    expected = -torch.log_softmax(a @ o.t() / 0.5, dim=1).diagonal().mean()
    monkeypatch.setattr(losses, "INFO_NCE_BLOCK_ELEMENTS", 300 * 100)
    torch.testing.assert_close(losses.info_nce_loss(a, o, 0.5), expected)
    monkeypatch.setattr(losses, "INFO_NCE_BLOCK_ELEMENTS", 10)  # never below 64 rows
    torch.testing.assert_close(losses.info_nce_loss(a, o, 0.5), expected)
    assert seen == [100, 64]


def test_info_nce_validation_and_empty_input():
    from cm3_pyg.nn import info_nce_loss

    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(torch.zeros(3, 2), torch.zeros(3, 2), 0.0)
    with pytest.raises(ValueError, match="block_rows"):
        info_nce_loss(torch.zeros(3, 2), torch.zeros(3, 2), block_rows=0)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert float(info_nce_loss(empty, empty)) == 0.0


def test_bpr_and_uniformity_refuse_mismatched_or_invalid_arguments():
    with pytest.raises(ValueError, match=r"bpr_loss needs pos_scores \[N\]"):
        bpr_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="bpr_loss"):
        bpr_loss(torch.randn(3), torch.randn(4, 2))
    assert torch.isfinite(bpr_loss(torch.randn(3), torch.randn(3, 2)))
    for t in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature t"):
            uniformity_loss(torch.randn(4, 3), t=t)
