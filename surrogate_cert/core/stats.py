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
from collections.abc import Callable

import numpy as np
from scipy import stats as _st
from scipy.special import betainc, betaln, logsumexp, ndtr, ndtri

from .errors import InvalidParameterError, check_count, check_positive, check_probability

__all__ = [
    # fixed sample
    "clopper_pearson",
    "lower_confidence_bound",
    "radius",
    "p_threshold",
    "max_radius",
    # the sound (grid) noise scheme: radius of the distribution actually sampled
    "grid_slack",
    "grid_radius",
    "grid_p_threshold",
    "cohen_certify",
    "predict_test",
    # anytime valid
    "beta_mixture_log_marginal",
    "log_martingale",
    "confidence_sequence_ends",
    "beta_binomial_cs",
    "threshold_test",
    "running_intersection",
    "cumulative_intersection",
    "truncated_prior",
    "RADIUS_PRIOR_EPS",
    "radius_prior",
    "sample_floor",
    # the give-up side of the target test, and the hybrid's refinement of best radii (issue 21)
    "GIVE_UP_B0",
    "give_up_prior",
    "give_up_test",
    "refine_gain",
    "shaped_scores",
    "shaped_radius",
    "lookahead_counts",
    "radius_gain",
    "expected_radius_gain",
    "priced_horizons",
    "priced_continue",
    "check_prior_weight",
    "surrogate_prior",
    "prior_log_evidence",
    # split conformal
    "P_CLIP",
    "surrogate_radius",
    "reference_radius",
    "conformity_scores",
    "calibrated_radius",
    "probit_of_probability",
    "confidence_bin",
    "conformal_rank",
    "conformal_quantile",
    "pac_conformal_rank",
    "min_calibration_size",
    # watching a deployment: drift (conformal test martingale) and audit
    "smoothed_p_value",
    "online_p_values",
    "drift_windows",
    "drift_bets",
    "fixed_share_update",
    "beta_binomial_log_martingale",
    "cs_lower_exceeds",
    "audit_threshold",
    # one-pass scores beyond the pooled residual (issue 10)
    "Z_MAX",
    "probit_confidence",
    "equal_mass_edges",
    "radius_grid",
    "threshold_scores",
    "grid_point_at_least",
    "TOPUP_PRIOR",
    "topup_reference_radius",
    "topup_max_radius",
    # checking a bound
    "binomial_allowance",
]


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
        raise InvalidParameterError(
            f"{k_name} and {n_name} must have matching shapes, got {k.shape} and {n.shape}"
        ) from None
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


def radius(p_lower, sigma: float, *, slack: float = 0.0):
    """Certified l2 radius ``sigma * Phi^{-1}(p_lower)`` where ``p_lower > 1/2``, else 0 (abstain).

    By Cohen et al.'s theorem, if ``p_A(x) >= p_lower > 1/2`` the smoothed classifier predicts ``A``
    on the open l2 ball of this radius around ``x``. ``slack`` > 0 is the noise scheme's distance
    from its ideal law (``grid_slack``): the radius is then ``grid_radius(p_lower, sigma, slack)``.
    Vectorised.

    Examples
    --------
    >>> round(radius(0.99, 0.25), 4)
    0.5816
    >>> radius(0.4, 0.25)
    0.0
    """
    sigma = check_positive("sigma", sigma)
    if slack:
        return grid_radius(p_lower, sigma, slack)
    p_lower = _as_floats(p_lower, "p_lower")
    with np.errstate(invalid="ignore"):
        r = np.where(p_lower > 0.5, sigma * ndtri(np.clip(p_lower, 0.5, 1.0)), 0.0)
    return _scalar_or_array(r)


def p_threshold(target_radius, sigma: float, *, slack: float = 0.0):
    """``Phi(r / sigma)``: the lower bound on ``p_A`` needed to certify radius ``r`` (inverse of ``radius``).

    With ``slack`` > 0 it is ``grid_p_threshold(r, sigma, slack)``, the inverse of ``grid_radius``.

    Examples
    --------
    >>> round(float(p_threshold(0.25, 0.25)), 4)
    0.8413
    """
    sigma = check_positive("sigma", sigma)
    if slack:
        return grid_p_threshold(target_radius, sigma, slack)
    return _scalar_or_array(ndtr(_as_floats(target_radius, "target_radius") / sigma))


def max_radius(n: int, alpha: float, sigma: float, *, slack: float = 0.0) -> float:
    """The largest radius ``n`` samples can certify at level ``alpha``: all ``n`` agree.

    ``sigma * Phi^{-1}(alpha^(1/n))``: Cohen-n's ceiling, and the cap on a calibration reference
    radius made from ``n`` samples per point (``slack``: see ``radius``).

    Examples
    --------
    >>> round(max_radius(10_000, 0.001, 0.25), 3)
    0.8
    """
    return float(radius(lower_confidence_bound(n, n, alpha), sigma, slack=slack))


def cohen_certify(counts_select, counts, alpha: float, sigma: float, *, slack: float = 0.0):
    """Cohen et al.'s CERTIFY on class counts: ``(prediction, p_lower, radius)`` per input.

    ``counts_select`` (``N x K``, the ``n0`` selection samples) picks ``A = argmax``;
    ``counts`` (``N x K``, ``n`` *independent* estimation samples) gives ``k = counts[A]`` and
    ``pL = lower_confidence_bound(k, n, alpha)``; the radius is ``radius(pL, sigma)`` and the
    prediction is ``A``, or -1 (abstain) where the radius is 0. With probability at least
    ``1 - alpha`` per input, a non-abstaining certificate is correct, because the selection and
    estimation samples are independent. ``slack``: the noise scheme's (``radius``).

    Examples
    --------
    >>> prediction, p_lower, r = cohen_certify([[2, 98]], [[10, 990]], 0.001, 0.25)
    >>> int(prediction[0]), round(float(r[0]), 3)
    (1, 0.495)
    """
    counts_select = np.atleast_2d(_as_floats(counts_select, "counts_select"))
    counts = np.atleast_2d(_as_floats(counts, "counts"))
    if counts_select.ndim != 2 or counts_select.shape != counts.shape or not counts.shape[1]:
        raise InvalidParameterError(
            f"selection and estimation counts must have the same shape, got {counts_select.shape} and {counts.shape}"
        )
    _check_counts(counts_select, counts_select.sum(axis=1, keepdims=True), "counts_select", "n0")
    _check_counts(counts, counts.sum(axis=1, keepdims=True), "counts", "n")
    top = counts_select.argmax(axis=1)
    n = counts.sum(axis=1)
    k = counts[np.arange(len(top)), top]
    p_lower = np.atleast_1d(lower_confidence_bound(k, n, alpha))
    r = np.atleast_1d(radius(p_lower, sigma, slack=slack))
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


# --------------------------------------------------------------------------- the sound (grid) noise scheme
#
# The sound scheme (``core.grid_noise``) samples, per pixel, a law pi^ within total variation tv of the
# Gaussian rounded to the 1/255 grid, pi. For an image on the grid, smoothing with pi is Gaussian smoothing
# of f o round, so Cohen et al.'s theorem holds for pi exactly. The certificate is about the classifier
# actually sampled, g^ (noise pi^), and the counts estimate p^_A = P_{pi^}(f(x + eps) = A). Over d pixels
# TV(pi^d, pi^d) <= d tv =: delta (coupling), so p_A >= p^_A - delta; Cohen's theorem for pi gives
# p_A(x') >= Phi(Phi^{-1}(p^_A - delta) - |x' - x| / sigma); and p^_A(x') >= p_A(x') - delta > 1/2 while
# |x' - x| < sigma (Phi^{-1}(p^_A - delta) - Phi^{-1}(1/2 + delta)). Any lower bound on p^_A may replace it.


def grid_slack(tv_per_pixel: float, pixels: int) -> float:
    """``delta = min(1, pixels * tv)``: total variation between the sampled and the ideal law of a whole input.

    The noise of the ``pixels`` coordinates is independent, so a coupling of each coordinate (each
    failing with probability at most ``tv_per_pixel``) fails with probability at most their sum.
    Rounded up (one ulp) so the float never understates the product.

    Examples
    --------
    >>> grid_slack(1e-17, 784) > 7.8e-15
    True
    >>> grid_slack(0.3, 4)
    1.0
    """
    tv = float(tv_per_pixel)
    if not (math.isfinite(tv) and tv >= 0):
        raise InvalidParameterError(f"tv_per_pixel must be a number >= 0, got {tv_per_pixel!r}")
    pixels = check_count("pixels", pixels)
    return min(1.0, math.nextafter(tv * pixels, math.inf)) if tv else 0.0


def grid_radius(p_lower, sigma: float, slack: float):
    """Certified l2 radius of the law actually sampled: ``sigma (Phi^{-1}(pL - delta) - Phi^{-1}(1/2 + delta))``.

    ``p_lower`` bounds ``p^_A`` (the sampled law's probability of class ``A``) from below and
    ``delta = slack`` bounds the total variation between the sampled law and the rounded Gaussian of
    the same ``sigma`` over the whole input (``grid_slack``). For an input on the grid, the classifier
    smoothed with the sampled law returns ``A`` at every grid point of the open l2 ball of this radius
    (the argument is in the comment above and in ``docs/noise-schemes.md``). 0 (abstain) unless
    ``p_lower > 1/2 + 2 delta``. With ``delta = 0`` it is ``sigma * Phi^{-1}(p_lower)``. Vectorised.

    Examples
    --------
    >>> round(float(grid_radius(0.99, 0.25, 0.0)), 4), round(float(grid_radius(0.99, 0.25, 0.01)), 4)
    (0.5816, 0.5072)
    >>> float(grid_radius(0.52, 0.25, 0.01))
    0.0
    """
    sigma = check_positive("sigma", sigma)
    delta = float(slack)
    if not (0 <= delta < 0.25):
        raise InvalidParameterError(f"slack must lie in [0, 0.25) to certify anything, got {slack!r}")
    p_lower = _as_floats(p_lower, "p_lower")
    with np.errstate(invalid="ignore"):
        ok = p_lower - delta > 0.5 + delta
        r = sigma * (ndtri(np.clip(p_lower - delta, 0.5, 1.0)) - ndtri(0.5 + delta))
    return _scalar_or_array(np.where(ok & (r > 0), r, 0.0))


def grid_p_threshold(target_radius, sigma: float, slack: float):
    """The smallest ``p_lower`` whose ``grid_radius`` reaches ``r``: ``Phi(r / sigma + Phi^{-1}(1/2 + delta)) + delta``.

    Capped at 1 (a radius no bound below 1 can certify). With ``delta = 0`` it is ``Phi(r / sigma)``.

    Examples
    --------
    >>> p = grid_p_threshold(0.25, 0.25, 0.01)
    >>> round(float(p), 4), round(float(grid_radius(p, 0.25, 0.01)), 6)
    (0.8573, 0.25)
    """
    sigma = check_positive("sigma", sigma)
    delta = float(slack)
    if not (0 <= delta < 0.25):
        raise InvalidParameterError(f"slack must lie in [0, 0.25) to certify anything, got {slack!r}")
    r = _as_floats(target_radius, "target_radius")
    return _scalar_or_array(np.minimum(ndtr(r / sigma + ndtri(0.5 + delta)) + delta, 1.0))


# --------------------------------------------------------------------------- anytime-valid (E-process)
#
# Every prior here is a mixture of Beta laws, each possibly truncated to an interval
# [support_lo, support_hi] of [0, 1]; components sit on the last axis of a, b, weights and the support
# ends. The mixture likelihood ("log marginal") of s successes in t draws is all a prior contributes:
# for ANY prior fixed before sampling, M_t(q) = marginal / (q^s (1 - q)^(t - s)) is a non-negative
# martingale with mean 1 when p = q, so Ville's inequality makes {q : M_t(q) < 1/alpha} a confidence
# sequence. Priors change power (samples spent), never validity.


def _log_mass(a, b, lo, hi):
    """``log P(lo <= Q <= hi)`` for ``Q ~ Beta(a, b)``, by the regularised incomplete beta.

    Each tail is taken from the side that does not cancel: ``P(Q <= hi) = I_hi(a, b)`` below and
    ``P(Q >= lo) = I_{1-lo}(b, a)`` above (``1 - Q ~ Beta(b, a)``; SciPy's ``betainc`` is much faster
    than ``betaincc`` there). Upper tails are read at the float ``1 - lo``: a truncation point moved
    by rounding, the same for the prior and the posterior, so still a prior fixed before sampling.
    An underflow gives ``-inf``: a component with no mass where the data are, never more evidence.
    """
    a, b, lo, hi = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, lo, hi)))
    out = np.zeros(a.shape)
    below = (lo <= 0) & (hi < 1)  # [0, hi]
    above = (lo > 0) & (hi >= 1)  # [lo, 1]
    inner = (lo > 0) & (hi < 1)  # [lo, hi]
    with np.errstate(divide="ignore"):
        if np.any(below):
            out[below] = np.log(betainc(a[below], b[below], hi[below]))
        if np.any(above):
            out[above] = np.log(betainc(b[above], a[above], 1.0 - lo[above]))
        if np.any(inner):
            ai, bi, li, hi_ = a[inner], b[inner], lo[inner], hi[inner]
            mass = np.where(
                li >= 0.5,
                betainc(bi, ai, 1.0 - li) - betainc(bi, ai, 1.0 - hi_),
                betainc(ai, bi, hi_) - betainc(ai, bi, li),
            )
            out[inner] = np.log(np.maximum(mass, 0.0))
    return out


def _validate_prior(a, b, weights, support_lo=0.0, support_hi=1.0):
    a = _as_floats(a, "prior a")
    b = _as_floats(b, "prior b")
    if np.any(~np.isfinite(a)) or np.any(a <= 0) or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise InvalidParameterError("prior parameters a and b must be finite and > 0, e.g. a=b=0.5 (KT)")
    if weights is not None:
        weights = _as_floats(weights, "mixture weights")
        if np.any(weights < 0) or np.any(~np.isfinite(weights)) or np.any(weights.sum(axis=-1) <= 0):
            raise InvalidParameterError("mixture weights must be finite, >= 0 and not all 0")
        weights = weights / weights.sum(axis=-1, keepdims=True)
    lo = _as_floats(support_lo, "prior support_lo")
    hi = _as_floats(support_hi, "prior support_hi")
    if np.any(~(lo >= 0)) or np.any(~(hi <= 1)) or np.any(~(lo < hi)):
        raise InvalidParameterError("prior support must satisfy 0 <= support_lo < support_hi <= 1 for every component")
    return a, b, weights, lo, hi


def beta_mixture_log_marginal(s, t, a=0.5, b=0.5, weights=None, support_lo=0.0, support_hi=1.0):
    """log of the mixture likelihood ``E_pi[q^s (1 - q)^(t - s)]`` of a truncated Beta mixture prior.

    The prior is ``pi = sum_j w_j Beta(a_j, b_j | [lo_j, hi_j])``: each Beta restricted to its
    support and renormalised. Each component contributes
    ``B(a + s, b + f) / B(a, b) * P(lo <= Beta(a + s, b + f) <= hi) / P(lo <= Beta(a, b) <= hi)``
    with ``f = t - s`` (the regularised incomplete beta, ``scipy.special.betainc``). Dividing by the
    likelihood at ``q`` gives ``M_t(q)`` (``log_martingale``): a mean-1 martingale when ``p = q``,
    whatever the prior, as long as it is fixed before sampling. Rounding only lowers the result
    (an underflowing component counts as 0), which only widens the confidence sequence.

    Parameters
    ----------
    s, t : array_like
        Successes and draws, ``0 <= s <= t`` (need not be whole: a look-ahead uses expected counts).
    a, b : float or array_like
        Beta parameters (> 0). With ``weights``, the mixture components are on the last axis.
    weights : array_like, optional
        Mixture weights (>= 0, normalised here); None for a single component broadcast with ``s``.
    support_lo, support_hi : float or array_like
        Support of each component, ``0 <= lo < hi <= 1``; default the whole unit interval.

    Returns
    -------
    float or numpy.ndarray
        The log mixture likelihood, shaped like ``s`` broadcast with the prior (minus its last axis
        when ``weights`` is given).

    Examples
    --------
    >>> round(float(beta_mixture_log_marginal(10, 10)), 4)   # KT: B(10.5, 0.5) / B(0.5, 0.5)
    -1.7362
    >>> full = beta_mixture_log_marginal(10, 10, 1.0, 1.0)                     # uniform: 1 / 11
    >>> upper = beta_mixture_log_marginal(10, 10, 1.0, 1.0, support_lo=0.9)    # uniform on [0.9, 1]
    >>> round(float(np.exp(full)), 4), round(float(np.exp(upper)), 4)
    (0.0909, 0.6238)
    """
    s = np.asarray(s, dtype=float)
    t = np.asarray(t, dtype=float)
    a, b, weights, lo, hi = _validate_prior(a, b, weights, support_lo, support_hi)
    if weights is not None:
        s, t = np.expand_dims(s, -1), np.expand_dims(t, -1)
    f = t - s
    truncated = bool(np.any(lo > 0) or np.any(hi < 1))
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero weight or an empty tail: no component
        terms = betaln(a + s, b + f) - betaln(a, b)
        if truncated:
            terms = terms + _log_mass(a + s, b + f, lo, hi) - _log_mass(a, b, lo, hi)
            terms = np.where(np.isnan(terms), -np.inf, terms)  # an empty prior component carries nothing
        if weights is None:
            return _scalar_or_array(terms)
        if weights.shape[-1] == 1:
            return _scalar_or_array(terms[..., 0])
        return _scalar_or_array(logsumexp(terms + np.log(weights), axis=-1))


def log_martingale(s, t, q, log_marginal):
    """``log M_t(q) = log_marginal - s log q - (t - s) log(1 - q)``: the evidence against ``p = q``.

    ``M_t(q)`` is a non-negative martingale with mean 1 under ``p = q`` (for any prior fixed before
    sampling), so ``P(exists t: M_t(q) >= 1/alpha) <= alpha`` (Ville). Vectorised; ``q`` in (0, 1).

    Examples
    --------
    >>> m = beta_mixture_log_marginal(48, 48)                 # KT prior, 48 agreeing draws
    >>> round(float(log_martingale(48, 48, 0.8413, m)), 3)   # vs log(1/0.001) = 6.908
    5.784
    """
    s = np.asarray(s, dtype=float)
    t = np.asarray(t, dtype=float)
    q = np.asarray(q, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = log_marginal - np.where(s > 0, s * np.log(q), 0.0) - np.where(t > s, (t - s) * np.log1p(-q), 0.0)
    return _scalar_or_array(value)


_NEWTON_ITERATIONS = 60
_NEWTON_RTOL = 4e-16
_OUTWARD = 1e-14


def _newton_end(c, n_near, n_far):
    """Root ``x < 0`` of ``c - n_near * x - n_far * log(1 - e^x) = 0``, approached from below.

    With ``x = log q`` this is the lower end of the CS (``n_near = s``, ``n_far = f``); with
    ``x = log(1 - q)`` the upper end (roles swapped). The function is convex and decreasing left of
    the root, and the start ``c / n_near`` is left of it (the ``n_far`` term is >= 0), so Newton's
    iterates increase monotonically towards the root and every iterate is outside the confidence
    set: stopping early only widens the interval. Exact in one step when ``n_far = 0``.
    """
    x = c / n_near
    pos = np.flatnonzero(n_far > 0)
    xv, cv, nn, nf = x[pos], c[pos], n_near[pos], n_far[pos]
    for _ in range(_NEWTON_ITERATIONS):
        if pos.size == 0:
            break
        one_minus = -np.expm1(xv)
        g = cv - nn * xv - nf * np.log(one_minus)
        step = g / (nn - nf * np.exp(xv) / one_minus)
        step[~(step > 0)] = 0.0  # converged (g = 0) or rounding: never step inward
        xv += step
        moving = step > _NEWTON_RTOL * np.abs(xv)
        if not moving.all():
            x[pos[~moving]] = xv[~moving]
            if moving.sum() * 4 < moving.size * 3 or not moving.any():
                pos, xv, cv, nn, nf = pos[moving], xv[moving], cv[moving], nn[moving], nf[moving]
            else:
                x[pos] = xv
    x[pos] = xv
    return x


def confidence_sequence_ends(s, t, log_marginal, alpha):
    """Ends ``(L_t, U_t)`` of ``{q : M_t(q) < 1/alpha}`` for a given mixture likelihood.

    ``log M_t(q)`` is convex in ``q`` with its minimum at ``s / t`` (where ``M_t <= 1``), so the set
    is an interval; its ends solve ``log M_t(q) = log(1/alpha)``. Solved by Newton's method in
    ``log q`` (lower end) and ``log(1 - q)`` (upper end) from the outside, then moved out by 1e-14:
    the returned interval contains the exact one. Closed form where ``s = t`` (``L = exp(c / t)``,
    ``U = 1``) or ``s = 0``. With probability at least ``1 - alpha`` the interval contains ``p`` at
    every ``t`` at once (Ville), so any stopping rule may read it. Vectorised.

    Parameters
    ----------
    s, t : array_like
        Successes and draws, ``0 <= s <= t``.
    log_marginal : array_like
        ``beta_mixture_log_marginal(s, t, ...)`` of a prior fixed before sampling.
    alpha : float or array_like
        Error probability, in (0, 1).

    Returns
    -------
    lower, upper : float or numpy.ndarray
        ``L_t`` (0 when ``s = 0``) and ``U_t`` (1 when ``s = t``); ``(0, 1)`` when ``t = 0``.

    Examples
    --------
    >>> lower, upper = confidence_sequence_ends(1000, 1000, beta_mixture_log_marginal(1000, 1000), 0.001)
    >>> round(lower, 4), upper
    (0.9891, 1.0)
    """
    s = np.asarray(s, dtype=float)
    t = np.asarray(t, dtype=float)
    log_level = -np.log(_check_alpha(alpha))
    s, t, log_marginal, log_level = np.broadcast_arrays(s, t, np.asarray(log_marginal, dtype=float), log_level)
    shape = s.shape
    s, t, m, ell = (np.ravel(v).astype(float) for v in (s, t, log_marginal, log_level))
    f = t - s
    c = m - ell  # log M_t(q) - log(1/alpha) = c - s log q - f log(1 - q)
    lower = np.zeros(s.shape)
    upper = np.ones(s.shape)
    # c = -inf: the prior puts no mass near the data; the set is all of [0, 1] (conservative).
    ok = np.isfinite(c) & (t > 0)
    lo_idx = np.flatnonzero(ok & (s > 0))
    if lo_idx.size:
        x = _newton_end(c[lo_idx], s[lo_idx], f[lo_idx])
        lower[lo_idx] = np.maximum(np.exp(x) - _OUTWARD, 0.0)
    up_idx = np.flatnonzero(ok & (f > 0))
    if up_idx.size:
        x = _newton_end(c[up_idx], f[up_idx], s[up_idx])
        upper[up_idx] = np.minimum(-np.expm1(x) + _OUTWARD, 1.0)
    if shape == ():
        return float(lower[0]), float(upper[0])
    return lower.reshape(shape), upper.reshape(shape)


def beta_binomial_cs(s, t, alpha, a=0.5, b=0.5, weights=None, *, support_lo=0.0, support_hi=1.0):
    """Ends ``(L_t, U_t)`` of the Beta-binomial mixture confidence sequence for a Bernoulli mean.

    For i.i.d. Bernoulli(p) observations with ``s`` successes after ``t`` draws and a prior
    ``Beta(a, b)`` (or a mixture ``sum_j weights_j Beta(a_j, b_j)``, components on the last axis,
    each optionally truncated to ``[support_lo, support_hi]``) fixed before sampling,
    ``M_t(q) = B(a + s, b + t - s) / B(a, b) / (q^s (1 - q)^(t - s))`` (``log_martingale``) is a
    non-negative martingale with mean 1 when ``p = q``. By Ville's inequality,
    ``P(exists t: p not in (L_t, U_t)) <= alpha``, so the bound holds under any stopping rule.

    ``L_t`` and ``U_t`` solve ``log M_t(q) = log(1/alpha)`` on either side of ``s / t``
    (``confidence_sequence_ends``); each is rounded outward. ``L_t = 0`` when ``s = 0`` and
    ``U_t = 1`` when ``s = t``. Vectorised over ``s``, ``t``, ``alpha`` and the prior.

    Examples
    --------
    >>> lower, upper = beta_binomial_cs(1000, 1000, 0.001)
    >>> round(lower, 4), upper
    (0.9891, 1.0)
    """
    s, t = _check_counts(s, t, "s", "t")
    alpha = _check_alpha(alpha)
    return confidence_sequence_ends(s, t, beta_mixture_log_marginal(s, t, a, b, weights, support_lo, support_hi), alpha)


def _martingale_crosses(s, t, p0, alpha: float, log_marginal) -> np.ndarray:
    """Where the mixture martingale against ``p = p0`` has reached ``1 / alpha`` (Ville's threshold); False where
    ``p0`` is 0 or 1 (no such test)."""
    inside = (p0 > 0) & (p0 < 1)
    q = np.where(inside, p0, 0.5)
    return inside & (log_martingale(s, t, q, log_marginal) >= -np.log(_check_alpha(alpha)))


def threshold_test(s, t, p0, alpha, log_marginal):
    """Decision of the sequential test of ``p >= p0`` at level ``alpha``, with no root finding.

    +1 where ``M_t(p0) >= 1/alpha`` and ``s / t > p0``: every ``q <= p0`` is outside the confidence
    sequence (``log M_t`` decreases in ``q`` left of ``s / t``), so ``p > p0`` with probability at
    least ``1 - alpha`` over the whole run. -1 where ``M_t(p0) >= 1/alpha`` and ``s / t < p0``
    (``p < p0`` shown: give up). 0: continue. Where ``p0 >= 1`` it never certifies. Vectorised.

    Examples
    --------
    >>> s = np.array([48, 40, 10])
    >>> m = beta_mixture_log_marginal(s, 48, *truncated_prior(np.full(3, 0.8413)))
    >>> threshold_test(s, 48, 0.8413, 0.001, m).tolist()
    [1, 0, -1]
    """
    s, t, p0 = (np.asarray(v, dtype=float) for v in (s, t, p0))
    strong = _martingale_crosses(s, t, p0, alpha, log_marginal)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_hat = np.where(t > 0, s / np.maximum(t, 1e-300), 0.5)
    out = np.where(strong & (p_hat > p0), 1, np.where(strong & (p_hat < p0), -1, 0))
    return _scalar_or_array(out.astype(np.int64))


def running_intersection(lower_prev, upper_prev, lower, upper):
    """``(max(L*_{t-1}, L_t), min(U*_{t-1}, U_t))``: the intersection of a CS over time stays valid.

    Examples
    --------
    >>> running_intersection(0.6, 0.9, 0.55, 0.8)
    (0.6, 0.8)
    """
    return _scalar_or_array(np.maximum(lower_prev, lower)), _scalar_or_array(np.minimum(upper_prev, upper))


def cumulative_intersection(lower, upper, lower_prev=0.0, upper_prev=1.0, axis: int = -1):
    """Running intersection ``(L*_t, U*_t)`` at every index along ``axis`` (the sample axis).

    ``L*_t = max(lower_prev, L_1, ..., L_t)`` and ``U*_t = min(upper_prev, U_1, ..., U_t)``: on the
    event that the confidence sequence holds at every time (probability >= 1 - alpha), ``p`` lies in
    every ``(L_s, U_s)``, hence in their intersection; so the running intersection is as valid as
    the sequence and never looser. ``lower_prev`` / ``upper_prev`` carry the intersection of earlier
    batches (broadcast against ``lower`` without the sample axis).

    Examples
    --------
    >>> lo, up = cumulative_intersection(np.array([0.5, 0.7, 0.6]), np.array([0.9, 0.95, 0.8]), 0.55)
    >>> lo.tolist(), up.tolist()
    ([0.55, 0.7, 0.7], [0.9, 0.9, 0.8])
    """
    lower = np.asarray(lower, dtype=float)
    upper = np.asarray(upper, dtype=float)
    lo_prev = np.expand_dims(np.asarray(lower_prev, dtype=float), axis)
    up_prev = np.expand_dims(np.asarray(upper_prev, dtype=float), axis)
    lower = np.maximum.accumulate(np.maximum(lower, lo_prev), axis=axis)
    upper = np.minimum.accumulate(np.minimum(upper, up_prev), axis=axis)
    return lower, upper


def truncated_prior(p0, w: float = 0.9, a: float = 0.5, b: float = 0.5):
    """Prior for the test of ``p >= p0``: ``w * Beta(a, b | [p0, 1]) + (1 - w) * Beta(a, b | [0, p0])``.

    The component above ``p0`` spends its mass where a certificate needs evidence, so
    ``M_t(p0)`` grows faster than under the untruncated Beta: with every draw a success,
    ``log M_t(p0) ~ t log(1/p0) - b log(t (1 - p0)) - log(1/w)`` instead of KT's
    ``t log(1/p0) - log(t) / 2 - log(pi) / 2``. The component below ``p0`` (weight ``1 - w``) lets the
    same confidence sequence rule out ``p0`` from below (give up). Returns ``(a, b, weights,
    support_lo, support_hi)``, two components on the last axis, for ``beta_mixture_log_marginal``.
    Validity needs only that ``p0`` and ``w`` are fixed before sampling (e.g. from the requested
    radius); on its own, the upper component is also a supermartingale under every ``p <= p0``.

    Parameters
    ----------
    p0 : float or array_like
        ``Phi(r* / sigma)`` per input, clipped into ``[1e-12, 1 - 1e-12]``.
    w : float
        Weight of the upper component, in (0, 1].
    a, b : float
        The Beta law being truncated (default KT).

    Examples
    --------
    >>> a, b, weights, lo, hi = truncated_prior([0.8413], w=0.9)
    >>> weights.round(6).tolist(), lo.tolist(), hi.tolist()
    ([[0.9, 0.1]], [[0.8413, 0.0]], [[1.0, 0.8413]])
    """
    w = float(w)
    if not 0.0 < w <= 1.0:
        raise InvalidParameterError(f"truncated prior weight w must lie in (0, 1], got {w}; e.g. w=0.9")
    p0 = np.asarray(p0, dtype=float)
    if np.any(~np.isfinite(p0)):
        raise InvalidParameterError("truncation point p0 must be finite (Phi(target_radius / sigma))")
    p0 = np.clip(p0, 1e-12, 1 - 1e-12)
    shape = p0.shape + (2,)
    lo = np.stack([p0, np.zeros(p0.shape)], axis=-1)
    hi = np.stack([np.ones(p0.shape), p0], axis=-1)
    weights = np.broadcast_to(np.array([w, 1 - w]), shape).copy()
    return np.full(shape, float(a)), np.full(shape, float(b)), weights, lo, hi


RADIUS_PRIOR_EPS = 1e-12
"""Smallest failure rate ``1 - q`` the radius prior covers: radii up to ``sigma * Phi^-1(1 - 1e-12)`` = 7.03 sigma."""


def radius_prior(w: float = 0.5, eps_min: float = RADIUS_PRIOR_EPS, b0: float = 1e-3):
    """Prior for the best radius: ``w * KT + (1 - w) * Beta(1, b0 | [1/2, 1 - eps_min])``.

    The second component has density ``~ 1 / (1 - q)`` on ``[1/2, 1 - eps_min]``: the failure rate
    ``1 - q`` is log-uniform, so every order of magnitude of ``1 - q`` (roughly, every radius from 0
    to 7 sigma) gets the same mass. Where every draw agrees, ``M_t`` then loses only about
    ``log(1/(1-w)) + log(log(1/eps_min) / (log(1/eps_min) - log t))`` nats against the point ``q = 1``
    instead of KT's ``log(pi t) / 2``, so the lower bound tracks the fixed-n Clopper-Pearson bound
    closely; KT (weight ``w``) keeps power where ``p`` is far from 1. Returns ``(a, b, weights,
    support_lo, support_hi)`` with two components on the last axis. Validity needs only that it is
    fixed before sampling.

    Parameters
    ----------
    w : float
        KT weight, in [0, 1).
    eps_min : float
        Lower end of the log-uniform failure rate, in (0, 1/2).
    b0 : float
        Beta(1, b0) stands in for the improper ``1 / (1 - q)`` (> 0, small).

    Examples
    --------
    >>> a, b, weights, lo, hi = radius_prior()
    >>> a.tolist(), b.tolist(), weights.tolist(), lo.tolist(), hi.tolist()
    ([0.5, 1.0], [0.5, 0.001], [0.5, 0.5], [0.0, 0.5], [1.0, 0.999999999999])
    """
    w = float(w)
    if not 0.0 <= w < 1.0:
        raise InvalidParameterError(f"radius prior KT weight w must lie in [0, 1), got {w}; e.g. w=0.5")
    if not 0.0 < float(eps_min) < 0.5 or not float(b0) > 0:
        raise InvalidParameterError("radius prior needs 0 < eps_min < 1/2 and b0 > 0")
    return (
        np.array([0.5, 1.0]),
        np.array([0.5, float(b0)]),
        np.array([w, 1.0 - w]),
        np.array([0.0, 0.5]),
        np.array([1.0, 1.0 - float(eps_min)]),
    )


def sample_floor(alpha, target_radius, sigma: float):
    """``log(1/alpha) / log(1/Phi(r*/sigma))``: fewest draws any level-alpha test needs to certify ``r*``.

    With ``t`` draws all returning the class, no likelihood ratio against ``p0 = Phi(r*/sigma)``
    exceeds ``p0^-t``, so no anytime-valid (or fixed-n) test at level ``alpha`` certifies sooner.

    Examples
    --------
    >>> round(float(sample_floor(0.001, 0.25, 0.25)), 1), round(float(sample_floor(0.001, 0.5, 0.25)), 1)
    (40.0, 300.2)
    """
    p0 = np.asarray(p_threshold(target_radius, sigma), dtype=float)
    return _scalar_or_array(-np.log(_check_alpha(alpha)) / -np.log(p0))


GIVE_UP_B0 = 1e-3
"""``b`` of the give-up prior ``Beta(1, b)``: close to 0, so its density is about ``1 / (1 - q)``."""


def give_up_prior(p0, b0: float = GIVE_UP_B0):
    """Prior of the dedicated give-up test of ``p < p0``: ``Beta(1, b0)`` restricted to ``[0, p0]``.

    Its density is about ``1 / (1 - q)``: the failure rate ``1 - q`` is log-uniform on ``[1 - p0, 1]``,
    so an input just below the threshold (the costly case: ``1 - p`` a few times ``1 - p0``) gets as
    much prior mass as one far below it, where KT puts little. Validity needs only that it is fixed
    before sampling (``p0`` from the requested radius). Returns ``(a, b, weights, support_lo,
    support_hi)`` with one component on the last axis, for ``beta_mixture_log_marginal``.

    Parameters
    ----------
    p0 : float or array_like
        ``Phi(r* / sigma)`` per input, clipped into ``[1e-12, 1 - 1e-12]``.
    b0 : float
        The second Beta parameter (> 0, small).

    Examples
    --------
    >>> a, b, weights, lo, hi = give_up_prior([0.9772])
    >>> a.tolist(), b.tolist(), weights.tolist(), lo.tolist(), hi.tolist()
    ([[1.0]], [[0.001]], [[1.0]], [[0.0]], [[0.9772]])
    """
    b0 = check_positive("give-up prior b0", b0)
    p0 = np.asarray(p0, dtype=float)
    if np.any(~np.isfinite(p0)):
        raise InvalidParameterError("truncation point p0 must be finite (Phi(target_radius / sigma))")
    p0 = np.clip(p0, 1e-12, 1 - 1e-12)[..., None]
    one = np.ones(p0.shape)
    return one.copy(), b0 * one, one.copy(), np.zeros(p0.shape), p0


def give_up_test(s, t, p0, alpha, log_marginal):
    """Where the one-sided test of ``H0: p >= p0`` rejects: give up on certifying ``p >= p0``.

    ``E_t = m_t / (p0^s (1 - p0)^(t - s))``, with ``m_t = log_marginal`` the mixture likelihood of a
    prior on ``[0, p0]`` (``give_up_prior``), is a product of per-sample factors whose mean is
    ``p q / p0 + (1 - p)(1 - q) / (1 - p0) <= 1`` for every ``q <= p0`` and ``p >= p0``: a non-negative
    supermartingale under ``H0``, so ``P(E_t >= 1/alpha for some t) <= alpha`` (Ville). The test fires
    where ``E_t >= 1/alpha`` and ``s / t < p0``. It decides when to stop and never makes a certificate;
    the certifying test (``threshold_test``) runs beside it at the full ``alpha`` too, with no split:
    under any ``p`` only one of the two errors is possible (certifying needs ``p < p0``, giving up
    wrongly ``p >= p0``), so the decision is wrong with probability at most ``alpha`` either way.

    Parameters
    ----------
    s, t : array_like
        Successes and draws.
    p0 : float or array_like
        The threshold ``Phi(r* / sigma)``.
    alpha : float or array_like
        Level of the give-up test, in (0, 1).
    log_marginal : array_like
        ``beta_mixture_log_marginal(s, t, *give_up_prior(p0))``.

    Returns
    -------
    bool or numpy.ndarray
        True where the test fires (give up).

    Examples
    --------
    >>> p0 = 0.9772
    >>> s = np.array([80, 95, 100])
    >>> m = beta_mixture_log_marginal(s, 100, *(v[0] for v in give_up_prior([p0])))
    >>> give_up_test(s, 100, p0, 0.001, m).tolist()
    [True, False, False]
    """
    s, t, p0 = (np.asarray(v, dtype=float) for v in (s, t, p0))
    strong = _martingale_crosses(s, t, p0, alpha, log_marginal)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = (t > 0) & (s < p0 * t)
    return _scalar_or_array(strong & below)


def lookahead_counts(s, t, lookahead):
    """Counts expected after ``lookahead`` more draws under the plug-in estimate: ``(s', t')``.

    ``s' = s + lookahead * s / t`` (not whole in general) and ``t' = t + lookahead``: the certainty
    equivalent of the draws to come, at which the priced rule reads the confidence sequence.

    Examples
    --------
    >>> lookahead_counts(90, 100, 50)
    (135.0, 150.0)
    """
    s = np.asarray(s, dtype=float)
    t = np.asarray(t, dtype=float)
    lookahead = np.asarray(lookahead, dtype=float)
    return _scalar_or_array(s + lookahead * s / np.maximum(t, 1.0)), _scalar_or_array(t + lookahead)


def radius_gain(lower_now, lower_ahead, sigma: float):
    """``radius(max(L*, L')) - radius(L*)``: the radius a later lower bound ``L'`` would add (>= 0).

    Examples
    --------
    >>> round(float(radius_gain(0.9, 0.95, 0.25)), 4), float(radius_gain(0.9, 0.8, 0.25))
    (0.0908, 0.0)
    """
    now = np.asarray(lower_now, dtype=float)
    ahead = np.asarray(lower_ahead, dtype=float)
    with np.errstate(invalid="ignore"):
        gain = np.where(ahead > now, np.asarray(radius(ahead, sigma)) - np.asarray(radius(now, sigma)), 0.0)
    return _scalar_or_array(np.where(np.isnan(gain), 0.0, gain))


def expected_radius_gain(
    s, t, lookahead, lower_now, alpha, sigma: float, a=0.5, b=0.5, weights=None, support_lo=0.0, support_hi=1.0
):
    """Expected increase of the certified radius from ``lookahead`` more draws (certainty equivalent).

    The draws to come are replaced by their expected successes under the plug-in estimate
    ``p^ = s / t`` (``lookahead_counts``); ``L'`` is the confidence sequence's lower end there (same
    prior and ``alpha``), and the gain is ``radius_gain(L*, L', sigma)``: ``sigma * (Phi^-1(max(L*, L'))
    - Phi^-1(L*))`` with the radius 0 at or below 1/2. It feeds a stopping rule, so it never touches
    validity: it only decides when to stop.

    Parameters
    ----------
    s, t : array_like
        Successes and draws so far (``t >= 1``).
    lookahead : array_like
        More draws considered (>= 0), broadcast against ``s``.
    lower_now : array_like
        The running lower bound ``L*`` now.
    alpha : float or array_like
        Error probability of the confidence sequence.
    sigma : float
        Noise level (radius units per ``Phi^-1`` unit).
    a, b, weights, support_lo, support_hi : optional
        The prior, as in ``beta_mixture_log_marginal``.

    Returns
    -------
    numpy.ndarray or float
        Gain in input l2 units (>= 0).

    Examples
    --------
    >>> round(float(expected_radius_gain(1000, 1000, 1000, 0.9891, 0.001, 0.25)), 4)
    0.0603
    """
    s_ahead, t_ahead = lookahead_counts(s, t, lookahead)
    m = beta_mixture_log_marginal(s_ahead, t_ahead, a, b, weights, support_lo, support_hi)
    lower_ahead, _ = confidence_sequence_ends(s_ahead, t_ahead, m, alpha)
    return radius_gain(lower_now, lower_ahead, sigma)


def refine_gain(
    p_tilde, horizons, radius_now, alpha, sigma: float, a=0.5, b=0.5, weights=None, support_lo=0.0, support_hi=1.0
):
    """Radius ``h`` sequential samples are expected to add to ``radius_now``, before any is drawn.

    The certainty equivalent of the surrogate's prediction: ``h`` draws of which ``h p~`` succeed; ``L``
    is the confidence sequence's lower end there (the sequential certifier's prior and ``alpha``), and the
    gain is ``radius_gain(Phi(radius_now / sigma), L, sigma)``. The hybrid refines a one-pass radius only
    where some horizon's gain beats its price (``priced_continue``): a routing decision made from the
    surrogate's output alone, so it touches no guarantee.

    Parameters
    ----------
    p_tilde : array_like
        The surrogate's probability of its class, per input (``N``).
    horizons : array_like of int
        Samples considered, ``N x H`` or ``H`` (shared).
    radius_now : array_like
        The radius already held per input (e.g. the one-pass ``R^``; <= 0 for none), input l2 units.
    alpha : float or array_like
        Error probability of the sequential certificate.
    sigma : float
        Noise level.
    a, b, weights, support_lo, support_hi : optional
        The sequential prior, as ``beta_mixture_log_marginal`` takes it; per-input arrays have a row per
        input and the components on the last axis.

    Returns
    -------
    numpy.ndarray
        ``N x H`` gains, input l2 units (>= 0).

    Examples
    --------
    >>> refine_gain([0.99999, 0.9], [100, 1000], [0.25, 0.25], 0.001, 0.25).round(3).tolist()
    [[0.08, 0.323], [0.0, 0.01]]
    """
    p = np.clip(_as_floats(p_tilde, "p_tilde").reshape(-1), 0.0, 1.0)
    h = np.broadcast_to(np.asarray(horizons, dtype=float), (p.size, np.shape(horizons)[-1])).astype(float)
    now = np.broadcast_to(_as_floats(radius_now, "radius_now").reshape(-1), p.shape)
    prior = [np.asarray(v, dtype=float) for v in (a, b)]
    extra = [
        None if weights is None else np.asarray(weights, dtype=float),
        np.asarray(support_lo, dtype=float),
        np.asarray(support_hi, dtype=float),
    ]
    if weights is not None:  # per-input mixtures: rows x components -> rows x 1 x components
        prior = [v[:, None, :] if v.ndim == 2 else v for v in prior]
        extra = [v[:, None, :] if v is not None and v.ndim == 2 else v for v in extra]
    s = h * p[:, None]
    m = beta_mixture_log_marginal(s, h, prior[0], prior[1], *extra)
    lower, _ = confidence_sequence_ends(s, h, m, alpha)
    now_p = np.where(now > 0, np.asarray(p_threshold(np.maximum(now, 0.0), sigma)), 0.0)
    return np.asarray(radius_gain(now_p[:, None], lower, sigma), dtype=float).reshape(p.size, -1)


def priced_horizons(t, budget: int):
    """Look-ahead sizes the priced rule weighs: ``t/4, t/2, t, 2t, 4t, ...`` up to the rest of the budget.

    Returns an integer array with a new last axis (horizons, ``ceil(log2(budget)) + 3`` of them),
    each clipped to ``budget - t`` (>= 0; repeated entries are the rest of the budget). Weighing every
    horizon, not only the next batch, keeps the rule from quitting where the radius only starts to
    grow after a while (``L*`` still at or below 1/2: the gain curve is convex before it is concave).

    Examples
    --------
    >>> priced_horizons(np.array([100]), 1000).tolist()
    [[25, 50, 100, 200, 400, 800, 900, 900, 900, 900, 900, 900, 900]]
    """
    t = np.asarray(t, dtype=np.int64)
    budget = int(budget)
    remaining = np.maximum(budget - t, 0)
    factors = 2.0 ** np.arange(-2, max(int(np.ceil(np.log2(max(budget, 2)))), 1) + 1)
    steps = np.ceil(t[..., None] * factors).astype(np.int64)
    return np.minimum(steps, remaining[..., None])


def priced_continue(gains, horizons, price: float):
    """The priced best-radius rule: True (keep sampling) where some horizon's gain beats its cost.

    ``gains[..., h]`` is ``expected_radius_gain`` for ``horizons[..., h]`` more draws; the cost of
    ``n`` draws is ``price * n / 1000`` (``price``: radius, input l2 units, a user would give up per
    1,000 draws). Stop where no horizon is worth its cost. A stopping rule: validity is untouched.

    Examples
    --------
    >>> priced_continue(np.array([[0.01, 0.05]]), np.array([[100, 1000]]), price=0.04).tolist()
    [True]
    >>> priced_continue(np.array([[0.01, 0.05]]), np.array([[100, 1000]]), price=0.2).tolist()
    [False]
    """
    price = float(price)
    if not (0 <= price < np.inf):
        raise InvalidParameterError(f"price must be a finite radius >= 0 per 1,000 samples, got {price}")
    gains = np.asarray(gains, dtype=float)
    horizons = np.asarray(horizons, dtype=float)
    return np.any((horizons > 0) & (gains > price * horizons / 1000.0), axis=-1)


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
        raise InvalidParameterError(
            f"counts_top and p_tilde must have one entry per input, got {k.shape} and {np.shape(p_tilde)}"
        )
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


def reference_radius(counts_top, n_cal, alpha_mc: float, sigma: float, *, slack: float = 0.0):
    """``y = max(sigma * Phi^{-1}(pL), 0)``, ``pL`` the one-sided Clopper-Pearson bound at ``alpha_mc``.

    ``counts_top`` are the calibration counts of the *surrogate's* class out of ``n_cal`` (scalar
    or per point). For each point, with probability at least ``1 - alpha_mc``, ``y`` is at most the
    true certified radius of that class (0 when the class is not the smoothed prediction), because
    the class was fixed by the surrogate before the counts were drawn. ``slack``: the noise scheme's
    (``radius``), so that ``y`` is a radius of the distribution the counts were drawn from.

    Examples
    --------
    >>> round(float(reference_radius(990, 1000, 0.001, 0.25)), 3)
    0.495
    """
    return _scalar_or_array(
        np.asarray(radius(lower_confidence_bound(counts_top, n_cal, alpha_mc), sigma, slack=slack), dtype=float)
    )


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
    return _scalar_or_array(
        np.asarray(surrogate_radius(p_tilde, sigma, radius_cap), dtype=float) - np.asarray(offset, dtype=float)
    )


def probit_of_probability(p_tilde):
    """``z~ = Phi^{-1}(p~)`` of probabilities given as numbers, tail-accurate and unclipped (``probit_confidence``).

    Equal to the surrogate's ``z~`` (``Surrogate.predict_z``) wherever ``p~`` itself is representable
    (``1 - p~ >= 1.1e-16``, ``z~ < 8.2``); beyond that ``p~`` rounds to 1 and only the surrogate's own
    ``z~`` (from its log-softmax) still ranks inputs. Never ``Phi^{-1}(clip(p~, P_CLIP))``: that clip
    moves every ``p~ > 1 - 1e-6`` to ``z = 4.75`` and would bin such inputs apart from deployment.

    Examples
    --------
    >>> round(float(probit_of_probability(1 - 1e-9)), 3), round(float(probit_of_probability(0.975)), 3)
    (5.998, 1.96)
    """
    p = _as_floats(p_tilde, "p_tilde")
    with np.errstate(divide="ignore"):
        return probit_confidence(np.log(p), np.log1p(-p))


def confidence_bin(p_tilde, edges, z=None):
    """Mondrian bin of each input by surrogate confidence: ``digitize(z~, edges)``, ``z~ = Phi^{-1}(p~)``.

    ``edges`` are increasing cut points on the ``z~`` (sigma-units radius) scale, fixed before
    calibration (from the surrogate or the train split alone), so that calibration and test inputs in
    one bin stay exchangeable. Bin ``j`` holds ``edges[j-1] <= z~ < edges[j]``. ``z`` is the surrogate's
    tail-accurate ``z~`` (``Surrogate.predict_z``): pass it wherever it exists (calibration,
    deployment and the audit all do, through ``core.one_pass.group_keys``). Without it ``z~`` is
    ``probit_of_probability(p~)``, which equals it wherever ``p~`` is representable (never the
    clipped ``Phi^{-1}(clip(p~))``, which would bin ``p~ > 1 - 1e-6`` elsewhere than deployment).

    Examples
    --------
    >>> confidence_bin([0.6, 0.9, 0.99, 0.9999], [1.0, 2.0, 3.0]).tolist()
    [0, 1, 2, 3]
    >>> confidence_bin([1 - 1e-9], [5.0]).tolist()  # z~ = 6.0: above the edge, as at deployment
    [1]
    """
    edges = _as_floats(edges, "bin edges")
    if edges.ndim != 1 or np.any(~np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise InvalidParameterError(f"bin edges must be finite and strictly increasing, got {edges.tolist()}")
    if z is None:
        z = probit_of_probability(p_tilde)
    return np.digitize(np.atleast_1d(_as_floats(z, "z")), edges)


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


# --------------------------------------------------------------------------- watching a deployment


def smoothed_p_value(n_greater, n_equal, n_past, u):
    """Smoothed conformal p-value ``(n_greater + u (n_equal + 1)) / (n_past + 1)`` of a new observation.

    Of ``n_past`` earlier observations, ``n_greater`` are strictly more nonconforming than the new
    one and ``n_equal`` tie with it (the ``+ 1`` is the new observation itself); ``u``, uniform on
    [0, 1] and independent of the data, splits the ties. If the earlier observations and the new
    one are exchangeable, the p-value is exactly Uniform(0, 1), whatever the ties. Computed for
    every observation of a sequence against all observations before it, the p-values of an
    exchangeable sequence are independent (Vovk, Gammerman and Shafer 2005, Sect. 7.1): the input
    of a conformal test martingale. It is the formula of MAPIE's
    ``OnlineMartingaleTest.compute_p_value``. Vectorised.

    Examples
    --------
    >>> float(smoothed_p_value(3, 1, 9, 0.5))
    0.4
    """
    n_greater = np.asarray(n_greater, dtype=float)
    n_equal = np.asarray(n_equal, dtype=float)
    return _scalar_or_array(
        (n_greater + np.asarray(u, dtype=float) * (n_equal + 1)) / (np.asarray(n_past, dtype=float) + 1)
    )


_PAIRWISE_ROWS = 512  # rows of the within-batch comparison block: memory ~ rows x batch booleans


def online_p_values(past_sorted, scores, u):
    """Smoothed p-values of a batch of new nonconformity ``scores``, each against all that came before it.

    ``scores[j]`` is compared with ``past_sorted`` (every earlier score, ascending) and with
    ``scores[:j]``: exactly the p-values of feeding the batch one observation at a time, so the
    guarantee of ``smoothed_p_value`` holds for the whole sequence. Larger scores are more
    nonconforming (small p-values). Ranks against the past by binary search, within the batch by
    comparisons in blocks: ``O(b log m + b^2)`` for ``b`` new scores and ``m`` earlier ones.

    Parameters
    ----------
    past_sorted : array_like of float
        Earlier scores, sorted ascending.
    scores : array_like of float
        The new scores, in arrival order.
    u : array_like of float
        One tie-breaking uniform per new score, independent of the data.

    Returns
    -------
    numpy.ndarray
        One p-value in [0, 1] per new score.

    Examples
    --------
    >>> online_p_values([0.1, 0.5], [0.3, 0.3], [0.25, 0.75]).round(4).tolist()
    [0.4167, 0.625]
    """
    past = np.asarray(past_sorted, dtype=float).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    u = np.asarray(u, dtype=float).reshape(-1)
    b = len(s)
    right = np.searchsorted(past, s, side="right")
    greater = (len(past) - right).astype(float)
    equal = (right - np.searchsorted(past, s, side="left")).astype(float)
    for lo in range(0, b, _PAIRWISE_ROWS):
        hi = min(lo + _PAIRWISE_ROWS, b)
        earlier = np.arange(hi)[None, :] < np.arange(lo, hi)[:, None]  # column i came before row j
        greater[lo:hi] += np.sum((s[None, :hi] > s[lo:hi, None]) & earlier, axis=1)
        equal[lo:hi] += np.sum((s[None, :hi] == s[lo:hi, None]) & earlier, axis=1)
    return np.asarray(smoothed_p_value(greater, equal, len(past) + np.arange(b), u), dtype=float).reshape(-1)


DRIFT_POWERS = (0.25, 0.5, 0.75)
"""Exponents ``kappa`` of the power bets ``kappa r^(kappa - 1)`` on the within-class p-value (``drift_bets``)."""

DRIFT_EXCESS = 0.5
"""Stake of a bet that a window of the class p-value is over-represented (``drift_bets``)."""

DRIFT_DEFICIT = 0.8
"""Stake of a bet that a window of the class p-value is under-represented (``drift_bets``)."""


def drift_windows(num_bins: int) -> np.ndarray:
    """The windows of the class p-value that ``drift_bets`` bets on: widths ``1 / B``, ``1 / (2B)``, every half width.

    A class's band of the class p-value is about ``1 / K`` wide where it starts, at a place that
    depends on the class frequencies, and narrows as the stream grows once that class stops coming;
    windows of two widths at half-width steps cover at least three quarters of a band of either
    width. ``(2B - 1) + (4B - 1)`` rows ``(start, end)``, ``B = num_bins``.

    Examples
    --------
    >>> drift_windows(2).tolist()
    [[0.0, 0.5], [0.25, 0.75], [0.5, 1.0],
     [0.0, 0.25], [0.125, 0.375], [0.25, 0.5], [0.375, 0.625], [0.5, 0.75], [0.625, 0.875], [0.75, 1.0]]
    """
    num_bins = int(num_bins)
    if num_bins < 2:
        raise InvalidParameterError(f"num_bins must be >= 2, got {num_bins}")
    rows = []
    for bins in (num_bins, 2 * num_bins):
        starts = np.arange(2 * bins - 1) / (2 * bins)
        rows.append(np.stack([starts, starts + 1.0 / bins], axis=1))
    return np.concatenate(rows)


def drift_bets(q, r, num_bins: int, log: bool = False) -> np.ndarray:
    """Densities on the unit square of the drift monitor's betting experts, at p-value pairs ``(q, r)``.

    Each column is a probability density of the pair ``(q, r)`` on ``[0, 1]^2``, so under the null
    (``q`` and ``r`` independent and uniform) each has expectation 1, and a product of them over
    the queries is a test martingale. The columns, in order:

    - ``0``: no bet (density 1);
    - ``1 .. 3``: ``r`` small (queries less confident than usual for their class): ``kappa r^(kappa-1)``
      for ``kappa`` in ``DRIFT_POWERS``;
    - ``4 .. 6``: ``r`` large (more confident than usual): ``kappa (1-r)^(kappa-1)``;
    - then, for each of the ``2B - 1`` wide windows ``W`` of ``drift_windows(B)`` (width ``w = 1/B``):
      ``W`` over-represented (a class flooding in): ``1 + lam (1 - w) / w`` in ``W``, ``1 - lam``
      elsewhere (``lam = DRIFT_EXCESS``);
    - then, for every window (both widths): ``W`` under-represented (a class that stopped coming):
      ``1 - lam`` in ``W``, ``1 + lam w / (1 - w)`` elsewhere (``lam = DRIFT_DEFICIT``).

    ``7 + (2B - 1) + (6B - 2) = 4 + 8B`` columns. ``r`` is clipped to ``[1e-12, 1 - 1e-12]`` first (the
    power bets then integrate to at most 1, which keeps the product a supermartingale).

    Parameters
    ----------
    q, r : array_like of float
        Class p-value and within-class p-value of each query, in [0, 1].
    num_bins : int
        ``B``: the wide windows of ``q`` are ``1 / B`` wide (>= 2).
    log : bool, optional
        Return the log densities (what a martingale multiplies).

    Returns
    -------
    numpy.ndarray
        ``N x (4 + 8B)`` densities (>= 0), or their logs.

    Examples
    --------
    >>> f = drift_bets([0.1], [0.01], 2)
    >>> f.shape, round(float(f[0, 1]), 3), float(f[0, 7]), round(float(f[0, 10]), 3)
    ((1, 20), 7.906, 1.5, 0.2)
    """
    windows = drift_windows(num_bins)
    wide = 2 * int(num_bins) - 1
    q = np.asarray(q, dtype=float).reshape(-1)
    r = np.clip(np.asarray(r, dtype=float).reshape(-1), 1e-12, 1 - 1e-12)
    if q.shape != r.shape:
        raise InvalidParameterError("q and r must have one value per query")
    kappa = np.asarray(DRIFT_POWERS)
    log_low = np.log(kappa) + (kappa - 1) * np.log(r)[:, None]
    log_high = np.log(kappa) + (kappa - 1) * np.log1p(-r)[:, None]
    width = windows[:, 1] - windows[:, 0]
    inside = (q[:, None] >= windows[None, :, 0]) & (q[:, None] < windows[None, :, 1])
    inside |= (q[:, None] == 1.0) & (windows[None, :, 1] >= 1.0)  # q = 1 belongs to the windows ending at 1
    w = width[:wide]
    log_excess = np.where(inside[:, :wide], np.log1p(DRIFT_EXCESS * (1 - w) / w), math.log1p(-DRIFT_EXCESS))
    log_deficit = np.where(inside, math.log1p(-DRIFT_DEFICIT), np.log1p(DRIFT_DEFICIT * width / (1 - width)))
    out = np.concatenate([np.zeros((len(q), 1)), log_low, log_high, log_excess, log_deficit], axis=1)
    return out if log else np.exp(out)


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def fixed_share_update(
    log_densities, log_weights, prior, jump: float | Callable[[int], float], start: int = 0, mix_every: int = 1
):
    """Log wealth of a fixed-share mixture of betting experts (a "jumper" test martingale), over a batch.

    Wealth is spread over experts with weights ``w`` (summing to 1). Before query ``n`` (counted
    from the start of the stream) whenever ``n % mix_every == 0``, a share ``J_k`` of the wealth
    (``k = n // mix_every``; ``jump`` is ``J_k`` or the function ``k -> J_k``) is redistributed
    by ``prior``: ``w <- (1 - J_k) w + J_k prior``; then each expert's wealth is multiplied by its
    density at the query. Redistributing wealth already held is a bet fixed before the query, so
    if every expert's density has expectation 1 under the null given the past, the total wealth
    ``M_n`` is a test martingale, and by Ville's inequality ``P(exists n: M_n >= 1/delta) <= delta``.
    Mixing lets the wealth move to the expert that fits a change whenever it happens (Vovk's
    jumper; MAPIE's ``update_simple_jumper_martingale`` is the case of its three linear experts,
    a uniform prior, ``mix_every = 1`` and ``J = 0.01``). Vectorised between mixing points.

    Parameters
    ----------
    log_densities : array_like of float
        ``N x E`` log densities of the ``E`` experts at the batch's ``N`` queries.
    log_weights : array_like of float
        ``E`` log weights before the batch (their exponentials sum to 1).
    prior : array_like of float
        ``E`` mixing weights, >= 0, summing to 1.
    jump : float or callable
        ``J_k`` in [0, 1), or a function of the mixing event ``k`` returning it.
    start : int, optional
        Queries before this batch (aligns the mixing events with the stream).
    mix_every : int, optional
        Queries between mixing events (>= 1).

    Returns
    -------
    log_growth : numpy.ndarray
        ``N`` values ``log(M_n / M_start)`` after each query of the batch.
    log_weights : numpy.ndarray
        ``E`` log weights after the batch.

    Examples
    --------
    >>> f = np.log([[1.0, 1.5], [1.0, 1.5]])
    >>> growth, w = fixed_share_update(f, np.log([0.5, 0.5]), [0.5, 0.5], 0.0)
    >>> np.exp(growth).round(4).tolist()
    [1.25, 1.625]
    """
    log_f = np.atleast_2d(np.asarray(log_densities, dtype=float))
    lw = np.asarray(log_weights, dtype=float).reshape(-1).copy()
    prior = np.asarray(prior, dtype=float).reshape(-1)
    if log_f.shape[1] != lw.size or prior.size != lw.size:
        raise InvalidParameterError("log_densities, log_weights and prior must describe the same experts")
    if np.any(prior < 0) or not math.isclose(float(prior.sum()), 1.0, rel_tol=1e-9):
        raise InvalidParameterError("prior must be >= 0 and sum to 1")
    mix_every = int(mix_every)
    if mix_every < 1:
        raise InvalidParameterError(f"mix_every must be >= 1, got {mix_every}")
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior)
    n, experts = log_f.shape
    # Between mixing points each expert's log wealth is its start plus a cumulative sum; only the
    # weights at the segment starts need a loop (over E-vectors), the rest is one vectorised pass.
    cum = np.cumsum(log_f, axis=0)
    starts = [0]
    while starts[-1] < n:
        query = int(start) + starts[-1]
        starts.append(min(n, starts[-1] + mix_every - query % mix_every))
    seg_weights = np.empty((len(starts) - 1, experts))
    seg_base = np.zeros((len(starts) - 1, experts))
    seg_total = np.zeros(len(starts) - 1)
    total = 0.0
    for k, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        query = int(start) + lo
        if query % mix_every == 0:
            j = float(jump(query // mix_every) if callable(jump) else jump)
            if not 0.0 <= j < 1.0:
                raise InvalidParameterError(f"jump must lie in [0, 1), got {j}")
            if j > 0:
                lw = np.logaddexp(math.log1p(-j) + lw, math.log(j) + log_prior)
        base = cum[lo - 1] if lo else np.zeros(experts)
        seg_weights[k], seg_base[k], seg_total[k] = lw, base, total
        end = lw + cum[hi - 1] - base
        norm = _logsumexp_rows(end[None, :])[0]
        total += norm
        lw = end - norm
    segment = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    growth = seg_total[segment] + _logsumexp_rows(seg_weights[segment] + cum - seg_base[segment])
    return growth, lw


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """``log(sum(exp(x), axis=1))`` without SciPy's per-call overhead (called once per mixing segment)."""
    top = np.max(x, axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top + np.log(np.sum(np.exp(x - top[:, None]), axis=1))


def beta_binomial_log_martingale(s, t, q, a=0.5, b=0.5):
    """``log M_t(q)``: the Beta-binomial mixture martingale of DESIGN.md at the rate ``q``.

    ``log B(a + s, b + t - s) - log B(a, b) - s log q - (t - s) log(1 - q)``; ``M_t(q)`` has mean 1
    when the ``t`` Bernoulli observations (``s`` successes) have rate ``q``, and
    ``beta_binomial_cs`` is the set ``{q : M_t(q) < 1/alpha}``. Vectorised.

    Examples
    --------
    >>> round(float(beta_binomial_log_martingale(10, 100, 0.01)), 3)
    11.914
    """
    s, t = _check_counts(s, t, "s", "t")
    a, b, *_ = _validate_prior(a, b, None)
    q = np.asarray(q, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (
            betaln(a + s, b + t - s)
            - betaln(a, b)
            - np.where(s > 0, s * np.log(q), 0.0)
            - np.where(t - s > 0, (t - s) * np.log1p(-q), 0.0)
        )
    return _scalar_or_array(out)


def cs_lower_exceeds(s, t, threshold, alpha, a=0.5, b=0.5):
    """Whether the Beta-binomial confidence sequence lies entirely above ``threshold``.

    True where ``s > threshold * t`` and ``log M_t(threshold) >= log(1/alpha)``: the lower end
    ``L_t`` of ``beta_binomial_cs(s, t, alpha)`` is above ``threshold`` (``M_t(q)`` decreases in ``q``
    below ``s / t``). If the true rate is at most ``threshold``, then ``L_t > threshold`` puts the
    true rate outside the sequence, so ``P(exists t: True) <= alpha``, under any stopping rule.
    ``O(1)`` per time, no root finding. Vectorised.

    Examples
    --------
    >>> cs_lower_exceeds([1, 10], [100, 100], 0.01, 0.01).tolist()
    [False, True]
    """
    check_probability("alpha", alpha)
    s, t = _check_counts(s, t, "s", "t")
    threshold = np.asarray(threshold, dtype=float)
    if np.any(~((threshold >= 0.0) & (threshold < 1.0))):
        raise InvalidParameterError(f"threshold must be a rate in [0, 1), got {threshold}")
    above = s > threshold * t
    log_m = np.asarray(beta_binomial_log_martingale(s, t, threshold, a, b), dtype=float)
    return _scalar_or_array(above & (log_m >= -math.log(alpha)))


def audit_threshold(m: int, rank: int, delta: float) -> float:
    """Upper ``1 - delta`` quantile of a split-conformal offset's exceedance rate, given its calibration set.

    With ``m`` calibration scores and the offset their ``rank``-th smallest, the probability that a
    new exchangeable score exceeds the offset, *conditionally on the calibration set*, is a random
    rate: exactly ``Beta(m + 1 - rank, rank)`` for continuous i.i.d. scores, and stochastically
    smaller with ties (Vovk 2012). Its mean is at most ``epsilon`` (the marginal guarantee), but one
    calibration draw can sit above ``epsilon``; a long audit measures that conditional rate, so it
    must be compared with this quantile, not with ``epsilon``: the rate exceeds it with probability
    at most ``delta`` over the calibration draw. ``0.0`` when ``rank > m`` (infinite offset: never
    certifies).

    Examples
    --------
    >>> round(audit_threshold(400, conformal_rank(400, 0.01), 0.005), 4)
    0.0272
    """
    m, rank = int(m), int(rank)
    check_probability("delta", delta)
    if m < 1 or rank < 1:
        raise InvalidParameterError(f"need m >= 1 calibration scores and a rank >= 1, got m={m}, rank={rank}")
    if rank > m:
        return 0.0
    return float(_st.beta.ppf(1.0 - delta, m + 1 - rank, rank))


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


def _shape_table(shape) -> np.ndarray:
    """A shape (one threshold per grid radius, None / nan = never) as floats, ``+inf`` for never and past the grid."""
    return np.array(
        [np.inf if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in shape] + [np.inf]
    )


def shaped_scores(z, reference, grid, shape):
    """Scores of the ``shaped`` best radius: ``z~_i - g(r+(y_i))``, ``r+(y)`` the first grid radius above ``y``.

    The best radius ``R(x) = max{r in grid : z~ > g(r) + c}`` (``shaped_radius``), with a non-decreasing
    shape ``g`` fixed before these points are seen (fitted on other points), exceeds ``y`` iff it
    certifies ``r+(y)``, i.e. iff ``z~ - g(r+(y)) > c``. So ``c`` = the conformal quantile of these scores
    (rank ``ceil((m + 1)(1 - epsilon))``) makes ``P(R > y) <= epsilon`` for an exchangeable test point, one
    shift for every radius at once; ``-inf`` where ``y`` is at or beyond the grid's end or ``g`` is ``+inf``
    there (never wrong).

    Examples
    --------
    >>> shaped_scores([3.0, 2.0, 1.0], [0.3, 0.05, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 1.5, None]).tolist()
    [-inf, 1.5, -inf]
    """
    z = _as_floats(z, "z")
    grid = _as_floats(grid, "grid")
    table = _shape_table(shape)
    above = np.searchsorted(grid, _as_floats(reference, "reference") + 1e-12, side="left")
    return z - table[np.minimum(above, len(grid))]


def shaped_radius(z, grid, shape, shift):
    """The ``shaped`` best radius: the largest grid radius ``r`` with ``z~ > g(r) + shift``, else 0 (l2 units).

    Examples
    --------
    >>> shaped_radius([0.5, 1.2, 3.0], [0.1, 0.2, 0.3], [0.0, 1.0, None], 0.1).tolist()
    [0.1, 0.2, 0.2]
    """
    z = _as_floats(z, "z").reshape(-1)
    grid = _as_floats(grid, "grid")
    table = _shape_table(shape)[:-1] + (np.inf if shift is None else float(shift))
    # g is non-decreasing, so the radii certified form a prefix of the grid.
    count = np.searchsorted(np.maximum.accumulate(table), z, side="left")
    return np.where(count > 0, grid[np.maximum(count - 1, 0)], 0.0)


TOPUP_PRIOR = ((0.5, 1.0), (0.5, 0.01), (0.5, 0.5))
"""``(a, b, weights)`` of the confidence sequence of a topped-up reference: ``0.5 KT + 0.5 Beta(1, 0.01)``,
fixed in advance (the second component puts its mass near ``p = 1``, where topped-up points lie)."""


def topup_reference_radius(
    k_first, n_first, successes, samples, alpha_mc: float, sigma: float, prior=TOPUP_PRIOR, *, slack: float = 0.0
):
    """Reference radius of a calibration point whose samples were topped up by a data-dependent rule.

    ``y = radius(max(CP_{alpha_mc/2}(k_first, n_first), CS_{alpha_mc/2}(successes, samples)))``: the
    one-sided Clopper-Pearson bound on the first ``n_first`` samples (a fixed number) and the
    Beta-binomial mixture confidence sequence (``beta_binomial_cs`` with ``prior``, fixed in advance)
    on all ``samples`` drawn. The CS holds at any stopping time (Ville's inequality), so whatever rule
    decided how many samples to add after looking at the first ones, ``y`` exceeds the true radius
    with probability at most ``alpha_mc / 2 + alpha_mc / 2``. A Clopper-Pearson bound on all samples
    would not be valid under such a rule. ``slack``: the noise scheme's (``radius``).

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
    return _scalar_or_array(np.asarray(radius(np.maximum(cp, cs), sigma, slack=slack), dtype=float))


def topup_max_radius(
    n_first: int, max_samples: int, alpha_mc: float, sigma: float, prior=TOPUP_PRIOR, *, slack: float = 0.0
) -> float:
    """The radius cap of a topped-up calibration: ``topup_reference_radius`` of a point whose
    ``max_samples`` samples (the planned maximum, fixed before calibration) all agree.

    Examples
    --------
    >>> (round(topup_max_radius(10_000, 10_000, 0.001, 0.25), 3),
    ...  round(topup_max_radius(10_000, 100_000, 0.001, 0.25), 3))
    (0.793, 0.941)
    """
    return float(
        topup_reference_radius(n_first, n_first, max_samples, max_samples, alpha_mc, sigma, prior, slack=slack)
    )


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
    rates = _as_floats(rate, "rate")
    if rates.ndim or not 0.0 <= float(rates) <= 1.0:
        raise InvalidParameterError(f"rate must be a probability in [0, 1], got {rates}")
    level = check_probability("level", level)
    return int(_st.binom.ppf(level, num, float(rates))) if num else 0
