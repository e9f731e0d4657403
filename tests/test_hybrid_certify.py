"""One-pass surrogate certificates and the hybrid's routing to the sequential fallback, on exact ground truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats as st

from calibration import calibrate_arrays
from surrogate_cert.core.errors import CalibrationError, InvalidInputError, InvalidParameterError, ModelError
from surrogate_cert.core.groundtruth import LinearBinaryModel, linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier, certified_at_required
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier

SIGMA = 0.25
SHAPE = (1, 2, 2)


def _imperfect_surrogate(problem, overconfidence=1.5, tilt=0.5) -> Surrogate:
    """A linear surrogate on a tilted hyperplane (wrong near the boundary), 1.5x overconfident."""
    w = problem.model.w.double()
    u = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) / 2  # orthogonal to w = (1,1,1,1)/2
    w_tilted = (w + tilt * u) / torch.linalg.norm(w + tilt * u)
    b_tilted = -float(w_tilted @ torch.full((4,), 0.5, dtype=torch.float64))
    # logits (-z, z) s: P(class 1) = sigmoid(2 s z); sigmoid(1.702 t) ~ Phi(t).
    scale = 1.702 * overconfidence / (2 * SIGMA)
    model = LinearBinaryModel(w_tilted.float() * scale, b_tilted * scale)
    return Surrogate(
        model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=SIGMA, kappa=50.0, w=0.2, device="cpu"
    )


def _exact_counts(problem, n_cal, rng):
    k1 = rng.binomial(n_cal, problem.p1)
    return np.stack([n_cal - k1, k1], axis=1)


def _hybrid(surrogate, calibration, base, alpha=1e-3, max_samples=3000, fallback=True):
    sequential = None
    if fallback:
        smooth = SmoothedClassifier(base, 2, SIGMA, device="cpu", batch_size=4096)
        sequential = EProcessCertifier(smooth, alpha, max_samples=max_samples, tolerance=0.02)
    return HybridCertifier(SurrogateCertifier(surrogate, calibration), sequential)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cal = linear_problem(300, sigma=SIGMA, input_shape=SHAPE, seed=11)
    surrogate = _imperfect_surrogate(cal)
    calibration = calibrate_arrays(surrogate, cal.x, _exact_counts(cal, 10**5, np.random.default_rng(0)), 0.05, 1e-3)
    test = linear_problem(40, sigma=SIGMA, input_shape=SHAPE, seed=12)
    return surrogate, calibration, test


def test_surrogate_certifier_is_one_pass_and_certifies_iff_radius_positive(setup):
    surrogate, calibration, test = setup
    certifier = SurrogateCertifier(surrogate, calibration)
    classes, p_tilde, radius = certifier.radii(test.x)
    certs = certifier.certify(test.x)
    for c, cls, r in zip(certs, classes, radius):
        assert c.n_samples == 0
        if r > 0:
            assert (c.method, c.prediction, c.radius) == ("surrogate", cls, pytest.approx(r))
            assert c.p_lower == pytest.approx(st.norm.cdf(r / SIGMA))
        else:
            assert (c.method, c.prediction, c.radius) == ("abstain", -1, 0.0)
    assert 0 < np.mean(radius > 0) < 1  # both paths are exercised below


def test_hybrid_sends_only_uncertified_inputs_to_the_sequential_certifier(setup):
    surrogate, calibration, test = setup
    hybrid = _hybrid(surrogate, calibration, test.model)
    _, _, radius = hybrid.surrogate_certifier.radii(test.x)
    certs = hybrid.certify(test.x, indices=np.arange(40) + 500)
    for c, r in zip(certs, radius):
        if r > 0:
            assert c.method == "surrogate" and c.n_samples == 0
        else:
            assert c.method in ("eprocess", "abstain") and c.n_samples > 0
    assert any(c.method == "eprocess" for c in certs)
    no_fallback = _hybrid(surrogate, calibration, test.model, fallback=False).certify(test.x)
    assert all(c.n_samples == 0 for c in no_fallback)
    assert [c.method == "abstain" for c in no_fallback] == list(radius <= 0)


def test_required_radius_routes_short_surrogate_radii_to_target_mode(setup):
    surrogate, calibration, test = setup
    # A calibration without required-radius thresholds (made before they existed): R^ >= r* certifies.
    legacy = dataclasses.replace(calibration, radius_thresholds=None)
    hybrid = _hybrid(surrogate, legacy, test.model)
    _, _, radius = hybrid.surrogate_certifier.radii(test.x)
    asked = np.arange(40) % 2 == 0  # half the inputs ask for 0.05 (one call with one r* for the batch)
    certs = hybrid.certify(test.x[asked], required_radius=0.05)
    for c, r in zip(certs, radius[asked]):
        assert c.method == "surrogate" if r >= 0.05 else c.n_samples > 0
    # With thresholds: (A, r*) iff z~ > tau(r+), never the best-radius R^; the rest go to target mode.
    hybrid = _hybrid(surrogate, calibration, test.model)
    classes, _, z, radius = hybrid.surrogate_certifier.evaluate(test.x)
    certs = hybrid.certify(test.x[asked], required_radius=0.05)
    by_threshold = certified_at_required(calibration, z[asked], 0.05)
    for c, ok, cls in zip(certs, by_threshold, classes[asked]):
        if ok:
            assert (c.method, c.prediction, c.radius, c.n_samples) == ("surrogate", cls, 0.05, 0)
        else:
            assert c.method in ("eprocess", "abstain") and c.n_samples > 0
    for c, r in zip(hybrid.certify(test.x[~asked]), radius[~asked]):
        assert (c.method == "surrogate") == (r > 0)
    # Target mode stops once the target is reached: cheaper than the best-radius policy.
    fallback = [i for i in range(40) if radius[i] <= 0]
    target = hybrid.certify(test.x[fallback], required_radius=0.01)
    best = hybrid.certify(test.x[fallback])
    assert sum(c.n_samples for c in target) < sum(c.n_samples for c in best)


@pytest.mark.parametrize(
    "x, error",
    [
        (torch.zeros(3, 1, 3, 3), InvalidInputError),
        (torch.zeros(3, 4), InvalidInputError),
        (torch.zeros(3, 1, 2, 2, dtype=torch.int64), InvalidInputError),
        (torch.full((3, 1, 2, 2), float("nan")), InvalidInputError),
        (torch.full((3, 1, 2, 2), float("inf")), InvalidInputError),
        (torch.full((3, 1, 2, 2), 1.5), InvalidInputError),
        (torch.full((3, 1, 2, 2), -0.1), InvalidInputError),
        (np.zeros((3, 1, 2, 2), dtype=np.float32), InvalidInputError),
    ],
)
def test_bad_inputs_are_clear_errors(setup, x, error):
    surrogate, calibration, test = setup
    with pytest.raises(error):
        _hybrid(surrogate, calibration, test.model).certify(x)


def test_bad_required_radius_and_options_are_clear_errors(setup):
    surrogate, calibration, test = setup
    hybrid = _hybrid(surrogate, calibration, test.model)
    with pytest.raises(InvalidParameterError):
        hybrid.certify(test.x, required_radius=-1.0)
    with pytest.raises(InvalidParameterError):
        hybrid.certify(test.x, required_radius=np.ones(3))
    with pytest.raises(InvalidParameterError):
        HybridCertifier.load(surrogate, calibration, base_model=test.model, alpha=0.0)
    with pytest.raises(InvalidParameterError):
        HybridCertifier.load(surrogate, calibration, base_model=None, fallback="eprocess")
    with pytest.raises(InvalidParameterError):
        HybridCertifier.load(surrogate, calibration, fallback="cohen")
    with pytest.raises(CalibrationError, match="another surrogate"):
        HybridCertifier.load(_imperfect_surrogate(test, tilt=0.2), calibration, fallback="none")


def test_load_from_files_checks_the_base_model(tmp_path, setup):
    _, _, test = setup
    model_path = tmp_path / "linear.pt"
    torch.jit.script(test.model).save(str(model_path))
    surrogate = Surrogate.build(SHAPE, 2, SIGMA, seed=0, device="cpu")  # a saveable architecture
    calibration = calibrate_arrays(surrogate, test.x, _exact_counts(test, 1000, np.random.default_rng(1)), 0.05, 1e-3)
    calibration.save(tmp_path / "calibration.json")
    surrogate.meta = {"base_model_sha256": "0" * 64}
    surrogate.save(tmp_path / "wrong_base.pt")
    with pytest.raises(ModelError, match="not the base model"):
        HybridCertifier.load(tmp_path / "wrong_base.pt", tmp_path / "calibration.json", base_model=model_path)
    surrogate.meta = {}
    surrogate.save(tmp_path / "surrogate.pt")
    hybrid = HybridCertifier.load(
        tmp_path / "surrogate.pt", tmp_path / "calibration.json", base_model=model_path, max_samples=500
    )
    certs = hybrid.certify(test.x[:5])
    assert len(certs) == 5 and all(c.method in ("surrogate", "eprocess", "abstain") for c in certs)


@pytest.mark.slow
def test_hybrid_wrong_rate_within_epsilon_plus_alpha_mc_plus_alpha():
    """Redraws of calibration and test sets; wrong rate vs exact radii within 3.09 standard errors of the bound."""
    torch.set_num_threads(1)
    epsilon, alpha_mc, alpha = 0.1, 1e-3, 1e-3
    rng = np.random.default_rng(7)
    surrogate = _imperfect_surrogate(linear_problem(1, sigma=SIGMA, input_shape=SHAPE))
    rates, methods = [], []
    for r in range(30):
        cal = linear_problem(100, sigma=SIGMA, input_shape=SHAPE, seed=100 + r)
        calibration = calibrate_arrays(surrogate, cal.x, _exact_counts(cal, 10**6, rng), epsilon, alpha_mc)
        test = linear_problem(60, sigma=SIGMA, input_shape=SHAPE, seed=200 + r)
        certs = _hybrid(surrogate, calibration, test.model, alpha=alpha, max_samples=2000).certify(
            test.x, indices=np.arange(60) + 1000 * r
        )
        rates.append(test.wrong_certificates(certs).mean())
        methods += [c.method for c in certs]
    rates = np.array(rates)
    bound = epsilon + alpha_mc + alpha
    assert rates.mean() <= bound + 3.09 * rates.std(ddof=1) / np.sqrt(len(rates)), rates.mean()
    assert {"surrogate", "eprocess"} <= set(methods)
