"""The sequential certifier stops at the sample where its evidence suffices, and draws little past it.

- ``SmoothedClassifier.sample_predictions`` sees exactly the noise ``counts`` sums (same blocks and
  seeds), whatever the split into calls and the batch size.
- ``stop_time`` is the first sample at which the stopping rule fires, recomputed here independently
  from the per-sample outcomes and ``stats``; ``n_samples - stop_time`` is the rest of the round.
- All-agreeing inputs certify a target radius within 1.3 x the floor ``stats.sample_floor`` with the
  truncated prior, and the predicted jump makes them draw nothing past the stop; no pilot is drawn
  when the class is given or with ``class_choice="per_class"``.
- The priced best-radius rule trades radius for samples monotonically in the price.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surrogate_cert.core import stats
from surrogate_cert.core.certificate import Certificate, read_tsv, write_tsv
from surrogate_cert.core.groundtruth import LinearBinaryModel, linear_problem
from surrogate_cert.core.sequential import EProcessCertifier, GeometricSchedule
from surrogate_cert.core.smoothing import STREAM_SEQUENTIAL, SmoothedClassifier

SIGMA = 0.25


@pytest.fixture(scope="module")
def problem():
    return linear_problem(60, sigma=SIGMA, max_margin_sigmas=4.0, seed=31)


def smoothed(model, seed=2, batch_size=512):
    return SmoothedClassifier(model, 2, SIGMA, device="cpu", batch_size=batch_size, seed=seed)


def test_sample_predictions_see_the_noise_counts_sum(problem):
    rng = np.random.default_rng(0)
    n = rng.integers(0, 700, size=12)
    start = rng.integers(0, 600, size=12)
    idx = rng.integers(0, 10**6, size=12)
    for batch_size in (1, 97, 4096):
        smooth = smoothed(problem.model, batch_size=batch_size)
        counts = smooth.counts(problem.x[:12], n, indices=idx, stream=STREAM_SEQUENTIAL, start=start)
        preds = smooth.sample_predictions(problem.x[:12], n, indices=idx, stream=STREAM_SEQUENTIAL, start=start)
        assert preds.shape == (12, n.max())
        for row, k, c in zip(preds, n, counts):
            assert np.array_equal(np.bincount(row[:k], minlength=2), c) and np.all(row[k:] == -1)
    # Drawing in pieces gives the samples of one long draw.
    smooth = smoothed(problem.model)
    whole = smooth.sample_predictions(problem.x[:5], 900, stream=STREAM_SEQUENTIAL)
    parts = [
        smooth.sample_predictions(problem.x[:5], m, stream=STREAM_SEQUENTIAL, start=s0)
        for s0, m in ((0, 17), (17, 239), (256, 644))
    ]
    assert np.array_equal(whole, np.concatenate(parts, axis=1))


def _first_fire(preds, classes, p0, alpha, budget):
    """Index (1-based) where the target test fires or shows p < p0 or the budget ends, from scratch."""
    hits = preds == classes[:, None]
    s = np.cumsum(hits, axis=1).astype(float)
    t = np.arange(1, preds.shape[1] + 1, dtype=float)[None, :]
    prior = tuple(v[:, None, :] for v in stats.truncated_prior(np.full(len(classes), p0)))
    m = stats.beta_mixture_log_marginal(s, t, *prior)
    decision = stats.threshold_test(s, t, p0, alpha, m)
    out = []
    for row in decision:
        fired = np.flatnonzero(row != 0)
        out.append(int(fired[0]) + 1 if fired.size else budget)
    return np.array(out)


def test_stop_time_is_the_first_sample_where_the_test_decides(problem):
    budget, alpha, target = 3000, 0.01, 0.6 * SIGMA
    smooth = smoothed(problem.model)
    classes = problem.true_class
    certs = EProcessCertifier(
        smooth, alpha, policy="target_radius", target_radius=target, max_samples=budget, prior="truncated"
    ).certify(problem.x, classes=classes)
    preds = smooth.sample_predictions(problem.x, budget, stream=STREAM_SEQUENTIAL)
    expected = _first_fire(preds, classes, float(stats.p_threshold(target, SIGMA)), alpha, budget)
    stop = np.array([c.stop_time for c in certs])
    n = np.array([c.n_samples for c in certs])
    hopeless = stop < expected  # the budget rule (even all-agreeing samples could not fire) may stop sooner
    assert np.array_equal(stop[~hopeless], expected[~hopeless])
    assert all(not c.radius >= target for c, h in zip(certs, hopeless) if h)
    assert np.all(n >= stop) and np.all(n <= budget)
    # One sample per round: nothing is drawn past the stop.
    single = EProcessCertifier(
        smooth, alpha, policy="target_radius", target_radius=target, max_samples=budget, prior="truncated", schedule=[1]
    ).certify(problem.x[:8], classes=classes[:8])
    assert [c.n_samples for c in single] == [c.stop_time for c in single] == stop[:8].tolist()
    assert [c.radius >= target for c in single] == [c.radius >= target for c in certs[:8]]


def test_default_schedule_draws_little_past_the_stop(problem):
    smooth = smoothed(problem.model)
    for kw in (dict(policy="target_radius", target_radius=SIGMA), dict(tolerance=0.05), dict(price=0.05)):
        certs = EProcessCertifier(smooth, 0.01, max_samples=4000, **kw).certify(problem.x, classes=problem.true_class)
        n = np.mean([c.n_samples for c in certs])
        stop = np.mean([c.stop_time for c in certs])
        assert stop <= n <= 1.1 * stop + 32, (kw, n, stop)


def _always(cls: int) -> LinearBinaryModel:
    """A base model whose every noisy sample returns ``cls``: p = 1, every sample agrees."""
    return LinearBinaryModel(torch.ones(4) / 2, 100.0 if cls == 1 else -100.0)


@pytest.mark.parametrize("multiple", [1, 2, 3])
def test_all_agreeing_inputs_stop_near_the_floor_with_the_truncated_prior(multiple):
    x = torch.full((3, 1, 2, 2), 0.5)
    smooth = smoothed(_always(1))
    target = multiple * SIGMA
    floor = stats.sample_floor(1e-3, target, SIGMA)
    runs = {}
    for prior in ("truncated", "kt"):
        certs = EProcessCertifier(
            smooth, 1e-3, policy="target_radius", target_radius=target, prior=prior, max_samples=10_000
        ).certify(x, classes=np.ones(3, dtype=np.int64))
        assert all(c.radius >= target and c.prediction == 1 for c in certs)
        runs[prior] = certs
    stops = [c.stop_time for c in runs["truncated"]]
    assert floor <= min(stops) and max(stops) <= 1.3 * floor, (stops, floor)
    assert all(c.n_samples == c.stop_time for c in runs["truncated"])  # the predicted jump lands on the stop
    assert max(stops) < min(c.stop_time for c in runs["kt"])


def test_no_pilot_when_the_class_is_known_or_per_class():
    x = torch.full((4, 1, 2, 2), 0.5)
    smooth = smoothed(_always(0))
    given = EProcessCertifier(smooth, 1e-3, policy="target_radius", target_radius=SIGMA).certify(
        x, classes=np.zeros(4, dtype=np.int64)
    )
    per_class = EProcessCertifier(
        smooth, 1e-3, policy="target_radius", target_radius=SIGMA, class_choice="per_class"
    ).certify(x)
    pilot = EProcessCertifier(smooth, 1e-3, policy="target_radius", target_radius=SIGMA).certify(x)
    assert all(c.prediction == 0 and c.radius >= SIGMA for c in given + per_class + pilot)
    assert all(c.stop_time == g.stop_time - 100 for c, g in zip(given, pilot))
    # Per class: K = 2 sequences at alpha / 2, stopping as soon as class 0 certifies.
    floor_half_alpha = stats.sample_floor(1e-3 / 2, SIGMA, SIGMA)
    assert all(floor_half_alpha <= c.stop_time <= 1.3 * floor_half_alpha for c in per_class)


def test_priced_rule_trades_radius_for_samples(problem):
    smooth = smoothed(problem.model)
    results = []
    for price in (0.01, 0.05, 0.2):
        certs = EProcessCertifier(smooth, 1e-3, price=price, max_samples=5000).certify(
            problem.x, classes=problem.true_class
        )
        results.append((np.mean([c.n_samples for c in certs]), np.mean([c.radius for c in certs])))
    samples, acr = zip(*results)
    assert samples[0] > samples[1] > samples[2] and acr[0] > acr[1] > acr[2]
    # Price 0 stops only where more samples are expected to gain nothing; the tolerance rule still holds.
    plain = EProcessCertifier(smooth, 1e-3, max_samples=5000).certify(problem.x[:10], classes=problem.true_class[:10])
    free = EProcessCertifier(smooth, 1e-3, max_samples=5000, price=0.0).certify(
        problem.x[:10], classes=problem.true_class[:10]
    )
    assert all(f.stop_time <= p.stop_time for f, p in zip(free, plain))
    assert np.mean([f.radius for f in free]) >= np.mean([p.radius for p in plain]) - 0.02


def test_empty_batch_and_unreachable_target_draw_nothing(problem):
    smooth = smoothed(problem.model)
    assert EProcessCertifier(smooth, 0.01).certify(problem.x[:0]) == []
    # 5 sigma needs more than 10 samples even if all agree: given up before the first sample.
    certs = EProcessCertifier(smooth, 0.01, policy="target_radius", target_radius=5 * SIGMA, max_samples=10).certify(
        problem.x[:3], classes=problem.true_class[:3]
    )
    assert [(c.n_samples, c.stop_time, c.prediction) for c in certs] == [(0, 0, -1)] * 3


def test_geometric_schedule_checks_its_parameters():
    assert GeometricSchedule(first=8, growth=1.5, largest=64).sizes(np.array([0, 8, 100, 1000])).tolist() == [
        8,
        8,
        50,
        64,
    ]
    for bad in (dict(growth=1.0), dict(first=0), dict(first=64, largest=32)):
        with pytest.raises(Exception, match="first|growth|largest"):
            GeometricSchedule(**bad)


def test_stop_time_column_round_trips_and_old_files_read(tmp_path):
    certs = [
        Certificate(1, 0.5, "eprocess", 400, 0.97, 0.1, stop_time=350),
        Certificate(0, 0.3, "cohen", 10_100, 0.9, 1.0),
    ]
    assert certs[1].stop_time == 10_100  # default: a fixed-sample stop
    path = tmp_path / "r.tsv"
    write_tsv(path, [3, 4], [1, 0], certs)
    header = path.read_text().splitlines()[0].split("\t")
    assert "stop_time" in header and header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [r["stop_time"] for r in read_tsv(path)] == [350, 10_100]
    old = tmp_path / "old.tsv"
    old.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\tn_samples\tp_lower\n"
        "3\t1\t1\t0.5\t1\t0.1\teprocess\t400\t0.97\n"
    )
    assert read_tsv(old)[0]["stop_time"] == 400
