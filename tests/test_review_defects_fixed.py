"""Defects found in review (issue 11) stay fixed: each test pins one of them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays, load_calibration
from calibration.artifact import Calibration
from calibration.conformal import min_group_size
from data_gen.models import noisy_accuracy
from data_gen.store import CountsWriter
from surrogate_cert.core.certificate import Certificate, write_tsv
from surrogate_cert.core.errors import (
    CalibrationError,
    InvalidInputError,
    InvalidParameterError,
    StoreError,
)
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.sequential import default_schedule
from surrogate_cert.core.smoothing import SmoothedClassifier, check_images, resolve_device
from surrogate_cert.core.surrogate import Surrogate

SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def problem():
    return linear_problem(200, sigma=0.25, input_shape=SHAPE, seed=5)


def _counts(problem, n=500):
    k1 = np.random.default_rng(0).binomial(n, problem.p1)
    return np.stack([n - k1, k1], axis=1)


@pytest.mark.timeout(10)
def test_default_schedule_refuses_a_first_round_that_never_grows():
    with pytest.raises(InvalidParameterError, match="first"):
        default_schedule(256, first=0)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        default_schedule(0)
    assert default_schedule(250) == [32, 64, 128, 250]


def test_write_tsv_refuses_columns_of_different_lengths(tmp_path):
    certificate = Certificate(1, 0.5, "cohen", 10, 0.9, 0.1)
    with pytest.raises(InvalidParameterError, match="one entry per input"):
        write_tsv(tmp_path / "r.tsv", [0, 1], [1, 1], [certificate])
    assert not os.listdir(tmp_path)


def test_counts_writer_refuses_negative_counts_and_a_wrong_width(tmp_path):
    attrs = dict(
        sigma=0.25,
        n=10,
        n0=0,
        num_classes=3,
        seed=0,
        dataset="digits",
        split="cal",
        limit=None,
        model_sha256="ab",
        noise_scheme="x",
        device_type="cpu",
        amp=None,
        input_shape=[1, 8, 8],
        package_version="0",
    )
    with CountsWriter.open(tmp_path / "c.h5", indices=np.arange(4), labels=np.zeros(4, int), attrs=attrs) as writer:
        with pytest.raises(StoreError, match=r"\[0, 2\*\*32\)"):
            writer.append(np.array([[11, -1, 0]]))
        with pytest.raises(StoreError, match="rows x 3"):
            writer.append(np.array([[5, 5]]))
        with pytest.raises(StoreError, match="integer counts"):
            writer.append(np.array([[5.0, 5.0, 0.0]]))
        with pytest.raises(StoreError, match="sum to 10"):
            writer.append(np.array([[5, 4, 0]]))
        assert writer.committed == 0
        writer.append(np.array([[5, 5, 0]]))
        assert writer.committed == 1


def test_load_calibration_of_a_binary_file_is_a_calibration_error(tmp_path):
    (tmp_path / "c.json").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(CalibrationError, match="HDF5"):
        load_calibration(tmp_path / "c.json")
    (tmp_path / "d.json").write_bytes(bytes(range(1, 256)))
    with pytest.raises(CalibrationError, match="binary"):
        load_calibration(tmp_path / "d.json")


def test_surrogate_fit_takes_float64_images(problem):
    surrogate = Surrogate.build(SHAPE, 2, 0.25, seed=0, device="cpu")
    surrogate.fit(problem.x.double(), _counts(problem), epochs=1)
    assert surrogate.predict(problem.x.double())[0].shape == (200,)


def test_counts_refuse_fractional_or_negative_n_as_a_parameter_error(problem):
    smooth = SmoothedClassifier(problem.model, 2, 0.25, device="cpu")
    with pytest.raises(InvalidParameterError, match="whole number"):
        smooth.counts(problem.x[:2], 2.5)
    with pytest.raises(InvalidParameterError, match="whole number"):
        smooth.counts(problem.x[:2], -3)
    with pytest.raises(InvalidParameterError, match="start"):
        smooth.counts(problem.x[:2], 3, start=[0.5, 1])
    assert smooth.counts(problem.x[:2], 4.0).sum() == 8  # a whole float is fine


def test_min_group_size_needs_delta_for_pac_and_ltt():
    with pytest.raises(InvalidParameterError, match="delta"):
        min_group_size(0.05, "pac", delta=None)
    with pytest.raises(InvalidParameterError, match="delta"):
        min_group_size(0.05, "marginal", delta=None, method="ltt")
    assert min_group_size(0.05, "pac", delta=0.05) > min_group_size(0.05)


def test_resolve_device_names_an_unknown_device():
    with pytest.raises(InvalidParameterError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_calibration_from_dict_and_save_fail_cleanly(tmp_path, problem, monkeypatch):
    surrogate = Surrogate(problem.model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=0.25)
    calibration = calibrate_arrays(surrogate, problem.x, _counts(problem), 0.05, 1e-3)
    with pytest.raises(CalibrationError, match="lacks the fields"):
        content = calibration.to_dict()
        content.pop("n_cal")
        content.pop("checksum_sha256")
        import hashlib

        canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        content["checksum_sha256"] = hashlib.sha256(canonical).hexdigest()
        Calibration.from_dict(content)

    def broken_dump(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(CalibrationError, match="No space left"):
        calibration.save(tmp_path / "c.json")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary


def test_noisy_accuracy_of_no_images_is_an_input_error(problem):
    with pytest.raises(InvalidInputError, match="at least one image"):
        noisy_accuracy(problem.model, problem.x[:0], torch.zeros(0, dtype=torch.long), 0.25)


def test_check_images_says_batch_before_comparing_shapes():
    with pytest.raises(InvalidInputError, match="must be a batch"):
        check_images(torch.zeros(8), (1, 8, 8))
    with pytest.raises(InvalidInputError, match="must be a batch"):
        check_images(torch.zeros(1, 8, 8), (1, 8, 8))
    with pytest.raises(InvalidInputError, match="expects N x 1 x 8 x 8"):
        check_images(torch.zeros(2, 1, 8, 9), (1, 8, 8))
    with pytest.raises(InvalidInputError, match="NaN"):
        check_images(torch.tensor([[float("nan"), 0.5]]))
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        check_images(torch.tensor([[1.5, 0.5]]))


def test_hybrid_load_verifies_the_signature_and_takes_a_thread_setting(tmp_path, problem, monkeypatch):
    from surrogate_cert.core.errors import ArtifactSignatureError, SignatureError
    from surrogate_cert.core.signing import ENV_KEY, ENV_KEY_FILE
    from surrogate_cert.deploy.hybrid import HybridCertifier

    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    surrogate = Surrogate.build(SHAPE, 2, 0.25, seed=0, device="cpu")
    surrogate.fit(problem.x[:100], _counts(problem)[:100], epochs=1)
    surrogate.save(tmp_path / "s.pt", key="k" * 16)  # with a key configured, the surrogate must be signed too
    calibration = calibrate_arrays(surrogate, problem.x, _counts(problem), 0.05, 1e-3)
    calibration.save(tmp_path / "signed.json", key="k" * 16)
    calibration.save(tmp_path / "plain.json")
    hybrid = HybridCertifier.load(tmp_path / "s.pt", tmp_path / "signed.json", fallback="none", key="k" * 16, threads=1)
    assert hybrid.surrogate_certifier.threads == 1 and len(hybrid.certify(problem.x[:3])) == 3
    with pytest.raises(ArtifactSignatureError, match="another key"):  # the surrogate's, first
        HybridCertifier.load(tmp_path / "s.pt", tmp_path / "signed.json", fallback="none", key="j" * 16)
    monkeypatch.setenv(ENV_KEY, "k" * 16)
    with pytest.raises(SignatureError, match="not signed"):
        HybridCertifier.load(tmp_path / "s.pt", tmp_path / "plain.json", fallback="none")
    with pytest.raises(InvalidParameterError, match="threads"):
        HybridCertifier.load(tmp_path / "s.pt", tmp_path / "signed.json", fallback="none", threads=0)


def test_thread_setting_is_restored_after_each_call(problem):
    from surrogate_cert.core.one_pass import SurrogateCertifier

    surrogate = Surrogate(problem.model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=0.25)
    calibration = calibrate_arrays(surrogate, problem.x, _counts(problem), 0.05, 1e-3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        certifier = SurrogateCertifier(surrogate, calibration)  # "auto": one thread for small batches
        seen = []
        original = surrogate.predict_z  # the certifier's forward pass (class, p~ and the tail-accurate z~)
        surrogate.predict_z = lambda x, validate=True: (
            seen.append(torch.get_num_threads()),
            original(x, validate=validate),
        )[1]
        certifier.certify(problem.x[:4])
        assert seen == [1] and torch.get_num_threads() == 2
        SurrogateCertifier(surrogate, calibration, threads=None).certify(problem.x[:4])
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
