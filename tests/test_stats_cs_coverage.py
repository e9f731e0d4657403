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
