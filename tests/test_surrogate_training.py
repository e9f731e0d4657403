"""The surrogate learns counts/n with soft-label cross-entropy, saves weights-only, tunes its prior on train counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surrogate_cert.core.errors import InvalidInputError, ModelError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.stats import prior_log_evidence
from surrogate_cert.core.surrogate import Surrogate, tune_prior

SIGMA = 0.25


def _counts(p1, n, seed=0):
    k1 = np.random.default_rng(seed).binomial(n, p1)
    return np.stack([n - k1, k1], axis=1)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    problem = linear_problem(400, sigma=SIGMA, input_shape=(1, 8, 8), seed=0)
    counts = _counts(problem.p1, 200)
    surrogate = Surrogate.build((1, 8, 8), 2, SIGMA, seed=0, device="cpu").fit(problem.x, counts, epochs=25, seed=0)
    return problem, counts, surrogate


def test_soft_label_training_learns_the_smoothed_probabilities(trained):
    problem, _, surrogate = trained
    proba = surrogate.predict_proba(problem.x)
    assert proba.shape == (400, 2) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    classes, p_tilde = surrogate.predict(problem.x)
    assert np.mean(classes == problem.true_class) > 0.9
    assert np.mean(np.abs(proba[:, 1] - problem.p1)) < 0.12
    assert 1 <= surrogate.best_epoch_ <= 25 and len(surrogate.holdout_rows_) == 40
    assert "holdout_loss" in surrogate.history_[0]


def test_training_is_seeded():
    problem = linear_problem(60, sigma=SIGMA, input_shape=(1, 2, 2), seed=1)
    counts = _counts(problem.p1, 50)
    a = Surrogate.build((1, 2, 2), 2, SIGMA, seed=3, device="cpu").fit(problem.x, counts, epochs=3, seed=3)
    b = Surrogate.build((1, 2, 2), 2, SIGMA, seed=3, device="cpu").fit(problem.x, counts, epochs=3, seed=3)
    assert a.fingerprint() == b.fingerprint()
    c = Surrogate.build((1, 2, 2), 2, SIGMA, seed=4, device="cpu").fit(problem.x, counts, epochs=3, seed=4)
    assert c.fingerprint() != a.fingerprint()


def test_checkpoint_round_trip_is_weights_only_and_keeps_metadata(tmp_path, trained):
    problem, _, surrogate = trained
    surrogate.kappa, surrogate.w = 123.0, 0.3
    surrogate.meta = {"counts_sha256": "abc", "dataset": "npz:x"}
    path = surrogate.save(tmp_path / "surrogate.pt")
    payload = torch.load(path, weights_only=True)  # no pickled code needed
    assert payload["kind"] == "surrogate" and payload["meta"]["kappa"] == 123.0
    loaded = Surrogate.load(path, device="cpu")
    assert (loaded.sigma, loaded.num_classes, loaded.input_shape, loaded.arch) == (SIGMA, 2, (1, 8, 8), "small_cnn")
    assert (loaded.kappa, loaded.w, loaded.meta["counts_sha256"]) == (123.0, 0.3, "abc")
    assert loaded.fingerprint() == surrogate.fingerprint() and loaded.file_sha256 == surrogate.file_sha256
    np.testing.assert_allclose(loaded.predict_proba(problem.x[:20]), surrogate.predict_proba(problem.x[:20]))


def test_a_base_checkpoint_is_not_a_surrogate(tmp_path):
    from surrogate_cert.core.architectures import build, save_checkpoint

    path = tmp_path / "base.pt"
    save_checkpoint(
        path,
        build("small_cnn", (1, 2, 2), 2),
        arch="small_cnn",
        input_shape=(1, 2, 2),
        num_classes=2,
        kind="base",
        meta={"sigma": SIGMA},
    )
    with pytest.raises(ModelError, match="not a surrogate"):
        Surrogate.load(path)


def test_hundred_classes_on_cifar_sized_inputs():
    """The default architecture follows the input shape: resnet18 for 3 x 32 x 32, 100 classes."""
    torch.set_num_threads(1)
    x = torch.rand(8, 3, 32, 32)
    counts = np.random.default_rng(0).multinomial(50, np.full(100, 0.01), size=8)
    surrogate = Surrogate.build((3, 32, 32), 100, SIGMA, seed=0, device="cpu")
    assert surrogate.arch == "resnet18"
    surrogate.fit(x, counts, epochs=1, batch_size=8, holdout=0.0)
    assert surrogate.predict_proba(x).shape == (8, 100)


def test_bad_inputs_are_refused(trained):
    problem, counts, surrogate = trained
    with pytest.raises(InvalidInputError):
        surrogate.predict_proba(problem.x.double() * 2)
    with pytest.raises(InvalidInputError):
        surrogate.predict_proba(torch.zeros(3, 1, 4, 4))
    with pytest.raises(InvalidInputError):
        surrogate.predict_proba((problem.x * 255).to(torch.uint8))
    bad = problem.x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError):
        surrogate.predict_proba(bad)
    with pytest.raises(InvalidInputError, match="counts"):
        surrogate.fit(problem.x, counts[:, :1], epochs=1)


def test_prior_tuning_rewards_an_accurate_surrogate_and_distrusts_a_wrong_one():
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.55, 0.999, 500)
    n = 1000
    k = rng.binomial(n, p_true)
    kappa_good, w_good, _ = tune_prior(k, n, p_true)
    kappa_bad, w_bad, _ = tune_prior(k, n, rng.uniform(0.5, 1.0, 500))
    assert kappa_good >= 200 and w_good <= 0.1
    assert kappa_bad <= 10 or w_bad >= 0.5
    assert prior_log_evidence(k, n, p_true, kappa_good, w_good) > prior_log_evidence(k, n, p_true, 2.0, 0.5)
