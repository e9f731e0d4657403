"""The conformal offset is the exact k-th score, also when scores tie: no tied point counts as over it.

MAPIE gives ``R~ - q^`` per row and the offset used to be read back as ``min_i (R~_i - (R~_i - q^))``:
one rounding per row, so the minimum can land an ulp below a tied ``k``-th score, and every point tied
with it then counts as over the offset (more than ``m - k`` exceedances, the rank's whole promise).
``BROKEN`` below is that reading, kept here to show it failing on tie-heavy calibration sets.
"""

from __future__ import annotations

import numpy as np
from mapie.conformity_scores import AbsoluteConformityScore
from mapie.regression import SplitConformalRegressor

from calibration.conformal import SurrogateRadiusRegressor, fit_offsets, mapie_offset, quantile_rank, radius_cap
from surrogate_cert.core import stats

SIGMA = 0.25
FITS = 300


def _broken_mapie_offset(p_tilde, reference, rank: int, cap: float) -> float:
    """The offset as read back from MAPIE's intervals before the fix (one rounding per row, then the minimum)."""
    X = np.asarray(p_tilde, dtype=float).reshape(-1, 1)
    m = len(reference)
    regressor = SplitConformalRegressor(
        SurrogateRadiusRegressor(SIGMA, cap).fit(X),
        confidence_level=1.0 - 2.0 * (1.0 - (rank - 0.5) / (m + 1)),
        conformity_score=AbsoluteConformityScore(sym=False),
        prefit=True,
    ).conformalize(X, reference)
    radius, intervals = regressor.predict_interval(X, allow_infinite_bounds=True)
    return float(np.min(radius - intervals[:, 0, 0]))


def _tie_heavy_set(rng, m: int):
    """Half the points share three surrogate confidences, most references three values: many tied scores."""
    p_tilde = np.where(rng.random(m) < 0.5, rng.choice([0.9, 0.95, 0.99], m), rng.uniform(0.6, 1.0, m))
    reference = np.where(rng.random(m) < 0.8, rng.choice([0.0, 0.1, 0.2], m), rng.uniform(0.0, 0.5, m))
    return p_tilde, reference


def test_offset_is_the_exact_order_statistic_on_tie_heavy_sets_and_the_read_back_value_is_not():
    rng = np.random.default_rng(0)
    m, epsilon = 200, 0.1
    cap = radius_cap(1000, 1e-3, SIGMA)
    rank = quantile_rank(m, epsilon)
    broken_off = broken_over = 0
    for _ in range(FITS):
        p_tilde, reference = _tie_heavy_set(rng, m)
        scores = SurrogateRadiusRegressor(SIGMA, cap).predict(p_tilde.reshape(-1, 1)) - reference
        exact = np.sort(scores)[rank - 1]
        q_hat, _ = mapie_offset(p_tilde, reference, SIGMA, rank, cap)
        assert q_hat == exact  # bit for bit
        assert np.sum(scores > q_hat) <= m - rank
        q_broken = _broken_mapie_offset(p_tilde, reference, rank, cap)
        broken_off += q_broken != exact
        broken_over += np.sum(scores > q_broken) > m - rank
    # 53 of 300 when written: the read-back offset sits an ulp below a tied k-th score.
    assert broken_off >= 10 and broken_over >= 10, (broken_off, broken_over)


def test_in_sample_exceedance_counts_ties_as_within_the_offset():
    """fit_offsets reads exceedance on the scores: on a set of all-tied scores, none exceeds q^."""
    m = 300
    p_tilde = np.full(m, 0.99)
    counts_top = np.full(m, 990)
    fit = fit_offsets(
        p_tilde, np.zeros(m, int), counts_top, 1000, sigma=SIGMA, num_classes=2, epsilon=0.05, alpha_mc=1e-3
    )
    score = float(stats.surrogate_radius(0.99, SIGMA, fit.radius_cap) - stats.reference_radius(990, 1000, 1e-3, SIGMA))
    assert fit.pooled_offset == score and fit.diagnostics["violation_rate"] == 0.0
