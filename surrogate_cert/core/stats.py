"""Statistics of certification: every formula of DESIGN.md, as pure functions on numbers.

NumPy and SciPy only, no torch: the certifiers, the calibration and the reports call these and
never compute a bound themselves, so the guarantees can be read against DESIGN.md in one place.

Notation: ``k`` successes out of ``n`` (fixed sample) or ``s`` out of ``t`` (sequential); ``alpha``
an error probability; ``sigma`` the noise level; every radius is in input l2 units (pixels in
[0, 1]). Sections follow DESIGN.md: the fixed-sample (Cohen) bounds, the anytime-valid confidence
sequence and its priors, and the split-conformal calibration of the surrogate radius.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st
from scipy.optimize import elementwise as _elementwise
from scipy.special import betaln, logsumexp, ndtr, ndtri

from .errors import InvalidParameterError, check_count, check_positive, check_probability

__all__ = [
    # fixed sample
    "clopper_pearson", "lower_confidence_bound", "radius", "p_threshold", "max_radius",
    "cohen_certify", "predict_test",
    # anytime valid
    "beta_binomial_cs", "running_intersection", "check_prior_weight", "surrogate_prior",
    "prior_log_evidence",
    # split conformal
    "P_CLIP", "surrogate_radius", "reference_radius", "conformity_scores", "calibrated_radius",
    "confidence_bin", "conformal_rank", "conformal_quantile", "pac_conformal_rank",
    "min_calibration_size",
    # one-pass scores beyond the pooled residual (issue 10)
    "Z_MAX", "probit_confidence", "equal_mass_edges", "radius_grid", "threshold_scores", "grid_point_at_least",
    "TOPUP_PRIOR", "topup_reference_radius", "topup_max_radius",
    # checking a bound
    "binomial_allowance",
]

# Root brackets stop this far from 0 and 1; a bound beyond them is reported as 0 or 1 (conservative).
_EDGE = 1e-15
_XATOL = 1e-12


def _as_floats(value, name: str) -> np.ndarray:
    """``value`` as a float array; InvalidParameterError (never another exception) if it is not numbers."""
    try:
        arr = np.asarray(value)
        if arr.dtype.kind in "iuf":  # numbers only: not text, booleans, None or ragged lists
            return arr.astype(float, copy=False)
    except (TypeError, ValueError, OverflowError):
        pass
    raise InvalidParameterError(f"{name} must be a number or an array of numbers, got {value!r:.80}")


def _check_alpha(alpha, name: str = "alpha"):
    """``alpha`` (scalar or array) strictly inside (0, 1), as float or float array."""
    arr = _as_floats(alpha, name)
    if arr.ndim == 0:
        return check_probability(name, float(arr))
    if not np.all((arr > 0) & (arr < 1)):
        bad = arr[~((arr > 0) & (arr < 1))].ravel()[0]
        raise InvalidParameterError(f"{name} must lie strictly between 0 and 1 for every input, got {bad}")
    return arr


def _check_counts(k, n, k_name: str = "k", n_name: str = "n"):
    """Successes ``0 <= k <= n`` as float arrays (integers stored as floats for SciPy)."""
    k = _as_floats(k, k_name)
    n = _as_floats(n, n_name)
    if np.any(~np.isfinite(n)) or np.any(n < 0) or np.any(n != np.round(n)):
        raise InvalidParameterError(f"{n_name} must be a whole number >= 0")
    try:
        bad_k = np.any(~np.isfinite(k)) or np.any(k != np.round(k)) or np.any(k < 0) or np.any(k > n)
    except ValueError:  # shapes that do not broadcast
        raise InvalidParameterError(f"{k_name} and {n_name} must have matching shapes, got {k.shape} and {n.shape}") from None
    if bad_k:
        raise InvalidParameterError(f"{k_name} must be a whole number between 0 and {n_name}")
    return k, n


def _scalar_or_array(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value


# --------------------------------------------------------------------------- fixed sample (Cohen)

def clopper_pearson(k, n, alpha: float):
    """Two-sided Clopper-Pearson interval at level ``alpha`` for ``k`` successes in ``n`` trials.

    With probability at least ``1 - alpha`` the interval contains the success probability; each end
    alone fails with probability at most ``alpha / 2``. Exact at ``k = 0`` (lower = 0) and ``k = n``
    (upper = 1). Vectorised over ``k`` and ``n``.

    Returns
    -------
    (lower, upper) : floats or arrays

    Examples
    --------
    >>> lower, upper = clopper_pearson(5, 10, 0.05)
    >>> round(lower, 4), round(upper, 4)
    (0.1871, 0.8129)
    """
    alpha = _check_alpha(alpha)
    k, n = _check_counts(k, n)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, _st.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, _st.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return _scalar_or_array(lower), _scalar_or_array(upper)


def lower_confidence_bound(k, n, alpha: float):
    """One-sided Clopper-Pearson lower bound ``pL`` on ``p`` from ``k`` successes in ``n`` trials.

    With probability at least ``1 - alpha``, ``p >= pL``: Cohen et al.'s bound (the lower end of the
    two-sided interval at level ``2 * alpha``). 0 at ``k = 0``; ``alpha ** (1 / n)`` at ``k = n``.
    Vectorised.

    Examples
    --------
    >>> round(lower_confidence_bound(10_000, 10_000, 0.001), 6)
    0.999309
    >>> lower_confidence_bound(0, 100, 0.001)
    0.0
    """
    alpha = _check_alpha(alpha)
    k, n = _check_counts(k, n)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, _st.beta.ppf(alpha, k, n - k + 1), 0.0)
    return _scalar_or_array(lower)


def radius(p_lower, sigma: float):
    """Certified l2 radius ``sigma * Phi^{-1}(p_lower)`` where ``p_lower > 1/2``, else 0 (abstain).

    By Cohen et al.'s theorem, if ``p_A(x) >= p_lower > 1/2`` the smoothed classifier predicts ``A``
    on the open l2 ball of this radius around ``x``. Vectorised.

    Examples
    --------
    >>> round(radius(0.99, 0.25), 4)
    0.5816
    >>> radius(0.4, 0.25)
    0.0
    """
    sigma = check_positive("sigma", sigma)
    p_lower = _as_floats(p_lower, "p_lower")
    with np.errstate(invalid="ignore"):
        r = np.where(p_lower > 0.5, sigma * ndtri(np.clip(p_lower, 0.5, 1.0)), 0.0)
    return _scalar_or_array(r)


def p_threshold(target_radius, sigma: float):
    """``Phi(r / sigma)``: the lower bound on ``p_A`` needed to certify radius ``r`` (inverse of ``radius``).

    Examples
    --------
    >>> round(float(p_threshold(0.25, 0.25)), 4)
    0.8413
    """
    sigma = check_positive("sigma", sigma)
    return _scalar_or_array(ndtr(_as_floats(target_radius, "target_radius") / sigma))


def max_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius ``n`` samples can certify at level ``alpha``: all ``n`` agree.

    ``sigma * Phi^{-1}(alpha^(1/n))``: Cohen-n's ceiling, and the cap on a calibration reference
    radius made from ``n`` samples per point.

    Examples
    --------
    >>> round(max_radius(10_000, 0.001, 0.25), 3)
    0.8
    """
    return float(radius(lower_confidence_bound(n, n, alpha), sigma))


def cohen_certify(counts_select, counts, alpha: float, sigma: float):
    """Cohen et al.'s CERTIFY on class counts: ``(prediction, p_lower, radius)`` per input.

    ``counts_select`` (``N x K``, the ``n0`` selection samples) picks ``A = argmax``;
    ``counts`` (``N x K``, ``n`` *independent* estimation samples) gives ``k = counts[A]`` and
    ``pL = lower_confidence_bound(k, n, alpha)``; the radius is ``radius(pL, sigma)`` and the
    prediction is ``A``, or -1 (abstain) where the radius is 0. With probability at least
    ``1 - alpha`` per input, a non-abstaining certificate is correct, because the selection and
    estimation samples are independent.

    Examples
    --------
    >>> prediction, p_lower, r = cohen_certify([[2, 98]], [[10, 990]], 0.001, 0.25)
    >>> int(prediction[0]), round(float(r[0]), 3)
    (1, 0.495)
    """
    counts_select = np.atleast_2d(_as_floats(counts_select, "counts_select"))
    counts = np.atleast_2d(_as_floats(counts, "counts"))
    if counts_select.ndim != 2 or counts_select.shape != counts.shape or not counts.shape[1]:
        raise InvalidParameterError(f"selection and estimation counts must have the same shape, got "
                                    f"{counts_select.shape} and {counts.shape}")
    _check_counts(counts_select, counts_select.sum(axis=1, keepdims=True), "counts_select", "n0")
    _check_counts(counts, counts.sum(axis=1, keepdims=True), "counts", "n")
    top = counts_select.argmax(axis=1)
    n = counts.sum(axis=1)
    k = counts[np.arange(len(top)), top]
    p_lower = np.atleast_1d(lower_confidence_bound(k, n, alpha))
    r = np.atleast_1d(radius(p_lower, sigma))
    return np.where(r > 0, top, -1).astype(np.int64), p_lower, r


def predict_test(count_top: int, count_second: int, alpha: float) -> bool:
    """Cohen et al.'s PREDICT: True if the top class may be returned, False to abstain.

    Two-sided binomial test of ``count_top`` out of ``count_top + count_second`` against 1/2; the
    returned class differs from ``g(x)`` with probability at most ``alpha``.

    Examples
    --------
    >>> predict_test(62, 38, 0.05), predict_test(60, 40, 0.05)
    (True, False)
    """
    alpha = _check_alpha(alpha)
    top = check_count("count_top", count_top, minimum=0)
    second = check_count("count_second", count_second, minimum=0)
    if top + second == 0:
        return False
    return bool(_st.binomtest(top, top + second, 0.5).pvalue <= alpha)


# --------------------------------------------------------------------------- anytime-valid (E-process)

def _log_marginal(s, t, a, b, weights):
    """log of the Beta-binomial mixture numerator ``sum_j w_j B(a_j + s, b_j + t - s) / B(a_j, b_j)``.

    ``a``, ``b`` (and ``weights``) carry the mixture components on their last axis when
    ``weights`` is given; otherwise they broadcast with ``s`` as a single prior.
    """
    if weights is None:
        return betaln(a + s, b + t - s) - betaln(a, b)
    s_ = np.expand_dims(s, -1)
    t_ = np.expand_dims(t, -1)
    terms = np.log(weights) + betaln(a + s_, b + t_ - s_) - betaln(a, b)
    return logsumexp(terms, axis=-1)


def _log_martingale_minus_level(q, s, t, log_marginal, log_level):
    # log M_t(q) - log(1/alpha); positive means q is outside the confidence sequence.
    return log_marginal - s * np.log(q) - (t - s) * np.log1p(-q) - log_level


def _validate_prior(a, b, weights):
    a = _as_floats(a, "prior a")
    b = _as_floats(b, "prior b")
    if np.any(~np.isfinite(a)) or np.any(a <= 0) or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise InvalidParameterError("prior parameters a and b must be finite and > 0, e.g. a=b=0.5 (KT)")
    if weights is not None:
        weights = _as_floats(weights, "mixture weights")
        if np.any(weights < 0) or np.any(~np.isfinite(weights)) or np.any(weights.sum(axis=-1) <= 0):
            raise InvalidParameterError("mixture weights must be finite, >= 0 and not all 0")
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return a, b, weights


def beta_binomial_cs(s, t, alpha, a=0.5, b=0.5, weights=None):
    """Ends ``(L_t, U_t)`` of the Beta-binomial mixture confidence sequence for a Bernoulli mean.

    For i.i.d. Bernoulli(p) observations with ``s`` successes after ``t`` draws and a prior
    ``Beta(a, b)`` (or a mixture ``sum_j weights_j Beta(a_j, b_j)``, components on the last axis)
    fixed before sampling, ``M_t(q) = B(a + s, b + t - s) / B(a, b) / (q^s (1 - q)^(t - s))`` is a
    non-negative martingale with mean 1 when ``p = q``. By Ville's inequality,
    ``P(exists t: p not in (L_t, U_t)) <= alpha``, so the bound holds under any stopping rule.

    ``L_t`` and ``U_t`` solve ``log M_t(q) = log(1/alpha)`` on either side of ``s / t``; each is
    rounded outward (the returned interval contains the exact one). ``L_t = 0`` when ``s = 0`` and
    ``U_t = 1`` when ``s = t``. Vectorised over ``s``, ``t``, ``alpha`` and the prior, with SciPy's
    elementwise bracketing root finder (Chandrupatla's method), all in log space.

    Examples
    --------
    >>> lower, upper = beta_binomial_cs(1000, 1000, 0.001)
    >>> round(lower, 4), upper
    (0.9891, 1.0)
    """
    s, t = _check_counts(s, t, "s", "t")
    a, b, weights = _validate_prior(a, b, weights)
    log_level = -np.log(_check_alpha(alpha))
    with np.errstate(divide="ignore"):  # a zero mixture weight is a component that is not there
        log_marginal = _log_marginal(s, t, a, b, weights)
    s, t, log_marginal, log_level = np.broadcast_arrays(s, t, log_marginal, log_level)
    shape = s.shape
    s, t, log_marginal, log_level = (np.ravel(v).astype(float) for v in (s, t, log_marginal, log_level))

    lower = np.zeros(s.shape)
    upper = np.ones(s.shape)
    centre = np.clip(np.where(t > 0, s / np.maximum(t, 1), 0.5), _EDGE, 1 - _EDGE)
    lower = _solve_side(lower, s, t, log_marginal, log_level, np.full(s.shape, _EDGE), centre, keep="left")
    upper = _solve_side(upper, s, t, log_marginal, log_level, centre, np.full(s.shape, 1 - _EDGE), keep="right")
    if shape == ():
        return float(lower[0]), float(upper[0])
    return lower.reshape(shape), upper.reshape(shape)


def _solve_side(default, s, t, log_marginal, log_level, lo, hi, keep):
    """Root of ``log M_t - log(1/alpha)`` in ``(lo, hi)``, rounded to the bracket end outside the CS."""
    out = default.copy()
    f_lo = _log_martingale_minus_level(lo, s, t, log_marginal, log_level)
    f_hi = _log_martingale_minus_level(hi, s, t, log_marginal, log_level)
    # A root exists only where the function changes sign inside the bracket; elsewhere the bound
    # lies beyond the edge and the default (0 or 1) is the conservative answer.
    has_root = (t > 0) & (lo < hi) & (np.sign(f_lo) * np.sign(f_hi) < 0)
    if np.any(has_root):
        idx = np.flatnonzero(has_root)
        res = _elementwise.find_root(
            _log_martingale_minus_level,
            (lo[idx], hi[idx]),
            args=(s[idx], t[idx], log_marginal[idx], log_level[idx]),
            tolerances=dict(xatol=_XATOL, xrtol=0.0),
        )
        xl, xr = res.bracket
        # Left of s/t the function decreases, so the left bracket end is outside the CS (f > 0);
        # right of s/t it increases, so the right end is. Either way the interval only widens.
        out[idx] = xl if keep == "left" else xr
    return out


def running_intersection(lower_prev, upper_prev, lower, upper):
    """``(max(L*_{t-1}, L_t), min(U*_{t-1}, U_t))``: the intersection of a CS over time stays valid.

    Examples
    --------
    >>> running_intersection(0.6, 0.9, 0.55, 0.8)
    (0.6, 0.8)
    """
    return _scalar_or_array(np.maximum(lower_prev, lower)), _scalar_or_array(np.minimum(upper_prev, upper))


def check_prior_weight(w) -> float:
    """The KT weight ``w`` of the surrogate mixture prior, checked to lie in [0, 1].

    ``w = 1`` is the KT prior alone, ``w = 0`` the surrogate's Beta alone; both keep validity (any
    prior fixed before sampling does), ``0 < w < 1`` guards power against a wrong surrogate.

    Examples
    --------
    >>> check_prior_weight(0.1)
    0.1
    """
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"prior weight w must be a number in [0, 1], got {w!r}") from None
    if not 0.0 <= w <= 1.0:
        raise InvalidParameterError(f"KT mixture weight w must lie in [0, 1], got {w}; e.g. w=0.1")
    return w


def surrogate_prior(p_tilde, kappa: float, w: float):
    """Mixture prior ``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` for each input.

    Returns ``(a, b, weights)`` with the two components on the last axis, ready for
    ``beta_binomial_cs``. Against either component the mixture loses at most ``log(1/w)`` or
    ``log(1/(1-w))`` of evidence; validity never depends on the surrogate being right.

    Examples
    --------
    >>> a, b, weights = surrogate_prior([0.8], kappa=100.0, w=0.2)
    >>> a.round(6).tolist(), b.round(6).tolist(), weights.tolist()
    ([[0.5, 80.0]], [[0.5, 20.0]], [[0.2, 0.8]])
    """
    kappa = check_positive("prior concentration kappa", kappa)
    w = check_prior_weight(w)
    p = _as_floats(p_tilde, "p_tilde")
    if np.any(~np.isfinite(p)):
        raise InvalidParameterError("surrogate probabilities p_tilde must be finite")
    # Clipping keeps both Beta parameters > 0; the prior only moves power, never validity.
    p = np.clip(p, 1e-6, 1 - 1e-6)
    half = np.full(p.shape, 0.5)
    a = np.stack([half, kappa * p], axis=-1)
    b = np.stack([half, kappa * (1 - p)], axis=-1)
    weights = np.broadcast_to(np.array([w, 1 - w]), a.shape)
    return a, b, weights


def prior_log_evidence(counts_top, n, p_tilde, kappa: float, w: float) -> float:
    """Sum over inputs of ``log P(k_i | n)`` under ``surrogate_prior(p~_i, kappa, w)``.

    ``counts_top[i]`` successes of the surrogate's class out of ``n`` (the Beta-binomial marginal
    likelihood). The sequential test's e-value is exactly this mixture likelihood divided by the
    likelihood at the threshold, so the prior that best predicts fresh counts stops soonest.

    Examples
    --------
    >>> good = prior_log_evidence([99, 98], 100, [0.99, 0.98], kappa=200.0, w=0.1)
    >>> bad = prior_log_evidence([99, 98], 100, [0.5, 0.5], kappa=200.0, w=0.1)
    >>> bool(good > bad)
    True
    """
    a, b, weights = surrogate_prior(p_tilde, kappa, w)
    k, n_arr = _check_counts(counts_top, n, "counts_top", "n")
    if k.ndim != 1 or a.shape[0] != k.shape[0]:
        raise InvalidParameterError(f"counts_top and p_tilde must have one entry per input, got {k.shape} and "
                                    f"{np.shape(p_tilde)}")
    k = k[:, None]
    logpmf = _st.betabinom.logpmf(k, np.asarray(n)[..., None] if np.ndim(n) else n, a, b)
    return float(np.sum(logsumexp(logpmf + np.log(weights), axis=1)))


# --------------------------------------------------------------------------- split conformal

P_CLIP = 1e-6
"""Surrogate probabilities are clipped to ``[P_CLIP, 1 - P_CLIP]`` before ``Phi^{-1}``: radii stay finite."""


def surrogate_radius(p_tilde, sigma: float, radius_cap: float = np.inf):
    """``R~ = min(sigma * Phi^{-1}(clip(p~)), radius_cap)``: the uncalibrated surrogate radius.

    A point estimate, not a certificate: it may be negative (``p~ < 1/2``), and it is only
    conservative after the conformal offset (``calibrated_radius``). ``radius_cap`` is the largest
    reference radius the calibration counts can express (``max_radius(n_cal, alpha_mc, sigma)``).

    Examples
    --------
    >>> round(float(surrogate_radius(0.99, 0.25)), 4), float(surrogate_radius(0.99, 0.25, 0.5))
    (0.5816, 0.5)
    """
    sigma = check_positive("sigma", sigma)
    p = np.clip(_as_floats(p_tilde, "p_tilde"), P_CLIP, 1 - P_CLIP)
    return _scalar_or_array(np.minimum(sigma * ndtri(p), radius_cap))


def reference_radius(counts_top, n_cal, alpha_mc: float, sigma: float):
    """``y = max(sigma * Phi^{-1}(pL), 0)``, ``pL`` the one-sided Clopper-Pearson bound at ``alpha_mc``.

    ``counts_top`` are the calibration counts of the *surrogate's* class out of ``n_cal`` (scalar
    or per point). For each point, with probability at least ``1 - alpha_mc``, ``y`` is at most the
    true certified radius of that class (0 when the class is not the smoothed prediction), because
    the class was fixed by the surrogate before the counts were drawn.

    Examples
    --------
    >>> round(float(reference_radius(990, 1000, 0.001, 0.25)), 3)
    0.495
    """
    return _scalar_or_array(np.asarray(radius(lower_confidence_bound(counts_top, n_cal, alpha_mc), sigma), dtype=float))


def conformity_scores(radius_surrogate, reference):
    """Scores ``R~ - y``: how far the surrogate radius overshoots the reference radius.

    Examples
    --------
    >>> conformity_scores([0.5, 0.2], [0.4, 0.3]).round(2).tolist()
    [0.1, -0.1]
    """
    return np.asarray(radius_surrogate, dtype=float) - np.asarray(reference, dtype=float)


def calibrated_radius(p_tilde, sigma: float, radius_cap: float, offset):
    """``R^ = R~ - q^``: the deployed one-pass radius; the surrogate certifies iff ``R^ > 0``.

    ``offset`` is the conformal quantile ``q^`` of the input's group (scalar or per input; ``inf``
    never certifies). If calibration and test inputs are exchangeable, ``P(R^ > y) <= epsilon``.

    Examples
    --------
    >>> round(float(calibrated_radius(0.99, 0.25, 0.8, 0.1)), 4)
    0.4816
    """
    return _scalar_or_array(np.asarray(surrogate_radius(p_tilde, sigma, radius_cap), dtype=float)
                            - np.asarray(offset, dtype=float))


def confidence_bin(p_tilde, edges, z=None):
    """Mondrian bin of each input by surrogate confidence: ``digitize(Phi^{-1}(clip(p~)), edges)``.

    ``edges`` are increasing cut points on the ``Phi^{-1}(p~)`` (sigma-units radius) scale, fixed
    before calibration (from the surrogate or the train split alone), so that calibration and test
    inputs in one bin stay exchangeable. Bin ``j`` holds ``edges[j-1] <= Phi^{-1}(p~) < edges[j]``.
    ``z`` (``probit_confidence``, accurate where ``p~`` rounds to 1) replaces ``Phi^{-1}(clip(p~))``
    when given; the two agree below ``p~ = 1 - P_CLIP``.

    Examples
    --------
    >>> confidence_bin([0.6, 0.9, 0.99, 0.9999], [1.0, 2.0, 3.0]).tolist()
    [0, 1, 2, 3]
    """
    edges = _as_floats(edges, "bin edges")
    if edges.ndim != 1 or np.any(~np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise InvalidParameterError(f"bin edges must be finite and strictly increasing, got {edges.tolist()}")
    if z is None:
        z = ndtri(np.clip(_as_floats(p_tilde, "p_tilde"), P_CLIP, 1 - P_CLIP))
    return np.digitize(_as_floats(z, "z"), edges)


def conformal_rank(m: int, epsilon: float) -> int:
    """``ceil((m + 1)(1 - epsilon))``: the 1-based rank of the split-conformal score quantile.

    If ``m`` calibration scores and a test score are exchangeable, the test score exceeds the score
    of this rank with probability at most ``epsilon`` (marginally). A rank above ``m`` means the
    quantile is infinite: ``m`` is too small for ``epsilon``.

    Examples
    --------
    >>> conformal_rank(99, 0.1), conformal_rank(5, 0.1)
    (90, 6)
    """
    check_probability("epsilon", epsilon)
    m = check_count("m", m, minimum=0)
    return int(math.ceil((m + 1) * (1 - epsilon) - 1e-12))


def conformal_quantile(scores, epsilon: float) -> float:
    """The ``conformal_rank``-th smallest of ``scores``, or ``+inf`` if that rank exceeds ``m``.

    Examples
    --------
    >>> conformal_quantile(range(99), 0.1), conformal_quantile(range(5), 0.1)
    (89.0, inf)
    """
    scores = np.sort(np.asarray(scores, dtype=float))
    k = conformal_rank(len(scores), epsilon)
    return float("inf") if k > len(scores) else float(scores[k - 1])


def pac_conformal_rank(m: int, epsilon: float, delta: float) -> int:
    """Smallest rank ``k`` whose coverage is >= ``1 - epsilon`` with probability >= ``1 - delta``.

    The coverage of the ``k``-th smallest of ``m`` exchangeable scores is ``Beta(k, m + 1 - k)``
    distributed (Vovk 2012), so ``k`` is the smallest rank with ``BetaCDF(1 - epsilon) <= delta``.
    Returns ``m + 1`` (infinite quantile) if no rank qualifies.

    Examples
    --------
    >>> pac_conformal_rank(1000, 0.1, 0.01)
    922
    """
    m = check_count("m", m, minimum=0)
    epsilon = check_probability("epsilon", epsilon)
    delta = check_probability("delta", delta)
    ks = np.arange(1, m + 1)
    ok = _st.beta.cdf(1 - epsilon, ks, m + 1 - ks) <= delta
    return int(ks[np.argmax(ok)]) if np.any(ok) else m + 1


def min_calibration_size(epsilon: float, delta: float | None = None) -> int:
    """Smallest calibration (group) size ``m`` whose quantile is finite (PAC when ``delta`` is given).

    Examples
    --------
    >>> min_calibration_size(0.01), min_calibration_size(0.01, 0.05)
    (99, 299)
    """
    epsilon = check_probability("epsilon", epsilon)
    if delta is None:
        return int(math.ceil(1 / epsilon - 1 - 1e-12))
    delta = check_probability("delta", delta)
    # The largest rank, m, has coverage Beta(m, 1): CDF(1 - eps) = (1 - eps)^m <= delta.
    return int(math.ceil(math.log(delta) / math.log1p(-epsilon) - 1e-12))


# --------------------------------------------------------------------------- one-pass: probit scale, thresholds, top-up

Z_MAX = 37.5
"""``|Phi^{-1}(p~)|`` is clipped here: the probit of the smallest positive double (``exp(-745)``)."""


def probit_confidence(log_p, log_1mp):
    """``z~ = Phi^{-1}(p~)`` from ``log p~`` and ``log(1 - p~)``, accurate in both tails (float64).

    Near ``p~ = 1`` the probability itself rounds to 1 in float64 (``1 - p~ < 1.1e-16``), so the upper
    tail is computed as ``-Phi^{-1}(1 - p~)`` from ``log(1 - p~)`` (a log-sum-exp of the other classes'
    logits). A point estimate, not a bound: calibration turns it into one. Clipped to
    ``[-Z_MAX, Z_MAX]``.

    Examples
    --------
    >>> import math
    >>> round(float(probit_confidence(math.log(0.975), math.log(0.025))), 4)
    1.96
    >>> round(float(probit_confidence(0.0, -60.0)), 3)  # p~ = 1 - 8.8e-27: beyond float64's 1 - p~
    10.65
    """
    log_p = _as_floats(log_p, "log_p")
    log_1mp = _as_floats(log_1mp, "log_1mp")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        upper = -ndtri(np.exp(np.minimum(log_1mp, 0.0)))
        lower = ndtri(np.exp(np.minimum(log_p, 0.0)))
        z = np.where(log_1mp < log_p, upper, lower)
    return _scalar_or_array(np.clip(np.nan_to_num(z, nan=0.0), -Z_MAX, Z_MAX))


def equal_mass_edges(values, bins: int):
    """``bins - 1`` cut points splitting ``values`` into ``bins`` groups of equal mass (duplicates dropped).

    The quantiles at ``j / bins``, ``j = 1 .. bins - 1``, rounded to 1e-6 and made strictly increasing.
    Used on data that the calibration points never enter (a tuning part, the train split), so the bins
    are fixed before the calibration scores are computed.

    Examples
    --------
    >>> equal_mass_edges(range(100), 4).tolist()
    [24.75, 49.5, 74.25]
    >>> equal_mass_edges([1.0] * 10, 3).tolist()
    [1.0]
    """
    values = _as_floats(values, "values").reshape(-1)
    bins = check_count("bins", bins, minimum=1)
    if bins == 1 or not values.size:
        return np.zeros(0)
    cuts = np.quantile(values, np.arange(1, bins) / bins)
    return np.unique(np.round(cuts, 6))


def radius_grid(radius_cap: float, sigma: float, points_per_sigma: int = 50):
    """Radii ``r_j = j * sigma / points_per_sigma`` up to ``radius_cap``, then ``radius_cap`` itself.

    The radii at which required-radius thresholds are calibrated (input l2 units); a required radius
    ``r*`` uses the first grid radius ``>= r*`` (``grid_point_at_least``), so the grid only rounds up.

    Examples
    --------
    >>> radius_grid(0.8, 0.25, 4).tolist()
    [0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8]
    """
    sigma = check_positive("sigma", sigma)
    cap = check_positive("radius_cap", radius_cap)
    step = sigma / check_count("points_per_sigma", points_per_sigma)
    grid = step * np.arange(1, int(np.floor(cap / step + 1e-9)) + 1)
    if not grid.size or grid[-1] < cap - 1e-12:
        grid = np.append(grid, cap)
    return np.round(grid, 12)


def grid_point_at_least(grid, radius):
    """Index of the first grid radius ``>= radius`` (``len(grid)`` where none is: beyond the grid).

    Examples
    --------
    >>> grid_point_at_least([0.1, 0.2, 0.3], [0.05, 0.2, 0.21, 0.4]).tolist()
    [0, 1, 2, 3]
    """
    grid = _as_floats(grid, "grid")
    return np.searchsorted(grid, _as_floats(radius, "radius") - 1e-12, side="left")


def threshold_scores(z, reference, target_radius: float):
    """Scores of the required-radius rule at radius ``r``: ``z~_i`` where ``y_i < r``, else ``-inf``.

    A point whose reference radius reaches ``r`` cannot be wrong at ``r`` and scores ``-inf``. If ``m``
    calibration points and a test point are exchangeable and ``tau(r)`` is the conformal quantile of the
    ``m`` scores at level ``epsilon`` (``conformal_quantile``), then
    ``P(z~ > tau(r) and y < r) <= epsilon`` for the test point: certifying ``(A, r)`` iff
    ``z~ > tau(r)`` is wrong with probability at most ``epsilon + alpha_mc`` (``y`` is below the true
    radius but with probability ``alpha_mc``). Valid for each fixed ``r``.

    Examples
    --------
    >>> threshold_scores([3.0, 1.0, 2.0], [0.5, 0.1, 0.3], 0.4).tolist()
    [-inf, 1.0, 2.0]
    """
    z = _as_floats(z, "z")
    reference = _as_floats(reference, "reference")
    return np.where(reference < float(target_radius), z, -np.inf)


TOPUP_PRIOR = ((0.5, 1.0), (0.5, 0.01), (0.5, 0.5))
"""``(a, b, weights)`` of the confidence sequence of a topped-up reference: ``0.5 KT + 0.5 Beta(1, 0.01)``,
fixed in advance (the second component puts its mass near ``p = 1``, where topped-up points lie)."""


def topup_reference_radius(k_first, n_first, successes, samples, alpha_mc: float, sigma: float,
                           prior=TOPUP_PRIOR):
    """Reference radius of a calibration point whose samples were topped up by a data-dependent rule.

    ``y = radius(max(CP_{alpha_mc/2}(k_first, n_first), CS_{alpha_mc/2}(successes, samples)))``: the
    one-sided Clopper-Pearson bound on the first ``n_first`` samples (a fixed number) and the
    Beta-binomial mixture confidence sequence (``beta_binomial_cs`` with ``prior``, fixed in advance)
    on all ``samples`` drawn. The CS holds at any stopping time (Ville's inequality), so whatever rule
    decided how many samples to add after looking at the first ones, ``y`` exceeds the true radius
    with probability at most ``alpha_mc / 2 + alpha_mc / 2``. A Clopper-Pearson bound on all samples
    would not be valid under such a rule.

    Examples
    --------
    >>> round(float(topup_reference_radius(10_000, 10_000, 30_000, 30_000, 0.001, 0.25)), 3)
    0.863
    >>> round(float(topup_reference_radius(9_990, 10_000, 9_990, 10_000, 0.001, 0.25)), 3)
    0.701
    """
    a, b, weights = (np.asarray(v, dtype=float) for v in prior)
    half = _check_alpha(alpha_mc) / 2
    cp = lower_confidence_bound(k_first, n_first, half)
    successes, samples = _check_counts(successes, samples, "successes", "samples")
    cs, _ = beta_binomial_cs(successes, samples, half, a, b, weights)
    return _scalar_or_array(np.asarray(radius(np.maximum(cp, cs), sigma), dtype=float))


def topup_max_radius(n_first: int, max_samples: int, alpha_mc: float, sigma: float, prior=TOPUP_PRIOR) -> float:
    """The radius cap of a topped-up calibration: ``topup_reference_radius`` of a point whose
    ``max_samples`` samples (the planned maximum, fixed before calibration) all agree.

    Examples
    --------
    >>> round(topup_max_radius(10_000, 10_000, 0.001, 0.25), 3), round(topup_max_radius(10_000, 100_000, 0.001, 0.25), 3)
    (0.793, 0.941)
    """
    return float(topup_reference_radius(n_first, n_first, max_samples, max_samples, alpha_mc, sigma, prior))


# --------------------------------------------------------------------------- checking a bound

def binomial_allowance(num: int, rate: float, level: float = 0.999) -> int:
    """Most wrong certificates out of ``num`` that a procedure wrong w.p. ``<= rate`` explains.

    The ``level``-quantile of ``Binomial(num, rate)``: a valid procedure exceeds it with probability
    at most ``1 - level``. Used by the soundness tests, the bench and the reports alike.

    Examples
    --------
    >>> binomial_allowance(1000, 0.001), binomial_allowance(1000, 0.011)
    (5, 22)
    """
    num = check_count("num", num, minimum=0)
    rate = _as_floats(rate, "rate")
    if rate.ndim or not 0.0 <= float(rate) <= 1.0:
        raise InvalidParameterError(f"rate must be a probability in [0, 1], got {rate}")
    level = check_probability("level", level)
    return int(_st.binom.ppf(level, num, float(rate))) if num else 0
