"""The hybrid certifier with deployment watchers: after a drift or audit alarm every query goes to the
sequential certifier (route drift_alarm / audit_alarm) until recalibrate; the route is recorded in the TSV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from calibration import calibrate_arrays
from surrogate_cert.core.certificate import ROUTES, TSV_COLUMNS, Certificate, read_tsv, write_tsv
from surrogate_cert.core.groundtruth import LinearBinaryModel, linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier
from surrogate_cert.deploy.monitor import CertificateAudit, DriftMonitor

SIGMA = 0.25
SHAPE = (1, 2, 2)


def _surrogate() -> Surrogate:
    problem = linear_problem(1, sigma=SIGMA, input_shape=SHAPE)
    w = problem.model.w.double()
    u = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) / 2
    w_tilted = (w + 0.5 * u) / torch.linalg.norm(w + 0.5 * u)
    b_tilted = -float(w_tilted @ torch.full((4,), 0.5, dtype=torch.float64))
    scale = 1.702 * 1.5 / (2 * SIGMA)
    return Surrogate(
        LinearBinaryModel(w_tilted.float() * scale, b_tilted * scale),
        arch="linear",
        input_shape=SHAPE,
        num_classes=2,
        sigma=SIGMA,
        kappa=50.0,
        w=0.2,
        device="cpu",
    )


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    surrogate = _surrogate()
    cal = linear_problem(300, sigma=SIGMA, input_shape=SHAPE, seed=11)
    k1 = np.random.default_rng(0).binomial(2000, cal.p1)
    calibration = calibrate_arrays(surrogate, cal.x, np.stack([2000 - k1, k1], 1), 0.05, 1e-3)
    return surrogate, calibration


def _hybrid(surrogate, calibration, base, monitor=None, audit=None, fallback=True):
    sequential = None
    if fallback:
        sequential = EProcessCertifier(
            SmoothedClassifier(base, 2, SIGMA, device="cpu", batch_size=4096), 1e-3, max_samples=2000, tolerance=0.02
        )
    return HybridCertifier(SurrogateCertifier(surrogate, calibration), sequential, monitor, audit)


def _shifted(n, seed):
    """Points far on the class-1 side of the hyperplane: one class, unusually confident."""
    problem = linear_problem(10 * n, sigma=SIGMA, input_shape=SHAPE, seed=seed)
    keep = np.flatnonzero(problem.p1 > 0.95)[:n]
    assert len(keep) == n
    return problem.x[torch.as_tensor(keep)], problem


def test_after_a_drift_alarm_every_query_goes_to_the_sequential_certifier(setup):
    surrogate, calibration = setup
    normal = linear_problem(60, sigma=SIGMA, input_shape=SHAPE, seed=12)
    shifted, _ = _shifted(120, seed=13)
    x = torch.cat([normal.x, shifted])
    monitor = DriftMonitor.from_calibration(calibration, delta=0.01, seed=0)
    hybrid = _hybrid(surrogate, calibration, normal.model, monitor=monitor)
    _, _, radius = hybrid.surrogate_certifier.radii(x)
    certs = hybrid.certify(x, indices=np.arange(len(x)))
    assert monitor.alarm and 60 <= monitor.alarm_at < len(x) and hybrid.alarm_reason == "drift_alarm"
    at = monitor.alarm_at
    for i, c in enumerate(certs):
        assert c.route in ROUTES
        if i < at:
            assert c.route == ("surrogate" if radius[i] > 0 else "fallback")
        else:
            assert c.route == "drift_alarm" and c.method in ("eprocess", "abstain") and c.n_samples > 0
    assert any(c.method == "surrogate" for c in certs[:at]) and any(radius[at:] > 0)
    later = hybrid.certify(normal.x[:5])
    assert [c.route for c in later] == ["drift_alarm"] * 5 and monitor.queries == len(x) + 5  # a full record
    hybrid.recalibrate(calibration)
    assert hybrid.alarm_reason is None and hybrid.monitor is not monitor and hybrid.monitor.queries == 0
    assert hybrid.monitor.delta == 0.01
    fresh = hybrid.certify(normal.x[:20])
    assert "drift_alarm" not in {c.route for c in fresh} and {"surrogate"} <= {c.route for c in fresh}


def test_without_fallback_alarmed_queries_abstain(setup):
    surrogate, calibration = setup
    shifted, problem = _shifted(150, seed=14)
    monitor = DriftMonitor.from_calibration(calibration, delta=0.01, seed=0)
    certs = _hybrid(surrogate, calibration, problem.model, monitor=monitor, fallback=False).certify(shifted)
    assert monitor.alarm
    assert all(c.method == "abstain" and c.route == "drift_alarm" for c in certs[monitor.alarm_at :])
    assert all(c.route == "surrogate" for c in certs[: monitor.alarm_at])


def test_an_audit_alarm_routes_like_a_drift_alarm_and_audited_samples_are_counted(setup):
    surrogate, calibration = setup
    wrong = dataclasses.replace(calibration, offsets={k: 0.0 for k in calibration.offsets}, pooled_offset=0.0)
    test = linear_problem(200, sigma=SIGMA, input_shape=SHAPE, seed=15)
    smooth = SmoothedClassifier(test.model, 2, SIGMA, device="cpu", batch_size=8192)
    audit = CertificateAudit(wrong, smooth, rate=0.5, delta=0.01, seed=1)
    hybrid = _hybrid(surrogate, wrong, test.model, audit=audit)
    certs = hybrid.certify(test.x, indices=np.arange(200))
    assert audit.alarm and hybrid.alarm_reason == "audit_alarm"
    assert all(c.route == "audit_alarm" for c in certs[audit.alarm_at :])
    audited_surrogate = [c for c in certs[: audit.alarm_at] if c.method == "surrogate" and c.n_samples == 2000]
    assert audited_surrogate  # an audited one-pass certificate carries the audit's evaluations


def test_load_attaches_the_watchers(setup, tmp_path):
    surrogate, calibration = setup
    hybrid = HybridCertifier.load(surrogate, calibration, fallback="none", drift_delta=0.05)
    assert isinstance(hybrid.monitor, DriftMonitor) and hybrid.audit is None and hybrid.monitor.delta == 0.05
    model = linear_problem(1, sigma=SIGMA, input_shape=SHAPE).model
    hybrid = HybridCertifier.load(surrogate, calibration, base_model=model, fallback="none", audit_rate=0.1)
    assert hybrid.monitor is None and hybrid.audit.n_audit == calibration.n_cal and hybrid.sequential is None
    from surrogate_cert.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="base model"):
        HybridCertifier.load(surrogate, calibration, fallback="none", audit_rate=0.1)


def test_route_is_the_last_tsv_column_and_old_files_still_read(tmp_path):
    certs = [
        Certificate(1, 0.5, "surrogate", 0, 0.9, 0.01, "surrogate"),
        Certificate(0, 0.2, "eprocess", 300, 0.7, 0.2, "drift_alarm"),
        Certificate(-1, 0.0, "abstain", 0, 0.0, 0.0),
    ]
    path = tmp_path / "r.tsv"
    write_tsv(path, [0, 1, 2], [1, 0, 1], certs)
    frame = pd.read_csv(path, delimiter="\t")
    assert list(frame.columns) == list(TSV_COLUMNS) and TSV_COLUMNS[-1] == "route"
    assert frame["route"].tolist() == ["surrogate", "drift_alarm", "direct"]
    assert [r["route"] for r in read_tsv(path)] == ["surrogate", "drift_alarm", "direct"]
    old = tmp_path / "old.tsv"
    old.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\tn_samples\tp_lower\n0\t1\t1\t0.5\t1\t0.1\tcohen\t100\t0.9\n"
    )
    assert read_tsv(old)[0]["route"] == ""
