r"""Paired significance tests between models: is one model's lead more than noise?

Two models evaluated on the same ``n`` units (users, or seeds) give paired values
:math:`a_i, b_i` and differences :math:`d_i = a_i - b_i`, with mean :math:`\bar d` and sample
standard deviation :math:`s_d`.

* **Paired t-test.** :math:`t = \bar d / (s_d / \sqrt n)` with :math:`n - 1` degrees of
  freedom; the two-sided p-value is :math:`P(|T_{n-1}| \ge |t|) = I_{\nu / (\nu + t^2)}(\nu/2,
  1/2)` with :math:`\nu = n - 1` and :math:`I_x(a, b)` the regularised incomplete beta
  function (:func:`incomplete_beta`).
* **Effect size**: Cohen's :math:`d_z = \bar d / s_d` (the mean difference in units of its
  spread; about 0.2 is small, 0.5 medium, 0.8 large), reported next to the raw difference.
* **Sign-flip randomisation test** (distribution-free; per-user ranking metrics are far from
  normal, mostly zeros): under the null hypothesis each :math:`d_i` is as likely to have
  the opposite sign, so :math:`p = (1 + \#\{r : |\mathrm{mean}(s^{(r)} d)| \ge |\bar d|\}) /
  (1 + R)` over ``R`` random sign vectors :math:`s^{(r)} \in \{\pm 1\}^n`.
* **Holm's step-down correction** (:func:`holm`) over a family of tests (all pairs of models
  for one metric): sorted p-values :math:`p_{(1)} \le \dots \le p_{(m)}` become
  :math:`\max_{i \le j} \min(1, (m - i + 1) p_{(i)})`, which bounds the family-wise error rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = [
    "LARGE_DF",
    "PairedTest",
    "holm",
    "incomplete_beta",
    "paired_t_test",
    "pairwise_tests",
    "sign_flip_p_value",
    "t_two_sided_p",
]


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function :math:`I_x(a, b)` for ``a, b > 0`` and
    ``0 <= x <= 1``, by its continued fraction (modified Lentz), evaluated on the side of
    ``x`` where it converges fast (:math:`I_x(a, b) = 1 - I_{1-x}(b, a)`)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    return _incomplete_beta(a, b, x, 1.0 - x, math.log(x), math.log1p(-x))


def _incomplete_beta(a: float, b: float, x: float, y: float, log_x: float, log_y: float) -> float:
    """:math:`I_x(a, b)` for ``0 < x < 1`` with ``y = 1 - x`` and both logarithms given
    separately, exact where the caller has them (``t^2 / (df + t^2)``, ``-log1p(t^2 / df)``):
    ``a * log(x)`` with ``a ~ 1e8`` would otherwise lose digits to the rounding of ``x``."""
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, y, x, log_y, log_x)
    log_front = a * log_x + b * log_y - math.log(a) - _log_beta(a, b)
    return math.exp(log_front) * _beta_fraction(a, b, x)


def _log_beta(a: float, b: float) -> float:
    small, large = min(a, b), max(a, b)
    if large > 1e7:
        # lgamma(large + small) - lgamma(large) by its asymptotic series: the difference of
        # two ~1e8-sized lgamma values would lose ~1e-8 to rounding.
        rise = small * math.log(large) + small * (small - 1.0) / (2.0 * large)
        return math.lgamma(small) - rise
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_fraction(a: float, b: float, x: float, tolerance: float = 1e-15) -> float:
    """The continued fraction ``1 / (1 + d_1 / (1 + d_2 / ...))`` of :math:`I_x(a, b)`, with
    :math:`d_{2m} = m(b-m)x / ((a+2m-1)(a+2m))` and
    :math:`d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1))`."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < tolerance:
            return value
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


#: above this many degrees of freedom :func:`t_two_sided_p` uses the normal tail expansion
LARGE_DF = 1e7


def t_two_sided_p(t: float, df: float) -> float:
    """:math:`P(|T_{df}| \\ge |t|)` for Student's t with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    t2 = t * t
    if t2 == 0.0:
        return 1.0
    if df > LARGE_DF:
        # The continued fraction needs ~sqrt(df) terms and loses digits here; the normal
        # tail with its first-order correction, 2 phi(t) (t^3 + t) / (4 df), is exact to
        # O(df^-2) instead.
        density = math.exp(-t2 / 2.0) / math.sqrt(2.0 * math.pi)
        return min(
            1.0, math.erfc(abs(t) / math.sqrt(2.0)) + density * (t2 + 1.0) * abs(t) / (2.0 * df)
        )
    x, y = df / (df + t2), t2 / (df + t2)
    log_x, log_y = -math.log1p(t2 / df), math.log(t2) - math.log(df + t2)
    return min(1.0, _incomplete_beta(df / 2.0, 0.5, x, y, log_x, log_y))


@dataclass(frozen=True)
class PairedTest:
    """One paired comparison ``a`` against ``b`` over ``n`` units.

    ``p_value`` is the paired t-test's (two-sided), ``p_randomization`` the sign-flip
    test's (``None`` when not run), ``p_adjusted`` Holm's over the family it was tested in
    (``None`` outside a family). NaN p-values: fewer than two units.
    """

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    effect_size: float
    t_statistic: float
    p_value: float
    p_randomization: float | None = None
    p_adjusted: float | None = None


def _paired(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> tuple[Tensor, Tensor]:
    a_t = torch.as_tensor(a, dtype=torch.float64).flatten().cpu()
    b_t = torch.as_tensor(b, dtype=torch.float64).flatten().cpu()
    if a_t.numel() != b_t.numel():
        raise ValueError(f"paired samples need equal lengths, got {a_t.numel()} and {b_t.numel()}")
    if not (torch.isfinite(a_t).all() and torch.isfinite(b_t).all()):
        raise ValueError("paired samples must be finite")
    return a_t, b_t


def paired_t_test(
    a: Tensor | Sequence[float],
    b: Tensor | Sequence[float],
    names: tuple[str, str] = ("a", "b"),
    randomization_samples: int = 0,
    seed: int = 0,
) -> PairedTest:
    """The paired t-test of ``a`` against ``b`` (equal-length samples, unit ``i`` paired).

    Args:
        a, b: the two models' values on the same units.
        names: the models' names, kept in the result.
        randomization_samples: also run the sign-flip test with this many sign vectors
            (0: not run).
        seed: the sign-flip test's seed.
    """
    a_t, b_t = _paired(a, b)
    n = int(a_t.numel())
    diff = a_t - b_t
    mean_a = float(a_t.mean()) if n else math.nan
    mean_b = float(b_t.mean()) if n else math.nan
    mean = float(diff.mean()) if n else math.nan
    if n < 2:
        t, effect, p = math.nan, math.nan, math.nan
    else:
        sd = float(diff.std(correction=1))
        if sd == 0.0:  # every unit differs by the same amount
            effect = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
            t, p = (0.0, 1.0) if mean == 0.0 else (effect, 0.0)
        else:
            effect = mean / sd
            t = effect * math.sqrt(n)
            p = t_two_sided_p(t, n - 1)
    p_random = (
        sign_flip_p_value(diff, randomization_samples, seed) if randomization_samples else None
    )
    return PairedTest(names[0], names[1], n, mean_a, mean_b, mean, effect, t, p, p_random)


def sign_flip_p_value(
    differences: Tensor | Sequence[float], samples: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p-value of the sign-flip randomisation test of mean ``differences == 0``.

    ``(1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + samples)`` over ``samples`` seeded random
    sign vectors ``s`` (a valid p-value for any number of samples; never 0).
    """
    diff = torch.as_tensor(differences, dtype=torch.float64).flatten().cpu()
    if diff.numel() == 0:
        return math.nan
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    observed = abs(float(diff.sum()))
    # compare sums (not means) with a relative slack, so ties are not lost to rounding
    slack = 1e-12 * max(1.0, float(diff.abs().sum()))
    generator = torch.Generator().manual_seed(seed)
    at_least, chunk = 0, max(1, 4_000_000 // diff.numel())
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        signs = torch.randint(0, 2, (count, diff.numel()), generator=generator).double() * 2 - 1
        at_least += int(((signs @ diff).abs() >= observed - slack).sum())
    return (1 + at_least) / (1 + samples)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not
    counted in the family)."""
    indexed = sorted(
        ((p, i) for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda pair: pair[0]
    )
    family = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (family - rank) * p))
        adjusted[i] = running
    return adjusted


def pairwise_tests(
    samples: Mapping[str, Tensor | Sequence[float]],
    randomization_samples: int = 0,
    seed: int = 0,
) -> list[PairedTest]:
    """Every pair of ``samples`` (``{model: values on the same units}``), in insertion
    order, each tested ``a`` against ``b``, with Holm's correction over all the pairs."""
    tests = [
        paired_t_test(samples[a], samples[b], (a, b), randomization_samples, seed)
        for a, b in itertools.combinations(samples, 2)
    ]
    adjusted = holm([t.p_value for t in tests])
    return [replace(t, p_adjusted=p) for t, p in zip(tests, adjusted, strict=True)]
