"""MAPIE's split-conformal lower bound is exactly the order statistic of DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.conformal import (
    SurrogateRadiusRegressor,
    conformity_scores,
    mapie_offset,
    quantile_rank,
    radius_cap,
    reference_radius,
    surrogate_radius,
)
from surrogate_cert.core import stats

SIGMA = 0.25


def _calibration_set(m: int, seed: int):
    rng = np.random.default_rng(seed)
    p_tilde = rng.uniform(0.3, 1.0, m)
    reference = np.maximum(rng.normal(0.3, 0.2, m), 0.0)
    return p_tilde, reference


@pytest.mark.parametrize("m", [9, 20, 99, 100, 299, 999, 1000])
@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.1, 0.2])
def test_mapie_offset_is_the_conformal_order_statistic(m, epsilon):
    p_tilde, reference = _calibration_set(m, seed=m)
    scores = conformity_scores(surrogate_radius(p_tilde, SIGMA), reference)
    q_mapie, _ = mapie_offset(p_tilde, reference, SIGMA, quantile_rank(m, epsilon))
    q_order = stats.conformal_quantile(scores, epsilon)
    # Equal up to float rounding (MAPIE returns R~ - q^, read back as R~ - bound); both inf when m is too small.
    assert q_mapie == pytest.approx(q_order, rel=1e-12, abs=1e-12) if np.isfinite(q_order) else np.isinf(q_mapie)
    if np.isfinite(q_order):
        k = int(np.ceil((m + 1) * (1 - epsilon) - 1e-12))
        assert q_order == np.sort(scores)[k - 1]


def test_literal_confidence_level_gives_the_same_rank_off_the_integer_edges():
    """At confidence_level = 1 - 2 epsilon MAPIE reads the same score, except where (m+1)(1-eps) is an integer."""
    from mapie.conformity_scores import AbsoluteConformityScore
    from mapie.regression import SplitConformalRegressor

    for m, epsilon in [(400, 0.01), (250, 0.05), (1234, 0.02)]:
        p_tilde, reference = _calibration_set(m, seed=1)
        X = p_tilde.reshape(-1, 1)
        reg = SplitConformalRegressor(
            SurrogateRadiusRegressor(SIGMA).fit(X),
            confidence_level=1 - 2 * epsilon,
            conformity_score=AbsoluteConformityScore(sym=False),
            prefit=True,
        )
        reg.conformalize(X, reference)
        pred, intervals = reg.predict_interval(X, allow_infinite_bounds=True)
        q_literal = float((pred - intervals[:, 0, 0])[0])
        assert q_literal == pytest.approx(mapie_offset(p_tilde, reference, SIGMA, quantile_rank(m, epsilon))[0])


def test_pac_rank_through_mapie_is_the_beta_order_statistic():
    m, epsilon, delta = 500, 0.05, 0.05
    p_tilde, reference = _calibration_set(m, seed=3)
    k = stats.pac_conformal_rank(m, epsilon, delta)
    assert k > stats.conformal_rank(m, epsilon)
    q, _ = mapie_offset(p_tilde, reference, SIGMA, quantile_rank(m, epsilon, "pac", delta))
    assert q == pytest.approx(np.sort(conformity_scores(surrogate_radius(p_tilde, SIGMA), reference))[k - 1], abs=1e-12)


def test_radius_cap_is_applied_inside_the_estimator():
    cap = radius_cap(10_000, 1e-3, SIGMA)
    assert cap == pytest.approx(stats.radius(stats.lower_confidence_bound(10_000, 10_000, 1e-3), SIGMA))
    p = np.array([0.4, 0.9, 1.0])
    est = SurrogateRadiusRegressor(SIGMA, cap).fit(p.reshape(-1, 1))
    out = est.predict(p.reshape(-1, 1))
    assert out[0] < 0 and out[1] == pytest.approx(SIGMA * 1.2815515655446004) and out[2] == pytest.approx(cap)


def test_reference_radius_is_clopper_pearson_clipped_at_zero():
    k = np.array([0, 400, 600, 1000])
    y = reference_radius(k, 1000, 1e-3, SIGMA)
    expected = np.maximum(SIGMA * __import__("scipy").stats.norm.ppf(stats.lower_confidence_bound(k, 1000, 1e-3)), 0)
    np.testing.assert_allclose(y, expected)
    assert y[0] == 0 and y[1] == 0 and y[3] > y[2] > 0
