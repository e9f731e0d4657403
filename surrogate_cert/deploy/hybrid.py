"""The deployment path: the hybrid certifier (surrogate first, sequential fallback).

``HybridCertifier`` puts together what deployment needs: the surrogate, its calibration artifact
and the base model. The one-pass ``SurrogateCertifier`` (``core.one_pass``) certifies what it can;
inputs the surrogate cannot certify (or not to the radius a caller requires)
go to ``EProcessCertifier`` with the surrogate's class and the prior
``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` (``stats.surrogate_prior``), both fixed before
any sequential sample is drawn; a sequential certificate is wrong with probability at most
``alpha`` for that input. Every certificate names the path that made it (``method``).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import torch

from calibration.artifact import Calibration, load_calibration
from data_gen.models import check_model_fits, load_model

from ..core import stats
from ..core.certificate import Certificate
from ..core.errors import InvalidParameterError, ModelError, check_count, check_probability
from ..core.one_pass import SurrogateCertifier, required_radii
from ..core.sequential import EProcessCertifier
from ..core.smoothing import SmoothedClassifier, check_images, noise_indices
from ..core.surrogate import Surrogate

__all__ = ["SurrogateCertifier", "HybridCertifier", "FALLBACKS"]

FALLBACKS = ("eprocess", "none")

FALLBACK_SCHEDULE = (32, 64, 128, 256)
"""Samples per fallback input per round (the last repeats): growth stops at 256 so an input stops
at most 256 samples after its evidence suffices. The fallback inputs are few, so the small rounds
cost little, and the savings of the surrogate prior are not lost to a doubling schedule's overshoot."""


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

    A certificate is wrong with probability at most ``epsilon + alpha_mc`` (surrogate, marginally;
    for each fixed ``r*`` in required-radius mode) plus ``alpha`` (sequential, per input).

    Parameters
    ----------
    surrogate_certifier : SurrogateCertifier
        The calibrated surrogate (``core.one_pass``).
    sequential : EProcessCertifier, optional
        The fallback, over the base model at the surrogate's sigma. ``None`` (``fallback="none"``):
        an input the surrogate does not certify enough gets the surrogate's certificate if
        ``R^ > 0`` (below its required radius), else an abstention.
    """

    def __init__(self, surrogate_certifier: SurrogateCertifier, sequential=None):
        self.surrogate_certifier = surrogate_certifier
        self.sequential = sequential

    @property
    def surrogate(self):
        return self.surrogate_certifier.surrogate

    @property
    def calibration(self):
        return self.surrogate_certifier.calibration

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
        schedule: Sequence[int] = FALLBACK_SCHEDULE,
        device: str | torch.device | None = None,
        batch_size: int = 1000,
        seed: int = 0,
        key: bytes | str | None = None,
        key_file: str | os.PathLike | None = None,
        threads: int | str | None = "auto",
    ) -> "HybridCertifier":
        """Build from a surrogate checkpoint and calibration.json (paths or loaded objects).

        ``base_model`` (a module, or a model spec for ``data_gen.models.load_model``) is needed for
        ``fallback="eprocess"``; when its SHA-256 is known it must be the model the surrogate's
        training counts were made with. Sigma comes from the surrogate. ``alpha``, ``max_samples``,
        ``tolerance`` and ``schedule`` configure the ``EProcessCertifier`` of the fallback.

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
        schedule : sequence of int, optional
            Samples per fallback input per round (the last repeats); default ``FALLBACK_SCHEDULE``.
        device : str, torch.device or None, optional
            Where the surrogate and the base model run (``resolve_device``).
        batch_size : int, optional
            Noisy samples per base-model forward pass.
        seed : int, optional
            Seed of the fallback's noise streams.
        key : bytes or str, optional
            Signing key the calibration file must be signed with; default ``key_file``, else the
            environment (``SURROGATE_CERT_KEY_FILE`` / ``SURROGATE_CERT_KEY``), else none.
        key_file : str or os.PathLike, optional
            File holding the signing key.
        threads : int, "auto" or None, optional
            Intra-op threads of the surrogate's forward pass (``SurrogateCertifier``); default
            ``"auto"``: one thread for small batches.

        Returns
        -------
        HybridCertifier

        Raises
        ------
        InvalidParameterError
            If ``fallback``, ``alpha``, ``max_samples``, ``tolerance`` or ``schedule`` is invalid, or
            ``fallback="eprocess"`` comes without ``base_model``.
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
        if not isinstance(surrogate, Surrogate):
            surrogate = Surrogate.load(surrogate, device=device)
        if not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration, key=key, key_file=key_file)
        # SurrogateCertifier checks that the calibration belongs to this surrogate (one hash).
        sequential = None
        if fallback == "eprocess":
            if base_model is None:
                raise InvalidParameterError("fallback='eprocess' needs the base model (--model); or use --fallback none")
            model = cls._base_model(base_model, surrogate, device)
            smooth = SmoothedClassifier(model, surrogate.num_classes, surrogate.sigma, device=device,
                                        batch_size=batch_size, seed=seed)
            # One clean pass now: a model of another input shape or width fails here, not mid-certification.
            name = type(base_model).__name__ if isinstance(base_model, torch.nn.Module) else os.fspath(base_model)
            check_model_fits(smooth, torch.zeros(1, *surrogate.input_shape), name)
            sequential = EProcessCertifier(smooth, alpha, max_samples=max_samples, tolerance=tolerance,
                                           schedule=schedule)
        return cls(SurrogateCertifier(surrogate, calibration, threads=threads), sequential)

    @staticmethod
    def _base_model(base_model, surrogate, device) -> torch.nn.Module:
        if isinstance(base_model, torch.nn.Module):
            return base_model
        loaded = load_model(os.fspath(base_model), device=device, num_classes=surrogate.num_classes,
                            input_shape=surrogate.input_shape)
        expected = surrogate.meta.get("base_model_sha256")
        if expected and loaded.sha256 and loaded.sha256 != expected:
            raise ModelError(
                f"{base_model} is not the base model the surrogate was trained for (SHA-256 "
                f"{loaded.sha256[:12]}... vs {expected[:12]}...); pass the model the counts were made with"
            )
        return loaded.model

    def certify(
        self,
        x: torch.Tensor,
        required_radius=None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> list[Certificate]:
        """One ``Certificate`` per input of ``x`` (``N x C x H x W``, float, finite, in [0, 1]).

        ``required_radius`` (scalar or one per input, input l2 units; NaN or None = none) routes an
        input whose surrogate radius is below it to the sequential certifier in target-radius mode.
        ``indices`` name each input's noise for the sequential certifier (default ``0..N-1``).

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        required_radius : float or array_like, optional
            Radius each input should be certified to, input l2 units; NaN or None for none.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (dataset indices) for the sequential fallback.

        Returns
        -------
        list of Certificate
            One per input, with the guarantee stated in the class docstring: method ``surrogate``
            (``n_samples = 0``, or the fallback's samples when the surrogate's radius is kept over a
            smaller sequential one), ``eprocess``, or an abstention. Radii in input l2 units; the
            surrogate pass's wall time is shared equally and added to each fallback input's time.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of the surrogate's input shape, or ``indices`` does not
            hold one entry per input.
        InvalidParameterError
            If ``required_radius`` is negative, infinite or of the wrong shape.
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
        per_input = (time.perf_counter() - started) / max(num, 1)
        make = self.surrogate_certifier.certificate
        with np.errstate(invalid="ignore"):
            enough = (radius > 0) & (np.isnan(required) | (radius >= required))
        out: list[Certificate | None] = [make(c, r, per_input, p_lower=p) if ok else None
                                         for c, r, p, ok in zip(classes.tolist(), radius.tolist(), p_lower.tolist(),
                                                                enough.tolist())]
        rest = np.flatnonzero(~enough)
        if rest.size and self.sequential is not None:
            prior = stats.surrogate_prior(p_tilde[rest], self.surrogate.kappa, self.surrogate.w)
            fallback = self.sequential.certify(
                x[rest], classes=classes[rest], prior=prior, target_radius=required[rest], indices=idx[rest],
            )
            for i, cert in zip(rest, fallback):
                # Both certificates are valid; keep the larger radius (the sequential one unless the
                # surrogate's, below the required radius, is still larger; in threshold mode it is 0).
                if cert.radius > 0 and cert.radius >= radius[i]:
                    out[i] = Certificate(cert.prediction, cert.radius, "eprocess", cert.n_samples,
                                         cert.p_lower, cert.seconds + per_input)
                else:
                    out[i] = make(int(classes[i]), float(radius[i]), cert.seconds + per_input, cert.n_samples)
        for i in rest:
            if out[i] is None:
                out[i] = make(int(classes[i]), float(radius[i]), per_input)
        return out
