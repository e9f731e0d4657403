"""Split-conformal calibration of the surrogate radius (DESIGN.md, "Surrogate, calibrated by ...").

The pieces, in MAPIE's vocabulary:

- **estimator**: ``SurrogateRadiusRegressor``, an sklearn regressor whose ``predict(X)`` is the
  surrogate radius ``R~ = min(sigma * Phi^{-1}(clip(p~)), r_max)`` of precomputed features
  ``X[:, 0] = p~`` (the surrogate's probability of its own class). It is "prefit": nothing is
  learned from the calibration set. ``r_max = sigma * Phi^{-1}(pL(n_cal of n_cal))`` is the largest
  reference radius the calibration counts can express (``radius_cap``): a radius no calibration
  point could ever confirm is not claimed, and without the cap the very confident inputs would get
  scores ``R~ - r_max > 0`` by construction and inflate ``q^`` for everyone. The cap is a fixed
  function of ``p~``, so the guarantee below is unchanged.
- **target**: the reference radius ``y_i = max(sigma * Phi^{-1}(pL_i), 0)``, where ``pL_i`` is the
  one-sided Clopper-Pearson lower bound at level ``alpha_mc`` on the count of the *surrogate's*
  class out of ``n_cal`` calibration samples (``reference_radius``).
- **conformity score**: ``R~_i - y_i`` (``conformity_scores``). MAPIE's
  ``AbsoluteConformityScore(sym=False)`` works with the signed ``y - y_pred``, the negative; its
  lower interval bound at ``confidence_level = 1 - 2 epsilon`` is ``R~ - q^``.
- **quantile rule**: ``q^`` = the ``k``-th smallest score with ``k = ceil((m + 1)(1 - epsilon))``
  (marginal, ``stats.conformal_rank``) or the PAC rank (``stats.pac_conformal_rank``); ``+inf`` if
  ``k > m``. The deployed radius is ``R^ = R~ - q^``; the surrogate certifies iff ``R^ > 0``.

Guarantees (calibration and test inputs exchangeable; the full statements with proofs are in
docs/guarantees.md). A certificate is *wrong* when ``R^ > 0`` and the class is not the smoothed
classifier's or ``R^`` exceeds its true radius. ``P(y > true radius) <= alpha_mc`` for each input
(Clopper-Pearson, valid because the class comes from the surrogate, not from the counts), and a
certificate with ``R^ <= y`` is correct unless ``y`` is, so wrong implies ``R^ > y`` or ``y > true``:

- ``marginal`` (default): ``P(R^ > y) <= epsilon``, so ``P(wrong) <= epsilon + alpha_mc``, the
  probability taken over the calibration draw *and* a random test input, whether or not it is
  certified. It is not a statement about the inputs that do get a certificate: among those the
  wrong rate is ``P(R^ > y) / P(R^ > 0)``, which may exceed ``epsilon`` (an audit of the statistics
  measured 0.064 among surrogate-routed inputs against 0.051 overall).
- ``pac``: with probability at least ``1 - delta`` over the calibration draw, ``P(R^ > y | calibration)
  <= epsilon`` (the Beta law of conformal coverage), same caveat.
- ``issued`` (``method="ltt"``, ``ltt_offset``): with probability at least ``1 - delta`` over the
  calibration draw, ``P(R^ > y | R^ > 0, calibration) <= epsilon``. Certifying depends on the input
  only and ``y``'s error on the counts only, so ``P(y > true | R^ > 0) <= alpha_mc`` too, and
  ``P(wrong | certified) <= epsilon + alpha_mc``: the statement a holder of a certificate wants.
- Mondrian ``groups``: each statement within each group with ``min_group_size`` points or more.
  A smaller group (``fallback_groups``) has no valid offset and is never certified by the surrogate
  (offset ``+inf``; the hybrid's sequential fallback answers it). Routing is chosen over merging small
  groups into their neighbours: a merge decided from the calibration points' group sizes is itself a
  function of the calibration data (no longer a fixed partition), and the fallback is valid per input.
- Required-radius thresholds: each statement holds for an ``r*`` fixed before the input is seen
  (``core.one_pass.check_required_radius``), not for one chosen from the surrogate's output.

``q^`` is the exact order statistic of the scores (``mapie_offset`` cross-checks MAPIE's value), so
ties at ``q^`` never count as over it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from mapie.conformity_scores import AbsoluteConformityScore
from mapie.metrics.regression import regression_coverage_score
from mapie.regression import SplitConformalRegressor
from mapie.risk_control import (
    BinaryClassificationController,
    BinaryRisk,
    FWERBonferroniHolm,
    FWERProcedure,
    control_fwer,
)
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from sklearn.base import BaseEstimator, RegressorMixin

from data_gen.datasets import dataset_key
from data_gen.store import CountsMismatchError, check_counts_for, read_counts
from surrogate_cert.core import __version__, stats
from surrogate_cert.core.errors import (
    CalibrationError,
    InvalidParameterError,
    check_count,
    check_positive,
    check_probability,
)
from surrogate_cert.core.hashing import image_hashes, sha256_file, unpack_hashes
from surrogate_cert.core.one_pass import (
    DEFAULT_CONFIDENCE_EDGES,
    GROUPINGS,
    SCORES,
    all_group_keys,
    deployed_radius,
    group_keys,
)
from surrogate_cert.core.smoothing import NOISE_SCHEME_V2, noise_slack
from surrogate_cert.core.stats import P_CLIP, conformity_scores, reference_radius, surrogate_radius
from surrogate_cert.core.surrogate import Surrogate

from .artifact import GUARANTEES, METHODS, Calibration, expected_radius_cap

CONFIDENCE_EDGES = DEFAULT_CONFIDENCE_EDGES
"""Deprecated name of ``surrogate_cert.core.one_pass.DEFAULT_CONFIDENCE_EDGES``."""

LTT_GRID_SIGMAS = np.linspace(-1.0, 5.0, 121)
"""Candidate offsets of ``method="ltt"``, in units of sigma (fixed before seeing calibration data)."""

radius_cap = stats.max_radius
"""``r_max = radius_cap(n_cal, alpha_mc, sigma)``: the reference radius of a calibration point whose
``n_cal`` samples all agree (``stats.max_radius``)."""


# --------------------------------------------------------------------------- estimator


class SurrogateRadiusRegressor(RegressorMixin, BaseEstimator):
    """sklearn-style regressor exposing the surrogate radius to MAPIE.

    ``X`` holds precomputed surrogate outputs: column 0 is ``p~``, the surrogate's probability of
    its predicted class; column 1, when present, a per-input shift ``t_b`` fixed before calibration
    (the ``shifted`` score). ``predict(X)`` is ``surrogate_radius(X[:, 0], sigma, radius_cap) - X[:, 1]``.
    ``fit`` learns nothing (the surrogate was trained elsewhere); it only marks the estimator fitted,
    as MAPIE's ``prefit=True`` requires.

    Parameters
    ----------
    sigma : float, optional
        Noise level (l2, input units); default 0.25.
    radius_cap : float, optional
        ``r_max``: predicted radii are clipped to it (input l2 units); default ``inf`` (no cap).
    """

    def __init__(self, sigma: float = 0.25, radius_cap: float = np.inf):
        self.sigma = sigma
        self.radius_cap = radius_cap

    def fit(self, X, y=None) -> SurrogateRadiusRegressor:
        X = np.asarray(X, dtype=float)
        self.n_features_in_ = 1 if X.ndim == 1 else X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        p_tilde = X if X.ndim == 1 else X[:, 0]
        radius = np.asarray(surrogate_radius(p_tilde, self.sigma, self.radius_cap), dtype=float)
        return radius - X[:, 1] if X.ndim == 2 and X.shape[1] > 1 else radius


def quantile_rank(m: int, epsilon: float, guarantee: str = "marginal", delta: float | None = None) -> int:
    """1-based rank of ``q^`` among ``m`` sorted scores; ``m + 1`` (or more) means ``q^ = +inf``.

    Marginal: ``stats.conformal_rank``, ``ceil((m + 1)(1 - epsilon))``. PAC:
    ``stats.pac_conformal_rank``, the smallest rank whose coverage is at least ``1 - epsilon`` with
    probability at least ``1 - delta`` over the calibration draw.

    Parameters
    ----------
    m : int
        Number of calibration scores.
    epsilon : float
        Target rate of ``R^ > y``, in (0, 1).
    guarantee : {"marginal", "pac"}, optional
        Any value other than ``"pac"`` gives the marginal rank.
    delta : float, optional
        PAC confidence parameter, in (0, 1); required with ``guarantee="pac"``.

    Returns
    -------
    int
        The rank ``k``; ``k > m`` means the offset is infinite (never certify).

    Raises
    ------
    InvalidParameterError
        If ``epsilon`` is outside (0, 1) (checked on the marginal path).
    """
    if guarantee in ("pac", "issued"):
        return stats.pac_conformal_rank(m, epsilon, cast(float, delta))  # None is refused there
    return stats.conformal_rank(m, epsilon)


def min_group_size(
    epsilon: float, guarantee: str = "marginal", delta: float | None = None, method: str = "conformal"
) -> int:
    """Smallest calibration (group) size with a finite offset: ``stats.min_calibration_size``.

    LTT needs as many points as PAC: with no error at all, ``(1 - epsilon)^m <= delta``.

    Parameters
    ----------
    epsilon : float
        Target rate of ``R^ > y``, in (0, 1).
    guarantee : {"marginal", "pac"}, optional
        The calibration's guarantee.
    delta : float, optional
        PAC / LTT confidence parameter, in (0, 1); required when ``guarantee="pac"`` or
        ``method="ltt"``.
    method : {"conformal", "ltt"}, optional
        The calibration method.

    Returns
    -------
    int
        The smallest number of calibration points ``m`` (in a group) whose offset is finite.

    Raises
    ------
    InvalidParameterError
        If ``delta`` is missing where it is required, or a parameter is out of range.
    """
    pac_like = guarantee in ("pac", "issued") or method == "ltt"
    if pac_like and delta is None:
        raise InvalidParameterError(
            f"min_group_size: a {guarantee if guarantee != 'marginal' else 'ltt'} calibration "
            "needs delta (its size depends on it), e.g. delta=0.05"
        )
    return stats.min_calibration_size(epsilon, delta if pac_like else None)


# --------------------------------------------------------------------------- MAPIE: quantile and LTT

MAPIE_TOLERANCE = 1e-9
"""Largest disagreement (input l2 units) between MAPIE's offset and the exact order statistic before
``mapie_offset`` refuses to calibrate: MAPIE reads ``q^`` back as ``R~ - (R~ - q^)``, a few ulps off."""


def mapie_offset(
    p_tilde, reference, sigma: float, rank: int, radius_cap: float = np.inf, shift=None
) -> tuple[float, float]:
    """``q^`` = the ``rank``-th smallest score ``R~_i - y_i``: MAPIE's split-conformal quantile, returned exactly.

    ``SplitConformalRegressor(prefit=True)`` with ``AbsoluteConformityScore(sym=False)``, read for
    its lower bound ``R~ - q^``. The confidence level is ``1 - 2 epsilon_k`` with
    ``epsilon_k = 1 - (rank - 1/2) / (m + 1)``: the same rank as ``1 - 2 epsilon``, placed half a rank
    inside, so that float rounding in MAPIE's ``ceil((m + 1)(1 - epsilon))`` cannot move it at
    exact-integer edges (at ``m = 999, epsilon = 0.05`` the literal level gives rank 951, not 950).

    The offset returned is the exact order statistic of the scores as deployment computes them
    (``(R~ - shift) - y``), checked against MAPIE's to ``MAPIE_TOLERANCE``. MAPIE's own value is read
    back through a subtraction and can land an ulp below a tied ``rank``-th score; every point tied
    with it would then count as over the reference (with many ties, far more than ``epsilon``). With
    the exact score, ``#{i : s_i > q^} <= m - rank`` holds exactly.

    Parameters
    ----------
    p_tilde : array_like of float
        The surrogate's probability of its class, per calibration point.
    reference : array_like of float
        Reference radius ``y_i`` per calibration point, input l2 units.
    sigma : float
        Noise level (l2, input units).
    rank : int
        1-based rank of the offset among the ``m`` scores (``quantile_rank``).
    radius_cap : float, optional
        ``r_max``: surrogate radii are clipped to it before scoring (input l2 units); default no cap.
    shift : array_like of float, optional
        A per-point shift ``t_b`` subtracted from the surrogate radius before scoring (the ``shifted``
        score ``R~ - t_b - y``), fixed before calibration.

    Returns
    -------
    q_hat : float
        The offset ``q^`` in input l2 units; ``+inf`` if ``rank > m``.
    coverage : float
        MAPIE's ``regression_coverage_score`` of its two-sided intervals on the calibration set
        (for the report); NaN if ``rank > m`` or an interval is infinite.
    """
    X = np.asarray(p_tilde, dtype=float).reshape(-1, 1)
    if shift is not None:
        X = np.column_stack([X[:, 0], np.asarray(shift, dtype=float).reshape(-1)])
    y = np.asarray(reference, dtype=float)
    m = len(y)
    if rank > m:
        return float("inf"), float("nan")
    epsilon_k = 1.0 - (rank - 0.5) / (m + 1)
    regressor = SplitConformalRegressor(
        SurrogateRadiusRegressor(sigma, radius_cap).fit(X),
        confidence_level=1.0 - 2.0 * epsilon_k,
        conformity_score=AbsoluteConformityScore(sym=False),
        prefit=True,
    ).conformalize(X, y)
    radius_surrogate, intervals = regressor.predict_interval(X, allow_infinite_bounds=True)
    q_mapie = float(np.min(radius_surrogate - intervals[:, 0, 0]))  # the same for every row, up to rounding
    scores = SurrogateRadiusRegressor(sigma, radius_cap).predict(X) - y  # as deployment computes R~ - t_b
    q_hat = float(np.partition(scores, rank - 1)[rank - 1])
    if not abs(q_mapie - q_hat) <= MAPIE_TOLERANCE * max(1.0, abs(q_hat)):
        raise CalibrationError(
            f"MAPIE's conformal offset {q_mapie!r} is not the order statistic {q_hat!r} of rank "
            f"{rank} of {m}; this MAPIE version reads the quantile differently: report it"
        )
    coverage = float(regression_coverage_score(y, intervals)[0]) if np.all(np.isfinite(intervals)) else float("nan")
    return q_hat, coverage


def _ltt_predictions(X, offset):
    # 1 = issued and wrong (R^ > y), 0 = issued and right, nan = not issued (outside the risk).
    radius = X[:, 0] - offset
    out = np.where(radius > X[:, 1], 1.0, 0.0)
    out[~(radius > 0)] = np.nan
    return out


def _holm_nan_as_one():
    """MAPIE's Bonferroni-Holm, with a NaN p-value counted as 1 (calibrations of format version 3 and older).

    An offset that issues no certificate has an undefined risk, for which MAPIE 1.6 returns a NaN
    p-value; ``np.argmin`` picks NaN first and would stop Holm before any test. Counting it as 1
    (never rejected) is the conservative reading.
    """

    class HolmNanAsOne(FWERBonferroniHolm):
        def run(self, p_values, delta):
            return super().run(np.nan_to_num(np.asarray(p_values, dtype=float), nan=1.0), delta)

    return HolmNanAsOne()


class FallbackProcedure(FWERProcedure):
    """Wiens' fallback procedure on MAPIE's FWER interface: the hypotheses in the order given, level
    ``delta / G`` each, and a rejected hypothesis hands its level on to the next one not yet rejected.

    It is the chain graph of Bretz et al.'s graphical procedures (2009), so it controls the family-wise
    error rate at ``delta`` (strongly): whatever the set ``I`` of true nulls, a true null is only ever
    tested at a level no larger than its level in the graph with every false null removed, and those
    levels sum to at most ``delta`` over ``I``; a union bound over ``I`` finishes the proof. Unlike
    fixed-sequence testing it does not stop at the first hypothesis it cannot reject (an offset that
    issues no calibration certificate at all, NaN p-value, counts as 1); unlike Holm, the level flows
    along the order, so the hypotheses after a run of rejections are tested at nearly ``delta``. The
    order (conservative first) is fixed before any data is seen: MAPIE's own fixed-sequence class would
    reverse it when the observed risk decreases, a data-dependent choice.
    """

    def _init_state(self, n_lambdas: int, delta: float):
        self._levels = np.full(n_lambdas, float(delta) / n_lambdas)
        self._rejected = np.zeros(n_lambdas, dtype=bool)

    def _select_next_hypothesis(self, p_values):
        p = np.nan_to_num(np.asarray(p_values, dtype=float), nan=1.0)
        ready = np.flatnonzero(~self._rejected & (p <= self._levels))
        return int(ready[0]) if ready.size else None

    def _local_significance_levels(self):
        return self._levels

    def _update_on_reject(self, hypothesis_index: int):
        self._rejected[hypothesis_index] = True
        later = np.flatnonzero(~self._rejected[hypothesis_index + 1 :])
        if later.size:
            self._levels[hypothesis_index + 1 + later[0]] += self._levels[hypothesis_index]
        self._levels[hypothesis_index] = 0.0


ISSUED_GRID_STEP = 1.0 / 50
"""Spacing of the issued-guarantee offsets (units of sigma; ``sigma / 50`` = 0.005 at sigma = 0.25)."""

ISSUED_Z_GRID = np.round(np.arange(10.0, -1.0 - 1e-9, -0.05), 10)
"""Candidate ``z~`` thresholds of the issued-guarantee required-radius rule, conservative (high) first."""


def issued_offset_grid(radius_cap: float, sigma: float) -> np.ndarray:
    """Candidate offsets of the issued guarantee, conservative first: ``r_max - j sigma / 50`` down to ``-sigma``.

    Fixed before the calibration data are seen (they depend on the radius cap, itself fixed by
    ``n_cal``, ``alpha_mc``, sigma and the top-up plan). The first candidate certifies only inputs at
    the cap, with radius ``sigma / 50``; each later one certifies more inputs with larger radii.

    Parameters
    ----------
    radius_cap : float
        ``r_max`` (input l2 units), finite.
    sigma : float
        Noise level (l2, input units).

    Returns
    -------
    numpy.ndarray
        Decreasing offsets (input l2 units).
    """
    step = check_positive("sigma", sigma) * ISSUED_GRID_STEP
    count = int(np.floor((float(radius_cap) + sigma) / step + 1e-9))
    return float(radius_cap) - step * np.arange(1, count + 1)


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def ltt_offset(
    p_tilde,
    reference,
    sigma: float,
    epsilon: float,
    delta: float,
    radius_cap: float = np.inf,
    *,
    fwer: str = "fallback",
) -> tuple[float, int]:
    """Smallest grid offset ``q`` controlling the wrong rate among issued certificates (Learn-then-Test).

    For each candidate ``q`` the null hypothesis is ``H_q``: "among inputs with ``R~ - q > 0`` (the
    certificates this offset issues), the rate of ``R~ - q > y`` exceeds ``epsilon``". MAPIE's
    ``BinaryClassificationController`` computes, from the ``n_q`` calibration points ``q`` issues and
    the ``k_q`` of them over their reference, the binomial p-value ``P(Binomial(n_q, epsilon) <= k_q)``
    (its Bentkus p-value for a binary loss): given ``n_q``, those points are i.i.d. draws from the
    inputs ``q`` certifies, so ``k_q ~ Binomial(n_q, rate_q)`` and the p-value is valid under ``H_q``.
    ``fwer="fallback"`` (the issued guarantee) tests the candidates ``issued_offset_grid`` with
    ``FallbackProcedure``; ``fwer="holm"`` is the grid ``sigma * LTT_GRID_SIGMAS`` with Bonferroni-Holm
    (calibrations of format version 3 and older). Either way, with probability at least ``1 - delta``
    over the calibration draw no true ``H_q`` is rejected, so every rejected offset, and the smallest
    one returned, has ``P(R^ > y | R^ > 0) <= epsilon``; ``+inf`` if none is rejected.

    Parameters
    ----------
    p_tilde : array_like of float
        The surrogate's probability of its class, per calibration point.
    reference : array_like of float
        Reference radius ``y_i`` per calibration point, input l2 units.
    sigma : float
        Noise level (l2, input units); also the unit of the offset grid.
    epsilon : float
        Target rate of ``R^ > y`` among issued certificates, in (0, 1).
    delta : float
        Family-wise error level, in (0, 1).
    radius_cap : float, optional
        ``r_max``: surrogate radii are clipped to it (input l2 units); finite for ``fwer="fallback"``.
    fwer : {"fallback", "holm"}, optional
        The multiple-testing procedure and its grid.

    Returns
    -------
    offset : float
        The smallest valid offset, input l2 units; ``+inf`` if none is valid.
    num_valid : int
        The number of valid offsets on the grid.
    """
    if fwer == "fallback":
        grid, procedure = issued_offset_grid(radius_cap, sigma), FallbackProcedure()
    elif fwer == "holm":
        grid, procedure = sigma * LTT_GRID_SIGMAS, _holm_nan_as_one()
    else:
        raise InvalidParameterError(f"fwer must be 'fallback' or 'holm', got {fwer!r}")
    wrong_among_issued = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: y_pred == 1,
        risk_condition=lambda y_true, y_pred: ~np.isnan(y_pred),
        higher_is_better=False,
    )
    abstention = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: np.isnan(y_pred),
        risk_condition=lambda y_true, y_pred: np.ones(len(y_pred), dtype=bool),
        higher_is_better=False,
    )
    X = np.column_stack([surrogate_radius(p_tilde, sigma, radius_cap), np.asarray(reference, dtype=float)])
    controller = BinaryClassificationController(
        predict_function=_ltt_predictions,
        risk=wrong_among_issued,
        target_level=float(epsilon),
        confidence_level=1.0 - float(delta),
        best_predict_param_choice=abstention,
        list_predict_params=np.asarray(grid, dtype=float).reshape(-1, 1),
        fwer_method=procedure,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an offset that issues nothing makes the risk undefined; LTT skips it
        controller.calibrate(X, np.zeros(len(X), dtype=int))
    valid = np.asarray(controller.valid_predict_params, dtype=float).reshape(-1)
    if valid.size == 0:
        return float("inf"), 0
    return float(valid.min()), int(valid.size)


def issued_threshold(z, reference, r: float, epsilon: float, delta: float) -> float:
    """``tau(r)`` of the issued guarantee: the lowest ``z~`` threshold of ``ISSUED_Z_GRID`` that LTT validates.

    For each candidate ``tau``, ``H_tau``: "among inputs with ``z~ > tau``, the rate of ``y < r`` exceeds
    ``epsilon``", tested with MAPIE's binomial (Bentkus, binary-loss) p-value on the ``n`` calibration
    points with ``z~ > tau`` and the ``k`` of them with ``y < r``, and ``FallbackProcedure`` over the grid
    (conservative first) at family-wise level ``delta``. With probability at least ``1 - delta`` over the
    calibration draw, ``P(y < r | z~ > tau(r)) <= epsilon``, for this fixed ``r``.

    Parameters
    ----------
    z, reference : array_like of float
        ``z~`` and ``y`` (input l2 units) per calibration point.
    r : float
        The required radius (input l2 units), fixed in advance (a grid radius).
    epsilon, delta : float
        Target rate among certified inputs and family-wise error level, in (0, 1).

    Returns
    -------
    float
        ``tau(r)``; ``+inf`` if no candidate is validated (never certifies at ``r``).
    """
    z_sorted = np.sort(np.asarray(z, dtype=float))
    wrong_sorted = np.sort(np.asarray(z, dtype=float)[np.asarray(reference, dtype=float) < r])
    issued = len(z_sorted) - np.searchsorted(z_sorted, ISSUED_Z_GRID, side="right")
    wrong = len(wrong_sorted) - np.searchsorted(wrong_sorted, ISSUED_Z_GRID, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        p = compute_hoeffding_bentkus_p_value(wrong / issued, issued.astype(float), float(epsilon), binary=True)[:, 0]
    valid = control_fwer(np.where(issued > 0, p, 1.0), float(delta), fwer_method=FallbackProcedure())
    return float(ISSUED_Z_GRID[valid].min()) if len(valid) else float("inf")


# --------------------------------------------------------------------------- calibration on arrays


@dataclass
class OffsetFit:
    """What ``fit_offsets`` learned: ``q^`` per group (``+inf`` = never certify) and diagnostics."""

    offsets: dict[str, float]
    pooled_offset: float
    group_sizes: dict[str, int]
    fallback_groups: list[str]
    min_group_size: int
    radius_cap: float
    diagnostics: dict = field(default_factory=dict)
    bin_edges: list[float] | None = None


def check_calibration_params(
    epsilon: float, alpha_mc: float, guarantee: str, delta: float | None, groups: str, method: str
) -> float | None:
    """Validate the calibration options; returns ``delta`` (None where unused).

    Parameters
    ----------
    epsilon : float
        Target rate of wrong surrogate radii, in (0, 0.5).
    alpha_mc : float
        Clopper-Pearson level of the reference radius, in (0, 1).
    guarantee : {"marginal", "pac", "issued"}
        The guarantee (``GUARANTEES``); ``issued`` is calibrated by Learn-then-Test (``method="ltt"``).
    delta : float or None
        PAC / issued confidence parameter, in (0, 1); None means 0.05 where it is used.
    groups : {"none", "class", "confidence"}
        The Mondrian grouping (``GROUPINGS``).
    method : {"conformal", "ltt"}
        The calibration method (``METHODS``); ``ltt`` states the ``issued`` guarantee.

    Returns
    -------
    float or None
        The checked ``delta`` when the guarantee is ``pac`` or ``issued`` or ``method="ltt"``, else None.

    Raises
    ------
    InvalidParameterError
        If an option is out of range or not one of its choices.
    """
    epsilon = check_probability("epsilon", epsilon)
    if epsilon >= 0.5:
        raise InvalidParameterError(
            f"epsilon must be below 0.5 (a rate of wrong certificates), got {epsilon}; e.g. 0.01"
        )
    check_probability("alpha_mc", alpha_mc)
    if guarantee not in GUARANTEES:
        raise InvalidParameterError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    if method not in METHODS:
        raise InvalidParameterError(f"method must be one of {METHODS}, got {method!r}")
    if groups not in GROUPINGS:
        raise InvalidParameterError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    if guarantee in ("pac", "issued") or method == "ltt":
        return check_probability("delta", 0.05 if delta is None else delta)
    return None


def resolve_guarantee(guarantee: str, method: str) -> tuple[str, str]:
    """The (guarantee, method) a calibration records: ``issued`` and ``ltt`` come together.

    ``guarantee="issued"`` is calibrated by Learn-then-Test on the rate among issued certificates
    (``ltt_offset`` with ``FallbackProcedure``), and ``method="ltt"`` states exactly that guarantee, so
    either option gives ``("issued", "ltt")``. (Files of format version 3 and older recorded an LTT
    calibration as ``"pac"``; they still load with that label.)
    """
    if guarantee == "issued" or method == "ltt":
        if guarantee == "pac":
            raise InvalidParameterError(
                "method='ltt' states the issued guarantee (the rate among issued certificates, "
                "with probability 1 - delta); use guarantee='issued', not 'pac'"
            )
        return "issued", "ltt"
    return guarantee, method


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def fit_offsets(
    p_tilde,
    predicted,
    counts_top,
    n_cal: int,
    *,
    sigma: float,
    num_classes: int,
    epsilon: float,
    alpha_mc: float,
    guarantee: str = "marginal",
    delta: float | None = 0.05,
    groups: str = "none",
    method: str = "conformal",
    bin_edges: Sequence[float] | None = None,
    z=None,
    references: ReferenceRadii | None = None,
    shift=None,
    slack: float = 0.0,
) -> OffsetFit:
    """Calibrate the offset ``q^`` from surrogate outputs and calibration counts (arrays only).

    With inputs exchangeable, the deployed radius ``R~ - q^`` exceeds the reference radius with
    probability at most ``epsilon`` (marginal), or at rate ``<= epsilon`` with probability
    ``1 - delta`` over the calibration draw (PAC), or at rate ``<= epsilon`` among the inputs it
    certifies with probability ``1 - delta`` (issued, by LTT); see the module docstring. Mondrian
    groups hold the statement within each group. A group with fewer points than ``min_group_size``
    has no valid offset of its own: its offset is ``+inf`` (the surrogate never certifies it; the
    hybrid's fallback does) and it is listed in ``fallback_groups``.

    Parameters
    ----------
    p_tilde : array_like of float
        The surrogate's probability of its class ``predicted``, per calibration input.
    predicted : array_like of int
        The surrogate's class, per calibration input.
    counts_top : array_like of int
        The count of that class out of ``n_cal`` noisy evaluations of the base model, drawn
        independently of the surrogate.
    n_cal : int
        Noisy evaluations per calibration input (>= 1).
    sigma : float
        Noise level (l2, input units).
    num_classes : int
        Number of classes (the groups of ``groups="class"``).
    epsilon : float
        Target rate of ``R^ > y``, in (0, 0.5).
    alpha_mc : float
        Clopper-Pearson level of the reference radius, in (0, 1).
    guarantee : {"marginal", "pac", "issued"}, optional
        Marginal conformal, PAC (with probability ``1 - delta``), or issued (LTT, ``resolve_guarantee``).
    delta : float or None, optional
        PAC / issued confidence parameter, in (0, 1); unused for marginal conformal.
    groups : {"none", "class", "confidence"}, optional
        The Mondrian grouping.
    method : {"conformal", "ltt"}, optional
        Quantile of the scores, or Learn-then-Test (the issued guarantee).
    bin_edges : sequence of float, optional
        Bin edges of ``groups="confidence"`` (default ``DEFAULT_CONFIDENCE_EDGES``); they must be
        fixed before the calibration data are seen.
    z : array_like of float, optional
        ``z~`` per point (``Surrogate.predict_z``), binned by ``groups="confidence"``
        (``core.one_pass.group_keys``; default ``stats.probit_of_probability(p~)``).
    references : ReferenceRadii, optional
        Precomputed reference radii and radius cap (``reference_radii``: a topped-up calibration);
        default the Clopper-Pearson reference of ``counts_top`` out of ``n_cal``.
    shift : array_like of float, optional
        Per-point shift ``t_b`` of the ``shifted`` score, fixed before calibration (``fit_shifted``).
    slack : float, optional
        The counts' noise scheme's radius slack for the default reference (``reference_radii``).

    Returns
    -------
    OffsetFit
        Offsets per group and pooled (input l2 units, ``+inf`` = never certify), group sizes,
        fallback groups, the minimum group size, ``radius_cap``, the bin edges and in-sample
        diagnostics (for the report, not a guarantee).

    Raises
    ------
    CalibrationError
        If the whole calibration set is smaller than ``min_group_size``.
    InvalidParameterError
        If an option is out of range, or the three arrays differ in length.
    """
    delta = check_calibration_params(epsilon, alpha_mc, guarantee, delta, groups, method)
    guarantee, method = resolve_guarantee(guarantee, method)
    if groups == "confidence" and bin_edges is None:
        bin_edges = DEFAULT_CONFIDENCE_EDGES
    sigma = check_positive("sigma", sigma)
    n_cal = check_count("n_cal", n_cal)
    p_tilde = np.asarray(p_tilde, dtype=float).reshape(-1)
    predicted = np.asarray(predicted).reshape(-1)
    counts_top = np.asarray(counts_top).reshape(-1)
    m = len(p_tilde)
    if not (len(predicted) == m == len(counts_top)):
        raise InvalidParameterError("p_tilde, predicted and counts_top must have one entry per calibration input")
    needed = min_group_size(epsilon, guarantee, delta, method)
    if m < needed:
        what = f"epsilon={epsilon}" + (f", delta={delta}" if delta is not None else "")
        raise CalibrationError(
            f"calibration set has {m} points but {needed} are needed for {what}; "
            "add calibration images or raise epsilon"
        )

    reference, cap = _reference_and_cap(references, counts_top, n_cal, alpha_mc, sigma, slack)
    shift_arr = np.zeros(m) if shift is None else np.asarray(shift, dtype=float).reshape(-1)
    if shift is not None and method == "ltt":
        raise InvalidParameterError("the shifted score is calibrated by its conformal quantile; use method='conformal'")

    def offset_of(mask: np.ndarray) -> tuple[float, float]:
        if method == "ltt":
            offset = ltt_offset(
                p_tilde[mask], reference[mask], sigma, epsilon, cast(float, delta), cap, fwer="fallback"
            )[0]  # delta: checked with the options (method="ltt" needs one)
            return offset, float("nan")
        rank = quantile_rank(int(mask.sum()), epsilon, guarantee, delta)
        return mapie_offset(
            p_tilde[mask], reference[mask], sigma, rank, cap, shift=None if shift is None else shift_arr[mask]
        )

    pooled_offset, pooled_coverage = offset_of(np.ones(m, dtype=bool))
    keys = group_keys(predicted, p_tilde, groups, bin_edges, z=z)
    offsets, sizes, fallbacks = _group_offsets(keys, groups, num_classes, bin_edges, pooled_offset, needed, offset_of)
    diagnostics = _offset_diagnostics(
        p_tilde, sigma, cap, shift_arr, np.array([offsets[k] for k in keys]), reference, epsilon, guarantee, method
    )
    diagnostics["mapie_interval_coverage"] = pooled_coverage
    diagnostics["mapie_interval_nominal"] = (
        float(1 - 2 * epsilon) if method == "conformal" and guarantee == "marginal" else float("nan")
    )
    return OffsetFit(
        offsets,
        pooled_offset,
        sizes,
        fallbacks,
        needed,
        cap,
        diagnostics,
        None if bin_edges is None else [float(e) for e in bin_edges],
    )


def _reference_and_cap(references, counts_top, n_cal: int, alpha_mc: float, sigma: float, slack: float):
    """The reference radius of each calibration point and the radius cap: the given ``references``, else
    the Clopper-Pearson reference of ``counts_top`` out of ``n_cal`` (InvalidParameterError if the given
    ones are not one per point)."""
    if references is None:
        return (
            reference_radius(counts_top, n_cal, alpha_mc, sigma, slack=slack),
            radius_cap(n_cal, alpha_mc, sigma, slack=slack),
        )
    reference, cap = np.asarray(references.radius, dtype=float).reshape(-1), float(references.cap)
    if len(reference) != len(counts_top):
        raise InvalidParameterError("references must hold one radius per calibration input")
    return reference, cap


def _group_offsets(
    keys: np.ndarray, groups: str, num_classes: int, bin_edges, pooled_offset: float, needed: int, offset_of
) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """Each Mondrian group's offset (``offset_of`` its rows), its size, and the groups too small for an
    offset of their own (offset ``+inf``: the pooled ``q^`` would void the bound within them)."""
    offsets: dict[str, float] = {}
    sizes: dict[str, int] = {}
    fallbacks: list[str] = []
    for key in all_group_keys(groups, num_classes, bin_edges):
        mask = keys == key
        sizes[key] = int(mask.sum())
        if groups == "none":
            offsets[key] = pooled_offset
        elif sizes[key] >= needed:
            offsets[key] = offset_of(mask)[0]
        else:  # no valid offset of its own: never certified by the surrogate (the pooled q^ would void the bound)
            offsets[key] = float("inf")
            fallbacks.append(key)
    return offsets, sizes, fallbacks


def _offset_diagnostics(p_tilde, sigma, cap, shift_arr, offset, reference, epsilon, guarantee, method) -> dict:
    """Diagnostics on the calibration set itself (in-sample: for the report, not a guarantee); ``offset``
    is each point's group offset. The MAPIE interval's coverage is added by ``fit_offsets``."""
    # Exceedance is read on the scores (R~ - t_b) - y > q^, the event the quantile counts, free of
    # rounding in R~ - q^.
    deployed = surrogate_radius(p_tilde, sigma, cap) - shift_arr - offset
    certified = deployed > 0
    over = (surrogate_radius(p_tilde, sigma, cap) - shift_arr) - reference > offset
    return dict(
        certified_share=float(certified.mean()),
        violation_rate=float(np.mean(over)),
        violation_rate_among_certified=float(np.mean(over[certified])) if certified.any() else 0.0,
        mean_certified_radius=float(deployed[certified].mean()) if certified.any() else 0.0,
        mean_surrogate_radius=float(np.mean(np.maximum(surrogate_radius(p_tilde, sigma, cap), 0.0))),
        mean_reference_radius=float(reference.mean()),
        reference_positive_share=float(np.mean(reference > 0)),
    )


MONITOR_STATISTIC = "surrogate_class_and_probability"
"""What ``Calibration.monitor_reference`` stores per calibration image: the surrogate's class and ``p~``."""


def monitor_reference(predicted, p_tilde) -> dict:
    """The drift monitor's reference sample: the surrogate's class and ``p~`` of each calibration image.

    Stored in calibration.json (``Calibration.monitor_reference``) so that deployment can test
    whether its queries are still exchangeable with the calibration images without reloading them.
    Two numbers per image, in calibration order.

    Parameters
    ----------
    predicted : array_like of int
        The surrogate's class of each calibration image.
    p_tilde : array_like of float
        The surrogate's probability of that class.

    Returns
    -------
    dict
        ``{"statistic": MONITOR_STATISTIC, "predicted": [...], "p_tilde": [...]}`` (plain JSON values).
    """
    return dict(
        statistic=MONITOR_STATISTIC,
        predicted=[int(c) for c in np.asarray(predicted).reshape(-1)],
        p_tilde=[float(p) for p in np.asarray(p_tilde, dtype=float).reshape(-1)],
    )


# --------------------------------------------------------------------------- references past the cap


@dataclass
class ReferenceRadii:
    """Reference radius ``y_i`` per calibration point, the radius cap, and how they were made (``record``)."""

    radius: np.ndarray
    cap: float
    record: dict


REFERENCE_CP = "clopper-pearson"
REFERENCE_TOPUP = "clopper-pearson+confidence-sequence"
REFERENCE_BOUNDS = (REFERENCE_CP, REFERENCE_TOPUP)


def reference_radii(
    predicted,
    counts,
    n_cal: int,
    alpha_mc: float,
    sigma: float,
    *,
    counts_topup=None,
    samples=None,
    planned_max: int | None = None,
    stages=None,
    slack: float = 0.0,
) -> ReferenceRadii:
    """The calibration's reference radii: Clopper-Pearson, or the topped-up bound of a topped-up file.

    Without a top-up: ``y_i = reference_radius(counts_i[A_i], n_cal, alpha_mc, sigma)`` and the cap
    ``max_radius(n_cal, alpha_mc, sigma)``. For a topped-up counts file (``planned_max`` given: the
    file records a top-up plan, whatever its outcome): ``y_i = stats.topup_reference_radius`` (the
    Clopper-Pearson bound on the first ``n_cal`` samples and the confidence sequence over all of them,
    at ``alpha_mc / 2`` each, prior ``stats.TOPUP_PRIOR``) and the cap ``stats.topup_max_radius`` of the
    planned maximum: both fixed functions of what was planned before calibration. Either way
    ``P(y_i > true radius of A_i) <= alpha_mc`` per point.

    Parameters
    ----------
    predicted : array_like of int
        The surrogate's class ``A_i`` per point (fixed before the counts were drawn).
    counts : array_like of int
        ``N x K`` counts of the first ``n_cal`` estimation samples.
    n_cal : int
        Samples in ``counts`` per row.
    alpha_mc : float
        Error level of the reference, in (0, 1).
    sigma : float
        Noise level (l2, input units).
    counts_topup : array_like of int, optional
        ``N x K`` counts of the samples beyond ``n_cal`` (a topped-up file's ``counts_topup``).
    samples : array_like of int, optional
        Samples per row in all (``n_cal`` plus the top-up).
    planned_max : int, optional
        The top-up plan's most samples per row; given exactly for a topped-up file.
    stages : sequence of int, optional
        The top-up's sample stages (``topup_stages``), recorded so that an audit can draw its reference
        samples by the same plan (``ReferencePlan``); without them the audit refuses the calibration.
    slack : float, optional
        The counts' noise scheme's radius slack (``CountsFile.radius_slack``; 0 for float noise): ``y_i``
        and the cap are radii of the law the counts were drawn from (``stats.grid_radius``).

    Returns
    -------
    ReferenceRadii
    """
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    counts = np.asarray(counts)
    rows = np.arange(len(predicted))
    first = counts[rows, predicted]
    if planned_max is None:
        return ReferenceRadii(
            np.atleast_1d(reference_radius(first, n_cal, alpha_mc, sigma, slack=slack)).astype(float),
            radius_cap(n_cal, alpha_mc, sigma, slack=slack),
            dict(bound=REFERENCE_CP),
        )
    topup = np.zeros_like(counts) if counts_topup is None else np.asarray(counts_topup)
    samples = np.full(len(predicted), n_cal) if samples is None else np.asarray(samples, dtype=np.int64)
    y = stats.topup_reference_radius(
        first, n_cal, first + topup[rows, predicted], samples, alpha_mc, sigma, slack=slack
    )
    cap = stats.topup_max_radius(n_cal, int(planned_max), alpha_mc, sigma, slack=slack)
    a, b, w = stats.TOPUP_PRIOR
    record = dict(
        bound=REFERENCE_TOPUP,
        planned_max_samples=int(planned_max),
        alpha_split="alpha_mc / 2 each",
        prior=dict(a=list(a), b=list(b), weights=list(w)),
        topped_up_points=int(np.sum(samples > n_cal)),
        max_samples_seen=int(samples.max(initial=n_cal)),
    )
    if stages is not None:
        record.update(stages=[int(v) for v in check_stages(stages, n_cal, int(planned_max))], rule=TOPUP_RULE)
    return ReferenceRadii(np.atleast_1d(np.asarray(y, dtype=float)), cap, record)


TOPUP_RULE = "all-agree"
"""The top-up rule a recorded plan replays (``data_gen.generate.TOPUP_RULES``): a row gets the next stage's
samples iff every estimation sample it has so far returned one class."""


def check_stages(stages, n_cal: int, planned_max: int) -> tuple[int, ...]:
    """``stages`` validated: strictly increasing sample counts from ``n_cal`` to at most ``planned_max``."""
    out = tuple(int(v) for v in stages)
    if not out or out[0] != n_cal or any(b <= a for a, b in zip(out, out[1:])) or out[-1] > planned_max:
        raise CalibrationError(
            f"top-up stages {list(out)[:8]} must rise strictly from n_cal = {n_cal} to at most the "
            f"planned maximum {planned_max}"
        )
    return out


def topup_stages(n_cal: int, history, planned_max: int) -> tuple[int, ...]:
    """The samples a row holds after each top-up round of a counts file: ``(n_cal, s_1, s_2, ...)``.

    Round ``j`` (``history[j-1]``, one record per ``datagen --top-up``) gave ``min(extra_j, planned_max - s)``
    more samples to every row whose samples so far all agreed, so a row holds ``s_j = min(s_{j-1} + extra_j,
    planned_max)`` after it; a row that stopped agreeing stays where it is. This is the plan an audit replays.

    Parameters
    ----------
    n_cal : int
        Samples of every row before any top-up.
    history : sequence of dict
        The file's ``topup_history`` (each with ``extra`` and ``rule``).
    planned_max : int
        The file's ``topup_planned_max``.

    Returns
    -------
    tuple of int

    Raises
    ------
    CalibrationError
        If a record lacks its ``extra`` or names another rule.

    Examples
    --------
    >>> topup_stages(1000, [dict(extra=4000, rule="all-agree"), dict(extra=4000, rule="all-agree")], 7000)
    (1000, 5000, 7000)
    """
    stages = [int(n_cal)]
    for record in history:
        extra = record.get("extra") if isinstance(record, dict) else None
        if not isinstance(extra, int) or extra < 1 or record.get("rule", TOPUP_RULE) != TOPUP_RULE:
            raise CalibrationError(
                f"the counts file's top-up history has a record {record!r:.80} this version cannot "
                "replay; recalibrate on a file topped up by this version's `datagen --top-up`"
            )
        nxt = min(stages[-1] + extra, int(planned_max))
        if nxt > stages[-1]:
            stages.append(nxt)
    return tuple(stages)


def check_topup_follows_stages(counts, counts_topup, samples, stages) -> None:
    """Refuse (``CalibrationError``) a topped-up file whose rows did not follow the plan ``stages``.

    Each row must hold a stage's samples; a row below the last stage must disagree somewhere (else the
    rule would have topped it up); a row past ``n_cal`` must have agreed on its first ``n_cal``.
    """
    counts = np.asarray(counts)
    every = counts + np.asarray(counts_topup)
    samples = np.asarray(samples, dtype=np.int64)
    stages_arr = np.asarray(stages, dtype=np.int64)
    n_cal = int(stages_arr[0])
    bad = ~np.isin(samples, stages_arr)
    bad |= (samples < stages_arr[-1]) & (every.max(axis=1) == samples)
    bad |= (samples > n_cal) & (counts.max(axis=1) != n_cal)
    if bad.any():
        raise CalibrationError(
            f"{int(bad.sum())} rows of the topped-up counts do not follow the recorded top-up plan "
            f"(stages {list(stages)[:6]}, rule {TOPUP_RULE}), e.g. row "
            f"{int(np.flatnonzero(bad)[0])}; "
            "regenerate the top-up with `datagen --top-up`"
        )


@dataclass(frozen=True)
class ReferencePlan:
    """How a calibration made each point's reference radius, replayable on a new input (``CertificateAudit``).

    ``n_cal`` samples of the surrogate's class first; then, where the calibration counts were topped up,
    the same stages by the same rule (``topup_stages``: on to the next stage while every sample so far
    agrees), and the same bound (``reference_radii``: Clopper-Pearson at ``alpha_mc``, or for a top-up
    Clopper-Pearson on the first ``n_cal`` and the confidence sequence on all, ``alpha_mc / 2`` each, cap of
    the planned maximum). A query's ``(R~, y)`` made this way is distributed exactly like a calibration
    point's, which is what the audit's threshold assumes.

    Attributes
    ----------
    n_cal : int
    alpha_mc, sigma : float
    stages : tuple of int
        ``(n_cal,)`` without a top-up.
    planned_max : int or None
        None without a top-up.
    slack : float
        The noise scheme's radius slack (``calibration.noise_slack``; 0 for float noise).
    """

    n_cal: int
    alpha_mc: float
    sigma: float
    stages: tuple
    planned_max: int | None = None
    slack: float = 0.0

    @classmethod
    def from_calibration(cls, calibration) -> ReferencePlan:
        """The plan of ``calibration``; ``CalibrationError`` for a topped-up one that does not record its stages."""
        reference = getattr(calibration, "reference", None) or {"bound": REFERENCE_CP}
        n_cal, alpha_mc, sigma = int(calibration.n_cal), float(calibration.alpha_mc), float(calibration.sigma)
        slack = float(getattr(calibration, "noise_slack", 0.0) or 0.0)
        if reference.get("bound", REFERENCE_CP) == REFERENCE_CP:
            return cls(n_cal, alpha_mc, sigma, (n_cal,), slack=slack)
        if not reference.get("stages") or reference.get("rule", TOPUP_RULE) != TOPUP_RULE:
            raise CalibrationError(
                "this calibration's reference radii come from topped-up counts but it does not "
                "record the top-up's stages, so an audit cannot make its references the same way; "
                "re-run `surrogate-cert calibrate` with this version"
            )
        a, b, w = stats.TOPUP_PRIOR
        if reference.get("prior") not in (None, dict(a=list(a), b=list(b), weights=list(w))):
            raise CalibrationError(
                "this calibration's top-up reference uses another prior than this version's "
                "stats.TOPUP_PRIOR; re-run `surrogate-cert calibrate` with this version"
            )
        planned = int(reference["planned_max_samples"])
        return cls(n_cal, alpha_mc, sigma, check_stages(reference["stages"], n_cal, planned), planned, slack)

    def more(self, samples, counts_all) -> np.ndarray:
        """Samples each row still needs by the plan: to the next stage if all its samples agree, else 0."""
        samples = np.asarray(samples, dtype=np.int64)
        stages = np.asarray(self.stages, dtype=np.int64)
        nxt = np.searchsorted(stages, samples, side="right")
        agree = np.asarray(counts_all).max(axis=1) == samples
        target = np.where((nxt < len(stages)) & agree, stages[np.minimum(nxt, len(stages) - 1)], samples)
        return target - samples

    def collect(self, draw, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw every row's samples by the plan: ``draw(rows, start, n)`` returns the class counts of samples
        ``start .. start + n - 1`` of each row's stream (``len(rows) x K``).

        Returns
        -------
        counts_first, counts_all : numpy.ndarray
            ``num x K`` counts of the first ``n_cal`` samples and of all samples.
        samples : numpy.ndarray
            Samples drawn per row.
        """
        rows = np.arange(num)
        first = np.asarray(draw(rows, np.zeros(num, dtype=np.int64), np.full(num, self.n_cal)), dtype=np.int64)
        every = first.copy()
        samples = np.full(num, self.n_cal, dtype=np.int64)
        while True:
            extra = self.more(samples, every)
            go = np.flatnonzero(extra > 0)
            if not go.size:
                return first, every, samples
            every[go] += np.asarray(draw(go, samples[go], extra[go]), dtype=np.int64)
            samples[go] += extra[go]

    def reference(self, predicted, counts_first, counts_all, samples) -> np.ndarray:
        """``y`` per row, by the calibration's own function (``reference_radii``) on the plan's samples."""
        counts_first = np.asarray(counts_first)
        topped = self.planned_max is not None
        return reference_radii(
            predicted,
            counts_first,
            self.n_cal,
            self.alpha_mc,
            self.sigma,
            counts_topup=np.asarray(counts_all) - counts_first if topped else None,
            samples=samples if topped else None,
            planned_max=self.planned_max,
            slack=self.slack,
        ).radius


# --------------------------------------------------------------------------- the tuned (shifted) score

PARTITION_SEED = 0
"""Default seed of the tuning / calibration partition of the cal split (``partition_rows``)."""

TUNE_SHARE = 0.5
"""Default share of the cal split that tunes the shifted score's bins and offsets."""

SHIFT_BINS = 8
"""Default number of confidence bins of the shifted score (equal mass on the tuning part)."""


def partition_rows(indices, tune_share: float = TUNE_SHARE, seed: int = PARTITION_SEED) -> np.ndarray:
    """Which calibration rows tune (True) and which calibrate (False): a seeded split by dataset index.

    The sorted distinct dataset indices are permuted by ``numpy.random.default_rng(seed)`` and the
    first ``round(tune_share * m)`` of them tune; so the partition depends on the set of images and
    the seed only (not on row order or on any count), and is fixed before any score is computed.

    Parameters
    ----------
    indices : array_like of int
        Dataset index of each calibration row.
    tune_share : float, optional
        Share of the rows that tune, in (0, 1).
    seed : int, optional
        Seed of the permutation.

    Returns
    -------
    numpy.ndarray
        Boolean mask over the rows: True = tuning part.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0 < tune_share < 1:
        raise InvalidParameterError(f"tune_share must lie strictly between 0 and 1, got {tune_share}")
    ordered = np.unique(indices)
    perm = np.random.default_rng(int(seed)).permutation(len(ordered))
    tune = ordered[perm[: int(round(tune_share * len(ordered)))]]
    return np.isin(indices, tune)


def partition_record(indices, tune: np.ndarray, tune_share: float, seed: int) -> dict:
    """What the artifact records of a partition: seed, share, sizes and a digest of the tuning indices."""
    indices = np.asarray(indices, dtype=np.int64)
    digest = hashlib.sha256(np.sort(indices[tune]).astype("<i8").tobytes()).hexdigest()
    return dict(
        seed=int(seed),
        tune_share=float(tune_share),
        tune_size=int(tune.sum()),
        calibration_size=int((~tune).sum()),
        tune_indices_sha256=digest,
        rule="numpy default_rng(seed).permutation of the sorted dataset indices; the first round(tune_share * m) tune",
    )


def allocate_bin_offsets(radius_surrogate, reference, bins, num_bins: int, epsilon: float, weight=None) -> np.ndarray:
    """Per-bin offsets ``t_b`` on tuning data: spread ``floor(epsilon N)`` violations to maximise radius.

    Start with no violation allowed in any bin (``t_b`` = the bin's largest score ``R~ - y``); then,
    one at a time, allow one more violation in the bin where that raises
    ``sum_i max(R~_i - t_b, 0) * weight_i`` the most (``weight``: e.g. 1 where the surrogate's class is
    the label), until ``floor(epsilon N)`` are spent. A heuristic that only shapes the score; validity
    comes from the conformal shift fitted afterwards on other points (``fit_shifted``). An empty bin
    gets the largest offset of the others.

    Parameters
    ----------
    radius_surrogate, reference : array_like of float
        ``R~`` and ``y`` of the tuning points.
    bins : array_like of int
        Bin of each tuning point, ``0 .. num_bins - 1``.
    num_bins : int
        Number of bins.
    epsilon : float
        Target rate; sets the violation budget.
    weight : array_like of float, optional
        Weight of each point's radius in the objective; default 1.

    Returns
    -------
    numpy.ndarray
        ``t_b``, one finite offset per bin (input l2 units).
    """
    radius_surrogate = np.asarray(radius_surrogate, dtype=float)
    scores = radius_surrogate - np.asarray(reference, dtype=float)
    bins = np.asarray(bins, dtype=np.int64)
    weight = np.ones(len(scores)) if weight is None else np.asarray(weight, dtype=float)
    ranked = [np.sort(scores[bins == b])[::-1] for b in range(num_bins)]
    members = [(radius_surrogate[bins == b], weight[bins == b]) for b in range(num_bins)]
    allowed = np.zeros(num_bins, dtype=np.int64)

    def offset(b: int, v: int) -> float:
        return float(ranked[b][v]) if v < len(ranked[b]) else float(ranked[b][-1])

    def value(b: int, v: int) -> float:
        r, w = members[b]
        return float(np.sum(np.maximum(r - offset(b, v), 0.0) * w))

    for _ in range(int(np.floor(epsilon * len(scores)))):
        gains = [
            value(b, allowed[b] + 1) - value(b, allowed[b]) if allowed[b] + 1 < len(ranked[b]) else -1.0
            for b in range(num_bins)
        ]
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        allowed[best] += 1
    t = np.array([offset(b, allowed[b]) if len(ranked[b]) else np.nan for b in range(num_bins)])
    if np.all(np.isnan(t)):
        return np.zeros(num_bins)
    return np.where(np.isnan(t), np.nanmax(t), t)


@dataclass
class ShiftedScore:
    """The ``shifted`` score's parts fitted on the tuning part: bin edges on ``z~`` and offsets ``t_b``."""

    bin_edges: np.ndarray
    bin_offsets: np.ndarray

    def shift(self, z) -> np.ndarray:
        """``t_b`` of each point (bin = ``digitize(z~, bin_edges)``), as ``one_pass.bin_shifts`` computes it."""
        return self.bin_offsets[np.digitize(np.asarray(z, dtype=float), self.bin_edges)]

    def params(self, bins: int) -> dict:
        return dict(
            bins=int(bins),
            bin_edges=[float(e) for e in self.bin_edges],
            bin_offsets=[float(t) for t in self.bin_offsets],
            edges_rule="equal-mass quantiles of z~ on the tuning part",
            offsets_rule="greedy spread of floor(epsilon * tuning size) violations across bins, maximising "
            "the summed radius of points whose class is the label (tuning part)",
        )


def fit_shifted(z, radius_surrogate, reference, epsilon: float, bins: int = SHIFT_BINS, weight=None) -> ShiftedScore:
    """Fit the ``shifted`` score ``R~ - t_b(x) - y`` on TUNING points (never the calibration part).

    Bin edges: ``stats.equal_mass_edges`` of ``z~`` into ``bins`` bins; offsets: ``allocate_bin_offsets``.
    Both depend on tuning points only, so on the calibration part (and at deployment) ``t_b(x)`` is a
    fixed function of the surrogate's output: the conformal shift ``q^`` of ``R~ - t_b - y`` over the
    calibration part (``fit_offsets(shift=...)``) then gives ``P(R~ - t_b - q^ > y) <= epsilon``.

    Parameters
    ----------
    z, radius_surrogate, reference : array_like of float
        ``z~``, ``R~`` and ``y`` of the tuning points.
    epsilon : float
        Target rate (the tuning's violation budget).
    bins : int, optional
        Number of bins (equal mass on the tuning points).
    weight : array_like of float, optional
        Objective weight per tuning point (``allocate_bin_offsets``).

    Returns
    -------
    ShiftedScore
    """
    edges = stats.equal_mass_edges(z, bins)
    which = np.digitize(np.asarray(z, dtype=float), edges)
    offsets = allocate_bin_offsets(radius_surrogate, reference, which, len(edges) + 1, epsilon, weight)
    return ShiftedScore(np.asarray(edges, dtype=float), offsets)


# --------------------------------------------------------------------------- required-radius thresholds

THRESHOLD_POINTS_PER_SIGMA = 50
"""Grid density of the required-radius thresholds: one radius every sigma / 50 (0.005 at sigma 0.25)."""

TAU_BELOW_ALL = -(stats.Z_MAX + 1.0)
"""How a threshold of ``-inf`` (every input certifies at that radius) is stored: below every ``z~``."""


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def fit_radius_thresholds(
    z,
    reference,
    cap: float,
    sigma: float,
    epsilon: float,
    *,
    guarantee: str = "marginal",
    delta: float | None = None,
    points_per_sigma: int = THRESHOLD_POINTS_PER_SIGMA,
) -> dict:
    """Required-radius thresholds ``tau(r)`` on a radius grid up to the cap (the artifact's ``radius_thresholds``).

    For each grid radius ``r``: ``tau(r)`` = the conformal quantile (``quantile_rank``: the marginal rank
    ``ceil((m+1)(1-epsilon))``, or the PAC rank) of the scores ``stats.threshold_scores(z~, y, r)``
    (``z~_i`` where ``y_i < r``, else ``-inf``). Certifying ``(A, r*)`` iff ``z~ > tau(r+)`` is then wrong
    with probability at most ``epsilon + alpha_mc`` for each ``r*`` fixed before the input is seen
    (``one_pass.certified_at_required``); not for an ``r*`` chosen from the input's own surrogate output.
    ``tau`` is non-decreasing in ``r`` (the scores only grow with ``r``).

    ``guarantee="issued"``: ``tau(r)`` is ``issued_threshold`` instead (Learn-then-Test over ``z~``
    thresholds): for each fixed ``r*``, with probability at least ``1 - delta`` over the calibration draw,
    ``P(y < r+ | z~ > tau(r+)) <= epsilon``, so a certificate *issued* at ``r*`` is wrong with probability
    at most ``epsilon + alpha_mc``. Those ``tau`` need not be monotone in ``r``.

    MAPIE has no piece for this: it is a conformal quantile of a score transformed by the target
    (censored to ``-inf`` where ``y >= r``), one quantile per radius, which MAPIE's regressors (scores
    of the form ``y - f(x)``) and its risk controllers (a loss over a parameter grid) do not express;
    the order statistic is ``stats.conformal_quantile``'s (same rank as MAPIE's split conformal).

    Parameters
    ----------
    z : array_like of float
        ``z~`` per calibration point.
    reference : array_like of float
        ``y`` per calibration point (input l2 units).
    cap : float
        The calibration's radius cap: the grid ends there.
    sigma : float
        Noise level (the grid's unit).
    epsilon : float
        Target rate, in (0, 0.5).
    guarantee : {"marginal", "pac", "issued"}, optional
        The quantile rule, or LTT among issued certificates.
    delta : float, optional
        PAC / issued confidence parameter.
    points_per_sigma : int, optional
        Grid density.

    Returns
    -------
    dict
        ``grid`` (radii), ``tau`` (``null`` = ``+inf``: never certifies; ``TAU_BELOW_ALL`` = ``-inf``),
        ``score``, ``rule``, ``epsilon``, ``calibration_size``, ``points_per_sigma``.
    """
    z = np.asarray(z, dtype=float).reshape(-1)
    reference = np.asarray(reference, dtype=float).reshape(-1)
    m = len(z)
    grid = stats.radius_grid(cap, sigma, points_per_sigma)
    rank = quantile_rank(m, epsilon, guarantee, delta)
    tau = []
    for r in grid:
        if guarantee == "issued":
            value = issued_threshold(z, reference, float(r), epsilon, cast(float, delta))  # None is refused there
        else:
            scores = np.sort(stats.threshold_scores(z, reference, r))
            value = float("inf") if rank > m else float(scores[rank - 1])
        tau.append(None if value == float("inf") else max(value, TAU_BELOW_ALL))
    rule = {
        "marginal": "marginal conformal quantile, rank ceil((m + 1)(1 - epsilon))",
        "pac": f"PAC conformal quantile (delta = {delta})",
        "issued": f"Learn-then-Test over z~ thresholds ISSUED_Z_GRID, binomial p-values, fallback procedure "
        f"(delta = {delta}): the rate of y < r among inputs with z~ > tau(r)",
    }[guarantee]
    return dict(
        grid=[float(r) for r in grid],
        tau=tau,
        score="z~ where y < r, else -inf (stats.threshold_scores)",
        rule=rule,
        guarantee=guarantee,
        epsilon=float(epsilon),
        calibration_size=int(m),
        points_per_sigma=int(points_per_sigma),
        **({"delta": float(cast(float, delta))} if guarantee == "issued" else {}),
    )


# --------------------------------------------------------------------------- from files


# long: a long numpydoc docstring, and the Calibration record's fields one per line; the steps are helpers
def calibrate_arrays(
    surrogate,
    x,
    counts,
    epsilon: float,
    alpha_mc: float,
    guarantee: str = "marginal",
    delta: float | None = 0.05,
    groups: str = "none",
    method: str = "conformal",
    bin_edges: Sequence[float] | None = None,
    *,
    score: str = "residual",
    bins: int = SHIFT_BINS,
    tune_share: float = TUNE_SHARE,
    partition_seed: int = PARTITION_SEED,
    indices=None,
    labels=None,
    thresholds: bool = True,
    counts_topup=None,
    samples=None,
    planned_max: int | None = None,
    topup_stages: Sequence[int] | None = None,
    bin_edges_source: dict | None = None,
    noise_scheme: str | None = None,
    **provenance,
) -> Calibration:
    """Calibrate ``surrogate`` on calibration images ``x`` and their class ``counts`` (``N x K``).

    Every row of ``counts`` must hold the same number ``n_cal`` of noisy evaluations, drawn
    independently of the surrogate (the calibration split's counts); a topped-up file adds
    ``counts_topup``, ``samples`` and ``planned_max`` (``reference_radii``). Runs the surrogate once, then:

    - the best-radius offsets: ``score="residual"`` fits ``fit_offsets`` on every point (groups,
      guarantee and method as given); ``score="shifted"`` splits the points (``partition_rows``), fits
      the bins and offsets ``t_b`` on the tuning part (``fit_shifted``) and the conformal shift on the
      calibration part (``fit_offsets(shift=...)``, pooled);
    - with ``thresholds``, the required-radius thresholds on every point (``fit_radius_thresholds``).

    ``guarantee="issued"`` and ``method="ltt"`` are one option (``resolve_guarantee``); its thresholds are
    fitted by LTT too.

    Parameters
    ----------
    surrogate : Surrogate
        The trained surrogate.
    x : torch.Tensor
        ``N x C x H x W`` calibration images of the surrogate's input shape, pixels in [0, 1].
    counts : array_like of int
        ``N x K`` class counts of the base model under noise at the surrogate's sigma.
    epsilon, alpha_mc, guarantee, delta, groups, method, bin_edges
        As in ``fit_offsets``.
    score : {"residual", "shifted"}, optional
        The best-radius score (``core.one_pass.SCORES``); ``shifted`` needs ``groups="none"`` and
        ``method="conformal"``.
    bins : int, optional
        Bins of the shifted score.
    tune_share : float, optional
        Share of the points that tune the shifted score.
    partition_seed : int, optional
        Seed of the tuning / calibration partition.
    indices : array_like of int, optional
        Dataset index of each row (the partition's key); default ``0 .. N-1``.
    labels : array_like of int, optional
        True labels: the shifted score's tuning maximises the radius of correctly classified points.
    thresholds : bool, optional
        Also fit the required-radius thresholds (default).
    counts_topup, samples, planned_max
        A topped-up file's extra counts, samples per row and planned maximum (``reference_radii``).
    topup_stages : sequence of int, optional
        The top-up's stages (``topup_stages``): recorded, and checked against the rows
        (``check_topup_follows_stages``), so that an audit can replay the plan; without them a topped-up
        calibration cannot be audited.
    bin_edges_source : dict, optional
        Where ``bin_edges`` came from (recorded).
    noise_scheme : str, optional
        The scheme the counts were drawn with (None: float noise). The sound scheme's reference radii
        take its slack (``smoothing.noise_slack``); both are recorded, and deployment draws its fallback
        samples with the same scheme.
    **provenance
        ``Calibration`` fields to fill in (``counts_sha256``, ``base_model_sha256``, ``dataset``,
        ``split``, ...).

    Returns
    -------
    Calibration
        Bound to the surrogate's fingerprint, sigma and class count.

    Raises
    ------
    CalibrationError
        If ``counts`` is not ``N x K``, its rows hold different sample numbers, its rows do not match
        the images, or the set (or the calibration part) is too small.
    InvalidParameterError
        If an option is out of range or options contradict each other.
    InvalidInputError
        If ``x`` is not a valid image batch of the surrogate's input shape.
    """
    delta = check_calibration_params(epsilon, alpha_mc, guarantee, delta, groups, method)
    guarantee, method = resolve_guarantee(guarantee, method)
    if score not in SCORES:
        raise InvalidParameterError(f"score must be one of {SCORES}, got {score!r}")
    if score in ("shifted", "shaped") and (groups != "none" or method != "conformal"):
        raise InvalidParameterError(
            f"the {score} score is one pooled rule with a conformal shift: use it with "
            "groups='none' and the marginal or pac guarantee (not issued / ltt)"
        )
    counts, totals = _checked_counts(counts, surrogate.num_classes)
    predicted, p_tilde, z = surrogate.predict_z(x)
    if len(predicted) != len(counts):
        raise CalibrationError(f"{len(predicted)} calibration images but {len(counts)} rows of counts")
    n_cal = int(totals[0]) if len(totals) else 1
    sigma = float(surrogate.sigma)
    slack = noise_slack(noise_scheme, sigma, surrogate.input_shape)
    refs = _references(
        predicted, counts, n_cal, alpha_mc, sigma, slack, counts_topup, samples, planned_max, topup_stages
    )
    options = dict(
        sigma=sigma,
        num_classes=surrogate.num_classes,
        epsilon=epsilon,
        alpha_mc=alpha_mc,
        guarantee=guarantee,
        delta=delta,
        groups=groups,
        method=method,
        bin_edges=bin_edges,
    )
    fit, part, partition, score_params = _fit_score(
        score,
        options,
        predicted,
        p_tilde,
        z,
        counts,
        n_cal,
        refs,
        indices=indices,
        labels=labels,
        bins=bins,
        tune_share=tune_share,
        partition_seed=partition_seed,
    )
    fit.diagnostics["surrogate_agrees_with_counts"] = float(np.mean(predicted == counts.argmax(axis=1)))
    radius_thresholds = (
        fit_radius_thresholds(z, refs.radius, refs.cap, sigma, epsilon, guarantee=guarantee, delta=delta)
        if thresholds
        else None
    )
    return Calibration(
        surrogate_sha256=surrogate.fingerprint(),
        surrogate_file_sha256=getattr(surrogate, "file_sha256", None),
        sigma=sigma,
        num_classes=int(surrogate.num_classes),
        epsilon=float(epsilon),
        alpha_mc=float(alpha_mc),
        delta=delta,
        guarantee=guarantee,
        method=method,
        groups=groups,
        offsets=fit.offsets,
        pooled_offset=fit.pooled_offset,
        group_sizes=fit.group_sizes,
        fallback_groups=fit.fallback_groups,
        min_group_size=fit.min_group_size,
        radius_cap=fit.radius_cap,
        bin_edges=fit.bin_edges,
        calibration_size=int(part.sum()),
        n_cal=n_cal,
        package_version=__version__,
        diagnostics=fit.diagnostics,
        score=score,
        score_params=score_params,
        partition=partition,
        reference=refs.record,
        radius_thresholds=radius_thresholds,
        bin_edges_source=bin_edges_source,
        monitor_reference=monitor_reference(predicted[part], p_tilde[part]),  # the points m counts
        noise_scheme=noise_scheme,
        noise_slack=slack,
        **provenance,
    )


def _checked_counts(counts, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration ``counts`` as an ``N x K`` array with their row totals, all equal (``n_cal``)."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != num_classes:
        raise CalibrationError(
            f"calibration counts must be N x {num_classes} (the surrogate's classes), got shape {counts.shape}"
        )
    totals = counts.sum(axis=1)
    if len(totals) and np.any(totals != totals[0]):
        raise CalibrationError("every calibration row must hold the same number of noisy samples (n_cal)")
    return counts, totals


def _references(
    predicted,
    counts,
    n_cal: int,
    alpha_mc: float,
    sigma: float,
    slack: float,
    counts_topup,
    samples,
    planned_max,
    stages,
) -> ReferenceRadii:
    """The reference radii of the calibration rows (``reference_radii``), after checking that a topped-up
    file's rows follow its recorded stages."""
    if stages is not None and planned_max is not None:
        check_topup_follows_stages(
            counts,
            np.zeros_like(counts) if counts_topup is None else counts_topup,
            np.full(len(counts), n_cal) if samples is None else samples,
            check_stages(stages, n_cal, int(planned_max)),
        )
    return reference_radii(
        predicted,
        counts,
        n_cal,
        alpha_mc,
        sigma,
        counts_topup=counts_topup,
        samples=samples,
        planned_max=planned_max,
        stages=stages if planned_max is not None else None,
        slack=slack,
    )


def _fit_score(
    score: str,
    options: dict,
    predicted,
    p_tilde,
    z,
    counts,
    n_cal: int,
    refs: ReferenceRadii,
    *,
    indices,
    labels,
    bins: int,
    tune_share: float,
    partition_seed: int,
) -> tuple[OffsetFit, np.ndarray, dict | None, dict]:
    """The best-radius rule of ``score`` (``calibrate_arrays``): the offsets, the mask of the rows they were
    calibrated on, the tuning / calibration partition (None for the residual score) and the score's
    parameters. The shifted and shaped scores tune on one part of the rows and calibrate on the other."""
    rows = np.arange(len(predicted))
    if score not in ("shifted", "shaped"):
        fit = fit_offsets(p_tilde, predicted, counts[rows, predicted], n_cal, z=z, references=refs, **options)
        return fit, np.ones(len(rows), dtype=bool), None, {}
    indices = rows if indices is None else np.asarray(indices, dtype=np.int64)
    tune = partition_rows(indices, tune_share, partition_seed)
    partition = partition_record(indices, tune, tune_share, partition_seed)
    part = ~tune
    sigma, epsilon = options["sigma"], options["epsilon"]
    shift = None  # the shaped score's offsets take no shift
    if score == "shifted":
        radius_tilde = np.asarray(surrogate_radius(p_tilde, sigma, refs.cap), dtype=float)
        weight = None if labels is None else (predicted == np.asarray(labels)).astype(float)
        shifted = fit_shifted(
            z[tune], radius_tilde[tune], refs.radius[tune], epsilon, bins, None if weight is None else weight[tune]
        )
        score_params = shifted.params(bins)
        shift = shifted.shift(z[part])
    else:
        from .shaped import fit_shaped  # shaped builds on this module's thresholds

        score_params = fit_shaped(
            z[tune],
            refs.radius[tune],
            z[part],
            refs.radius[part],
            refs.cap,
            sigma,
            epsilon,
            guarantee=options["guarantee"],
            delta=options["delta"],
        )
    # Under the shaped score these residual offsets stay in the artifact for its diagnostics only.
    fit = fit_offsets(
        p_tilde[part],
        predicted[part],
        counts[rows[part], predicted[part]],
        n_cal,
        z=z[part],
        references=ReferenceRadii(refs.radius[part], refs.cap, refs.record),
        shift=shift,
        **options,
    )
    return fit, part, partition, score_params


def edges_from_counts(
    surrogate, counts_file, bins: int, data_root: str | None = None, *, key: bytes | str | None = None
) -> tuple[list[float], dict]:
    """Confidence-bin edges chosen on another split: equal-mass quantiles of ``z~`` over its images.

    For ``groups="confidence"``: the surrogate's outputs on the images of ``counts_file`` (its own
    training split, whose counts it was fitted on) fix ``bins - 1`` edges (``stats.equal_mass_edges``)
    before any calibration score is seen; only the images are read, never their counts.

    Parameters
    ----------
    surrogate : Surrogate
        The surrogate being calibrated.
    counts_file : str or os.PathLike
        A counts file of a split other than the calibration's (e.g. the surrogate's training file).
    bins : int
        Number of bins (>= 2).
    data_root : str, optional
        Where torchvision datasets are read from.

    Returns
    -------
    edges : list of float
        Strictly increasing edges on ``z~``.
    source : dict
        What the artifact records: the file's SHA-256 and split, the rule, ``bins``, and the number of images.

    Raises
    ------
    CalibrationError
        If the file is of the cal or test split (the edges would be fitted where the guarantee is measured),
        of another dataset, or gives fewer than two distinct bins.
    """
    bins = check_count("bins", bins, minimum=2)
    counts = read_counts(counts_file)
    split = str(counts.attrs["split"])
    if split in ("cal", "test"):
        raise CalibrationError(
            f"--edges-from {counts_file} is of the {split} split; choose the bin edges on the "
            "surrogate's training split (its counts file), never where the guarantee is measured"
        )
    try:
        check_counts_for(
            counts,
            counts_file,
            dataset=surrogate.meta.get("dataset"),
            num_classes=surrogate.num_classes,
            input_shape=surrogate.input_shape,
            complete=False,
            key=key,
        )
    except CountsMismatchError as exc:
        raise CalibrationError(str(exc)) from None
    _, _, z = surrogate.predict_z(counts.images(data_root))
    edges = [float(e) for e in stats.equal_mass_edges(z, bins)]
    if not edges:
        raise CalibrationError(f"the surrogate's confidence on {counts_file} takes one value: no bins to form")
    return edges, dict(
        file_sha256=sha256_file(counts_file),
        split=split,
        images=int(len(z)),
        bins=int(bins),
        rule="equal-mass quantiles of z~ on the images of this file",
    )


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def calibrate(
    surrogate,
    counts_file,
    epsilon: float,
    alpha_mc: float,
    guarantee: str = "marginal",
    delta: float | None = 0.05,
    groups: str = "none",
    method: str = "conformal",
    *,
    bin_edges: Sequence[float] | None = None,
    edges_from: str | None = None,
    bins: int | None = None,
    score: str = "residual",
    tune_share: float = TUNE_SHARE,
    partition_seed: int = PARTITION_SEED,
    thresholds: bool = True,
    data_root: str | None = None,
    device=None,
    key: bytes | str | None = None,
) -> Calibration:
    """Calibrate ``surrogate`` on a calibration counts file: returns a ``Calibration``.

    ``counts_file`` is an HDF5 counts file of the ``cal`` split (at the surrogate's sigma and class
    count, made with the surrogate's base model), whose images are read from the dataset it
    records; a topped-up file's extra samples enter the reference radii (``reference_radii``). The
    guarantee is that of ``calibrate_arrays``; the result binds the surrogate, the counts file and
    every option, and ``Calibration.save`` writes calibration.json.

    Parameters
    ----------
    surrogate : Surrogate or path
        A ``surrogate_cert.core.surrogate.Surrogate``, or a path to its checkpoint.
    counts_file : str or os.PathLike
        Complete counts file of the calibration split.
    epsilon, alpha_mc, guarantee, delta, groups, method, bin_edges
        As in ``fit_offsets``.
    edges_from : str, optional
        ``groups="confidence"``: choose ``bins`` equal-mass edges on the images of this counts file (the
        surrogate's training split; ``edges_from_counts``) instead of ``bin_edges``.
    bins : int, optional
        Bins of ``edges_from`` (default 5) or of the shifted score (default ``SHIFT_BINS``).
    score, tune_share, partition_seed, thresholds
        As in ``calibrate_arrays``.
    data_root : str, optional
        Where torchvision datasets are read from.
    device : str, torch.device or None, optional
        Where the surrogate runs, when loaded from a path.
    key : bytes or str, optional
        Signing key (default: the environment's, ``core.signing.resolve_key``): with one, the counts
        files (and a surrogate given as a path) must be signed under it. ``Calibration.save`` signs.

    Returns
    -------
    Calibration

    Raises
    ------
    CalibrationError
        If the counts file is of the train, surrogate or test split (the test split is certified: its
        images must not be the calibration's), of another dataset, class count, input
        shape or sigma, holds images the surrogate was trained on (by dataset index, recorded in the
        checkpoint; or its training split), was made with another base model, is incomplete, or is too small.
    InvalidParameterError
        If an option is out of range (``bins`` included: a whole number >= 1, never replaced by a default).
    StoreError
        If the counts file is missing, unreadable, not a counts file, contradicts itself, or (with a key)
        is not signed under it.
    ModelError
        If the surrogate checkpoint cannot be loaded.
    DatasetError
        If the images the counts file names cannot be loaded.
    """
    check_calibration_params(epsilon, alpha_mc, guarantee, delta, groups, method)
    if bins is not None:
        bins = check_count("bins", bins, minimum=2 if edges_from is not None else 1)
    if edges_from is not None and groups != "confidence":
        raise InvalidParameterError("--edges-from chooses confidence-bin edges: use it with --groups confidence")
    if edges_from is not None and bin_edges is not None:
        raise InvalidParameterError("give bin edges or a file to choose them on (edges_from), not both")
    if not isinstance(surrogate, Surrogate):
        surrogate = Surrogate.load(surrogate, device=device, key=key)
    counts = read_counts(counts_file)
    attrs = counts.attrs
    counts_sha256 = _check_calibration_counts(surrogate, counts, counts_file, key)
    images = counts.images(data_root)
    if "image_hashes" in surrogate.meta:  # the surrogate's training images, by content
        check_not_trained_on(surrogate, images, counts_file)
    source = None
    if edges_from is not None:
        bin_edges, source = edges_from_counts(surrogate, edges_from, 5 if bins is None else bins, data_root, key=key)
    elif groups == "confidence":
        source = dict(rule="given" if bin_edges is not None else "default edges DEFAULT_CONFIDENCE_EDGES")
    topped = attrs.get("topup_planned_max") is not None
    stages = (
        topup_stages(counts.n, json.loads(attrs.get("topup_history") or "[]"), counts.planned_max_samples)
        if topped
        else None
    )
    return calibrate_arrays(
        surrogate,
        images,
        counts.counts,
        epsilon,
        alpha_mc,
        guarantee=guarantee,
        delta=delta,
        groups=groups,
        method=method,
        bin_edges=bin_edges,
        score=score,
        bins=SHIFT_BINS if bins is None else bins,
        tune_share=tune_share,
        partition_seed=partition_seed,
        indices=counts.indices,
        labels=counts.labels,
        thresholds=thresholds,
        counts_topup=counts.counts_topup if topped else None,
        samples=counts.samples if topped else None,
        planned_max=counts.planned_max_samples if topped else None,
        topup_stages=stages,
        bin_edges_source=source,
        counts_sha256=counts_sha256,
        base_model_sha256=attrs.get("model_sha256") or None,
        dataset=str(attrs["dataset"]),
        split=str(attrs["split"]),
        noise_scheme=counts.noise_scheme,
    )


def _check_calibration_counts(surrogate, counts, counts_file, key) -> str:
    """A counts file fit to calibrate ``surrogate`` on: of the cal split (never a training split or the
    test split), of its dataset, sigma, classes, shape, base model and noise scheme, complete, holding
    none of its training images (by dataset index), and signed under ``key`` if one is set. Returns the
    file's SHA-256."""
    attrs = counts.attrs
    counts_sha256 = sha256_file(counts_file)
    trained_files = {r.get("sha256") for r in surrogate.meta.get("counts_files") or []} | {
        surrogate.meta.get("counts_sha256")
    }
    if str(attrs.get("split")) in ("train", "surrogate", "pool") or counts_sha256 in trained_files:
        raise CalibrationError(
            f"{counts_file} holds a training split ({attrs.get('split')}: its images are not exchangeable with the "
            "test split, or the surrogate was fitted on them); calibrate on the separate cal split"
        )
    trained_on = _trained_indices(surrogate, str(attrs["dataset"]))
    try:
        check_counts_for(
            counts,
            counts_file,
            dataset=_calibration_dataset(surrogate),
            sigma=surrogate.sigma,
            num_classes=surrogate.num_classes,
            input_shape=surrogate.input_shape,
            model_sha256=surrogate.meta.get("base_model_sha256"),
            complete=True,
            excluded_indices=trained_on,
            key=key,
            noise_scheme=surrogate_noise_scheme(surrogate),
        )
    except CountsMismatchError as exc:
        raise CalibrationError(str(exc)) from None
    if str(attrs.get("split")) == "test":
        raise CalibrationError(
            f"{counts_file} holds the test split: its images are the ones `certify --split test` "
            "certifies, and a calibration evaluated on its own images guarantees nothing; calibrate "
            "on the cal split"
        )
    return counts_sha256


def surrogate_noise_scheme(surrogate) -> str:
    """The noise scheme of the counts a surrogate was trained on (float v2 for checkpoints older than the field)."""
    return surrogate.meta.get("noise_scheme") or NOISE_SCHEME_V2


def _trained_indices(surrogate, dataset: str):
    """Index ranges of the surrogate's training images in ``dataset`` (None: none recorded there).

    ``train_index_ranges_by_dataset`` (sources may mix) where recorded; else ``train_index_ranges`` (one
    dataset), refusing a surrogate that records neither and was not trained on the train split.
    """
    by_dataset = surrogate.meta.get("train_index_ranges_by_dataset")
    if by_dataset is not None:
        return by_dataset.get(dataset_key(dataset))
    trained_on = surrogate.meta.get("train_index_ranges")
    if trained_on is None and surrogate.meta.get("split") not in (None, "train"):
        raise CalibrationError(
            f"the surrogate was trained on the {surrogate.meta.get('split')} split and records no training indices, "
            "so a leak into the calibration cannot be ruled out; retrain it with this version's `surrogate-cert train`"
        )
    return trained_on


def _calibration_dataset(surrogate) -> str | None:
    """The dataset a surrogate's calibration must come from: that of its labelled training files (a split of a
    dataset), or any (None) when it was trained on unlabeled pools and query logs alone."""
    files = surrogate.meta.get("counts_files") or []
    labelled = [r.get("dataset") for r in files if r.get("split") not in ("pool", "queries") and r.get("dataset")]
    if labelled:
        return labelled[0]
    return None if files and "image_hashes" in surrogate.meta else surrogate.meta.get("dataset")


def check_not_trained_on(surrogate, images, what="the calibration counts") -> None:
    """Refuse calibration images the surrogate was trained on, by content (``core.hashing.image_hashes``).

    Raises
    ------
    CalibrationError
        If one of ``images`` has the content hash of a training image, or the record is malformed.
    """
    try:
        trained = unpack_hashes(surrogate.meta["image_hashes"])
    except (KeyError, ValueError, TypeError):
        raise CalibrationError(
            "the surrogate's record of its training images (image_hashes) is malformed; retrain it "
            "with `surrogate-cert train`"
        ) from None
    overlap = np.isin(image_hashes(images), trained)
    if overlap.any():
        raise CalibrationError(
            f"{what} holds {int(overlap.sum())} images the surrogate was trained on (same content, first at row "
            f"{int(np.flatnonzero(overlap)[0])}); calibrate on images kept out of its training data, "
            "e.g. the cal split with a pool that excludes it"
        )


__all__ = [
    "check_not_trained_on",
    "P_CLIP",
    "CONFIDENCE_EDGES",
    "LTT_GRID_SIGMAS",
    "GUARANTEES",
    "METHODS",
    "GROUPINGS",
    "SCORES",
    "surrogate_radius",
    "radius_cap",
    "SurrogateRadiusRegressor",
    "reference_radius",
    "conformity_scores",
    "quantile_rank",
    "min_group_size",
    "mapie_offset",
    "ltt_offset",
    "group_keys",
    "all_group_keys",
    "OffsetFit",
    "fit_offsets",
    "calibrate_arrays",
    "calibrate",
    "deployed_radius",
    "check_calibration_params",
    "ReferenceRadii",
    "reference_radii",
    "expected_radius_cap",
    "REFERENCE_BOUNDS",
    "partition_rows",
    "partition_record",
    "allocate_bin_offsets",
    "ShiftedScore",
    "fit_shifted",
    "fit_radius_thresholds",
    "edges_from_counts",
    "TUNE_SHARE",
    "PARTITION_SEED",
    "SHIFT_BINS",
    "THRESHOLD_POINTS_PER_SIGMA",
    "MONITOR_STATISTIC",
    "monitor_reference",
    "resolve_guarantee",
    "FallbackProcedure",
    "issued_offset_grid",
    "issued_threshold",
    "ISSUED_GRID_STEP",
    "ISSUED_Z_GRID",
    "MAPIE_TOLERANCE",
    "ReferencePlan",
    "topup_stages",
    "check_stages",
    "check_topup_follows_stages",
    "TOPUP_RULE",
]
