"""Target mode's give-up side: the dedicated one-sided test of p < p0 gives up wrongly at most an alpha share.

Exact ground truth from the linear binary model: every input asks for exactly its true radius (its true
class given), so p = p0 = Phi(r*/sigma), the hardest case for the give-up side: every give-up is wrong. With
the dedicated give-up (``stats.give_up_test``, ``stats.give_up_prior``) the count of give-ups over N
inputs must stay within the 0.999-quantile of Binomial(N, alpha); the certifying side is covered by
``test_soundness_sequential`` (targets just above the truth). Teeth: the same certifier giving up when a
fixed-n Clopper-Pearson upper bound, re-checked after every sample, falls below p0 (peeking) fails the
same check. And the decision stays as cheap as it should: on inputs well below the threshold the
dedicated test gives up sooner than the mixture rule of version 0.3.
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
SIGMA = 0.25
BUDGET = 4000
WINDOW = BUDGET // 2
"""Give-ups are counted over the first half of the budget: the budget rule ("no run can certify any more")
fires only near the budget when p = p0, never in the first half."""


class PeekingGiveUp(EProcessCertifier):
    """BROKEN: gives up when a fixed-n Clopper-Pearson upper bound (level alpha), re-checked after every
    sample, lies below p0: a fixed-n bound read at every time is not a sequential test."""

    def _gives_up(self, s, t, p0, alpha, decision, upper, give_up):
        t = np.broadcast_to(t, s.shape)
        cp_upper = 1 - stats.lower_confidence_bound(t - s, t, np.broadcast_to(alpha, s.shape))
        return np.logical_or.accumulate(cp_upper < p0, axis=1)


@pytest.fixture(scope="module")
def below_the_truth():
    problem = linear_problem(1000, sigma=SIGMA, max_margin_sigmas=2.0, seed=21)
    keep = np.flatnonzero(problem.true_radius >= 0.3 * SIGMA)[:400]
    x, cls = problem.x[keep], problem.true_class[keep]
    return problem.model, x, cls, problem.true_radius[keep]


def wrong_give_ups(below_the_truth, cls=EProcessCertifier, **kwargs) -> tuple[int, int]:
    model, x, classes, targets = below_the_truth
    smooth = SmoothedClassifier(model, 2, SIGMA, device="cpu", batch_size=8192, seed=4)
    certs = cls(smooth, ALPHA, max_samples=BUDGET, **kwargs).certify(x, classes=classes, target_radius=targets)
    radius = np.array([c.radius for c in certs])
    stop = np.array([c.stop_time for c in certs])
    return int(np.sum((radius < targets * (1 - 1e-9)) & (stop <= WINDOW))), len(targets)


def allowed(num: int) -> float:
    return st.binom.ppf(0.999, num, ALPHA)


@pytest.mark.slow
def test_dedicated_give_up_is_wrong_at_most_alpha_of_the_time(below_the_truth):
    wrong, num = wrong_give_ups(below_the_truth)
    assert wrong <= allowed(num)


@pytest.mark.slow
def test_teeth_peeking_at_a_fixed_n_upper_bound_gives_up_too_often(below_the_truth):
    wrong, num = wrong_give_ups(below_the_truth, cls=PeekingGiveUp)
    assert wrong > 1.5 * allowed(num)


def test_dedicated_give_up_is_cheaper_than_the_mixture_rule():
    """Inputs 0.5 sigma below a 2 sigma target: the dedicated test decides in fewer samples (same noise)."""
    problem = linear_problem(300, sigma=SIGMA, max_margin_sigmas=2.0, seed=22)
    keep = np.flatnonzero(problem.true_radius >= 0.5 * SIGMA)[:120]
    targets = problem.true_radius[keep] + 0.5 * SIGMA
    smooth = SmoothedClassifier(problem.model, 2, SIGMA, device="cpu", batch_size=8192, seed=5)
    stops = {}
    for rule in ("dedicated", "mixture"):
        certs = EProcessCertifier(smooth, 1e-3, max_samples=BUDGET, give_up=rule).certify(
            problem.x[keep], classes=problem.true_class[keep], target_radius=targets, indices=keep
        )
        assert all(c.radius < t for c, t in zip(certs, targets))
        stops[rule] = np.mean([c.stop_time for c in certs])
    assert stops["dedicated"] < 0.95 * stops["mixture"]


def test_give_up_test_fires_only_below_the_threshold():
    p0 = 0.9
    s = np.arange(0, 1001)
    m = stats.beta_mixture_log_marginal(s, 1000, *(v[0] for v in stats.give_up_prior([p0])))
    fires = stats.give_up_test(s, 1000, p0, 1e-3, m)
    assert fires[:800].all() and not fires[900:].any()
    assert np.all(np.diff(fires.astype(int)) <= 0)  # fewer successes never give less evidence for p < p0
