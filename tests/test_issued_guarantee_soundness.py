"""The issued guarantee: P(wrong | the surrogate issued the certificate) <= epsilon + alpha_mc, w.p. 1 - delta.

Exact linear ground truth (the surrogate of ``test_calibration_rate_soundness``). Each of 200 redraws samples
1,000 calibration points from a pool of 20,000 (counts: exact Binomial(10^6, p_A) draws), calibrates, and
computes over the whole pool the exact rate of wrong certificates *among the inputs certified*. The issued
guarantee may exceed ``epsilon + alpha_mc`` in at most a share ``delta`` of calibration draws (binomial
0.999 allowance). ``BROKEN``: the marginal calibration on the same draws (valid over all inputs, certified or
not) exceeds it among certified inputs in almost every draw. The same for the required-radius thresholds at
``r* = sigma`` and ``2 sigma``, and for the fallback procedure's family-wise error rate on its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mapie.risk_control import control_fwer
from scipy import stats as st

from calibration import Calibration, calibrate_arrays
from calibration.artifact import content_problems
from calibration.conformal import (
    FallbackProcedure,
    fit_offsets,
    fit_radius_thresholds,
    issued_offset_grid,
    issued_threshold,
)
from surrogate_cert.core import stats
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.monitor import audit_plan

SIGMA, ALPHA_MC, POOL, M, N_CAL, EPSILON, DELTA, REDRAWS = 0.25, 1e-3, 20_000, 1000, 10**6, 0.05, 0.1, 200
BOUND = EPSILON + ALPHA_MC
PROBLEM = linear_problem(POOL, sigma=SIGMA, max_margin_sigmas=3.0, input_shape=(1, 2, 2), seed=0)
_Z = 1.5 * (PROBLEM.margin + 0.2 * SIGMA * np.random.default_rng(5).normal(0.0, 1.0, POOL)) / SIGMA
PREDICTED = (_Z > 0).astype(int)
Z_TILDE, P_TILDE = np.abs(_Z), st.norm.cdf(np.abs(_Z))
P_TRUE = np.where(PREDICTED == 1, PROBLEM.p1, 1 - PROBLEM.p1)
ALLOWANCE = stats.binomial_allowance(REDRAWS, DELTA)


def _rate_among_issued(radius) -> tuple[float, float]:
    issued = radius > 0
    return (float(PROBLEM.wrong(PREDICTED, radius)[issued].mean()) if issued.any() else 0.0), float(issued.mean())


@pytest.mark.slow
def test_best_radius_rate_among_issued_within_bound_and_the_marginal_rule_is_not():
    rng = np.random.default_rng(0)
    rates = {"issued": [], "marginal": []}
    shares = {"issued": [], "marginal": []}
    for _ in range(REDRAWS):
        rows = rng.integers(0, POOL, M)
        counts_top = rng.binomial(N_CAL, P_TRUE[rows])
        for guarantee in rates:
            fit = fit_offsets(
                P_TILDE[rows],
                PREDICTED[rows],
                counts_top,
                N_CAL,
                sigma=SIGMA,
                num_classes=2,
                epsilon=EPSILON,
                alpha_mc=ALPHA_MC,
                guarantee=guarantee,
                delta=DELTA,
            )
            rate, share = _rate_among_issued(stats.surrogate_radius(P_TILDE, SIGMA, fit.radius_cap) - fit.pooled_offset)
            rates[guarantee].append(rate)
            shares[guarantee].append(share)
    over = {g: int(np.sum(np.array(r) > BOUND)) for g, r in rates.items()}
    print(
        {g: (round(float(np.mean(r)), 4), round(float(np.mean(shares[g])), 3), over[g]) for g, r in rates.items()},
        "allowance",
        ALLOWANCE,
    )
    assert over["issued"] <= ALLOWANCE
    assert np.mean(shares["issued"]) > 0.8 * np.mean(shares["marginal"])  # it certifies most of what marginal does
    # BROKEN: the marginal offset, among the inputs it certifies (0.0695, 98 % of draws over when written).
    assert over["marginal"] > REDRAWS / 2, over


@pytest.mark.slow
def test_required_radius_rate_among_issued_within_bound_and_the_marginal_thresholds_are_not():
    rng = np.random.default_rng(1)
    cap = stats.max_radius(N_CAL, ALPHA_MC, SIGMA)
    true_radius = np.where(P_TRUE > 0.5, SIGMA * st.norm.ppf(np.clip(P_TRUE, 0.5, 1 - 1e-16)), 0.0)
    over = {"issued": 0, "marginal": 0}
    shares = []
    for _ in range(REDRAWS // 2):
        rows = rng.integers(0, POOL, M)
        reference = stats.reference_radius(rng.binomial(N_CAL, P_TRUE[rows]), N_CAL, ALPHA_MC, SIGMA)
        table = fit_radius_thresholds(Z_TILDE[rows], reference, cap, SIGMA, EPSILON)
        grid, tau_marginal = np.array(table["grid"]), [np.inf if t is None else t for t in table["tau"]]
        for r in (SIGMA, 2 * SIGMA):
            j = int(np.searchsorted(grid, r - 1e-12))
            for name, tau in (
                ("issued", issued_threshold(Z_TILDE[rows], reference, grid[j], EPSILON, DELTA)),
                ("marginal", tau_marginal[j]),
            ):
                certified = Z_TILDE > tau
                wrong = certified & ((true_radius < r) | (PREDICTED != (PROBLEM.p1 > 0.5)))
                over[name] += bool(certified.any() and wrong[certified].mean() > BOUND)
                if name == "issued":
                    shares.append(certified.mean())
    print(over, "mean share certified (issued)", round(float(np.mean(shares)), 3), "allowance", ALLOWANCE)
    assert over["issued"] <= ALLOWANCE  # 200 tests (100 draws x 2 radii), each at delta
    assert np.mean(shares) > 0.2
    assert over["marginal"] > REDRAWS / 2, over  # BROKEN


def test_fallback_procedure_controls_the_family_wise_error_and_testing_each_at_delta_does_not():
    """All 40 nulls true, p-values uniform: the procedure rejects any in <= delta of 4,000 families."""
    rng = np.random.default_rng(2)
    families, size, delta = 4000, 40, 0.1
    p = rng.random((families, size))
    rejected = sum(len(control_fwer(row, delta, fwer_method=FallbackProcedure())) > 0 for row in p)
    assert rejected <= stats.binomial_allowance(families, delta), rejected
    assert np.mean((p <= delta).any(axis=1)) > 0.9  # BROKEN: each hypothesis at delta
    # Its level flows along a run of rejections: delta / 4 each, so the third is tested at 3 delta / 4 = 0.075.
    assert control_fwer(np.array([1e-9, 1e-9, 0.07, 0.5]), 0.1, fwer_method=FallbackProcedure()).tolist() == [0, 1, 2]
    assert control_fwer(np.array([1e-9, 0.5, 0.07, 0.5]), 0.1, fwer_method=FallbackProcedure()).tolist() == [0]
    # A hypothesis it cannot test (NaN: no certificate issued) does not stop the ones after it.
    assert control_fwer(np.array([np.nan, 1e-9, 1e-9]), 0.1, fwer_method=FallbackProcedure()).tolist() == [1, 2]


def test_issued_offsets_start_at_the_cap_and_issued_calibrations_record_and_audit_what_they_state():
    cap = stats.max_radius(10_000, 1e-3, SIGMA)
    grid = issued_offset_grid(cap, SIGMA)
    assert grid[0] == pytest.approx(cap - SIGMA / 50) and np.all(np.diff(grid) < 0) and grid[-1] >= -SIGMA
    torch.set_num_threads(1)
    problem = linear_problem(600, sigma=SIGMA, input_shape=(1, 2, 2), seed=4)
    model = type(problem.model)(problem.model.w * 1.5, float(problem.model.b) * 1.5)
    surrogate = Surrogate(model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=SIGMA, device="cpu")
    k1 = np.random.default_rng(0).binomial(10_000, problem.p1)
    counts = np.stack([10_000 - k1, k1], axis=1)
    for options in (dict(guarantee="issued"), dict(method="ltt")):
        calibration = calibrate_arrays(surrogate, problem.x, counts, 0.1, 1e-3, delta=0.1, **options)
        assert (calibration.guarantee, calibration.method) == ("issued", "ltt")
        assert calibration.radius_thresholds["guarantee"] == "issued"
        assert np.isfinite(calibration.pooled_offset) and "issued the certificate" in calibration.statement
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.guarantee == "issued" and again.pooled_offset == calibration.pooled_offset
    plan = audit_plan(again, 0.01)
    assert plan.population == "issued" and plan.threshold == 0.1
    content = calibration.to_dict()
    content["method"] = "conformal"
    assert any("issued guarantee is calibrated by ltt" in p for p in content_problems(content))
    with pytest.raises(InvalidParameterError):
        calibrate_arrays(surrogate, problem.x, counts, 0.1, 1e-3, guarantee="pac", method="ltt")
    with pytest.raises(InvalidParameterError):
        calibrate_arrays(surrogate, problem.x, counts, 0.1, 1e-3, guarantee="issued", score="shifted")
