"""CohenCertifier: the records it returns, reproducible noise, independent streams, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from surrogate_cert.core import stats
from surrogate_cert.core.cohen import CohenCertifier
from surrogate_cert.core.errors import InvalidInputError, InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier


@pytest.fixture(scope="module")
def problem():
    return linear_problem(40, sigma=0.25, seed=10)


@pytest.fixture()
def smooth(problem):
    return SmoothedClassifier(problem.model, 2, problem.sigma, device="cpu", batch_size=4096, seed=3)


def test_certificates_follow_cohen_exactly(problem, smooth):
    certs = CohenCertifier(smooth).certify(problem.x, n0=50, n=400, alpha=0.01)
    top = smooth.counts(problem.x, 50, stream=STREAM_SELECT).argmax(axis=1)
    k = smooth.counts(problem.x, 400, stream=STREAM_ESTIMATE)[np.arange(40), top]
    p_lower = stats.lower_confidence_bound(k, 400, 0.01)
    for c, cls, pl in zip(certs, top, p_lower):
        assert c.n_samples == 450 and c.p_lower == pytest.approx(pl) and c.seconds > 0
        if pl > 0.5:
            assert (c.prediction, c.method) == (cls, "cohen")
            assert c.radius == pytest.approx(0.25 * norm.ppf(pl))
        else:
            assert (c.prediction, c.radius, c.method) == (-1, 0.0, "abstain")
    # Far from the boundary it certifies the true class; at the boundary it abstains.
    far = np.abs(problem.margin) > 0.5
    assert all(c.prediction == g for c, g, f in zip(certs, problem.true_class, far) if f)


def test_noise_depends_on_indices_not_on_batching(problem, smooth):
    certifier = CohenCertifier(smooth)
    whole = certifier.certify(problem.x, n0=20, n=300, alpha=0.01, indices=np.arange(100, 140))
    part = certifier.certify(problem.x[5:9], n0=20, n=300, alpha=0.01, indices=np.arange(105, 109))
    assert [c.p_lower for c in part] == [c.p_lower for c in whole[5:9]]
    other = certifier.certify(problem.x[5:9], n0=20, n=300, alpha=0.01)
    assert [c.p_lower for c in other] != [c.p_lower for c in part]


def test_predict(problem, smooth):
    pred = CohenCertifier(smooth).predict(problem.x, n=300, alpha=0.01)
    far = np.abs(problem.margin) > 0.5
    np.testing.assert_array_equal(pred[far], problem.true_class[far])
    assert set(np.unique(pred)) <= {-1, 0, 1}


def test_empty_batch(problem, smooth):
    assert CohenCertifier(smooth).certify(problem.x[:0]) == []


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(n0=0), "n0"), (dict(n=0), "n")],
)
def test_bad_parameters_name_the_parameter(problem, smooth, kwargs, name):
    with pytest.raises(InvalidParameterError, match=rf"\b{name}\b"):
        CohenCertifier(smooth).certify(problem.x, **{**dict(n0=10, n=10), **kwargs})


def test_bad_inputs(problem, smooth):
    with pytest.raises(InvalidInputError):
        CohenCertifier(smooth).certify(problem.x * 3, n0=10, n=10)
    with pytest.raises(InvalidInputError, match="indices"):
        CohenCertifier(smooth).certify(problem.x, n0=10, n=10, indices=[1, 2])
    with pytest.raises(InvalidParameterError, match="alpha"):
        CohenCertifier(smooth).predict(problem.x, n=10, alpha=2.0)
