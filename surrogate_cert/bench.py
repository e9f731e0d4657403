"""Every certifier side by side, in one run, on the same inputs and base model: ``surrogate-cert bench``.

Methods (same test images, same base model, same noise seed):

===========================  ===============================================================
``cohen_10k``, ``cohen_1k``  Cohen et al. CERTIFY, ``n0 = 100``, ``n = 10,000`` / ``1,000``
``sequential_kt``            E-process, KT prior Beta(1/2, 1/2), class from ``n0 = 100`` pilot
                             samples, best-radius policy, budget ``max_samples``
``sequential_surrogate``     E-process, class and mixture prior from the surrogate (no pilot)
``surrogate``                calibrated surrogate alone: one forward pass, no base-model samples
``hybrid``                   surrogate where it certifies, else ``sequential_surrogate``
===========================  ===============================================================

For each: certified accuracy at radii 0, 0.25, 0.5, 0.75, 1.0 and the average certified radius
on the dataset's test images; mean base-model evaluations per query over all / certified / other
inputs; images per second (wall time of one batched call over all images); and the rate of wrong
certificates on the exact linear ground-truth problem (``groundtruth.linear_problem``: true class
and true radius known in closed form), where the surrogate is trained and calibrated on its own
train / cal points exactly as on the dataset, against each method's bound.

The offline stage (base model, counts, surrogate, calibration) is the quickstart's
(``pipeline.Pipeline.offline``): in the quickstart's folder it is reused, not redone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import stats
from .certificate import Certificate, write_tsv
from .errors import InvalidParameterError
from .pipeline import FULL, QUICK, Pipeline, QuickstartConfig

METHODS = ("cohen_10k", "cohen_1k", "sequential_kt", "sequential_surrogate", "surrogate", "hybrid")
LABELS = {
    "cohen_10k": "Cohen-10k", "cohen_1k": "Cohen-1k", "sequential_kt": "Sequential (KT prior)",
    "sequential_surrogate": "Sequential (surrogate prior)", "surrogate": "Surrogate only", "hybrid": "Hybrid",
}
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class BenchConfig:
    """What the bench certifies: ``test_limit`` test images (None = all), Cohen's sample sizes, the
    sequential budget and best-radius ``tolerance`` (None: the certifier's default), and the linear
    ground-truth problem's sizes (points per split, samples)."""

    offline: QuickstartConfig = FULL
    test_limit: int | None = 100
    n0: int = 100
    cohen_n: tuple[int, int] = (10_000, 1_000)
    max_samples: int = 10_000
    tolerance: float | None = None
    linear_points: tuple[int, int, int] = (1000, 1000, 1000)
    linear_n: tuple[int, int] = (1000, 10_000)
    linear_epochs: int = 30


BENCH_FULL = BenchConfig()
QUICK_OFFLINE = dataclasses.replace(FULL, base_epochs=8, train_n=100, cal_n=1000, test_limit=10)
"""``bench --quick``'s offline stage: every train / cal image, fewer samples (0.5M evaluations)."""

BENCH_QUICK = BenchConfig(offline=QUICK_OFFLINE, test_limit=10, linear_points=(300, 300, 300), linear_epochs=20)
BENCH_TINY = BenchConfig(offline=QUICK, test_limit=6, n0=20, cohen_n=(1000, 100), max_samples=500,
                         linear_points=(100, 110, 40), linear_n=(100, 500), linear_epochs=5)
"""Test-only (hidden ``--tiny``): every method and field in seconds; Cohen's n scaled down."""


# --------------------------------------------------------------------------- the certifiers

def certifiers(smooth, surrogate, calibration, cfg: BenchConfig, alpha: float) -> dict[str, Callable]:
    """Each method as ``f(x, indices) -> list[Certificate]`` over one shared ``SmoothedClassifier``."""
    from .cohen import CohenCertifier
    from .hybrid import HybridCertifier, SurrogateCertifier
    from .sequential import EProcessCertifier

    cohen = CohenCertifier(smooth)
    policy = {} if cfg.tolerance is None else dict(tolerance=cfg.tolerance)
    kt = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, n0=cfg.n0, **policy)
    guided = EProcessCertifier(smooth, alpha, max_samples=cfg.max_samples, **policy)
    one_pass = SurrogateCertifier(surrogate, calibration)
    hybrid = HybridCertifier(one_pass, guided)

    def sequential_surrogate(x, idx):
        classes, p_tilde = surrogate.predict(x)
        prior = stats.surrogate_prior(p_tilde, surrogate.kappa, surrogate.w)
        return guided.certify(x, classes=classes, prior=prior, indices=idx)

    n_big, n_small = cfg.cohen_n
    return {
        "cohen_10k": lambda x, idx: cohen.certify(x, n0=cfg.n0, n=n_big, alpha=alpha, indices=idx),
        "cohen_1k": lambda x, idx: cohen.certify(x, n0=cfg.n0, n=n_small, alpha=alpha, indices=idx),
        "sequential_kt": lambda x, idx: kt.certify(x, indices=idx),
        "sequential_surrogate": sequential_surrogate,
        "surrogate": lambda x, idx: one_pass.certify(x),
        "hybrid": lambda x, idx: hybrid.certify(x, indices=idx),
    }


def _timed(method: Callable, x, idx) -> tuple[list[Certificate], float]:
    t0 = time.perf_counter()
    certificates = method(x, idx)
    return certificates, time.perf_counter() - t0


# --------------------------------------------------------------------------- linear ground truth

def linear_ground_truth(cfg: BenchConfig, sigma: float, epsilon: float, alpha_mc: float, alpha: float,
                        seed: int = 0, device=None) -> dict:
    """Wrong-certificate rate of every method on the exact linear problem, against its bound.

    Train / cal / test points are independent draws of ``linear_problem`` (margins uniform in
    +-3 sigma); the surrogate is trained on train counts and calibrated on cal counts as on real
    data. A certificate is wrong when it names the wrong class or a radius above the true distance
    to the hyperplane. Bounds: alpha (Cohen, sequential), epsilon + alpha_mc (surrogate, marginal),
    epsilon + alpha_mc + alpha (hybrid); the allowance is the 0.999-quantile of Binomial(N, bound).
    """
    from scipy import stats as st

    from calibration.conformal import calibrate_arrays

    from .groundtruth import linear_problem
    from .smoothing import SmoothedClassifier
    from .surrogate import Surrogate

    n_train, n_cal, n_test = cfg.linear_points
    problems = [linear_problem(num, sigma, seed=seed + 1000 * part) for part, num in enumerate((n_train, n_cal, n_test))]
    train, cal, test = problems
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
    bounds = dict(cohen_10k=alpha, cohen_1k=alpha, sequential_kt=alpha, sequential_surrogate=alpha,
                  surrogate=epsilon + alpha_mc, hybrid=epsilon + alpha_mc + alpha)
    results = {}
    idx = offsets[2] + np.arange(n_test)
    for name, method in certifiers(smooth, surrogate, calibration, cfg, alpha).items():
        certificates, _ = _timed(method, test.x, idx)
        wrong = int(test.wrong_certificates(certificates).sum())
        bound = bounds[name]
        allowance = int(st.binom.ppf(0.999, n_test, bound))
        results[name] = dict(
            inputs=n_test, certified=int(sum(c.radius > 0 for c in certificates)), wrong=wrong,
            rate=wrong / n_test, bound=bound, allowance=allowance, within_bound=wrong <= allowance,
            mean_evaluations=float(np.mean([c.n_samples for c in certificates])),
        )
    return dict(problem=dict(points=cfg.linear_points, n_train=cfg.linear_n[0], n_cal=cfg.linear_n[1],
                             input_shape=list(train.x.shape[1:]), margins_in_sigmas=3.0,
                             surrogate_offset=calibration.pooled_offset), methods=results)


# --------------------------------------------------------------------------- the run

def run_bench(
    out: str | os.PathLike | None = "bench.json",
    config: BenchConfig = BENCH_FULL,
    *,
    workdir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    quiet: bool = False,
    command: str | None = None,
) -> dict:
    """Run every method on the same test images and on the linear problem; write ``out`` (JSON).

    ``workdir`` holds the offline stage (default: the quickstart's folder for this size, so a
    finished quickstart is reused) and ``bench/`` with one results TSV per method and a
    report.html comparing them. Returns the JSON content.
    """
    from tqdm.auto import tqdm

    from calibration.artifact import load_calibration
    from calibration.report import environment, offline_evaluations_from_counts, summarize_run, write_report
    from data_gen.datasets import load_split
    from data_gen.models import load_model

    from .smoothing import SmoothedClassifier
    from .surrogate import Surrogate

    offline_cfg = config.offline if device is None else dataclasses.replace(config.offline, device=device)
    cfg = dataclasses.replace(config, offline=offline_cfg)
    if workdir is None:
        workdir = default_workdir(config.offline)
    if out is not None:
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise InvalidParameterError(f"output folder {folder} does not exist; create it first or choose another --out")
    started = time.perf_counter()
    pipeline = Pipeline(workdir, offline_cfg, progress=progress, quiet=quiet, command=command or "run_bench()",
                        total_stages=5)
    pipeline.offline()
    offline_seconds = time.perf_counter() - started
    paths = pipeline.paths
    say = pipeline.say

    base = load_model(str(paths["base.pt"]), device=offline_cfg.device)
    surrogate = Surrogate.load(paths["surrogate.pt"], device=offline_cfg.device)
    calibration = load_calibration(paths["calibration.json"], surrogate)
    smooth = SmoothedClassifier(base.model, surrogate.num_classes, offline_cfg.sigma, device=offline_cfg.device,
                                batch_size=offline_cfg.batch_size, seed=offline_cfg.seed)
    data = load_split(offline_cfg.dataset, "test", data_root=offline_cfg.data_root, limit=cfg.test_limit)
    alpha = offline_cfg.alpha
    bench_dir = Path(workdir) / "bench"
    bench_dir.mkdir(exist_ok=True)

    say(f"certifying {len(data)} {offline_cfg.dataset} test images with {len(METHODS)} methods "
        f"(sigma={offline_cfg.sigma}, alpha={alpha}, device={smooth.device})")
    methods = certifiers(smooth, surrogate, calibration, cfg, alpha)
    results: dict[str, dict] = {}
    tsvs = []
    bar = tqdm(METHODS, desc="bench", unit="method", disable=not progress, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        certificates, seconds = _timed(methods[name], data.x, data.indices)
        rows = [dict(radius=c.radius, correct=int(c.prediction == int(y)), predict=c.prediction, time=c.seconds,
                     method=c.method, n_samples=c.n_samples) for c, y in zip(certificates, data.y.tolist())]
        summary = summarize_run(rows, RADII)
        results[name] = dict(
            label=LABELS[name],
            certified_accuracy={f"{r:g}": a for r, a in zip(RADII, summary["certified_accuracy"])},
            acr=summary["acr"],
            mean_evaluations={k: summary["samples"][k]["mean"] for k in ("all", "certified", "rest")},
            median_evaluations={k: summary["samples"][k]["median"] for k in ("all", "certified", "rest")},
            images_per_second=len(data) / seconds if seconds > 0 else None,
            seconds=seconds,
            share_by_method=summary["share_by_method"],
        )
        tsv = bench_dir / f"{name}.tsv"
        write_tsv(tsv, data.indices, data.y.numpy(), certificates,
                  header_comment=f"{pipeline.command}\nbench method {name} ({LABELS[name]}) sigma={offline_cfg.sigma} "
                                 f"seed={offline_cfg.seed} alpha={alpha} device={smooth.device}")
        tsvs.append(tsv)
        say(f"      {LABELS[name]:<29} certified accuracy {100 * summary['certified_accuracy'][0]:5.1f}% at r=0, "
            f"{summary['samples']['all']['mean']:9,.1f} evaluations/query, {results[name]['images_per_second']:9,.1f} "
            "images/s")
    bar.close()

    say("linear ground-truth problem: wrong-certificate rate of each method against its bound")
    t0 = time.perf_counter()
    truth = linear_ground_truth(cfg, offline_cfg.sigma, calibration.epsilon, calibration.alpha_mc, alpha,
                                seed=offline_cfg.seed, device=offline_cfg.device)
    for name, record in truth["methods"].items():
        results[name]["ground_truth"] = record
    truth_seconds = time.perf_counter() - t0

    offline_evaluations = offline_evaluations_from_counts([paths["train.h5"], paths["cal.h5"]])
    reference = results["cohen_10k"]["mean_evaluations"]["all"]
    reference_speed = results["cohen_10k"]["images_per_second"]
    for name, record in results.items():
        mean = record["mean_evaluations"]["all"]
        record["evaluations_vs_cohen_10k"] = (mean / reference) if reference else None
        record["images_per_second_vs_cohen_10k"] = (record["images_per_second"] / reference_speed
                                                    if reference_speed and record["images_per_second"] else None)
        saved = reference - mean
        record["break_even_queries"] = offline_evaluations / saved if name in ("surrogate", "hybrid") and saved > 0 else None
    report = write_report(tsvs, bench_dir / "report.html", calibration=paths["calibration.json"],
                          offline_evaluations=offline_evaluations, baseline="cohen_10k",
                          title="surrogate-cert bench")
    env = environment()
    content = dict(
        setup=dict(
            dataset=offline_cfg.dataset, sigma=offline_cfg.sigma, alpha=alpha, epsilon=calibration.epsilon,
            alpha_mc=calibration.alpha_mc, test_images=len(data), n0=cfg.n0, cohen_n=list(cfg.cohen_n),
            max_samples=cfg.max_samples, tolerance=guided_tolerance(cfg), offline_evaluations=offline_evaluations,
            base_noisy_test_accuracy=(pipeline.manifest.data["stages"].get("train-base") or {}).get("noisy_test_accuracy"),
            surrogate_share_on_calibration=calibration.diagnostics.get("certified_share"),
            device=str(smooth.device), torch_threads=env["torch_threads"], cpu_count=env["cpu_count"],
            versions=env["versions"], workdir=str(workdir), config=dataclasses.asdict(cfg),
        ),
        methods=results,
        linear_problem=truth["problem"],
        seconds=dict(offline=offline_seconds, certify=sum(r["seconds"] for r in results.values()),
                     ground_truth=truth_seconds, total=time.perf_counter() - started),
        report=report["html"],
    )
    content["markdown"] = markdown_table(content)
    if out is not None:
        tmp = f"{out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(_finite(content), fh, indent=2, allow_nan=False)
        os.replace(tmp, out)
    say("")
    say(content["markdown"])
    say(f"\nJSON: {out}; per-method TSVs and report: {bench_dir}")
    return content


def guided_tolerance(cfg: BenchConfig) -> float:
    """The best-radius tolerance the sequential methods ran with (l2 units)."""
    if cfg.tolerance is not None:
        return cfg.tolerance
    import inspect

    from .sequential import EProcessCertifier

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
    for name, r in content["methods"].items():
        acc = [f"{100 * a:.1f}%" for a in r["certified_accuracy"].values()]
        ev = r["mean_evaluations"]
        gt = r.get("ground_truth") or {}

        def num(v):
            return "n/a" if v is None else f"{v:,.1f}"

        lines.append(
            f"| {r['label']} | " + " | ".join(acc) + f" | {r['acr']:.3f} | {num(ev['all'])} | {num(ev['certified'])} "
            f"| {num(ev['rest'])} | {num(r['images_per_second'])} | "
            + (f"{gt['wrong']}/{gt['inputs']} ({gt['bound']:.3g})" if gt else "n/a") + " |")
    return "\n".join(lines)


__all__ = ["BenchConfig", "BENCH_FULL", "BENCH_QUICK", "METHODS", "run_bench", "linear_ground_truth",
           "certifiers", "markdown_table"]
