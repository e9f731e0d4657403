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
from ..core.cohen import CohenCertifier
from ..core.errors import InvalidParameterError
from ..core.files import check_outputs, write_text_atomic
from ..core.groundtruth import linear_problem
from ..core.hashing import sha256_file
from ..core.one_pass import SurrogateCertifier, certified_at_required
from ..core.sequential import EProcessCertifier
from ..core.smoothing import NOISE_SCHEME, SmoothedClassifier
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier
from .pipeline import FULL, QUICK, Pipeline, QuickstartConfig, provenance
from .report import write_report
from .training import builtin_base_arch, train_surrogate

METHODS = ("cohen_10k", "cohen_1k", "sequential_kt", "sequential_surrogate", "surrogate", "hybrid")
"""The methods of ``surrogate-cert bench``, in table order."""

METHOD_LABELS = {
    "cohen_10k": "Cohen-10k", "cohen_1k": "Cohen-1k", "sequential_kt": "Sequential (KT prior)",
    "sequential_target": "Sequential (target r = sigma)",
    "sequential_surrogate": "Sequential (surrogate prior)", "surrogate": "Surrogate only", "hybrid": "Hybrid",
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
               alpha: float) -> dict[str, Callable]:
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
    guided = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, **policy)
    one_pass = SurrogateCertifier(surrogate, calibration)
    hybrid = HybridCertifier(one_pass, guided)

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
    epsilon + alpha_mc + alpha (hybrid); the allowance is ``stats.binomial_allowance`` at 0.999.

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
    bounds = dict(surrogate=epsilon + alpha_mc, hybrid=epsilon + alpha_mc + alpha)
    results = {}
    idx = offsets[2] + np.arange(n_test)
    methods = certifiers(smooth, surrogate, calibration, cfg, alpha)
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
                                 EProcessCertifier(ctx.smooth, ctx.alpha, max_samples=cfg.max_samples))
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


__all__ = ["BenchConfig", "BENCH_FULL", "BENCH_QUICK", "BENCH_TINY", "METHODS", "METHOD_LABELS", "run_bench",
           "linear_ground_truth", "certifiers", "markdown_table", "summarise", "triage", "prior_comparison"]


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
    seed, limit and the noise scheme."""
    return dict(dataset=dataset_key(dataset), split=split, model_sha256=model_sha256, sigma=float(sigma), n=int(n),
                n0=int(n0), seed=int(seed), limit=None if limit is None else int(limit), noise_scheme=NOISE_SCHEME)


def _matches(attrs: dict, key: dict) -> bool:
    have = dict(dataset=dataset_key(str(attrs.get("dataset"))), split=attrs.get("split"),
                model_sha256=attrs.get("model_sha256"), sigma=float(attrs.get("sigma", -1)), n=attrs.get("n"),
                n0=attrs.get("n0"), seed=attrs.get("seed"), limit=attrs.get("limit"),
                noise_scheme=attrs.get("noise_scheme"))
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
