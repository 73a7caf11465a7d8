"""The statistics of the studies: paired comparisons with exact t quantiles, equivalence and power.

A study here trains two methods from the same seed (same base pi_0, same world, same batch
order) and compares them on one number per seed. So every comparison is PAIRED: d_i = a_i - b_i
per seed, and the question is whether the mean of d is 0, with n - 1 degrees of freedom.

    mean, sd           of the n paired differences
    95% interval       mean +- t(0.975, n-1) sd / sqrt(n)
    equivalence        TOST (two one-sided t-tests at 5%): equivalent within +-band when the 90%
                       interval mean +- t(0.95, n-1) sd / sqrt(n) lies inside (-band, +band)
    detectable effect  the difference a two-sided 5% test finds with 80% power, for this sd and n:
                       (t(0.975, n-1) + t(0.80, n-1)) sd / sqrt(n)   (the usual t approximation)

The verdict reads them in that order: "equivalent" first (a difference may be real and still
smaller than the band), then "higher" / "lower" when the 95% interval excludes 0, else
"inconclusive": no difference shown, and no equivalence either. Nothing is ever dropped: every
seed's difference enters, and a comparison with one seed gets no interval at all.

The t quantiles are exact for any number of degrees of freedom (no table, no normal fallback):
Student's t distribution with an integer nu has a closed-form CDF (Abramowitz & Stegun 26.7.3-4),
inverted by bisection. tests/test_stats.py checks it against numerical integration of the t
density and against the printed tables.
"""

from __future__ import annotations

import math


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` (a positive integer) degrees of freedom.

    A&S 26.7.3-4 give A(t) = P(|T| <= t) as a finite series in theta = atan(t / sqrt(dof)):
      dof odd:  A = (2/pi) (theta + sin(theta) [cos + 2/3 cos^3 + (2 4)/(3 5) cos^5 + ... up to cos^(dof-2)])
      dof even: A = sin(theta) [1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ... up to cos^(dof-2)]
    """
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2 == 1:
        series, term = 0.0, c  # cos, then each term times (k - 1)/k cos^2 for k = 3, 5, ...
        for k in range(3, dof + 1, 2):
            series += term
            term *= (k - 1) / k * c * c
        a = 2 / math.pi * (theta + s * series) if dof > 1 else 2 / math.pi * theta
    else:
        series, term = 0.0, 1.0  # 1, then each term times (k - 1)/k cos^2 for k = 2, 4, ...
        for k in range(2, dof + 1, 2):
            series += term
            term *= (k - 1) / k * c * c
        a = s * series
    return 0.5 + math.copysign(a / 2, t)


def t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p, for 0.5 < p < 1 (bisection on t_cdf to 1e-12)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:  # at dof = 1, p = 0.975 this stops at 16 (t = 12.706)
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def paired(diffs: list[float], band: float, higher: str = "higher", lower: str = "lower") -> dict:
    """Summary of paired differences (one per seed): n, dof, mean, sd, the 95% interval, TOST at
    +-band, the minimum detectable effect at 80% power, and the verdict (module docstring).

    `higher` / `lower` name what a positive / negative mean says (e.g. "SPO higher").
    """
    if not diffs:
        raise ValueError("no paired differences")
    if any(d is None or not math.isfinite(d) for d in diffs):
        raise ValueError(f"every seed must give a finite difference, got {diffs}")
    if not band > 0:
        raise ValueError(f"the equivalence band must be > 0, got {band}")
    n = len(diffs)
    mean = sum(diffs) / n
    out = {"n": n, "dof": n - 1, "diffs": list(diffs), "mean": mean, "band": band}
    if n < 2:
        return {**out, "sd": None, "half_width": None, "ci95": None, "ci90": None, "mde80": None,
                "equivalent": False, "verdict": "one seed: no interval, no verdict"}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t95, t90, t80 = t_quantile(0.975, n - 1), t_quantile(0.95, n - 1), t_quantile(0.80, n - 1)
    half, half90 = t95 * se, t90 * se
    equivalent = -band < mean - half90 and mean + half90 < band  # TOST at 5%
    different = abs(mean) > half
    if equivalent:
        verdict = f"equivalent within +-{band:.3g}"
        if different:
            verdict += f" (yet {higher if mean > 0 else lower}: a real difference, smaller than the band)"
    elif different:
        verdict = higher if mean > 0 else lower
    else:
        verdict = "inconclusive"
    return {**out, "sd": sd, "half_width": half, "ci95": [mean - half, mean + half],
            "ci90": [mean - half90, mean + half90], "t975": t95, "mde80": (t95 + t80) * se,
            "equivalent": equivalent, "verdict": verdict}


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and 95% t-interval half-width of independent values (None with fewer than 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def describe(s: dict, fmt: str = "+.4f") -> str:
    """One line: mean, 95% interval, n/dof, MDE and verdict of a `paired` summary."""
    if s["half_width"] is None:
        return f"{s['mean']:{fmt}} (n = 1: {s['verdict']})"
    return (f"{s['mean']:{fmt}} +- {s['half_width']:{fmt[1:]}} (95% CI; n = {s['n']}, dof = {s['dof']}; "
            f"detectable at 80% power: {s['mde80']:{fmt[1:]}}; band +-{s['band']:.3g}) -> {s['verdict']}")
