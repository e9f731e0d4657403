"""Watching a deployed one-pass certifier: a drift monitor and a random audit of its certificates.

A one-pass certificate ``R^ = R~ - q^`` is wrong with probability at most ``epsilon + alpha_mc``
only while the queries are exchangeable with the calibration images. Nothing in a single query
shows when that stops; these two watchers do, each with a false-alarm probability fixed in advance
that holds over an unbounded stream.

``DriftMonitor`` (no base-model call) tests the null hypothesis

    H0: the calibration images followed by the deployment queries, in arrival order, are exchangeable,

which is what the certificate's guarantee rests on, through what the surrogate sees of an image:
its class ``A`` and probability ``p~`` (the reference sample stored in calibration.json). For each
query it computes two smoothed conformal p-values against *all earlier observations* (the
calibration reference followed by the stream so far): ``q`` ranks the class (a class that stops
coming or floods in moves ``q``) and ``r`` ranks ``p~`` among earlier observations of the same class
(blur, noise or any shift that changes the surrogate's confidence moves ``r``). Under H0 the pairs
``(q_n, r_n)`` are independent and uniform on the unit square (Vovk et al.'s theorem for conformal
p-values; ``r`` is a Mondrian p-value within the class ``q`` has fixed), so a product of betting
densities chosen before each query (``stats.drift_bets``, mixed by ``stats.fixed_share_update``)
is a test martingale and by Ville's inequality ``P(the monitor ever alarms) <= delta``.

Comparing each query with the fixed calibration set alone would not do: those p-values share the
calibration set, so they are not independent, and a betting martingale learns the calibration
set's sampling error and climbs on a long exchangeable stream (``tests/test_drift_monitor.py``
shows it). What H0 needs in practice: the reference must be the calibration images themselves
(the ones ``q^`` was computed on, through the same surrogate), and they must be a random sample of
the population the queries come from (the ``cal`` split of a dataset is a random half of the
source the ``test`` split comes from); the queries must come in an order unrelated to their
content; repeated queries of one image are not exchangeable with distinct calibration images and
may raise the alarm. A shift invisible to ``(A, p~)`` (the base model changes while the surrogate
does not) is not seen: that is what the audit is for.

``CertificateAudit`` re-checks a random subset of the queries with ``n_audit = n_cal`` Monte Carlo
samples of the base model and tracks the rate of ``R^ > y_audit`` with an anytime-valid confidence
sequence (see its docstring for the threshold).

MAPIE (``mapie.exchangeability_testing``) is used where it fits and not where it does not:
``OnlineMartingaleTest`` computes the same smoothed p-value and its jumper martingale is the
three-expert case of ``stats.fixed_share_update`` (the tests check both against MAPIE), but it
scores labelled ``(X, y)`` through a MAPIE estimator (our queries are unlabelled and the score is
the surrogate's output), recomputes each p-value over a Python list of the whole history (``O(t)``
per query, ``O(T^2)`` for a stream; 10^5 queries take minutes), and its three linear experts only
see a shift of the mean p-value, so a class removed from the middle of the class ranking would
never be detected. ``RiskMonitoring`` has the audit's shape (a threshold and a time-uniform lower
bound) but takes its threshold from a Hoeffding bound on reference data plus a tolerance and
recomputes an empirical-Bernstein bound over the whole history on every update; the audit's
threshold comes from the conformal calibration's own law and its outcomes are Bernoulli at rates
near ``epsilon``, where the Beta-binomial mixture of ``stats.beta_binomial_cs`` (the exact
likelihood) is much tighter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calibration.conformal import MONITOR_STATISTIC, ReferencePlan, quantile_rank

from ..core import stats
from ..core.errors import CalibrationError, InvalidInputError, InvalidParameterError, check_probability
from ..core.one_pass import group_keys
from ..core.smoothing import STREAM_AUDIT, SmoothedClassifier, check_same_noise, noise_indices

__all__ = [
    "DriftMonitor",
    "CertificateAudit",
    "AuditPlan",
    "audit_plan",
    "DEFAULT_DELTA",
    "MIX_EVERY",
    "drift_prior",
    "drift_jump",
]

DEFAULT_DELTA = 0.01
"""Default probability of a false alarm over the whole (unbounded) stream, for each watcher."""

MIX_EVERY = 16
"""Queries between two redistributions of the drift martingale's wealth among its experts."""


def drift_jump(event: int) -> float:
    """Share of wealth redistributed at mixing event ``k``: ``1 / (k + 2)``.

    Decreasing, so the wealth lost to the experts while the null holds grows like ``log`` of the
    stream length, not linearly: a change after 10^4 quiet queries is found almost as fast as one
    after 100. Fixed in advance (it depends on the query count only), so validity is untouched.
    """
    return 1.0 / (event + 2)


def drift_prior(num_bins: int) -> np.ndarray:
    """Mixing weights of ``stats.drift_bets``'s experts: 1/2 no bet, 1/4 the confidence bets, 1/4 the class bets.

    Parameters
    ----------
    num_bins : int
        The wider windows of the class p-value are ``1 / num_bins`` wide (>= 2).

    Returns
    -------
    numpy.ndarray
        ``4 + 8 num_bins`` weights summing to 1.
    """
    class_bets = 8 * int(num_bins) - 3
    return np.concatenate([[0.5], np.full(6, 0.25 / 6), np.full(class_bets, 0.25 / class_bets)])


def _as_classes(values, num_classes: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (
        arr.size
        and (
            not np.all(np.isfinite(arr.astype(float)))
            or np.any(arr != np.round(arr))
            or arr.min() < 0
            or arr.max() >= num_classes
        )
    ):
        raise InvalidInputError(f"{what} must be one class in 0..{num_classes - 1} per query")
    return arr.astype(np.int64)


def _as_probabilities(values, size: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.shape != (size,) or np.any(~np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise InvalidInputError(f"{what} must be one probability in [0, 1] per query")
    return arr


class DriftMonitor:
    """Conformal test martingale over the surrogate's class and ``p~``: alarms when queries stop being exchangeable
    with the calibration images (see the module docstring for the null hypothesis and why it is valid).

    ``update(classes, p_tilde)`` takes the surrogate's outputs for the next queries, in arrival
    order, and returns the log martingale after each. ``alarm`` turns true (and stays so) the first
    time the martingale reaches ``1 / delta``; ``alarm_at`` is that query's index (0-based, counted
    over every query given to ``update``). If H0 holds, the probability that the alarm is ever
    raised, over an unbounded stream, is at most ``delta``.

    Memory grows by two floats per query (the query's ``p~`` in the history the next p-values are
    ranked against, and the martingale path when ``keep_path``); ranks cost ``O(log t)`` per query.

    Parameters
    ----------
    reference_classes : array_like of int
        The surrogate's class of each calibration image.
    reference_p_tilde : array_like of float
        The surrogate's probability of that class, per calibration image.
    num_classes : int
        Number of classes ``K``.
    delta : float, optional
        False-alarm probability over the whole stream, in (0, 1).
    seed : int, optional
        Seed of the tie-breaking uniforms (independent of the data, as the p-values require).
    num_bins : int, optional
        Bins of the class p-value's bets; default ``K`` clipped to [2, 32].
    keep_path : bool, optional
        Keep the log martingale after every query (``path``), for the report.

    Raises
    ------
    InvalidParameterError
        If ``delta`` is outside (0, 1) or ``num_bins < 2``.
    InvalidInputError
        If the reference is empty, or its classes or probabilities are invalid.
    """

    def __init__(
        self,
        reference_classes,
        reference_p_tilde,
        num_classes: int,
        *,
        delta: float = DEFAULT_DELTA,
        seed: int = 0,
        num_bins: int | None = None,
        keep_path: bool = True,
    ):
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise InvalidParameterError(f"num_classes must be >= 2, got {num_classes}")
        self.delta = check_probability("delta", delta)
        classes = _as_classes(reference_classes, self.num_classes, "reference classes")
        p_tilde = _as_probabilities(reference_p_tilde, len(classes), "reference p_tilde")
        if len(classes) == 0:
            raise InvalidInputError("the drift monitor needs a non-empty reference sample (the calibration images)")
        self.num_bins = int(num_bins) if num_bins is not None else int(np.clip(self.num_classes, 2, 32))
        if self.num_bins < 2:
            raise InvalidParameterError(f"num_bins must be >= 2, got {num_bins}")
        self.seed = int(seed)
        self.keep_path = bool(keep_path)
        self.reference_size = int(len(classes))
        # Nonconformity within a class is -p~ (a query less confident than usual gets a small r);
        # one ascending array per class holds every earlier observation's score.
        self._history = [np.sort(-p_tilde[classes == c]) for c in range(self.num_classes)]
        self._counts = np.array([len(h) for h in self._history], dtype=np.int64)
        self._prior = drift_prior(self.num_bins)
        self._log_weights = np.log(self._prior)
        self._rng = np.random.default_rng(self.seed)
        self.queries = 0
        self.log_martingale = 0.0
        self.max_log_martingale = 0.0
        self.alarm_at: int | None = None
        self._path: list[np.ndarray] = []

    @classmethod
    def from_calibration(cls, calibration, **options) -> DriftMonitor:
        """The monitor whose reference is the calibration's stored sample (``Calibration.monitor_reference``).

        Parameters
        ----------
        calibration : Calibration
            A calibration written by ``calibrate`` of this version (it stores the surrogate's class
            and ``p~`` of every calibration image).
        **options
            ``delta``, ``seed``, ``num_bins``, ``keep_path`` as in the class.

        Returns
        -------
        DriftMonitor

        Raises
        ------
        CalibrationError
            If the calibration has no reference sample (written before the monitor existed) or one
            of another kind or size.
        """
        ref = getattr(calibration, "monitor_reference", None)
        if not ref:
            raise CalibrationError(
                "this calibration has no drift-monitor reference (it was written before the monitor existed); "
                "re-run `surrogate-cert calibrate` to store one"
            )
        if ref.get("statistic") != MONITOR_STATISTIC:
            raise CalibrationError(
                f"the calibration's monitor reference is of kind {ref.get('statistic')!r}, this "
                f"version reads {MONITOR_STATISTIC!r}; re-run `surrogate-cert calibrate`"
            )
        predicted, p_tilde = ref.get("predicted") or [], ref.get("p_tilde") or []
        if len(predicted) != calibration.calibration_size or len(p_tilde) != len(predicted):
            raise CalibrationError(
                "the calibration's monitor reference does not hold one entry per calibration "
                "image; re-run `surrogate-cert calibrate`"
            )
        try:
            return cls(predicted, p_tilde, calibration.num_classes, **options)
        except InvalidInputError as exc:
            raise CalibrationError(
                f"the calibration's monitor reference is invalid ({exc}); re-run `surrogate-cert calibrate`"
            ) from None

    @property
    def options(self) -> dict:
        """The settings a fresh monitor for a new calibration takes over (``from_calibration(cal, **options)``)."""
        return dict(delta=self.delta, seed=self.seed, num_bins=self.num_bins, keep_path=self.keep_path)

    @property
    def threshold(self) -> float:
        """``log(1 / delta)``: the alarm level of the log martingale."""
        return -math.log(self.delta)

    @property
    def alarm(self) -> bool:
        """True once the martingale has reached ``1 / delta`` (it stays true)."""
        return self.alarm_at is not None

    @property
    def path(self) -> np.ndarray:
        """The log martingale after each query (empty unless ``keep_path``)."""
        return np.concatenate(self._path) if self._path else np.zeros(0)

    def p_values(self, classes, p_tilde) -> tuple[np.ndarray, np.ndarray]:
        """The pairs ``(q, r)`` of the next queries, and the queries added to the history (no betting).

        Parameters
        ----------
        classes : array_like of int
            The surrogate's class of each query, in arrival order.
        p_tilde : array_like of float
            The surrogate's probability of that class.

        Returns
        -------
        q, r : numpy.ndarray
            Class and within-class p-values, one per query (``update`` bets on them).
        """
        classes = _as_classes(classes, self.num_classes, "classes")
        p_tilde = _as_probabilities(p_tilde, len(classes), "p_tilde")
        b = len(classes)
        u = 1.0 - self._rng.random((b, 2))  # in (0, 1]: a p-value of exactly 0 would zero a power bet
        rows = np.arange(b)
        first = np.zeros((b, self.num_classes), dtype=np.int64)
        first[rows, classes] = 1
        before = self._counts[None, :] + np.cumsum(first, axis=0) - first  # class counts of all earlier observations
        n_past = before.sum(axis=1)
        at_most = np.cumsum(before, axis=1)[rows, classes]
        q = np.asarray(stats.smoothed_p_value(n_past - at_most, before[rows, classes], n_past, u[:, 0]), dtype=float)
        q = q.reshape(-1)
        r = np.empty(b)
        for c in np.unique(classes):
            mine = np.flatnonzero(classes == c)
            scores = -p_tilde[mine]
            r[mine] = stats.online_p_values(self._history[c], scores, u[mine, 1])
            new = np.sort(scores)
            self._history[c] = np.insert(self._history[c], np.searchsorted(self._history[c], new), new)
        self._counts += first.sum(axis=0)
        return q, r

    def update(self, classes, p_tilde) -> np.ndarray:
        """Feed the next queries (in arrival order); returns the log martingale after each.

        Parameters
        ----------
        classes : array_like of int
            The surrogate's class of each query.
        p_tilde : array_like of float
            The surrogate's probability of that class.

        Returns
        -------
        numpy.ndarray
            ``log M_n`` after each query of the batch.

        Raises
        ------
        InvalidInputError
            If a class is outside ``0..K-1``, or a probability is not finite in [0, 1], or the two
            arrays differ in length.
        """
        q, r = self.p_values(classes, p_tilde)
        if q.size == 0:
            return np.zeros(0)
        log_f = stats.drift_bets(q, r, self.num_bins, log=True)
        growth, self._log_weights = stats.fixed_share_update(
            log_f, self._log_weights, self._prior, drift_jump, start=self.queries, mix_every=MIX_EVERY
        )
        path = self.log_martingale + growth
        if self.alarm_at is None:
            crossed = np.flatnonzero(path >= self.threshold)
            if crossed.size:
                self.alarm_at = self.queries + int(crossed[0])
        self.queries += len(path)
        self.log_martingale = float(path[-1])
        self.max_log_martingale = max(self.max_log_martingale, float(path.max()))
        if self.keep_path:
            self._path.append(path)
        return path

    def summary(self, path: bool = False) -> dict:
        """The monitor's state as plain JSON values (``path=True`` adds the log martingale after every query)."""
        out = dict(
            statistic=MONITOR_STATISTIC,
            reference_size=self.reference_size,
            queries=self.queries,
            delta=self.delta,
            log_threshold=self.threshold,
            log_martingale=self.log_martingale,
            max_log_martingale=self.max_log_martingale,
            alarm=self.alarm,
            alarm_at=self.alarm_at,
            num_bins=self.num_bins,
            mix_every=MIX_EVERY,
            seed=self.seed,
        )
        if path:
            out["path"] = [round(float(v), 6) for v in self.path]
        return out


# --------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class AuditPlan:
    """What an audit of a calibration tests: the rate ``threshold`` its audited exceedance rate may not pass.

    Attributes
    ----------
    threshold : float
        Rate of ``R^ > y_audit`` the calibration guarantees (with the probability below).
    delta_sequence : float
        Level of the confidence sequence on the audited rate.
    false_alarm_bound : float
        Probability of a false alarm over the calibration draw and the whole stream.
    groups : frozenset of str or None
        Mondrian groups audited (those with their own offset); None = every query.
    population : {"all", "issued"}
        Whose outcomes the rate is over: every selected query (marginal and PAC calibrations), or the
        selected queries the surrogate certifies (the issued guarantee).
    """

    threshold: float
    delta_sequence: float
    false_alarm_bound: float
    groups: frozenset | None
    population: str = "all"


def audit_plan(calibration, delta: float = DEFAULT_DELTA) -> AuditPlan:
    """The audit's threshold for ``calibration``, at total false-alarm probability ``delta``.

    Conformal calibrations (marginal or PAC): the rate at which a new exchangeable query gets
    ``R^ > y`` is, given the calibration set, at most a ``Beta(m + 1 - k, k)`` variable (``k`` the
    offset's rank); the threshold is its upper ``delta / 2`` quantile (``stats.audit_threshold``) and
    the confidence sequence gets the other ``delta / 2``. With Mondrian groups, each group with its
    own offset gets ``delta / 2`` split equally, the threshold is the largest group's quantile, and
    queries of groups on the pooled offset are not audited (no per-group statement covers them).
    Learn-then-Test calibrations (the ``issued`` guarantee) state ``rate <= epsilon`` *among certified
    queries* with probability ``1 - calibration.delta`` per group: the audited population is the selected
    queries the surrogate certifies, the threshold is ``epsilon``, the sequence gets all of ``delta``, and
    the bound adds ``calibration.delta`` per group.

    Parameters
    ----------
    calibration : Calibration
        The calibration audited.
    delta : float, optional
        Total false-alarm probability (conformal calibrations), in (0, 1).

    Returns
    -------
    AuditPlan
    """
    delta = check_probability("delta", delta)
    eps = calibration.epsilon
    fallback = set(calibration.fallback_groups or [])
    own = {g: int(n) for g, n in (calibration.group_sizes or {}).items() if g not in fallback and int(n) > 0}
    grouped = calibration.groups != "none" and bool(own)
    groups = frozenset(own) if grouped else None
    if calibration.method == "ltt":
        count = len(own) if grouped else 1
        return AuditPlan(float(eps), delta, delta + count * float(calibration.delta or 0.0), groups, "issued")
    half = delta / 2
    sizes = own if grouped else {"all": int(calibration.calibration_size)}
    per_group = half / len(sizes)
    threshold = max(
        stats.audit_threshold(m, quantile_rank(m, eps, calibration.guarantee, calibration.delta), per_group)
        for m in sizes.values()
    )
    return AuditPlan(float(threshold), half, delta, groups)


class CertificateAudit:
    """Random audit of one-pass certificates: re-checks a share of the queries with ``n_audit`` base-model samples.

    Each query is selected with probability ``rate``, by a generator of its own, before and
    independently of its certificate (its Mondrian group, where it matters, from the same
    ``core.one_pass.group_keys`` on the same tail-accurate ``z~`` as deployment). A selected query whose
    calibrated radius ``R^`` is positive (it receives a one-pass certificate) gets fresh noisy
    evaluations of the base model (noise stream ``STREAM_AUDIT``, shared with no other use) drawn by the
    calibration's own sample plan, and the reference radius ``y_audit`` of the surrogate's class made by
    the calibration's own rule (``calibration.conformal.ReferencePlan``: ``n_cal`` samples and
    Clopper-Pearson at ``alpha_mc``; for topped-up calibration counts, the same top-up stages, rule and
    anytime-valid bound); its outcome is ``R^ > y_audit``. A selected query with ``R^ <= 0`` cannot
    exceed (``y >= 0``): outcome 0, no evaluation. The audited rate is over all selected queries (or,
    for the issued guarantee, over the selected queries that are certified), the population the
    calibration's statement is about.

    Threshold (why not ``epsilon + alpha_mc``): with the calibration's sample plan and bound, an audited
    query's ``(R~, y_audit)`` is made exactly like a calibration point's
    ``(R~_i, y_i)``, so with exchangeable queries ``P(R^ > y_audit) <= epsilon`` with no ``alpha_mc``
    term (``alpha_mc`` bounds ``y`` against the *true* radius, which the audit never sees). But the
    audit measures the rate *given this calibration set*, a random rate with mean ``<= epsilon`` and
    a spread of about ``sqrt(epsilon / m)``: ``epsilon + alpha_mc`` would be crossed, on a long enough
    stream, by a large share of perfectly valid calibrations (a quarter of them at ``m = 5000``,
    ``epsilon = 0.01``, ``alpha_mc = 0.001``). The alarm therefore compares the lower end of the
    confidence sequence with ``audit_plan``'s threshold, the upper quantile of that rate's law;
    the false-alarm probability over the calibration draw and an unbounded stream of i.i.d.
    queries is at most ``plan.false_alarm_bound`` (``delta`` for conformal calibrations). Any
    other ``n_audit`` changes the reference radius's law (fewer samples give smaller ``y`` and a
    lower cap, so a correct calibration would fail), hence it is refused; so is a topped-up calibration
    that does not record its top-up stages (format version 3): a Clopper-Pearson reference on ``n_cal``
    samples tops out far below the topped-up cap (0.616 against 0.896 at ``n_cal = 1000``), and an audit
    of a correct calibration would alarm every time.

    Parameters
    ----------
    calibration : Calibration
        The calibration whose certificates are audited.
    smooth : SmoothedClassifier, optional
        The base model at the calibration's sigma; needed by ``audit`` when a query is sampled.
    rate : float
        Share of queries audited, in (0, 1].
    n_audit : int, optional
        Noisy samples per audited certificate; must equal ``calibration.n_cal`` (the default).
    delta : float, optional
        False-alarm probability (see ``audit_plan``), in (0, 1).
    seed : int, optional
        Seed of the selection.

    Raises
    ------
    InvalidParameterError
        If ``rate`` or ``delta`` is out of range, ``n_audit`` differs from ``n_cal``, or ``smooth``
        has another sigma than the calibration.
    CalibrationError
        If the calibration's reference radii cannot be rebuilt (``ReferencePlan.from_calibration``).
    """

    def __init__(
        self,
        calibration,
        smooth: SmoothedClassifier | None = None,
        *,
        rate: float,
        n_audit: int | None = None,
        delta: float = DEFAULT_DELTA,
        seed: int = 0,
    ):
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"audit rate must be a number in (0, 1], got {rate!r}") from None
        if not 0.0 < rate <= 1.0:
            raise InvalidParameterError(f"audit rate must lie in (0, 1], got {rate}; e.g. 0.01")
        n_cal = int(calibration.n_cal)
        n_audit = n_cal if n_audit is None else int(n_audit)
        if n_audit != n_cal:
            raise InvalidParameterError(
                f"n_audit must equal the calibration's n_cal = {n_cal} (got {n_audit}): only then is an audited "
                "reference radius made like the calibration's, so that a correct calibration passes the audit"
            )
        if smooth is not None and not math.isclose(float(smooth.sigma), float(calibration.sigma), rel_tol=1e-9):
            raise InvalidParameterError(
                f"the base model is smoothed at sigma={smooth.sigma} but the calibration is "
                f"for sigma={calibration.sigma}"
            )
        self.reference_plan = ReferencePlan.from_calibration(calibration)
        if smooth is not None:
            check_same_noise(
                smooth.noise_scheme,
                calibration.noise_scheme,
                "the audit's base model",
                "audit with the calibration's noise scheme",
            )
        self.calibration = calibration
        self.smooth = smooth
        self.rate = rate
        self.n_audit = n_audit
        self.delta = check_probability("delta", delta)
        self.seed = int(seed)
        self.plan = audit_plan(calibration, self.delta)
        self._rng = np.random.default_rng(self.seed)
        self.queries = 0
        self.audited = 0
        self.sampled = 0
        self.exceedances = 0
        self.evaluations = 0
        self.lower, self.upper = 0.0, 1.0
        self.alarm_at: int | None = None
        self.last_spent = np.zeros(0, dtype=np.int64)  # base-model evaluations per query of the last batch
        self._history: list[tuple[int, int, int, float, float]] = []

    @property
    def options(self) -> dict:
        """The settings a fresh audit for a new calibration takes over."""
        return dict(rate=self.rate, delta=self.delta, seed=self.seed)

    @property
    def threshold(self) -> float:
        return self.plan.threshold

    @property
    def alarm(self) -> bool:
        """True once the confidence sequence lies above the threshold (it stays true)."""
        return self.alarm_at is not None

    @property
    def rate_observed(self) -> float | None:
        return self.exceedances / self.audited if self.audited else None

    def select(self, classes, p_tilde, z=None) -> np.ndarray:
        """Which of the next queries are audited (random, drawn before any outcome is known).

        ``z`` is each query's ``z~`` (``Surrogate.predict_z``), binned as deployment bins it
        (``group_keys``); required for a confidence-grouped calibration.
        """
        classes = np.asarray(classes).reshape(-1)
        chosen = self._rng.random(len(classes)) < self.rate
        if self.plan.groups is not None and len(classes):
            if self.calibration.groups == "confidence" and z is None:
                raise InvalidParameterError(
                    "a confidence-grouped calibration bins queries by the surrogate's z~: pass "
                    "z (SurrogateCertifier.evaluate) to the audit"
                )
            keys = group_keys(classes, p_tilde, self.calibration.groups, self.calibration.bin_edges, z=z)
            chosen &= np.isin(keys.astype(str), list(self.plan.groups))
        return chosen

    def audit(
        self, x: torch.Tensor, classes, p_tilde, radius, indices: Sequence[int] | np.ndarray | None = None, *, z=None
    ) -> np.ndarray:
        """Select, sample and record the next queries (in arrival order); returns which were audited.

        Parameters
        ----------
        x : torch.Tensor
            The queries' images, ``N x C x H x W``.
        classes, p_tilde : array_like
            The surrogate's class and its probability, per query.
        radius : array_like of float
            The calibrated radius ``R^`` per query (input l2 units; <= 0 = no one-pass certificate).
        indices : sequence of int, optional
            Each query's noise name (default: the query's position in the stream).
        z : array_like of float, optional
            ``z~`` per query (``SurrogateCertifier.evaluate``); required for confidence groups.

        Returns
        -------
        numpy.ndarray
            Boolean mask of the audited queries.

        Raises
        ------
        InvalidParameterError
            If a query must be sampled and the audit has no base model, or ``z`` is missing for a
            confidence-grouped calibration.
        """
        radius = np.asarray(radius, dtype=float).reshape(-1)
        classes = np.asarray(classes).reshape(-1)
        n = len(radius)
        idx = noise_indices(indices, n) if indices is not None else self.queries + np.arange(n, dtype=np.int64)
        audited = self.select(classes, p_tilde, z)
        sample = np.flatnonzero(audited & (radius > 0))
        reference, drawn = np.zeros(0), None
        if sample.size:
            if self.smooth is None:
                raise InvalidParameterError("the audit needs the base model (--model) to re-check certificates")
            images = x[torch.as_tensor(sample)]

            def draw(rows, start, count):
                return self.smooth.counts(
                    images[torch.as_tensor(rows)], count, indices=idx[sample][rows], stream=STREAM_AUDIT, start=start
                )

            first, every, samples = self.reference_plan.collect(draw, sample.size)
            reference, drawn = self.reference_plan.reference(classes[sample], first, every, samples), samples
        self.record(audited, radius, reference=reference, samples=drawn)
        return audited

    def record(self, audited, radius, counts_top=None, *, reference=None, samples=None) -> None:
        """Record the outcomes of the next queries from numbers (``audit`` does the sampling).

        Parameters
        ----------
        audited : array_like of bool
            Which of the queries were selected.
        radius : array_like of float
            ``R^`` per query.
        counts_top : array_like of int, optional
            For each selected query with ``R^ > 0``, in order: the count of the surrogate's class
            among ``n_audit`` fresh noisy evaluations. Only for a calibration whose references are
            Clopper-Pearson on ``n_cal`` samples (no top-up); otherwise give ``reference``.
        reference : array_like of float, optional
            For each selected query with ``R^ > 0``, in order: its reference radius made by the
            calibration's plan (``ReferencePlan.collect`` and ``ReferencePlan.reference``).
        samples : array_like of int, optional
            Base-model evaluations each of those queries took (default ``n_audit``).

        Raises
        ------
        InvalidParameterError
            If neither or both of ``counts_top`` and ``reference`` are given, their length is not the
            number of selected queries with ``R^ > 0``, or ``counts_top`` is given for a topped-up
            calibration.
        """
        audited = np.asarray(audited, dtype=bool).reshape(-1)
        radius = np.asarray(radius, dtype=float).reshape(-1)
        sample = audited & (radius > 0)
        if (counts_top is None) == (reference is None):
            raise InvalidParameterError("give the audited queries' counts_top or their reference radii, one of the two")
        if counts_top is not None:
            if self.reference_plan.planned_max is not None:
                raise InvalidParameterError(
                    "this calibration's references were topped up: give the audit's reference "
                    "radii made by its ReferencePlan, not counts of n_cal samples"
                )
            counts_top = np.asarray(counts_top).reshape(-1)
            first = np.zeros((counts_top.size, 1), dtype=np.int64)
            first[:, 0] = counts_top
            reference = self.reference_plan.reference(
                np.zeros(counts_top.size, dtype=np.int64), first, first, np.full(counts_top.size, self.n_audit)
            )
        reference = np.atleast_1d(np.asarray(reference, dtype=float)).reshape(-1)
        if reference.size != int(sample.sum()):
            raise InvalidParameterError("give one count or reference radius per audited query with a positive radius")
        if self.plan.population == "issued":
            audited = sample  # the issued guarantee is about certified queries only
        exceeded = np.zeros(len(radius), dtype=bool)
        exceeded[sample] = radius[sample] > reference
        positions = np.flatnonzero(audited)
        outcomes = exceeded[positions]
        k = len(positions)
        if k:
            s = self.exceedances + np.cumsum(outcomes)
            t = self.audited + np.arange(1, k + 1)
            if self.alarm_at is None:
                hit = np.flatnonzero(
                    np.atleast_1d(stats.cs_lower_exceeds(s, t, self.threshold, self.plan.delta_sequence))
                )
                if hit.size:
                    self.alarm_at = self.queries + int(positions[hit[0]])
            # The bounds for the record: at most 64 times per batch (the alarm above checks every time).
            keep = np.unique(np.concatenate([np.linspace(0, k - 1, min(k, 64)).astype(np.int64), [k - 1]]))
            lower, upper = stats.beta_binomial_cs(s[keep], t[keep], self.plan.delta_sequence)
            lower = np.maximum.accumulate(np.maximum(np.atleast_1d(lower), self.lower))
            upper = np.minimum.accumulate(np.minimum(np.atleast_1d(upper), self.upper))
            for j, lo, hi in zip(keep, lower, upper):
                self._history.append((self.queries + int(positions[j]), int(t[j]), int(s[j]), float(lo), float(hi)))
            self.lower, self.upper = float(lower[-1]), float(upper[-1])
            self.exceedances = int(s[-1])
            self.audited = int(t[-1])
        spent = np.zeros(len(radius), dtype=np.int64)
        spent[sample] = self.n_audit if samples is None else np.asarray(samples, dtype=np.int64).reshape(-1)
        self.last_spent = spent
        self.sampled += int(sample.sum())
        self.evaluations += int(spent.sum())
        self.queries += len(radius)

    def summary(self, path: bool = False) -> dict:
        """The audit's state as plain JSON values (``path=True`` adds the bounds over time)."""
        out = dict(
            rate=self.rate,
            n_audit=self.n_audit,
            delta=self.delta,
            queries=self.queries,
            audited=self.audited,
            sampled=self.sampled,
            exceedances=self.exceedances,
            rate_observed=self.rate_observed,
            lower=self.lower,
            upper=self.upper,
            threshold=self.threshold,
            delta_sequence=self.plan.delta_sequence,
            false_alarm_bound=self.plan.false_alarm_bound,
            groups=None if self.plan.groups is None else sorted(self.plan.groups),
            epsilon=self.calibration.epsilon,
            alpha_mc=self.calibration.alpha_mc,
            alarm=self.alarm,
            alarm_at=self.alarm_at,
            base_model_evaluations=self.evaluations,
        )
        if path:
            out["path"] = [
                dict(query=q, audited=t, exceedances=s, lower=lo, upper=hi) for q, t, s, lo, hi in self._history
            ]
        return out
