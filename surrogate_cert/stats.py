"""Statistics of certification: pure functions on numbers (NumPy/SciPy, no torch).

Every bound a certifier reports is computed here, and nowhere else, so the guarantees can be read
against DESIGN.md in one place. Notation: ``k`` successes out of ``n`` (fixed sample) or ``s`` out of
``t`` (sequential), ``alpha`` the error probability, ``sigma`` the l2 noise level, radii in input l2
units.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st
from scipy.optimize import elementwise as _elementwise
from scipy.special import betaln, logsumexp

from .errors import InvalidParameterError, check_probability

__all__ = [
    "clopper_pearson",
    "lower_confidence_bound",
    "radius",
    "p_threshold",
    "predict_test",
    "beta_binomial_cs",
    "running_intersection",
    "surrogate_prior",
    "conformal_rank",
    "conformal_quantile",
    "pac_conformal_rank",
    "min_calibration_size",
]

# Root brackets stop this far from 0 and 1; a bound beyond them is reported as 0 or 1 (conservative).
_EDGE = 1e-15
_XATOL = 1e-12


def _check_alpha(alpha, name: str = "alpha"):
    """``alpha`` (scalar or array) strictly inside (0, 1), as float or float array."""
    arr = np.asarray(alpha, dtype=float)
    if arr.ndim == 0:
        return check_probability(name, float(arr))
    if not np.all((arr > 0) & (arr < 1)):
        bad = arr[~((arr > 0) & (arr < 1))].ravel()[0]
        raise InvalidParameterError(f"{name} must lie strictly between 0 and 1 for every input, got {bad}")
    return arr


def _check_counts(k, n, k_name: str = "k", n_name: str = "n"):
    """Successes ``0 <= k <= n`` as float arrays (integers stored as floats for SciPy)."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(~np.isfinite(n)) or np.any(n < 0) or np.any(n != np.round(n)):
        raise InvalidParameterError(f"{n_name} must be a whole number >= 0")
    if np.any(~np.isfinite(k)) or np.any(k != np.round(k)) or np.any(k < 0) or np.any(k > n):
        raise InvalidParameterError(f"{k_name} must be a whole number between 0 and {n_name}")
    return k, n


# --------------------------------------------------------------------------- fixed sample (Cohen)

def clopper_pearson(k, n, alpha: float):
    """Two-sided Clopper-Pearson interval at level ``alpha`` for ``k`` successes in ``n`` trials.

    With probability at least ``1 - alpha`` the interval contains the success probability; each end
    alone fails with probability at most ``alpha / 2``. Exact at k = 0 (lower = 0) and k = n
    (upper = 1). Vectorised over ``k`` and ``n``. Returns ``(lower, upper)`` as floats or arrays.
    """
    alpha = _check_alpha(alpha)
    k, n = _check_counts(k, n)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, _st.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, _st.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    if lower.ndim == 0:
        return float(lower), float(upper)
    return lower, upper


def lower_confidence_bound(k, n, alpha: float):
    """One-sided Clopper-Pearson lower bound on ``p`` from ``k`` successes in ``n`` trials.

    With probability at least ``1 - alpha``, ``p >= lower``: Cohen et al.'s ``pA`` bound (the lower
    end of the two-sided interval at level ``2 * alpha``). 0 at ``k = 0``. Vectorised.
    """
    alpha = _check_alpha(alpha)
    k, n = _check_counts(k, n)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, _st.beta.ppf(alpha, k, n - k + 1), 0.0)
    return float(lower) if lower.ndim == 0 else lower


def radius(p_lower, sigma: float):
    """Certified l2 radius ``sigma * Phi^{-1}(p_lower)`` where ``p_lower > 1/2``, else 0 (abstain).

    By Cohen et al.'s theorem, if ``p_A(x) >= p_lower > 1/2`` the smoothed classifier predicts ``A``
    on the open l2 ball of this radius around ``x``. Vectorised.
    """
    p_lower = np.asarray(p_lower, dtype=float)
    with np.errstate(invalid="ignore"):
        r = np.where(p_lower > 0.5, sigma * _st.norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
    return float(r) if r.ndim == 0 else r


def p_threshold(target_radius, sigma: float):
    """The probability ``Phi(r / sigma)`` that a lower bound must reach to certify radius ``r``."""
    return _st.norm.cdf(np.asarray(target_radius, dtype=float) / sigma)


def predict_test(count_top: int, count_second: int, alpha: float) -> bool:
    """Cohen et al.'s PREDICT: True if the top class may be returned, False to abstain.

    Two-sided binomial test of ``count_top`` out of ``count_top + count_second`` against 1/2; the
    returned class differs from ``g(x)`` with probability at most ``alpha``.
    """
    total = int(count_top) + int(count_second)
    if total == 0:
        return False
    return bool(_st.binomtest(int(count_top), total, 0.5).pvalue <= alpha)


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
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if np.any(~np.isfinite(a)) or np.any(a <= 0) or np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise InvalidParameterError("prior parameters a and b must be finite and > 0, e.g. a=b=0.5 (KT)")
    if weights is not None:
        weights = np.asarray(weights, dtype=float)
        if np.any(weights < 0) or np.any(~np.isfinite(weights)) or np.any(weights.sum(axis=-1) <= 0):
            raise InvalidParameterError("mixture weights must be finite, >= 0 and not all 0")
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return a, b, weights


def beta_binomial_cs(s, t, alpha, a=0.5, b=0.5, weights=None):
    """Ends ``(L_t, U_t)`` of the Beta-binomial mixture confidence sequence for a Bernoulli mean.

    For i.i.d. Bernoulli(p) observations with ``s`` successes after ``t`` draws and a prior
    ``Beta(a, b)`` (or a mixture ``sum_j weights_j Beta(a_j, b_j)``, components on the last axis)
    fixed before sampling, ``M_t(q) = int q'^s (1 - q')^(t - s) dprior(q') / (q^s (1 - q)^(t - s))``
    is a non-negative martingale with mean 1 when ``p = q``. By Ville's inequality,
    ``P(exists t: p not in (L_t, U_t)) <= alpha``, so the bound holds under any stopping rule.

    ``L_t`` and ``U_t`` solve ``log M_t(q) = log(1/alpha)`` on either side of ``s / t``; each is
    rounded outward (the returned interval contains the exact one). ``L_t = 0`` when ``s = 0`` and
    ``U_t = 1`` when ``s = t``. Vectorised over ``s``, ``t``, ``alpha`` and the prior, with SciPy's
    elementwise bracketing root finder (Chandrupatla's method), all in log space.
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
    """``(max(L*_{t-1}, L_t), min(U*_{t-1}, U_t))``: the intersection of a CS over time stays valid."""
    return np.maximum(lower_prev, lower), np.minimum(upper_prev, upper)


def surrogate_prior(p_tilde, kappa: float, w: float):
    """Mixture prior ``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` for each input.

    Returns ``(a, b, weights)`` with the two components on the last axis, ready for
    ``beta_binomial_cs``. Against either component the mixture loses at most ``log(1/w)`` or
    ``log(1/(1-w))`` of evidence; validity never depends on the surrogate being right.
    """
    kappa = float(kappa)
    if not (0 < kappa < float("inf")):
        raise InvalidParameterError(f"prior concentration kappa must be a finite number > 0, got {kappa}")
    if not 0.0 <= float(w) <= 1.0:
        raise InvalidParameterError(f"KT mixture weight w must lie in [0, 1], got {w}; e.g. w=0.1")
    p = np.asarray(p_tilde, dtype=float)
    if np.any(~np.isfinite(p)):
        raise InvalidParameterError("surrogate probabilities p_tilde must be finite")
    # Clipping keeps both Beta parameters > 0; the prior only moves power, never validity.
    p = np.clip(p, 1e-6, 1 - 1e-6)
    half = np.full(p.shape, 0.5)
    a = np.stack([half, kappa * p], axis=-1)
    b = np.stack([half, kappa * (1 - p)], axis=-1)
    weights = np.broadcast_to(np.array([w, 1 - w]), a.shape)
    return a, b, weights


# --------------------------------------------------------------------------- split conformal

def conformal_rank(m: int, epsilon: float) -> int:
    """``ceil((m + 1)(1 - epsilon))``: the 1-based rank of the split-conformal score quantile.

    If ``m`` calibration scores and a test score are exchangeable, the test score exceeds the score
    of this rank with probability at most ``epsilon`` (marginally). A rank above ``m`` means the
    quantile is infinite: ``m`` is too small for ``epsilon``.
    """
    check_probability("epsilon", epsilon)
    return int(math.ceil((m + 1) * (1 - epsilon) - 1e-12))


def conformal_quantile(scores, epsilon: float) -> float:
    """The ``conformal_rank``-th smallest of ``scores``, or ``+inf`` if that rank exceeds ``m``."""
    scores = np.sort(np.asarray(scores, dtype=float))
    k = conformal_rank(len(scores), epsilon)
    return float("inf") if k > len(scores) else float(scores[k - 1])


def pac_conformal_rank(m: int, epsilon: float, delta: float) -> int:
    """Smallest rank ``k`` whose coverage is >= ``1 - epsilon`` with probability >= ``1 - delta``.

    The coverage of the ``k``-th smallest of ``m`` exchangeable scores is ``Beta(k, m + 1 - k)``
    distributed (Vovk 2012), so ``k`` is the smallest rank with ``BetaCDF(1 - epsilon) <= delta``.
    Returns ``m + 1`` (infinite quantile) if no rank qualifies.
    """
    ks = np.arange(1, m + 1)
    ok = _st.beta.cdf(1 - epsilon, ks, m + 1 - ks) <= delta
    return int(ks[np.argmax(ok)]) if np.any(ok) else m + 1


def min_calibration_size(epsilon: float, delta: float | None = None) -> int:
    """Smallest calibration size ``m`` for which the (PAC when ``delta`` is given) quantile is finite."""
    if delta is None:
        return int(math.ceil(1 / epsilon - 1 - 1e-12))
    # The largest rank, m, has coverage Beta(m, 1): CDF(1 - eps) = (1 - eps)^m <= delta.
    return int(math.ceil(math.log(delta) / math.log1p(-epsilon) - 1e-12))
