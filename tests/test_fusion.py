"""slerp and SphericalBezierFusion against independent float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3_pyg.nn import SphericalBezierFusion, slerp


def unit(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def textbook_slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The acos formula, valid away from 0 and pi (float64)."""
    theta = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def test_slerp_matches_textbook_formula():
    a, b = unit(64, 16, 1), unit(64, 16, 2)
    t = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(slerp(a, b, t), textbook_slerp(a, b, t), atol=1e-12, rtol=1e-10)


def test_slerp_float32_matches_float64():
    a, b = unit(256, 32, 4), unit(256, 32, 5)
    t = torch.rand(256, 1, dtype=torch.float64)
    expected = textbook_slerp(a, b, t)
    got = slerp(a.float(), b.float(), t.float()).double()
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


def test_slerp_endpoints_and_scalar_t():
    a, b = unit(10, 8, 6), unit(10, 8, 7)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    torch.testing.assert_close(
        slerp(a, b, torch.full((10,), 0.5, dtype=torch.float64)), slerp(a, b, 0.5)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_degenerate_angles_finite_with_finite_gradients(dtype):
    a = unit(6, 5, 8, dtype)
    b = torch.stack(
        [a[0], a[1] + 1e-7, -a[2], -a[3] + 1e-7, a[4] * 0 + unit(1, 5, 9, dtype)[0], a[5]]
    )
    b = F.normalize(b, dim=-1)
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    t = torch.tensor([[0.3], [0.5], [0.5], [0.25], [0.7], [1.0]], dtype=dtype)
    out = slerp(a, b, t)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(6, dtype=dtype), atol=1e-5, rtol=0)
    # identical inputs: the path is the point itself
    torch.testing.assert_close(out[0], a[0].detach(), atol=1e-6, rtol=0)
    # antipodal at t=0.5: a unit vector orthogonal to a
    assert abs(float((out[2] * a[2]).sum().detach())) < 1e-5


def test_slerp_reference_float32_quirk_is_fixed():
    # The reference clamps cos at 1 - 1e-8, a no-op in float32, so identical rows give 0/0.
    a = unit(4, 8, 10, torch.float32)
    assert torch.isfinite(slerp(a, a.clone(), 0.3)).all()


vectors = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=4, max_size=4)


@settings(max_examples=200, deadline=None)
@given(vectors, vectors, st.floats(0, 1))
def test_slerp_properties(u, v, t):
    a = torch.tensor([u], dtype=torch.float64)
    b = torch.tensor([v], dtype=torch.float64)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    out = slerp(a, b, t)
    assert torch.isfinite(out).all()
    assert abs(float(out.norm()) - 1) < 1e-9
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # symmetric at the midpoint (unless antipodal, where the path is a free choice)
    if float((a * b).sum()) > -1 + 1e-6:
        torch.testing.assert_close(slerp(a, b, 0.5), slerp(b, a, 0.5), atol=1e-9, rtol=0)
    # constant angular speed: angle(a, out) = t * angle(a, b)
    theta = math.acos(max(-1.0, min(1.0, float((a * b).sum()))))
    moved = math.acos(max(-1.0, min(1.0, float((a * out).sum()))))
    assert abs(moved - t * theta) < 1e-6


def reference_two_modality_mix(
    img: torch.Tensor, txt: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The reference CM3's mixing (enoche/CM3 forward), re-derived in float64.

    The weight sin(t theta)/sin(theta) goes to the text projection and
    sin((1-t) theta)/sin(theta) to the image projection.
    """
    v0, v1 = F.normalize(txt, dim=1), F.normalize(img, dim=1)
    theta = torch.acos((v0 * v1).sum(1))
    tt = t.squeeze(1)
    a = (torch.sin(tt * theta) / torch.sin(theta)).unsqueeze(1)
    b = (torch.sin((1 - tt) * theta) / torch.sin(theta)).unsqueeze(1)
    return a * v0 + b * v1


def test_two_modalities_reproduce_reference_slerp():
    img, txt = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    t = torch.rand(50, 1, dtype=torch.float64)
    fusion = SphericalBezierFusion(2, alpha=0.5)
    torch.testing.assert_close(fusion([img, txt], t=t), reference_two_modality_mix(img, txt, t))


def test_three_modalities_de_casteljau():
    ps = [unit(30, 8, s) for s in (11, 12, 13)]
    t = torch.rand(30, 1, dtype=torch.float64)
    q0, q1 = textbook_slerp(ps[0], ps[1], t), textbook_slerp(ps[1], ps[2], t)
    expected = textbook_slerp(q0, q1, t)
    got = SphericalBezierFusion(3)([p * 3.0 for p in ps], t=t)  # scale must not matter
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(30, dtype=torch.float64))


def test_fusion_modes():
    xs = [torch.randn(40, 8) for _ in range(3)]
    fusion = SphericalBezierFusion(3, alpha=0.5)
    fusion.eval()
    torch.testing.assert_close(fusion(xs), fusion(xs, t=torch.full((40, 1), 0.5)))
    fusion.train()
    torch.manual_seed(0)
    t = fusion.sample_t(10000, xs[0])
    assert t.min() >= 0 and t.max() <= 1
    assert abs(float(t.mean()) - 0.5) < 0.02
    # Beta(a, a) variance = 1 / (4 (2a + 1))
    assert abs(float(t.var()) - 1 / (4 * 2)) < 0.01
    one = SphericalBezierFusion(1)
    torch.testing.assert_close(one([xs[0]]), F.normalize(xs[0], dim=-1))


def test_fusion_validation_and_repr():
    with pytest.raises(ValueError, match="num_modalities"):
        SphericalBezierFusion(0)
    with pytest.raises(ValueError, match="alpha"):
        SphericalBezierFusion(2, alpha=0)
    with pytest.raises(ValueError, match="expected 2"):
        SphericalBezierFusion(2)([torch.randn(3, 4)])
    assert (
        repr(SphericalBezierFusion(3, 0.1)) == "SphericalBezierFusion(num_modalities=3, alpha=0.1)"
    )


def _autograd_slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """slerp's coefficients differentiated by autograd (the reference for its hand backward)."""
    from cm3_pyg.nn.kernels.slerp import _combine, _slerp_coefficients

    return _combine(a, b, _slerp_coefficients(a, b, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slerp_hand_backward_equals_autograd_on_every_branch(dtype):
    # Rows on every branch: near and far angles, identical rows, antipodal rows (the
    # fallback axis), nearly antipodal, zero rows on either side or both, and rows that
    # are not unit (slerp is a function of any rows; its gradient must be the function's).
    g = torch.Generator().manual_seed(11)
    a = F.normalize(torch.randn(14, 6, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(14, 6, generator=g, dtype=torch.float64), dim=-1)
    b[0] = a[0]  # theta = 0
    b[1] = -a[1]  # antipodal: fallback axis
    b[2] = F.normalize(-a[2] + 1e-9, dim=-1)  # numerically antipodal
    b[3] = F.normalize(-a[3] + 0.3 * b[3], dim=-1)  # far, with a plane
    b[4] = F.normalize(a[4] + 0.2 * b[4], dim=-1)  # near
    a[5] = 0.0
    b[6] = 0.0
    a[7], b[7] = 0.0, 0.0
    a[8], b[8] = 1.7 * a[8], 0.6 * b[8]  # not unit
    a[9] = a[9] * 0.9  # not unit, antipodal-ish below
    b[9] = -a[9] / 0.9
    a, b = a.to(dtype), b.to(dtype)
    t = torch.rand(14, 1, generator=g, dtype=torch.float64).to(dtype)
    t[10], t[11] = 0.0, 1.0
    weights = torch.randn(14, 6, generator=g, dtype=torch.float64).to(dtype)

    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = slerp(x, y, t)
    got_grads = torch.autograd.grad((got * weights).sum(), (x, y))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = _autograd_slerp(x, y, t)
    want_grads = torch.autograd.grad((want * weights).sum(), (x, y))
    torch.testing.assert_close(got, want)
    rows, tol = torch.arange(14), {}
    if dtype == torch.float32:
        # Row 2 is antipodal up to float32 rounding: d theta / d a runs along
        # (a + b) / ||a + b||, which is rounding noise there, so two evaluation orders
        # legitimately disagree (both stay finite, checked below).
        rows, tol = rows[rows != 2], {"atol": 2e-4, "rtol": 1e-4}
    for ours, theirs in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours[rows], theirs[rows], **tol)


def test_slerp_hand_backward_passes_gradcheck_and_follows_t_with_grad():
    g = torch.Generator().manual_seed(12)
    a = torch.randn(8, 4, generator=g, dtype=torch.float64)
    b = torch.randn(8, 4, generator=g, dtype=torch.float64)
    b[:3] = -a[:3] + 0.2 * b[:3]  # far rows
    a = F.normalize(a, dim=-1).requires_grad_()
    b = F.normalize(b, dim=-1).requires_grad_()
    t = torch.rand(8, 1, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, q: slerp(p, q, t), (a, b))
    # a t that needs a gradient takes the autograd path: d out / d t exists
    tt = t.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: slerp(a.detach(), b.detach(), s), (tt,))


def test_sinc_slope_matches_float64_autograd_down_to_the_tiniest_arguments():
    from cm3_pyg.nn.kernels.slerp import _sinc_slope

    x = torch.tensor(
        [0.0, 1e-38, 1e-30, 1e-19, 1e-10, 1e-4, 0.05, 0.0999, 0.1, 0.3, 0.5, 0.9, -0.05, -0.7],
        dtype=torch.float64,
        requires_grad=True,
    )
    torch.sinc(x).sum().backward()
    got = _sinc_slope(x.detach().float()).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=2e-6)


def test_fusion_gradients_stay_finite_at_alpha_0_1():
    """Beta(0.1, 0.1) draws t as small as 1e-38 (the paper's grid has alpha = 0.1); the
    slerp kernel's backward divided by an underflowed t^2 there and returned NaN."""
    from cm3_pyg.nn import SphericalBezierFusion, use_reference_math

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    t = torch.tensor([[1e-38], [1e-30], [1e-20], [1e-8], [0.5], [1 - 1e-7]])
    grads = []
    for reference in (False, True):
        xs = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        fusion = SphericalBezierFusion(2, 0.1)
        if reference:
            with use_reference_math():
                out = fusion(xs, t=t)
        else:
            out = fusion(xs, t=t)
        (out * torch.arange(8.0)).sum().backward()
        grads.append([x.grad for x in xs])
    for ours, plain in zip(*grads, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)  # sampled t: no NaN gradient over many draws
    fusion = SphericalBezierFusion(2, 0.1).train()
    xs = [torch.randn(4000, 16).requires_grad_() for _ in range(2)]
    fusion(xs).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)
