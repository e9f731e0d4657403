"""Anytime-valid sequential certification with a Beta-binomial E-process (confidence sequence).

The class ``A`` is fixed before the test samples are drawn (given, from pilot samples, or one
confidence sequence per class at ``alpha / K``). Then noise samples come in growing batches; after
each batch ``stats.beta_binomial_cs`` gives ``(L_t, U_t)`` for ``p_A(x)``, kept as a running
intersection ``(L*_t, U*_t)``. The confidence sequence holds uniformly over time, so the stopping
rule below may look after every batch and stop when it likes without costing validity.
The noisy copies of every input still undecided share forward passes.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import InvalidParameterError, check_count, check_probability
from .smoothing import STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier, check_images, noise_indices

__all__ = ["EProcessCertifier", "POLICIES", "CLASS_CHOICES"]

POLICIES = ("best_radius", "target_radius")
CLASS_CHOICES = ("pilot", "per_class")
KT = (0.5, 0.5)
"""The Krichevsky-Trofimov prior Beta(1/2, 1/2): the default, input-agnostic prior."""


def _as_prior(prior) -> tuple[float, float]:
    """Constructor prior: ``"kt"`` or a pair ``(a, b)`` with ``a, b > 0``."""
    if isinstance(prior, str):
        if prior.lower() != "kt":
            raise InvalidParameterError(f"prior must be 'kt' or a pair (a, b) of Beta parameters, got {prior!r}")
        return KT
    try:
        a, b = (float(v) for v in prior)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"prior must be 'kt' or a pair (a, b) of Beta parameters, got {prior!r}") from None
    if not (0 < a < np.inf and 0 < b < np.inf):
        raise InvalidParameterError(f"prior Beta(a, b) needs finite a > 0 and b > 0, got a={a}, b={b}")
    return a, b


def _per_input(name: str, value, num: int) -> np.ndarray:
    """A scalar or a length-``num`` array, as a float array of shape ``(num,)``."""
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(num, float(arr))
    if arr.shape != (num,):
        raise InvalidParameterError(f"{name} must be a scalar or have one entry per input ({num}), got shape {arr.shape}")
    return arr.copy()


def default_schedule(batch_size: int, first: int = 32) -> list[int]:
    """Samples per input per round: ``first``, doubling, up to ``batch_size`` (the last repeats).

    Parameters
    ----------
    batch_size : int
        Largest round (e.g. the engine's ``batch_size``).
    first : int, optional
        Size of the first round; default 32.

    Returns
    -------
    list of int
        The round sizes, e.g. ``[32, 64, 128, 250]`` for ``batch_size=250``; ``[batch_size]`` when
        ``batch_size <= first``.

    Raises
    ------
    InvalidParameterError
        If ``batch_size`` or ``first`` is not an integer >= 1 (the doubling would never end).
    """
    batch_size = check_count("batch_size", batch_size)
    first = check_count("first", first)
    sizes = [min(first, batch_size)]
    while sizes[-1] < batch_size:
        sizes.append(min(2 * sizes[-1], batch_size))
    return sizes


class EProcessCertifier:
    """Sequential certifier whose certificates hold under any stopping rule.

    For each input, with probability at least ``1 - alpha`` over the noise: if the certificate is
    not an abstention, the smoothed classifier ``g`` returns its ``prediction`` everywhere in the
    open l2 ball of its ``radius``. This holds whatever the policy, budget, schedule or prior, as
    long as the prior and the class are fixed before the sequential samples are drawn (a per-input
    prior, e.g. from a surrogate that never sees these samples, is allowed).

    Parameters
    ----------
    smooth : SmoothedClassifier
        Base classifier and noise level ``sigma`` (l2, input units).
    alpha : float
        Error probability per input, in (0, 1).
    prior : "kt" or (a, b)
        Beta prior of the mixture martingale; changes power (samples spent), never validity.
    policy : "best_radius" or "target_radius"
        ``target_radius``: certify as soon as ``L* >= Phi(r*/sigma)``, give up as soon as
        ``U* < Phi(r*/sigma)`` (a smaller certified radius is still reported if ``L* > 1/2``).
        ``best_radius``: stop once the radius could grow by at most ``tolerance`` more:
        ``radius(min(U*, L_cap)) - radius(L*) <= tolerance`` with ``radius(p) = 0`` for ``p <= 1/2``
        (so it abstains once ``U* <= 1/2``) and ``L_cap`` the largest lower bound the budget can
        reach (all ``max_samples`` draws successes).
    target_radius : float, optional
        ``r*`` in input l2 units, required with ``policy="target_radius"``.
    tolerance : float
        Best-radius stopping tolerance, in input l2 units (>= 0).
    max_samples : int
        Budget of sequential draws per input (pilot samples come on top). At the budget the
        certifier reports ``sigma * Phi^{-1}(L*)`` if ``L* > 1/2``, else abstains.
    class_choice : "pilot" or "per_class"
        How ``A`` is chosen when ``certify`` gets no ``classes``: argmax of ``n0`` pilot samples
        from an independent stream, or one confidence sequence per class at ``alpha / K``.
    n0 : int
        Pilot samples per input.
    schedule : sequence of int, optional
        Samples per input per round (the last entry repeats). Default 32, 64, ... up to
        ``smooth.batch_size``.
    """

    def __init__(
        self,
        smooth: SmoothedClassifier,
        alpha: float = 1e-3,
        *,
        prior="kt",
        policy: str = "best_radius",
        target_radius: float | None = None,
        tolerance: float = 0.01,
        max_samples: int = 10_000,
        class_choice: str = "pilot",
        n0: int = 100,
        schedule: Sequence[int] | None = None,
    ):
        self.smooth = smooth
        self.alpha = check_probability("alpha", alpha)
        self.prior = _as_prior(prior)
        if policy not in POLICIES:
            raise InvalidParameterError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        if policy == "target_radius" and target_radius is None:
            raise InvalidParameterError("policy='target_radius' needs target_radius (input l2 units), e.g. target_radius=0.25")
        self.target_radius = None if target_radius is None else self._check_radius(float(target_radius))
        tolerance = float(tolerance)
        if not (0 <= tolerance < np.inf):
            raise InvalidParameterError(f"tolerance must be a finite number >= 0 (input l2 units), got {tolerance}")
        self.tolerance = tolerance
        self.max_samples = check_count("max_samples", max_samples)
        if class_choice not in CLASS_CHOICES:
            raise InvalidParameterError(f"class_choice must be one of {', '.join(CLASS_CHOICES)}, got {class_choice!r}")
        self.class_choice = class_choice
        self.n0 = check_count("n0", n0)
        if schedule is None:
            schedule = default_schedule(smooth.batch_size)
        schedule = [check_count("schedule entry", s) for s in schedule]
        if not schedule:
            raise InvalidParameterError("schedule must hold at least one batch size, e.g. [32, 64, 128]")
        self.schedule = schedule

    @staticmethod
    def _check_radius(r):
        arr = np.asarray(r, dtype=float)
        if np.any(arr < 0) or np.any(np.isinf(arr)):
            raise InvalidParameterError(f"target_radius must be a finite radius >= 0 (input l2 units), got {r}")
        return float(arr) if arr.ndim == 0 else arr

    # ------------------------------------------------------------------ per-input parameters
    def _prior_arrays(self, prior, num: int):
        """Per-input mixture ``(a, b, weights)``, each ``num x J`` (J mixture components)."""
        if prior is None:
            a, b = self.prior
            return np.full((num, 1), a), np.full((num, 1), b), np.ones((num, 1))
        if isinstance(prior, str) or len(prior) not in (2, 3):
            raise InvalidParameterError("prior must be a tuple (a, b[, weights]) of per-input arrays, as stats.surrogate_prior returns")
        a = np.asarray(prior[0], dtype=float)
        b = np.asarray(prior[1], dtype=float)
        w = np.ones_like(a) if len(prior) == 2 else np.asarray(prior[2], dtype=float)
        if a.ndim == 1:
            a, b, w = a[:, None], b[:, None], np.broadcast_to(w, a.shape)[:, None]
        try:
            a, b, w = np.broadcast_arrays(a, b, w)
        except ValueError:
            raise InvalidParameterError("prior a, b and weights must have the same shape (inputs x components)") from None
        if a.ndim != 2 or a.shape[0] != num:
            raise InvalidParameterError(f"prior arrays must have one row per input ({num}), got shape {a.shape}")
        if np.any(~np.isfinite(a)) or np.any(a <= 0) or np.any(~np.isfinite(b)) or np.any(b <= 0):
            raise InvalidParameterError("prior Beta parameters a and b must be finite and > 0 for every input")
        if np.any(~np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=1) <= 0):
            raise InvalidParameterError("prior mixture weights must be finite, >= 0 and not all 0 for any input")
        return a.astype(float), b.astype(float), w / w.sum(axis=1, keepdims=True)

    def _alpha_array(self, alpha, num: int) -> np.ndarray:
        arr = _per_input("alpha", self.alpha if alpha is None else alpha, num)
        if not np.all((arr > 0) & (arr < 1)):
            raise InvalidParameterError("alpha must lie strictly between 0 and 1 for every input, e.g. alpha=0.001")
        return arr

    def _target_array(self, target_radius, num: int) -> np.ndarray:
        """Target radius per input; NaN means the best-radius policy for that input."""
        if target_radius is None:
            target_radius = self.target_radius if self.policy == "target_radius" else np.nan
        arr = _per_input("target_radius", target_radius, num)
        finite = ~np.isnan(arr)
        self._check_radius(arr[finite])
        return arr

    def _classes_array(self, classes, num: int) -> np.ndarray:
        arr = np.asarray(classes)
        if arr.shape != (num,):
            raise InvalidParameterError(f"classes must hold one class per input ({num}), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidParameterError(f"classes must be integer class indices, got dtype {arr.dtype}")
        k = self.smooth.num_classes
        if num and (arr.min() < 0 or arr.max() >= k):
            raise InvalidParameterError(f"classes must lie in 0..{k - 1}, got {int(arr.min())}..{int(arr.max())}")
        return arr.astype(np.int64)

    # ------------------------------------------------------------------ certification
    def confidence_sequence(self, successes, drawn, alpha, a, b, weights):
        """``(L_t, U_t)`` after ``drawn`` draws with ``successes``: ``stats.beta_binomial_cs``.

        Must hold uniformly over time (``P(exists t: p outside) <= alpha``); that is what lets the
        stopping rule look after every batch. The tests override it with a fixed-n bound to show
        that such a bound, re-checked after every batch, breaks the guarantee.

        Parameters
        ----------
        successes : numpy.ndarray
            Draws so far that returned the tracked class, ``inputs x tracked classes``.
        drawn : numpy.ndarray
            Draws so far, broadcast against ``successes``.
        alpha : numpy.ndarray
            Error probability of each sequence, in (0, 1), broadcast against ``successes``.
        a, b, weights : numpy.ndarray
            The Beta mixture prior: parameters and weights of its components, on the last axis.

        Returns
        -------
        lower, upper : numpy.ndarray
            Ends of the confidence sequence for the tracked class's probability, shaped like
            ``successes``.

        Raises
        ------
        InvalidParameterError
            If the counts, ``alpha`` or the prior are out of range.
        """
        return stats.beta_binomial_cs(successes, drawn, alpha, a, b, weights)

    def certify(
        self,
        x: torch.Tensor,
        *,
        classes: Sequence[int] | np.ndarray | None = None,
        prior=None,
        target_radius=None,
        alpha=None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> list[Certificate]:
        """Certify each input of ``x`` (``N x C x H x W``, pixels in [0, 1]) sequentially.

        For each input, with probability at least ``1 - alpha`` (its own alpha) over the noise: a
        non-abstaining certificate is correct (``g`` returns ``prediction`` on the open l2 ball of
        ``radius``). This holds under any stopping rule, provided ``classes`` and ``prior`` are fixed
        before the sequential samples (stream ``STREAM_SEQUENTIAL``) are drawn.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        classes : sequence of int or numpy.ndarray, optional
            Fixes ``A`` per input (no pilot cost), e.g. a surrogate's argmax. Default: chosen as
            ``class_choice`` says (argmax of ``n0`` pilot samples from the independent stream
            ``STREAM_SELECT``, or one confidence sequence per class at ``alpha / K``).
        prior : tuple of array_like, optional
            A per-input mixture ``(a, b[, weights])`` with a row per input and the components on the
            last axis, as ``stats.surrogate_prior`` returns; default the constructor's prior. A per-input
            prior needs a chosen class: not allowed with ``class_choice="per_class"`` and no ``classes``.
        target_radius : float or array_like, optional
            Scalar or one value per input, input l2 units; a NaN target means best radius for that
            input. Default: the constructor's ``target_radius`` under ``policy="target_radius"``, else
            best radius.
        alpha : float or array_like, optional
            Error probability, scalar or one value per input, each in (0, 1); default the constructor's.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (default ``0..N-1``).

        Returns
        -------
        list of Certificate
            One per input: method ``eprocess`` with ``p_lower = L*`` (the running-intersection lower
            bound) and ``radius = sigma * Phi^{-1}(L*)`` in input l2 units, or an abstention (carrying
            ``L*``) where ``L* <= 1/2``. ``n_samples`` counts pilot plus sequential samples;
            ``seconds`` is the wall time of the rounds the input took part in, shared by samples.

        Raises
        ------
        InvalidParameterError
            If ``alpha``, ``target_radius``, ``prior`` or ``classes`` is malformed or out of range, or a
            per-input prior is given without a chosen class.
        InvalidInputError
            If ``x`` is not a valid image batch, or ``indices`` does not hold one entry per input.
        ModelError
            If the base model's output width is not ``num_classes``.
        """
        started = time.perf_counter()
        x = check_images(x)
        num = x.shape[0]
        idx = noise_indices(indices, num)
        alpha_arr = self._alpha_array(alpha, num)
        target = self._target_array(target_radius, num)
        a, b, w = self._prior_arrays(prior, num)
        if num == 0:
            return []
        k = self.smooth.num_classes
        sigma = self.smooth.sigma
        per_class = classes is None and self.class_choice == "per_class"
        if per_class and prior is not None:
            raise InvalidParameterError("a per-input prior is for a chosen class: pass classes= or use class_choice='pilot'")

        seconds = np.zeros(num)
        pilot = np.zeros(num, dtype=np.int64)
        if classes is not None:
            chosen = self._classes_array(classes, num)
        elif not per_class:
            counts_select = self.smooth.counts(x, self.n0, indices=idx, stream=STREAM_SELECT)
            chosen = counts_select.argmax(axis=1)
            pilot[:] = self.n0
        else:
            chosen = None
        seconds += (time.perf_counter() - started) / num

        # One confidence sequence per tracked class: 1 (the chosen class) or K at alpha / K each.
        width = k if per_class else 1
        alpha_cs = alpha_arr / width
        budget = self.max_samples
        successes = np.zeros((num, width))
        drawn = np.zeros(num, dtype=np.int64)
        lower = np.zeros((num, width))
        upper = np.ones((num, width))
        threshold = np.where(np.isnan(target), np.nan, stats.p_threshold(np.nan_to_num(target), sigma))
        # Largest lower bound the budget can reach: where the best radius could grow to at most.
        cap = stats.beta_binomial_cs(budget, budget, alpha_cs, a, b, w)[0]

        active = np.ones(num, dtype=bool)
        round_ = 0
        while active.any():
            tick = time.perf_counter()
            act = np.flatnonzero(active)
            step = np.minimum(self.schedule[min(round_, len(self.schedule) - 1)], budget - drawn[act])
            counts = self.smooth.counts(x[act], step, indices=idx[act], stream=STREAM_SEQUENTIAL, start=drawn[act])
            if per_class:
                successes[act] += counts
            else:
                successes[act, 0] += counts[np.arange(len(act)), chosen[act]]
            drawn[act] += step
            lo, up = self.confidence_sequence(
                successes[act], drawn[act, None], alpha_cs[act, None],
                a[act, None, :], b[act, None, :], w[act, None, :],
            )
            lower[act], upper[act] = stats.running_intersection(lower[act], upper[act], lo, up)
            best_lower = lower[act].max(axis=1)
            best_upper = upper[act].max(axis=1)

            done = drawn[act] >= budget
            thr = threshold[act]
            has_target = ~np.isnan(thr)
            with np.errstate(invalid="ignore"):
                reached = (best_lower >= thr) & (best_lower > 0.5)
                hopeless = best_upper < thr
            done |= has_target & (reached | hopeless)
            gap = stats.radius(np.minimum(best_upper, cap[act]), sigma) - stats.radius(best_lower, sigma)
            done |= ~has_target & (gap <= self.tolerance)
            active[act[done]] = False

            seconds[act] += (time.perf_counter() - tick) * step / max(step.sum(), 1)
            round_ += 1

        if per_class:
            chosen = lower.argmax(axis=1)
        p_lower = lower.max(axis=1)
        radii = np.atleast_1d(stats.radius(p_lower, sigma))
        n_samples = pilot + drawn
        out = []
        for i in range(num):
            if radii[i] > 0:
                out.append(Certificate(int(chosen[i]), float(radii[i]), "eprocess", int(n_samples[i]),
                                       float(p_lower[i]), float(seconds[i])))
            else:
                out.append(abstention(int(n_samples[i]), float(p_lower[i]), float(seconds[i])))
        return out
