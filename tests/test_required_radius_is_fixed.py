"""Required-radius thresholds hold for an r* fixed before the input is seen, and the API takes one r* per call.

On the exact linear ground truth (the surrogate of ``test_calibration_rate_soundness``: 50 % overconfident,
with an error that can flip the class), thresholds ``tau(r)`` fitted on 1,000 calibration points: certifying
``(A, sigma)`` iff ``z~ > tau(sigma)`` is wrong at most ``epsilon + alpha_mc`` of the time (averaged over 100
calibration draws). ``BROKEN``: the radius chosen per input from its own surrogate output (the largest grid
radius whose threshold it passes) is wrong more than half the time. That is why the one-pass and hybrid
certifiers refuse one required radius per input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays
from calibration.conformal import fit_radius_thresholds
from surrogate_cert.core import stats
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier, certified_at_required, check_required_radius
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier

SIGMA, ALPHA_MC, POOL, M, N_CAL, EPSILON, REDRAWS = 0.25, 1e-3, 20_000, 1000, 10_000, 0.05, 100
PROBLEM = linear_problem(POOL, sigma=SIGMA, max_margin_sigmas=3.0, input_shape=(1, 2, 2), seed=0)
_Z = 1.5 * (PROBLEM.margin + 0.2 * SIGMA * np.random.default_rng(5).normal(0.0, 1.0, POOL)) / SIGMA
PREDICTED = (_Z > 0).astype(int)
Z_TILDE = np.abs(_Z)
P_TRUE = np.where(PREDICTED == 1, PROBLEM.p1, 1 - PROBLEM.p1)


def test_fixed_required_radius_holds_and_a_radius_chosen_from_the_surrogate_output_does_not():
    rng = np.random.default_rng(0)
    cap = stats.max_radius(N_CAL, ALPHA_MC, SIGMA)
    fixed, chosen = [], []
    for _ in range(REDRAWS):
        rows = rng.integers(0, POOL, M)
        reference = stats.reference_radius(rng.binomial(N_CAL, P_TRUE[rows]), N_CAL, ALPHA_MC, SIGMA)
        table = fit_radius_thresholds(Z_TILDE[rows], reference, cap, SIGMA, EPSILON)
        grid = np.array(table["grid"])
        tau = np.array([np.inf if t is None else t for t in table["tau"]])
        at_sigma = Z_TILDE > tau[np.searchsorted(grid, SIGMA - 1e-12)]
        fixed.append(PROBLEM.wrong(PREDICTED, np.where(at_sigma, SIGMA, 0.0)).mean())
        # BROKEN: r*(x) = the largest grid radius whose threshold x passes (tau is non-decreasing).
        passed = (Z_TILDE[:, None] > tau[None, :]).sum(axis=1)
        radius = np.where(passed > 0, grid[np.maximum(passed - 1, 0)], 0.0)
        chosen.append(PROBLEM.wrong(PREDICTED, radius)[radius > 0].mean())
    fixed, chosen = np.array(fixed), np.array(chosen)
    print(f"wrong at r* = sigma fixed: {fixed.mean():.4f}; r* chosen per input: {chosen.mean():.3f}")
    assert fixed.mean() <= EPSILON + ALPHA_MC + 3.09 * fixed.std(ddof=1) / np.sqrt(REDRAWS)
    assert fixed.mean() > 0.5 * EPSILON  # near the bound: the test can tell
    assert chosen.mean() > 0.3  # 0.566 when written


@pytest.fixture(scope="module")
def deployed():
    torch.set_num_threads(1)
    problem = linear_problem(300, sigma=SIGMA, input_shape=(1, 2, 2), seed=3)
    model = type(problem.model)(problem.model.w * 2.0, float(problem.model.b) * 2.0)
    surrogate = Surrogate(model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=SIGMA, device="cpu")
    k1 = np.random.default_rng(0).binomial(2000, problem.p1)
    calibration = calibrate_arrays(surrogate, problem.x, np.stack([2000 - k1, k1], axis=1), 0.05, 1e-3)
    return surrogate, calibration, problem


def test_one_required_radius_per_call_and_one_per_input_is_refused(deployed):
    surrogate, calibration, problem = deployed
    x = problem.x[:6]
    per_input = np.full(6, 0.1)
    certifier = SurrogateCertifier(surrogate, calibration)
    hybrid = HybridCertifier(certifier)
    for call in (
        lambda: certifier.certify(x, required_radius=per_input),
        lambda: hybrid.certify(x, required_radius=per_input),
        lambda: certified_at_required(calibration, np.zeros(6), per_input),
    ):
        with pytest.raises(InvalidParameterError, match="one radius for the whole batch"):
            call()
    assert check_required_radius(None) is None and check_required_radius(float("nan")) is None
    assert check_required_radius(np.float64(0.1)) == 0.1
    with pytest.raises(InvalidParameterError):
        check_required_radius(-0.1)
    one = certifier.certify(x, required_radius=0.1)
    _, _, z, _ = certifier.evaluate(x)
    assert [c.radius > 0 for c in one] == certified_at_required(calibration, z, 0.1).tolist()
    assert all(c.radius in (0.0, 0.1) for c in one)


def test_the_calibration_says_what_its_bound_means():
    from calibration.artifact import guarantee_statement

    marginal = guarantee_statement("marginal", 0.01, 0.001)
    assert "0.011" in marginal and "among certified inputs the rate can be higher" in marginal
    assert "fixed before the input is seen" in marginal
    issued = guarantee_statement("issued", 0.01, 0.001, 0.05)
    assert "P(wrong | the surrogate issued the certificate) <= 0.011" in issued and "0.95" in issued
