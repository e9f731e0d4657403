"""The Beta-binomial confidence sequence covers p at every time at once, with probability >= 1 - alpha.

One vectorised call tabulates ``(L_t, U_t)`` for every ``(s, t)`` up to the horizon; 10^4 Bernoulli
streams then look up their running sums. A stream is a miss if ``p`` leaves the interval at ANY t.
The same check catches a fixed-n Clopper-Pearson interval re-checked at every t (peeking).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from surrogate_cert.core import stats

HORIZON = 400
STREAMS = 10_000
ALPHA = 0.1


def _table(alpha, bounds, **prior):
    t = np.repeat(np.arange(HORIZON + 1), HORIZON + 1).reshape(HORIZON + 1, HORIZON + 1)
    s = np.tile(np.arange(HORIZON + 1), HORIZON + 1).reshape(HORIZON + 1, HORIZON + 1)
    ok = s <= t
    lower = np.zeros(t.shape)
    upper = np.ones(t.shape)
    lower[ok], upper[ok] = bounds(s[ok], t[ok], alpha, **prior)
    return lower, upper  # indexed [t, s]


def _misses(p, lower, upper, seed):
    rng = np.random.default_rng(seed)
    draws = rng.random((STREAMS, HORIZON), dtype=np.float32) < p
    s = np.cumsum(draws, axis=1)
    t = np.arange(1, HORIZON + 1)
    out = (lower[t, s] > p) | (upper[t, s] < p)
    return int(out.any(axis=1).sum())


def _allowed(alpha):
    return st.binom.ppf(0.999, STREAMS, alpha)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.995])
def test_kt_confidence_sequence_covers_uniformly_over_time(p):
    lower, upper = _table(ALPHA, stats.beta_binomial_cs)
    assert _misses(p, lower, upper, seed=int(p * 1000)) <= _allowed(ALPHA)


@pytest.mark.parametrize("p_tilde", [0.98, 0.3])  # right and badly wrong surrogate
def test_mixture_prior_confidence_sequence_covers_uniformly(p_tilde):
    a, b, w = stats.surrogate_prior(np.array(p_tilde), kappa=100.0, w=0.1)
    lower, upper = _table(ALPHA, stats.beta_binomial_cs, a=a, b=b, weights=w)
    assert _misses(0.9, lower, upper, seed=7) <= _allowed(ALPHA)


def test_peeking_at_a_fixed_n_interval_fails_the_same_check():
    lower, upper = _table(ALPHA, stats.clopper_pearson)
    misses = _misses(0.9, lower, upper, seed=11)
    assert misses > 2 * _allowed(ALPHA)


@pytest.mark.parametrize("p0", [0.85, 0.95])  # truncation below and above the true p = 0.9
def test_truncated_prior_confidence_sequence_covers_uniformly(p0):
    a, b, w, lo, hi = stats.truncated_prior(np.array(p0), w=0.9)
    lower, upper = _table(ALPHA, stats.beta_binomial_cs, a=a, b=b, weights=w, support_lo=lo, support_hi=hi)
    assert _misses(0.9, lower, upper, seed=13) <= _allowed(ALPHA)


@pytest.mark.parametrize("p", [0.995, 0.7])  # near 1, where it puts its mass, and far from it
def test_radius_prior_confidence_sequence_covers_uniformly(p):
    a, b, w, lo, hi = stats.radius_prior()
    lower, upper = _table(ALPHA, stats.beta_binomial_cs, a=a, b=b, weights=w, support_lo=lo, support_hi=hi)
    assert _misses(p, lower, upper, seed=19) <= _allowed(ALPHA)


@pytest.mark.parametrize("p", [0.84, 0.8])  # on the boundary p = p0 and below it
def test_truncated_test_of_p_above_p0_rejects_at_most_alpha_of_the_time(p):
    # Under p <= p0 the test fires (certifies p >= p0) on at most an alpha share of the streams, at any time.
    p0 = 0.84
    s = np.arange(HORIZON + 1)[None, :]
    t = np.arange(HORIZON + 1)[:, None]
    ok = s <= t
    prior = stats.truncated_prior(np.array(p0))
    fires = np.zeros((HORIZON + 1, HORIZON + 1), dtype=bool)
    ss, tt = np.broadcast_arrays(s, t)
    m = stats.beta_mixture_log_marginal(ss[ok], tt[ok], *prior)
    fires[ok] = stats.threshold_test(ss[ok], tt[ok], p0, ALPHA, m) == 1
    rng = np.random.default_rng(17)
    draws = rng.random((STREAMS, HORIZON), dtype=np.float32) < p
    cum = np.cumsum(draws, axis=1)
    hit = fires[np.arange(1, HORIZON + 1), cum].any(axis=1)
    assert hit.sum() <= _allowed(ALPHA)
