"""calibration.json: round trip, integrity, binding to the surrogate, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays, fit_offsets, load_calibration
from calibration.artifact import Calibration
from surrogate_cert.core import stats
from surrogate_cert.core.errors import CalibrationError, InvalidParameterError, SignatureError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.surrogate import Surrogate

SIGMA = 0.25


@pytest.fixture(scope="module")
def problem():
    return linear_problem(300, sigma=SIGMA, input_shape=(1, 2, 2), seed=3)


def _surrogate(problem, scale=3.0, sigma=SIGMA) -> Surrogate:
    # The linear model itself, sharpened: an overconfident but mostly right surrogate.
    model = type(problem.model)(problem.model.w * scale, float(problem.model.b) * scale)
    return Surrogate(model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=sigma, device="cpu")


def _counts(problem, n_cal=2000, seed=0):
    k1 = np.random.default_rng(seed).binomial(n_cal, problem.p1)
    return np.stack([n_cal - k1, k1], axis=1)


@pytest.fixture(scope="module")
def calibration(problem):
    return calibrate_arrays(_surrogate(problem), problem.x, _counts(problem), 0.05, 1e-3, groups="class")


def test_round_trip_keeps_every_field_and_the_deployed_offsets(tmp_path, problem, calibration):
    path = calibration.save(tmp_path / "calibration.json")
    loaded = load_calibration(path, surrogate=_surrogate(problem))
    assert loaded.offsets == pytest.approx(calibration.offsets)
    assert loaded.radius_cap == pytest.approx(calibration.radius_cap)
    assert (loaded.epsilon, loaded.alpha_mc, loaded.groups, loaded.guarantee, loaded.method) == (
        0.05,
        1e-3,
        "class",
        "marginal",
        "conformal",
    )
    assert loaded.calibration_size == 300 and loaded.n_cal == 2000
    content = json.loads(open(path).read())
    for key in (
        "surrogate_sha256",
        "sigma",
        "num_classes",
        "epsilon",
        "alpha_mc",
        "delta",
        "guarantee",
        "method",
        "groups",
        "offsets",
        "group_sizes",
        "fallback_groups",
        "calibration_size",
        "n_cal",
        "counts_sha256",
        "package_version",
        "diagnostics",
        "checksum_sha256",
        "bound",
    ):
        assert key in content
    assert content["bound"] == pytest.approx(0.051)
    assert 0 <= content["diagnostics"]["violation_rate"] <= 1


def test_infinite_offset_survives_json(tmp_path, problem):
    cal = calibrate_arrays(_surrogate(problem), problem.x[:20], _counts(problem)[:20], 0.05, 1e-3, groups="class")
    # 20 points, 19 needed at epsilon = 0.05: neither class has enough, so neither is ever certified.
    assert cal.fallback_groups == ["0", "1"] and np.isinf(cal.offsets["0"]) and np.isfinite(cal.pooled_offset)
    path = cal.save(tmp_path / "c.json")
    loaded = load_calibration(path)
    assert loaded.fallback_groups == ["0", "1"] and np.isinf(loaded.offset("0")) and np.isinf(loaded.offset("1"))
    inf_cal = Calibration(
        **{
            **loaded.__dict__,
            "offsets": {"all": float("inf")},
            "pooled_offset": float("inf"),
            "groups": "none",
            "created": None,
            "group_sizes": {"all": 20},
            "fallback_groups": [],
        }
    )
    loaded2 = load_calibration(inf_cal.save(tmp_path / "inf.json"))
    assert np.isinf(loaded2.offset("all"))


def test_tampered_file_is_refused(tmp_path, calibration):
    path = calibration.save(tmp_path / "calibration.json")
    content = json.loads(open(path).read())
    content["offsets"]["0"] = content["offsets"]["0"] - 0.1  # claim larger radii
    (tmp_path / "tampered.json").write_text(json.dumps(content))
    with pytest.raises(CalibrationError, match="modified"):
        load_calibration(tmp_path / "tampered.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(tmp_path / "garbage.json")
    with pytest.raises(CalibrationError, match="cannot read"):
        load_calibration(tmp_path / "missing.json")


def test_another_surrogate_sigma_or_class_count_is_refused(tmp_path, problem, calibration):
    path = calibration.save(tmp_path / "calibration.json")
    with pytest.raises(CalibrationError, match="another surrogate"):
        load_calibration(path, surrogate=_surrogate(problem, scale=2.0))
    other_sigma = _surrogate(problem, sigma=0.5)
    calibration_sigma = Calibration(**{**calibration.__dict__, "surrogate_sha256": other_sigma.fingerprint()})
    with pytest.raises(CalibrationError, match="sigma"):
        calibration_sigma.check_matches(other_sigma)
    same = _surrogate(problem)
    calibration_k = Calibration(**{**calibration.__dict__, "num_classes": 3})
    with pytest.raises(CalibrationError, match="classes"):
        calibration_k.check_matches(same)


def test_too_small_calibration_set_says_how_many_are_needed(problem):
    s = _surrogate(problem)
    needed = stats.min_calibration_size(0.01)
    with pytest.raises(CalibrationError, match=f"{needed} are needed"):
        calibrate_arrays(s, problem.x[:50], _counts(problem)[:50], 0.01, 1e-3)
    needed_pac = stats.min_calibration_size(0.05, 0.05)
    with pytest.raises(CalibrationError, match=f"{needed_pac} are needed"):
        calibrate_arrays(s, problem.x[:50], _counts(problem)[:50], 0.05, 1e-3, guarantee="pac", delta=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(epsilon=0.6), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(alpha_mc=0.0), "alpha_mc"),
        (dict(alpha_mc=1.5), "alpha_mc"),
        (dict(guarantee="pac", delta=0.0), "delta"),
        (dict(guarantee="bayes"), "guarantee"),
        (dict(groups="pixel"), "groups"),
        (dict(method="magic"), "method"),
    ],
)
def test_bad_parameters_are_clear_errors(kwargs, match):
    args = dict(sigma=SIGMA, num_classes=2, epsilon=0.1, alpha_mc=1e-3)
    args.update(kwargs)
    p = np.full(50, 0.9)
    with pytest.raises(InvalidParameterError, match=match):
        fit_offsets(p, np.zeros(50, int), np.full(50, 900), 1000, **args)


def test_counts_of_the_wrong_shape_are_refused(problem):
    s = _surrogate(problem)
    with pytest.raises(CalibrationError, match="N x 2"):
        calibrate_arrays(s, problem.x, np.ones((300, 3), dtype=int), 0.05, 1e-3)
    uneven = _counts(problem)
    uneven[0, 0] += 1
    with pytest.raises(CalibrationError, match="same number"):
        calibrate_arrays(s, problem.x, uneven, 0.05, 1e-3)


def test_bad_images_are_refused(problem):
    from surrogate_cert.core.errors import InvalidInputError

    s = _surrogate(problem)
    with pytest.raises(InvalidInputError):
        calibrate_arrays(s, problem.x * 3, _counts(problem), 0.05, 1e-3)
    with pytest.raises(InvalidInputError):
        calibrate_arrays(s, torch.zeros(300, 1, 3, 3), _counts(problem), 0.05, 1e-3)


def test_version_1_files_still_load(tmp_path, problem, calibration):
    """A file written before signatures (checksum named integrity_sha256) loads when no key is set."""
    import hashlib

    content = calibration.to_dict()
    for key in ("checksum_sha256", "signature_key_id"):
        content.pop(key)
    content["format_version"] = 1
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    content["integrity_sha256"] = hashlib.sha256(canonical).hexdigest()
    (tmp_path / "v1.json").write_text(json.dumps(content))
    loaded = load_calibration(tmp_path / "v1.json", surrogate=_surrogate(problem))
    assert loaded.offsets == pytest.approx(calibration.offsets) and not loaded.signed
    content["epsilon"] = 0.2
    (tmp_path / "v1_edited.json").write_text(json.dumps(content))
    with pytest.raises(CalibrationError, match="modified"):
        load_calibration(tmp_path / "v1_edited.json")
    with pytest.raises(SignatureError, match="not signed"):
        load_calibration(tmp_path / "v1.json", key=b"k" * 32)


def test_signature_round_trip_and_refusals(tmp_path, problem, calibration, monkeypatch):
    from surrogate_cert.core.signing import ENV_KEY, ENV_KEY_FILE

    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    key = b"0123456789abcdef0123456789abcdef"
    path = calibration.save(tmp_path / "signed.json", key=key)
    content = json.loads(open(path).read())
    assert content["signature_hmac_sha256"] and content["signature_key_id"] == calibration.signature_key_id
    assert load_calibration(path, key=key).signed
    assert load_calibration(path).signed  # no key configured: the checksum is checked, the signature is not
    (tmp_path / "key.txt").write_bytes(key + b"\n")
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "key.txt"))
    load_calibration(path)  # the environment's key verifies it
    with pytest.raises(SignatureError, match="another key"):
        load_calibration(path, key=b"x" * 32)
    unsigned = calibration.save(tmp_path / "unsigned.json", key=None)  # the environment's key signs it
    assert json.loads(open(unsigned).read())["signature_key_id"] == calibration.signature_key_id
    monkeypatch.delenv(ENV_KEY_FILE)
    plain = calibration.save(tmp_path / "plain.json")
    assert "signature_hmac_sha256" not in json.loads(open(plain).read())
    monkeypatch.setenv(ENV_KEY, key.decode())
    with pytest.raises(SignatureError, match="not signed"):
        load_calibration(plain)
    # Altered after signing, checksum recomputed (what someone without the key can do): refused.
    import hashlib

    content["offsets"] = {k: (v - 0.01 if v is not None else v) for k, v in content["offsets"].items()}
    content["pooled_offset"] = content["pooled_offset"] - 0.01
    body = {k: v for k, v in content.items() if k not in ("checksum_sha256", "signature_hmac_sha256")}
    content["checksum_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    ).hexdigest()
    (tmp_path / "forged.json").write_text(json.dumps(content))
    with pytest.raises(SignatureError, match="altered after signing"):
        load_calibration(tmp_path / "forged.json")
    with pytest.raises(InvalidParameterError, match="at least 16"):
        load_calibration(path, key=b"short")
