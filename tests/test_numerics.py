"""Numerical edge cases of fusion, losses and the whole CM3 forward + loss.

Complements test_fusion.py / test_losses.py (which cover slerp at degenerate angles, loss
values against brute force and the calibrated-uniformity bounds on unit rows) with: zero
vectors, extreme feature scales end to end, one-row batches through ``CM3.loss``, and
property-based tests of the Bezier fusion for M >= 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cm3_pyg.data import bipartite_normalized_adjacency
from cm3_pyg.models import CM3, CM3Output
from cm3_pyg.nn import (
    SphericalBezierFusion,
    calibrated_uniformity_loss,
    cosine_similarity_matrix,
    feature_linear,
    normalize_rows,
    normalized_concat,
    slerp,
    to_adjacency,
    uniformity_loss,
)

NU, NI = 10, 8


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1e-12, 1.0, 1e12, 1e30, 3e37])
def test_normalize_rows_is_scale_invariant(scale: float) -> None:
    # F.normalize squares the entries: beyond ~1e19 (float32) the norm overflows to Inf
    # and rows collapse to 0; below ~1e-19 it underflows and rows stop being unit.
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    reference = F.normalize(x, dim=-1)
    got = normalize_rows((x * scale).requires_grad_())
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def test_normalize_rows_zero_rows_stay_zero_with_bounded_gradient() -> None:
    x = torch.zeros(3, 4)
    x[1] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    x.requires_grad_()
    out = normalize_rows(x)
    assert torch.equal(out[0].detach(), torch.zeros(4)) and torch.equal(out[2], out[0])
    torch.testing.assert_close(out[1].detach(), torch.tensor([0.6, 0.0, 0.8, 0.0]))
    (out * torch.randn(3, 4)).sum().backward()
    # F.normalize gives a zero row a gradient of 1/eps = 1e12; ours stays O(1).
    assert _all_finite(x.grad) and float(x.grad.abs().max()) < 10


def test_normalize_rows_gradient_matches_f_normalize() -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64)
    (g1,) = torch.autograd.grad((normalize_rows(x) * w).sum(), x)
    (g2,) = torch.autograd.grad((F.normalize(x, dim=-1) * w).sum(), x)
    torch.testing.assert_close(g1, g2)


def _divide_by_norm(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


@pytest.mark.parametrize("widths", [(3, 3, 3), (2, 5)])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_normalized_concat_matches_divide_by_norm_and_cat(widths: tuple[int, ...], scale: float):
    # Against x / ||x|| and torch.cat, autograd in float64 (the scales push a block off the
    # direct path in float32; the zero row stays zero and passes its gradient through).
    g = torch.Generator().manual_seed(4)
    groups = [[torch.randn(n, w, generator=g, dtype=torch.float64) for n in (4, 6)] for w in widths]
    groups[0][1][2] = 0.0
    groups[-1][0] = groups[-1][0] * scale
    leaves = [[b.clone().requires_grad_() for b in group] for group in groups]
    twins = [[b.clone().requires_grad_() for b in group] for group in groups]
    got = normalized_concat(leaves)
    expected = torch.cat([_divide_by_norm(torch.cat(group)) for group in twins], dim=-1)
    torch.testing.assert_close(got, expected)
    w = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((got * w).sum(), [b for group in leaves for b in group])
    theirs = torch.autograd.grad((expected * w).sum(), [b for group in twins for b in group])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours[1][2], w[6, : widths[0]])  # the zero row's gradient
    # float32 at the extreme scales: still exact unit rows
    small = [[b.float() for b in group] for group in groups]
    torch.testing.assert_close(
        normalized_concat(small), expected.detach().float(), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("width", [8, 2048])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_feature_linear_matches_f_linear(width: int, with_bias: bool, input_grad: bool):
    # 2048 columns take the transposed weight-gradient GEMM, 8 the autograd path.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, width, generator=g, dtype=torch.float64)
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    up = torch.randn(37, 5, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(input_grad), w.clone().requires_grad_()]
    twins = [x.clone().requires_grad_(input_grad), w.clone().requires_grad_()]
    if b is not None:
        leaves.append(b.clone().requires_grad_())
        twins.append(b.clone().requires_grad_())
    got = feature_linear(*leaves)
    assert ("FeatureLinear" in type(got.grad_fn).__name__) == (width >= 2048)
    want = F.linear(*twins)
    torch.testing.assert_close(got, want)
    wanted = [t for t in leaves if t.requires_grad]
    ours = torch.autograd.grad((got * up).sum(), wanted)
    theirs = torch.autograd.grad((want * up).sum(), [t for t in twins if t.requires_grad])
    for a, c in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, c)


def test_normalized_concat_validation() -> None:
    with pytest.raises(ValueError, match="at least one group"):
        normalized_concat([])
    with pytest.raises(ValueError, match=r"group 1 has blocks of \[2, 3\] rows"):
        normalized_concat(
            [[torch.ones(2, 2), torch.ones(4, 2)], [torch.ones(2, 2), torch.ones(3, 2)]]
        )
    with pytest.raises(ValueError, match="blocks of group 0 differ in width"):
        normalized_concat([[torch.ones(2, 2), torch.ones(2, 3)]])
    with pytest.raises(ValueError, match="one dtype"):
        normalized_concat([[torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float64)]])


# ----------------------------------------------------------------------------- fusion


def test_slerp_with_a_zero_endpoint_stays_at_the_other() -> None:
    b = _unit(4, 3, 1)
    zero = torch.zeros_like(b)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(slerp(zero, b, t), b)
        torch.testing.assert_close(slerp(b, zero, t), b)
    assert torch.equal(slerp(zero, zero, 0.5), zero)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_fusion_zero_inputs_finite_unit_and_differentiable(num_modalities: int) -> None:
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(num_modalities)]
    xs[0][0] = 0.0  # one modality without signal for item 0
    for x in xs:
        x[1] = 0.0  # no modality has signal for item 1
    xs = [x.requires_grad_() for x in xs]
    fusion = SphericalBezierFusion(num_modalities)
    for t in (None, torch.rand(5, 1, dtype=torch.float64)):
        out = fusion(xs, t=t)
        out.sum().backward()
        assert _all_finite(out, *(x.grad for x in xs))
        norms = out.norm(dim=-1).detach()
        torch.testing.assert_close(norms[[0, 2, 3, 4]], torch.ones(4, dtype=torch.float64))
        assert float(norms[1]) == 0.0  # no direction anywhere: the zero vector
        assert max(float(x.grad.abs().max()) for x in xs) < 1e3
    if num_modalities == 2:  # the zero control point is skipped
        torch.testing.assert_close(fusion(xs, t=t)[0], F.normalize(xs[1][0].detach(), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fusion_degenerate_control_points_three_modalities(dtype: torch.dtype) -> None:
    p = _unit(4, 6, 2, dtype)
    q = _unit(4, 6, 3, dtype)
    first = torch.stack([p[0], p[1], p[2], p[3]])
    middle = torch.stack([p[0], p[1] + 1e-7, -p[2], -p[3] + 1e-7])  # same, near, anti, near-anti
    last = torch.stack([p[0], q[1], p[2], q[3]])
    xs = [x.clone().requires_grad_() for x in (first, middle, last)]
    for t in (0.0, 0.5, 1.0, torch.rand(4, 1, dtype=dtype)):
        out = SphericalBezierFusion(3)(xs, t=t)
        out.sum().backward()
        assert _all_finite(out, *(x.grad for x in xs))
        torch.testing.assert_close(
            out.norm(dim=-1).detach(), torch.ones(4, dtype=dtype), atol=1e-5, rtol=0
        )
    # three identical control points: the curve is that point
    torch.testing.assert_close(out[0].detach(), p[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_fusion_extreme_scales_match_unit_scale(scale: float) -> None:
    xs = [torch.randn(20, 8) for _ in range(3)]
    t = torch.rand(20, 1)
    fusion = SphericalBezierFusion(3)
    expected = fusion(xs, t=t)
    got = fusion([x * scale for x in xs], t=t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


control_point = st.lists(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False), min_size=3, max_size=3
)


@settings(max_examples=150, deadline=None)
@given(st.lists(control_point, min_size=2, max_size=4), st.floats(0, 1))
def test_bezier_fusion_properties(points: list[list[float]], t: float) -> None:
    xs = [torch.tensor([p], dtype=torch.float64) for p in points]
    assume(all(float(x.norm()) > 1e-3 for x in xs))
    units = [F.normalize(x, dim=-1) for x in xs]
    # Away from antipodal neighbours (where the path is a free choice) every level of the
    # de Casteljau recursion stays below 180 degrees, so the properties are well defined.
    assume(all(float((a * b).sum()) > -0.99 for a, b in zip(units, units[1:], strict=False)))
    fusion = SphericalBezierFusion(len(xs))
    at = torch.full((1, 1), t, dtype=torch.float64)
    out = fusion(xs, t=at)
    assert _all_finite(out)
    assert abs(float(out.norm()) - 1.0) < 1e-9  # on the sphere
    zero, one = torch.zeros_like(at), torch.ones_like(at)
    torch.testing.assert_close(fusion(xs, t=zero), units[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(fusion(xs, t=one), units[-1], atol=1e-9, rtol=0)
    # B(P_0..P_n; t) = B(P_n..P_0; 1 - t), so the midpoint ignores the order
    half = torch.full_like(at, 0.5)
    torch.testing.assert_close(fusion(xs, t=half), fusion(xs[::-1], t=half), atol=1e-9, rtol=0)
    torch.testing.assert_close(fusion(xs, t=at), fusion(xs[::-1], t=1 - at), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- losses


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 10),
    log_scale=st.integers(-6, 6),
    s_min=st.floats(-1, 1),
    width=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_calibrated_uniformity_bounds_any_scale(
    n: int, log_scale: int, s_min: float, width: float, seed: int
) -> None:
    # The bounds hold for any rows, not only unit ones, and nothing overflows.
    s_max = min(1.0, s_min + width)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * 10.0**log_scale
    sim = s_min + (s_max - s_min) * torch.rand(n, n, generator=g, dtype=torch.float64)
    unif = float(uniformity_loss(x))
    cu = float(calibrated_uniformity_loss(x, sim))
    assert torch.isfinite(torch.tensor([unif, cu])).all()
    if n < 2:
        assert unif == cu == 0.0
        return
    assert unif + 4 * (1 - s_max) - 1e-9 * abs(unif) - 1e-9 <= cu
    assert cu <= unif + 4 * (1 - s_min) + 1e-9 * abs(unif) + 1e-9


def test_cosine_similarity_of_zero_and_extreme_rows() -> None:
    f = torch.tensor([[0.0, 0.0], [1e30, 1e30], [1e-30, 1e-30], [1.0, -1.0]])
    sim = cosine_similarity_matrix(f)
    assert _all_finite(sim)
    assert float(sim[1, 2]) == pytest.approx(1.0, abs=1e-6)
    assert float(sim[0, 1]) == 0.0 and float(sim[1, 3]) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- CM3


def _graph() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    users = torch.cat([torch.arange(NU), torch.randint(NU, (20,), generator=g)])
    items = torch.cat([torch.arange(NU) % NI, torch.randint(NI, (20,), generator=g)])
    index, weight = bipartite_normalized_adjacency(torch.stack([users, items]), NU, NI)
    ui_adj = to_adjacency(index, weight, NU + NI)
    item_index = torch.stack([torch.arange(NI), (torch.arange(NI) + 1) % NI])
    item_adj = to_adjacency(item_index, torch.full((NI,), 0.5), NI)
    return ui_adj, item_adj


def _forward_and_backward(
    model: CM3, feats: list[torch.Tensor], users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, CM3Output]:
    ui_adj, item_adj = _graph()
    model.zero_grad(set_to_none=True)
    out = model(feats, ui_adj, item_adj)
    loss = model.loss(out, users, pos, neg)
    loss.backward()
    return loss, out


def _grads_finite(model: CM3) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_cm3_all_zero_feature_rows() -> None:
    torch.manual_seed(0)
    model = CM3(NU, NI, [6, 4], embedding_dim=8)
    for proj in model.projections:  # zero bias: a zero feature row is a zero control point
        torch.nn.init.zeros_(proj.bias)
    feats = [torch.randn(NI, 6), torch.randn(NI, 4)]
    feats[0][2] = 0.0  # item 2: no image signal
    feats[0][3] = 0.0
    feats[1][3] = 0.0  # item 3: no signal at all
    users, pos, neg = torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([3, 2, 1])
    neg = torch.cat([neg, torch.tensor([3, 3, 2])])
    for train in (True, False):
        model.train(train)
        loss, out = _forward_and_backward(model, feats, users, pos, neg)
        assert _all_finite(loss, out.user, out.item, out.fused) and _grads_finite(model)
        norms = out.fused.norm(dim=-1).detach()
        assert float(norms[3]) == 0.0
        keep = torch.arange(NI) != 3
        torch.testing.assert_close(norms[keep], torch.ones(NI - 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_cm3_extreme_feature_scales_forward_loss_and_step(scale: float) -> None:
    torch.manual_seed(1)
    model = CM3(NU, NI, [6, 4], embedding_dim=8)
    feats = [torch.randn(NI, 6) * scale, torch.randn(NI, 4) * scale]
    users, pos, neg = torch.arange(NU), torch.arange(NU) % NI, (torch.arange(NU) + 3) % NI
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss, out = _forward_and_backward(model, feats, users, pos, neg)
        assert _all_finite(loss, out.user, out.item) and _grads_finite(model)
        torch.testing.assert_close(
            out.fused.norm(dim=-1).detach(), torch.ones(NI), atol=1e-5, rtol=0
        )
        optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_cm3_one_row_batches() -> None:
    torch.manual_seed(2)
    model = CM3(NU, NI, [6, 4], embedding_dim=8)
    feats = [torch.randn(NI, 6), torch.randn(NI, 4)]
    one = torch.tensor([4])
    loss, _ = _forward_and_backward(model, feats, one, torch.tensor([1]), torch.tensor([5]))
    assert _all_finite(loss) and _grads_finite(model)
    # uniformity terms vanish for one row, so the loss is the alignment term alone
    model.eval()
    ui_adj, item_adj = _graph()
    with torch.no_grad():
        out = model(feats, ui_adj, item_adj)
        expected = (normalize_rows(out.user[one]) - normalize_rows(out.item[[1]])).pow(2).sum()
        got = model.loss(out, one, torch.tensor([1]), torch.tensor([5]))
    torch.testing.assert_close(got, expected)
    # a batch whose rows are all the same (user, item, negative) is finite too
    same = torch.full((5,), 4)
    loss, _ = _forward_and_backward(model, feats, same, same % NI, (same + 1) % NI)
    assert _all_finite(loss) and _grads_finite(model)
