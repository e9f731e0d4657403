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
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration.artifact import load_calibration
from calibration.conformal import calibrate_arrays
from calibration.summary import environment, offline_evaluations_from_counts, summarize_run
from data_gen.datasets import load_split
from data_gen.models import load_model

from ..core import stats
from ..core.certificate import Certificate, write_tsv
from ..core.cohen import CohenCertifier
from ..core.deterministic import DeterministicCertifier
from ..core.errors import InvalidParameterError
from ..core.files import check_outputs, write_text_atomic
from ..core.groundtruth import grid_linear_problem, linear_problem
from ..core.one_pass import SurrogateCertifier
from ..core.sequential import EProcessCertifier
from ..core.smoothing import NOISE_SCHEME, SmoothedClassifier, check_noise_scheme, noise_family
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier, fallback_certifier
from .pipeline import FULL, QUICK, Pipeline, QuickstartConfig, provenance
from .report import write_report

METHODS = ("cohen_10k", "cohen_1k", "sequential_kt", "sequential_surrogate", "surrogate", "hybrid", "ibp", "crown")
"""The methods of ``surrogate-cert bench``, in table order."""

METHOD_LABELS = {
    "cohen_10k": "Cohen-10k",
    "cohen_1k": "Cohen-1k",
    "sequential_kt": "Sequential (KT prior)",
    "sequential_target": "Sequential (target r = sigma)",
    "sequential_surrogate": "Sequential (surrogate prior)",
    "surrogate": "Surrogate only",
    "hybrid": "Hybrid",
    "ibp": "IBP (deterministic)",
    "crown": "CROWN (deterministic)",
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
QUICK_OFFLINE = dataclasses.replace(FULL, base_epochs=8, cal_n=1000, test_limit=10)
"""``bench --quick``'s offline stage: every surrogate / cal image, fewer samples (0.4M evaluations)."""

BENCH_QUICK = BenchConfig(offline=QUICK_OFFLINE, test_limit=10, linear_points=(300, 300, 300), linear_epochs=20)
BENCH_TINY = BenchConfig(
    offline=QUICK,
    test_limit=6,
    n0=20,
    cohen_n=(1000, 100),
    max_samples=500,
    linear_points=(100, 110, 40),
    linear_n=(100, 500),
    linear_epochs=5,
)
"""Test-only (hidden ``--tiny``): every method and field in seconds; Cohen's n scaled down."""


# --------------------------------------------------------------------------- the certifiers


def certifiers(
    smooth: SmoothedClassifier,
    surrogate: Surrogate,
    calibration,
    cfg: BenchConfig,
    alpha: float,
    base_model: torch.nn.Module | None = None,
) -> dict[str, Callable]:
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
    target = EProcessCertifier(
        smooth, alpha, max_samples=cfg.max_samples, n0=cfg.n0, policy="target_radius", target_radius=smooth.sigma
    )
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
    rows = [
        dict(
            radius=c.radius,
            correct=int(c.prediction == int(y)),
            predict=c.prediction,
            time=c.seconds,
            method=c.method,
            n_samples=c.n_samples,
        )
        for c, y in zip(certificates, labels)
    ]
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


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def linear_ground_truth(
    cfg: BenchConfig,
    sigma: float,
    epsilon: float,
    alpha_mc: float,
    alpha: float,
    seed: int = 0,
    device=None,
    noise_scheme: str = NOISE_SCHEME,
) -> dict:
    """Wrong-certificate count of every method on the exact linear problem, against its bound.

    Train / cal / test points are independent draws of ``linear_problem`` (margins uniform in
    +-3 sigma); the surrogate is trained on train counts and calibrated on cal counts as on real
    data. A certificate is wrong when it names the wrong class or a radius above the true distance
    to the hyperplane. Bounds: alpha (Cohen, sequential), epsilon + alpha_mc (surrogate, marginal),
    epsilon + alpha_mc + alpha (hybrid), 0 (IBP, CROWN: deterministic); the allowance is
    ``stats.binomial_allowance`` at 0.999.
    Under the sound scheme the points are grid images (``grid_linear_problem``) and the true radius is the
    distance to the nearest grid image of the other smoothed class.

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
    noise_scheme : str, optional
        The noise of every count and sample.

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
    scheme = check_noise_scheme(noise_scheme)
    problem = grid_linear_problem if noise_family(scheme) == "grid" else linear_problem
    train, cal, test = (
        problem(num, sigma, seed=seed + 1000 * part) for part, num in enumerate((n_train, n_cal, n_test))
    )
    offsets = (0, 10_000_000, 20_000_000)  # disjoint noise indices per split
    smooth = SmoothedClassifier(test.model, 2, sigma, device=device, seed=seed, noise_scheme=scheme)
    counts_train = smooth.counts(train.x, cfg.linear_n[0], indices=offsets[0] + np.arange(n_train))
    counts_cal = smooth.counts(cal.x, cfg.linear_n[1], indices=offsets[1] + np.arange(n_cal))

    surrogate = Surrogate.build(tuple(train.x.shape[1:]), 2, sigma, seed=seed, device=device)
    surrogate.fit(train.x, counts_train, epochs=cfg.linear_epochs, seed=seed)
    tune = surrogate.holdout_rows_ if len(surrogate.holdout_rows_) else surrogate.train_rows_
    surrogate.tune_prior(train.x[tune], counts_train[tune])
    calibration = calibrate_arrays(
        surrogate, cal.x, counts_cal, epsilon, alpha_mc, dataset="linear_problem", split="cal", noise_scheme=scheme
    )
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
            inputs=n_test,
            certified=int(sum(c.radius > 0 for c in certificates)),
            wrong=wrong,
            rate=wrong / n_test,
            bound=bound,
            allowance=allowance,
            within_bound=wrong <= allowance,
            mean_evaluations=float(np.mean([c.n_samples for c in certificates])),
        )
    return dict(
        problem=dict(
            points=cfg.linear_points,
            n_train=cfg.linear_n[0],
            n_cal=cfg.linear_n[1],
            input_shape=list(train.x.shape[1:]),
            margins_in_sigmas=3.0,
            noise_scheme=scheme,
            surrogate_offset=calibration.pooled_offset,
        ),
        methods=results,
    )


# --------------------------------------------------------------------------- optional sections


def triage(hybrid: HybridCertifier, data, radii, reference: dict) -> dict:
    """The hybrid asked for radius ``r``: inputs whose surrogate radius is below ``r`` go to the
    sequential certifier in target-radius mode. Certified accuracy at ``r`` and cost, per ``r``."""
    out = {}
    for r in radii:
        certificates, seconds = timed(
            lambda x, idx, r=r: hybrid.certify(x, required_radius=r, indices=idx), data.x, data.indices
        )
        row = summarise(certificates, data.y.tolist(), seconds)
        accuracy = float(
            np.mean([(c.prediction == int(y)) and c.radius >= r for c, y in zip(certificates, data.y.tolist())])
        )
        ref = float(
            np.mean(
                [(c.prediction == int(y)) and c.radius >= r for c, y in zip(reference["certificates"], data.y.tolist())]
            )
        )
        out[f"{r:g}"] = dict(
            certified_accuracy=accuracy,
            reference_certified_accuracy=ref,
            drop_pp=100 * (ref - accuracy),
            mean_evaluations=row["mean_evaluations"]["all"],
            evaluations_vs_reference=row["mean_evaluations"]["all"] / reference["mean_evaluations"],
            share_by_method=row["share_by_method"],
            seconds=seconds,
        )
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
        out[policy] = dict(
            kt_prior_mean_samples=kt_samples,
            surrogate_prior_mean_samples=sur_samples,
            ratio=sur_samples / kt_samples if kt_samples else None,
            kt_prior_certified=int(sum(c.radius > 0 for c in kt)),
            surrogate_prior_certified=int(sum(c.radius > 0 for c in sur)),
        )
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
    smooth = SmoothedClassifier(
        base.model,
        surrogate.num_classes,
        offline.sigma,
        device=offline.device,
        batch_size=offline.batch_size,
        seed=offline.seed,
        noise_scheme=offline.noise_scheme,
        off_grid="quantise",
    )
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
        write_tsv(
            tsv,
            ctx.data.indices,
            ctx.data.y.numpy(),
            certificates[name],
            meta=provenance(
                ctx.pipeline.command,
                name,
                label=label(name),
                dataset=offline.dataset,
                split="test",
                limit=cfg.test_limit,
                sigma=offline.sigma,
                seed=offline.seed,
                alpha=ctx.alpha,
                device=str(ctx.smooth.device),
            ),
        )
        tsvs.append(tsv)
        ctx.pipeline.say(
            f"      {label(name):<29} certified accuracy "
            f"{100 * results[name]['certified_accuracy']['0']:5.1f}% at r=0, "
            f"{results[name]['mean_evaluations']['all']:9,.1f} evaluations/query, "
            f"{results[name]['images_per_second'] or 0:9,.1f} images/s"
        )
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
        record[f"images_per_second_vs_{reference}"] = (
            record["images_per_second"] / ref_speed if ref_speed and record["images_per_second"] else None
        )
        saved = ref_mean - mean
        record["break_even_queries"] = (
            offline_evaluations / saved if name in ("surrogate", "hybrid") and saved > 0 else None
        )


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
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
    cfg = (
        config
        if device is None
        else dataclasses.replace(config, offline=dataclasses.replace(config.offline, device=device))
    )
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
    ctx.pipeline.say(
        f"certifying {len(ctx.data)} {cfg.offline.dataset} test images with {len(cfg.methods)} methods "
        f"(sigma={cfg.offline.sigma}, alpha={ctx.alpha}, device={ctx.smooth.device})"
    )
    results, certificates, tsvs = run_methods(ctx, cfg, bench_dir, progress)

    problem, truth_seconds = _ground_truth(ctx, cfg, results)

    paths = ctx.pipeline.paths
    offline_evaluations = offline_evaluations_from_counts([ctx.pipeline.surrogate_counts, paths["cal.h5"]])
    compare(results, offline_evaluations)
    extra = _optional_sections(ctx, cfg, results, certificates)
    report = write_report(
        tsvs,
        bench_dir / "report.html",
        calibration=paths["calibration.json"],
        offline_evaluations=offline_evaluations,
        baseline="cohen_10k" if "cohen_10k" in results else None,
        title="surrogate-cert bench",
    )
    content = dict(
        setup=_setup(cfg, ctx, offline_evaluations, workdir),
        methods=results,
        linear_problem=problem,
        **extra,
        seconds=dict(
            offline=offline_seconds,
            certify=sum(r["seconds"] for r in results.values()),
            ground_truth=truth_seconds,
            total=time.perf_counter() - started,
        ),
        report=report["html"],
    )
    content["markdown"] = markdown_table(content)
    if out is not None:
        write_text_atomic(out, json.dumps(json_safe(content), indent=2, allow_nan=False), overwrite=overwrite)
    ctx.pipeline.say("\n" + content["markdown"] + f"\n\nJSON: {out}; per-method TSVs and report: {bench_dir}")
    return content


def _ground_truth(ctx: BenchContext, cfg: BenchConfig, results: dict) -> tuple[dict | None, float]:
    """The linear ground-truth problem (when configured): each method's wrong certificates against its
    bound, added to its row of ``results``; returns the problem's record and its seconds."""
    if cfg.linear_points is not None:
        ctx.pipeline.say("linear ground-truth problem: wrong certificates of each method against its bound")
        t0 = time.perf_counter()
        truth = linear_ground_truth(
            cfg,
            cfg.offline.sigma,
            ctx.calibration.epsilon,
            ctx.calibration.alpha_mc,
            ctx.alpha,
            seed=cfg.offline.seed,
            device=cfg.offline.device,
            noise_scheme=cfg.offline.noise_scheme,
        )
        for name, record in truth["methods"].items():
            results[name]["ground_truth"] = record
        return truth["problem"], time.perf_counter() - t0
    return None, 0.0


def _optional_sections(ctx: BenchContext, cfg: BenchConfig, results: dict, certificates: dict) -> dict:
    """The optional sections: the hybrid asked for required radii (``triage``) and the fallback's prior
    compared (``fallback_prior``)."""
    extra: dict = {}
    if cfg.triage_radii or cfg.prior_comparison:
        hybrid = HybridCertifier(
            SurrogateCertifier(ctx.surrogate, ctx.calibration),
            fallback_certifier(ctx.smooth, ctx.alpha, max_samples=cfg.max_samples, tolerance=guided_tolerance(cfg)),
        )
        if cfg.triage_radii:
            reference = dict(
                certificates=certificates.get("cohen_10k") or [],
                mean_evaluations=(results.get("cohen_10k") or {}).get("mean_evaluations", {}).get("all"),
            )
            if not reference["certificates"]:
                raise InvalidParameterError("triage compares against cohen_10k: include it in the methods")
            extra["triage"] = triage(hybrid, ctx.data, cfg.triage_radii, reference)
        if cfg.prior_comparison:
            extra["fallback_prior"] = prior_comparison(hybrid, ctx.data, ctx.smooth.sigma)
    return extra


def _setup(cfg: BenchConfig, ctx: BenchContext, offline_evaluations: int, workdir) -> dict:
    env = environment()
    offline = cfg.offline
    return dict(
        dataset=offline.dataset,
        sigma=offline.sigma,
        noise_scheme=ctx.smooth.noise_scheme,
        alpha=ctx.alpha,
        epsilon=ctx.calibration.epsilon,
        alpha_mc=ctx.calibration.alpha_mc,
        q_hat=ctx.calibration.pooled_offset,
        radius_cap=ctx.calibration.radius_cap,
        test_images=len(ctx.data),
        n0=cfg.n0,
        cohen_n=list(cfg.cohen_n),
        max_samples=cfg.max_samples,
        tolerance=guided_tolerance(cfg),
        offline_evaluations=offline_evaluations,
        base_noisy_test_accuracy=(ctx.pipeline.manifest.data["stages"].get("train-base") or {}).get(
            "noisy_test_accuracy"
        ),
        surrogate_share_on_calibration=ctx.calibration.diagnostics.get("certified_share"),
        device=str(ctx.smooth.device),
        torch_threads=torch.get_num_threads(),
        cpu_count=env["cpu_count"],
        versions=env["versions"],
        workdir=str(workdir),
        config=dataclasses.asdict(cfg),
    )


def guided_tolerance(cfg: BenchConfig) -> float:
    """The best-radius tolerance the sequential methods ran with (l2 units)."""
    if cfg.tolerance is not None:
        return cfg.tolerance
    return inspect.signature(EProcessCertifier).parameters["tolerance"].default


def default_workdir(offline: QuickstartConfig) -> str:
    """The quickstart's default folder for this size (the bench reuses its offline stage), else its own."""
    sound = noise_family(check_noise_scheme(offline.noise_scheme)) == "grid"
    plain = dataclasses.replace(offline, noise_scheme=NOISE_SCHEME)
    if plain == FULL:
        folder = "surrogate-cert-quickstart"
    else:
        folder = "surrogate-cert-quickstart-quick" if plain == QUICK else "surrogate-cert-bench-quick"
    return folder + ("-sound" if sound else "")


def json_safe(value):
    """``value`` with every non-finite float replaced by None: strict JSON (no NaN / Infinity)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
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
            + (f"{gt['wrong']}/{gt['inputs']} ({gt['bound']:.3g})" if gt else "n/a")
            + " |"
        )
    return "\n".join(lines)


__all__ = [
    "BenchConfig",
    "BENCH_FULL",
    "BENCH_QUICK",
    "BENCH_TINY",
    "METHODS",
    "METHOD_LABELS",
    "run_bench",
    "linear_ground_truth",
    "certifiers",
    "markdown_table",
    "summarise",
    "triage",
    "prior_comparison",
    "json_safe",
]
