"""The studies' statistics (spo_min/stats.py) against independent references.

t quantiles: numerical integration of Student's t density (numpy, written from the density's
formula, independent of the closed-form series under test) and the printed tables. Paired
summaries: hand-computed values.
"""

import math

import numpy as np
import pytest

from spo_min import stats


def t_cdf_by_integration(t, dof):
    """P(T <= t) by the trapezoid rule on the density Gamma((v+1)/2) / (sqrt(v pi) Gamma(v/2)) (1 + x^2/v)^-(v+1)/2."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    x = np.linspace(0.0, abs(t), 200_001)
    density = np.exp(log_c - (dof + 1) / 2 * np.log1p(x * x / dof))
    half = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    return 0.5 + math.copysign(half, t)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 8, 9, 10, 17, 29, 30])
@pytest.mark.parametrize("t", [-2.7, 0.3, 1.0, 2.262, 6.0])
def test_t_cdf_matches_numerical_integration(t, dof):
    # 200k trapezoids on a smooth density: the quadrature error is far below 1e-9.
    assert stats.t_cdf(t, dof) == pytest.approx(t_cdf_by_integration(t, dof), abs=1e-9)


def test_t_quantiles_match_the_printed_tables():
    # Two-sided 5% (p = 0.975), one-sided 5% (0.95) and 0.80, as printed to 3 decimals in every
    # t table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2). The old study's table stopped at 9 dof
    # and fell back to 1.96 from 10 on: 10 dof is 2.228.
    table = {(0.975, 1): 12.706, (0.975, 2): 4.303, (0.975, 4): 2.776, (0.975, 9): 2.262, (0.975, 10): 2.228,
             (0.975, 19): 2.093, (0.975, 30): 2.042, (0.95, 1): 6.314, (0.95, 9): 1.833, (0.95, 30): 1.697,
             (0.80, 1): 1.376, (0.80, 9): 0.883, (0.80, 30): 0.854}
    for (p, dof), want in table.items():
        assert stats.t_quantile(p, dof) == pytest.approx(want, abs=6e-4), (p, dof)
    # And each quantile inverts the CDF.
    for dof in (1, 3, 12, 100):
        assert stats.t_cdf(stats.t_quantile(0.975, dof), dof) == pytest.approx(0.975, abs=1e-11)
    with pytest.raises(ValueError):
        stats.t_quantile(0.975, 0)


def test_paired_summary_by_hand():
    diffs = [0.1, 0.3, 0.2, 0.4, 0.0]
    s = stats.paired(diffs, band=0.05)
    sd = math.sqrt(sum((d - 0.2) ** 2 for d in diffs) / 4)  # 0.1581
    assert (s["n"], s["dof"]) == (5, 4) and s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(sd)
    assert s["half_width"] == pytest.approx(2.7764 * sd / math.sqrt(5), rel=1e-4)
    assert s["mde80"] == pytest.approx((2.7764 + 0.9410) * sd / math.sqrt(5), rel=1e-3)
    assert s["verdict"] == "higher" and not s["equivalent"]  # 95% CI [0.004, 0.396]


def test_paired_verdicts():
    tight_zero = [0.001, -0.002, 0.0015, -0.001, 0.0005, 0.0]
    assert stats.paired(tight_zero, band=0.01)["verdict"] == "equivalent within +-0.01"
    # Real but tiny: the 95% CI excludes 0 and the 90% CI sits inside the band.
    tiny = [0.0010, 0.0012, 0.0011, 0.0009, 0.0010]
    assert stats.paired(tiny, band=0.01, higher="SPO higher")["verdict"].startswith(
        "equivalent within +-0.01 (yet SPO higher: a real difference")
    noisy = [0.3, -0.25, 0.1, -0.2, 0.05]
    assert stats.paired(noisy, band=0.01)["verdict"] == "inconclusive"
    assert stats.paired([-0.5, -0.45, -0.55], band=0.01, lower="SPO lower")["verdict"] == "SPO lower"
    one = stats.paired([0.2], band=0.01)
    assert one["half_width"] is None and one["verdict"].startswith("one seed")
    with pytest.raises(ValueError, match="finite"):
        stats.paired([0.1, None], band=0.01)  # a missing seed is an error, never silently dropped
