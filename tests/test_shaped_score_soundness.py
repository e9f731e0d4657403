"""The ``shaped`` best-radius score holds its bound; a best radius read off per-radius thresholds does not.

The redraw design of ``test_onepass_rules_soundness.py``: a 20,000-point pool of the linear base model
(exact smoothed class and radius for every point), a fixed imperfect surrogate (50 % overconfident, with a
per-point error that can flip the class near the boundary), calibration counts drawn exactly. Each redraw
fits the rule on fresh calibration points and computes the exact probability that a fresh pool point gets a
wrong best radius; the mean over redraws must not exceed epsilon + alpha_mc by more than 3.09 standard
errors. Broken twin: the largest radius whose required-radius threshold ``z~`` passes (thresholds valid
for each radius alone, read for all of them at once) fails the same check.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.conformal import fit_radius_thresholds
from calibration.shaped import fit_shaped
from surrogate_cert.core import stats
from surrogate_cert.core.groundtruth import linear_problem

pytestmark = pytest.mark.slow

SIGMA, ALPHA_MC, EPSILON = 0.25, 1e-3, 0.1
POOL, REDRAWS, M, N_CAL = 20_000, 150, 200, 10**6
PROBLEM = linear_problem(POOL, sigma=SIGMA, max_margin_sigmas=3.0, input_shape=(1, 2, 2), seed=0)
_Z_SIGNED = 1.5 * (PROBLEM.margin + 0.2 * SIGMA * np.random.default_rng(5).normal(0.0, 1.0, POOL)) / SIGMA
PREDICTED = (_Z_SIGNED > 0).astype(int)
Z = np.abs(_Z_SIGNED)
P_TRUE = np.where(PREDICTED == 1, PROBLEM.p1, 1 - PROBLEM.p1)
CAP = stats.max_radius(N_CAL, ALPHA_MC, SIGMA)


def _rates(fit) -> np.ndarray:
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(REDRAWS):
        rows = rng.integers(0, POOL, M)
        y = stats.reference_radius(rng.binomial(N_CAL, P_TRUE[rows]), N_CAL, ALPHA_MC, SIGMA)
        grid, shape, shift = fit(rows, y)
        radius = stats.shaped_radius(Z, grid, shape, shift)
        rates.append(PROBLEM.wrong(PREDICTED, radius).mean())
    return np.asarray(rates)


def _exceeds(rates, bound: float) -> bool:
    return rates.mean() > bound + 3.09 * rates.std(ddof=1) / np.sqrt(len(rates))


def test_shaped_best_radius_holds_its_bound():
    def shaped(rows, y):
        half = M // 2
        params = fit_shaped(Z[rows[:half]], y[:half], Z[rows[half:]], y[half:], CAP, SIGMA, EPSILON)
        return params["grid"], params["shape"], params["shift"]

    rates = _rates(shaped)
    assert not _exceeds(rates, EPSILON + ALPHA_MC), rates.mean()
    assert rates.mean() > 0.5 * EPSILON  # near the bound: the check can tell


def test_teeth_a_best_radius_read_off_per_radius_thresholds_fails():
    def per_radius(rows, y):
        table = fit_radius_thresholds(Z[rows], y, CAP, SIGMA, EPSILON)
        return table["grid"], table["tau"], 0.0

    rates = _rates(per_radius)
    assert _exceeds(rates, EPSILON + ALPHA_MC), rates.mean()
