"""The paired tests of ``cm3_pyg.experiments.significance`` against closed forms, numerical
integration in float64, exact enumeration and hand-worked cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cm3_pyg.experiments.significance import (
    LARGE_DF,
    holm,
    incomplete_beta,
    paired_t_test,
    pairwise_tests,
    sign_flip_p_value,
    t_two_sided_p,
)


def _simpson(f, lo: float, hi: float, intervals: int = 20_000) -> float:
    h = (hi - lo) / intervals
    total = f(lo) + f(hi)
    total += 4 * sum(f(lo + (2 * i - 1) * h) for i in range(1, intervals // 2 + 1))
    total += 2 * sum(f(lo + 2 * i * h) for i in range(1, intervals // 2))
    return total * h / 3


def _t_density(df: float):
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


@pytest.mark.parametrize(("a", "b", "x"), [(2, 3, 0.3), (5, 1.5, 0.8), (1, 1, 0.42), (7, 9, 0.5)])
def test_incomplete_beta_matches_numerical_integration(a, b, x) -> None:
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def density(u: float) -> float:
        return u ** (a - 1) * (1 - u) ** (b - 1) / math.exp(log_beta)

    want = _simpson(density, 0.0, x)
    assert math.isclose(incomplete_beta(a, b, x), want, rel_tol=1e-9)
    assert math.isclose(incomplete_beta(a, b, x) + incomplete_beta(b, a, 1 - x), 1.0, rel_tol=1e-13)
    assert incomplete_beta(a, b, 0.0) == 0.0 and incomplete_beta(a, b, 1.0) == 1.0
    with pytest.raises(ValueError, match="x must be in"):
        incomplete_beta(a, b, 1.5)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 6.0])
def test_t_p_value_closed_forms_and_integration(t) -> None:
    # one and two degrees of freedom have closed forms
    assert math.isclose(t_two_sided_p(t, 1), 1 - 2 / math.pi * math.atan(t), rel_tol=1e-12)
    assert math.isclose(t_two_sided_p(-t, 2), 1 - t / math.sqrt(2 + t * t), rel_tol=1e-12)
    for df in (3, 10, 57):
        want = 1 - 2 * _simpson(_t_density(df), 0.0, t)
        assert math.isclose(t_two_sided_p(t, df), want, rel_tol=1e-8, abs_tol=1e-12)
    # a large df tends to the normal, 2 (1 - Phi(t)), by about 2 phi(t) (t^3 + t) / (4 df)
    for df in (1e9, 1e12):
        normal = math.erfc(t / math.sqrt(2))
        first_order = math.exp(-t * t / 2) / math.sqrt(2 * math.pi) * (t**3 + t) / (2 * df)
        assert 0 <= t_two_sided_p(t, df) - normal <= 1.001 * first_order
    # the two routes meet where the expansion takes over
    below, above = t_two_sided_p(t, LARGE_DF), t_two_sided_p(t, LARGE_DF * (1 + 1e-12))
    assert math.isclose(below, above, rel_tol=1e-7)


def test_paired_t_test_hand_worked() -> None:
    # d = [1, 0, 2, -1]: mean 0.5, sd sqrt(5/3), t = 0.5 / (sd / 2), df 3
    got = paired_t_test([1, 2, 3, 4], [0, 2, 1, 5], ("x", "y"))
    sd = math.sqrt(5 / 3)
    assert (got.a, got.b, got.n) == ("x", "y", 4)
    assert math.isclose(got.mean_difference, 0.5) and math.isclose(got.effect_size, 0.5 / sd)
    assert math.isclose(got.t_statistic, 0.5 / (sd / 2), rel_tol=1e-12)
    want = 1 - 2 * _simpson(_t_density(3), 0.0, got.t_statistic)
    assert math.isclose(got.p_value, want, rel_tol=1e-8)
    assert math.isclose(got.mean_a, 2.5) and math.isclose(got.mean_b, 2.0)
    # the test is antisymmetric in its arguments
    back = paired_t_test([0, 2, 1, 5], [1, 2, 3, 4])
    assert math.isclose(back.t_statistic, -got.t_statistic) and back.p_value == got.p_value


def test_paired_t_test_degenerate_cases() -> None:
    same = paired_t_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same.p_value == 1.0 and same.effect_size == 0.0
    shifted = paired_t_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert shifted.p_value == 0.0 and shifted.effect_size == math.inf
    one = paired_t_test([1.0], [0.0])
    assert math.isnan(one.p_value) and one.mean_difference == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_t_test([1.0, math.nan], [1.0, 2.0])


def test_sign_flip_matches_exact_enumeration() -> None:
    diff = torch.tensor([0.3, -0.1, 0.25, 0.05, 0.4, -0.2, 0.15, 0.1], dtype=torch.float64)
    observed = abs(float(diff.sum()))
    flips = [
        abs(float((torch.tensor(s, dtype=torch.float64) * diff).sum())) >= observed - 1e-12
        for s in itertools.product((-1.0, 1.0), repeat=diff.numel())
    ]
    exact = sum(flips) / len(flips)
    got = sign_flip_p_value(diff, samples=40_000, seed=3)
    assert abs(got - exact) < 0.01  # Monte Carlo standard error ~0.0013
    assert sign_flip_p_value(diff, samples=40_000, seed=3) == got  # seeded
    assert sign_flip_p_value(torch.zeros(5), samples=99) == 1.0  # every flip ties
    with pytest.raises(ValueError, match="samples must be"):
        sign_flip_p_value(diff, samples=0)


def test_a_real_shift_is_found_and_noise_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(2000, generator=gen, dtype=torch.float64)
    noise = 0.2 * torch.randn(2000, generator=gen, dtype=torch.float64)
    better = paired_t_test(base + 0.05 + noise, base, randomization_samples=2000)
    assert better.p_value < 1e-10 and better.p_randomization is not None
    assert better.p_randomization == 1 / 2001  # no sign vector reaches the observed mean
    null = paired_t_test(base + noise, base + noise.flip(0), randomization_samples=2000)
    assert null.p_value > 0.05 and null.p_randomization > 0.05


def test_holm_hand_worked() -> None:
    got = holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    want = [0.03, 0.06, 0.06, 0.02]
    assert all(math.isclose(g, w) for g, w in zip(got, want, strict=True))
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    with_nan = holm([0.01, math.nan, 0.02])
    assert math.isnan(with_nan[1]) and with_nan[0] == 0.02 and with_nan[2] == 0.02


def test_pairwise_tests_cover_every_pair_with_holm() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(300, generator=gen, dtype=torch.float64)
    samples = {
        m: base + shift * torch.rand(300, generator=gen)
        for m, shift in (("a", 0.3), ("b", 0.0), ("c", 0.01))
    }
    tests = pairwise_tests(samples)
    assert [(t.a, t.b) for t in tests] == [("a", "b"), ("a", "c"), ("b", "c")]
    adjusted = holm([t.p_value for t in tests])
    assert [t.p_adjusted for t in tests] == adjusted
    assert all(t.p_adjusted >= t.p_value for t in tests)
