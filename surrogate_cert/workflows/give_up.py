"""The decision "is p >= Phi(r*/sigma)?" side by side: target mode's tests against the published sequential test.

The published test (Voracek, "Treatment of statistical estimation problems in randomized smoothing for
adversarial robustness", NeurIPS 2024, code vvoracek/RS_conf_seq) decides at the first sample where the
Krichevsky-Trofimov (Beta(1/2, 1/2)) mixture likelihood ratio against ``p0`` reaches a threshold on either
side. Its code compares the log ratio with ``log(1/alpha/2)``, which Python reads as ``log(1 / (2 alpha))``:
each side is a test at level ``2 alpha`` (by Ville's inequality), so at a nominal ``alpha = 0.001`` it
decides at a ratio of 500. It is implemented here as that code runs it (``published_thresholds``,
success-count thresholds per sample); ``benchmarks/give_up_vs_voracek.py --published-code DIR`` takes the
thresholds from the authors' code itself, as a cross-check.

Both run on the same Bernoulli streams (``BernoulliSmoothed``: sample ``j`` of input ``i`` is a success with
probability ``p_i``, reproducible per ``(seed, i, j)``), ours through ``EProcessCertifier`` itself (target
mode, the class given, so ``stop_time`` is exactly the sample where its rule fired). Two input sets: a grid
of ``p`` around each threshold (``r* = 1, 2, 3`` sigma; ``p = Phi(r*/sigma + d)``), and the ``p`` of real
inputs (a counts file's majority-class frequency, e.g. MNIST test images at 10^4 samples). Reported: mean
samples to the decision on the certify side (``p >= p0``) and the reject side (``p < p0``), their ratios to
the published test, and the wrong decisions of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ..core import stats
from ..core.sequential import EProcessCertifier
from ..core.smoothing import STREAM_SEQUENTIAL

__all__ = [
    "BernoulliSmoothed",
    "published_thresholds",
    "published_stop_times",
    "GiveUpConfig",
    "run_give_up",
    "give_up_markdown",
]

BLOCK = 4096
"""Samples per reproducible block of a Bernoulli stream."""


class BernoulliSmoothed:
    """A ``SmoothedClassifier`` stand-in whose noisy predictions are Bernoulli: class 0 w.p. ``p[i]``, else 1.

    ``sample_predictions`` serves samples ``start .. start + n - 1`` of input ``indices[i]`` (rows of ``p``);
    sample ``j`` comes from block ``j // BLOCK`` of a generator seeded by ``(seed, index, stream, block)``, so a
    run's outcomes do not depend on how they are requested. ``sigma`` is 1: a radius is in units of sigma.
    """

    def __init__(self, p, seed: int = 0):
        self.p = np.asarray(p, dtype=float)
        self.seed = int(seed)
        self.num_classes, self.sigma, self.batch_size, self.device = 2, 1.0, 1 << 20, torch.device("cpu")
        self.evaluations = 0

    def stream(self, index: int, start: int, n: int, stream: int = STREAM_SEQUENTIAL) -> np.ndarray:
        """Successes (bool) of samples ``start .. start + n - 1`` of input ``index``."""
        first, last = start // BLOCK, (start + n - 1) // BLOCK if n else start // BLOCK - 1
        blocks = [
            np.random.default_rng([self.seed, int(index), int(stream), b]).random(BLOCK) < self.p[index]
            for b in range(first, last + 1)
        ]
        joined = np.concatenate(blocks) if blocks else np.zeros(0, dtype=bool)
        return joined[start - first * BLOCK : start - first * BLOCK + n]

    def sample_predictions(self, x, n, *, indices=None, stream=STREAM_SEQUENTIAL, start=0) -> np.ndarray:
        num = x.shape[0]
        idx = np.arange(num) if indices is None else np.asarray(indices, dtype=np.int64)
        n = np.broadcast_to(np.asarray(n, dtype=np.int64), (num,))
        start = np.broadcast_to(np.asarray(start, dtype=np.int64), (num,))
        out = np.full((num, int(n.max()) if num else 0), -1, dtype=np.int32)
        for row in range(num):
            out[row, : n[row]] = np.where(self.stream(idx[row], int(start[row]), int(n[row]), stream), 0, 1)
        self.evaluations += int(n.sum())
        return out

    def counts(self, x, n, *, indices=None, stream=STREAM_SEQUENTIAL, start=0) -> np.ndarray:
        preds = self.sample_predictions(x, n, indices=indices, stream=stream, start=start)
        return np.stack([(preds == c).sum(axis=1) for c in range(2)], axis=1).astype(np.int64)


def published_thresholds(p0: float, alpha: float, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The published test's thresholds on the success count ``S_t``, ``t = 0 .. cap``: ``(reject, certify)``.

    Certify at the first ``t`` with ``S_t >= certify[t]``: the KT mixture likelihood ratio against ``p0`` is
    larger than ``1 / (2 alpha)`` (the authors' code: ``log(1/alpha/2)``) and ``S_t >= p0 t``; reject at the
    first ``t`` with ``S_t <= reject[t]``: the same ratio with ``S_t <= p0 t``. ``certify[t] = t + 1`` and
    ``reject[t] = -1`` where no count decides. Found by bisection on ``S`` (the evidence is monotone on
    each side of ``p0 t``).
    """
    t = np.arange(cap + 1, dtype=float)
    level = np.log(1.0 / alpha / 2.0)

    def evidence(s):
        return stats.beta_mixture_log_marginal(s, t) - (s * np.log(p0) + (t - s) * np.log1p(-p0))

    def bisect(lo, hi, fires_at, want_low):
        # Invariant: fires at the "good" end, not at the other; 40 halvings resolve every t <= 2^40.
        for _ in range(40):
            mid = np.floor((lo + hi) / 2) if want_low else np.ceil((lo + hi) / 2)
            ok = fires_at(mid)
            lo, hi = (
                (np.where(ok, mid, lo), np.where(ok, hi, mid))
                if want_low
                else (np.where(ok, lo, mid), np.where(ok, mid, hi))
            )
        return lo if want_low else hi

    up_fires = lambda s: (evidence(s) > level) & (s >= p0 * t)  # noqa: E731
    down_fires = lambda s: (evidence(s) > level) & (s <= p0 * t)  # noqa: E731
    certify = np.where(up_fires(t), bisect(np.floor(p0 * t), t.copy(), up_fires, False), t + 1)
    reject = np.where(down_fires(np.zeros_like(t)), bisect(np.zeros_like(t), np.ceil(p0 * t), down_fires, True), -1)
    return reject.astype(np.int64), certify.astype(np.int64)


def published_stop_times(smooth: BernoulliSmoothed, indices, thresholds, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input: the sample where the published test decides (``cap`` if never) and its decision (+1 / -1 / 0)."""
    reject, certify = thresholds
    stops, decisions = np.full(len(indices), cap), np.zeros(len(indices), dtype=np.int64)
    for row, i in enumerate(indices):
        s_prev, start = 0, 0
        while start < cap:
            n = min(8 * BLOCK, cap - start)
            s = s_prev + np.cumsum(smooth.stream(int(i), start, n))
            t = np.arange(start + 1, start + n + 1)
            hit = np.flatnonzero((s >= certify[t]) | (s <= reject[t]))
            if hit.size:
                j = hit[0]
                stops[row], decisions[row] = t[j], 1 if s[j] >= certify[t[j]] else -1
                break
            s_prev, start = int(s[-1]), start + n
    return stops, decisions


@dataclass(frozen=True)
class GiveUpConfig:
    """The side-by-side measurement (``run_give_up``): ``alpha``, the common sample cap, radii in sigma units."""

    alpha: float = 1e-3
    cap: int = 100_000
    radii: tuple[float, ...] = (1.0, 2.0, 3.0)
    offsets: tuple[float, ...] = (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)
    runs: int = 200
    seed: int = 0


OURS = {
    "dedicated": dict(give_up="dedicated"),
    "dedicated_give_up_2alpha": dict(give_up="dedicated", give_up_level=2.0),
    "mixture": dict(give_up="mixture"),
}
"""Our variants: the dedicated give-up at ``alpha`` (the default), the same with the give-up test at ``2 alpha``
(the level of each side of the published code; certificates stay at ``alpha``), version 0.3's mixture rule."""


def _ours(smooth, p, target, alpha, cap, give_up, give_up_level=1.0):
    """``EProcessCertifier`` in target mode on inputs ``0..N-1`` of ``smooth``: stop times and decisions.

    Decision +1 (certified), -1 (gave up: for the dedicated rule, its test fired at the stop, found by
    replaying the stream to the stop; for the mixture rule, any stop before the cap), 0 (the budget: the cap,
    or "no run can certify within the cap any more")."""
    certifier = EProcessCertifier(smooth, alpha, max_samples=cap, give_up=give_up, give_up_alpha=give_up_level * alpha)
    x = torch.zeros(len(p), 1, 1, 1)
    certs = certifier.certify(x, classes=np.zeros(len(p), dtype=np.int64), target_radius=target)
    certified = np.array([c.radius >= target * (1 - 1e-9) for c in certs])
    stop = np.array([c.stop_time for c in certs], dtype=np.int64)
    gave_up = ~certified & (stop < cap)
    if give_up == "dedicated":
        p0 = float(norm.cdf(target))
        for i in np.flatnonzero(gave_up):
            s = float(smooth.stream(i, 0, int(stop[i])).sum())
            m = stats.beta_mixture_log_marginal(s, float(stop[i]), *(v[0] for v in stats.give_up_prior([p0])))
            gave_up[i] = bool(stats.give_up_test(s, float(stop[i]), p0, give_up_level * alpha, m))
    return stop, np.where(certified, 1, np.where(gave_up, -1, 0)), np.array([c.n_samples for c in certs])


def measure_inputs(p, radius: float, cfg: GiveUpConfig, seed: int, published=None) -> dict:
    """Every test on the same streams of inputs with success probabilities ``p`` at ``r* = radius`` sigma."""
    p = np.asarray(p, dtype=float)
    p0 = float(norm.cdf(radius))
    smooth = BernoulliSmoothed(p, seed)
    rows = {}
    t0 = time.perf_counter()
    for rule, options in OURS.items():
        stop, decision, samples = _ours(smooth, p, radius, cfg.alpha, cfg.cap, **options)
        rows[rule] = dict(stop=stop, decision=decision, samples=samples)
    thresholds = published if published is not None else published_thresholds(p0, cfg.alpha, cfg.cap)
    stop, decision = published_stop_times(smooth, np.arange(len(p)), thresholds, cfg.cap)
    rows["published"] = dict(stop=stop, decision=decision, samples=stop)
    above = p >= p0
    out = dict(
        p0=p0,
        inputs=int(len(p)),
        certify_side=int(above.sum()),
        reject_side=int((~above).sum()),
        seconds=time.perf_counter() - t0,
    )
    for name, r in rows.items():
        wrong = ((r["decision"] == 1) & ~above) | ((r["decision"] == -1) & above)
        out[name] = dict(
            stop_certify_side=_mean(r["stop"][above]),
            stop_reject_side=_mean(r["stop"][~above]),
            samples_certify_side=_mean(r["samples"][above]),
            samples_reject_side=_mean(r["samples"][~above]),
            wrong_decisions=int(wrong.sum()),
            wrong_certify=int(np.sum((r["decision"] == 1) & ~above)),
            wrong_give_up=int(np.sum((r["decision"] == -1) & above)),
            undecided=int(np.sum(r["decision"] == 0)),
        )
    for name in OURS:
        for side in ("certify", "reject"):
            ours, ref = out[name][f"stop_{side}_side"], out["published"][f"stop_{side}_side"]
            out[name][f"ratio_{side}_side"] = None if ours is None or not ref else ours / ref
    return out


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def run_give_up(cfg: GiveUpConfig = GiveUpConfig(), real_inputs: dict | None = None, published=None, say=print) -> dict:
    """The grid (``cfg.runs`` streams per point) and, optionally, real inputs' ``p`` (name -> array); JSON-ready.

    ``published(p0, alpha, cap)`` may supply the published thresholds from elsewhere (the authors' code).
    """
    started = time.perf_counter()
    content: dict = dict(
        config=dict(
            alpha=cfg.alpha, cap=cfg.cap, radii=list(cfg.radii), offsets=list(cfg.offsets), runs=cfg.runs, seed=cfg.seed
        ),
        grid={},
        real={},
    )
    for k, radius in enumerate(cfg.radii):
        p0 = float(norm.cdf(radius))
        thresholds = published(p0, cfg.alpha, cfg.cap) if published else published_thresholds(p0, cfg.alpha, cfg.cap)
        for j, d in enumerate(cfg.offsets):
            p = np.full(cfg.runs, norm.cdf(radius + d))
            row = measure_inputs(p, radius, cfg, cfg.seed + 1000 * k + j, thresholds)
            content["grid"][f"r{radius:g}_d{d:+g}"] = dict(radius_sigmas=radius, offset_sigmas=d, p=float(p[0]), **row)
            say(
                f"r*={radius:g} sigma, p=Phi({radius + d:g}): "
                + ", ".join(
                    f"{n} {row[n]['stop_certify_side' if d > 0 else 'stop_reject_side']:.0f}"
                    for n in (*OURS, "published")
                )
            )
        for name, p in (real_inputs or {}).items():
            row = measure_inputs(p, radius, cfg, cfg.seed + 10_000 + k, thresholds)
            content["real"].setdefault(name, {})[f"r{radius:g}"] = row
            say(
                f"{name}, r*={radius:g} sigma: ratios "
                + ", ".join(f"{side} {row['dedicated'][f'ratio_{side}_side']}" for side in ("certify", "reject"))
            )
    content["summary"] = give_up_summary(content)
    content["seconds"] = time.perf_counter() - started
    content["markdown"] = give_up_markdown(content)
    return content


def give_up_summary(content: dict) -> dict:
    """Worst ratio to the published test on each side, over the grid and the real inputs; wrong decisions."""
    out = {}
    for rule in OURS:
        ratios = {"certify": [], "reject": []}
        wrong = 0
        rows = list(content["grid"].values()) + [r for per in content["real"].values() for r in per.values()]
        for row in rows:
            wrong += row[rule]["wrong_decisions"]
            for side in ratios:
                if row[rule][f"ratio_{side}_side"] is not None:
                    ratios[side].append(row[rule][f"ratio_{side}_side"])
        out[rule] = dict(
            worst_ratio_certify_side=max(ratios["certify"], default=None),
            worst_ratio_reject_side=max(ratios["reject"], default=None),
            best_ratio_certify_side=min(ratios["certify"], default=None),
            best_ratio_reject_side=min(ratios["reject"], default=None),
            wrong_decisions=wrong,
            target="<= 1.0x the published test's samples on both sides",
        )
        out[rule]["met"] = bool(
            ratios["certify"] and ratios["reject"] and max(ratios["certify"]) <= 1.0 and max(ratios["reject"]) <= 1.0
        )
    return out


def give_up_markdown(content: dict) -> str:
    """The side-by-side tables (docs/one-pass.md): mean samples to the decision per grid point and real set."""
    lines = [
        "| r* | p | side | published | dedicated (alpha) | ratio | dedicated, give-up at 2 alpha | ratio | "
        "version 0.3 mixture | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [
        (f"{r['radius_sigmas']:g}σ", f"Φ({r['radius_sigmas'] + r['offset_sigmas']:g})", r)
        for r in content["grid"].values()
    ]
    rows += [(k[1:] + "σ", name, r) for name, per in content.get("real", {}).items() for k, r in per.items()]
    for radius, p, r in rows:
        for side in ("certify", "reject"):
            ref = r["published"][f"stop_{side}_side"]
            if ref is None:
                continue
            cells = [f"{ref:,.0f}"]
            for rule in OURS:
                ours, ratio = r[rule][f"stop_{side}_side"], r[rule][f"ratio_{side}_side"]
                cells += [f"{ours:,.0f}", f"{ratio:.2f}"]
            lines.append(f"| {radius} | {p} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
