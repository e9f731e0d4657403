"""The defects found while moving to layers stay fixed: each test pins one of them."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays
from surrogate_cert.core import stats
from surrogate_cert.core.certificate import COHEN_COLUMNS, TSV_COLUMNS, Certificate, read_meta, read_tsv, write_tsv
from surrogate_cert.core.errors import InvalidInputError, InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier, deployed_radius, group_keys
from surrogate_cert.core.surrogate import Surrogate

SIGMA = 0.25
SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def problem():
    return linear_problem(600, sigma=SIGMA, input_shape=SHAPE, seed=21)


def _surrogate(problem, scale=2.0) -> Surrogate:
    model = type(problem.model)(problem.model.w * scale, float(problem.model.b) * scale)
    return Surrogate(model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=SIGMA, device="cpu")


def _counts(problem, n_cal=2000, seed=0):
    k1 = np.random.default_rng(seed).binomial(n_cal, problem.p1)
    return np.stack([n_cal - k1, k1], axis=1)


def test_deployed_radius_uses_the_bin_edges_stored_in_the_calibration(problem):
    surrogate = _surrogate(problem)
    edges = [0.5, 1.5]  # not the default (1, 2, 3): three bins instead of four
    calibration = calibrate_arrays(
        surrogate, problem.x, _counts(problem), 0.05, 1e-3, groups="confidence", bin_edges=edges
    )
    assert calibration.bin_edges == edges and set(calibration.offsets) == {"0", "1", "2"}
    classes, p_tilde = surrogate.predict(problem.x)
    keys = group_keys(classes, p_tilde, "confidence", edges)
    expected = stats.calibrated_radius(
        p_tilde, SIGMA, calibration.radius_cap, np.array([calibration.offset(k) for k in keys])
    )
    np.testing.assert_array_equal(deployed_radius(calibration, classes, p_tilde), expected)
    # With the default edges the same offsets would be applied to other inputs: the stored edges matter.
    wrong_keys = group_keys(classes, p_tilde, "confidence")
    assert np.any(wrong_keys != keys)
    # And they survive the file.
    again = type(calibration).from_dict(json.loads(json.dumps(calibration.to_dict())))
    np.testing.assert_array_equal(deployed_radius(again, classes, p_tilde), expected)


def test_results_tsv_first_line_is_cohens_header_and_provenance_is_a_sidecar(tmp_path):
    path = tmp_path / "results.tsv"
    certificates = [Certificate(1, 0.5, "cohen", 10_100, 0.977, 1.5), Certificate(-1, 0.0, "abstain", 10_100, 0.3, 1.0)]
    write_tsv(path, [7, 8], [1, 0], certificates, meta={"command": "surrogate-cert cohen ...", "sigma": 0.25})
    with open(path, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        rows = list(reader)
    assert tuple(header[:6]) == COHEN_COLUMNS == ("idx", "label", "predict", "radius", "correct", "time")
    assert tuple(header) == TSV_COLUMNS and len(rows) == 2 and rows[0][:5] == ["7", "1", "1", "0.5", "1"]
    assert read_meta(path) == {"command": "surrogate-cert cohen ...", "sigma": 0.25}
    assert not any(line.startswith("#") for line in path.read_text().splitlines())
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(path, delimiter="\t")  # Cohen et al.'s analysis code reads it this way
    assert list(frame.columns[:6]) == list(COHEN_COLUMNS)
    assert frame["radius"].tolist() == [0.5, 0.0] and frame["correct"].tolist() == [1, 0]


def test_old_results_with_comment_lines_still_read(tmp_path):
    path = tmp_path / "old.tsv"
    old_columns = COHEN_COLUMNS + ("method", "n_samples", "p_lower")  # version 0.1's header
    path.write_text(
        "# surrogate-cert cohen --sigma 0.5 --seed 3\n" + "\t".join(old_columns) + "\n"
        "0\t1\t1\t0.4\t1\t0.1\tcohen\t10100\t0.9\n"
    )
    assert read_tsv(path)[0]["radius"] == 0.4
    assert read_meta(path) == {"comment": ["surrogate-cert cohen --sigma 0.5 --seed 3"]}


def test_write_tsv_header_comment_is_deprecated_and_goes_to_the_sidecar(tmp_path):
    path = tmp_path / "r.tsv"
    with pytest.warns(DeprecationWarning, match="meta"):
        write_tsv(path, [0], [1], [Certificate(1, 0.1, "cohen", 10, 0.6, 0.0)], header_comment="a\nb")
    assert read_meta(path)["comment"] == ["a", "b"] and path.read_text().startswith("idx\t")


def test_hybrid_load_hashes_the_surrogate_weights_once(problem, tmp_path, monkeypatch):
    from surrogate_cert.core import surrogate as surrogate_module
    from surrogate_cert.deploy.hybrid import HybridCertifier

    surrogate = Surrogate.build(SHAPE, 2, SIGMA, seed=0, device="cpu")
    surrogate.fit(problem.x[:200], _counts(problem)[:200], epochs=1)
    calibration = calibrate_arrays(surrogate, problem.x, _counts(problem), 0.05, 1e-3)
    surrogate.save(tmp_path / "s.pt")
    calibration.save(tmp_path / "c.json")
    digests = []
    real = surrogate_module.weights_digest

    def counting(*args):
        digests.append(1)
        return real(*args)

    monkeypatch.setattr(surrogate_module, "weights_digest", counting)
    HybridCertifier.load(tmp_path / "s.pt", tmp_path / "c.json", fallback="none", device="cpu")
    assert len(digests) == 1


def test_fingerprint_follows_in_place_changes_of_the_weights(problem):
    surrogate = _surrogate(problem)
    before = surrogate.fingerprint()
    assert surrogate.fingerprint() == before
    with torch.no_grad():
        surrogate.model.w.mul_(1.01)
    assert surrogate.fingerprint() != before


def test_one_pass_certifier_checks_its_indices(problem):
    surrogate = _surrogate(problem)
    calibration = calibrate_arrays(surrogate, problem.x, _counts(problem), 0.05, 1e-3)
    certifier = SurrogateCertifier(surrogate, calibration)
    assert len(certifier.certify(problem.x[:3], indices=[5, 6, 7])) == 3
    with pytest.raises(InvalidInputError, match="one entry per input"):
        certifier.certify(problem.x[:3], indices=[5, 6])


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_prior_weight_range_is_the_same_everywhere(problem, w):
    surrogate = Surrogate(problem.model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=SIGMA, w=w)
    assert surrogate.w == w == stats.check_prior_weight(w)
    stats.surrogate_prior([0.9], 10.0, w)


def test_prior_weight_outside_zero_one_is_refused_alike(problem):
    with pytest.raises(InvalidParameterError, match=r"w must lie in \[0, 1\]"):
        Surrogate(problem.model, arch="linear", input_shape=SHAPE, num_classes=2, sigma=SIGMA, w=1.5)
    with pytest.raises(InvalidParameterError, match=r"w must lie in \[0, 1\]"):
        stats.surrogate_prior([0.9], 10.0, 1.5)


def test_cohen_stage_key_does_not_depend_on_wall_clock(tmp_path, monkeypatch):
    """The quickstart's cohen stage is reused when its inputs are: the datagen time is not an input."""
    from surrogate_cert.workflows import pipeline

    run = pipeline.Pipeline(tmp_path, pipeline.QUICK, quiet=True)
    (tmp_path / "test.h5").write_bytes(b"counts")
    keys = []
    monkeypatch.setattr(run, "stage", lambda name, key, outputs, fn, what: keys.append(key))
    run.manifest.data["stages"]["datagen test"] = {"seconds": 12.0}
    run.cohen()
    run.manifest.data["stages"]["datagen test"] = {"seconds": 99.0}
    run.cohen()
    assert keys[0] == keys[1]


def test_old_module_paths_still_import_with_a_deprecation_warning():
    for old, name in (
        ("surrogate_cert.hybrid", "HybridCertifier"),
        ("surrogate_cert.smoothing", "SmoothedClassifier"),
        ("surrogate_cert.surrogate", "train_surrogate"),
        ("calibration.report", "write_report"),
        ("surrogate_cert.bench", "run_bench"),
    ):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught), old
        assert callable(getattr(module, name))
    from surrogate_cert.hybrid import SurrogateCertifier as old_class

    assert old_class is SurrogateCertifier
    import surrogate_cert
    import surrogate_cert.stats  # public, not deprecated

    assert surrogate_cert.stats is stats


def test_public_api_names_resolve_lazily():
    import surrogate_cert as sc

    for name in sc.__all__:
        assert getattr(sc, name) is not None, name
    assert dataclasses.is_dataclass(sc.Certificate)
