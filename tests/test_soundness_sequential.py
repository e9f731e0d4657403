"""The sequential E-process certifier is wrong on at most an alpha share of inputs, under every policy.

Exact ground truth from the linear binary model (``groundtruth.linear_problem``), margins spread over
-3 sigma .. 3 sigma. The wrong-certificate count over N inputs must not exceed the 0.999-quantile of
Binomial(N, alpha), for each stopping policy (tolerance, target radius, priced best radius), class
choice and prior (KT, a fixed Beta, the truncated prior, an informative surrogate prior and a
deliberately misleading one). The stopping rule is read after every sample. A hard case puts every
input's target radius just above its true radius, so that any certificate reaching the target is wrong.
Teeth: the same machinery with a fixed-n Clopper-Pearson bound re-checked after every sample
(peeking), with the plug-in estimate, or with a prior fitted on the same samples, fails the same check.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from surrogate_cert.core import stats
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier

ALPHA = 0.1
N_INPUTS = 1000
SIGMA = 0.25
BUDGET = 2000
SCHEDULE = [16, 32, 64]  # many looks: the stopping rule peeks about 35 times per input


@pytest.fixture(scope="module")
def problem():
    return linear_problem(N_INPUTS, sigma=SIGMA, max_margin_sigmas=3.0, seed=3)


def allowed(num: int, alpha: float = ALPHA) -> float:
    return st.binom.ppf(0.999, num, alpha)


def certifier(problem, cls=EProcessCertifier, seed=0, **kwargs):
    smooth = SmoothedClassifier(problem.model, 2, problem.sigma, device="cpu", batch_size=8192, seed=seed)
    kwargs.setdefault("max_samples", BUDGET)
    kwargs.setdefault("schedule", SCHEDULE)
    kwargs.setdefault("n0", 32)
    return cls(smooth, ALPHA, **kwargs)


class PeekingClopperPearson(EProcessCertifier):
    """BROKEN: a fixed-n Clopper-Pearson interval, recomputed and intersected after every batch."""

    def confidence_sequence(self, successes, drawn, alpha, log_marginal):
        # The priced rule's look-ahead asks at expected (fractional) counts: round them down.
        successes, drawn = np.floor(successes), np.round(drawn)
        lower = stats.lower_confidence_bound(successes, drawn, alpha)
        upper = 1 - stats.lower_confidence_bound(drawn - successes, drawn, alpha)
        return lower, upper


class PlugIn(EProcessCertifier):
    """BROKEN: the point estimate s / t used as a bound."""

    def confidence_sequence(self, successes, drawn, alpha, log_marginal):
        p_hat = successes / drawn
        return p_hat, p_hat


class FittedPrior(EProcessCertifier):
    """BROKEN: a prior fitted on the same samples. Its Beta components are re-centred on the running
    estimate s / t (concentration 10^4; supports and weights kept): the truncated prior's component above
    p0 where there is one (what a tuner chasing evidence for the certificate would fit), else all of them.
    A prior concentrated at the estimate makes M_t(q) the likelihood ratio of the best fit: the most any
    fitted prior can extract, so its excess over alpha (about log log t) is the margin these tests show."""

    def log_marginal(self, successes, drawn, prior):
        a, b, w, lo, hi = prior
        p_hat = np.clip(np.asarray(successes, dtype=float) / np.maximum(drawn, 1), 1e-6, 1 - 1e-6)[..., None]
        fit = (lo > 0) if np.any(lo > 0) else np.ones(np.shape(lo), dtype=bool)
        return stats.beta_mixture_log_marginal(
            successes, drawn, np.where(fit, 1e4 * p_hat, a), np.where(fit, 1e4 * (1 - p_hat), b), w, lo, hi
        )


def p_true_class(problem):
    return np.where(problem.true_class == 1, problem.p1, 1 - problem.p1)


POLICIES = {
    "best_radius_pilot_kt": (dict(), dict()),
    "best_radius_zero_tolerance": (dict(tolerance=0.0), dict()),
    "target_radius_sigma_kt": (dict(policy="target_radius", target_radius=SIGMA, prior="kt"), dict()),
    "target_truncated_sigma": (dict(policy="target_radius", target_radius=SIGMA, prior="truncated"), dict()),
    "target_truncated_2sigma_default_schedule": (
        dict(policy="target_radius", target_radius=2 * SIGMA, prior="truncated", schedule=None),
        dict(),
    ),
    "per_class_target_truncated": (dict(class_choice="per_class", policy="target_radius", target_radius=SIGMA), dict()),
    "priced": (dict(price=0.05), dict()),
    "priced_radius_prior": (dict(price=0.05, prior="radius"), dict()),
    "target_radius_zero": (dict(policy="target_radius", target_radius=0.0), dict()),
    "per_class": (dict(class_choice="per_class"), dict()),
    "fixed_beta_prior": (dict(prior=(30.0, 1.0)), dict()),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_sequential_wrong_certificates_within_alpha(problem, name):
    init, call = POLICIES[name]
    certs = certifier(problem, **init).certify(problem.x, **call)
    wrong = problem.wrong_certificates(certs)
    assert wrong.sum() <= allowed(N_INPUTS)
    assert sum(not c.abstained for c in certs) > N_INPUTS // 2


def test_per_input_target_radius_and_alpha(problem):
    rng = np.random.default_rng(5)
    alphas = rng.choice([0.02, ALPHA], size=N_INPUTS)
    targets = rng.uniform(0.0, 3 * SIGMA, size=N_INPUTS)
    targets[rng.random(N_INPUTS) < 0.3] = np.nan  # best radius for these
    certs = certifier(problem).certify(problem.x, target_radius=targets, alpha=alphas)
    wrong = problem.wrong_certificates(certs)
    for a in (0.02, ALPHA):
        group = alphas == a
        assert wrong[group].sum() <= allowed(int(group.sum()), a)


def test_given_classes_even_wrong_ones(problem):
    rng = np.random.default_rng(6)
    classes = np.where(rng.random(N_INPUTS) < 0.3, 1 - problem.true_class, problem.true_class)
    certs = certifier(problem).certify(problem.x, classes=classes)
    assert all(c.n_samples <= BUDGET for c in certs)  # no pilot cost
    wrong = problem.wrong_certificates(certs)
    assert wrong.sum() <= allowed(N_INPUTS)


@pytest.mark.parametrize("kind", ["informative", "misleading"])
def test_surrogate_priors_keep_validity(problem, kind):
    p_a = p_true_class(problem)
    classes = problem.true_class.copy()
    if kind == "informative":
        a, b, w = stats.surrogate_prior(p_a, kappa=200.0, w=0.1)
    else:
        # Confidently too optimistic (p~ above the truth, almost no KT weight), and on 30% of the
        # inputs certifying the wrong class with a prior that claims it is the majority.
        flip = np.random.default_rng(7).random(N_INPUTS) < 0.3
        classes[flip] = 1 - classes[flip]
        p_tilde = np.where(flip, 0.9, np.minimum(p_a + 0.03, 0.9999))
        a, b, w = stats.surrogate_prior(p_tilde, kappa=2000.0, w=0.01)
    certs = certifier(problem).certify(problem.x, classes=classes, prior=(a, b, w))
    wrong = problem.wrong_certificates(certs)
    assert wrong.sum() <= allowed(N_INPUTS)


@pytest.mark.parametrize("rule", [dict(), dict(price=0.002)], ids=["tolerance", "priced"])
def test_teeth_peeking_at_a_fixed_n_bound_fails(problem, rule):
    certs = certifier(problem, cls=PeekingClopperPearson, **rule).certify(problem.x)
    assert problem.wrong_certificates(certs).sum() > 1.5 * allowed(N_INPUTS)


@pytest.mark.parametrize("rule", [dict(), dict(price=0.05)], ids=["tolerance", "priced"])
def test_teeth_plug_in_estimate_fails(problem, rule):
    certs = certifier(problem, cls=PlugIn, **rule).certify(problem.x)
    assert problem.wrong_certificates(certs).sum() > 2 * allowed(N_INPUTS)


HARD_BUDGET = 1000


@pytest.fixture(scope="module")
def hard_case():
    """Every input asks for a radius 0.02 sigma above its true radius (its true class is given): p0 sits
    just above p, so reaching the target is always wrong and the test runs long near its boundary."""
    hard = linear_problem(N_INPUTS, sigma=SIGMA, max_margin_sigmas=2.0, seed=11)
    return hard, hard.true_radius + 0.02 * SIGMA


def _hard_wrong(hard, targets, cls):
    certs = certifier(hard, cls=cls, max_samples=HARD_BUDGET, prior="truncated").certify(
        hard.x, classes=hard.true_class, target_radius=targets
    )
    return int(hard.wrong_certificates(certs).sum())


def test_targets_just_above_the_truth_are_certified_at_most_alpha_of_the_time(hard_case):
    hard, targets = hard_case
    assert _hard_wrong(hard, targets, EProcessCertifier) <= allowed(N_INPUTS)


def test_teeth_a_prior_fitted_on_the_same_samples_fails(hard_case):
    hard, targets = hard_case
    assert _hard_wrong(hard, targets, FittedPrior) > 1.5 * allowed(N_INPUTS)


def test_teeth_a_fitted_prior_fails_in_best_radius_mode_too(problem):
    certs = certifier(problem, cls=FittedPrior).certify(problem.x)
    assert problem.wrong_certificates(certs).sum() > 1.3 * allowed(N_INPUTS)
