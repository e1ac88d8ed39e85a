"""Small statistics for study aggregation: sample moments and Student-t intervals.

Everything here is pure Python (``math`` only), so a study needs no scipy. The Student-t
quantile is found by bisection on the t CDF, which is computed from the regularized incomplete
beta function, itself evaluated by a continued fraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_TINY = 1e-300
_EPS = 1e-15
_MAX_TERMS = 500


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean (``None`` for no values)."""
    if not values:
        return None
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (divisor n - 1); ``None`` for fewer than two values."""
    if len(values) < 2:
        return None
    centre = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method.

    The fraction is 1 / (1 + d1 / (1 + d2 / (1 + ...))) with
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)) and
    d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)); it converges fast for
    x < (a + 1) / (a + b + 2).
    """

    def guard(value: float) -> float:
        return value if abs(value) > _TINY else _TINY

    # Lentz: f = C * D products; start with the d_1 term folded into D.
    numerator_c = 1.0
    denominator_d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = denominator_d
    for m in range(1, _MAX_TERMS):
        # even step, d_{2m}
        coef = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        denominator_d = 1.0 / guard(1.0 + coef * denominator_d)
        numerator_c = guard(1.0 + coef / numerator_c)
        result *= denominator_d * numerator_c
        # odd step, d_{2m+1}
        coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        denominator_d = 1.0 / guard(1.0 + coef * denominator_d)
        numerator_c = guard(1.0 + coef / numerator_c)
        step = denominator_d * numerator_c
        result *= step
        if abs(step - 1.0) < _EPS:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        a * math.log(x)
        + b * math.log1p(-x)
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction in its fast region
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`student_t_cdf`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided Student-t confidence interval for the mean: mean ± t_{(1+level)/2, n-1} s/√n.

    Returns ``None`` with fewer than two values (the interval is undefined).
    """
    if len(values) < 2:
        return None
    centre = mean(values)
    spread = sample_std(values)
    assert centre is not None and spread is not None
    half = student_t_quantile(0.5 + level / 2.0, len(values) - 1) * spread / math.sqrt(len(values))
    return centre - half, centre + half


def summarize(values: Sequence[float]) -> dict:
    """``{"n", "mean", "std"}`` of ``values`` (mean/std ``None`` where undefined)."""
    return {"n": len(values), "mean": mean(values), "std": sample_std(values)}
