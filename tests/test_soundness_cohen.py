"""Cohen's certifier is wrong on at most an alpha share of inputs, against exact ground truth.

The linear binary base model has a known smoothed class and true radius for every input
(``groundtruth.linear_problem``). A wrong certificate claims the wrong class or a radius beyond the
true one. The count of wrong certificates over N inputs must not exceed the 0.999-quantile of
Binomial(N, alpha). Teeth: the same check fails for a certifier that selects the class from its
estimation samples (on inputs near the decision boundary) and for a plug-in estimate of ``p_A``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from surrogate_cert.core import stats
from surrogate_cert.core.cohen import CohenCertifier
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier

ALPHA = 0.1
N_INPUTS = 1500
SIGMA = 0.25


def allowed(num: int, alpha: float = ALPHA) -> float:
    return st.binom.ppf(0.999, num, alpha)


def smoothed(problem, seed=0):
    return SmoothedClassifier(problem.model, 2, problem.sigma, device="cpu", batch_size=8192, seed=seed)


@pytest.fixture(scope="module")
def spread():
    """Margins spread uniformly over -3 sigma .. 3 sigma."""
    return linear_problem(N_INPUTS, sigma=SIGMA, max_margin_sigmas=3.0, seed=1)


N_BOUNDARY = 3000


@pytest.fixture(scope="module")
def boundary():
    """Margins within 0.01 sigma of the hyperplane: p_1 within 0.004 of 1/2, true radius ~ 0.

    Here any certificate is wrong, so the wrong rate is the certification rate: about alpha for a
    valid certifier, up to 2 alpha when the class is picked from the samples that test it.
    """
    return linear_problem(N_BOUNDARY, sigma=SIGMA, max_margin_sigmas=0.01, seed=2)


def cohen_selecting_from_estimation_samples(smooth, x, n, alpha):
    """BROKEN: the class and its bound come from the same samples."""
    counts = smooth.counts(x, n, stream=STREAM_ESTIMATE)
    top = counts.argmax(axis=1)
    p_lower = stats.lower_confidence_bound(counts[np.arange(len(top)), top], n, alpha)
    radii = stats.radius(p_lower, smooth.sigma)
    return np.where(radii > 0, top, -1), radii


def cohen_plug_in(smooth, x, n0, n):
    """BROKEN: the radius of the point estimate k / n, no confidence bound."""
    top = smooth.counts(x, n0, stream=STREAM_SELECT).argmax(axis=1)
    k = smooth.counts(x, n, stream=STREAM_ESTIMATE)[np.arange(len(top)), top]
    radii = stats.radius(k / n, smooth.sigma)
    return np.where(radii > 0, top, -1), radii


@pytest.mark.parametrize("problem_name", ["spread", "boundary"])
def test_cohen_wrong_certificates_within_alpha(problem_name, request):
    problem = request.getfixturevalue(problem_name)
    certs = CohenCertifier(smoothed(problem)).certify(problem.x, n0=64, n=500, alpha=ALPHA)
    wrong = problem.wrong_certificates(certs)
    assert wrong.sum() <= allowed(len(wrong))
    assert sum(not c.abstained for c in certs) > len(wrong) // 20  # it does certify


def test_cohen_predict_wrong_within_alpha(spread):
    pred = CohenCertifier(smoothed(spread)).predict(spread.x, n=200, alpha=ALPHA)
    wrong = (pred >= 0) & (pred != spread.true_class)
    assert wrong.sum() <= allowed(N_INPUTS)


def test_teeth_selecting_the_class_from_estimation_samples_fails(boundary):
    pred, radii = cohen_selecting_from_estimation_samples(smoothed(boundary), boundary.x, 500, ALPHA)
    wrong = boundary.wrong(pred, radii)
    assert wrong.sum() > 1.25 * allowed(N_BOUNDARY)


def test_teeth_plug_in_estimate_fails(spread):
    pred, radii = cohen_plug_in(smoothed(spread), spread.x, 64, 500)
    wrong = spread.wrong(pred, radii)
    assert wrong.sum() > 2 * allowed(N_INPUTS)
