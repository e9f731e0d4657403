"""Wrong-certificate rates of the calibrated surrogate against exact ground truth, over many redraws.

Setup (fast, all NumPy): the linear base model of ``groundtruth.linear_problem`` gives every point
its exact smoothed class and radius. The surrogate is a fixed, deliberately imperfect function of
the exact margin: ``z = 1.5 (margin + e) / sigma`` (50 % overconfident, with a per-point error
``e ~ N(0, (0.2 sigma)^2)`` that can flip the class near the boundary), ``A = 1[z > 0]``,
``p~ = Phi(|z|)``. Calibration counts are exact Binomial(n_cal, p_A) draws with the true ``p_A``
(what the counting engine produces, without its cost).

Each redraw samples a calibration set uniformly (with replacement) from a pool of 20,000 points,
calibrates with ``fit_offsets``, and computes the *exact* conditional probability that a fresh test
point, drawn uniformly from the same pool, gets a wrong certificate (the share of wrong
certificates over the whole pool). Marginal validity says the mean of that over redraws is at
most ``epsilon + alpha_mc``; the test rejects when the mean exceeds the bound by more than 3.09
standard errors (one-sided, 0.999). Broken procedures must fail the same test.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from calibration.conformal import fit_offsets
from surrogate_cert.core import stats
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import group_keys
from surrogate_cert.core.stats import max_radius, reference_radius, surrogate_radius

pytestmark = pytest.mark.slow

SIGMA = 0.25
ALPHA_MC = 1e-3
POOL = 20_000
REDRAWS = 200
Z_0999 = 3.09

PROBLEM = linear_problem(POOL, sigma=SIGMA, max_margin_sigmas=3.0, input_shape=(1, 2, 2), seed=0)
_ERR = np.random.default_rng(5).normal(0.0, 1.0, POOL)


def _surrogate(error_sigmas: float):
    z = 1.5 * (PROBLEM.margin + error_sigmas * SIGMA * _ERR) / SIGMA
    predicted = (z > 0).astype(int)
    p_true = np.where(predicted == 1, PROBLEM.p1, 1 - PROBLEM.p1)
    return predicted, st.norm.cdf(np.abs(z)), p_true


PREDICTED, P_TILDE, P_TRUE = _surrogate(0.2)
# The surrogate on its own training split: it fitted those points, so its error there is smaller.
PREDICTED_TRAIN, P_TILDE_TRAIN, P_TRUE_TRAIN = _surrogate(0.05)


def _offsets_per_point(fit, groups: str) -> np.ndarray:
    keys = group_keys(PREDICTED, P_TILDE, groups)
    return np.array([fit.offsets[k] for k in keys])


def _conditional_wrong(radius: np.ndarray, mask: np.ndarray | None = None) -> float:
    wrong = PROBLEM.wrong(PREDICTED, radius)
    return float(wrong.mean() if mask is None else wrong[mask].mean())


def _redraws(calibrate_once, m: int, n_cal: int, seed: int = 0) -> list:
    """``calibrate_once(cal_rows, counts_top) -> per-point deployed radius`` over REDRAWS redraws."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(REDRAWS):
        rows = rng.integers(0, POOL, m)
        out.append(calibrate_once(rows, rng))
    return out


def _correct(m, n_cal, epsilon, **options):
    def once(rows, rng):
        counts_top = rng.binomial(n_cal, P_TRUE[rows])
        fit = fit_offsets(
            P_TILDE[rows],
            PREDICTED[rows],
            counts_top,
            n_cal,
            sigma=SIGMA,
            num_classes=2,
            epsilon=epsilon,
            alpha_mc=ALPHA_MC,
            **options,
        )
        return surrogate_radius(P_TILDE, SIGMA, fit.radius_cap) - _offsets_per_point(fit, options.get("groups", "none"))

    return _redraws(once, m, n_cal)


def _exceeds(rates, bound: float) -> bool:
    rates = np.asarray(rates)
    return rates.mean() > bound + Z_0999 * rates.std(ddof=1) / np.sqrt(len(rates))


# --------------------------------------------------------------------------- marginal


def test_marginal_rate_within_bound_and_floor_rank_on_training_split_fails():
    m, n_cal, epsilon = 20, 10**6, 0.1
    bound = epsilon + ALPHA_MC
    rates = [_conditional_wrong(r) for r in _correct(m, n_cal, epsilon)]
    assert not _exceeds(rates, bound), np.mean(rates)
    assert np.mean(rates) > 0.5 * epsilon  # the test is near the bound, so it can tell

    def broken(rows, rng):  # quantile at rank floor(m (1 - eps)), scores from the surrogate's training split
        counts_top = rng.binomial(n_cal, P_TRUE_TRAIN[rows])
        cap = max_radius(n_cal, ALPHA_MC, SIGMA)
        scores = surrogate_radius(P_TILDE_TRAIN[rows], SIGMA, cap) - reference_radius(
            counts_top, n_cal, ALPHA_MC, SIGMA
        )
        q = np.sort(scores)[int(np.floor(m * (1 - epsilon))) - 1]
        return surrogate_radius(P_TILDE, SIGMA, cap) - q

    broken_rates = [_conditional_wrong(r) for r in _redraws(broken, m, n_cal)]
    assert _exceeds(broken_rates, bound), np.mean(broken_rates)


def test_plugin_reference_without_clopper_pearson_fails_where_the_real_one_holds():
    m, n_cal, epsilon = 50, 100, 0.1
    bound = epsilon + ALPHA_MC
    rates = [_conditional_wrong(r) for r in _correct(m, n_cal, epsilon)]
    assert not _exceeds(rates, bound), np.mean(rates)

    def plugin(rows, rng):  # reference radius from the plug-in estimate k / n (no confidence bound)
        counts_top = rng.binomial(n_cal, P_TRUE[rows])
        scores = surrogate_radius(P_TILDE[rows], SIGMA) - stats.radius(counts_top / n_cal, SIGMA)
        return surrogate_radius(P_TILDE, SIGMA) - stats.conformal_quantile(scores, epsilon)

    plugin_rates = [_conditional_wrong(r) for r in _redraws(plugin, m, n_cal)]
    assert _exceeds(plugin_rates, bound), np.mean(plugin_rates)


# --------------------------------------------------------------------------- PAC


def test_pac_rate_exceeds_bound_in_at_most_delta_of_calibrations():
    m, n_cal, epsilon, delta = 60, 10**6, 0.1, 0.1
    bound = epsilon + ALPHA_MC
    allowance = st.binom.ppf(0.999, REDRAWS, delta)
    pac = np.array([_conditional_wrong(r) for r in _correct(m, n_cal, epsilon, guarantee="pac", delta=delta)])
    assert (pac > bound).sum() <= allowance, (pac > bound).sum()
    # The marginal rule only holds on average: it breaks the PAC statement.
    marginal = np.array([_conditional_wrong(r) for r in _correct(m, n_cal, epsilon)])
    assert (marginal > bound).sum() > allowance, (marginal > bound).sum()


# --------------------------------------------------------------------------- Mondrian


@pytest.mark.parametrize("groups", ["class", "confidence"])
def test_mondrian_rate_within_bound_in_every_group(groups):
    m, n_cal, epsilon = 120, 10**6, 0.1
    bound = epsilon + ALPHA_MC
    radii = _correct(m, n_cal, epsilon, groups=groups)
    keys = group_keys(PREDICTED, P_TILDE, groups)
    for key in np.unique(keys):
        mask = keys == key
        rates = [_conditional_wrong(r, mask) for r in radii]
        assert not _exceeds(rates, bound), (key, np.mean(rates))


def test_pooled_calibration_breaks_the_per_confidence_bin_bound():
    m, n_cal, epsilon = 120, 10**6, 0.1
    radii = _correct(m, n_cal, epsilon)
    keys = group_keys(PREDICTED, P_TILDE, "confidence")
    worst = max(np.mean([_conditional_wrong(r, keys == key) for r in radii]) for key in np.unique(keys))
    assert worst > 1.5 * (epsilon + ALPHA_MC), worst


# --------------------------------------------------------------------------- Learn-then-Test


def test_ltt_rate_among_issued_certificates_controlled_with_probability_one_minus_delta():
    m, n_cal, epsilon, delta = 150, 10**6, 0.1, 0.1
    radii = _correct(m, n_cal, epsilon, method="ltt", delta=delta)
    failures = 0
    for r in radii:
        issued = r > 0
        if issued.any():
            # Against the truth the conditional rate gains at most alpha_mc: whether a certificate is issued
            # depends on the input alone, and the reference errs with probability <= alpha_mc for each input.
            failures += _conditional_wrong(r, issued) > epsilon + ALPHA_MC
    assert failures <= st.binom.ppf(0.999, REDRAWS, delta), failures
    assert np.mean([np.mean(r > 0) for r in radii]) > 0.3  # it does certify
