"""Learning from the fallback: sampled queries are logged with their counts, the surrogate is retrained on
them and recalibrated on the untouched calibration split, and no query is certified by a surrogate that
trained on it; a log holding calibration images is refused at recalibration (by content)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import calibrate
from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.models import load_model
from data_gen.query_log import QueryLog, read_query_log
from surrogate_cert.core.errors import CalibrationError, StoreError
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier, SurrogateCertifier
from surrogate_cert.workflows.learning import FallbackLearner, LearningConfig, RecordingSmoothed
from surrogate_cert.workflows.training import train_surrogate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_base_model):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("learning")
    train, cal = str(folder / "train.h5"), str(folder / "cal.h5")
    generate_counts("digits", "surrogate", digits_base_model, 0.25, 30, train, limit=60, device="cpu", progress=False)
    generate_counts("digits", "cal", digits_base_model, 0.25, 1000, cal, limit=200, device="cpu", progress=False)
    surrogate = train_surrogate(
        [train], folder / "s0.pt", init_from_base=digits_base_model, epochs=2, device="cpu", progress=False
    )
    calibration = calibrate(surrogate, cal, 0.1, 1e-3)
    base = load_model(digits_base_model, device="cpu").model
    smooth = SmoothedClassifier(base, 10, 0.25, device="cpu", batch_size=4096)
    hybrid = HybridCertifier(
        SurrogateCertifier(surrogate, calibration), EProcessCertifier(smooth, 1e-3, max_samples=300)
    )
    return folder, train, cal, hybrid, digits_base_model


def test_sampled_queries_are_logged_retrained_on_and_recalibrated(setup):
    folder, train, cal, hybrid, base = setup
    learner = FallbackLearner(
        hybrid,
        folder / "queries.h5",
        [train],
        cal,
        folder / "retrained",
        init_from_base=base,
        config=LearningConfig(retrain_every=100, epsilon=0.1, epochs=2, log_weight=2),
        source_dataset="digits",
    )
    test = load_split("digits", "test")
    first_sha = hybrid.calibration.surrogate_sha256
    sampled, logged_before = 0, []
    for lo in range(0, 200, 50):
        logged_before.append(learner.log.rows)
        certs = learner.certify(test.x[lo : lo + 50], indices=test.indices[lo : lo + 50])
        sampled += sum(c.n_samples > 0 for c in certs)
        if lo == 0:
            on_path = [c.n_samples for c in certs if c.n_samples > 0]
    log = read_query_log(folder / "queries.h5")
    assert len(log) == sampled and log.labels is None
    assert log.samples[: len(on_path)].tolist() == on_path  # every sample the fallback drew, per query
    assert len(learner.history) == 2 and hybrid.calibration.surrogate_sha256 != first_sha
    # Retraining k used the log as it stood after query 100 k: queries 100 k + 1.. were certified by it.
    first = Surrogate.load(learner.history[0]["surrogate"])
    assert first.meta["counts_rows"] == 60 + 2 * learner.history[0]["logged_rows"]  # the log counts twice
    assert learner.history[0]["logged_rows"] == logged_before[2]
    logged_idx = set(log.indices[: learner.history[0]["logged_rows"]].tolist())
    assert logged_idx <= set(test.indices[:100].tolist())


def test_a_log_holding_calibration_images_is_refused_at_recalibration(setup):
    folder, train, cal, hybrid, base = setup
    cal_x = load_split("digits", "cal").x[:10]
    log = QueryLog(
        folder / "leaky.h5",
        sigma=0.25,
        num_classes=10,
        input_shape=(1, 8, 8),
        model_sha256=hybrid.surrogate.meta["base_model_sha256"],
    )
    log.append(cal_x, np.full((10, 10), 5))
    out = folder / "leaky.pt"
    train_surrogate([train, str(folder / "leaky.h5")], out, epochs=1, device="cpu", progress=False)
    with pytest.raises(CalibrationError, match="10 images the surrogate was trained on"):
        calibrate(str(out), cal, 0.1, 1e-3)
    with pytest.raises(StoreError, match="another setting"):
        QueryLog(folder / "leaky.h5", sigma=0.5, num_classes=10, input_shape=(1, 8, 8))


def test_recording_passes_every_call_through_unchanged(setup):
    _, _, _, hybrid, _ = setup
    smooth = (
        hybrid.sequential.smooth.inner
        if isinstance(hybrid.sequential.smooth, RecordingSmoothed)
        else hybrid.sequential.smooth
    )
    recorder = RecordingSmoothed(smooth)
    x = load_split("digits", "test").x[:3]
    a = recorder.sample_predictions(x, 40, indices=[7, 8, 9])
    b = smooth.sample_predictions(x, 40, indices=[7, 8, 9])
    assert np.array_equal(a, b)
    counts = recorder.take([9, 8, 7, 6])
    assert counts.sum(axis=1).tolist() == [40, 40, 40, 0] and recorder.tally == {}
