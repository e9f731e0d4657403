"""The deployment path: the hybrid certifier (surrogate first, sequential fallback).

``HybridCertifier`` puts together what deployment needs: the surrogate, its calibration artifact
and the base model. The one-pass ``SurrogateCertifier`` (``core.one_pass``) certifies what it can;
inputs the surrogate cannot certify (or not to the radius a caller requires)
go to ``EProcessCertifier`` with the surrogate's class and the prior
``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` (``stats.surrogate_prior``), both fixed before
any sequential sample is drawn; a sequential certificate is wrong with probability at most
``alpha`` for that input. Every certificate names the path that made it (``method``) and why it
went there (``route``).

Watchers (``deploy.monitor``): with a ``DriftMonitor`` and/or a ``CertificateAudit`` attached, once
either raises its alarm the one-pass certificate is no longer trusted (its guarantee needs queries
exchangeable with the calibration images): from the query that raised it on, every query goes to
the sequential certifier, valid without exchangeability (route ``drift_alarm`` / ``audit_alarm``;
an abstention when there is no fallback), until ``recalibrate`` resets them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from calibration.artifact import Calibration, load_calibration
from data_gen.models import check_model_fits, load_model

from ..core import stats
from ..core.certificate import Certificate, abstention
from ..core.errors import InvalidParameterError, ModelError, check_count, check_probability
from ..core.one_pass import SurrogateCertifier, required_radii
from ..core.sequential import DEFAULT_SCHEDULE, EProcessCertifier, GeometricSchedule
from ..core.signing import resolve_key
from ..core.smoothing import (
    NOISE_SCHEME,
    SmoothedClassifier,
    check_images,
    check_noise_scheme,
    check_same_noise,
    noise_indices,
)
from ..core.surrogate import Surrogate
from .monitor import DEFAULT_DELTA, CertificateAudit, DriftMonitor

__all__ = [
    "SurrogateCertifier",
    "HybridCertifier",
    "FALLBACKS",
    "FALLBACK_SCHEDULE",
    "fallback_certifier",
    "DriftMonitor",
    "CertificateAudit",
    "COMBINES",
    "refine_horizons",
]

FALLBACKS = ("eprocess", "none")

COMBINES = ("max", "sequential")
"""How a refined best radius is reported (``HybridCertifier(refine=True)``). ``max`` (default): the larger of
the one-pass ``R^`` and the sequential radius; it is wrong when either is, so the marginal bound
``epsilon + alpha_mc + alpha`` holds for it (a union bound: the hybrid's bound for every certificate), and no
per-input one. ``sequential``: once sampling starts the certificate is the sequential certifier's alone,
wrong with probability at most ``alpha`` for that input whatever the one-pass radius was; it loses the
one-pass radius where sampling stopped below it (the surrogate's ``p~`` promised more than the samples
showed)."""


def refine_horizons(max_samples: int) -> np.ndarray:
    """Look-ahead sizes weighed before refining a one-pass radius: 16, 32, 64, ... below ``max_samples``, then it."""
    sizes = [16]
    while sizes[-1] * 2 < max_samples:
        sizes.append(sizes[-1] * 2)
    return np.array(sizes + [int(max_samples)], dtype=np.int64)


FALLBACK_SCHEDULE = DEFAULT_SCHEDULE
"""The fallback's rounds: the sequential certifier's default ``GeometricSchedule`` (16 samples, then
+15% of what was drawn per round). The stopping rule is evaluated at every sample, so an input stops
where its evidence suffices and draws only the rest of its round beyond that; version 0.1's fixed
rounds ``(32, 64, 128, 256)`` still work as ``schedule=``."""


def fallback_certifier(
    smooth: SmoothedClassifier,
    alpha: float = 1e-3,
    *,
    max_samples: int = 10_000,
    tolerance: float = 0.01,
    schedule: GeometricSchedule | Sequence[int] = FALLBACK_SCHEDULE,
    price: float | None = None,
    radius_of_interest: float | None = None,
) -> EProcessCertifier:
    """The deployed hybrid's sequential fallback: what ``HybridCertifier.load`` builds (and the bench runs).

    Parameters
    ----------
    smooth : SmoothedClassifier
        The base model at the surrogate's sigma.
    alpha : float, optional
        Error probability of a sequential certificate, per input.
    max_samples : int, optional
        Sequential budget per fallback input.
    tolerance : float, optional
        Best-radius tolerance, input l2 units.
    schedule : GeometricSchedule or sequence of int, optional
        Rounds; default ``FALLBACK_SCHEDULE``.
    price : float, optional
        Priced best-radius rule (radius per 1,000 samples); None for the tolerance rule alone.
    radius_of_interest : float, optional
        The largest radius worth sampling for (``EProcessCertifier``), input l2 units.

    Returns
    -------
    EProcessCertifier
        Its prior is replaced per input by the surrogate prior when the hybrid calls it.

    Raises
    ------
    InvalidParameterError
        If a parameter is out of range.
    """
    return EProcessCertifier(
        smooth,
        alpha,
        max_samples=max_samples,
        tolerance=tolerance,
        schedule=schedule,
        price=price,
        radius_of_interest=radius_of_interest,
    )


def _required_radii(required_radius, num: int) -> np.ndarray:
    """Per-input required radius (NaN = none required), validated (``core.one_pass.required_radii``)."""
    return required_radii(required_radius, num)


class HybridCertifier:
    """Surrogate first; the sequential certifier where the surrogate does not certify enough.

    For each input: if the calibrated surrogate radius ``R^`` is positive, the surrogate certificate
    is returned (0 base-model evaluations). Otherwise, with ``fallback="eprocess"``,
    ``EProcessCertifier`` tests the surrogate's class with the surrogate prior (best-radius policy);
    the larger of its radius and ``R^`` is returned, or an abstention when neither is positive.

    Asked for a required radius ``r* > 0``: with a calibration that holds required-radius thresholds,
    the surrogate certifies ``(A, r*)`` iff ``z~ > tau(r+)`` (``core.one_pass.certified_at_required``),
    and every other input goes to the fallback in target-radius mode at ``r*``, whose certificate is
    returned as it is (the best-radius ``R^`` is not used in this mode, so the one-pass part keeps one
    rule and its bound). A calibration without thresholds keeps the older rule: the surrogate's
    ``(A, R^)`` where ``R^ >= r*``, else the fallback, keeping the larger radius.

    A surrogate certificate is wrong with probability at most ``epsilon + alpha_mc`` in the sense of the
    calibration's guarantee (``Calibration.statement``: marginal over inputs, certified or not; PAC; or
    among issued certificates), for each ``r*`` fixed before the inputs are seen in required-radius mode;
    a sequential one with probability at most ``alpha``, for each input.

    Refining best radii (``refine=True``, needs a fallback with a ``price``): an input the surrogate
    certifies in best-radius mode is also sampled where, before any sample is drawn, the radius the
    sequential certifier is expected to reach beyond ``R^`` (``stats.refine_gain``: the certainty equivalent
    of the surrogate's ``p~`` under its own prior) is worth its price at some horizon
    (``stats.priced_continue``); the run then counts only gains above ``R^`` (``baseline_radius``). The
    decision reads the surrogate's output only and the prior is fixed before sampling, so the sequential
    certificate keeps its per-input ``alpha``. ``combine`` (``COMBINES``) says what is reported: the larger
    of the two radii (default; the marginal bound ``epsilon + alpha_mc + alpha``), or the sequential
    certificate alone (per-input ``alpha``). Route ``refined``.

    Parameters
    ----------
    surrogate_certifier : SurrogateCertifier
        The calibrated surrogate (``core.one_pass``).
    sequential : EProcessCertifier, optional
        The fallback, over the base model at the surrogate's sigma. ``None`` (``fallback="none"``):
        an input the surrogate does not certify enough gets the surrogate's certificate if
        ``R^ > 0`` (below its required radius), else an abstention.
    monitor : DriftMonitor, optional
        Fed the surrogate's class and ``p~`` of every query, in order (``deploy.monitor``).
    audit : CertificateAudit, optional
        Re-checks a random share of the queries the one-pass path handles.
    refine : bool, optional
        Refine one-pass best radii by sampling where it is worth the fallback's ``price``.
    combine : {"max", "sequential"}, optional
        What a refined input reports (``COMBINES``).
    """

    def __init__(
        self,
        surrogate_certifier: SurrogateCertifier,
        sequential=None,
        monitor: DriftMonitor | None = None,
        audit: CertificateAudit | None = None,
        *,
        refine: bool = False,
        combine: str = "max",
    ):
        if combine not in COMBINES:
            raise InvalidParameterError(f"combine must be one of {COMBINES}, got {combine!r}")
        if refine and (sequential is None or getattr(sequential, "price", None) is None):
            raise InvalidParameterError(
                "refining best radii needs the sequential fallback with a price (--price P: the "
                "radius, input l2 units, worth 1,000 samples)"
            )
        self.surrogate_certifier = surrogate_certifier
        self.sequential = sequential
        if sequential is not None:  # the offsets hold for the law of the calibration counts: never the other family
            check_same_noise(
                getattr(sequential.smooth, "noise_scheme", None),
                getattr(surrogate_certifier.calibration, "noise_scheme", None),
                "the fallback",
                "draw it with the calibration's noise scheme",
            )
        self.monitor = monitor
        self.audit = audit
        self.refine = bool(refine)
        self.combine = combine
        self.alarm_reason: str | None = None

    @property
    def surrogate(self):
        return self.surrogate_certifier.surrogate

    @property
    def calibration(self):
        return self.surrogate_certifier.calibration

    # long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
    @classmethod
    def load(
        cls,
        surrogate,
        calibration,
        base_model=None,
        *,
        alpha: float = 1e-3,
        max_samples: int = 10_000,
        fallback: str = "eprocess",
        tolerance: float = 0.01,
        schedule: GeometricSchedule | Sequence[int] = FALLBACK_SCHEDULE,
        price: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int | str = 1000,
        seed: int = 0,
        key: bytes | str | None = None,
        key_file: str | os.PathLike | None = None,
        threads: int | str | None = "auto",
        drift_delta: float | None = None,
        audit_rate: float | None = None,
        n_audit: int | None = None,
        audit_delta: float = DEFAULT_DELTA,
        noise_scheme: str | None = None,
        off_grid: str = "refuse",
        refine: bool = False,
        combine: str = "max",
        radius_of_interest: float | None = None,
    ) -> HybridCertifier:
        """Build from a surrogate checkpoint and calibration.json (paths or loaded objects).

        ``base_model`` (a module, or a model spec for ``data_gen.models.load_model``) is needed for
        ``fallback="eprocess"``; when its SHA-256 is known it must be the model the surrogate's
        training counts were made with. Sigma comes from the surrogate. ``alpha``, ``max_samples``,
        ``tolerance``, ``schedule`` and ``price`` configure the ``EProcessCertifier`` of the fallback
        (``fallback_certifier``); the fallback always tests the surrogate's class with the surrogate
        prior, so it draws no pilot samples.

        Parameters
        ----------
        surrogate : Surrogate or path
            The surrogate, or its checkpoint file.
        calibration : Calibration or path
            Its calibration, or its calibration.json; refused if made for another surrogate, changed,
            inconsistent, or (with a signing key configured) unsigned or signed with another key. A
            ``Calibration`` object is used as given (its signature was checked when it was read).
        base_model : torch.nn.Module or str, optional
            The base model (a spec is loaded and, when both hashes are known, checked against the
            surrogate's ``base_model_sha256``; a module is used as given). Required for
            ``fallback="eprocess"``.
        alpha : float, optional
            Error probability of a sequential certificate, per input, in (0, 1).
        max_samples : int, optional
            Sequential budget per fallback input (>= 1).
        fallback : {"eprocess", "none"}, optional
            What certifies the inputs the surrogate does not.
        tolerance : float, optional
            Best-radius stopping tolerance of the fallback, input l2 units (>= 0).
        schedule : GeometricSchedule or sequence of int, optional
            Samples per fallback input per round; default ``FALLBACK_SCHEDULE``.
        price : float, optional
            Priced best-radius rule of the fallback: radius (input l2 units) worth 1,000 samples
            (``EProcessCertifier``); None: the tolerance rule alone.
        device : str, torch.device or None, optional
            Where the surrogate and the base model run (``resolve_device``).
        batch_size : int or "auto", optional
            Noisy samples per base-model forward pass; ``"auto"``: the largest that fits on the device.
        seed : int, optional
            Seed of the fallback's noise streams.
        key : bytes or str, optional
            Signing key the calibration file and the surrogate checkpoint (given as paths) must be signed
            with; default ``key_file``, else the environment (``SURROGATE_CERT_KEY_FILE`` /
            ``SURROGATE_CERT_KEY``), else none.
        key_file : str or os.PathLike, optional
            File holding the signing key.
        threads : int, "auto" or None, optional
            Intra-op threads of the surrogate's forward pass (``SurrogateCertifier``); default
            ``"auto"``: one thread for small batches.
            Seed of the fallback's noise streams (and of the watchers' randomness).
        drift_delta : float, optional
            Attach a ``DriftMonitor`` with this false-alarm probability (None: no monitor).
        audit_rate : float, optional
            Attach a ``CertificateAudit`` of this share of the queries (None: no audit); needs
            ``base_model``.
        n_audit : int, optional
            Samples per audited certificate; must be the calibration's ``n_cal`` (the default).
        audit_delta : float, optional
            The audit's false-alarm probability.
        noise_scheme : str, optional
            The fallback's and the audit's noise scheme; default the calibration's (``noise_scheme``; float
            v2 for files older than the field). A scheme of the other family (float vs sound) is refused:
            the calibrated offsets hold for the law the calibration counts were drawn from.
        off_grid : {"refuse", "quantise"}, optional
            The sound scheme only: what the fallback does with inputs off the 1/255 grid
            (``SmoothedClassifier``).
        refine : bool, optional
            Refine one-pass best radii where sampling is worth ``price`` (see the class docstring).
        combine : {"max", "sequential"}, optional
            What a refined input reports (``COMBINES``).
        radius_of_interest : float, optional
            The largest radius worth sampling for, input l2 units (the fallback's best-radius rules and the
            refining decision count no gain above it).

        Returns
        -------
        HybridCertifier

        Raises
        ------
        InvalidParameterError
            If ``fallback``, ``alpha``, ``max_samples``, ``tolerance``, ``schedule``, ``price`` or ``combine`` is
            invalid, ``fallback="eprocess"`` comes without ``base_model``, or ``refine`` without a price.
        ModelError
            If the surrogate or the base model cannot be loaded, the base model is not the one the
            surrogate's training counts were made with, or it fails on the surrogate's input shape or
            returns another number of classes.
        CalibrationError
            If the calibration file cannot be read, was modified, contradicts itself, belongs to another
            surrogate, or is not signed with the configured key (``SignatureError``).
        InvalidInputError
            If CUDA is requested but unavailable.
        """
        if fallback not in FALLBACKS:
            raise InvalidParameterError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        alpha = check_probability("alpha", alpha)
        max_samples = check_count("max_samples", max_samples)
        secret = resolve_key(key, key_file)
        if not isinstance(surrogate, Surrogate):
            surrogate = Surrogate.load(surrogate, device=device, key=secret)
        if not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration, key=secret)
        # SurrogateCertifier checks that the calibration belongs to this surrogate (one hash).
        sequential = smooth = None
        if fallback == "eprocess" or audit_rate is not None:
            if base_model is None:
                raise InvalidParameterError(
                    "fallback='eprocess' and the audit need the base model (--model); "
                    "or use --fallback none without an audit"
                )
            smooth = cls._base_engine(
                base_model, surrogate, calibration, secret, noise_scheme, device, batch_size, seed, off_grid
            )
        if fallback == "eprocess":
            sequential = fallback_certifier(
                cast(SmoothedClassifier, smooth),  # built above: this fallback needs the base model
                alpha,
                max_samples=max_samples,
                tolerance=tolerance,
                schedule=schedule,
                price=price,
                radius_of_interest=radius_of_interest,
            )
        certifier = SurrogateCertifier(surrogate, calibration, threads=threads)
        monitor = (
            None if drift_delta is None else DriftMonitor.from_calibration(calibration, delta=drift_delta, seed=seed)
        )
        audit = (
            None
            if audit_rate is None
            else CertificateAudit(calibration, smooth, rate=audit_rate, n_audit=n_audit, delta=audit_delta, seed=seed)
        )
        return cls(certifier, sequential, monitor, audit, refine=refine, combine=combine)

    def recalibrate(self, calibration) -> None:
        """The explicit reset after an alarm: certify with ``calibration`` from now on; the watchers restart on it.

        The new monitor's reference is the new calibration's sample and the audit's threshold its
        law; each restarted watcher is a new test with its own false-alarm probability.

        Parameters
        ----------
        calibration : Calibration or path
            The new calibration of this surrogate.

        Raises
        ------
        CalibrationError
            If it cannot be read, was modified, belongs to another surrogate, or has no monitor
            reference while a drift monitor is attached.
        """
        if not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration)
        certifier = SurrogateCertifier(self.surrogate, calibration, threads=self.surrogate_certifier.threads)
        monitor = None if self.monitor is None else DriftMonitor.from_calibration(calibration, **self.monitor.options)
        audit = None if self.audit is None else CertificateAudit(calibration, self.audit.smooth, **self.audit.options)
        self.surrogate_certifier, self.monitor, self.audit, self.alarm_reason = certifier, monitor, audit, None

    def replace_surrogate(self, surrogate: Surrogate, calibration) -> None:
        """Certify with a new surrogate and its own calibration from now on; the watchers restart on it.

        For learning from the fallback (``workflows.learning``): a surrogate retrained on queries the
        fallback sampled, recalibrated on the untouched calibration split. Given the queries it was trained
        on, the calibration images and the queries still to come are exchangeable, so its calibration holds
        for them; the new drift monitor's reference is the new calibration's sample seen through the new
        surrogate (each restart is a new test with its own false-alarm probability).

        Parameters
        ----------
        surrogate : Surrogate
            The new surrogate (same sigma, classes and input shape).
        calibration : Calibration or path
            Its calibration; refused (``CalibrationError``) if made for another surrogate.

        Raises
        ------
        CalibrationError
            If the calibration belongs to another surrogate or cannot be read.
        InvalidParameterError
            If the new surrogate differs in sigma, class count or input shape.
        """
        old = self.surrogate
        if (
            not np.isclose(surrogate.sigma, old.sigma)
            or surrogate.num_classes != old.num_classes
            or tuple(surrogate.input_shape) != tuple(old.input_shape)
        ):
            raise InvalidParameterError("the new surrogate must have the old one's sigma, classes and input shape")
        if not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration)
        threads = self.surrogate_certifier.threads
        self.surrogate_certifier = SurrogateCertifier(surrogate, calibration, threads=threads)
        self.recalibrate(calibration)

    def worth_refining(self, p_tilde, radius) -> np.ndarray:
        """Which one-pass best radii sampling is expected to raise at the fallback's price (before any sample).

        For each input, the gain ``stats.refine_gain`` over ``refine_horizons`` (the surrogate's ``p~`` and
        prior, the fallback's ``alpha``) against the cost ``price * h / 1000`` (``stats.priced_continue``).

        Parameters
        ----------
        p_tilde : array_like
            The surrogate's probability of its class, per input.
        radius : array_like
            The one-pass radius ``R^`` per input, input l2 units.

        Returns
        -------
        numpy.ndarray
            Boolean, one per input.
        """
        p_tilde = np.asarray(p_tilde, dtype=float).reshape(-1)
        if p_tilde.size == 0 or self.sequential is None or self.sequential.price is None:
            return np.zeros(p_tilde.size, dtype=bool)
        seq = self.sequential
        horizons = refine_horizons(seq.max_samples)
        prior = stats.surrogate_prior(p_tilde, self.surrogate.kappa, self.surrogate.w)
        gains = stats.refine_gain(p_tilde, horizons, radius, seq.alpha, self.surrogate.sigma, *prior)
        roi = getattr(seq, "radius_of_interest", None)
        if roi is not None:  # no radius above the radius of interest is worth anything
            now = np.maximum(np.asarray(radius, dtype=float), 0.0)[:, None]
            gains = np.maximum(np.minimum(now + gains, roi) - now, 0.0)
        return np.asarray(stats.priced_continue(gains, horizons[None, :], seq.price), dtype=bool).reshape(-1)

    def _watch(self, x, classes, p_tilde, radius, idx, z=None) -> tuple[int, np.ndarray]:
        """Feed the watchers; returns the first query of the batch not to trust (``len`` if none) and
        the base-model evaluations the audit spent on each query."""
        num = len(radius)
        spent = np.zeros(num, dtype=np.int64)
        if self.alarm_reason is None and self.monitor is not None and self.monitor.alarm:
            self.alarm_reason = "drift_alarm"
        if self.alarm_reason is None and self.audit is not None and self.audit.alarm:
            self.alarm_reason = "audit_alarm"
        cut = 0 if self.alarm_reason is not None else num
        if self.monitor is not None:  # fed after an alarm too: its path stays a record of the whole stream
            before = self.monitor.queries
            self.monitor.update(classes, p_tilde)
            if self.alarm_reason is None and self.monitor.alarm_at is not None:  # .alarm, spelled out for mypy
                cut, self.alarm_reason = max(0, self.monitor.alarm_at - before), "drift_alarm"
        if self.audit is not None and cut > 0:  # the audit checks one-pass certificates: none after an alarm
            before = self.audit.queries
            self.audit.audit(
                x[:cut], classes[:cut], p_tilde[:cut], radius[:cut], idx[:cut], z=None if z is None else z[:cut]
            )
            spent[:cut] = self.audit.last_spent
            if self.audit.alarm_at is not None and self.audit.alarm_at - before < cut:  # .alarm, spelled out
                cut, self.alarm_reason = max(0, self.audit.alarm_at - before), "audit_alarm"
        return cut, spent

    @classmethod
    def _base_engine(
        cls, base_model, surrogate, calibration, secret, noise_scheme, device, batch_size, seed, off_grid
    ) -> SmoothedClassifier:
        """The base model under noise for the fallback and the audit: the surrogate's sigma, classes and
        input shape, the calibration's noise scheme, checked on one clean pass."""
        model = cls._base_model(base_model, surrogate, device, secret)
        scheme = check_noise_scheme(noise_scheme or calibration.noise_scheme or NOISE_SCHEME)
        check_same_noise(
            scheme,
            calibration.noise_scheme,
            "the fallback",
            "drop --noise-scheme (the calibration's is used) or calibrate on counts of this scheme",
        )
        smooth = SmoothedClassifier(
            model,
            surrogate.num_classes,
            surrogate.sigma,
            device=device,
            batch_size=batch_size,
            seed=seed,
            input_shape=surrogate.input_shape,
            noise_scheme=scheme,
            off_grid=off_grid,
        )
        # One clean pass now: a model of another input shape or width fails here, not mid-certification.
        name = type(base_model).__name__ if isinstance(base_model, torch.nn.Module) else os.fspath(base_model)
        check_model_fits(smooth, torch.zeros(1, *surrogate.input_shape), name)
        return smooth

    @staticmethod
    def _base_model(base_model, surrogate, device, key: bytes | None = None) -> torch.nn.Module:
        if isinstance(base_model, torch.nn.Module):
            return base_model
        loaded = load_model(
            os.fspath(base_model),
            device=device,
            num_classes=surrogate.num_classes,
            input_shape=surrogate.input_shape,
            key=key,
        )
        expected = surrogate.meta.get("base_model_sha256")
        if expected and loaded.sha256 and loaded.sha256 != expected:
            raise ModelError(
                f"{base_model} is not the base model the surrogate was trained for (SHA-256 "
                f"{loaded.sha256[:12]}... vs {expected[:12]}...); pass the model the counts were made with"
            )
        return loaded.model

    # long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
    def certify(
        self,
        x: torch.Tensor,
        required_radius=None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> list[Certificate]:
        """One ``Certificate`` per input of ``x`` (``N x C x H x W``, float, finite, in [0, 1]).

        ``required_radius`` (one radius for the whole batch, input l2 units, fixed before the inputs are
        seen; NaN or None = none) routes an input whose surrogate radius is below it to the sequential
        certifier in target-radius mode. One radius per input is refused
        (``core.one_pass.check_required_radius``): the one-pass thresholds do not hold for a radius
        chosen from the input's own surrogate output.
        ``indices`` name each input's noise for the sequential certifier (default ``0..N-1``).

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        required_radius : float, optional
            ``r*``: the radius every input of the batch should be certified to, input l2 units; NaN or
            None for none.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (dataset indices) for the sequential fallback.

        Returns
        -------
        list of Certificate
            One per input, with the guarantee stated in the class docstring: method ``surrogate``
            (``n_samples = 0``, or the fallback's samples when the surrogate's radius is kept over a
            smaller sequential one), ``eprocess``, or an abstention. Radii in input l2 units; the
            surrogate pass's wall time is shared equally and added to each fallback input's time.
            ``route`` says why (``core.certificate.ROUTES``); an audited input's ``n_samples``
            includes the audit's evaluations.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of the surrogate's input shape, or ``indices`` does not
            hold one entry per input.
        InvalidParameterError
            If ``required_radius`` is negative, infinite, or not one number for the batch.
        ModelError
            If the base model's output width is not the surrogate's class count.
        """
        started = time.perf_counter()
        x = check_images(x, self.surrogate.input_shape)
        num = x.shape[0]
        required = _required_radii(required_radius, num)
        idx = noise_indices(indices, num)
        classes, p_tilde, z, radius = self.surrogate_certifier.evaluate(x, validate=False)
        # With required-radius thresholds an asked input's one-pass radius is r* or 0 (never R^), so
        # an input the thresholds do not certify carries nothing from the surrogate into the merge below.
        radius = self.surrogate_certifier.radius_for(z, radius, required)
        p_lower = self.surrogate_certifier.p_lower(radius)
        cut, audit_spent = self._watch(x, classes, p_tilde, radius, idx, z)
        trusted = np.arange(num) < cut  # queries before a watcher's alarm
        per_input = (time.perf_counter() - started) / max(num, 1)
        surrogate_cert = self.surrogate_certifier.certificate

        def make(i: int, seconds: float, n_samples: int = 0) -> Certificate:
            return surrogate_cert(
                int(classes[i]), float(radius[i]), seconds, n_samples + int(audit_spent[i]), p_lower=float(p_lower[i])
            )

        with np.errstate(invalid="ignore"):
            enough = trusted & (radius > 0) & (np.isnan(required) | (radius >= required))
        refine = np.zeros(num, dtype=bool)
        if self.refine and self.sequential is not None:
            asked = np.flatnonzero(enough & np.isnan(required))
            refine[asked] = self.worth_refining(p_tilde[asked], radius[asked])
            enough &= ~refine
        if self.sequential is None:
            route = np.where(trusted, "surrogate", self.alarm_reason or "")
        else:
            route = np.where(
                enough, "surrogate", np.where(refine, "refined", np.where(radius > 0, "required_radius", "fallback"))
            )
            route = np.where(trusted, route, self.alarm_reason or "")
        out: list[Certificate | None] = [make(i, per_input) if ok else None for i, ok in enumerate(enough)]
        rest = np.flatnonzero(~enough)
        if rest.size and self.sequential is not None:
            prior = stats.surrogate_prior(p_tilde[rest], self.surrogate.kappa, self.surrogate.w)
            fallback = self.sequential.certify(
                x[rest],
                classes=classes[rest],
                prior=prior,
                target_radius=required[rest],
                indices=idx[rest],
                baseline_radius=np.where(refine[rest], radius[rest], np.nan) if refine.any() else None,
            )
            for i, cert in zip(rest, fallback):
                # Both certificates are valid; keep the larger radius (the sequential one unless the
                # surrogate's, below the required radius, is still larger; in threshold mode it is 0).
                # After an alarm the surrogate's radius is not trusted: the sequential certificate stands alone.
                # A refined input reports the sequential certificate alone unless combine="max".
                sequential_wins = cert.radius > 0 and cert.radius >= radius[i]
                if refine[i] and self.combine == "sequential":
                    sequential_wins = True
                if not trusted[i] or sequential_wins:
                    out[i] = dataclasses.replace(
                        cert, n_samples=cert.n_samples + int(audit_spent[i]), seconds=cert.seconds + per_input
                    )
                else:
                    out[i] = dataclasses.replace(
                        make(int(i), cert.seconds + per_input, cert.n_samples), stop_time=cert.stop_time
                    )
        for i in rest:
            if out[i] is None:
                out[i] = make(int(i), per_input) if trusted[i] else abstention(int(audit_spent[i]), 0.0, per_input)
        # Every slot holds a certificate now: the surrogate's, the fallback's or an abstention.
        return [dataclasses.replace(cast(Certificate, c), route=str(r)) for c, r in zip(out, route)]
