"""The bench harness: certifiers side by side, in one run, on the same inputs, base model and noise.

``surrogate-cert bench`` and every script under ``benchmarks/`` are configurations of this module
(a ``BenchConfig``). Methods, by name (``METHOD_LABELS``):

===========================  ===============================================================
``cohen_10k``, ``cohen_1k``  Cohen et al. CERTIFY, ``n0``, ``n = cohen_n[0]`` / ``cohen_n[1]``
``sequential_kt``            E-process, KT prior Beta(1/2, 1/2), class from ``n0`` pilot samples,
                             best-radius policy, budget ``max_samples``
``sequential_target``        the same in target-radius mode at ``r* = sigma``
``sequential_surrogate``     E-process, class and mixture prior from the surrogate (no pilot)
``surrogate``                calibrated surrogate alone: one forward pass, no base-model samples
``hybrid``                   surrogate where it certifies, else ``sequential_surrogate``
``ibp``, ``crown``           deterministic l2 bounds on the base network itself (``core.deterministic``):
                             probability 1, no samples; a different claim (the base model, not
                             its smoothed version), shown for comparison
===========================  ===============================================================

For each: certified accuracy at radii 0, 0.25, 0.5, 0.75, 1.0 and ACR on the dataset's test
images; mean base-model evaluations per query over all / certified / other inputs; images per
second (wall time of one batched call over all images); and, on the exact linear ground-truth
problem (``core.groundtruth``, true class and radius known in closed form; the surrogate trained
and calibrated on its own train / cal points as on the dataset), the count of wrong certificates
against each method's bound. Optional sections: the hybrid asked for a radius (triage), the
surrogate prior against KT on the hybrid's fallback inputs, extra best-radius tolerances.

The offline stage (base model, counts, surrogate, calibration) is the quickstart's
(``pipeline.Pipeline.offline``): in the quickstart's folder it is reused, not redone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm

from calibration.artifact import load_calibration
from calibration.conformal import calibrate, calibrate_arrays
from calibration.summary import environment, offline_evaluations_from_counts, summarize_run
from data_gen.datasets import dataset_key, load_split
from data_gen.generate import generate_counts, top_up_counts
from data_gen.models import load_model, train_base
from data_gen.store import read_attrs, read_counts

from ..core import stats
from ..core.certificate import Certificate, write_tsv
from ..core.cohen import CohenCertifier, certificates_from_counts
from ..core.deterministic import DeterministicCertifier
from ..core.errors import InvalidParameterError
from ..core.files import check_outputs, write_text_atomic
from ..core.groundtruth import linear_problem
from ..core.hashing import sha256_file
from ..core.one_pass import SurrogateCertifier, certified_at_required
from ..core.sequential import EProcessCertifier, default_schedule
from ..core.smoothing import NOISE_SCHEME, NOISE_SCHEMES, STREAM_ESTIMATE, STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier, fallback_certifier
from .pipeline import FULL, QUICK, Pipeline, QuickstartConfig, provenance
from .report import write_report
from .training import builtin_base_arch, train_surrogate

matplotlib.use("Agg", force=True)  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

METHODS = ("cohen_10k", "cohen_1k", "sequential_kt", "sequential_surrogate", "surrogate", "hybrid", "ibp", "crown")
"""The methods of ``surrogate-cert bench``, in table order."""

METHOD_LABELS = {
    "cohen_10k": "Cohen-10k", "cohen_1k": "Cohen-1k", "sequential_kt": "Sequential (KT prior)",
    "sequential_target": "Sequential (target r = sigma)",
    "sequential_surrogate": "Sequential (surrogate prior)", "surrogate": "Surrogate only", "hybrid": "Hybrid",
    "ibp": "IBP (deterministic)", "crown": "CROWN (deterministic)",
}
LABELS = METHOD_LABELS  # name of version 0.1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class BenchConfig:
    """What the bench certifies and how.

    ``offline`` is the pipeline that makes the base model, counts, surrogate and calibration;
    ``methods`` the rows; ``test_limit`` test images (None = all); Cohen's sample sizes; the
    sequential budget and best-radius ``tolerance`` (None: the certifier's default); the linear
    ground-truth sizes (points per split, samples; ``linear_points = None`` skips it);
    ``triage_radii`` adds the hybrid asked for each radius; ``prior_comparison`` the surrogate
    prior against KT on the fallback inputs; ``extra_tolerances`` more ``sequential_kt`` rows.
    """

    offline: QuickstartConfig = FULL
    methods: tuple[str, ...] = METHODS
    test_limit: int | None = 100
    n0: int = 100
    cohen_n: tuple[int, int] = (10_000, 1_000)
    max_samples: int = 10_000
    tolerance: float | None = None
    linear_points: tuple[int, int, int] | None = (1000, 1000, 1000)
    linear_n: tuple[int, int] = (1000, 10_000)
    linear_epochs: int = 30
    triage_radii: tuple[float, ...] = ()
    prior_comparison: bool = False
    extra_tolerances: tuple[float, ...] = ()


BENCH_FULL = BenchConfig()
QUICK_OFFLINE = dataclasses.replace(FULL, base_epochs=8, train_n=100, cal_n=1000, test_limit=10)
"""``bench --quick``'s offline stage: every train / cal image, fewer samples (0.5M evaluations)."""

BENCH_QUICK = BenchConfig(offline=QUICK_OFFLINE, test_limit=10, linear_points=(300, 300, 300), linear_epochs=20)
BENCH_TINY = BenchConfig(offline=QUICK, test_limit=6, n0=20, cohen_n=(1000, 100), max_samples=500,
                         linear_points=(100, 110, 40), linear_n=(100, 500), linear_epochs=5)
"""Test-only (hidden ``--tiny``): every method and field in seconds; Cohen's n scaled down."""


# --------------------------------------------------------------------------- the certifiers

def certifiers(smooth: SmoothedClassifier, surrogate: Surrogate, calibration, cfg: BenchConfig,
               alpha: float, base_model: torch.nn.Module | None = None) -> dict[str, Callable]:
    """Every method as ``f(x, indices) -> list[Certificate]`` over one shared ``SmoothedClassifier``.

    Parameters
    ----------
    smooth : SmoothedClassifier
        The base model and noise level shared by every sampling method.
    surrogate : Surrogate
        The trained surrogate.
    calibration : Calibration
        Its calibration.
    cfg : BenchConfig
        Cohen's sample sizes, the sequential budget, ``n0``, ``tolerance`` and ``extra_tolerances``.
    alpha : float
        Error probability per input of the Cohen and sequential certificates, in (0, 1).
    base_model : torch.nn.Module, optional
        The base network in a form bound propagation reads (default: ``smooth.base_model``); the
        ``ibp`` and ``crown`` rows certify it.

    Returns
    -------
    dict of str to callable
        Keyed by method name: every name of ``METHOD_LABELS``, plus ``sequential_kt_tol<t>`` for each
        extra tolerance. Each takes images (``N x C x H x W``, in [0, 1]) and their dataset indices.

    Raises
    ------
    InvalidParameterError
        If ``alpha``, the budget or a tolerance is out of range.
    CalibrationError
        If the calibration was made for another surrogate.
    """
    cohen = CohenCertifier(smooth)
    policy = {} if cfg.tolerance is None else dict(tolerance=cfg.tolerance)
    kt = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, n0=cfg.n0, **policy)
    target = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, n0=cfg.n0, policy="target_radius",
                               target_radius=smooth.sigma)
    # The deployed configuration: what HybridCertifier.load builds for its fallback.
    guided = fallback_certifier(smooth, alpha, max_samples=cfg.max_samples, tolerance=guided_tolerance(cfg))
    one_pass = SurrogateCertifier(surrogate, calibration)
    hybrid = HybridCertifier(one_pass, guided)
    # Deterministic rows certify the base network itself (probability 1, no noise drawn).
    base_model = smooth.base_model if base_model is None else base_model
    ibp = DeterministicCertifier(base_model, "ibp")
    crown = DeterministicCertifier(base_model, "crown")

    def sequential_surrogate(x, idx):
        classes, p_tilde = surrogate.predict(x)
        prior = stats.surrogate_prior(p_tilde, surrogate.kappa, surrogate.w)
        return guided.certify(x, classes=classes, prior=prior, indices=idx)

    n_big, n_small = cfg.cohen_n
    methods = {
        "cohen_10k": lambda x, idx: cohen.certify(x, n0=cfg.n0, n=n_big, alpha=alpha, indices=idx),
        "cohen_1k": lambda x, idx: cohen.certify(x, n0=cfg.n0, n=n_small, alpha=alpha, indices=idx),
        "sequential_kt": lambda x, idx: kt.certify(x, indices=idx),
        "sequential_target": lambda x, idx: target.certify(x, indices=idx),
        "sequential_surrogate": sequential_surrogate,
        "surrogate": lambda x, idx: one_pass.certify(x, indices=idx),
        "hybrid": lambda x, idx: hybrid.certify(x, indices=idx),
        "ibp": ibp.certify,
        "crown": crown.certify,
    }
    for tol in cfg.extra_tolerances:
        seq = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, n0=cfg.n0, tolerance=tol)
        methods[f"sequential_kt_tol{tol:g}"] = lambda x, idx, seq=seq: seq.certify(x, indices=idx)
    return methods


def label(name: str) -> str:
    """Display name of a method (``sequential_kt_tol0.25`` -> ``Sequential (KT prior, tolerance 0.25)``)."""
    if name.startswith("sequential_kt_tol"):
        return f"Sequential (KT prior, tolerance {name.removeprefix('sequential_kt_tol')})"
    return METHOD_LABELS[name]


def timed(method: Callable, x, idx) -> tuple[list[Certificate], float]:
    """``method(x, idx)`` and its wall time in seconds."""
    t0 = time.perf_counter()
    certificates = method(x, idx)
    return certificates, time.perf_counter() - t0


def summarise(certificates: list[Certificate], labels, seconds: float) -> dict:
    """One method's row: certified accuracy at ``RADII``, ACR, evaluations (mean / median), speed."""
    rows = [dict(radius=c.radius, correct=int(c.prediction == int(y)), predict=c.prediction, time=c.seconds,
                 method=c.method, n_samples=c.n_samples) for c, y in zip(certificates, labels)]
    summary = summarize_run(rows, RADII)
    return dict(
        certified_accuracy={f"{r:g}": a for r, a in zip(RADII, summary["certified_accuracy"])},
        acr=summary["acr"],
        mean_evaluations={k: summary["samples"][k]["mean"] for k in ("all", "certified", "rest")},
        mean_stop_time=float(np.mean([c.stop_time for c in certificates])) if certificates else None,
        median_evaluations={k: summary["samples"][k]["median"] for k in ("all", "certified", "rest")},
        images_per_second=len(rows) / seconds if seconds > 0 else None,
        seconds=seconds,
        share_by_method=summary["share_by_method"],
    )


# --------------------------------------------------------------------------- linear ground truth

def linear_ground_truth(cfg: BenchConfig, sigma: float, epsilon: float, alpha_mc: float, alpha: float,
                        seed: int = 0, device=None) -> dict:
    """Wrong-certificate count of every method on the exact linear problem, against its bound.

    Train / cal / test points are independent draws of ``linear_problem`` (margins uniform in
    +-3 sigma); the surrogate is trained on train counts and calibrated on cal counts as on real
    data. A certificate is wrong when it names the wrong class or a radius above the true distance
    to the hyperplane. Bounds: alpha (Cohen, sequential), epsilon + alpha_mc (surrogate, marginal),
    epsilon + alpha_mc + alpha (hybrid), 0 (IBP, CROWN: deterministic); the allowance is ``stats.binomial_allowance`` at 0.999.

    Parameters
    ----------
    cfg : BenchConfig
        ``linear_points`` (train, cal, test sizes), ``linear_n`` (train, cal samples),
        ``linear_epochs`` and the methods to run (``methods``).
    sigma : float
        Noise level (l2, input units).
    epsilon : float
        Calibration target rate, in (0, 0.5).
    alpha_mc : float
        Clopper-Pearson level of the calibration's reference radius.
    alpha : float
        Error probability of the Cohen and sequential certificates.
    seed : int, optional
        Seed of the points, the noise and the surrogate.
    device : str or None, optional
        Where to run.

    Returns
    -------
    dict
        ``problem`` (sizes, input shape, the surrogate's pooled offset) and ``methods``: per
        method, ``inputs``, ``certified``, ``wrong``, ``rate``, ``bound``, ``allowance``,
        ``within_bound`` and ``mean_evaluations``.

    Raises
    ------
    InvalidParameterError
        If a parameter is out of range.
    CalibrationError
        If the cal points are too few for ``epsilon``.
    """
    n_train, n_cal, n_test = cfg.linear_points
    train, cal, test = (linear_problem(num, sigma, seed=seed + 1000 * part)
                        for part, num in enumerate((n_train, n_cal, n_test)))
    offsets = (0, 10_000_000, 20_000_000)  # disjoint noise indices per split
    smooth = SmoothedClassifier(test.model, 2, sigma, device=device, seed=seed)
    counts_train = smooth.counts(train.x, cfg.linear_n[0], indices=offsets[0] + np.arange(n_train))
    counts_cal = smooth.counts(cal.x, cfg.linear_n[1], indices=offsets[1] + np.arange(n_cal))

    surrogate = Surrogate.build(tuple(train.x.shape[1:]), 2, sigma, seed=seed, device=device)
    surrogate.fit(train.x, counts_train, epochs=cfg.linear_epochs, seed=seed)
    tune = surrogate.holdout_rows_ if len(surrogate.holdout_rows_) else surrogate.train_rows_
    surrogate.tune_prior(train.x[tune], counts_train[tune])
    calibration = calibrate_arrays(surrogate, cal.x, counts_cal, epsilon, alpha_mc, dataset="linear_problem",
                                   split="cal")
    # The linear base model's own decision boundary is the smoothed one, so a deterministic
    # certificate is judged against the same true radius, with bound 0 (it holds always).
    bounds = dict(surrogate=epsilon + alpha_mc, hybrid=epsilon + alpha_mc + alpha, ibp=0.0, crown=0.0)
    results = {}
    idx = offsets[2] + np.arange(n_test)
    methods = certifiers(smooth, surrogate, calibration, cfg, alpha, base_model=test.model.as_sequential())
    for name in cfg.methods:
        certificates, _ = timed(methods[name], test.x, idx)
        wrong = int(test.wrong_certificates(certificates).sum())
        bound = bounds.get(name, alpha)
        allowance = stats.binomial_allowance(n_test, bound)
        results[name] = dict(
            inputs=n_test, certified=int(sum(c.radius > 0 for c in certificates)), wrong=wrong,
            rate=wrong / n_test, bound=bound, allowance=allowance, within_bound=wrong <= allowance,
            mean_evaluations=float(np.mean([c.n_samples for c in certificates])),
        )
    return dict(problem=dict(points=cfg.linear_points, n_train=cfg.linear_n[0], n_cal=cfg.linear_n[1],
                             input_shape=list(train.x.shape[1:]), margins_in_sigmas=3.0,
                             surrogate_offset=calibration.pooled_offset), methods=results)


# --------------------------------------------------------------------------- optional sections

def triage(hybrid: HybridCertifier, data, radii, reference: dict) -> dict:
    """The hybrid asked for radius ``r``: inputs whose surrogate radius is below ``r`` go to the
    sequential certifier in target-radius mode. Certified accuracy at ``r`` and cost, per ``r``."""
    out = {}
    for r in radii:
        certificates, seconds = timed(lambda x, idx: hybrid.certify(x, required_radius=r, indices=idx),
                                      data.x, data.indices)
        row = summarise(certificates, data.y.tolist(), seconds)
        accuracy = float(np.mean([(c.prediction == int(y)) and c.radius >= r
                                  for c, y in zip(certificates, data.y.tolist())]))
        ref = float(np.mean([(c.prediction == int(y)) and c.radius >= r
                             for c, y in zip(reference["certificates"], data.y.tolist())]))
        out[f"{r:g}"] = dict(certified_accuracy=accuracy, reference_certified_accuracy=ref,
                             drop_pp=100 * (ref - accuracy), mean_evaluations=row["mean_evaluations"]["all"],
                             evaluations_vs_reference=row["mean_evaluations"]["all"] / reference["mean_evaluations"],
                             share_by_method=row["share_by_method"], seconds=seconds)
    return out


def prior_comparison(hybrid: HybridCertifier, data, target_radius: float) -> dict:
    """Samples spent by the surrogate prior against KT on the hybrid's fallback inputs (same class
    and noise: only the prior differs), under the best-radius and target-radius policies."""
    classes, p_tilde, radius = hybrid.surrogate_certifier.radii(data.x)
    fallback = np.flatnonzero(radius <= 0)
    out: dict = dict(inputs=int(fallback.size))
    if not fallback.size or hybrid.sequential is None:
        return out
    xs, cls, idx = data.x[fallback], classes[fallback], data.indices[fallback]
    prior = stats.surrogate_prior(p_tilde[fallback], hybrid.surrogate.kappa, hybrid.surrogate.w)
    for policy, target in (("best_radius", None), (f"target_radius_{target_radius:g}", target_radius)):
        kt = hybrid.sequential.certify(xs, classes=cls, indices=idx, target_radius=target)
        sur = hybrid.sequential.certify(xs, classes=cls, prior=prior, indices=idx, target_radius=target)
        kt_samples = float(np.mean([c.n_samples for c in kt]))
        sur_samples = float(np.mean([c.n_samples for c in sur]))
        out[policy] = dict(kt_prior_mean_samples=kt_samples, surrogate_prior_mean_samples=sur_samples,
                           ratio=sur_samples / kt_samples if kt_samples else None,
                           kt_prior_certified=int(sum(c.radius > 0 for c in kt)),
                           surrogate_prior_certified=int(sum(c.radius > 0 for c in sur)))
    return out


# --------------------------------------------------------------------------- the run

@dataclass
class BenchContext:
    """What every method of one bench run shares: the offline artefacts and the test images."""

    pipeline: Pipeline
    smooth: SmoothedClassifier
    surrogate: Surrogate
    calibration: object
    data: object
    alpha: float


def prepare(cfg: BenchConfig, workdir, *, progress: bool, quiet: bool, command: str) -> BenchContext:
    """Run (or reuse) the offline stage in ``workdir`` and load what the methods share."""
    pipeline = Pipeline(workdir, cfg.offline, progress=progress, quiet=quiet, command=command, total_stages=5)
    pipeline.offline()
    paths, offline = pipeline.paths, cfg.offline
    base = load_model(str(paths["base.pt"]), device=offline.device)
    surrogate = Surrogate.load(paths["surrogate.pt"], device=offline.device)
    calibration = load_calibration(paths["calibration.json"], surrogate)
    smooth = SmoothedClassifier(base.model, surrogate.num_classes, offline.sigma, device=offline.device,
                                batch_size=offline.batch_size, seed=offline.seed)
    data = load_split(offline.dataset, "test", data_root=offline.data_root, limit=cfg.test_limit)
    return BenchContext(pipeline, smooth, surrogate, calibration, data, offline.alpha)


def run_methods(ctx: BenchContext, cfg: BenchConfig, bench_dir: Path, progress: bool) -> tuple[dict, dict, list]:
    """Each method on the test images: its row, its certificates, and a results TSV per method."""
    methods = certifiers(ctx.smooth, ctx.surrogate, ctx.calibration, cfg, ctx.alpha)
    names = list(cfg.methods) + [f"sequential_kt_tol{t:g}" for t in cfg.extra_tolerances]
    results, certificates, tsvs = {}, {}, []
    labels = ctx.data.y.tolist()
    offline = cfg.offline
    for name in tqdm(names, desc="bench", unit="method", disable=not progress, dynamic_ncols=True):
        certificates[name], seconds = timed(methods[name], ctx.data.x, ctx.data.indices)
        results[name] = dict(label=label(name), **summarise(certificates[name], labels, seconds))
        tsv = bench_dir / f"{name}.tsv"
        write_tsv(tsv, ctx.data.indices, ctx.data.y.numpy(), certificates[name],
                  meta=provenance(ctx.pipeline.command, name, label=label(name), dataset=offline.dataset,
                                  split="test", limit=cfg.test_limit, sigma=offline.sigma, seed=offline.seed,
                                  alpha=ctx.alpha, device=str(ctx.smooth.device)))
        tsvs.append(tsv)
        ctx.pipeline.say(f"      {label(name):<29} certified accuracy "
                         f"{100 * results[name]['certified_accuracy']['0']:5.1f}% at r=0, "
                         f"{results[name]['mean_evaluations']['all']:9,.1f} evaluations/query, "
                         f"{results[name]['images_per_second'] or 0:9,.1f} images/s")
    return results, certificates, tsvs


def compare(results: dict, offline_evaluations: int, reference: str = "cohen_10k") -> None:
    """Add each method's ratios to ``reference`` (evaluations, images/s) and break-even queries."""
    if reference not in results:
        return
    ref_mean = results[reference]["mean_evaluations"]["all"]
    ref_speed = results[reference]["images_per_second"]
    for name, record in results.items():
        mean = record["mean_evaluations"]["all"]
        record[f"evaluations_vs_{reference}"] = (mean / ref_mean) if ref_mean else None
        record[f"images_per_second_vs_{reference}"] = (record["images_per_second"] / ref_speed
                                                       if ref_speed and record["images_per_second"] else None)
        saved = ref_mean - mean
        record["break_even_queries"] = (offline_evaluations / saved
                                        if name in ("surrogate", "hybrid") and saved > 0 else None)


def run_bench(
    out: str | os.PathLike | None = "bench.json",
    config: BenchConfig = BENCH_FULL,
    *,
    workdir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    quiet: bool = False,
    command: str | None = None,
    overwrite: bool = True,
) -> dict:
    """Run the configured methods on the same test images and on the linear problem; write ``out``.

    ``workdir`` holds the offline stage (default: the quickstart's folder for this size, so a
    finished quickstart is reused) and ``bench/`` with one results TSV per method and a report.html
    comparing them. The JSON content is also printed as a Markdown table.

    Parameters
    ----------
    out : str, os.PathLike or None, optional
        JSON file to write (its folder must exist); None writes none.
    config : BenchConfig, optional
        Methods, sizes and budgets; default ``BENCH_FULL``.
    workdir : str or os.PathLike, optional
        Folder of the offline stage and of ``bench/``; default ``default_workdir(config.offline)``.
    device : str, optional
        Overrides the offline configuration's device.
    progress : bool, optional
        Show progress bars.
    quiet : bool, optional
        Print nothing.
    command : str, optional
        The command line recorded in the results' provenance.
    overwrite : bool, optional
        Replace an existing ``out`` (default); if false it is refused before any work
        (``OutputExistsError``). The files under ``workdir`` are the bench's own and always replaced.

    Returns
    -------
    dict
        ``setup``, ``methods`` (one row per method, with its ground-truth record when the linear
        problem runs), ``linear_problem``, the optional ``triage`` / ``fallback_prior`` sections,
        ``seconds``, ``report`` (path of report.html) and ``markdown``.

    Raises
    ------
    InvalidParameterError
        If a method is unknown, the folder of ``out`` does not exist, or triage is asked for without
        ``cohen_10k``.
    SurrogateCertError
        Any typed error of the offline stage (``DatasetError``, ``ModelError``, ``StoreError``,
        ``CalibrationError``, ...).
    """
    cfg = config if device is None else dataclasses.replace(
        config, offline=dataclasses.replace(config.offline, device=device))
    unknown = [m for m in cfg.methods if m not in METHOD_LABELS]
    if unknown:
        raise InvalidParameterError(f"unknown bench methods {unknown}; choose from {sorted(METHOD_LABELS)}")
    workdir = Path(workdir if workdir is not None else default_workdir(config.offline))
    if out is not None:
        check_outputs([out], overwrite=overwrite)
    started = time.perf_counter()
    ctx = prepare(cfg, workdir, progress=progress, quiet=quiet, command=command or "run_bench()")
    offline_seconds = time.perf_counter() - started
    bench_dir = workdir / "bench"
    bench_dir.mkdir(exist_ok=True)
    ctx.pipeline.say(f"certifying {len(ctx.data)} {cfg.offline.dataset} test images with {len(cfg.methods)} methods "
                     f"(sigma={cfg.offline.sigma}, alpha={ctx.alpha}, device={ctx.smooth.device})")
    results, certificates, tsvs = run_methods(ctx, cfg, bench_dir, progress)

    truth_seconds = 0.0
    problem = None
    if cfg.linear_points is not None:
        ctx.pipeline.say("linear ground-truth problem: wrong certificates of each method against its bound")
        t0 = time.perf_counter()
        truth = linear_ground_truth(cfg, cfg.offline.sigma, ctx.calibration.epsilon, ctx.calibration.alpha_mc,
                                    ctx.alpha, seed=cfg.offline.seed, device=cfg.offline.device)
        for name, record in truth["methods"].items():
            results[name]["ground_truth"] = record
        problem, truth_seconds = truth["problem"], time.perf_counter() - t0

    paths = ctx.pipeline.paths
    offline_evaluations = offline_evaluations_from_counts([paths["train.h5"], paths["cal.h5"]])
    compare(results, offline_evaluations)
    extra = {}
    if cfg.triage_radii or cfg.prior_comparison:
        hybrid = HybridCertifier(SurrogateCertifier(ctx.surrogate, ctx.calibration),
                                 fallback_certifier(ctx.smooth, ctx.alpha, max_samples=cfg.max_samples,
                                                    tolerance=guided_tolerance(cfg)))
        if cfg.triage_radii:
            reference = dict(certificates=certificates.get("cohen_10k") or [],
                             mean_evaluations=(results.get("cohen_10k") or {}).get("mean_evaluations", {}).get("all"))
            if not reference["certificates"]:
                raise InvalidParameterError("triage compares against cohen_10k: include it in the methods")
            extra["triage"] = triage(hybrid, ctx.data, cfg.triage_radii, reference)
        if cfg.prior_comparison:
            extra["fallback_prior"] = prior_comparison(hybrid, ctx.data, ctx.smooth.sigma)
    report = write_report(tsvs, bench_dir / "report.html", calibration=paths["calibration.json"],
                          offline_evaluations=offline_evaluations,
                          baseline="cohen_10k" if "cohen_10k" in results else None, title="surrogate-cert bench")
    content = dict(
        setup=_setup(cfg, ctx, offline_evaluations, workdir),
        methods=results,
        linear_problem=problem,
        **extra,
        seconds=dict(offline=offline_seconds, certify=sum(r["seconds"] for r in results.values()),
                     ground_truth=truth_seconds, total=time.perf_counter() - started),
        report=report["html"],
    )
    content["markdown"] = markdown_table(content)
    if out is not None:
        write_text_atomic(out, json.dumps(_finite(content), indent=2, allow_nan=False), overwrite=overwrite)
    ctx.pipeline.say("\n" + content["markdown"] + f"\n\nJSON: {out}; per-method TSVs and report: {bench_dir}")
    return content


def _setup(cfg: BenchConfig, ctx: BenchContext, offline_evaluations: int, workdir) -> dict:
    env = environment()
    offline = cfg.offline
    return dict(
        dataset=offline.dataset, sigma=offline.sigma, alpha=ctx.alpha, epsilon=ctx.calibration.epsilon,
        alpha_mc=ctx.calibration.alpha_mc, q_hat=ctx.calibration.pooled_offset,
        radius_cap=ctx.calibration.radius_cap, test_images=len(ctx.data), n0=cfg.n0, cohen_n=list(cfg.cohen_n),
        max_samples=cfg.max_samples, tolerance=guided_tolerance(cfg), offline_evaluations=offline_evaluations,
        base_noisy_test_accuracy=(ctx.pipeline.manifest.data["stages"].get("train-base") or {}).get(
            "noisy_test_accuracy"),
        surrogate_share_on_calibration=ctx.calibration.diagnostics.get("certified_share"),
        device=str(ctx.smooth.device), torch_threads=torch.get_num_threads(), cpu_count=env["cpu_count"],
        versions=env["versions"], workdir=str(workdir), config=dataclasses.asdict(cfg),
    )


def guided_tolerance(cfg: BenchConfig) -> float:
    """The best-radius tolerance the sequential methods ran with (l2 units)."""
    if cfg.tolerance is not None:
        return cfg.tolerance
    return inspect.signature(EProcessCertifier).parameters["tolerance"].default


def default_workdir(offline: QuickstartConfig) -> str:
    """The quickstart's default folder for this size (the bench reuses its offline stage), else its own."""
    if offline == FULL:
        return "surrogate-cert-quickstart"
    return "surrogate-cert-quickstart-quick" if offline == QUICK else "surrogate-cert-bench-quick"


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def markdown_table(content: dict) -> str:
    """The README table: the seed-001 columns, then cost split, speed and ground-truth errors."""
    setup = content["setup"]
    lines = [
        f"{setup['test_images']} {setup['dataset']} test images, sigma = {setup['sigma']}, alpha = {setup['alpha']}, "
        f"epsilon = {setup['epsilon']}, alpha_mc = {setup['alpha_mc']}; sequential: best-radius tolerance "
        f"{setup['tolerance']:g}, budget {setup['max_samples']:,}; device {setup['device']} "
        f"({setup['torch_threads']} threads)",
        "",
        "| method | cert. acc. r=0 | r=0.25 | r=0.5 | r=0.75 | r=1.0 | ACR | evaluations / query (all) "
        "| (certified) | (rest) | images / s | wrong on linear problem (bound) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(v):
        return "n/a" if v is None else f"{v:,.1f}"

    for r in content["methods"].values():
        acc = [f"{100 * a:.1f}%" for a in r["certified_accuracy"].values()]
        ev = r["mean_evaluations"]
        gt = r.get("ground_truth") or {}
        lines.append(
            f"| {r['label']} | " + " | ".join(acc) + f" | {r['acr']:.3f} | {num(ev['all'])} | {num(ev['certified'])} "
            f"| {num(ev['rest'])} | {num(r['images_per_second'])} | "
            + (f"{gt['wrong']}/{gt['inputs']} ({gt['bound']:.3g})" if gt else "n/a") + " |")
    return "\n".join(lines)


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
            raise InvalidParameterError(f"RecordedSmoothed: stream {stream} recorded up to {rec.shape[1]} samples, "
                                        f"asked for {int((start + n).max())}")
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


def record_streams(smooth: SmoothedClassifier, x: torch.Tensor, indices: np.ndarray, lengths: dict[int, int],
                   cache: Path | None = None, chunk_samples: int = 2_000_000) -> dict[int, np.ndarray]:
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
                rec[lo:hi, start:start + take] = smooth.sample_predictions(
                    x[lo:hi], take, indices=indices[lo:hi], stream=stream, start=start)
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
    truth: object = None          # LinearProblem for the linear ground truth
    surrogate: Surrogate | None = None
    calibration: object = None
    note: str = ""


def _linear_inputs(cfg: ParetoConfig, workdir: Path) -> ParetoInputs:
    sigma = cfg.sigma
    test = linear_problem(cfg.linear_points, sigma, max_margin_sigmas=cfg.linear_margin, seed=cfg.seed + 2000)
    smooth = SmoothedClassifier(test.model, 2, sigma, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed)
    note = (f"{cfg.linear_points} points, margins uniform in +-{cfg.linear_margin:g} sigma, labels = the true "
            "smoothed class")
    indices = 20_000_000 + np.arange(cfg.linear_points, dtype=np.int64)
    # A surrogate trained and calibrated on points of its own, as the bench's ground-truth section does;
    # kept in the work folder, so a re-run replays every row without redoing it.
    key = hashlib.sha256(repr((sigma, cfg.linear_margin, cfg.linear_offline, cfg.linear_epochs, cfg.seed)).encode())
    stem = workdir / f"linear-surrogate-{key.hexdigest()[:12]}"
    if stem.with_suffix(".pt").exists() and stem.with_suffix(".json").exists():
        surrogate = Surrogate.load(stem.with_suffix(".pt"), device=cfg.device)
        calibration = load_calibration(stem.with_suffix(".json"), surrogate)
        return ParetoInputs("linear", test.x, test.true_class.astype(np.int64), indices, smooth, truth=test,
                            surrogate=surrogate, calibration=calibration, note=note)
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
    return ParetoInputs("linear", test.x, test.true_class.astype(np.int64), indices, smooth, truth=test,
                        surrogate=surrogate, calibration=calibration, note=note)


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
    smooth = SmoothedClassifier(loaded.model, data.num_classes, cfg.sigma, device=cfg.device,
                                batch_size=cfg.batch_size, seed=cfg.seed)
    surrogate = Surrogate.load(surrogate_path, device=cfg.device) if surrogate_path else None
    calibration = load_calibration(calibration_path, surrogate) if (calibration_path and surrogate) else None
    return ParetoInputs(cfg.dataset, data.x, data.y.numpy().astype(np.int64), np.asarray(data.indices), smooth,
                        surrogate=surrogate, calibration=calibration,
                        note=f"first {len(data)} images of the {cfg.dataset} test split, model {model}")


def _pareto_row(certs: list[Certificate], inp: ParetoInputs, cfg: ParetoConfig, family: str, **info) -> dict:
    radius = np.array([c.radius for c in certs])
    correct = np.array([c.prediction for c in certs]) == inp.labels
    n = np.array([c.n_samples for c in certs], dtype=float)
    certified = radius > 0
    row = dict(
        family=family, **info, samples=float(n.mean()), stop_time=float(np.mean([c.stop_time for c in certs])),
        samples_certified=float(n[certified].mean()) if certified.any() else None,
        samples_rest=float(n[~certified].mean()) if (~certified).any() else None,
        certified_accuracy={"0": float(np.mean(correct & certified)),
                            **{f"{m:g}sigma": float(np.mean(correct & (radius >= m * cfg.sigma - 1e-12)))
                               for m in PARETO_MULTIPLES}},
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

    # Cohen-n: class from the n0 selection samples, k from the first n estimation samples.
    select = np.stack([(rec[STREAM_SELECT] == c).sum(axis=1) for c in range(inp.smooth.num_classes)], axis=1)
    for n in cfg.cohen_n:
        prefix = rec[STREAM_ESTIMATE][:, :n]
        counts = np.stack([(prefix == c).sum(axis=1) for c in range(inp.smooth.num_classes)], axis=1)
        rows[f"cohen_{n}"] = _pareto_row(certificates_from_counts(select, counts, alpha, sigma), inp, cfg, "cohen",
                                         label=f"Cohen-{n:,}", n=n)

    clean = _clean_classes(inp)
    sur_classes, sur_prior = None, None
    if inp.surrogate is not None:
        sur_classes, p_tilde = inp.surrogate.predict(inp.x)
        sur_prior = stats.surrogate_prior(p_tilde, inp.surrogate.kappa, inp.surrogate.w)

    def run(name, label, family, init, classes=None, prior=None, **info):
        init = {"max_samples": cfg.max_samples, **init}
        certifier = EProcessCertifier(replay, alpha, n0=cfg.n0, **init)
        started = time.perf_counter()
        certs = certifier.certify(inp.x, classes=classes, prior=prior, indices=inp.indices)
        rows[name] = _pareto_row(certs, inp, cfg, family, label=label, **info)
        rows[name]["seconds"] = time.perf_counter() - started
        return certs

    floor_checks = {}
    for m in cfg.target_multiples:
        r = m * sigma
        target = dict(policy="target_radius", target_radius=r)
        variants = [("v01", "version 0.1 (KT, pilot class, rounds 32..1000)",
                     dict(prior="kt", schedule=default_schedule(1000)), None, None),
                    ("kt_pilot", "KT, pilot class", dict(prior="kt"), None, None),
                    ("truncated_pilot", "truncated, pilot class", dict(prior="truncated"), None, None),
                    ("truncated_model", "truncated, class f(x)", dict(prior="truncated"), clean, None),
                    ("truncated_per_class", "truncated, per class", dict(prior="truncated", class_choice="per_class"),
                     None, None)]
        if sur_classes is not None:
            variants.append(("surrogate", "surrogate prior and class", {}, sur_classes, sur_prior))
        for key, text, init, classes, prior in variants:
            name = f"target_{m:g}sigma_{key}"
            certs = run(name, f"target {m:g} sigma: {text}", "target", {**target, **init}, classes, prior,
                        target_multiple=m, variant=key)
            if key == "truncated_model":
                for budget in cfg.target_budgets:
                    if budget < cfg.max_samples:
                        run(f"{name}_budget{budget}", f"target {m:g} sigma: truncated, class f(x), budget {budget:,}",
                            "target", {**target, **init, "max_samples": budget}, classes, prior,
                            target_multiple=m, variant="truncated_budget", budget=budget)
            if key.startswith("truncated"):
                per_class = key.endswith("per_class")
                floor_checks[name] = _floor_check(certs, rec[STREAM_SEQUENTIAL], r, cfg,
                                                  pilot=cfg.n0 if key.endswith("pilot") else 0,
                                                  alpha=cfg.alpha / inp.smooth.num_classes if per_class else cfg.alpha)
    run("best_kt_tolerance_pilot", f"best radius: KT, tolerance {cfg.tolerance:g}, pilot class", "best",
        dict(prior="kt", tolerance=cfg.tolerance))
    for price in cfg.prices:
        certs = run(f"best_kt_price{price:g}_model", f"best radius: KT, price {price:g}, class f(x)", "priced",
                    dict(prior="kt", price=price), clean, None, price=price)
        rows[f"best_kt_price{price:g}_model"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
            certs, rec[STREAM_SEQUENTIAL], cfg, pilot=0)
        certs = run(f"best_radius_price{price:g}_model", f"best radius: radius prior, price {price:g}, class f(x)",
                    "priced", dict(prior="radius", price=price), clean, None, price=price)
        rows[f"best_radius_price{price:g}_model"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
            certs, rec[STREAM_SEQUENTIAL], cfg, pilot=0)
        if sur_classes is not None:
            certs = run(f"best_surrogate_price{price:g}", f"best radius: surrogate prior, price {price:g}", "priced",
                        dict(price=price), sur_classes, sur_prior, price=price)
            rows[f"best_surrogate_price{price:g}"]["radius_vs_clopper_pearson"] = _vs_clopper_pearson(
                certs, rec[STREAM_SEQUENTIAL], cfg, pilot=0)

    fallback = _fallback_comparison(inp, replay, cfg) if inp.calibration is not None else None
    return dict(dataset=cfg.dataset, inputs=num, note=inp.note, sigma=sigma, alpha=alpha, n0=cfg.n0,
                max_samples=cfg.max_samples, rows=rows, floor=floor_checks, fallback_prior=fallback,
                reference_counts=reference,
                targets=_pareto_targets(rows, floor_checks, fallback, cfg),
                seconds=dict(recording=record_seconds, total=time.perf_counter() - t0))


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
            xb = inp.x[lo:lo + 1024].to(inp.smooth.device, dtype=torch.float32)
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
    return dict(floor=floor, floor_alpha=alpha, inputs=int(pick.sum()),
                max_ratio=float(ratio.max()) if pick.any() else None,
                mean_ratio=float(ratio.mean()) if pick.any() else None,
                within_1_3=bool(pick.any() and ratio.max() <= 1.3))


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
    return dict(inputs=int(ok.sum()), mean_radius=float(mine.mean()), mean_clopper_pearson_radius=float(cp.mean()),
                ratio_of_means=float(mine.mean() / cp.mean()) if cp.mean() > 0 else None,
                median_ratio=float(np.median(ratio)) if ratio.size else None)


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
    rules = {f"target_{m:g}sigma": dict(policy="target_radius", target_radius=m * cfg.sigma)
             for m in cfg.target_multiples[:2]}
    rules.update({f"price{p:g}": dict(price=p) for p in cfg.prices})
    rules["tolerance"] = dict(tolerance=cfg.tolerance)
    for name, rule in rules.items():
        certify = lambda **kw: EProcessCertifier(replay, cfg.alpha, max_samples=cfg.max_samples, **rule, **kw)  # noqa: E731
        kt = certify(prior="kt").certify(xs, classes=cls, indices=idx)
        sur = certify().certify(xs, classes=cls, prior=prior, indices=idx)
        record = dict(kt_samples=float(np.mean([c.n_samples for c in kt])),
                      surrogate_samples=float(np.mean([c.n_samples for c in sur])),
                      kt_acr=float(np.mean([c.radius for c in kt])), surrogate_acr=float(np.mean([c.radius for c in sur])))
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
        met=all(r["samples"] <= 1.1 * r["stop_time"] + 32 for r in checked))
    out["floor"] = dict(rule="certified all-agreeing inputs stop within 1.3 x log(1/alpha)/log(1/Phi(r*/sigma))",
                        rows={k: v.get("max_ratio") for k, v in floor.items()},
                        met=all(v["within_1_3"] for v in floor.values() if v["inputs"]))
    if fallback and fallback.get("inputs"):
        ratios = {k: v["ratio"] for k, v in fallback.items() if isinstance(v, dict)}
        out["surrogate_vs_kt_on_fallback"] = dict(rule="surrogate prior <= 0.8 x KT samples on the fallback inputs",
                                                  ratios=ratios, met_in=[k for k, v in ratios.items() if v <= 0.8])
    if ref is not None:
        budget_target = ref["samples"] / 20
        target_rows = {}
        for m in (1, 2):
            key = f"{m:g}sigma"
            for name, r in rows.items():
                if r["family"] == "target" and r.get("target_multiple") == m:
                    drop = 100 * (ref["certified_accuracy"][key] - r["certified_accuracy"][key])
                    target_rows[name] = dict(drop_pp=drop, evaluations_vs_cohen_10k=r["samples"] / ref["samples"],
                                             met=drop <= 1.0 and r["samples"] <= budget_target)
        out["target_mode_vs_cohen_10k"] = dict(rule="within 1 pp of Cohen-10k's certified accuracy at r* = sigma, "
                                                    "2 sigma at <= 1/20 of its evaluations", rows=target_rows)
        best_rows = {}
        for name, r in rows.items():
            if r["family"] in ("priced", "best"):
                vs_cp = r.get("radius_vs_clopper_pearson") or {}
                best_rows[name] = dict(acr_vs_cohen_10k=r["acr"] / ref["acr"] if ref["acr"] else None,
                                       evaluations_vs_cohen_10k=r["samples"] / ref["samples"],
                                       radius_vs_clopper_pearson=vs_cp.get("ratio_of_means"),
                                       met_acr=bool(ref["acr"] and r["acr"] >= 0.74 * ref["acr"]
                                                    and r["samples"] <= ref["samples"] / 10),
                                       met_cp=bool(vs_cp.get("ratio_of_means") and vs_cp["ratio_of_means"] >= 0.97))
        out["best_radius_vs_cohen_10k"] = dict(rule="ACR >= 0.74 x Cohen-10k's at <= 1/10 of its evaluations; "
                                                    "radius >= 0.97 x Clopper-Pearson at the same samples",
                                               rows=best_rows)
    return out


_TARGET_MARKERS = {"v01": ("x", "tab:gray"), "kt_pilot": ("o", "tab:orange"), "truncated_pilot": ("o", "tab:blue"),
                   "truncated_model": ("^", "tab:blue"), "truncated_per_class": ("v", "tab:cyan"),
                   "truncated_budget": ("<", "tab:brown"),
                   "surrogate": ("*", "tab:purple")}


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
        for word, style, colour in (("KT", "s--", "tab:green"), ("radius prior", "s-.", "tab:olive"),
                                    ("surrogate prior", "s:", "tab:purple")):
            priced = sorted((r for r in best if r["family"] == "priced" and f": {word}," in r["label"]),
                            key=lambda r: r["samples"])
            if priced:
                ax.plot([r["samples"] for r in priced], [value(r) for r in priced], style, color=colour, ms=4,
                        label=f"priced best radius ({word})")
        for r in best:
            if r["family"] == "best":
                ax.scatter([r["samples"]], [value(r)], marker="D", color="tab:red", s=22, label="best radius, tolerance")
        if m is not None:
            for r in rows.values():
                if r["family"] == "target" and r.get("target_multiple") == m:
                    marker, colour = _TARGET_MARKERS.get(r["variant"], ("o", "tab:blue"))
                    ax.scatter([r["samples"]], [value(r)], marker=marker, color=colour, s=30,
                               label=r["label"].split(": ", 1)[1])
        ax.set_xscale("log")
        ax.set_xlabel("base-model evaluations per input")
        ax.set_title("ACR" if m is None else f"certified accuracy at r = {m} sigma", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{result['dataset']}: {result['inputs']} inputs, sigma = {result['sigma']}, alpha = {result['alpha']}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def pareto_markdown(result: dict) -> str:
    """One Markdown table per dataset: the README's."""
    lines = [f"**{result['dataset']}** ({result['note']}; sigma = {result['sigma']}, alpha = {result['alpha']}, "
             f"sequential budget {result['max_samples']:,})", "",
             "| method | evaluations / input | stop time | cert. acc. r=sigma | r=2 sigma | r=3 sigma | ACR |"
             + (" wrong (allowed) |" if "wrong" in next(iter(result["rows"].values())) else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: |" if "wrong" in next(iter(result["rows"].values())) else "")]
    for r in result["rows"].values():
        acc = r["certified_accuracy"]
        line = (f"| {r['label']} | {r['samples']:,.1f} | {r['stop_time']:,.1f} | {100 * acc['1sigma']:.1f}% | "
                f"{100 * acc['2sigma']:.1f}% | {100 * acc['3sigma']:.1f}% | {r['acr']:.3f} |")
        if "wrong" in r:
            line += f" {r['wrong']} ({r['allowance']}) |"
        lines.append(line)
    return "\n".join(lines)


def run_pareto(out: str | os.PathLike | None, configs: list[ParetoConfig], *, workdir: str | os.PathLike,
               say: Callable[[str], None] = print, command: str | None = None) -> dict:
    """The Pareto benchmark over ``configs`` (one per dataset): JSON to ``out``, a PNG per dataset beside it.

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
    content: dict = dict(setup=dict(command=command, torch_threads=torch.get_num_threads(), cpu_count=env["cpu_count"],
                                    load_average=list(os.getloadavg()), versions=env["versions"],
                                    configs=[dataclasses.asdict(c) for c in configs]),
                         datasets={}, figures={})
    for cfg in configs:
        result = pareto_dataset(cfg, workdir, say=say)
        content["datasets"][cfg.dataset] = result
        if out is not None:
            content["figures"][cfg.dataset] = pareto_figure(
                result, Path(out).with_name(f"{Path(out).stem}_{cfg.dataset}.png"))
        say(pareto_markdown(result))
    content["setup"]["load_average_end"] = list(os.getloadavg())
    content["markdown"] = "\n\n".join(pareto_markdown(r) for r in content["datasets"].values())
    if out is not None:
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(_finite(content), fh, indent=2, allow_nan=False)
        os.replace(tmp, out)
    return content


__all__ = ["BenchConfig", "BENCH_FULL", "BENCH_QUICK", "BENCH_TINY", "METHODS", "METHOD_LABELS", "run_bench",
           "linear_ground_truth", "certifiers", "markdown_table", "summarise", "triage", "prior_comparison",
           "ParetoConfig", "RecordedSmoothed", "record_streams", "pareto_dataset", "run_pareto", "pareto_markdown",
           "pareto_figure"]


# =========================================================================== the one-pass case (issue 10)
#
# A real-data case for the one-pass certificate: a base model (built in, or the user's), counts of the
# surrogate / cal / test splits cached by content, a surrogate started from the base model's weights
# and trained on images the base model never saw, every calibration scheme at several epsilons, and on
# the test images: Cohen-10k (from stored counts), the one-pass certificate, the hybrid (its sequential
# fallback actually run on the base model) and the required-radius mode; plus the frontier (accuracy
# against epsilon and against the number of unseen training images) and the lever controls.

ONEPASS_SCHEMES = ("pooled", "shifted", "mondrian_train")
"""Best-radius calibration schemes of the one-pass case: ``residual`` pooled; the ``shifted`` score
(tuned bins + conformal shift); Mondrian confidence bins with edges chosen on the surrogate's training
images (``--edges-from``)."""


@dataclass(frozen=True)
class OnePassConfig:
    """Sizes and options of the one-pass case (``run_onepass``); radii are in units of ``sigma``.

    ``model`` None trains the built-in base model (``train-base --arch base_arch``, cached); a path uses
    that model (a user's own: then the surrogate split may be images it saw). ``*_limit`` None = the
    whole split; ``train_n`` > 0 adds the train split's counts to the surrogate's training data.
    ``frontier_images`` retrains on the first N surrogate-split images for each N; ``controls`` adds the
    lever controls (surrogate trained on the base model's own train images; surrogate not started from
    the base model). ``cal_topup`` > 0 tops the calibration counts up (``datagen --top-up``) and adds
    the topped-up calibration.
    """

    dataset: str = "mnist"
    data_root: str | None = None
    model: str | None = None
    base_arch: str | None = "mlp"
    base_epochs: int | None = None
    sigma: float = 0.25
    surrogate_n: int = 100
    surrogate_limit: int | None = None
    train_n: int = 0
    train_limit: int | None = None
    cal_n: int = 10_000
    cal_limit: int | None = None
    test_n0: int = 100
    test_n: int = 10_000
    test_limit: int | None = 500
    epsilons: tuple[float, ...] = (0.01, 0.05)
    frontier_epsilons: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    frontier_images: tuple[int, ...] = ()
    controls: bool = True
    alpha_mc: float = 1e-3
    alpha: float = 1e-3
    radii_sigmas: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)
    required_sigmas: tuple[float, ...] = (1.0, 2.0, 3.0)
    max_samples: int = 10_000
    tolerance: float = 0.01
    surrogate_epochs: int | None = 20
    surrogate_batch_size: int = 128
    shift_bins: int = 8
    mondrian_bins: int = 5
    cal_topup: int = 0
    cal_topup_max: int | None = None
    seed: int = 0
    batch_size: int = 4096
    device: str = "cpu"


ONEPASS_MNIST_CPU = OnePassConfig()
"""MNIST at the size that runs end to end in under 45 minutes on 2 CPU cores (uncontended): counts of 10,000
surrogate-split images x 100, 5,000 cal images x 10^4, 500 test images x (100 + 10^4)."""

ONEPASS_MNIST_GPU = dataclasses.replace(ONEPASS_MNIST_CPU, train_n=100, test_limit=None, cal_topup=90_000,
                                        frontier_images=(2500, 5000, 10_000))
"""The full size for a GPU (not measured here): the train split's counts too, every test image, the
calibration counts topped up to 10^5 samples where all agree."""

ONEPASS_DIGITS = OnePassConfig(dataset="digits", base_arch=None, base_epochs=None, test_limit=None, batch_size=2048,
                               frontier_images=(125, 250), cal_topup=20_000, mondrian_bins=3, shift_bins=4)
"""The embedded digits: 250 surrogate-split images, all 400 cal and 397 test images."""

ONEPASS_TINY = OnePassConfig(dataset="digits", base_arch=None, base_epochs=3, surrogate_n=50, cal_n=300, cal_limit=200,
                             test_n0=20, test_n=300, test_limit=20, epsilons=(0.05,), frontier_epsilons=(0.05, 0.1),
                             max_samples=300, surrogate_epochs=3, batch_size=2048, shift_bins=3, mondrian_bins=2,
                             required_sigmas=(1.0,), cal_topup=200)
"""Test-only: every section in seconds."""


def counts_key(dataset: str, split: str, model_sha256: str, sigma: float, n: int, n0: int, seed: int,
               limit: int | None) -> dict:
    """What a counts file's content depends on (the cache key): dataset, split, base model, sigma, n, n0,
    seed, limit and the noise scheme (a file of any seeded scheme matches: ``_matches``)."""
    return dict(dataset=dataset_key(dataset), split=split, model_sha256=model_sha256, sigma=float(sigma), n=int(n),
                n0=int(n0), seed=int(seed), limit=None if limit is None else int(limit), noise_scheme=NOISE_SCHEME)


def _matches(attrs: dict, key: dict) -> bool:
    have = dict(dataset=dataset_key(str(attrs.get("dataset"))), split=attrs.get("split"),
                model_sha256=attrs.get("model_sha256"), sigma=float(attrs.get("sigma", -1)), n=attrs.get("n"),
                n0=attrs.get("n0"), seed=attrs.get("seed"), limit=attrs.get("limit"),
                noise_scheme=attrs.get("noise_scheme"))
    # Any seeded scheme serves: its counts are as valid, only not bit-identical to the other scheme's.
    have["noise_scheme"] = key["noise_scheme"] if have["noise_scheme"] in NOISE_SCHEMES else have["noise_scheme"]
    return have == key and bool(attrs.get("complete"))


def cached_counts(cache_dir, key: dict, make: Callable[[Path], None], extra_dirs=(), say=print) -> Path:
    """The counts file whose content ``key`` describes (``counts_key``): found in ``cache_dir`` by its
    attributes, else copied from ``extra_dirs`` (read-only: never written), else made by ``make(path)``.

    A topped-up file still serves its key (``counts`` holds the first ``n`` samples); a file is used only
    when complete.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for folder, copy in [(cache_dir, False)] + [(Path(d), True) for d in extra_dirs]:
        for path in sorted(folder.glob("*.h5")):
            try:
                attrs = read_attrs(path)
            except Exception:  # a foreign or damaged file: not a candidate
                continue
            if _matches(attrs, key):
                if not copy:
                    return path
                target = cache_dir / f"copied-{path.name}"
                shutil.copyfile(path, target)
                say(f"      reused {path} (same dataset, split, model, sigma, n, n0, seed, limit)")
                return target
    name = (f"{key['dataset'].replace('/', '_').replace(':', '_')[-40:]}-{key['split']}-n{key['n']}-n0{key['n0']}"
            f"-limit{key['limit']}-seed{key['seed']}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}.h5")
    path = cache_dir / name
    make(path)
    return path


@dataclass
class OnePassData:
    """What one evaluation needs from the test split: images, labels, Cohen's certificates and the
    counts that give each one-pass class its Monte Carlo reference."""

    x: torch.Tensor
    labels: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    n: int
    cohen_prediction: np.ndarray
    cohen_radius: np.ndarray


def _accuracy(prediction, radius, labels, radii) -> dict:
    ok = (np.asarray(prediction) == np.asarray(labels)) & (np.asarray(radius) > 0)
    return {f"{r:g}": float(np.mean(ok & (np.asarray(radius) >= r - 1e-12))) for r in radii}


def _acr(prediction, radius, labels) -> float:
    ok = (np.asarray(prediction) == np.asarray(labels)) & (np.asarray(radius) > 0)
    return float(np.mean(np.where(ok, radius, 0.0)))


class OnePassBench:
    """The one-pass case's stages over one work folder (``run_onepass`` drives it)."""

    def __init__(self, cfg: OnePassConfig, workdir, cache_dir=None, extra_cache_dirs=(), progress=False, quiet=False):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = Path(cache_dir) if cache_dir is not None else self.workdir / "cache"
        self.extra = tuple(extra_cache_dirs)
        self.progress = progress
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def timed(self, name: str, run: Callable):
        t0 = time.perf_counter()
        out = run()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ offline
    def base_model(self) -> str:
        cfg = self.cfg
        if cfg.model is not None:
            return cfg.model
        key = dict(dataset=cfg.dataset, arch=cfg.base_arch, sigma=cfg.sigma, epochs=cfg.base_epochs, seed=cfg.seed)
        path = self.cache / "models" / f"base-{cfg.dataset}-{cfg.base_arch or 'default'}-{_key(key)[:10]}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.say(f"      train-base --dataset {cfg.dataset} --arch {cfg.base_arch or 'default'} (on the train split only)")
            self.timed("train-base", lambda: train_base(dataset=cfg.dataset, sigma=cfg.sigma, out=str(path),
                                                        epochs=cfg.base_epochs, seed=cfg.seed, data_root=cfg.data_root,
                                                        device=cfg.device, progress=self.progress, arch=cfg.base_arch))
        return str(path)

    def counts(self, model: str, split: str, n: int, n0: int = 0, limit: int | None = None) -> Path:
        cfg = self.cfg
        sha = load_model(model, device="cpu").sha256
        key = counts_key(cfg.dataset, split, sha, cfg.sigma, n, n0, cfg.seed, limit)

        def make(path: Path) -> None:
            self.say(f"      datagen {split}: {'all' if limit is None else limit} images x {n:,}"
                     + (f" (+ {n0} selection)" if n0 else ""))
            self.timed(f"datagen {split}", lambda: generate_counts(
                cfg.dataset, split, model, cfg.sigma, n, str(path), n0=n0, batch_size=cfg.batch_size, seed=cfg.seed,
                limit=limit, device=cfg.device, data_root=cfg.data_root, progress=self.progress,
                resume=path.exists(), command="bench one-pass case"))

        return cached_counts(self.cache, key, make, self.extra, self.say)

    def topped_up(self, model: str, cal: Path) -> Path:
        """A copy of the calibration counts, topped up (the cached file itself stays as it is)."""
        cfg = self.cfg
        planned = cfg.cal_topup_max or cfg.cal_n + cfg.cal_topup
        target = self.cache / f"{cal.stem}-topup{planned}.h5"
        if target.exists():
            attrs = read_attrs(target)
            if attrs.get("topup_planned_max") == planned:
                return target
        shutil.copyfile(cal, target)
        self.say(f"      datagen --top-up {cfg.cal_topup:,}: calibration rows whose samples all agree, up to {planned:,}")
        self.timed("datagen top-up", lambda: top_up_counts(target, model, cfg.cal_topup, planned_max=planned,
                                                           batch_size=cfg.batch_size, device=cfg.device,
                                                           data_root=cfg.data_root, progress=self.progress))
        return target

    def surrogate(self, model: str, files: list[Path], name: str, init: bool = True) -> Surrogate:
        cfg = self.cfg
        arch = builtin_base_arch(model) or cfg.base_arch
        key = dict(files=[sha256_of(f) for f in files], init=init, arch=arch, epochs=cfg.surrogate_epochs,
                   seed=cfg.seed, batch=cfg.surrogate_batch_size, model=sha256_of(model))
        path = self.workdir / "surrogates" / f"{name}-{_key(key)[:10]}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.say(f"      train {name}: {', '.join(f.name for f in files)}" + (" from the base model's weights" if init else ""))
            self.timed("train", lambda: train_surrogate(
                [str(f) for f in files], path, arch=arch, init_from_base=model if init else None,
                epochs=cfg.surrogate_epochs, seed=cfg.seed, data_root=cfg.data_root, device=cfg.device,
                batch_size=cfg.surrogate_batch_size, patience=5, progress=self.progress))
        return Surrogate.load(path, device=cfg.device)

    def calibrations(self, surrogate: Surrogate, cal: Path, epsilon: float, edges_from: Path,
                     schemes=ONEPASS_SCHEMES) -> dict:
        cfg = self.cfg
        out = {}
        for scheme in schemes:
            options = dict(pooled={}, shifted=dict(score="shifted", bins=cfg.shift_bins),
                           mondrian_train=dict(groups="confidence", edges_from=str(edges_from),
                                               bins=cfg.mondrian_bins))[scheme]
            out[scheme] = self.timed("calibrate", lambda: calibrate(surrogate, str(cal), epsilon, cfg.alpha_mc,
                                                                    data_root=cfg.data_root, **options))
        return out

    def test_data(self, test: Path) -> OnePassData:
        counts = read_counts(test)
        x = counts.images(self.cfg.data_root)
        prediction, _, radius = stats.cohen_certify(counts.counts_select, counts.counts, self.cfg.alpha, counts.sigma)
        return OnePassData(x, counts.labels, counts.indices, counts.counts, counts.n, prediction, radius)


def sha256_of(path) -> str:
    """SHA-256 of a file (a cache key part)."""
    return sha256_file(path)


def _key(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def evaluate_one_pass(surrogate: Surrogate, calibration, data: OnePassData, cfg: OnePassConfig) -> dict:
    """The one-pass certificate on the test images: certified accuracy, ACR, share certified, and the rate of
    radii above the test points' own Clopper-Pearson reference (``alpha_mc``, the surrogate's class)."""
    sigma = cfg.sigma
    radii = [s * sigma for s in cfg.radii_sigmas]
    certifier = SurrogateCertifier(surrogate, calibration)
    classes, _, z, radius = certifier.evaluate(data.x)
    certified = radius > 0
    prediction = np.where(certified, classes, -1)
    radius = np.where(certified, radius, 0.0)
    reference = np.atleast_1d(stats.reference_radius(data.counts[np.arange(len(classes)), classes], data.n,
                                                     cfg.alpha_mc, sigma))
    over = certified & (radius > reference)
    bound = calibration.epsilon + calibration.alpha_mc
    row = dict(certified_accuracy=_accuracy(prediction, radius, data.labels, radii),
               acr=_acr(prediction, radius, data.labels), certified_share=float(certified.mean()),
               over_radius=int(over.sum()), over_radius_rate=float(over.mean()), over_radius_bound=bound,
               over_radius_allowance=stats.binomial_allowance(len(radius), bound), q_hat=calibration.pooled_offset,
               radius_cap=calibration.radius_cap, mean_evaluations=0.0)
    required = {}
    for s in cfg.required_sigmas:
        r = s * sigma
        ok = certified_at_required(calibration, z, r) if calibration.radius_thresholds else radius >= r
        wrong_ref = ok & (reference < r)
        required[f"{s:g}"] = dict(radius=r, certified_accuracy=float(np.mean(ok & (classes == data.labels))),
                                  certified_share=float(ok.mean()), below_reference=int(wrong_ref.sum()),
                                  legacy_rule_accuracy=float(np.mean((radius >= r) & (classes == data.labels))))
    row["required_radius"] = required
    return row


def evaluate_hybrid(surrogate: Surrogate, calibration, data: OnePassData, base, cfg: OnePassConfig,
                    required: float | None = None) -> dict:
    """The hybrid on the test images, its sequential fallback run on the base model (best radius, or target
    mode at ``required``): certified accuracy, ACR, mean base-model evaluations per query, seconds."""
    smooth = SmoothedClassifier(base, surrogate.num_classes, cfg.sigma, device=cfg.device, batch_size=cfg.batch_size,
                                seed=cfg.seed)
    hybrid = HybridCertifier(SurrogateCertifier(surrogate, calibration),
                             EProcessCertifier(smooth, cfg.alpha, max_samples=cfg.max_samples, tolerance=cfg.tolerance))
    t0 = time.perf_counter()
    certificates = hybrid.certify(data.x, required_radius=required, indices=data.indices)
    seconds = time.perf_counter() - t0
    prediction = np.array([c.prediction for c in certificates])
    radius = np.array([c.radius for c in certificates])
    samples = np.array([c.n_samples for c in certificates], dtype=float)
    methods = [c.method for c in certificates]
    radii = [s * cfg.sigma for s in cfg.radii_sigmas]
    row = dict(certified_accuracy=_accuracy(prediction, radius, data.labels, radii),
               acr=_acr(prediction, radius, data.labels), mean_evaluations=float(samples.mean()),
               surrogate_share=float(np.mean([m == "surrogate" for m in methods])), seconds=seconds)
    if required is not None:
        row["accuracy_at_required"] = float(np.mean((prediction == data.labels) & (radius >= required - 1e-12)))
    return row


def cohen_row(data: OnePassData, cfg: OnePassConfig) -> dict:
    radii = [s * cfg.sigma for s in cfg.radii_sigmas]
    return dict(certified_accuracy=_accuracy(data.cohen_prediction, data.cohen_radius, data.labels, radii),
                acr=_acr(data.cohen_prediction, data.cohen_radius, data.labels),
                mean_evaluations=float(cfg.test_n0 + data.n))


def run_onepass(cfg: OnePassConfig = ONEPASS_MNIST_CPU, workdir="surrogate-cert-onepass", *, out=None, cache_dir=None,
                extra_cache_dirs=(), progress: bool = False, quiet: bool = False, overwrite: bool = True) -> dict:
    """The one-pass case end to end (see ``OnePassConfig``); returns (and writes to ``out``) the JSON.

    Returns
    -------
    dict
        ``setup``, ``cohen_10k``, ``one_pass`` and ``hybrid`` per epsilon and scheme, ``required_radius`` per
        epsilon and ``r*``, ``frontier`` (epsilon, unseen training images), ``levers`` (controls),
        ``seconds``, ``markdown``.
    """
    if out is not None:
        check_outputs([out], overwrite=overwrite)
    started = time.perf_counter()
    bench = OnePassBench(cfg, workdir, cache_dir, extra_cache_dirs, progress, quiet)
    sigma = cfg.sigma
    bench.say(f"one-pass case: {cfg.dataset}, sigma={sigma}, alpha={cfg.alpha}, alpha_mc={cfg.alpha_mc}")
    model = bench.base_model()
    sur_counts = bench.counts(model, "surrogate", cfg.surrogate_n, limit=cfg.surrogate_limit)
    train_files = [sur_counts]
    if cfg.train_n:
        train_files.append(bench.counts(model, "train", cfg.train_n, limit=cfg.train_limit))
    test = bench.counts(model, "test", cfg.test_n, cfg.test_n0, cfg.test_limit)
    cal = bench.counts(model, "cal", cfg.cal_n, limit=cfg.cal_limit)
    base = load_model(model, device=cfg.device).model
    data = bench.test_data(test)
    surrogate = bench.surrogate(model, train_files, "main")
    content: dict = dict(cohen_10k=cohen_row(data, cfg), one_pass={}, hybrid={}, required_radius={}, frontier={},
                         levers={})
    for epsilon in cfg.epsilons:
        e = f"{epsilon:g}"
        calibrations = bench.calibrations(surrogate, cal, epsilon, sur_counts)
        content["one_pass"][e] = {s: evaluate_one_pass(surrogate, c, data, cfg) for s, c in calibrations.items()}
        bench.say(f"      epsilon={e}: one-pass " + ", ".join(
            f"{s} {100 * r['certified_accuracy'][f'{sigma:g}']:.1f}%@sigma ACR {r['acr']:.3f}"
            for s, r in content["one_pass"][e].items()))
        content["hybrid"][e] = {s: bench.timed("hybrid", lambda c=c: evaluate_hybrid(surrogate, c, data, base, cfg))
                                for s, c in calibrations.items() if s in ("pooled", "shifted")}
        content["required_radius"][e] = {
            f"{s:g}": bench.timed("hybrid", lambda s=s: evaluate_hybrid(surrogate, calibrations["pooled"], data, base,
                                                                       cfg, required=s * sigma))
            for s in cfg.required_sigmas}
        for s, row in content["required_radius"][e].items():
            row["one_pass"] = content["one_pass"][e]["pooled"]["required_radius"][s]
    # Frontier: epsilon (calibration only) and unseen training images (retrained surrogates).
    for epsilon in cfg.frontier_epsilons:
        c = bench.calibrations(surrogate, cal, epsilon, sur_counts, schemes=("pooled", "shifted"))
        content["frontier"].setdefault("epsilon", {})[f"{epsilon:g}"] = {
            s: evaluate_one_pass(surrogate, cal_, data, cfg) for s, cal_ in c.items()}
    for images in cfg.frontier_images:
        files = [bench.counts(model, "surrogate", cfg.surrogate_n, limit=images)]
        sur = bench.surrogate(model, files, f"images{images}")
        c = bench.calibrations(sur, cal, cfg.epsilons[0], files[0], schemes=("pooled", "shifted"))
        content["frontier"].setdefault("unseen_images", {})[str(images)] = {
            s: evaluate_one_pass(sur, cal_, data, cfg) for s, cal_ in c.items()}
    epsilon = cfg.epsilons[0]
    if cfg.controls:
        rows = int(read_attrs(sur_counts)["rows"])
        seen_files = [bench.counts(model, "train", cfg.surrogate_n, limit=rows)]
        variants = dict(seen_by_base=bench.surrogate(model, seen_files, "seen"),
                        random_init=bench.surrogate(model, train_files, "random-init", init=False))
        for name, sur in variants.items():
            c = bench.calibrations(sur, cal, epsilon, sur_counts, schemes=("pooled",))["pooled"]
            content["levers"][name] = evaluate_one_pass(sur, c, data, cfg)
            content["levers"][name]["surrogate_agrees_with_counts"] = c.diagnostics.get("surrogate_agrees_with_counts")
    if cfg.cal_topup:
        topped = bench.topped_up(model, cal)
        c = bench.calibrations(surrogate, topped, epsilon, sur_counts, schemes=("pooled", "shifted"))
        content["levers"]["cal_topup"] = {s: evaluate_one_pass(surrogate, cal_, data, cfg) for s, cal_ in c.items()}
        content["levers"]["cal_topup"]["reference"] = c["pooled"].reference
    env = environment()
    content["setup"] = dict(
        dataset=cfg.dataset, sigma=sigma, alpha=cfg.alpha, alpha_mc=cfg.alpha_mc, base_model=model,
        base_model_sha256=sha256_of(model), test_images=len(data.labels), cal_images=int(_rows(cal)),
        surrogate_images=int(_rows(sur_counts)), cohen_n=data.n, n0=cfg.test_n0, max_samples=cfg.max_samples,
        tolerance=cfg.tolerance, surrogate=dict(arch=surrogate.arch, init=surrogate.meta.get("init_mapping"),
                                                epochs=surrogate.meta.get("epochs_run"), kappa=surrogate.kappa,
                                                w=surrogate.w),
        device=cfg.device, torch_threads=torch.get_num_threads(), cpu_count=env["cpu_count"],
        load_average=list(os.getloadavg()), versions=env["versions"], config=dataclasses.asdict(cfg))
    content["seconds"] = dict(bench.seconds, total=time.perf_counter() - started)
    content["markdown"] = onepass_markdown(content)
    if out is not None:
        write_text_atomic(out, json.dumps(_finite(content), indent=2, allow_nan=False), overwrite=overwrite)
    bench.say("\n" + content["markdown"])
    return content


def _rows(path) -> int:
    return int(read_attrs(path)["rows"])


def onepass_markdown(content: dict) -> str:
    """The README tables of the one-pass case."""
    setup = content["setup"]
    sigma = setup["sigma"]
    radii = list(content["cohen_10k"]["certified_accuracy"])
    head = "| method | " + " | ".join(f"r={float(r) / sigma:g}σ" for r in radii) + " | ACR | evals/query | q^ | cap | over-radius (allowed) |"
    rule = "| --- |" + " ---: |" * (len(radii) + 5)
    pct = lambda row: " | ".join(f"{100 * a:.1f}" for a in row["certified_accuracy"].values())  # noqa: E731
    lines = [f"{setup['dataset']}: {setup['test_images']} test images, sigma = {sigma}, alpha = {setup['alpha']}, "
             f"alpha_mc = {setup['alpha_mc']}; {setup['surrogate_images']} surrogate-split images, "
             f"{setup['cal_images']} cal images x {setup['config']['cal_n']:,}", "", head, rule]
    c = content["cohen_10k"]
    n = setup["cohen_n"]
    lines.append(f"| Cohen-{f'{n // 1000}k' if n % 1000 == 0 else n} | {pct(c)} | {c['acr']:.3f} | "
                 f"{c['mean_evaluations']:,.0f} | | | |")
    for e, schemes in content["one_pass"].items():
        for s, r in schemes.items():
            lines.append(f"| one-pass {s}, ε={e} | {pct(r)} | {r['acr']:.3f} | 0 | {r['q_hat']:.3f} | "
                         f"{r['radius_cap']:.3f} | {r['over_radius']}/{setup['test_images']} ({r['over_radius_allowance']}) |")
        for s, r in content["hybrid"].get(e, {}).items():
            lines.append(f"| hybrid {s}, ε={e} | {pct(r)} | {r['acr']:.3f} | {r['mean_evaluations']:,.1f} | | | |")
    lines += ["", "| required radius r* | ε | Cohen acc. | one-pass acc. (legacy rule R^ ≥ r*) | hybrid acc. | "
                  "hybrid evals/query | share one-pass |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e, per_r in content["required_radius"].items():
        for s, r in per_r.items():
            cohen = content["cohen_10k"]["certified_accuracy"].get(f"{float(s) * sigma:g}")
            lines.append(f"| {s}σ | {e} | {'' if cohen is None else f'{100 * cohen:.1f}'} | "
                         f"{100 * r['one_pass']['certified_accuracy']:.1f} ({100 * r['one_pass']['legacy_rule_accuracy']:.1f}) | "
                         f"{100 * r['accuracy_at_required']:.1f} | {r['mean_evaluations']:,.1f} | {100 * r['surrogate_share']:.1f}% |")
    return "\n".join(lines)


__all__ += ["OnePassConfig", "ONEPASS_MNIST_CPU", "ONEPASS_MNIST_GPU", "ONEPASS_DIGITS", "ONEPASS_TINY", "run_onepass",
            "counts_key", "cached_counts", "evaluate_one_pass", "evaluate_hybrid", "onepass_markdown"]
