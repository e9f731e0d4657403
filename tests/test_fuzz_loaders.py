"""Property-based fuzzing of the loaders and of ``stats``: whatever they are given, they either return
something consistent or raise their typed error, never another exception.

- counts store: a valid file with one attribute or cell changed -> ``read_counts`` returns rows that
  agree with the attributes, or raises ``StoreError``;
- calibration artifact: a valid calibration with one field replaced by any JSON value and the checksum
  recomputed (what a forger can do) -> ``load_calibration`` returns a calibration whose offsets and cap
  are usable numbers, or raises ``CalibrationError``; arbitrary bytes -> ``CalibrationError``;
- model loader: arbitrary bytes behind any magic number, and checkpoints with arbitrary headers ->
  ``ModelError`` (or a model);
- results TSV: arbitrary cells under Cohen's header -> ``InvalidInputError`` or consistent rows;
- stats: bad alpha / counts / priors -> ``InvalidParameterError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibration import calibrate_arrays, load_calibration
from data_gen.models import load_model
from data_gen.store import CountsWriter, read_counts
from surrogate_cert.core import stats
from surrogate_cert.core.architectures import build, load_checkpoint
from surrogate_cert.core.certificate import read_tsv
from surrogate_cert.core.errors import (
    CalibrationError,
    InvalidInputError,
    InvalidParameterError,
    ModelError,
    StoreError,
)
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import deployed_radius
from surrogate_cert.core.surrogate import Surrogate

# CI runs a fixed set of 60 examples per property (derandomized: no flaky failures); set FUZZ_EXAMPLES=400
# to search further with fresh random examples.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


# --------------------------------------------------------------------------- counts store


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "good.h5"
    rng = np.random.default_rng(0)
    attrs = dict(
        sigma=0.25,
        n=20,
        n0=5,
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
    with CountsWriter.open(path, indices=np.arange(6) * 3, labels=np.arange(6) % 3, attrs=attrs) as writer:
        writer.append(rng.multinomial(20, [0.5, 0.3, 0.2], size=6), rng.multinomial(5, [0.5, 0.3, 0.2], size=6))
    return path


ATTR_EDITS = st.sampled_from(
    ["sigma", "n", "n0", "num_classes", "rows", "complete", "input_shape", "format_version", "format"]
)
ATTR_VALUES = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-1, 9), max_size=4),
    st.booleans(),
)


@FUZZ
@given(key=ATTR_EDITS, value=ATTR_VALUES)
def test_counts_attribute_edits_are_caught_or_consistent(tmp_path, counts_file, key, value):
    path = tmp_path / "edited.h5"
    shutil.copy(counts_file, path)
    with h5py.File(path, "r+") as h5:
        try:
            h5.attrs[key] = value
        except (TypeError, ValueError):
            return  # h5py cannot store it: not a file anyone can make
    _read_counts_consistently(path)


@FUZZ
@given(
    table=st.sampled_from(["counts", "counts_select", "labels", "indices"]),
    row=st.integers(0, 5),
    value=st.integers(-5, 2**32 - 1),
)
def test_counts_cell_edits_are_caught_or_consistent(tmp_path, counts_file, table, row, value):
    path = tmp_path / "edited.h5"
    shutil.copy(counts_file, path)
    with h5py.File(path, "r+") as h5:
        data = h5[table][...]
        index = (row, value % data.shape[1]) if data.ndim == 2 else row
        data = data.astype(np.int64)
        data[index] = value
        h5[table][...] = data.astype(h5[table].dtype) if table.startswith("counts") else data
    _read_counts_consistently(path)


def _read_counts_consistently(path):
    try:
        counts = read_counts(path)
    except StoreError:
        return
    k, n, n0 = counts.num_classes, counts.n, int(counts.attrs["n0"])
    assert counts.counts.shape == (len(counts), k) and np.all(counts.counts.sum(axis=1) == n)
    if n0:
        assert np.all(counts.counts_select.sum(axis=1) == n0)
    assert np.all((counts.labels >= 0) & (counts.labels < k))
    assert len(np.unique(counts.indices)) == len(counts.indices)


# --------------------------------------------------------------------------- calibration artifact


@pytest.fixture(scope="module")
def calibration_content():
    problem = linear_problem(120, sigma=0.25, input_shape=(1, 2, 2), seed=1)
    surrogate = Surrogate(problem.model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=0.25)
    k1 = np.random.default_rng(0).binomial(300, problem.p1)
    counts = np.stack([300 - k1, k1], axis=1)
    return calibrate_arrays(surrogate, problem.x, counts, 0.05, 1e-3, groups="class").to_dict()


def _rehash(content: dict) -> dict:
    body = {k: v for k, v in content.items() if k not in ("checksum_sha256", "signature_hmac_sha256")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return {**body, "checksum_sha256": hashlib.sha256(canonical).hexdigest()}


CALIBRATION_FIELDS = st.sampled_from(
    [
        "sigma",
        "num_classes",
        "epsilon",
        "alpha_mc",
        "delta",
        "guarantee",
        "method",
        "groups",
        "offsets",
        "pooled_offset",
        "calibration_size",
        "n_cal",
        "radius_cap",
        "group_sizes",
        "fallback_groups",
        "min_group_size",
        "bin_edges",
        "bound",
        "diagnostics",
        "format_version",
        "surrogate_sha256",
    ]
)


@FUZZ
@given(key=CALIBRATION_FIELDS, value=JSON_VALUES, drop=st.booleans())
def test_forged_calibration_fields_are_refused_or_usable(tmp_path, calibration_content, key, value, drop):
    content = dict(calibration_content)
    if drop:
        content.pop(key, None)
    else:
        content[key] = value
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(_rehash(content)))
    try:
        calibration = load_calibration(path)
    except CalibrationError:
        return
    # Accepted: every number a deployment reads is usable, and the cap is the one n_cal samples give.
    assert math.isfinite(calibration.radius_cap) and calibration.radius_cap == pytest.approx(
        stats.max_radius(calibration.n_cal, calibration.alpha_mc, calibration.sigma)
    )
    assert 0 < calibration.epsilon < 0.5 and calibration.sigma > 0
    radii = deployed_radius(calibration, np.array([0, 1]), np.array([0.9, 0.99]))
    assert radii.shape == (2,) and not np.any(np.isnan(radii)) and np.all(radii <= calibration.radius_cap)


@FUZZ
@given(
    data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"{", b"\x89HDF\r\n\x1a\n", b"PK\x03\x04", b"\x80\x02"])
)
def test_arbitrary_bytes_as_calibration_are_a_calibration_error(tmp_path, data, prefix):
    path = tmp_path / "c.json"
    path.write_bytes(prefix + data)
    with pytest.raises(CalibrationError):
        load_calibration(path)


# --------------------------------------------------------------------------- model loader


@FUZZ
@given(
    data=st.binary(max_size=400),
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"\x89HDF\r\n\x1a\n", b"{", b"#!"]),
)
def test_arbitrary_bytes_as_model_are_a_model_error(tmp_path, data, prefix):
    path = tmp_path / "m.pt"
    path.write_bytes(prefix + data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelError):
            load_model(str(path), device="cpu")


HEADER_KEYS = st.sampled_from(
    ["format", "format_version", "kind", "arch", "input_shape", "num_classes", "meta", "state_dict"]
)


@FUZZ
@given(key=HEADER_KEYS, value=JSON_VALUES, drop=st.booleans())
def test_checkpoints_with_any_header_load_or_are_a_model_error(tmp_path, key, value, drop):
    model = build("small_cnn", (1, 8, 8), 3)
    payload = dict(
        format="surrogate-cert-model",
        format_version=1,
        kind="base",
        arch="small_cnn",
        input_shape=[1, 8, 8],
        num_classes=3,
        state_dict=model.state_dict(),
        meta={"sigma": 0.25},
    )
    if drop:
        payload.pop(key)
    else:
        payload[key] = value
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    try:
        loaded, header = load_checkpoint(path)
    except ModelError:
        return
    assert header["num_classes"] >= 2 and len(header["input_shape"]) == 3
    assert loaded(torch.zeros(1, *header["input_shape"])).shape == (1, header["num_classes"])


# --------------------------------------------------------------------------- results TSV

CELL = st.one_of(
    st.integers(-3, 12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "x", "0:00:01.5", "cohen", "abstain", "1e400"]),
)


@FUZZ
@given(rows=st.lists(st.lists(CELL, min_size=6, max_size=10), max_size=4))
def test_results_tsv_rows_are_consistent_or_refused(tmp_path, rows):
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\tn_samples\tp_lower"
    path = tmp_path / "r.tsv"
    path.write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
    try:
        parsed = read_tsv(path)
    except InvalidInputError:
        return
    for r in parsed:
        assert r["label"] >= 0 and r["predict"] >= -1 and math.isfinite(r["radius"]) and r["radius"] >= 0
        assert r["correct"] == int(r["predict"] == r["label"]) and (r["predict"] >= 0 or r["radius"] == 0)
        assert math.isfinite(r["time"]) and r["time"] >= 0


# --------------------------------------------------------------------------- stats

BAD_ALPHA = st.one_of(
    st.floats(max_value=0.0),
    st.floats(min_value=1.0),
    st.just(float("nan")),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(min_value=1.0), min_size=1, max_size=2),
)
BAD_COUNT = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer() if math.isfinite(v) else True),
    st.text(min_size=1, max_size=3),
    st.none(),
)


@FUZZ
@given(alpha=BAD_ALPHA)
def test_bad_alpha_is_a_parameter_error_everywhere(alpha):
    for call in (
        lambda: stats.clopper_pearson(5, 10, alpha),
        lambda: stats.lower_confidence_bound(5, 10, alpha),
        lambda: stats.beta_binomial_cs(5, 10, alpha),
        lambda: stats.max_radius(100, alpha, 0.25),
        lambda: stats.cohen_certify([[1, 9]], [[2, 98]], alpha, 0.25),
        lambda: stats.predict_test(60, 40, alpha),
        lambda: stats.reference_radius(90, 100, alpha, 0.25),
        lambda: stats.conformal_rank(99, alpha),
        lambda: stats.pac_conformal_rank(99, 0.1, alpha),
        lambda: stats.min_calibration_size(alpha),
        lambda: stats.min_calibration_size(0.1, alpha if alpha is not None else -1.0),
    ):
        with pytest.raises(InvalidParameterError):
            call()


@FUZZ
@given(bad=BAD_COUNT)
def test_bad_counts_are_a_parameter_error_everywhere(bad):
    for call in (
        lambda: stats.clopper_pearson(bad, 10, 0.05),
        lambda: stats.clopper_pearson(5, bad, 0.05),
        lambda: stats.lower_confidence_bound(bad, 10, 0.05),
        lambda: stats.beta_binomial_cs(bad, 10, 0.05),
        lambda: stats.beta_binomial_cs(3, bad, 0.05),
        lambda: stats.cohen_certify([[bad, 9]], [[2, 98]], 0.01, 0.25),
        lambda: stats.predict_test(bad, 40, 0.05),
        lambda: stats.conformal_rank(bad, 0.1),
        lambda: stats.binomial_allowance(bad, 0.01),
        lambda: stats.reference_radius(bad, 100, 0.01, 0.25),
        lambda: stats.prior_log_evidence([bad], 100, [0.9], 10.0, 0.2),
    ):
        with pytest.raises(InvalidParameterError):
            call()


@FUZZ
@given(
    bad=st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")), st.text(max_size=2)),
    which=st.sampled_from(["a", "b", "weights", "kappa", "w"]),
)
def test_bad_priors_are_a_parameter_error(bad, which):
    if which == "w" and isinstance(bad, float) and bad == 0.0:
        return  # w = 0 is a valid prior: the surrogate's Beta alone
    calls = {
        "a": lambda: stats.beta_binomial_cs(5, 10, 0.05, a=bad),
        "b": lambda: stats.beta_binomial_cs(5, 10, 0.05, b=bad),
        "weights": lambda: stats.beta_binomial_cs(5, 10, 0.05, a=[0.5, 2.0], b=[0.5, 1.0], weights=[bad, bad]),
        "kappa": lambda: stats.surrogate_prior([0.9], bad, 0.2),
        "w": lambda: stats.surrogate_prior([0.9], 10.0, bad),
    }
    with pytest.raises(InvalidParameterError):
        calls[which]()
