"""Anytime-valid sequential certification with a Beta-mixture E-process (confidence sequence).

The class ``A`` is fixed before the test samples are drawn (given, e.g. by a surrogate or the base
model's clean prediction; from pilot samples; or one confidence sequence per class at ``alpha / K``).
Then noise samples come in batches, and the stopping rule is evaluated at EVERY sample of a batch:
from the per-sample outcomes (``SmoothedClassifier.sample_predictions``) the running counts give the
confidence sequence ``(L_t, U_t)`` and the test of ``p >= Phi(r*/sigma)`` at each index, vectorised,
so an input stops at the first sample where its evidence suffices (``stop_time``) while forward
passes stay batched. Batches start small and grow geometrically (``GeometricSchedule``), so the
samples drawn after the stop in the same batch stay few.

Validity. For a prior fixed before sampling, ``M_t(q)`` is a mean-1 martingale at ``p = q`` and the
confidence sequence holds at every ``t`` at once with probability ``1 - alpha`` (Ville). Hence any
stopping rule keeps the guarantee, and the certificate may use the running intersection over ALL
drawn samples, including those after ``stop_time``: on the event that the sequence holds at every
time, ``p`` lies in each ``(L_t, U_t)``, so in their intersection, which is never looser than the
bound at ``stop_time``. That is what is reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import InvalidParameterError, check_count, check_probability
from .smoothing import STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier, check_images, noise_indices

__all__ = [
    "EProcessCertifier",
    "GeometricSchedule",
    "DEFAULT_SCHEDULE",
    "POLICIES",
    "CLASS_CHOICES",
    "PRIORS",
    "TRUNCATED_WEIGHT",
    "GIVE_UPS",
    "default_schedule",
]

POLICIES = ("best_radius", "target_radius")
CLASS_CHOICES = ("pilot", "per_class")
PRIORS = ("auto", "kt", "truncated", "radius")
"""Named constructor priors: ``kt`` = Beta(1/2, 1/2); ``truncated`` = ``stats.truncated_prior`` at each
input's ``Phi(r*/sigma)`` (KT where no target radius is asked); ``radius`` = ``stats.radius_prior`` (KT
mixed with a log-uniform failure rate: for the best radius of inputs whose samples mostly agree);
``auto`` = truncated for a target-radius input, KT for best radius. A pair ``(a, b)`` is a fixed Beta."""
KT = (0.5, 0.5)
"""The Krichevsky-Trofimov prior Beta(1/2, 1/2): the input-agnostic prior of the best-radius policy."""
TRUNCATED_WEIGHT = 0.9
"""Weight of the component above ``p0`` in the truncated prior: it costs log(1/0.9) = 0.1 nats of
evidence to certify (the component below ``p0`` keeps the confidence sequence informative there)."""
GIVE_UPS = ("dedicated", "mixture")
"""When target mode gives up. ``dedicated`` (default): a one-sided test of ``p < p0`` of its own
(``stats.give_up_test`` with ``stats.give_up_prior``) at the full ``alpha``, beside the certifying test.
``mixture`` (version 0.3): when the certifying mixture's evidence shows ``p < p0`` or its upper end falls
below ``p0``; its lower component holds a tenth of the prior, so giving up pays log(10) = 2.3 nats more."""

_CHUNK_ELEMENTS = 1 << 20
"""Per-sample statistics are evaluated over chunks of inputs of at most this many (sample, class) cells."""


@dataclass(frozen=True)
class GeometricSchedule:
    """Samples per input per round: ``first`` until ``growth - 1`` times the samples drawn is larger.

    Round sizes are ``clip(ceil((growth - 1) * drawn), first, largest)`` per input: a stop decided
    inside a round wastes at most the rest of that round, about ``(growth - 1) / 2`` of the samples
    drawn on average (so ``n_samples`` stays near ``stop_time``), at the price of more rounds (more,
    smaller forward passes). With ``predict``, an input on track for a target-radius certificate
    (``s / t > p0``) draws in one round up to the index where the test would fire if every further
    sample agreed: a lower bound on its stop, so an all-agreeing input stops exactly at the end of a
    round; that round is at least a quarter of the usual one and at most doubles what was drawn.

    Parameters
    ----------
    first : int
        Smallest round (>= 1).
    growth : float
        Factor by which the samples drawn may grow per round (> 1).
    largest : int
        Largest round (>= first).
    predict : bool
        Jump to the predicted stop in target-radius mode.
    """

    first: int = 16
    growth: float = 1.15
    largest: int = 1024
    predict: bool = True

    def __post_init__(self):
        check_count("first", self.first)
        check_count("largest", self.largest)
        if not (1.0 < float(self.growth) < math.inf):
            raise InvalidParameterError(f"schedule growth must be a finite factor > 1, e.g. 1.15, got {self.growth}")
        if self.largest < self.first:
            raise InvalidParameterError(f"schedule largest ({self.largest}) must be >= first ({self.first})")

    def sizes(self, drawn: np.ndarray) -> np.ndarray:
        """Round size per input from the samples it has drawn (before any budget cap)."""
        grown = np.ceil((self.growth - 1.0) * np.asarray(drawn, dtype=float)).astype(np.int64)
        return np.clip(grown, self.first, self.largest)


DEFAULT_SCHEDULE = GeometricSchedule()
"""The schedule of ``EProcessCertifier`` and of the hybrid's fallback unless one is given."""


def _as_prior(prior):
    """Constructor prior: a name of ``PRIORS`` or a pair ``(a, b)`` with ``a, b > 0``."""
    if isinstance(prior, str):
        name = prior.lower()
        if name not in PRIORS:
            raise InvalidParameterError(
                f"prior must be one of {', '.join(PRIORS)} or a pair (a, b) of Beta parameters, got {prior!r}"
            )
        return name
    try:
        a, b = (float(v) for v in prior)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"prior must be one of {', '.join(PRIORS)} or a pair (a, b) of Beta parameters, got {prior!r}"
        ) from None
    if not (0 < a < np.inf and 0 < b < np.inf):
        raise InvalidParameterError(f"prior Beta(a, b) needs finite a > 0 and b > 0, got a={a}, b={b}")
    return a, b


def _per_input(name: str, value, num: int) -> np.ndarray:
    """A scalar or a length-``num`` array, as a float array of shape ``(num,)``."""
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(num, float(arr))
    if arr.shape != (num,):
        raise InvalidParameterError(
            f"{name} must be a scalar or have one entry per input ({num}), got shape {arr.shape}"
        )
    return arr.copy()


def default_schedule(batch_size: int, first: int = 32) -> list[int]:
    """Samples per input per round: ``first``, doubling, up to ``batch_size`` (the last repeats).

    The fixed round list of version 0.1; ``EProcessCertifier`` now defaults to ``DEFAULT_SCHEDULE``
    (a ``GeometricSchedule``) and still accepts such a list as ``schedule``.

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


@dataclass
class _State:
    """Running state of every input: counts, running intersection, decisions."""

    successes: np.ndarray  # num x W
    drawn: np.ndarray  # num
    lower: np.ndarray  # num x W, L*
    upper: np.ndarray  # num x W, U*
    certified: np.ndarray  # num x W: the target test fired for this class
    stop: np.ndarray  # num: sequential samples when the rule fired (-1: not yet)
    hopeless_failures: np.ndarray  # num: failures after which the target test cannot fire in the budget
    slack: float = 0.0  # the noise scheme's radius slack (``stats.radius``): 0 for float noise


class EProcessCertifier:
    """Sequential certifier whose certificates hold under any stopping rule.

    For each input, with probability at least ``1 - alpha`` over the noise: if the certificate is
    not an abstention, the smoothed classifier ``g`` returns its ``prediction`` everywhere in the
    open l2 ball of its ``radius``. This holds whatever the policy, budget, schedule, price or prior,
    as long as the prior and the class are fixed before the sequential samples are drawn (a
    per-input prior, e.g. from a surrogate that never sees these samples, or truncated at the
    input's requested radius, is allowed).

    The stopping rule is evaluated after every sample (``stop_time`` of the certificate), the
    samples come in rounds (``schedule``), and the certificate uses the running intersection of the
    confidence sequence over all samples drawn (valid by Ville's inequality, never looser than the
    bound at the stop).

    Parameters
    ----------
    smooth : SmoothedClassifier
        Base classifier and noise level ``sigma`` (l2, input units).
    alpha : float
        Error probability per input, in (0, 1).
    prior : "auto", "kt", "truncated", "radius" or (a, b)
        Prior of the mixture martingale (``PRIORS``); changes power (samples spent), never validity.
        ``auto`` (default): ``stats.truncated_prior`` at ``Phi(r*/sigma)`` for a target-radius input
        (it certifies near the floor ``stats.sample_floor``), KT for best radius. ``radius``:
        ``stats.radius_prior`` for every input (best radius close to the fixed-n Clopper-Pearson
        radius where the samples agree).
    policy : "best_radius" or "target_radius"
        ``target_radius``: certify as soon as the test of ``p >= Phi(r*/sigma)`` fires
        (``stats.threshold_test``, i.e. ``L* >= Phi(r*/sigma)``), give up as soon as it shows
        ``p < Phi(r*/sigma)`` or even all-agreeing samples up to the budget could not fire it (a
        smaller certified radius is still reported if ``L* > 1/2``).
        ``best_radius``: stop once the radius could grow by at most ``tolerance`` more:
        ``radius(min(U*, L_cap)) - radius(L*) <= tolerance`` with ``radius(p) = 0`` for ``p <= 1/2``
        (so it abstains once ``U* <= 1/2``) and ``L_cap`` the largest lower bound the budget can
        reach (all ``max_samples`` draws successes); with ``price``, also stop once more samples are
        not worth their price.
    target_radius : float, optional
        ``r*`` in input l2 units, required with ``policy="target_radius"``.
    tolerance : float
        Best-radius stopping tolerance, in input l2 units (>= 0).
    max_samples : int
        Budget of sequential draws per input (pilot samples come on top). At the budget the
        certifier reports ``sigma * Phi^{-1}(L*)`` if ``L* > 1/2``, else abstains.
    class_choice : "pilot" or "per_class"
        How ``A`` is chosen when ``certify`` gets no ``classes``: argmax of ``n0`` pilot samples
        from an independent stream, or (no pilot) one confidence sequence per class at ``alpha / K``,
        stopping as soon as the rule fires for any class.
    n0 : int
        Pilot samples per input.
    schedule : GeometricSchedule or sequence of int, optional
        Samples per input per round: a ``GeometricSchedule`` (default ``DEFAULT_SCHEDULE``), or a
        list of round sizes (the last repeats) as in version 0.1.
    price : float, optional
        The priced best-radius rule: radius (input l2 units) a user would give up per 1,000 samples.
        An input stops once, for every look-ahead ``h`` of ``stats.priced_horizons``, the expected
        radius gain of ``h`` more samples (``stats.expected_radius_gain``: the confidence sequence at
        the counts expected under the plug-in estimate ``s / t``, minus the radius now) is below
        ``price * h / 1000``. A stopping rule, so validity is untouched. None (default): the
        tolerance rule alone (which also stays in force with a price).
    truncated_weight : float
        Weight of the upper component of the truncated prior, in (0, 1]; default ``TRUNCATED_WEIGHT``.
    give_up : "dedicated" or "mixture"
        How a target-radius input gives up (``GIVE_UPS``): a stopping rule, so certificates keep their
        guarantee either way; with ``dedicated`` a wrong give-up (``p >= Phi(r*/sigma)``) also has
        probability at most the give-up level.
    radius_of_interest : float, optional
        The largest radius worth sampling for, input l2 units: the best-radius rules (tolerance and price)
        count no gain above it, so a run stops once it certifies it. A stopping rule only; None (default):
        every radius counts.
    give_up_alpha : float, optional
        Level of the dedicated give-up test, in (0, 1); default each input's ``alpha`` (then the decision
        "is p >= Phi(r*/sigma)?" is wrong with probability at most ``alpha`` whichever way it goes). A
        wrong give-up is an abstention, never a wrong certificate: this level trades samples for
        accuracy only.
    """

    def __init__(
        self,
        smooth: SmoothedClassifier,
        alpha: float = 1e-3,
        *,
        prior="auto",
        policy: str = "best_radius",
        target_radius: float | None = None,
        tolerance: float = 0.01,
        max_samples: int = 10_000,
        class_choice: str = "pilot",
        n0: int = 100,
        schedule: GeometricSchedule | Sequence[int] | None = None,
        price: float | None = None,
        truncated_weight: float = TRUNCATED_WEIGHT,
        give_up: str = "dedicated",
        give_up_alpha: float | None = None,
        radius_of_interest: float | None = None,
    ):
        self.smooth = smooth
        self.alpha = check_probability("alpha", alpha)
        self.prior = _as_prior(prior)
        if policy not in POLICIES:
            raise InvalidParameterError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        if policy == "target_radius" and target_radius is None:
            raise InvalidParameterError(
                "policy='target_radius' needs target_radius (input l2 units), e.g. target_radius=0.25"
            )
        self.target_radius = None if target_radius is None else self._check_radius(float(target_radius))
        tolerance = float(tolerance)
        if not (0 <= tolerance < np.inf):
            raise InvalidParameterError(f"tolerance must be a finite number >= 0 (input l2 units), got {tolerance}")
        self.tolerance = tolerance
        if price is not None:
            price = float(price)
            if not (0 <= price < np.inf):
                raise InvalidParameterError(
                    f"price must be a finite radius >= 0 (input l2 units) per 1,000 samples, got {price}"
                )
        self.price = price
        self.max_samples = check_count("max_samples", max_samples)
        if class_choice not in CLASS_CHOICES:
            raise InvalidParameterError(f"class_choice must be one of {', '.join(CLASS_CHOICES)}, got {class_choice!r}")
        self.class_choice = class_choice
        self.n0 = check_count("n0", n0)
        if schedule is None:
            schedule = DEFAULT_SCHEDULE
        if not isinstance(schedule, GeometricSchedule):
            if isinstance(schedule, (str, bytes)):
                raise InvalidParameterError(
                    "schedule must be a GeometricSchedule or a list of batch sizes, e.g. [32, 64]"
                )
            schedule = [check_count("schedule entry", s) for s in schedule]
            if not schedule:
                raise InvalidParameterError("schedule must hold at least one batch size, e.g. [32, 64, 128]")
        self.schedule = schedule
        self.truncated_weight = float(truncated_weight)
        if not 0.0 < self.truncated_weight <= 1.0:
            raise InvalidParameterError(f"truncated_weight must lie in (0, 1], got {truncated_weight}")
        if give_up not in GIVE_UPS:
            raise InvalidParameterError(f"give_up must be one of {', '.join(GIVE_UPS)}, got {give_up!r}")
        self.give_up = give_up
        self.give_up_alpha = None if give_up_alpha is None else check_probability("give_up_alpha", give_up_alpha)
        if radius_of_interest is not None:
            radius_of_interest = float(radius_of_interest)
            if not 0 < radius_of_interest < np.inf:
                raise InvalidParameterError(
                    f"radius_of_interest must be a finite radius > 0 (input l2 units), got {radius_of_interest}"
                )
        self.radius_of_interest = radius_of_interest

    @staticmethod
    def _check_radius(r):
        arr = np.asarray(r, dtype=float)
        if np.any(arr < 0) or np.any(np.isinf(arr)):
            raise InvalidParameterError(f"target_radius must be a finite radius >= 0 (input l2 units), got {r}")
        return float(arr) if arr.ndim == 0 else arr

    # ------------------------------------------------------------------ per-input parameters
    def _prior_arrays(self, prior, num: int, threshold: np.ndarray):
        """Per-input truncated Beta mixture ``(a, b, weights, support_lo, support_hi)``, each ``num x J``."""
        if prior is None:
            return self._named_prior(num, threshold)
        if isinstance(prior, str) or len(prior) not in (2, 3, 5):
            raise InvalidParameterError(
                "prior must be a tuple (a, b[, weights[, support_lo, support_hi]]) of per-input "
                "arrays, as stats.surrogate_prior or stats.truncated_prior returns"
            )
        a = np.asarray(prior[0], dtype=float)
        b = np.asarray(prior[1], dtype=float)
        w = np.ones_like(a) if len(prior) == 2 else np.asarray(prior[2], dtype=float)
        lo, hi = (
            (0.0, 1.0) if len(prior) < 5 else (np.asarray(prior[3], dtype=float), np.asarray(prior[4], dtype=float))
        )
        if a.ndim == 1:
            a, b, w = a[:, None], b[:, None], np.broadcast_to(w, a.shape)[:, None]
            lo, hi = (np.asarray(v, dtype=float)[:, None] if np.ndim(v) == 1 else v for v in (lo, hi))
        try:
            a, b, w, lo, hi = np.broadcast_arrays(a, b, w, lo, hi)
        except ValueError:
            raise InvalidParameterError(
                "prior a, b, weights and supports must have the same shape (inputs x components)"
            ) from None
        if a.ndim != 2 or a.shape[0] != num:
            raise InvalidParameterError(f"prior arrays must have one row per input ({num}), got shape {a.shape}")
        if np.any(~np.isfinite(a)) or np.any(a <= 0) or np.any(~np.isfinite(b)) or np.any(b <= 0):
            raise InvalidParameterError("prior Beta parameters a and b must be finite and > 0 for every input")
        if np.any(~np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=1) <= 0):
            raise InvalidParameterError("prior mixture weights must be finite, >= 0 and not all 0 for any input")
        if np.any(~(lo >= 0)) or np.any(~(hi <= 1)) or np.any(~(lo < hi)):
            raise InvalidParameterError("prior supports must satisfy 0 <= support_lo < support_hi <= 1")
        return tuple(np.array(v, dtype=float) for v in (a, b, w / w.sum(axis=1, keepdims=True), lo, hi))

    def _named_prior(self, num: int, threshold: np.ndarray):
        """The constructor's prior for each input: KT / (a, b) / truncated at the input's ``p0``."""
        if isinstance(self.prior, tuple):
            a, b = self.prior
        else:
            a, b = KT
        one = np.ones((num, 2))
        if self.prior == "radius":
            return tuple(np.tile(v, (num, 1)) for v in stats.radius_prior())
        prior = (a * one, b * one, np.tile([1.0, 0.0], (num, 1)), 0.0 * one, one.copy())
        if self.prior in ("auto", "truncated"):
            has = ~np.isnan(threshold)
            if np.any(has):
                ta, tb, tw, tlo, thi = stats.truncated_prior(threshold[has], self.truncated_weight, a, b)
                for arr, new in zip(prior, (ta, tb, tw, tlo, thi)):
                    arr[has] = new
        return prior

    def _baseline_array(self, baseline_radius, num: int) -> np.ndarray | None:
        """``Phi(baseline / sigma)`` per input (0 where none or <= 0), or None when no baseline is given."""
        if baseline_radius is None:
            return None
        arr = np.nan_to_num(_per_input("baseline_radius", baseline_radius, num), nan=0.0)
        if np.any(np.isinf(arr)):
            raise InvalidParameterError("baseline_radius must be finite (input l2 units), or NaN / <= 0 for none")
        return np.where(arr > 0, stats.p_threshold(np.maximum(arr, 0.0), self.smooth.sigma), 0.0)

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

    # ------------------------------------------------------------------ the statistics (test seams)
    def log_marginal(self, successes, drawn, prior):
        """log of the prior's mixture likelihood of the counts: ``stats.beta_mixture_log_marginal``.

        The prior must be fixed before sampling. The tests override this with a prior fitted on the
        same samples to show that such a prior breaks the guarantee.

        Parameters
        ----------
        successes, drawn : numpy.ndarray
            Running counts, broadcast against each other (``inputs x samples x tracked classes``).
        prior : tuple of numpy.ndarray
            ``(a, b, weights, support_lo, support_hi)``, mixture components on the last axis.

        Returns
        -------
        numpy.ndarray
            Shaped like ``successes``.
        """
        return stats.beta_mixture_log_marginal(successes, drawn, *prior)

    def confidence_sequence(self, successes, drawn, alpha, log_marginal):
        """``(L_t, U_t)`` after ``drawn`` draws with ``successes``: ``stats.confidence_sequence_ends``.

        Must hold uniformly over time (``P(exists t: p outside) <= alpha``); that is what lets the
        stopping rule look after every sample. The tests override it with a fixed-n bound to show
        that such a bound, re-checked after every sample, breaks the guarantee.

        Parameters
        ----------
        successes : numpy.ndarray
            Draws so far that returned the tracked class (``inputs x samples x tracked classes``).
        drawn : numpy.ndarray
            Draws so far, broadcast against ``successes``.
        alpha : numpy.ndarray
            Error probability of each sequence, in (0, 1), broadcast against ``successes``.
        log_marginal : numpy.ndarray
            ``log_marginal(successes, drawn, prior)``.

        Returns
        -------
        lower, upper : numpy.ndarray
            Ends of the confidence sequence for the tracked class's probability, shaped like
            ``successes``.
        """
        return stats.confidence_sequence_ends(successes, drawn, log_marginal, alpha)

    # ------------------------------------------------------------------ certification
    # long: the sequential test, read at once: checks, pilot, rounds and certificates share one state
    def certify(
        self,
        x: torch.Tensor,
        *,
        classes: Sequence[int] | np.ndarray | None = None,
        prior=None,
        target_radius=None,
        alpha=None,
        indices: Sequence[int] | np.ndarray | None = None,
        baseline_radius=None,
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
            Fixes ``A`` per input (no pilot cost), e.g. a surrogate's argmax or the base model's clean
            prediction. Default: chosen as ``class_choice`` says (argmax of ``n0`` pilot samples from
            the independent stream ``STREAM_SELECT``, or one confidence sequence per class at
            ``alpha / K``, no pilot).
        prior : tuple of array_like, optional
            A per-input mixture ``(a, b[, weights[, support_lo, support_hi]])`` with a row per input and
            the components on the last axis, as ``stats.surrogate_prior`` (or ``stats.truncated_prior``)
            returns; default the constructor's prior. A per-input prior needs a chosen class: not
            allowed with ``class_choice="per_class"`` and no ``classes``.
        target_radius : float or array_like, optional
            Scalar or one value per input, input l2 units; a NaN target means best radius for that
            input. Default: the constructor's ``target_radius`` under ``policy="target_radius"``, else
            best radius.
        alpha : float or array_like, optional
            Error probability, scalar or one value per input, each in (0, 1); default the constructor's.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (default ``0..N-1``).
        baseline_radius : float or array_like, optional
            A radius the caller already holds for the input (input l2 units; e.g. the hybrid's one-pass
            ``R^`` when it refines it): the best-radius rules count only gains above it, so a run stops once
            sampling cannot beat it at the price, or the tolerance. A stopping rule only: the certificate
            is this run's own, whatever the baseline.

        Returns
        -------
        list of Certificate
            One per input: method ``eprocess`` with ``p_lower = L*`` (the running-intersection lower
            bound over every sample drawn; at least ``Phi(r*/sigma)`` where the target test fired) and
            ``radius = sigma * Phi^{-1}(p_lower)`` in input l2 units, or an abstention (carrying
            ``L*``) where ``L* <= 1/2``. ``n_samples`` counts pilot plus sequential samples drawn,
            ``stop_time`` pilot samples plus the sequential sample at which the stopping rule fired;
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
        sigma = self.smooth.sigma
        # the radius of the law the samples come from (sound scheme: stats.grid_radius); 0 for float noise
        slack = self.smooth.radius_slack(x.shape[1:])
        threshold = np.where(np.isnan(target), np.nan, stats.p_threshold(np.nan_to_num(target), sigma, slack=slack))
        prior_arrays = self._prior_arrays(prior, num, threshold)
        if num == 0:
            return []
        baseline = self._baseline_array(baseline_radius, num)
        present = prior_arrays[2].max(axis=0) > 0  # drop components no input uses (KT alone: one)
        prior_arrays = tuple(v[:, present] for v in prior_arrays)
        # The give-up test's prior on [0, p0] (a dummy [0, 1/2] where no target is asked: never read there)
        # and its level (one test per tracked class, as the certifying test).
        give_up = stats.give_up_prior(np.where(np.isnan(threshold), 0.5, threshold))
        k = self.smooth.num_classes
        per_class = classes is None and self.class_choice == "per_class"
        if per_class and prior is not None:
            raise InvalidParameterError(
                "a per-input prior is for a chosen class: pass classes= or use class_choice='pilot'"
            )

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
        give_up = (give_up, alpha_cs if self.give_up_alpha is None else np.full(num, self.give_up_alpha / width))
        budget = self.max_samples
        state = _State(
            successes=np.zeros((num, width)),
            drawn=np.zeros(num, dtype=np.int64),
            lower=np.zeros((num, width)),
            upper=np.ones((num, width)),
            certified=np.zeros((num, width), dtype=bool),
            stop=np.full(num, -1, dtype=np.int64),
            hopeless_failures=self._hopeless_failures(threshold, alpha_cs, prior_arrays, budget),
            slack=slack,
        )
        # Largest lower bound the budget can reach: where the best radius could grow to at most.
        cap = stats.confidence_sequence_ends(
            budget, budget, self.log_marginal(np.full(num, float(budget)), float(budget), prior_arrays), alpha_cs
        )[0]

        # A target no budget-sized run can reach is given up before any sample is drawn.
        state.stop[state.hopeless_failures == 0] = 0
        active = state.stop < 0
        round_ = 0
        while active.any():
            tick = time.perf_counter()
            act = np.flatnonzero(active)
            step = self._round_sizes(round_, act, state, threshold, alpha_cs, prior_arrays, chosen, budget)
            preds = self.smooth.sample_predictions(
                x[act], step, indices=idx[act], stream=STREAM_SEQUENTIAL, start=state.drawn[act]
            )
            for rows in _chunks(len(act), preds.shape[1] * width):
                self._advance(
                    act[rows],
                    preds[rows],
                    step[rows],
                    state,
                    chosen,
                    per_class,
                    threshold,
                    alpha_cs,
                    prior_arrays,
                    cap,
                    budget,
                    give_up,
                    baseline,
                )
            active[act[state.stop[act] >= 0]] = False
            seconds[act] += (time.perf_counter() - tick) * step / max(step.sum(), 1)
            round_ += 1

        # Where the target test fired, every q <= p0 is outside the sequence: L* >= p0 exactly, even
        # where the root of the lower end was rounded below it.
        lower = np.where(state.certified, np.maximum(state.lower, threshold[:, None]), state.lower)
        # Per class: the class whose lower end is highest; otherwise the class given or drawn from the pilot.
        chosen = lower.argmax(axis=1) if per_class else cast(np.ndarray, chosen)
        p_lower = lower.max(axis=1)
        radii = np.atleast_1d(stats.radius(p_lower, sigma, slack=slack))
        n_samples = pilot + state.drawn
        stop_time = pilot + state.stop
        out = []
        for i in range(num):
            if radii[i] > 0:
                out.append(
                    Certificate(
                        int(chosen[i]),
                        float(radii[i]),
                        "eprocess",
                        int(n_samples[i]),
                        float(p_lower[i]),
                        float(seconds[i]),
                        stop_time=int(stop_time[i]),
                    )
                )
            else:
                out.append(abstention(int(n_samples[i]), float(p_lower[i]), float(seconds[i]), int(stop_time[i])))
        return out

    # ------------------------------------------------------------------ one round
    def _round_sizes(self, round_, act, state, threshold, alpha_cs, prior, chosen, budget) -> np.ndarray:
        """Samples each active input draws this round (>= 1, within the budget)."""
        drawn = state.drawn[act]
        remaining = budget - drawn
        if not isinstance(self.schedule, GeometricSchedule):
            return np.minimum(self.schedule[min(round_, len(self.schedule) - 1)], remaining)
        step = self.schedule.sizes(drawn)
        thr = threshold[act]
        on_track = ~np.isnan(thr) & (drawn > 0) & (state.successes[act].max(axis=1) > thr * np.maximum(drawn, 1))
        if self.schedule.predict and np.any(on_track):
            rows = act[on_track]
            jump = self._optimistic_stop(rows, state, threshold, alpha_cs, prior, budget)
            usual = step[on_track]
            # The predicted stop, but never under a quarter of the usual round (rounds stay few) and
            # never more than doubling what was drawn (a failure makes the prediction too early).
            step[on_track] = np.clip(jump, np.maximum(usual // 4, 1), np.maximum(usual, drawn[on_track]))
        return np.minimum(step, remaining)

    def _hopeless_failures(self, threshold, alpha_cs, prior, budget) -> np.ndarray:
        """Per target input, the fewest failures ``f*`` after which the test cannot fire within the budget.

        With ``f`` failures the best a run can still reach is ``budget - f`` successes at the budget;
        ``f*`` is the smallest ``f`` where ``threshold_test(budget - f, budget)`` does not fire
        (bisection: fewer successes never give more evidence for ``p >= p0``). A stopping rule only.
        ``budget + 1`` (never) for best-radius inputs; 0 means the target is out of the budget's reach.
        """
        num = len(threshold)
        out = np.full(num, budget + 1, dtype=np.int64)
        rows = np.flatnonzero(~np.isnan(threshold))
        if rows.size == 0:
            return out
        p_rows = tuple(v[rows] for v in prior)

        def fires(failures):
            m = self.log_marginal(budget - failures, float(budget), p_rows)
            return stats.threshold_test(budget - failures, budget, threshold[rows], alpha_cs[rows], m) == 1

        lo = np.full(rows.size, -1, dtype=np.int64)  # fires with lo failures (-1: sentinel)
        hi = np.full(rows.size, budget + 1, dtype=np.int64)  # does not fire with hi failures
        hi = np.where(fires(np.zeros(rows.size)), hi, 0)
        lo = np.where(hi == 0, -1, 0)
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            f_mid = np.minimum(mid, budget).astype(float)
            ok = fires(f_mid)
            open_ = hi - lo > 1
            lo = np.where(open_ & ok, mid, lo)
            hi = np.where(open_ & ~ok, mid, hi)
        out[rows] = hi
        return out

    def _optimistic_stop(self, rows, state, threshold, alpha_cs, prior, budget) -> np.ndarray:
        """Fewest further samples after which the target test could fire (all of them agreeing).

        Bisection on ``j`` of ``threshold_test(s + j, t + j)`` for the leading class; ``budget - t``
        where even the budget would not do.
        """
        s = state.successes[rows].max(axis=1)
        t = state.drawn[rows].astype(float)
        p_rows = tuple(v[rows] for v in prior)
        lo = np.zeros(len(rows), dtype=np.int64)  # fires at lo: no
        hi = (budget - state.drawn[rows]).astype(np.int64)  # fires at hi, or the budget
        for _ in range(int(np.ceil(np.log2(max(budget, 2)))) + 1):
            mid = (lo + hi + 1) // 2
            open_ = hi - lo > 1
            if not np.any(open_):
                break
            m = self.log_marginal(s + mid, t + mid, p_rows)
            fires = stats.threshold_test(s + mid, t + mid, threshold[rows], alpha_cs[rows], m) == 1
            hi = np.where(open_ & fires, mid, hi)
            lo = np.where(open_ & ~fires, mid, lo)
        return np.maximum(hi, 1)

    def _advance(
        self,
        rows,
        preds,
        step,
        state,
        chosen,
        per_class,
        threshold,
        alpha_cs,
        prior,
        cap,
        budget,
        give_up_prior=None,
        baseline=None,
    ):
        """Fold one round's per-sample outcomes of ``rows`` into the state; fire the stopping rule."""
        n_rows, width_b = preds.shape
        if per_class:
            hits = preds[:, :, None] == np.arange(self.smooth.num_classes)[None, None, :]
        else:
            hits = (preds == chosen[rows][:, None])[:, :, None]
        valid = np.arange(width_b)[None, :] < step[:, None]
        hits &= valid[:, :, None]
        s = state.successes[rows][:, None, :] + np.cumsum(hits, axis=1)  # rows x B x W
        t = (state.drawn[rows][:, None] + np.minimum(np.arange(1, width_b + 1)[None, :], step[:, None])).astype(float)
        t3 = t[:, :, None]
        p3 = tuple(v[rows][:, None, None, :] for v in prior)
        a3 = alpha_cs[rows][:, None, None]
        m = self.log_marginal(s, t3, p3)
        lo, up = self.confidence_sequence(s, t3, a3, m)
        lo, up = np.broadcast_to(lo, s.shape), np.broadcast_to(up, s.shape)
        lower, upper = stats.cumulative_intersection(lo, up, state.lower[rows], state.upper[rows], axis=1)
        best_lower = lower.max(axis=2)
        best_upper = upper.max(axis=2)

        thr = threshold[rows]
        has_target = ~np.isnan(thr)
        fire = t >= budget  # the budget
        certified = np.zeros(s.shape, dtype=bool)
        if np.any(has_target):
            tr = np.flatnonzero(has_target)
            thr3 = thr[tr][:, None, None]
            decision = stats.threshold_test(s[tr], t3[tr], thr3, a3[tr], m[tr])
            certified[tr] = np.logical_or.accumulate(decision == 1, axis=1) | state.certified[rows[tr]][:, None, :]
            down = None
            if give_up_prior is not None:
                prior_down, alpha_down = give_up_prior
                down = (tuple(v[rows[tr]][:, None, None, :] for v in prior_down), alpha_down[rows[tr]][:, None, None])
            ruled_out = self._gives_up(s[tr], t3[tr], thr3, a3[tr], decision, upper[tr], down)
            # Even if every sample agreed until the budget, the test could not fire: give up now.
            hopeless = (t3[tr] - s[tr]) >= state.hopeless_failures[rows[tr]][:, None, None]
            fire[tr] |= certified[tr].any(axis=2) | (ruled_out | hopeless).all(axis=2)
        best = ~has_target
        if np.any(best):
            br = np.flatnonzero(best)
            # Gains count above what the caller already holds (the baseline, a probability; 0 for none).
            base = np.zeros(len(br)) if baseline is None else baseline[rows[br]]
            r_lower = stats.radius(np.maximum(best_lower[br], base[:, None]), self.smooth.sigma, slack=state.slack)
            reach = np.minimum(best_upper[br], np.minimum(cap[rows[br]], self._interest_p())[:, None])
            gap = stats.radius(reach, self.smooth.sigma, slack=state.slack) - r_lower
            fire[br] |= gap <= self.tolerance
            if self.price is not None:
                fire[br] |= ~self._worth_more(
                    s[br], t3[br], np.maximum(lower[br], base[:, None, None]), a3[br], tuple(v[br] for v in p3), budget
                )

        fire &= valid
        fired = fire.any(axis=1)
        first = np.where(fired, fire.argmax(axis=1), -1)
        last = step - 1
        state.successes[rows] = s[np.arange(n_rows), last]
        state.drawn[rows] += step
        state.lower[rows] = lower[np.arange(n_rows), last]
        state.upper[rows] = upper[np.arange(n_rows), last]
        at_stop = np.where(fired, first, last)
        state.certified[rows] = certified[np.arange(n_rows), at_stop]
        state.stop[rows] = np.where(fired, state.drawn[rows] - step + first + 1, -1)

    def _interest_p(self) -> float:
        """``Phi(radius_of_interest / sigma)``: the bound on ``p`` past which no radius counts (1 without one)."""
        if self.radius_of_interest is None:
            return 1.0
        return float(stats.p_threshold(self.radius_of_interest, self.smooth.sigma))

    def _gives_up(self, s, t, p0, alpha, decision, upper, give_up) -> np.ndarray:
        """Where a target-radius input gives up, at each index (``GIVE_UPS``); accumulated along the samples.

        ``dedicated``: the one-sided test of ``p < p0`` (``stats.give_up_test``) with its own prior
        ``give_up[0]`` at its level ``give_up[1]`` (default the input's ``alpha``: under ``p >= p0`` it
        fires with at most that probability). ``mixture``: the certifying mixture shows ``p < p0``
        (``decision == -1``) or its upper end lies below ``p0``.
        """
        if self.give_up == "dedicated" and give_up is not None:
            prior, level = give_up
            # Its own evidence, not the certifying test's seam (log_marginal): the give-up test is a stopping
            # rule and has a test of its own (tests/test_give_up_test_soundness.py).
            fires = stats.give_up_test(s, t, p0, level, stats.beta_mixture_log_marginal(s, t, *prior))
            return np.logical_or.accumulate(np.asarray(fires, dtype=bool), axis=1)
        return np.logical_or.accumulate(decision == -1, axis=1) | (upper < p0)

    def _worth_more(self, s, t, lower, alpha, prior, budget) -> np.ndarray:
        """The priced rule at every index: True where some look-ahead is worth its price.

        Horizons are weighed shortest first, each only where no shorter one was worth it.
        """
        shape = s.shape  # rows x B x W
        t = np.broadcast_to(t, shape)
        horizons = stats.priced_horizons(t.astype(np.int64), budget)  # rows x B x W x H
        row_of = np.broadcast_to(np.arange(shape[0])[:, None, None], shape).ravel()
        prior_rows = tuple(v.reshape(shape[0], -1) for v in prior)
        alpha_rows = alpha.reshape(-1)
        flat_s, flat_t, flat_lower = s.ravel(), t.ravel(), lower.ravel()
        worth = np.zeros(s.size, dtype=bool)
        previous = np.zeros(s.size, dtype=np.int64)
        for h in range(horizons.shape[-1]):
            ahead = horizons[..., h].ravel()
            cells = np.flatnonzero(~worth & (ahead > previous))
            previous = ahead
            if cells.size == 0:
                continue
            r = row_of[cells]
            # stats.expected_radius_gain, through the same seams as the certificate's bound.
            s_ahead, t_ahead = stats.lookahead_counts(flat_s[cells], flat_t[cells], ahead[cells])
            m = self.log_marginal(s_ahead, t_ahead, tuple(v[r] for v in prior_rows))
            lower_ahead, _ = self.confidence_sequence(s_ahead, t_ahead, alpha_rows[r], m)
            # Radii above the radius of interest are worth nothing (no cap: _interest_p() is 1).
            lower_ahead = np.minimum(lower_ahead, self._interest_p())
            gain = stats.radius_gain(flat_lower[cells], lower_ahead, self.smooth.sigma)
            worth[cells] = stats.priced_continue(gain[:, None], ahead[cells][:, None], cast(float, self.price))
        return worth.reshape(shape).any(axis=2)


def _chunks(rows: int, cells_per_row: int):
    """Slices of at most ``_CHUNK_ELEMENTS`` cells (whole rows) covering ``range(rows)``."""
    per = max(1, _CHUNK_ELEMENTS // max(cells_per_row, 1))
    for lo in range(0, rows, per):
        yield slice(lo, min(lo + per, rows))
