"""The hybrid's refined best radii: a refined certificate is an E-process certificate, wrong at most alpha.

Exact ground truth from the linear binary model. An overconfident, tilted surrogate calibrated at a loose
epsilon (0.2) makes one-pass radii wrong often; the hybrid refines the best radii it expects sampling to
raise at the price. Among refined inputs, the reported certificate (the sequential one, ``combine=
"sequential"``) must be wrong on at most an alpha share (0.999-quantile of Binomial(refined, alpha)): the
refining decision reads the surrogate's output only, and the prior is fixed before sampling. Teeth: the
larger of the two radii (``combine="max"``) read as if it carried the per-input alpha fails that check by
far; it holds only the marginal bound epsilon + alpha_mc + alpha, which it is checked against too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.groundtruth import LinearBinaryModel, linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.stats import binomial_allowance
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier

SIGMA = 0.25
SHAPE = (1, 2, 2)
EPSILON, ALPHA_MC, ALPHA = 0.2, 1e-3, 0.01
PRICE = 0.02


def overconfident_surrogate(overconfidence=2.0, tilt=0.4) -> Surrogate:
    """A linear surrogate on a tilted hyperplane, ``overconfidence`` times too sure of itself."""
    w = torch.full((4,), 0.5, dtype=torch.float64)
    u = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) / 2
    w_tilted = (w + tilt * u) / torch.linalg.norm(w + tilt * u)
    b_tilted = -float(w_tilted @ torch.full((4,), 0.5, dtype=torch.float64))
    scale = 1.702 * overconfidence / (2 * SIGMA)  # sigmoid(1.702 t) ~ Phi(t)
    model = LinearBinaryModel(w_tilted.float() * scale, b_tilted * scale)
    return Surrogate(
        model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=SIGMA, kappa=50.0, w=0.2, device="cpu"
    )


@pytest.fixture(scope="module")
def refined():
    torch.set_num_threads(1)
    surrogate = overconfident_surrogate()
    cal = linear_problem(400, sigma=SIGMA, input_shape=SHAPE, seed=31)
    k1 = np.random.default_rng(0).binomial(10**5, cal.p1)
    calibration = calibrate_arrays(surrogate, cal.x, np.stack([10**5 - k1, k1], axis=1), EPSILON, ALPHA_MC)
    test = linear_problem(500, sigma=SIGMA, input_shape=SHAPE, seed=32)
    smooth = SmoothedClassifier(test.model, 2, SIGMA, device="cpu", batch_size=8192, seed=3)
    out = {}
    for combine in ("sequential", "max"):
        sequential = EProcessCertifier(smooth, ALPHA, max_samples=2000, price=PRICE)
        hybrid = HybridCertifier(SurrogateCertifier(surrogate, calibration), sequential, refine=True, combine=combine)
        out[combine] = hybrid.certify(test.x, indices=np.arange(len(test.x)))
    return test, out


@pytest.mark.slow
def test_refined_certificates_are_wrong_at_most_alpha_of_the_time(refined):
    test, out = refined
    certs = out["sequential"]
    routed = np.array([c.route == "refined" for c in certs])
    assert routed.sum() >= 100  # the rule refines a good share of the surrogate-certified inputs
    wrong = test.wrong_certificates(certs)
    assert wrong[routed].sum() <= binomial_allowance(int(routed.sum()), ALPHA)
    assert all(certs[i].method in ("eprocess", "abstain") for i in np.flatnonzero(routed))


@pytest.mark.slow
def test_teeth_the_larger_radius_is_not_a_per_input_certificate(refined):
    test, out = refined
    certs = out["max"]
    routed = np.array([c.route == "refined" for c in certs])
    wrong = test.wrong_certificates(certs)
    assert wrong[routed].sum() > 3 * binomial_allowance(int(routed.sum()), ALPHA)
    # ... but it keeps the hybrid's marginal bound, which the union bound gives it.
    assert wrong.sum() <= binomial_allowance(len(certs), EPSILON + ALPHA_MC + ALPHA)


def test_refining_needs_a_price():
    surrogate = overconfident_surrogate()
    cal = linear_problem(100, sigma=SIGMA, input_shape=SHAPE, seed=33)
    k1 = np.random.default_rng(1).binomial(10**4, cal.p1)
    calibration = calibrate_arrays(surrogate, cal.x, np.stack([10**4 - k1, k1], axis=1), EPSILON, ALPHA_MC)
    smooth = SmoothedClassifier(cal.model, 2, SIGMA, device="cpu")
    with pytest.raises(InvalidParameterError, match="price"):
        HybridCertifier(SurrogateCertifier(surrogate, calibration), EProcessCertifier(smooth, ALPHA), refine=True)
    with pytest.raises(InvalidParameterError, match="combine"):
        HybridCertifier(SurrogateCertifier(surrogate, calibration), None, combine="mean")


def test_a_radius_of_interest_stops_a_best_radius_run_once_it_is_certified():
    problem = linear_problem(40, sigma=SIGMA, input_shape=SHAPE, max_margin_sigmas=3.0, seed=34)
    far = np.flatnonzero(problem.true_radius > 2.5 * SIGMA)[:8]
    smooth = SmoothedClassifier(problem.model, 2, SIGMA, device="cpu", batch_size=8192, seed=5)
    runs = {}
    for roi in (None, SIGMA):
        certifier = EProcessCertifier(smooth, 1e-3, max_samples=3000, radius_of_interest=roi)
        runs[roi] = certifier.certify(problem.x[far], classes=problem.true_class[far], indices=far)
    assert all(c.radius >= SIGMA for c in runs[SIGMA])
    assert sum(c.n_samples for c in runs[SIGMA]) < 0.2 * sum(c.n_samples for c in runs[None])
    with pytest.raises(InvalidParameterError, match="radius_of_interest"):
        EProcessCertifier(smooth, 1e-3, radius_of_interest=-1.0)
