"""Wrong-certificate rates of the issue-10 one-pass rules against exact ground truth, with broken twins.

The fast redraw design of ``test_calibration_rate_soundness.py``: the linear base model of
``groundtruth.linear_problem`` gives every point of a 20,000-point pool its exact smoothed class and
radius; a fixed, deliberately imperfect surrogate (50 % overconfident, with a per-point error that can
flip the class near the boundary) gives ``A``, ``p~`` and ``z~``; calibration counts are exact binomial
draws with the true ``p_A``. Each redraw samples calibration points from the pool, fits the rule, and
computes the *exact* conditional probability that a fresh pool point gets a wrong certificate. Marginal
validity says the mean over redraws is at most the bound; a rule fails when the mean exceeds the bound
by more than 3.09 standard errors (one-sided, 0.999). Each broken variant must fail the same check.

Rules: required-radius thresholds ``tau(r)`` (broken: the quantile rank without the conformal ``+1``);
the shifted score (broken: bins and offsets tuned on the calibration points themselves); Mondrian
bins with edges chosen on separate (train) points (broken: edges chosen on the calibration points to
maximise their own radius); the topped-up reference radius (exact failure probabilities under
data-dependent top-up rules; broken: a Clopper-Pearson bound over the same samples), and a calibration
built on it.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from calibration.conformal import (
    ReferenceRadii,
    fit_offsets,
    fit_radius_thresholds,
    fit_shifted,
    reference_radii,
)
from surrogate_cert.core import stats
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.one_pass import group_keys
from surrogate_cert.core.stats import max_radius, reference_radius, surrogate_radius

pytestmark = pytest.mark.slow

SIGMA = 0.25
ALPHA_MC = 1e-3
POOL = 20_000
REDRAWS = 200
Z_0999 = 3.09

PROBLEM = linear_problem(POOL, sigma=SIGMA, max_margin_sigmas=3.0, input_shape=(1, 2, 2), seed=0)
_ERR = np.random.default_rng(5).normal(0.0, 1.0, POOL)
_ERR_TRAIN = np.random.default_rng(6).normal(0.0, 1.0, POOL)


def _surrogate(err):
    z_signed = 1.5 * (PROBLEM.margin + 0.2 * SIGMA * err) / SIGMA
    predicted = (z_signed > 0).astype(int)
    p_true = np.where(predicted == 1, PROBLEM.p1, 1 - PROBLEM.p1)
    z = np.abs(z_signed)
    return predicted, st.norm.cdf(z), z, p_true


PREDICTED, P_TILDE, Z, P_TRUE = _surrogate(_ERR)
# The same surrogate on other (train-split) points: its outputs only, never their counts.
_, _, Z_TRAIN, _ = _surrogate(_ERR_TRAIN)


def _rate(wrong: np.ndarray, mask=None) -> float:
    return float(wrong.mean() if mask is None else wrong[mask].mean())


def _exceeds(rates, bound: float) -> bool:
    rates = np.asarray(rates)
    return rates.mean() > bound + Z_0999 * rates.std(ddof=1) / np.sqrt(len(rates))


def _redraws(once, m: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [once(rng.integers(0, POOL, m), rng) for _ in range(REDRAWS)]


# --------------------------------------------------------------------------- required-radius thresholds


def _threshold_wrong(tau_at: float, r: float) -> np.ndarray:
    certified = Z > tau_at
    return certified & ((PREDICTED != PROBLEM.true_class) | (r > PROBLEM.true_radius))


def test_required_radius_thresholds_hold_per_radius_and_fail_without_the_rank_correction():
    m, n_cal, epsilon = 20, 10**6, 0.1
    bound = epsilon + ALPHA_MC
    cap = max_radius(n_cal, ALPHA_MC, SIGMA)
    radii = (0.5 * SIGMA, SIGMA, 2 * SIGMA)

    def fitted(rows, rng):
        y = reference_radius(rng.binomial(n_cal, P_TRUE[rows]), n_cal, ALPHA_MC, SIGMA)
        table = fit_radius_thresholds(Z[rows], y, cap, SIGMA, epsilon)
        grid = np.asarray(table["grid"])
        tau = np.array([np.inf if t is None else t for t in table["tau"]])
        return [float(tau[stats.grid_point_at_least(grid, r)]) for r in radii]

    def broken(rows, rng):  # rank floor(m (1 - eps)): the empirical quantile, no conformal +1
        y = reference_radius(rng.binomial(n_cal, P_TRUE[rows]), n_cal, ALPHA_MC, SIGMA)
        out = []
        for r in radii:
            scores = np.sort(stats.threshold_scores(Z[rows], y, r))
            out.append(float(scores[int(np.floor(m * (1 - epsilon))) - 1]))
        return out

    good = _redraws(fitted, m)
    bad = _redraws(broken, m)
    for j, r in enumerate(radii):
        rates = [_rate(_threshold_wrong(taus[j], r)) for taus in good]
        assert not _exceeds(rates, bound), (r, np.mean(rates))
        assert np.mean(rates) > 0.5 * epsilon  # near the bound: the check can tell
        broken_rates = [_rate(_threshold_wrong(taus[j], r)) for taus in bad]
        assert _exceeds(broken_rates, bound), (r, np.mean(broken_rates))


# --------------------------------------------------------------------------- shifted score


def _shifted_wrong(shifted, lam: float, cap: float) -> np.ndarray:
    radius = surrogate_radius(P_TILDE, SIGMA, cap) - shifted.shift(Z) - lam
    return PROBLEM.wrong(PREDICTED, radius)


def test_shifted_score_holds_with_a_disjoint_tuning_part_and_fails_when_tuned_on_the_calibration_points():
    m, n_cal, epsilon, bins = 100, 10**6, 0.1, 8
    bound = epsilon + ALPHA_MC
    cap = max_radius(n_cal, ALPHA_MC, SIGMA)
    radius_tilde = surrogate_radius(P_TILDE, SIGMA, cap)

    def calibrate(tune_rows, cal_rows, rng):
        y_tune = reference_radius(rng.binomial(n_cal, P_TRUE[tune_rows]), n_cal, ALPHA_MC, SIGMA)
        shifted = fit_shifted(Z[tune_rows], radius_tilde[tune_rows], y_tune, epsilon, bins)
        counts_top = rng.binomial(n_cal, P_TRUE[cal_rows]) if cal_rows is not tune_rows else None
        y_cal = y_tune if counts_top is None else reference_radius(counts_top, n_cal, ALPHA_MC, SIGMA)
        fit = fit_offsets(
            P_TILDE[cal_rows],
            PREDICTED[cal_rows],
            np.zeros(len(cal_rows), int),
            n_cal,
            sigma=SIGMA,
            num_classes=2,
            epsilon=epsilon,
            alpha_mc=ALPHA_MC,
            references=ReferenceRadii(y_cal, cap, {}),
            shift=shifted.shift(Z[cal_rows]),
        )
        return shifted, fit.pooled_offset

    def disjoint(rows, rng):
        return calibrate(rng.integers(0, POOL, m), rows, rng)

    def overlapping(rows, rng):  # the same points tune the bins and offsets and calibrate the shift
        return calibrate(rows, rows, rng)

    rates = [_rate(_shifted_wrong(s, lam, cap)) for s, lam in _redraws(disjoint, m)]
    assert not _exceeds(rates, bound), np.mean(rates)
    assert np.mean(rates) > 0.5 * epsilon
    broken = [_rate(_shifted_wrong(s, lam, cap)) for s, lam in _redraws(overlapping, m)]
    assert _exceeds(broken, bound), np.mean(broken)


# --------------------------------------------------------------------------- Mondrian bins, edges on the train split


def test_confidence_bins_with_edges_from_train_points_hold_per_bin_and_snooped_edges_fail():
    m, n_cal, epsilon, bins = 120, 10**6, 0.1, 3
    bound = epsilon + ALPHA_MC
    cap = max_radius(n_cal, ALPHA_MC, SIGMA)
    train_edges = stats.equal_mass_edges(Z_TRAIN, bins)  # fixed before any calibration point is seen

    def per_point(fit, edges):
        keys = group_keys(PREDICTED, P_TILDE, "confidence", edges, z=Z)
        return surrogate_radius(P_TILDE, SIGMA, cap) - np.array([fit.offsets[k] for k in keys])

    def with_train_edges(rows, rng):
        counts_top = rng.binomial(n_cal, P_TRUE[rows])
        fit = fit_offsets(
            P_TILDE[rows],
            PREDICTED[rows],
            counts_top,
            n_cal,
            sigma=SIGMA,
            num_classes=2,
            epsilon=epsilon,
            alpha_mc=ALPHA_MC,
            groups="confidence",
            bin_edges=train_edges,
            z=Z[rows],
        )
        return per_point(fit, train_edges)

    radii = _redraws(with_train_edges, m)
    keys = group_keys(PREDICTED, P_TILDE, "confidence", train_edges, z=Z)
    for key in np.unique(keys):
        rates = [_rate(PROBLEM.wrong(PREDICTED, r), keys == key) for r in radii]
        assert not _exceeds(rates, bound), (key, np.mean(rates))

    def snooped(rows, rng):  # edges chosen on the calibration points to maximise their own certified radius
        y = reference_radius(rng.binomial(n_cal, P_TRUE[rows]), n_cal, ALPHA_MC, SIGMA)
        radius_tilde = surrogate_radius(P_TILDE[rows], SIGMA, cap)
        best, best_value = None, -np.inf
        for _ in range(80):
            edges = np.unique(rng.choice(Z[rows], bins - 1, replace=False))
            which = np.digitize(Z[rows], edges)
            q = np.array(
                [
                    stats.conformal_quantile(radius_tilde[which == b] - y[which == b], epsilon)
                    for b in range(len(edges) + 1)
                ]
            )
            value = np.sum(np.maximum(radius_tilde - q[which], 0))
            if value > best_value:
                best, best_value = (edges, q), value
        edges, q = best
        return surrogate_radius(P_TILDE, SIGMA, cap) - q[np.digitize(Z, edges)]

    broken = [_rate(PROBLEM.wrong(PREDICTED, r)) for r in _redraws(snooped, m)]
    assert _exceeds(broken, bound), np.mean(broken)


# --------------------------------------------------------------------------- references past the cap

N_FIRST, N_BLOCK, ROUNDS, ALPHA_REF, LEVEL = 20, 20, 20, 0.05, 0.95


def _all_agree(k_first, s, t):
    """``datagen --top-up``'s rule, repeated: extend the rows whose samples so far all agree."""
    return s == t


def _near_threshold(k_first, s, t):
    """A rule that extends rows whose bound sits just below a level: the frequency is at least the level
    but the Clopper-Pearson bound is not yet (sampling on to a foregone conclusion)."""
    return (s / t >= LEVEL) & (np.asarray(stats.lower_confidence_bound(s, np.full(np.shape(s), t), ALPHA_REF)) < LEVEL)


def _exact_failure(p: float, rule, reference) -> float:
    """P(reference > p) exactly, for true p, when `rule` decides after each block of samples whether to
    draw N_BLOCK more (at most ROUNDS times): the joint law of (first-block count, total count) is
    carried forward block by block and every stopped path's reference is checked."""
    law = np.zeros((N_FIRST + 1, N_FIRST + 1))
    law[np.arange(N_FIRST + 1), np.arange(N_FIRST + 1)] = st.binom.pmf(np.arange(N_FIRST + 1), N_FIRST, p)
    block = st.binom.pmf(np.arange(N_BLOCK + 1), N_BLOCK, p)
    t, failure = N_FIRST, 0.0
    k_first, s = np.meshgrid(np.arange(N_FIRST + 1), np.arange(law.shape[1]), indexing="ij")
    for round_ in range(ROUNDS + 1):
        go = rule(k_first, s, t) if round_ < ROUNDS else np.zeros(law.shape, dtype=bool)
        stop = (~go) & (law > 0)
        failure += float(np.sum(law[stop] * (reference(k_first[stop], s[stop], t) > p)))
        law = np.where(go, law, 0.0)
        if not law.any():
            break
        law = np.stack([np.convolve(row, block) for row in law])
        t += N_BLOCK
        k_first, s = np.meshgrid(np.arange(N_FIRST + 1), np.arange(law.shape[1]), indexing="ij")
    return failure


def _topup_reference(k_first, s, t):
    """The calibration's bound: max(CP_{alpha/2}(first block), CS_{alpha/2}(all samples)), prior TOPUP_PRIOR."""
    return stats.p_threshold(
        stats.topup_reference_radius(k_first, N_FIRST, s, np.full(np.shape(s), t), ALPHA_REF, SIGMA), SIGMA
    )


def _cp_reference(k_first, s, t):  # Clopper-Pearson over every sample drawn: the broken one
    return np.asarray(stats.lower_confidence_bound(s, np.full(np.shape(s), t), ALPHA_REF))


def test_topped_up_reference_holds_under_data_dependent_top_ups_and_clopper_pearson_breaks():
    # True p_A of confident points (margins 2 .. 3.5 sigma) and just below the near-threshold rule's level.
    p_true = np.concatenate([[0.93, 0.94, 0.945, 0.9499], st.norm.cdf(np.linspace(2.0, 3.5, 5))])
    for rule in (_all_agree, _near_threshold):
        ours = np.array([_exact_failure(q, rule, _topup_reference) for q in p_true])
        assert np.all(ours <= ALPHA_REF), (rule.__name__, ours.max())
    broken = np.array([_exact_failure(q, _near_threshold, _cp_reference) for q in p_true])
    assert broken.max() > 2 * ALPHA_REF, broken.max()
    # Under the all-agree rule alone the Clopper-Pearson reference happens not to exceed alpha here (a
    # rule that continues only on unanimous rows is a conservative stopping rule for a lower bound); the
    # calibration still uses the confidence sequence, which holds whatever rule picked the rows.
    # The radius form is the same bound: below the true radius exactly when p_L is below p.
    y = stats.topup_reference_radius(N_FIRST, N_FIRST, 95, 100, ALPHA_REF, SIGMA)
    assert float(stats.p_threshold(y, SIGMA)) == pytest.approx(float(_topup_reference(N_FIRST, 95, 100)))


def test_calibration_on_topped_up_references_keeps_its_bound_with_the_raised_cap():
    m, n_cal, extra, epsilon = 60, 100, 20_000, 0.1
    bound = epsilon + ALPHA_MC
    plain_cap = max_radius(n_cal, ALPHA_MC, SIGMA)
    cap = stats.topup_max_radius(n_cal, n_cal + extra, ALPHA_MC, SIGMA)
    assert cap > plain_cap

    def once(rows, rng):
        first = rng.binomial(n_cal, P_TRUE[rows])
        topped = first == n_cal  # all agree: draw `extra` more of the same stream
        more = np.where(topped, rng.binomial(extra, P_TRUE[rows]), 0)
        counts = np.stack([n_cal - first, first], axis=1)
        topup = np.stack([np.where(topped, extra, 0) - more, more], axis=1)
        predicted = np.ones(len(rows), dtype=int)  # counts are of the surrogate's class, in column 1
        refs = reference_radii(
            predicted,
            counts,
            n_cal,
            ALPHA_MC,
            SIGMA,
            counts_topup=topup,
            samples=n_cal + np.where(topped, extra, 0),
            planned_max=n_cal + extra,
        )
        assert refs.cap == pytest.approx(cap)
        fit = fit_offsets(
            P_TILDE[rows],
            PREDICTED[rows],
            first,
            n_cal,
            sigma=SIGMA,
            num_classes=2,
            epsilon=epsilon,
            alpha_mc=ALPHA_MC,
            references=refs,
        )
        return surrogate_radius(P_TILDE, SIGMA, refs.cap) - fit.pooled_offset, np.mean(refs.radius > plain_cap)

    results = _redraws(once, m)
    rates = [_rate(PROBLEM.wrong(PREDICTED, r)) for r, _ in results]
    assert not _exceeds(rates, bound), np.mean(rates)
    # The top-up is used: reference radii past what n_cal samples alone could ever show.
    assert np.mean([past for _, past in results]) > 0.05
