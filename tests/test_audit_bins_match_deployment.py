"""Calibration, deployment and the audit put an input in the same confidence bin: one rule, on the tail-accurate z~.

A point with ``p~ = 1 - 1e-9`` has ``z~ = 6.0``. Deployment bins the surrogate's ``z~``; the audit used to bin
``Phi^{-1}(clip(p~, 1e-6))`` = 4.75, so with an edge at 5 it audited the point as a member of another bin than
the one whose offset it was certified with. ``BROKEN`` below is that clipped rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import ndtri

from calibration import Calibration
from surrogate_cert.core import stats
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.one_pass import group_keys, group_offsets
from surrogate_cert.deploy.monitor import CertificateAudit

SIGMA = 0.25


def _broken_bin(p_tilde, edges) -> np.ndarray:
    return np.digitize(ndtri(np.clip(p_tilde, stats.P_CLIP, 1 - stats.P_CLIP)), edges)


def _calibration() -> Calibration:
    # Bin 1 (z~ >= 5) has its own offset; bin 0 is too small and is never certified (nor audited).
    return Calibration(
        surrogate_sha256="0" * 64,
        sigma=SIGMA,
        num_classes=2,
        epsilon=0.05,
        alpha_mc=1e-3,
        guarantee="marginal",
        method="conformal",
        groups="confidence",
        offsets={"0": float("inf"), "1": 0.2},
        pooled_offset=0.2,
        calibration_size=200,
        n_cal=1000,
        radius_cap=stats.max_radius(1000, 1e-3, SIGMA),
        group_sizes={"0": 10, "1": 190},
        fallback_groups=["0"],
        min_group_size=19,
        bin_edges=[5.0],
    )


def test_audit_bins_a_very_confident_point_where_deployment_does_and_the_clipped_rule_does_not():
    calibration = _calibration()
    p_tilde = np.array([1 - 1e-9, 0.9])
    z = stats.probit_confidence(np.log(p_tilde), np.log1p(-p_tilde))  # what Surrogate.predict_z gives for these p~
    classes = np.zeros(2, dtype=int)
    deployed = group_offsets(calibration, classes, p_tilde, z)
    assert deployed[0] == 0.2 and np.isinf(deployed[1])  # certified in bin 1; bin 0 never
    audit = CertificateAudit(calibration, rate=1.0, delta=0.01)
    assert audit.select(classes, p_tilde, z).tolist() == [True, False]  # audited in the bin it was certified in
    keys = group_keys(classes, p_tilde, "confidence", calibration.bin_edges, z=z)
    assert keys.tolist() == ["1", "0"]
    # The same without z (numbers only) through the one rule: the unclipped probit of p~ agrees.
    assert stats.confidence_bin(p_tilde, calibration.bin_edges).tolist() == [1, 0]
    # BROKEN: the clipped probit puts the certified point in bin 0, which the audit skips.
    assert _broken_bin(p_tilde, calibration.bin_edges).tolist() == [0, 0]


def test_audit_of_a_confidence_grouped_calibration_needs_the_surrogates_z():
    calibration = _calibration()
    audit = CertificateAudit(calibration, rate=1.0, delta=0.01)
    with pytest.raises(InvalidParameterError, match="z~"):
        audit.select([0], [1 - 1e-9])
    # Beyond float64's p~ (it rounds to 1) only the surrogate's own z~ ranks the input: it is used as given.
    beyond = dataclasses.replace(calibration, bin_edges=[20.0])
    audit = CertificateAudit(beyond, rate=1.0, delta=0.01)
    assert audit.select([0, 0], [1.0, 1.0], z=[12.0, 25.0]).tolist() == [False, True]
    assert group_keys([0, 0], [1.0, 1.0], "confidence", [20.0], z=[12.0, 25.0]).tolist() == ["0", "1"]
