r"""slerp by per-row coefficients, with the backward written out on them.

:func:`cm3_pyg.nn.slerp` is expressed as ``out = c_a a + c_b b (+ c_e e_k)``: the branch
selection runs on ``[N, 1]`` tensors and only a handful of passes touch the ``[N, d]`` rows.
:class:`_Slerp`'s backward is the chain rule on those coefficients (through the angle, the
plane's normaliser and the fallback axis) instead of autograd's ~50 recorded operations;
it gives no gradient for ``t``. Reference version: :func:`cm3_pyg.nn.reference.slerp`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["slerp"]


class _SlerpTerms(NamedTuple):
    """Per-row (``[N, 1]``) quantities of one slerp, forward values only."""

    coef_a: Tensor
    coef_b: Tensor
    coef_e: Tensor
    axis: Tensor  # fallback axis k (argmin |a_j|)
    a_norm: Tensor
    zero: Tensor  # either endpoint is a zero row
    dist_minus: Tensor  # ||a - b||
    dist_plus: Tensor  # ||a + b||
    theta: Tensor
    near: Tensor  # theta <= pi/2
    theta_near: Tensor  # theta on near rows, 0 elsewhere
    denom: Tensor  # sinc(theta_near / pi)
    cos_ab: Tensor
    r_norm: Tensor  # ||b - (a . b) a||, 1 on degenerate rows
    degenerate: Tensor  # ||r|| < 1e-6
    a_k: Tensor
    e_sq: Tensor  # 1 - 2 a_k^2 + a_k^2 ||a||^2 before the clamp
    e_norm: Tensor
    sin_t: Tensor  # sin(t theta)
    cos_t: Tensor  # cos(t theta)
    along: Tensor


def _slerp_coefficients(a: Tensor, b: Tensor, t: Tensor) -> _SlerpTerms:
    """The coefficients ``out = c_a a + c_b b + c_e e_k`` of :func:`slerp` (differentiable)."""
    norm = partial(torch.linalg.vector_norm, dim=-1, keepdim=True)
    a_norm, b_norm = norm(a), norm(b)
    # Unit-or-zero rows: a unit row cannot underflow to norm 0.
    a_zero, b_zero = a_norm == 0, b_norm == 0
    dist_minus, dist_plus = norm(a - b), norm(a + b)
    theta = 2.0 * torch.atan2(dist_minus, dist_plus)
    near = theta <= math.pi / 2

    # theta <= pi/2: sin(s*theta)/sin(theta) = s * sinc(s*theta/pi) / sinc(theta/pi); the
    # denominator is >= 2/pi here (theta is zeroed on the far rows so all stay finite).
    theta_near = torch.where(near, theta, torch.zeros_like(theta))
    denom = torch.sinc(theta_near / math.pi)
    coef_a_near = (1 - t) * torch.sinc((1 - t) * theta_near / math.pi) / denom
    coef_b_near = t * torch.sinc(t * theta_near / math.pi) / denom

    # theta > pi/2: cos(t theta) a + sin(t theta) u.
    cos_ab = (a * b).sum(dim=-1, keepdim=True)
    r_norm = norm(b - cos_ab * a)
    degenerate = r_norm < 1e-6
    r_norm = torch.where(degenerate, torch.ones_like(r_norm), r_norm)
    # Antipodal fallback u = (e_k - a_k a) / ||e_k - a_k a||, k the least aligned axis;
    # ||e_k - a_k a||^2 = 1 - 2 a_k^2 + a_k^2 ||a||^2 >= 1 - 1/d for a unit row.
    axis = a.abs().argmin(dim=-1, keepdim=True)
    a_k = a.gather(-1, axis)
    e_sq = 1.0 - 2.0 * a_k * a_k + a_k * a_k * a_norm * a_norm
    e_norm = e_sq.clamp_min(1e-12).sqrt()
    along = torch.where(degenerate, a_k / e_norm, cos_ab / r_norm)
    sin_t, cos_t = torch.sin(t * theta), torch.cos(t * theta)
    coef_a_far = cos_t - sin_t * along
    coef_b_far = torch.where(degenerate, torch.zeros_like(sin_t), sin_t / r_norm)
    coef_e_far = torch.where(degenerate, sin_t / e_norm, torch.zeros_like(sin_t))

    coef_a = torch.where(near, coef_a_near, coef_a_far)
    coef_b = torch.where(near, coef_b_near, coef_b_far)
    coef_e = torch.where(near, torch.zeros_like(coef_e_far), coef_e_far)
    # A zero endpoint: stay at the other one (applied without a data-dependent branch, so
    # there is no device sync on GPU).
    one, zero = torch.ones_like(coef_a), torch.zeros_like(coef_a)
    coef_a = torch.where(a_zero, zero, torch.where(b_zero, one, coef_a))
    coef_b = torch.where(a_zero, one, torch.where(b_zero, zero, coef_b))
    coef_e = torch.where(a_zero | b_zero, zero, coef_e)
    return _SlerpTerms(
        coef_a, coef_b, coef_e, axis, a_norm, a_zero | b_zero, dist_minus, dist_plus, theta,
        near, theta_near, denom, cos_ab, r_norm, degenerate, a_k, e_sq, e_norm, sin_t, cos_t,
        along,
    )  # fmt: skip


def _combine(a: Tensor, b: Tensor, terms: _SlerpTerms) -> Tensor:
    """``c_a a + c_b b + c_e e_k`` from :func:`_slerp_coefficients`."""
    return torch.addcmul(terms.coef_a * a, terms.coef_b, b).scatter_add(
        -1, terms.axis, terms.coef_e
    )


#: Below this ``|x|`` :func:`_sinc_slope` takes its Taylor series: the closed form cancels
#: (and ``x^2`` underflows for ``|x| < 1e-19``, which Beta(0.1, 0.1) draws of ``t`` reach).
SINC_SLOPE_SERIES_BELOW = 0.1


def _sinc_slope(x: Tensor) -> Tensor:
    """``d sinc(x) / dx = (pi x cos(pi x) - sin(pi x)) / (pi x^2)``, 0 at ``x = 0`` (as torch).

    For ``|x| <`` :data:`SINC_SLOPE_SERIES_BELOW` the series
    ``-pi^2 x / 3 + pi^4 x^3 / 30 - pi^6 x^5 / 840`` (next term below 1e-7 relative there).
    """
    pix = math.pi * x
    small = x.abs() < SINC_SLOPE_SERIES_BELOW
    pi_safe = math.pi * torch.where(small, torch.ones_like(x), x)
    closed = (pi_safe * torch.cos(pi_safe) - torch.sin(pi_safe)) * math.pi / (pi_safe * pi_safe)
    p2 = pix * pix
    series = -math.pi * pix / 3 * (1 - p2 / 10 + p2 * p2 / 280)
    return torch.where(small, series, closed)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (a norm's gradient at the origin)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class _Slerp(torch.autograd.Function):
    """:func:`slerp` with the backward written out on its per-row coefficients."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        terms = _slerp_coefficients(a, b, t)
        ctx.terms = terms
        ctx.save_for_backward(a, b, t)
        return _combine(a, b, terms)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, t = ctx.saved_tensors
        terms: _SlerpTerms = ctx.terms
        t = t.expand_as(terms.theta)
        zeros = torch.zeros_like(terms.theta)
        live = ~terms.zero  # zero-endpoint rows have constant coefficients
        far, deg = ~terms.near, terms.degenerate
        far_plane, far_axis = live & far & ~deg, live & far & deg
        g_a = (grad * a).sum(dim=-1, keepdim=True)  # dL/dc_a
        g_b = (grad * b).sum(dim=-1, keepdim=True)  # dL/dc_b
        g_e = grad.gather(-1, terms.axis)  # dL/dc_e
        sin_t, cos_t, along = terms.sin_t, terms.cos_t, terms.along

        # dL/dtheta. Near rows: c = s sinc(s u) / sinc(u), u = theta / pi, s = 1 - t or t.
        u = terms.theta_near / math.pi
        slope_u = _sinc_slope(u)
        d_near = (
            g_a * ((1 - t) ** 2 * _sinc_slope((1 - t) * u) - terms.coef_a * slope_u)
            + g_b * (t**2 * _sinc_slope(t * u) - terms.coef_b * slope_u)
        ) / (math.pi * terms.denom)
        # Far rows: c_a = cos(t theta) - sin(t theta) along, c_b = sin / r, c_e = sin / e.
        d_far = g_a * (-t * sin_t - t * cos_t * along)
        d_far = d_far + torch.where(
            deg, g_e * t * cos_t / terms.e_norm, g_b * t * cos_t / terms.r_norm
        )
        d_theta = torch.where(live, torch.where(terms.near, d_near, d_far), zeros)
        # theta = 2 atan2(s, p), s = ||a - b||, p = ||a + b||.
        s, p = terms.dist_minus, terms.dist_plus
        scale = 2.0 * d_theta / (s * s + p * p).clamp_min(torch.finfo(s.dtype).tiny)
        alpha = _safe_divide(scale * p, s)  # on a - b
        beta = _safe_divide(scale * s, p)  # on a + b
        grad_a_on_a, grad_a_on_b = alpha - beta, -alpha - beta
        grad_b_on_a, grad_b_on_b = -alpha - beta, alpha - beta

        # Far rows with a plane: along = (a . b) / ||r||, r = b - (a . b) a.
        cos_ab, r_norm = terms.cos_ab, terms.r_norm
        d_cos = torch.where(far_plane, -g_a * sin_t / r_norm, zeros)
        d_r = torch.where(
            far_plane, (g_a * sin_t * cos_ab - g_b * sin_t) / (r_norm * r_norm), zeros
        )
        r_scale = d_r / r_norm  # dL/dr = r_scale * r
        a_sq = terms.a_norm * terms.a_norm
        d_cos = d_cos - r_scale * (cos_ab - cos_ab * a_sq)  # r . a = (a . b)(1 - ||a||^2)
        grad_b_on_b = grad_b_on_b + r_scale
        grad_b_on_a = grad_b_on_a - r_scale * cos_ab + d_cos
        grad_a_on_b = grad_a_on_b - r_scale * cos_ab + d_cos
        grad_a_on_a = grad_a_on_a + r_scale * cos_ab * cos_ab

        # Far rows on the fallback axis: along = a_k / e, c_e = sin(t theta) / e,
        # e = sqrt(max(1 - 2 a_k^2 + a_k^2 ||a||^2, 1e-12)).
        e_norm, a_k = terms.e_norm, terms.a_k
        d_e = (g_a * sin_t * a_k - g_e * sin_t) / (e_norm * e_norm)
        d_e_sq = torch.where(far_axis & (terms.e_sq >= 1e-12), d_e / (2.0 * e_norm), zeros)
        d_a_k = torch.where(far_axis, -g_a * sin_t / e_norm, zeros)
        d_a_k = d_a_k + d_e_sq * (-4.0 * a_k + 2.0 * a_k * a_sq)
        d_a_norm = d_e_sq * 2.0 * a_k * a_k * terms.a_norm
        grad_a_on_a = grad_a_on_a + _safe_divide(d_a_norm, terms.a_norm)

        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = grad * terms.coef_a
            grad_a = grad_a.addcmul_(a, grad_a_on_a).addcmul_(b, grad_a_on_b)
            grad_a = grad_a.scatter_add_(-1, terms.axis, d_a_k)
        if ctx.needs_input_grad[1]:
            grad_b = grad * terms.coef_b
            grad_b = grad_b.addcmul_(a, grad_b_on_a).addcmul_(b, grad_b_on_b)
        return grad_a, grad_b, None


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """:func:`cm3_pyg.nn.slerp` of ``[N, d]`` rows for a ``t`` broadcastable to ``[N, 1]``
    that needs no gradient, by :class:`_Slerp`."""
    return _Slerp.apply(a, b, t)
