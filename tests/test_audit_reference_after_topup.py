"""The audit of a topped-up calibration builds its reference radii exactly as the calibration did.

Pure-number simulation (exact binomial draws stand in for the base model): half the pool always returns the
surrogate's class (``p_A = 1``), the rest has ``p_A = Phi(z)``, ``z ~ U(0.5, 4)``, and the surrogate's ``z~`` is
``z - 0.3`` plus noise (cautious, so ``q^`` is small and certified radii reach past 0.616). Calibration
counts: 1,000 samples per point, topped up to 30,000 where all agree (one top-up round), references
``reference_radii`` (cap 0.863 instead of 0.616). Each of 20 runs redraws the calibration set (1,000 points,
epsilon = 0.01), then audits 3,000 exchangeable queries (every one): the audit may alarm in at most
``delta`` of the runs (allowance of Binomial(20, delta) at 0.999, i.e. 1).
``BROKEN``: the audit as it was, a Clopper-Pearson reference on ``n_cal`` samples, alarms in every run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from calibration import Calibration, calibrate_arrays
from calibration.conformal import ReferencePlan, fit_offsets, reference_radii, topup_stages
from surrogate_cert.core import stats
from surrogate_cert.core.errors import CalibrationError, InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.monitor import CertificateAudit

SIGMA, ALPHA_MC, N_CAL, PLANNED, EPSILON, M, QUERIES, RUNS, DELTA = 0.25, 1e-3, 1000, 30_000, 0.01, 1000, 3000, 20, 0.01
STAGES = (N_CAL, PLANNED)
POOL = 20_000
_rng = np.random.default_rng(0)
_SURE = _rng.random(POOL) < 0.5
Z_TRUE = np.where(_SURE, np.inf, _rng.uniform(0.5, 4.0, POOL))
P_TRUE = np.where(_SURE, 1.0, ndtr(Z_TRUE))
P_TILDE = ndtr(np.where(_SURE, 6.0, Z_TRUE - 0.3) + _rng.normal(0.0, 0.1, POOL))  # a cautious surrogate: small q^


def _draw(rng, points):
    """``draw(rows, start, n)`` of ``ReferencePlan.collect``: exact binomial counts (class 0 = the surrogate's)."""

    def draw(rows, start, n):
        k = rng.binomial(np.asarray(n), P_TRUE[points[rows]])
        return np.stack([k, np.asarray(n) - k], axis=1)

    return draw


def _calibration(rng) -> Calibration:
    rows = rng.integers(0, POOL, M)
    plan = ReferencePlan(N_CAL, ALPHA_MC, SIGMA, STAGES, PLANNED)
    first, every, samples = plan.collect(_draw(rng, rows), M)
    refs = reference_radii(
        np.zeros(M, int),
        first,
        N_CAL,
        ALPHA_MC,
        SIGMA,
        counts_topup=every - first,
        samples=samples,
        planned_max=PLANNED,
        stages=STAGES,
    )
    fit = fit_offsets(
        P_TILDE[rows],
        np.zeros(M, int),
        first[:, 0],
        N_CAL,
        sigma=SIGMA,
        num_classes=2,
        epsilon=EPSILON,
        alpha_mc=ALPHA_MC,
        references=refs,
    )
    return Calibration(
        surrogate_sha256="0" * 64,
        sigma=SIGMA,
        num_classes=2,
        epsilon=EPSILON,
        alpha_mc=ALPHA_MC,
        guarantee="marginal",
        method="conformal",
        groups="none",
        offsets=fit.offsets,
        pooled_offset=fit.pooled_offset,
        calibration_size=M,
        n_cal=N_CAL,
        radius_cap=fit.radius_cap,
        group_sizes=fit.group_sizes,
        min_group_size=fit.min_group_size,
        reference=refs.record,
    )


def test_topped_up_calibration_audited_by_its_own_plan_stays_quiet_and_a_plain_reference_alarms():
    rng = np.random.default_rng(1)
    alarms = broken = 0
    for _ in range(RUNS):
        calibration = _calibration(rng)
        assert calibration.radius_cap == pytest.approx(stats.topup_max_radius(N_CAL, PLANNED, ALPHA_MC, SIGMA))
        audit = CertificateAudit(calibration, rate=1.0, delta=DELTA)
        old = CertificateAudit(
            dataclasses.replace(calibration, reference={"bound": "clopper-pearson"}), rate=1.0, delta=DELTA
        )
        old.plan = audit.plan  # the same threshold: only the reference differs
        queries = rng.integers(0, POOL, QUERIES)
        radius_tilde = np.asarray(stats.surrogate_radius(P_TILDE[queries], SIGMA, calibration.radius_cap))
        radius = radius_tilde - calibration.pooled_offset
        certified = np.flatnonzero(radius > 0)
        first, every, samples = audit.reference_plan.collect(_draw(rng, queries[certified]), certified.size)
        reference = audit.reference_plan.reference(np.zeros(certified.size, int), first, every, samples)
        audited = np.ones(QUERIES, dtype=bool)
        audit.record(audited, radius, reference=reference, samples=samples)
        old.record(audited, radius, counts_top=first[:, 0])  # BROKEN: Clopper-Pearson on the first n_cal samples
        alarms += audit.alarm
        broken += old.alarm
        assert audit.evaluations == samples.sum() and samples.max() == PLANNED
    print(f"alarms {alarms} of {RUNS}; with the plain reference {broken}")
    assert alarms <= stats.binomial_allowance(RUNS, DELTA)
    assert broken == RUNS  # 20 of 20 when written


def test_a_topped_up_calibration_without_its_stages_is_refused_in_one_line():
    calibration = _calibration(np.random.default_rng(2))
    legacy = dataclasses.replace(
        calibration, reference={k: v for k, v in calibration.reference.items() if k not in ("stages", "rule")}
    )
    with pytest.raises(CalibrationError, match="does not record the top-up's stages") as info:
        CertificateAudit(legacy, rate=0.1)
    assert "\n" not in str(info.value)
    audit = CertificateAudit(calibration, rate=1.0)
    with pytest.raises(InvalidParameterError, match="topped up"):
        audit.record([True], [0.5], counts_top=[1000])
    assert topup_stages(1000, [dict(extra=4000, rule="all-agree"), dict(extra=40_000, rule="all-agree")], 30_000) == (
        1000,
        5000,
        30_000,
    )


def test_audit_through_the_base_model_draws_by_the_calibrations_top_up_plan():
    torch.set_num_threads(1)
    problem = linear_problem(200, sigma=SIGMA, max_margin_sigmas=6.0, input_shape=(1, 2, 2), seed=7)
    smooth = SmoothedClassifier(problem.model, 2, SIGMA, device="cpu", batch_size=8192)
    model = type(problem.model)(problem.model.w * 1.2, float(problem.model.b) * 1.2)
    surrogate = Surrogate(model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=SIGMA, device="cpu")
    n_cal, planned = 200, 1000
    counts = smooth.counts(problem.x, n_cal)
    agree = counts.max(axis=1) == n_cal
    topup = np.zeros_like(counts)
    topup[agree] = smooth.counts(problem.x[agree], planned - n_cal, start=n_cal)
    samples = np.where(agree, planned, n_cal)
    calibration = calibrate_arrays(
        surrogate,
        problem.x,
        counts,
        0.05,
        ALPHA_MC,
        counts_topup=topup,
        samples=samples,
        planned_max=planned,
        topup_stages=(n_cal, planned),
    )
    assert calibration.reference["stages"] == [n_cal, planned]
    test = linear_problem(100, sigma=SIGMA, max_margin_sigmas=6.0, input_shape=(1, 2, 2), seed=8)
    classes, p_tilde, z, radius = SurrogateCertifier(surrogate, calibration).evaluate(test.x)
    audit = CertificateAudit(calibration, smooth, rate=1.0, delta=0.01)
    audit.audit(test.x, classes, p_tilde, radius, indices=np.arange(100), z=z)
    sampled = radius > 0
    assert audit.sampled == sampled.sum() and audit.last_spent[~sampled].sum() == 0
    assert set(audit.last_spent[sampled].tolist()) <= {n_cal, planned} and planned in audit.last_spent
    assert audit.evaluations == audit.last_spent.sum()
    # A file whose rows do not follow the plan (a row that agrees but was not topped up) is refused.
    with pytest.raises(CalibrationError, match="do not follow the recorded top-up plan"):
        calibrate_arrays(
            surrogate,
            problem.x,
            counts,
            0.05,
            ALPHA_MC,
            counts_topup=np.zeros_like(counts),
            samples=np.full(len(counts), n_cal),
            planned_max=planned,
            topup_stages=(n_cal, planned),
        )
