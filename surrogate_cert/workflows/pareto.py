"""Pareto benchmark: base-model evaluations per input against certified accuracy, sequential vs Cohen-n.

``benchmarks/sequential_vs_cohen.py`` is a configuration of ``run_pareto``; the certifiers are the
bench harness's (``workflows.bench``).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import torch

from calibration.artifact import load_calibration
from calibration.conformal import calibrate_arrays
from calibration.summary import environment
from data_gen.datasets import load_split
from data_gen.models import load_model
from data_gen.store import read_counts

from ..core import stats
from ..core.certificate import Certificate
from ..core.cohen import certificates_from_counts
from ..core.errors import InvalidParameterError
from ..core.files import write_text_atomic
from ..core.groundtruth import linear_problem
from ..core.one_pass import SurrogateCertifier
from ..core.sequential import EProcessCertifier, default_schedule
from ..core.smoothing import STREAM_ESTIMATE, STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier
from ..core.surrogate import Surrogate
from .bench import json_safe
from .pipeline import FULL, Pipeline

matplotlib.use("Agg", force=True)  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# =========================================================================== Pareto: samples vs certificates
#
# Samples per input against certified accuracy at r = sigma, 2 sigma, 3 sigma and ACR, for Cohen-n over
# n, the sequential certifier's priors and rules, on the linear ground truth and on images. Every noise
# stream an input can use (selection, estimation, sequential) is recorded once, sample by sample
# (``SmoothedClassifier.sample_predictions``); Cohen-n for every n reads prefixes of one estimation
# stream (sample j of an input is fixed by its block seed, so the first n samples of a 10^5 stream ARE
# the n-sample stream), and every sequential row replays the recorded sequential stream
# (``RecordedSmoothed``), so its certificates and evaluation counts are exactly those of a live run.

PARETO_COHEN_N = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
PARETO_PRICES = (0.01, 0.02, 0.05, 0.1)
PARETO_MULTIPLES = (1, 2, 3)
PARETO_STREAMS = {"select": STREAM_SELECT, "estimate": STREAM_ESTIMATE, "sequential": STREAM_SEQUENTIAL}


@dataclass(frozen=True)
class ParetoConfig:
    """One dataset of the Pareto benchmark.

    ``dataset``: ``linear`` (the exact linear problem, ``linear_points`` points with margins uniform in
    +-``linear_margin`` sigma; its true radii also give wrong-certificate counts; its surrogate is
    trained (``linear_epochs``) and calibrated here on ``linear_offline`` = (train points, cal points,
    train n, cal n)), ``digits`` (the quickstart's base model and surrogate, from ``workdir``) or any
    ``load_split`` dataset with ``model`` (e.g. ``mnist`` with an MLP). ``limit`` test images; Cohen-n
    for each ``cohen_n`` (the estimation stream is recorded up to the largest); sequential budget
    ``max_samples``; target rows at ``target_multiples`` x sigma (and, with the class f(x), at the
    smaller budgets ``target_budgets``: the budget is the target mode's price knob); priced best-radius
    rows at ``prices``. ``surrogate`` (a checkpoint; for linear and digits it is made here) adds the
    surrogate-prior rows; a calibration adds the comparison on the hybrid's fallback inputs.
    ``reference_counts`` (a counts file of the same model, split, sigma and seed, e.g. from ``datagen``)
    is compared with the recorded streams: its ``counts`` / ``counts_select`` must be their prefixes.
    """

    dataset: str = "linear"
    sigma: float = 0.25
    alpha: float = 1e-3
    limit: int | None = 100
    n0: int = 100
    cohen_n: tuple[int, ...] = PARETO_COHEN_N
    max_samples: int = 10_000
    tolerance: float = 0.01
    prices: tuple[float, ...] = PARETO_PRICES
    target_multiples: tuple[float, ...] = PARETO_MULTIPLES
    target_budgets: tuple[int, ...] = (1_000, 3_000)
    model: str | None = None
    data_root: str | None = None
    surrogate: str | None = None
    calibration: str | None = None
    reference_counts: str | None = None
    linear_points: int = 1000
    linear_margin: float = 4.0
    linear_offline: tuple[int, int, int, int] = (1000, 1000, 1000, 10_000)
    linear_epochs: int = 30
    seed: int = 0
    batch_size: int = 2000
    device: str | None = "cpu"


class RecordedSmoothed:
    """A ``SmoothedClassifier`` stand-in that serves recorded per-sample outcomes.

    ``recordings[stream]`` holds, for each input named in ``names`` (noise indices), the classes of its
    first samples of that stream, as ``SmoothedClassifier.sample_predictions`` drew them. ``counts`` and
    ``sample_predictions`` inside the recorded range return exactly what a live call returns (the noise
    of sample j is fixed by (seed, index, stream, block)); a request beyond it is an error, never a
    silent live draw. ``evaluations`` counts the samples served, as a live run would have spent them.
    """

    def __init__(self, smooth: SmoothedClassifier, names: np.ndarray, recordings: dict[int, np.ndarray]):
        self.num_classes, self.sigma, self.batch_size = smooth.num_classes, smooth.sigma, smooth.batch_size
        self.device, self.seed, self.model = smooth.device, smooth.seed, smooth.model
        self.radius_slack = smooth.radius_slack  # the recordings' noise scheme decides the radius
        order = np.argsort(names)
        self._names, self._rows = np.asarray(names)[order], order
        self.recordings = recordings
        self.evaluations = 0

    def _lookup(self, x, n, indices, stream, start):
        num = x.shape[0]
        names = np.arange(num) if indices is None else np.asarray(indices, dtype=np.int64)
        pos = np.searchsorted(self._names, names)
        if np.any(pos >= len(self._names)) or np.any(self._names[np.minimum(pos, len(self._names) - 1)] != names):
            raise InvalidParameterError("RecordedSmoothed: an input was not recorded")
        rows = self._rows[pos]
        n = np.broadcast_to(np.asarray(n, dtype=np.int64), (num,))
        start = np.broadcast_to(np.asarray(start, dtype=np.int64), (num,))
        rec = self.recordings[stream]
        if num and int((start + n).max()) > rec.shape[1]:
            raise InvalidParameterError(
                f"RecordedSmoothed: stream {stream} recorded up to {rec.shape[1]} samples, "
                f"asked for {int((start + n).max())}"
            )
        self.evaluations += int(n.sum())
        return rows, n, start, rec

    def sample_predictions(self, x, n, *, indices=None, stream=STREAM_ESTIMATE, start=0) -> np.ndarray:
        rows, n, start, rec = self._lookup(x, n, indices, stream, start)
        width = int(n.max()) if len(n) else 0
        cols = start[:, None] + np.arange(width)[None, :]
        out = rec[rows[:, None], np.minimum(cols, rec.shape[1] - 1)].astype(np.int32)
        out[np.arange(width)[None, :] >= n[:, None]] = -1
        return out

    def counts(self, x, n, *, indices=None, stream=STREAM_ESTIMATE, start=0) -> np.ndarray:
        preds = self.sample_predictions(x, n, indices=indices, stream=stream, start=start)
        return np.stack([(preds == c).sum(axis=1) for c in range(self.num_classes)], axis=1).astype(np.int64)


def record_streams(
    smooth: SmoothedClassifier,
    x: torch.Tensor,
    indices: np.ndarray,
    lengths: dict[int, int],
    cache: Path | None = None,
    chunk_samples: int = 2_000_000,
) -> dict[int, np.ndarray]:
    """Per-sample classes of the first ``lengths[stream]`` samples of each stream, per input (int8/16).

    Drawn in chunks of inputs and samples (``sample_predictions`` with ``start``), so memory stays
    bounded; cached in ``cache`` (npz) keyed by what fixes the noise and the model's answers.
    """
    dtype = np.int8 if smooth.num_classes <= 127 else np.int16
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            if np.array_equal(stored["indices"], indices):
                have = {int(k.split("_")[1]): stored[k] for k in stored.files if k.startswith("stream_")}
                if all(s in have and have[s].shape[1] >= n for s, n in lengths.items()):
                    return {s: have[s][:, :n] for s, n in lengths.items()}
    out = {}
    for stream, n in lengths.items():
        rec = np.empty((len(indices), n), dtype=dtype)
        per = max(1, min(len(indices), chunk_samples // max(min(n, 10_000), 1)))
        for lo in range(0, len(indices), per):
            hi = min(lo + per, len(indices))
            for start in range(0, n, 10_000):
                take = min(10_000, n - start)
                rec[lo:hi, start : start + take] = smooth.sample_predictions(
                    x[lo:hi], take, indices=indices[lo:hi], stream=stream, start=start
                )
        out[stream] = rec
    if cache is not None:
        tmp = cache.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, indices=indices, **{f"stream_{s}": r for s, r in out.items()})
        os.replace(tmp, cache)
    return out


@dataclass
class ParetoInputs:
    """What every row of one dataset shares."""

    name: str
    x: torch.Tensor
    labels: np.ndarray
    indices: np.ndarray
    smooth: SmoothedClassifier
    truth: object = None  # LinearProblem for the linear ground truth
    surrogate: Surrogate | None = None
    calibration: object = None
    note: str = ""


def _linear_inputs(cfg: ParetoConfig, workdir: Path) -> ParetoInputs:
    sigma = cfg.sigma
    test = linear_problem(cfg.linear_points, sigma, max_margin_sigmas=cfg.linear_margin, seed=cfg.seed + 2000)
    smooth = SmoothedClassifier(test.model, 2, sigma, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed)
    note = (
        f"{cfg.linear_points} points, margins uniform in +-{cfg.linear_margin:g} sigma, labels = the true "
        "smoothed class"
    )
    indices = 20_000_000 + np.arange(cfg.linear_points, dtype=np.int64)
    # A surrogate trained and calibrated on points of its own, as the bench's ground-truth section does;
    # kept in the work folder, so a re-run replays every row without redoing it.
    key = hashlib.sha256(repr((sigma, cfg.linear_margin, cfg.linear_offline, cfg.linear_epochs, cfg.seed)).encode())
    stem = workdir / f"linear-surrogate-{key.hexdigest()[:12]}"
    if stem.with_suffix(".pt").exists() and stem.with_suffix(".json").exists():
        surrogate = Surrogate.load(stem.with_suffix(".pt"), device=cfg.device)
        calibration = load_calibration(stem.with_suffix(".json"), surrogate)
        return ParetoInputs(
            "linear",
            test.x,
            test.true_class.astype(np.int64),
            indices,
            smooth,
            truth=test,
            surrogate=surrogate,
            calibration=calibration,
            note=note,
        )
    n_train, n_cal, samples_train, samples_cal = cfg.linear_offline
    train = linear_problem(n_train, sigma, max_margin_sigmas=cfg.linear_margin, seed=cfg.seed)
    cal = linear_problem(n_cal, sigma, max_margin_sigmas=cfg.linear_margin, seed=cfg.seed + 1000)
    counts_train = smooth.counts(train.x, samples_train, indices=np.arange(n_train))
    counts_cal = smooth.counts(cal.x, samples_cal, indices=10_000_000 + np.arange(n_cal))
    surrogate = Surrogate.build(tuple(train.x.shape[1:]), 2, sigma, seed=cfg.seed, device=cfg.device)
    surrogate.fit(train.x, counts_train, epochs=cfg.linear_epochs, seed=cfg.seed)
    tune = surrogate.holdout_rows_ if len(surrogate.holdout_rows_) else surrogate.train_rows_
    surrogate.tune_prior(train.x[tune], counts_train[tune])
    calibration = calibrate_arrays(surrogate, cal.x, counts_cal, 0.01, 1e-3, dataset="linear_problem", split="cal")
    surrogate.save(stem.with_suffix(".pt"))
    calibration.save(stem.with_suffix(".json"))
    calibration = load_calibration(stem.with_suffix(".json"), surrogate)
    return ParetoInputs(
        "linear",
        test.x,
        test.true_class.astype(np.int64),
        indices,
        smooth,
        truth=test,
        surrogate=surrogate,
        calibration=calibration,
        note=note,
    )


def _image_inputs(cfg: ParetoConfig, workdir: Path) -> ParetoInputs:
    surrogate_path, calibration_path, model = cfg.surrogate, cfg.calibration, cfg.model
    if cfg.dataset == "digits" and model is None:
        pipeline = Pipeline(workdir, FULL, progress=False, quiet=True, command="pareto", total_stages=5)
        pipeline.offline()
        model = str(pipeline.paths["base.pt"])
        surrogate_path = surrogate_path or str(pipeline.paths["surrogate.pt"])
        calibration_path = calibration_path or str(pipeline.paths["calibration.json"])
    if model is None:
        raise InvalidParameterError(f"the Pareto benchmark on {cfg.dataset} needs a base model (model=...)")
    data = load_split(cfg.dataset, "test", data_root=cfg.data_root, limit=cfg.limit)
    loaded = load_model(model, device=cfg.device, num_classes=data.num_classes)
    smooth = SmoothedClassifier(
        loaded.model, data.num_classes, cfg.sigma, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed
    )
    surrogate = Surrogate.load(surrogate_path, device=cfg.device) if surrogate_path else None
    calibration = load_calibration(calibration_path, surrogate) if (calibration_path and surrogate) else None
    return ParetoInputs(
        cfg.dataset,
        data.x,
        data.y.numpy().astype(np.int64),
        np.asarray(data.indices),
        smooth,
        surrogate=surrogate,
        calibration=calibration,
        note=f"first {len(data)} images of the {cfg.dataset} test split, model {model}",
    )


def _pareto_row(certs: list[Certificate], inp: ParetoInputs, cfg: ParetoConfig, family: str, **info) -> dict:
    radius = np.array([c.radius for c in certs])
    correct = np.array([c.prediction for c in certs]) == inp.labels
    n = np.array([c.n_samples for c in certs], dtype=float)
    certified = radius > 0
    row = dict(
        family=family,
        **info,
        samples=float(n.mean()),
        stop_time=float(np.mean([c.stop_time for c in certs])),
        samples_certified=float(n[certified].mean()) if certified.any() else None,
        samples_rest=float(n[~certified].mean()) if (~certified).any() else None,
        certified_accuracy={
            "0": float(np.mean(correct & certified)),
            **{f"{m:g}sigma": float(np.mean(correct & (radius >= m * cfg.sigma - 1e-12))) for m in PARETO_MULTIPLES},
        },
        acr=float(np.mean(np.where(correct, radius, 0.0))),
    )
    if inp.truth is not None:
        wrong = int(inp.truth.wrong_certificates(certs).sum())
        row["wrong"], row["allowance"] = wrong, stats.binomial_allowance(len(certs), cfg.alpha)
    return row


def _agreeing_prefix(rec: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Leading samples of each recorded row equal to its class."""
    agree = rec == classes[:, None]
    return np.where(agree.all(axis=1), rec.shape[1], np.argmin(agree, axis=1))


def pareto_dataset(cfg: ParetoConfig, workdir: Path, *, say: Callable[[str], None] = print) -> dict:
    """Every row of the Pareto benchmark on one dataset, its targets, and the figure's data."""
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    inp = _linear_inputs(cfg, workdir) if cfg.dataset == "linear" else _image_inputs(cfg, workdir)
    num, sigma, alpha = len(inp.labels), cfg.sigma, cfg.alpha
    lengths = {STREAM_SELECT: cfg.n0, STREAM_ESTIMATE: max(cfg.cohen_n), STREAM_SEQUENTIAL: cfg.max_samples}
    cache = workdir / f"pareto-{cfg.dataset}-{num}-s{cfg.seed}-sigma{sigma:g}-{_model_key(inp)}.npz"
    say(f"[{cfg.dataset}] recording {sum(lengths.values()):,} samples per input for {num} inputs ({cache.name})")
    rec = record_streams(inp.smooth, inp.x, inp.indices, lengths, cache)
    record_seconds = time.perf_counter() - t0
    replay = RecordedSmoothed(inp.smooth, inp.indices, rec)
    rows: dict[str, dict] = {}
    reference = _reference_check(cfg, inp, rec) if cfg.reference_counts else None
    rows.update(_cohen_rows(cfg, inp, rec))

    clean = _clean_classes(inp)
    sur_classes, sur_prior = None, None
    if inp.surrogate is not None:
        sur_classes, p_tilde = inp.surrogate.predict(inp.x)
        sur_prior = stats.surrogate_prior(p_tilde, inp.surrogate.kappa, inp.surrogate.w)
    runs = _SequentialRuns(cfg, inp, rec, replay, rows)
    floor_checks = _target_rows(runs, clean, sur_classes, sur_prior)
    _best_radius_rows(runs, clean, sur_classes, sur_prior)

    fallback = _fallback_comparison(inp, replay, cfg) if inp.calibration is not None else None
    return dict(
        dataset=cfg.dataset,
        inputs=num,
        note=inp.note,
        sigma=sigma,
        alpha=alpha,
        n0=cfg.n0,
        max_samples=cfg.max_samples,
        rows=rows,
        floor=floor_checks,
        fallback_prior=fallback,
        reference_counts=reference,
        targets=_pareto_targets(rows, floor_checks, fallback, cfg),
        seconds=dict(recording=record_seconds, total=time.perf_counter() - t0),
    )


def _cohen_rows(cfg: ParetoConfig, inp: ParetoInputs, rec: dict) -> dict[str, dict]:
    """Cohen-n: class from the n0 selection samples, k from the first n estimation samples."""
    rows = {}
    select = np.stack([(rec[STREAM_SELECT] == c).sum(axis=1) for c in range(inp.smooth.num_classes)], axis=1)
    for n in cfg.cohen_n:
        prefix = rec[STREAM_ESTIMATE][:, :n]
        counts = np.stack([(prefix == c).sum(axis=1) for c in range(inp.smooth.num_classes)], axis=1)
        rows[f"cohen_{n}"] = _pareto_row(
            certificates_from_counts(select, counts, cfg.alpha, cfg.sigma), inp, cfg, "cohen", label=f"Cohen-{n:,}", n=n
        )
    return rows


@dataclass
class _SequentialRuns:
    """The sequential certifier's rows of one dataset, replayed from the recorded streams into ``rows``."""

    cfg: ParetoConfig
    inp: ParetoInputs
    rec: dict
    replay: RecordedSmoothed
    rows: dict[str, dict]

    def run(self, name, label, family, init, classes=None, prior=None, **info):
        """Certify every input with the options ``init``; the row is ``rows[name]``, the certificates returned."""
        init = {"max_samples": self.cfg.max_samples, **init}
        certifier = EProcessCertifier(self.replay, self.cfg.alpha, n0=self.cfg.n0, **init)
        started = time.perf_counter()
        certs = certifier.certify(self.inp.x, classes=classes, prior=prior, indices=self.inp.indices)
        self.rows[name] = _pareto_row(certs, self.inp, self.cfg, family, label=label, **info)
        self.rows[name]["seconds"] = time.perf_counter() - started
        return certs


def _target_rows(runs: _SequentialRuns, clean, sur_classes, sur_prior) -> dict:
    """The target-radius rows (each variant of prior and class, and budgets), and the floor checks of the
    truncated prior's rows (returned)."""
    cfg = runs.cfg
    floor_checks = {}
    for m in cfg.target_multiples:
        r = m * cfg.sigma
        target = dict(policy="target_radius", target_radius=r)
        variants = [
            (
                "v01",
                "version 0.1 (KT, pilot class, rounds 32..1000)",
                dict(prior="kt", schedule=default_schedule(1000)),
                None,
                None,
            ),
            ("kt_pilot", "KT, pilot class", dict(prior="kt"), None, None),
            ("truncated_pilot", "truncated, pilot class", dict(prior="truncated"), None, None),
            ("truncated_model", "truncated, class f(x)", dict(prior="truncated"), clean, None),
            (
                "truncated_per_class",
                "truncated, per class",
                dict(prior="truncated", class_choice="per_class"),
                None,
                None,
            ),
        ]
        if sur_classes is not None:
            variants.append(("surrogate", "surrogate prior and class", {}, sur_classes, sur_prior))
        for key, text, init, classes, prior in variants:
            name = f"target_{m:g}sigma_{key}"
            certs = runs.run(
                name,
                f"target {m:g} sigma: {text}",
                "target",
                {**target, **init},
                classes,
                prior,
                target_multiple=m,
                variant=key,
            )
            if key == "truncated_model":
                for budget in cfg.target_budgets:
                    if budget < cfg.max_samples:
                        runs.run(
                            f"{name}_budget{budget}",
                            f"target {m:g} sigma: truncated, class f(x), budget {budget:,}",
                            "target",
                            {**target, **init, "max_samples": budget},
                            classes,
                            prior,
                            target_multiple=m,
                            variant="truncated_budget",
                            budget=budget,
                        )
            if key.startswith("truncated"):
                per_class = key.endswith("per_class")
                floor_checks[name] = _floor_check(
                    certs,
                    runs.rec[STREAM_SEQUENTIAL],
                    r,
                    cfg,
                    pilot=cfg.n0 if key.endswith("pilot") else 0,
                    alpha=cfg.alpha / runs.inp.smooth.num_classes if per_class else cfg.alpha,
                )
    return floor_checks


def _best_radius_rows(runs: _SequentialRuns, clean, sur_classes, sur_prior) -> None:
    """The best-radius rows: the tolerance rule, and the priced rule for each price and prior."""
    cfg = runs.cfg
    runs.run(
        "best_kt_tolerance_pilot",
        f"best radius: KT, tolerance {cfg.tolerance:g}, pilot class",
        "best",
        dict(prior="kt", tolerance=cfg.tolerance),
    )
    for price in cfg.prices:
        certs = runs.run(
            f"best_kt_price{price:g}_model",
            f"best radius: KT, price {price:g}, class f(x)",
            "priced",
            dict(prior="kt", price=price),
            clean,
            None,
            price=price,
        )
        runs.rows[f"best_kt_price{price:g}_model"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
            certs, runs.rec[STREAM_SEQUENTIAL], cfg, pilot=0
        )
        certs = runs.run(
            f"best_radius_price{price:g}_model",
            f"best radius: radius prior, price {price:g}, class f(x)",
            "priced",
            dict(prior="radius", price=price),
            clean,
            None,
            price=price,
        )
        runs.rows[f"best_radius_price{price:g}_model"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
            certs, runs.rec[STREAM_SEQUENTIAL], cfg, pilot=0
        )
        if sur_classes is not None:
            certs = runs.run(
                f"best_surrogate_price{price:g}",
                f"best radius: surrogate prior, price {price:g}",
                "priced",
                dict(price=price),
                sur_classes,
                sur_prior,
                price=price,
            )
            runs.rows[f"best_surrogate_price{price:g}"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
                certs, runs.rec[STREAM_SEQUENTIAL], cfg, pilot=0
            )


def _reference_check(cfg: ParetoConfig, inp: ParetoInputs, rec: dict) -> dict:
    """Do the recorded streams reproduce a stored counts file (its rows of the same inputs)?"""
    stored = read_counts(cfg.reference_counts)
    rows = {int(i): r for r, i in enumerate(stored.indices)}
    mine = [i for i, name in enumerate(inp.indices) if int(name) in rows]
    theirs = [rows[int(inp.indices[i])] for i in mine]
    n, n0 = int(stored.attrs["n"]), int(stored.attrs.get("n0") or 0)
    k = inp.smooth.num_classes
    out = dict(path=cfg.reference_counts, inputs=len(mine), n=n, n0=n0)
    if n <= rec[STREAM_ESTIMATE].shape[1]:
        counts = np.stack([(rec[STREAM_ESTIMATE][mine, :n] == c).sum(axis=1) for c in range(k)], axis=1)
        out["counts_equal"] = bool(np.array_equal(counts, stored.counts[theirs]))
    if n0 and stored.counts_select is not None and n0 <= rec[STREAM_SELECT].shape[1]:
        select = np.stack([(rec[STREAM_SELECT][mine, :n0] == c).sum(axis=1) for c in range(k)], axis=1)
        out["counts_select_equal"] = bool(np.array_equal(select, stored.counts_select[theirs]))
    return out


def _model_key(inp: ParetoInputs) -> str:
    digest = hashlib.sha256()
    for tensor in inp.smooth.model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digest.update(inp.indices.tobytes())
    return digest.hexdigest()[:12]


def _clean_classes(inp: ParetoInputs) -> np.ndarray:
    """``argmax f(x)`` on the clean inputs: fixed before any noise is drawn (no pilot)."""
    out = []
    with torch.inference_mode():
        for lo in range(0, len(inp.x), 1024):
            xb = inp.x[lo : lo + 1024].to(inp.smooth.device, dtype=torch.float32)
            out.append(inp.smooth.predict_labels(xb).cpu().numpy())
    return np.concatenate(out).astype(np.int64)


def _floor_check(certs, seq: np.ndarray, target: float, cfg: ParetoConfig, pilot: int, alpha: float) -> dict:
    """Certified inputs whose samples up to the stop all agreed: stop against the floor at the test's
    level (``alpha``, or ``alpha / K`` for one sequence per class)."""
    floor = float(stats.sample_floor(alpha, target, cfg.sigma))
    classes = np.array([c.prediction for c in certs])
    stop = np.array([c.stop_time for c in certs]) - pilot
    agree = _agreeing_prefix(seq, np.maximum(classes, 0))
    pick = (np.array([c.radius for c in certs]) >= target - 1e-12) & (classes >= 0) & (agree >= stop)
    ratio = stop[pick] / floor
    return dict(
        floor=floor,
        floor_alpha=alpha,
        inputs=int(pick.sum()),
        max_ratio=float(ratio.max()) if pick.any() else None,
        mean_ratio=float(ratio.mean()) if pick.any() else None,
        within_1_3=bool(pick.any() and ratio.max() <= 1.3),
    )


def _vs_clopper_pearson(certs, seq: np.ndarray, cfg: ParetoConfig, pilot: int) -> dict:
    """Radius against the fixed-n Clopper-Pearson radius of the same samples (k of n, same class)."""
    classes = np.array([c.prediction for c in certs])
    n = np.array([c.n_samples for c in certs]) - pilot
    ok = classes >= 0
    if not ok.any():
        return dict(inputs=0)
    hits = (seq == np.maximum(classes, 0)[:, None]) & (np.arange(seq.shape[1])[None, :] < n[:, None])
    k = hits.sum(axis=1)
    cp = np.asarray(stats.radius(stats.lower_confidence_bound(k[ok], n[ok], cfg.alpha), cfg.sigma), dtype=float)
    mine = np.array([c.radius for c in certs])[ok]
    ratio = mine[cp > 0] / cp[cp > 0]
    return dict(
        inputs=int(ok.sum()),
        mean_radius=float(mine.mean()),
        mean_clopper_pearson_radius=float(cp.mean()),
        ratio_of_means=float(mine.mean() / cp.mean()) if cp.mean() > 0 else None,
        median_ratio=float(np.median(ratio)) if ratio.size else None,
    )


def _fallback_comparison(inp: ParetoInputs, replay: RecordedSmoothed, cfg: ParetoConfig) -> dict:
    """Samples of the surrogate prior against KT (and the truncated prior) on the hybrid's fallback inputs.

    Same inputs, class (the surrogate's), noise and rule: only the prior differs.
    """
    classes, p_tilde, radius = SurrogateCertifier(inp.surrogate, inp.calibration).radii(inp.x)
    fallback = np.flatnonzero(radius <= 0)
    out: dict = dict(inputs=int(fallback.size))
    if not fallback.size:
        return out
    xs, cls, idx = inp.x[fallback], classes[fallback], inp.indices[fallback]
    prior = stats.surrogate_prior(p_tilde[fallback], inp.surrogate.kappa, inp.surrogate.w)
    rules = {
        f"target_{m:g}sigma": dict(policy="target_radius", target_radius=m * cfg.sigma)
        for m in cfg.target_multiples[:2]
    }
    rules.update({f"price{p:g}": dict(price=p) for p in cfg.prices})
    rules["tolerance"] = dict(tolerance=cfg.tolerance)
    for name, rule in rules.items():
        certify = functools.partial(EProcessCertifier, replay, cfg.alpha, max_samples=cfg.max_samples, **rule)
        kt = certify(prior="kt").certify(xs, classes=cls, indices=idx)
        sur = certify().certify(xs, classes=cls, prior=prior, indices=idx)
        record = dict(
            kt_samples=float(np.mean([c.n_samples for c in kt])),
            surrogate_samples=float(np.mean([c.n_samples for c in sur])),
            kt_acr=float(np.mean([c.radius for c in kt])),
            surrogate_acr=float(np.mean([c.radius for c in sur])),
        )
        record["ratio"] = record["surrogate_samples"] / record["kt_samples"] if record["kt_samples"] else None
        if "policy" in rule:
            trunc = certify(prior="truncated").certify(xs, classes=cls, indices=idx)
            record["truncated_samples"] = float(np.mean([c.n_samples for c in trunc]))
            record["ratio_vs_truncated"] = record["surrogate_samples"] / record["truncated_samples"]
        out[name] = record
    return out


def _pareto_targets(rows: dict, floor: dict, fallback: dict | None, cfg: ParetoConfig) -> dict:
    """The issue's targets, measured: each with the numbers and whether it is met."""
    ref = rows.get("cohen_10000")
    out: dict = {}
    checked = [r for r in rows.values() if r["family"] != "cohen"]
    out["overshoot"] = dict(
        rule="mean n_samples <= 1.1 x mean stop_time + 32 (every sequential row)",
        worst=max((r["samples"] - 1.1 * r["stop_time"] - 32 for r in checked), default=None),
        met=all(r["samples"] <= 1.1 * r["stop_time"] + 32 for r in checked),
    )
    out["floor"] = dict(
        rule="certified all-agreeing inputs stop within 1.3 x log(1/alpha)/log(1/Phi(r*/sigma))",
        rows={k: v.get("max_ratio") for k, v in floor.items()},
        met=all(v["within_1_3"] for v in floor.values() if v["inputs"]),
    )
    if fallback and fallback.get("inputs"):
        ratios = {k: v["ratio"] for k, v in fallback.items() if isinstance(v, dict)}
        out["surrogate_vs_kt_on_fallback"] = dict(
            rule="surrogate prior <= 0.8 x KT samples on the fallback inputs",
            ratios=ratios,
            met_in=[k for k, v in ratios.items() if v <= 0.8],
        )
    if ref is not None:
        budget_target = ref["samples"] / 20
        target_rows = {}
        for m in (1, 2):
            key = f"{m:g}sigma"
            for name, r in rows.items():
                if r["family"] == "target" and r.get("target_multiple") == m:
                    drop = 100 * (ref["certified_accuracy"][key] - r["certified_accuracy"][key])
                    target_rows[name] = dict(
                        drop_pp=drop,
                        evaluations_vs_cohen_10k=r["samples"] / ref["samples"],
                        met=drop <= 1.0 and r["samples"] <= budget_target,
                    )
        out["target_mode_vs_cohen_10k"] = dict(
            rule="within 1 pp of Cohen-10k's certified accuracy at r* = sigma, 2 sigma at <= 1/20 of its evaluations",
            rows=target_rows,
        )
        best_rows = {}
        for name, r in rows.items():
            if r["family"] in ("priced", "best"):
                vs_cp = r.get("radius_vs_clopper_pearson") or {}
                best_rows[name] = dict(
                    acr_vs_cohen_10k=r["acr"] / ref["acr"] if ref["acr"] else None,
                    evaluations_vs_cohen_10k=r["samples"] / ref["samples"],
                    radius_vs_clopper_pearson=vs_cp.get("ratio_of_means"),
                    met_acr=bool(ref["acr"] and r["acr"] >= 0.74 * ref["acr"] and r["samples"] <= ref["samples"] / 10),
                    met_cp=bool(vs_cp.get("ratio_of_means") and vs_cp["ratio_of_means"] >= 0.97),
                )
        out["best_radius_vs_cohen_10k"] = dict(
            rule="ACR >= 0.74 x Cohen-10k's at <= 1/10 of its evaluations; "
            "radius >= 0.97 x Clopper-Pearson at the same samples",
            rows=best_rows,
        )
    return out


_TARGET_MARKERS = {
    "v01": ("x", "tab:gray"),
    "kt_pilot": ("o", "tab:orange"),
    "truncated_pilot": ("o", "tab:blue"),
    "truncated_model": ("^", "tab:blue"),
    "truncated_per_class": ("v", "tab:cyan"),
    "truncated_budget": ("<", "tab:brown"),
    "surrogate": ("*", "tab:purple"),
}


def pareto_figure(result: dict, path: Path) -> str:
    """Samples per input (log) against certified accuracy at sigma, 2 sigma, 3 sigma and ACR, as a PNG.

    Each accuracy panel shows Cohen-n (a line), the target-mode rows asked for that radius (by
    variant) and the best-radius rows; the ACR panel shows Cohen-n and the best-radius rows.
    """
    rows = result["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    cohen = sorted((r for r in rows.values() if r["family"] == "cohen"), key=lambda r: r["samples"])
    best = [r for r in rows.values() if r["family"] in ("priced", "best")]
    for ax, m in zip(axes, PARETO_MULTIPLES + (None,)):
        value = (lambda r: r["acr"]) if m is None else (lambda r, k=f"{m}sigma": r["certified_accuracy"][k])
        ax.plot([r["samples"] for r in cohen], [value(r) for r in cohen], "k.-", label="Cohen-n")
        for r in cohen:
            ax.annotate(f"{r['n']:,}", (r["samples"], value(r)), fontsize=6, xytext=(2, -8), textcoords="offset points")
        for word, style, colour in (
            ("KT", "s--", "tab:green"),
            ("radius prior", "s-.", "tab:olive"),
            ("surrogate prior", "s:", "tab:purple"),
        ):
            priced = sorted(
                (r for r in best if r["family"] == "priced" and f": {word}," in r["label"]), key=lambda r: r["samples"]
            )
            if priced:
                ax.plot(
                    [r["samples"] for r in priced],
                    [value(r) for r in priced],
                    style,
                    color=colour,
                    ms=4,
                    label=f"priced best radius ({word})",
                )
        for r in best:
            if r["family"] == "best":
                ax.scatter(
                    [r["samples"]], [value(r)], marker="D", color="tab:red", s=22, label="best radius, tolerance"
                )
        if m is not None:
            for r in rows.values():
                if r["family"] == "target" and r.get("target_multiple") == m:
                    marker, colour = _TARGET_MARKERS.get(r["variant"], ("o", "tab:blue"))
                    ax.scatter(
                        [r["samples"]],
                        [value(r)],
                        marker=marker,
                        color=colour,
                        s=30,
                        label=r["label"].split(": ", 1)[1],
                    )
        ax.set_xscale("log")
        ax.set_xlabel("base-model evaluations per input")
        ax.set_title("ACR" if m is None else f"certified accuracy at r = {m} sigma", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(
        f"{result['dataset']}: {result['inputs']} inputs, sigma = {result['sigma']}, alpha = {result['alpha']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def pareto_markdown(result: dict) -> str:
    """One Markdown table per dataset: the README's."""
    lines = [
        f"**{result['dataset']}** ({result['note']}; sigma = {result['sigma']}, alpha = {result['alpha']}, "
        f"sequential budget {result['max_samples']:,})",
        "",
        "| method | evaluations / input | stop time | cert. acc. r=sigma | r=2 sigma | r=3 sigma | ACR |"
        + (" wrong (allowed) |" if "wrong" in next(iter(result["rows"].values())) else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if "wrong" in next(iter(result["rows"].values())) else ""),
    ]
    for r in result["rows"].values():
        acc = r["certified_accuracy"]
        line = (
            f"| {r['label']} | {r['samples']:,.1f} | {r['stop_time']:,.1f} | {100 * acc['1sigma']:.1f}% | "
            f"{100 * acc['2sigma']:.1f}% | {100 * acc['3sigma']:.1f}% | {r['acr']:.3f} |"
        )
        if "wrong" in r:
            line += f" {r['wrong']} ({r['allowance']}) |"
        lines.append(line)
    return "\n".join(lines)


def run_pareto(
    out: str | os.PathLike | None,
    configs: list[ParetoConfig],
    *,
    workdir: str | os.PathLike,
    say: Callable[[str], None] = print,
    command: str | None = None,
) -> dict:
    """The Pareto benchmark over ``configs`` (one per dataset): JSON to ``out``, a PNG per dataset and an
    HTML report (``<out stem>.html``: figures, rows, targets) beside it.

    Parameters
    ----------
    out : str, os.PathLike or None
        JSON file to write (its folder must exist); the figures are ``<out stem>_<dataset>.png``.
    configs : list of ParetoConfig
        One per dataset.
    workdir : str or os.PathLike
        Where recordings (npz) and the digits offline stage are kept and reused.
    say : callable, optional
        Progress lines.
    command : str, optional
        Recorded in the JSON.

    Returns
    -------
    dict
        ``setup`` (environment), ``datasets`` (per dataset: rows, floor checks, fallback comparison,
        targets, seconds), ``figures`` and ``markdown``.

    Raises
    ------
    InvalidParameterError
        If the folder of ``out`` does not exist or a dataset lacks a model.
    """
    if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise InvalidParameterError(f"output folder of {out} does not exist; create it first or choose another --out")
    workdir = Path(workdir)
    env = environment()
    content: dict = dict(
        setup=dict(
            command=command,
            torch_threads=torch.get_num_threads(),
            cpu_count=env["cpu_count"],
            load_average=list(os.getloadavg()),
            versions=env["versions"],
            configs=[dataclasses.asdict(c) for c in configs],
        ),
        datasets={},
        figures={},
    )
    for cfg in configs:
        result = pareto_dataset(cfg, workdir, say=say)
        content["datasets"][cfg.dataset] = result
        if out is not None:
            content["figures"][cfg.dataset] = pareto_figure(
                result, Path(out).with_name(f"{Path(out).stem}_{cfg.dataset}.png")
            )
        say(pareto_markdown(result))
    content["setup"]["load_average_end"] = list(os.getloadavg())
    content["markdown"] = "\n\n".join(pareto_markdown(r) for r in content["datasets"].values())
    if out is not None:
        write_text_atomic(out, json.dumps(json_safe(content), indent=2, allow_nan=False), overwrite=True)
        content["report"] = write_text_atomic(Path(out).with_suffix(".html"), pareto_html(content), overwrite=True)
    return content


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("surrogate_cert.workflows", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.ChainableUndefined,
)


def pareto_html(content: dict) -> str:
    """The Pareto report: per dataset its figure (embedded), every row and the targets, met or missed."""
    figures = {}
    for name, path in content.get("figures", {}).items():
        with open(path, "rb") as fh:
            figures[name] = base64.b64encode(fh.read()).decode("ascii")
    return _TEMPLATES.get_template("pareto.html.j2").render(
        command=content["setup"].get("command"), datasets=json_safe(content["datasets"]), figures=figures
    )


__all__ = [
    "ParetoConfig",
    "RecordedSmoothed",
    "record_streams",
    "pareto_dataset",
    "run_pareto",
    "pareto_markdown",
    "pareto_figure",
    "pareto_html",
    "PARETO_COHEN_N",
    "PARETO_PRICES",
]
