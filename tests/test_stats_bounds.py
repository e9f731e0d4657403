"""Unit tests of the pure statistics: exact values, edge cases, and bad-parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st
from scipy.optimize import brentq
from scipy.special import betaln, logsumexp

from surrogate_cert.core import stats
from surrogate_cert.core.errors import InvalidParameterError


# --------------------------------------------------------------------------- Clopper-Pearson
def test_clopper_pearson_matches_beta_quantiles():
    k = np.array([1, 5, 37, 99])
    n = np.array([10, 10, 100, 100])
    lower, upper = stats.clopper_pearson(k, n, 0.05)
    np.testing.assert_allclose(lower, st.beta.ppf(0.025, k, n - k + 1), rtol=1e-12)
    np.testing.assert_allclose(upper, st.beta.ppf(0.975, k + 1, n - k), rtol=1e-12)
    # Reference value (statsmodels proportion_confint(5, 10, method="beta")).
    lo, up = stats.clopper_pearson(5, 10, 0.05)
    assert lo == pytest.approx(0.1870860284474045, abs=1e-12)
    assert up == pytest.approx(0.8129139715525955, abs=1e-12)


def test_clopper_pearson_is_exact_at_the_ends():
    lo, up = stats.clopper_pearson(0, 20, 0.1)
    assert lo == 0.0 and up == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-12)
    lo, up = stats.clopper_pearson(20, 20, 0.1)
    assert up == 1.0 and lo == pytest.approx(0.05 ** (1 / 20), abs=1e-12)


def test_lower_confidence_bound_is_one_sided_at_alpha():
    k, n, alpha = np.array([0, 480, 1000]), 1000, 1e-3
    lower = stats.lower_confidence_bound(k, n, alpha)
    assert lower[0] == 0.0
    np.testing.assert_allclose(lower[1:], st.beta.ppf(alpha, k[1:], n - k[1:] + 1), rtol=1e-12)
    assert lower[2] == pytest.approx(alpha ** (1 / n), abs=1e-12)
    np.testing.assert_allclose(lower, stats.clopper_pearson(k, n, 2 * alpha)[0])


def test_radius_and_threshold_are_inverse_with_abstain_convention():
    sigma = 0.5
    p = np.array([0.2, 0.5, 0.8, 0.999])
    r = stats.radius(p, sigma)
    assert r[0] == 0.0 and r[1] == 0.0
    np.testing.assert_allclose(r[2:], sigma * st.norm.ppf(p[2:]))
    np.testing.assert_allclose(stats.p_threshold(r[2:], sigma), p[2:])
    assert stats.radius(0.5 + 1e-9, sigma) > 0


def test_predict_test_is_cohens_binomial_test():
    assert stats.predict_test(60, 40, 0.05) is False  # p = 0.057
    assert stats.predict_test(62, 38, 0.05) is True  # p = 0.021
    assert stats.predict_test(0, 0, 0.05) is False


# --------------------------------------------------------------------------- confidence sequence
def _log_m_minus_level(q, s, t, alpha, a, b, w):
    a, b, w = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (a, b, w))
    log_marginal = logsumexp(np.log(w / w.sum()) + betaln(a + s, b + t - s) - betaln(a, b))
    return log_marginal - s * np.log(q) - (t - s) * np.log1p(-q) - np.log(1 / alpha)


@pytest.mark.parametrize(
    "s,t,alpha,a,b,w",
    [
        (3, 10, 0.05, 0.5, 0.5, 1.0),
        (480, 500, 1e-3, 0.5, 0.5, 1.0),
        (9990, 10_000, 1e-3, 0.5, 0.5, 1.0),
        (57, 100, 0.1, 2.0, 7.0, 1.0),
        (195, 200, 1e-3, [0.5, 99.0], [0.5, 1.0], [0.1, 0.9]),  # KT + surrogate mixture
        (20, 200, 1e-3, [0.5, 99.0], [0.5, 1.0], [0.1, 0.9]),  # surrogate prior badly wrong
    ],
)
def test_beta_binomial_cs_matches_brentq(s, t, alpha, a, b, w):
    weights = None if np.ndim(a) == 0 else w
    lower, upper = stats.beta_binomial_cs(s, t, alpha, a, b, weights)
    args = (s, t, alpha, a, b, w)
    ref_lower = brentq(_log_m_minus_level, 1e-300, s / t, args=args, xtol=1e-15, rtol=1e-15)
    ref_upper = brentq(_log_m_minus_level, s / t, 1 - 1e-16, args=args, xtol=1e-15, rtol=1e-15)
    assert lower == pytest.approx(ref_lower, abs=1e-10)
    assert upper == pytest.approx(ref_upper, abs=1e-10)
    # Rounded outward: the returned ends are outside (or on) the exact confidence set.
    assert lower <= ref_lower + 1e-15 and upper >= ref_upper - 1e-15
    assert lower < s / t < upper


def test_beta_binomial_cs_is_exact_at_the_ends_and_vectorised():
    s = np.array([0, 50, 50, 0])
    t = np.array([50, 50, 100, 0])
    lower, upper = stats.beta_binomial_cs(s, t, 0.01)
    assert lower[0] == 0.0 and upper[1] == 1.0
    assert (lower[3], upper[3]) == (0.0, 1.0)  # no data yet: the whole unit interval
    for i in range(3):
        lo, up = stats.beta_binomial_cs(s[i], t[i], 0.01)
        assert (lo, up) == (lower[i], upper[i])
    # Per-element alpha and priors broadcast.
    lo2, _ = stats.beta_binomial_cs(s[:3], t[:3], np.array([0.01, 0.01, 0.5]))
    assert lo2[2] > lower[2]


def test_mixture_prior_loses_at_most_log_one_over_w():
    # The mixture's log-evidence is at least log(w) + the component's, so its interval at alpha is
    # inside the KT interval at alpha * w.
    s, t = 930, 1000
    a, b, w = stats.surrogate_prior(np.array([0.2]), kappa=100.0, w=0.25)  # surrogate far off
    mix = stats.beta_binomial_cs(np.array([s]), np.array([t]), 0.01, a, b, w)
    kt = stats.beta_binomial_cs(s, t, 0.01 * 0.25)
    assert mix[0][0] >= kt[0] - 1e-12 and mix[1][0] <= kt[1] + 1e-12


def test_informative_prior_tightens_the_bound():
    a, b, w = stats.surrogate_prior(np.array([0.97]), kappa=200.0, w=0.1)
    mix_lower = stats.beta_binomial_cs(np.array([97]), np.array([100]), 1e-3, a, b, w)[0][0]
    assert mix_lower > stats.beta_binomial_cs(97, 100, 1e-3)[0]


def test_running_intersection_is_monotone():
    rng = np.random.default_rng(0)
    x = rng.random(2000) < 0.8
    t = np.arange(1, 2001)
    lower, upper = stats.beta_binomial_cs(np.cumsum(x), t, 0.05)
    lo_star, up_star = 0.0, 1.0
    los, ups = [], []
    for lo, up in zip(lower, upper):
        lo_star, up_star = stats.running_intersection(lo_star, up_star, lo, up)
        los.append(lo_star)
        ups.append(up_star)
    assert np.all(np.diff(los) >= 0) and np.all(np.diff(ups) <= 0)
    assert los[-1] >= lower.max() and ups[-1] <= upper.min()
    assert los[-1] < 0.8 < ups[-1]


# --------------------------------------------------------------------------- conformal helpers
def test_conformal_ranks():
    assert stats.conformal_rank(99, 0.1) == 90
    assert stats.conformal_quantile(np.arange(99.0), 0.1) == 89.0
    assert stats.conformal_quantile(np.arange(5.0), 0.1) == float("inf")
    m = stats.min_calibration_size(0.1)
    assert stats.conformal_rank(m, 0.1) <= m and stats.conformal_rank(m - 1, 0.1) > m - 1
    k = stats.pac_conformal_rank(1000, 0.1, 0.01)
    assert st.beta.cdf(0.9, k, 1001 - k) <= 0.01 < st.beta.cdf(0.9, k - 1, 1002 - k)
    m = stats.min_calibration_size(0.1, 0.01)
    assert stats.pac_conformal_rank(m, 0.1, 0.01) <= m and stats.pac_conformal_rank(m - 1, 0.1, 0.01) > m - 1


# --------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.clopper_pearson(3, 10, alpha)
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.lower_confidence_bound(3, 10, alpha)
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.beta_binomial_cs(3, 10, alpha)
    with pytest.raises(InvalidParameterError, match="alpha"):
        stats.beta_binomial_cs(np.array([3, 4]), 10, np.array([0.1, alpha]))


def test_bad_counts_and_priors_are_rejected():
    with pytest.raises(InvalidParameterError, match="k"):
        stats.clopper_pearson(11, 10, 0.1)
    with pytest.raises(InvalidParameterError, match="s"):
        stats.beta_binomial_cs(-1, 10, 0.1)
    for a, b in [(0.0, 1.0), (1.0, -2.0), (float("nan"), 1.0)]:
        with pytest.raises(InvalidParameterError, match="prior"):
            stats.beta_binomial_cs(3, 10, 0.1, a, b)
    with pytest.raises(InvalidParameterError, match="weights"):
        stats.beta_binomial_cs(3, 10, 0.1, [0.5, 1.0], [0.5, 1.0], [-0.5, 1.5])
    with pytest.raises(InvalidParameterError, match="kappa"):
        stats.surrogate_prior([0.9], kappa=0.0, w=0.1)
    with pytest.raises(InvalidParameterError, match="w"):
        stats.surrogate_prior([0.9], kappa=10.0, w=1.5)
    with pytest.raises(InvalidParameterError, match="epsilon"):
        stats.conformal_rank(100, 0.0)
