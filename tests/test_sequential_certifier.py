"""EProcessCertifier: shared forward passes, stopping rules, sample accounting, class choice, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from surrogate_cert.core import stats
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.sequential import EProcessCertifier, default_schedule
from surrogate_cert.core.smoothing import STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier


class SpySmoothed(SmoothedClassifier):
    """Records every counts() call: how many inputs, which stream, where each input's draws start."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _record(self, kind, x, n, indices, stream, start):
        self.calls.append(
            dict(
                kind=kind,
                inputs=len(x),
                n=np.broadcast_to(n, len(x)).copy(),
                stream=stream,
                start=np.broadcast_to(start, len(x)).copy(),
                indices=np.asarray(indices).copy(),
            )
        )

    def counts(self, x, n, *, indices=None, stream=1, start=0):
        self._record("counts", x, n, indices, stream, start)
        return super().counts(x, n, indices=indices, stream=stream, start=start)

    def sample_predictions(self, x, n, *, indices=None, stream=1, start=0):
        self._record("sample_predictions", x, n, indices, stream, start)
        return super().sample_predictions(x, n, indices=indices, stream=stream, start=start)


@pytest.fixture(scope="module")
def problem():
    return linear_problem(30, sigma=0.25, seed=20)


@pytest.fixture()
def smooth(problem):
    return SpySmoothed(problem.model, 2, problem.sigma, device="cpu", batch_size=256, seed=1)


def test_undecided_inputs_share_forward_passes_and_draw_fresh_samples(problem, smooth):
    certs = EProcessCertifier(smooth, 0.01, max_samples=600, schedule=[20, 40, 80]).certify(
        problem.x, indices=np.arange(50, 80)
    )
    pilot, *rounds = smooth.calls
    assert pilot["stream"] == STREAM_SELECT and pilot["inputs"] == 30 and np.all(pilot["n"] == 100)
    assert all(r["stream"] == STREAM_SEQUENTIAL for r in rounds)
    assert [r["inputs"] for r in rounds] == sorted((r["inputs"] for r in rounds), reverse=True)
    assert rounds[0]["inputs"] == 30 and np.all(rounds[0]["start"] == 0)
    # Each input continues its own stream where it stopped, until it is decided.
    drawn = {i: 0 for i in range(50, 80)}
    for r in rounds:
        for i, s, n in zip(r["indices"], r["start"], r["n"]):
            assert s == drawn[i]
            drawn[i] += n
    assert [c.n_samples for c in certs] == [100 + drawn[i] for i in range(50, 80)]
    assert max(drawn.values()) == 600


def test_results_do_not_depend_on_which_inputs_run_together(problem):
    def run(rows):
        smooth = SmoothedClassifier(problem.model, 2, 0.25, device="cpu", seed=4)
        return EProcessCertifier(smooth, 0.01, max_samples=800).certify(problem.x[rows], indices=rows)

    whole = run(np.arange(30))
    part = run(np.arange(10, 14))
    for a, b in zip(whole[10:14], part):
        assert (a.prediction, a.radius, a.n_samples, a.p_lower) == (b.prediction, b.radius, b.n_samples, b.p_lower)


def test_given_classes_cost_no_pilot_and_wrong_class_abstains_early(problem, smooth):
    classes = 1 - problem.true_class  # the minority class everywhere
    certs = EProcessCertifier(smooth, 0.01, max_samples=2000).certify(problem.x, classes=classes)
    assert all(c.abstained for c in certs)
    assert all(call["stream"] == STREAM_SEQUENTIAL for call in smooth.calls)
    clear = np.abs(problem.margin) > 0.25  # p_A < 0.16: U* drops below 1/2 within a few batches
    assert all(c.n_samples <= 224 for c, f in zip(certs, clear) if f)


def test_target_radius_stops_once_decided(problem, smooth):
    certs = EProcessCertifier(smooth, 0.01, policy="target_radius", target_radius=0.1, max_samples=5000).certify(
        problem.x, classes=problem.true_class
    )
    for c, r in zip(certs, problem.true_radius):
        if not c.abstained:
            assert c.radius == pytest.approx(stats.radius(c.p_lower, 0.25))
        if r > 0.3:  # far above the target: certified after few samples, radius >= target
            assert c.radius >= 0.1 and c.n_samples < 1000
        if r < 0.02:  # p_A just above 1/2: Phi(0.4) is ruled out early
            assert c.n_samples < 5000


def test_per_input_target_and_alpha(problem, smooth):
    targets = np.where(np.arange(30) % 2 == 0, 0.05, np.nan)
    alphas = np.linspace(0.001, 0.2, 30)
    certifier = EProcessCertifier(smooth, 0.01, max_samples=1000)
    certs = certifier.certify(problem.x, classes=problem.true_class, target_radius=targets, alpha=alphas)
    ref = EProcessCertifier(smooth, 0.01, max_samples=1000)
    again = ref.certify(problem.x[1:2], classes=problem.true_class[1:2], alpha=alphas[1], indices=[1])
    assert (certs[1].radius, certs[1].n_samples) == (again[0].radius, again[0].n_samples)
    easy = [c for c, r, t in zip(certs, problem.true_radius, targets) if t == 0.05 and r > 0.3]
    assert easy and all(c.n_samples <= 96 for c in easy)


def _running_lower(problem, n, alpha, classes=None):
    """max over t <= n of L_t, from the per-sample outcomes of the sequential stream (seed 1)."""
    preds = SmoothedClassifier(problem.model, 2, 0.25, device="cpu", seed=1).sample_predictions(
        problem.x, n, stream=STREAM_SEQUENTIAL
    )
    cls = np.arange(2)[None, None, :] if classes is None else np.asarray(classes)[:, None, None]
    s = np.cumsum(preds[:, :, None] == cls, axis=1)
    lower, _ = stats.beta_binomial_cs(s, np.arange(1, n + 1)[None, :, None], alpha)
    return lower.max(axis=1), lower[:, -1]


def test_best_radius_at_budget_reports_the_running_intersection_over_every_sample(problem, smooth):
    budget = 500
    certs = EProcessCertifier(smooth, 0.05, max_samples=budget, tolerance=0.0, schedule=[500]).certify(
        problem.x, classes=problem.true_class
    )
    running, at_budget = _running_lower(problem, budget, 0.05, problem.true_class)
    for c, lo, end in zip(certs, running[:, 0], at_budget[:, 0]):
        assert c.n_samples == budget == c.stop_time and c.p_lower == pytest.approx(lo)
        assert c.p_lower >= end  # never looser than the bound at the last sample
        assert c.radius == pytest.approx(stats.radius(lo, 0.25))
        assert c.method == ("eprocess" if lo > 0.5 else "abstain")
    assert sum(c.seconds for c in certs) > 0


def test_per_class_uses_alpha_over_k(problem, smooth):
    certs = EProcessCertifier(smooth, 0.05, max_samples=300, schedule=[300], class_choice="per_class").certify(
        problem.x
    )
    running, _ = _running_lower(problem, 300, 0.05 / 2)
    np.testing.assert_allclose([c.p_lower for c in certs], running.max(axis=1))
    assert all(c.n_samples == 300 for c in certs)  # no pilot, one round
    assert all(c.prediction in (-1, int(np.argmax(row))) for c, row in zip(certs, running))


def test_informative_prior_saves_samples(problem, smooth):
    p_a = np.where(problem.true_class == 1, problem.p1, 1 - problem.p1)
    kw = dict(policy="target_radius", target_radius=0.05, max_samples=3000)
    kt = EProcessCertifier(smooth, 0.001, prior="kt", **kw).certify(problem.x, classes=problem.true_class)
    prior = stats.surrogate_prior(p_a, kappa=300.0, w=0.1)
    informed = EProcessCertifier(smooth, 0.001, **kw).certify(problem.x, classes=problem.true_class, prior=prior)
    assert sum(c.n_samples for c in informed) < sum(c.n_samples for c in kt)


def test_default_schedule_grows_to_the_batch_size():
    assert default_schedule(1000) == [32, 64, 128, 256, 512, 1000]
    assert default_schedule(16) == [16]


@pytest.mark.parametrize(
    "init,name",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(n0=0), "n0"),
        (dict(max_samples=0), "max_samples"),
        (dict(prior=(0.0, 1.0)), "prior"),
        (dict(prior=(1.0, -1.0)), "prior"),
        (dict(prior="flat"), "prior"),
        (dict(policy="target_radius"), "target_radius"),
        (dict(policy="target_radius", target_radius=-0.1), "target_radius"),
        (dict(policy="fastest"), "policy"),
        (dict(class_choice="vote"), "class_choice"),
        (dict(tolerance=-1.0), "tolerance"),
        (dict(schedule=[0]), "schedule"),
    ],
)
def test_bad_constructor_parameters_name_the_parameter(smooth, init, name):
    kwargs = {"alpha": 0.01, **init}
    with pytest.raises(InvalidParameterError, match=name):
        EProcessCertifier(smooth, **kwargs)


@pytest.mark.parametrize(
    "call,name",
    [
        (dict(classes=np.full(30, 2)), "classes"),
        (dict(classes=np.full(30, -1)), "classes"),
        (dict(classes=np.zeros(3, dtype=int)), "classes"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=np.full(30, 1.0)), "alpha"),
        (dict(target_radius=-1.0), "target_radius"),
        (dict(target_radius=np.full(7, 0.1)), "target_radius"),
        (dict(classes=np.zeros(30, dtype=int), prior=(np.zeros(30), np.ones(30))), "prior"),
        (dict(classes=np.zeros(30, dtype=int), prior=(np.ones(4), np.ones(4), np.ones(4))), "prior"),
    ],
)
def test_bad_call_parameters_name_the_parameter(problem, smooth, call, name):
    with pytest.raises(InvalidParameterError, match=name):
        EProcessCertifier(smooth, 0.01, max_samples=10).certify(problem.x, **call)
    assert smooth.calls == []  # rejected before any sample is drawn


def test_per_input_prior_needs_a_chosen_class(problem, smooth):
    prior = stats.surrogate_prior(np.full(30, 0.9), kappa=10.0, w=0.5)
    with pytest.raises(InvalidParameterError, match="prior"):
        EProcessCertifier(smooth, 0.01, class_choice="per_class").certify(problem.x, prior=prior)
