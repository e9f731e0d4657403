"""The one-pass case for a model the user already has: a base model that saw every training image.

``benchmarks/onepass_mnist.py --case pretrained`` runs it beside the project's own case
(``workflows.onepass_case``). The base model is trained by the benchmark on ALL training images
(``train-base --splits train,surrogate``, cached by content), so no training image is unseen. What a
surrogate can learn the base model's behaviour on unseen images from, then, is an unlabeled pool:

- ``seen``: the ``surrogate`` split's 10,000 images (the base model saw them): the flow of README's
  recommended steps, kept for comparison;
- ``augmented``: random affine variants (rotation, shift, scale, shear) of training images: images a user
  can make from the training set alone, which the base model never saw as such;
- ``test_pool``: the ``test`` split's images beyond the evaluated ones (rows ``test_limit..``): unlabeled
  images from the deployment distribution, as a deployment collects them; disjoint from the calibration
  split (the other half of the official test set) and from the evaluated test images.

Each pool goes through the unlabeled path (an npz without ``y``, ``datagen --split pool``, counts
without labels) and ``calibrate`` checks by content that no calibration image is in it. Every surrogate
starts from the base model's weights and is calibrated on the same ``cal`` counts; each row's guarantee
is its own (no row is chosen by its test result). The recommended flow is fixed in advance: every
pool together. On the test images: Cohen-10k, one-pass (pooled, shifted, Mondrian), the hybrid
(fallback only; refining best radii at several prices, reported the sequential way and the max way),
required radius at 1, 2, 3 sigma, and the targets met or missed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration.conformal import calibrate
from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.models import load_model

from ..core.files import check_outputs, write_text_atomic
from ..core.one_pass import SurrogateCertifier
from ..core.sequential import EProcessCertifier
from ..core.smoothing import SmoothedClassifier
from ..deploy.hybrid import HybridCertifier
from .bench import json_safe
from .onepass_case import (
    ONEPASS_TINY,
    OnePassBench,
    OnePassConfig,
    _accuracy,
    _acr,
    cached_counts,
    cohen_row,
    counts_key,
    evaluate_one_pass,
)

__all__ = [
    "PretrainedConfig",
    "PRETRAINED_MNIST",
    "PRETRAINED_TINY",
    "run_pretrained",
    "augmented_images",
    "pretrained_markdown",
]


@dataclass(frozen=True)
class PretrainedConfig:
    """The pretrained case: the one-pass sizes (``case``, with ``base_splits`` every training image), the pools
    and the hybrid's rules. ``prices`` are in sigma units of radius per 1,000 samples."""

    case: OnePassConfig = OnePassConfig(base_splits=("train", "surrogate"), controls=False)
    pool_n: int = 100
    augmented: int = 20_000
    pools: tuple[tuple[str, ...], ...] = (
        ("seen",),
        ("augmented",),
        ("test_pool",),
        ("seen", "augmented"),
        ("seen", "augmented", "test_pool"),
    )
    recommended: tuple[str, ...] = ("seen", "augmented", "test_pool")
    refine_rules: tuple[tuple[float, str, float | None], ...] = (
        (0.05, "sequential", None),
        (0.02, "max", None),
        (0.05, "max", None),
        (0.1, "max", None),
        (0.02, "max", 2.0),
        (0.05, "max", 2.0),
        (0.1, "max", 2.0),
    )
    """Refining rules: (price in sigma per 1,000 samples, combine, radius of interest in sigma or None)."""
    refine_max_samples: int = 2000
    required_budgets: tuple[int, ...] = (10_000, 8500, 7000, 2000)
    """Sequential budgets of the required-radius fallback: the default, and one that trades accuracy at the
    boundary (inputs whose ``p`` is too close to ``Phi(r*/sigma)`` to decide in the budget) for samples."""


PRETRAINED_MNIST = PretrainedConfig()
"""MNIST at the CPU size of the project's case (500 test images, 5,000 cal x 10^4), sigma from the command."""

PRETRAINED_TINY = PretrainedConfig(
    case=dataclasses.replace(
        ONEPASS_TINY,  # the one-pass case's test size, without its top-up, frontier and controls
        frontier_epsilons=(),
        surrogate_epochs=2,
        controls=False,
        cal_topup=0,
        required_sigmas=OnePassConfig().required_sigmas,
        base_splits=("train", "surrogate"),
    ),
    pool_n=20,
    augmented=60,
    pools=(("seen",), ("augmented", "test_pool")),
    recommended=("augmented", "test_pool"),
    refine_rules=((0.1, "sequential", None), (0.1, "max", 2.0)),
    refine_max_samples=200,
    required_budgets=(300,),
)
"""Test-only: every section in seconds on digits."""


def augmented_images(x: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """``num`` random affine variants of images drawn from ``x`` (rotation +-15 degrees, shift +-10%, scale
    0.9-1.1, shear +-8 degrees), seeded: images a user makes from a training set, not in it."""
    from torchvision.transforms import v2

    affine = v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8)
    gen = np.random.default_rng(seed)
    rows = gen.choice(len(x), size=num, replace=num > len(x))
    out = torch.empty((num, *x.shape[1:]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, r in enumerate(rows):
            out[i] = affine(x[int(r)])
    return out.clamp(0.0, 1.0)


def _pool_npz(bench: OnePassBench, name: str, make) -> str:
    """An unlabeled npz under the work folder, made once (its name holds what made it)."""
    cfg = bench.cfg
    key = hashlib.sha256(json.dumps([name, cfg.dataset, cfg.seed], sort_keys=True).encode()).hexdigest()[:10]
    path = bench.workdir / "pools" / f"{name}-{key}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        x = make()
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, x=x.numpy().astype(np.float32))
        os.replace(tmp, path)
    return f"npz:{path}"


def pool_counts(bench: OnePassBench, pcfg: PretrainedConfig, model: str, name: str) -> Path:
    """Counts of one pool (``seen``: the surrogate split; the others through the unlabeled path), cached."""
    cfg = bench.cfg
    if name == "seen":
        return bench.counts(model, "surrogate", pcfg.pool_n, limit=cfg.surrogate_limit)
    if name == "augmented":
        spec = _pool_npz(
            bench,
            f"augmented{pcfg.augmented}",
            lambda: augmented_images(
                load_split(cfg.dataset, "train", data_root=cfg.data_root).x, pcfg.augmented, cfg.seed + 17
            ),
        )
    elif name == "test_pool":
        start = int(cfg.test_limit or 0)
        spec = _pool_npz(
            bench, f"test-from{start}", lambda: load_split(cfg.dataset, "test", data_root=cfg.data_root).x[start:]
        )
    else:
        raise ValueError(f"unknown pool {name!r}")
    sha = load_model(model, device="cpu").sha256
    key = counts_key(spec, "pool", sha, cfg.sigma, pcfg.pool_n, 0, cfg.seed, None)

    def make(path: Path) -> None:
        bench.say(f"      datagen pool {name}: x {pcfg.pool_n}")
        bench.timed(
            f"datagen pool {name}",
            lambda: generate_counts(
                spec,
                "pool",
                model,
                cfg.sigma,
                pcfg.pool_n,
                str(path),
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                device=cfg.device,
                progress=bench.progress,
                resume=path.exists(),
                command="bench pretrained case",
            ),
        )

    return cached_counts(bench.cache, key, make, bench.extra, bench.say)


def evaluate_hybrid_rule(
    surrogate,
    calibration,
    data,
    base,
    cfg: OnePassConfig,
    *,
    price=None,
    refine=False,
    combine="max",
    required=None,
    max_samples=None,
    radius_of_interest=None,
) -> dict:
    """The hybrid on the test images with a given fallback rule: accuracy, ACR, evaluations, routes, seconds.

    ``price`` and ``radius_of_interest`` are in input l2 units (price per 1,000 samples); ``refine`` refines
    one-pass best radii at that price.
    """
    smooth = SmoothedClassifier(
        base, surrogate.num_classes, cfg.sigma, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed
    )
    sequential = EProcessCertifier(
        smooth,
        cfg.alpha,
        max_samples=max_samples or cfg.max_samples,
        tolerance=cfg.tolerance,
        price=price,
        radius_of_interest=radius_of_interest,
    )
    hybrid = HybridCertifier(SurrogateCertifier(surrogate, calibration), sequential, refine=refine, combine=combine)
    t0 = time.perf_counter()
    certs = hybrid.certify(data.x, required_radius=required, indices=data.indices)
    seconds = time.perf_counter() - t0
    prediction = np.array([c.prediction for c in certs])
    radius = np.array([c.radius for c in certs])
    samples = np.array([c.n_samples for c in certs], dtype=float)
    routes = [c.route for c in certs]
    radii = [s * cfg.sigma for s in cfg.radii_sigmas]
    row = dict(
        certified_accuracy=_accuracy(prediction, radius, data.labels, radii),
        acr=_acr(prediction, radius, data.labels),
        mean_evaluations=float(samples.mean()),
        curve=_curve(prediction, radius, data.labels, cfg.sigma),
        routes={r: routes.count(r) for r in sorted(set(routes))},
        seconds=seconds,
        price=price,
        refine=refine,
        combine=combine,
        max_samples=sequential.max_samples,
        radius_of_interest=radius_of_interest,
    )
    if required is not None:
        row["accuracy_at_required"] = float(np.mean((prediction == data.labels) & (radius >= required - 1e-12)))
        row["radius"] = required
    return row


CURVE_POINTS = 41
"""Radii of the accuracy curves the hybrid targets are read on: 0 to 2 sigma in steps of sigma / 20."""


def _curve(row_prediction, row_radius, labels, sigma) -> list[float]:
    radii = np.linspace(0.0, 2.0 * sigma, CURVE_POINTS)
    return list(_accuracy(row_prediction, row_radius, labels, radii).values())


def _surrogate_rows(bench, pcfg, model, cal, data, files_by_pool) -> tuple[dict, dict, dict]:
    """Train, calibrate and evaluate one surrogate per pool combination; returns rows, info, the recommended."""
    cfg = bench.cfg
    rows, info, recommended = {}, {}, None
    for combo in pcfg.pools:
        name = "+".join(combo)
        files = [files_by_pool[p] for p in combo]
        surrogate = bench.surrogate(model, files, name.replace("+", "-"))
        cals = bench.calibrations(surrogate, cal, cfg.epsilons[0], files[0])
        cals["shaped"] = bench.timed(
            "calibrate",
            lambda surrogate=surrogate: calibrate(  # bound now: the lambda runs at once, inside this iteration
                surrogate, str(cal), cfg.epsilons[0], cfg.alpha_mc, data_root=cfg.data_root, score="shaped"
            ),
        )
        rows[name] = {s: evaluate_one_pass(surrogate, c, data, cfg) for s, c in cals.items()}
        info[name] = dict(
            images=int(surrogate.meta.get("counts_rows", 0)),
            q_hat=cals["pooled"].pooled_offset,
            agrees_with_counts=cals["pooled"].diagnostics.get("surrogate_agrees_with_counts"),
            kappa=surrogate.kappa,
            w=surrogate.w,
            epochs=surrogate.meta.get("epochs_run"),
        )
        bench.say(
            f"      {name}: q^ {info[name]['q_hat']:.3f}, one-pass pooled "
            + " / ".join(f"{100 * v:.1f}" for v in list(rows[name]["pooled"]["certified_accuracy"].values())[1:4])
        )
        if tuple(combo) == tuple(pcfg.recommended):
            recommended = (surrogate, cals)
    return rows, info, recommended


def _hybrid_rows(bench, pcfg, surrogate, calibration, data, base) -> dict:
    """The recommended surrogate's hybrid: fallback only, then refined best radii at each price, both combines."""
    cfg = bench.cfg
    out = {"fallback": bench.timed("hybrid", lambda: evaluate_hybrid_rule(surrogate, calibration, data, base, cfg))}
    for price, combine, roi in pcfg.refine_rules:
        row = bench.timed(
            "hybrid",
            lambda price=price, combine=combine, roi=roi: evaluate_hybrid_rule(  # bound now, as above
                surrogate,
                calibration,
                data,
                base,
                cfg,
                price=price * cfg.sigma,
                refine=True,
                combine=combine,
                max_samples=pcfg.refine_max_samples,
                radius_of_interest=None if roi is None else roi * cfg.sigma,
            ),
        )
        name = f"refine_price{price:g}sigma_{combine}" + ("" if roi is None else f"_upto{roi:g}sigma")
        out[name] = row
        bench.say(f"      hybrid {name}: {row['mean_evaluations']:.0f} evals/query, ACR {row['acr']:.3f}")
    return out


def _required_rows(bench, pcfg, surrogate, calibration, data, base, one_pass_row) -> dict:
    """Required radius at each ``r*``: the first budget's row, and the other budgets under ``budgets``."""
    cfg = bench.cfg
    out = {}
    for s in cfg.required_sigmas:
        rows = [
            bench.timed(
                "hybrid",
                lambda s=s, b=b: evaluate_hybrid_rule(
                    surrogate, calibration, data, base, cfg, required=s * cfg.sigma, max_samples=b
                ),
            )
            for b in pcfg.required_budgets
        ]
        row = rows[0]
        row["one_pass"] = one_pass_row["required_radius"][f"{s:g}"]
        row["budgets"] = {
            str(b): dict(
                accuracy_at_required=r["accuracy_at_required"], evaluations=r["mean_evaluations"], routes=r["routes"]
            )
            for b, r in zip(pcfg.required_budgets, rows)
        }
        out[f"{s:g}"] = row
        bench.say(
            f"      required {s:g} sigma: "
            + ", ".join(
                f"budget {b}: {100 * v['accuracy_at_required']:.1f}% at {v['evaluations']:.0f} evals"
                for b, v in row["budgets"].items()
            )
        )
    return out


def run_pretrained(
    pcfg: PretrainedConfig = PRETRAINED_MNIST,
    workdir="surrogate-cert-pretrained",
    *,
    out=None,
    cache_dir=None,
    extra_cache_dirs=(),
    progress: bool = False,
    quiet: bool = False,
) -> dict:
    """The pretrained case end to end (module docstring); returns (and writes to ``out``) the JSON."""
    if out is not None:
        check_outputs([out], overwrite=True)
    started = time.perf_counter()
    cfg = pcfg.case
    bench = OnePassBench(cfg, workdir, cache_dir, extra_cache_dirs, progress, quiet)
    bench.say(f"pretrained case: {cfg.dataset}, sigma={cfg.sigma}, base on {' + '.join(cfg.base_splits)}")
    model = bench.base_model()
    test = bench.counts(model, "test", cfg.test_n, cfg.test_n0, cfg.test_limit)
    cal = bench.counts(model, "cal", cfg.cal_n, limit=cfg.cal_limit)
    base = load_model(model, device=cfg.device).model
    data = bench.test_data(test)
    files = {p: pool_counts(bench, pcfg, model, p) for p in dict.fromkeys(p for c in pcfg.pools for p in c)}
    one_pass, info, (surrogate, cals) = _surrogate_rows(bench, pcfg, model, cal, data, files)
    rec = "+".join(pcfg.recommended)
    content = dict(cohen_10k=cohen_row(data, cfg), one_pass=one_pass, surrogates=info, recommended=rec)
    content["cohen_10k"]["curve"] = _curve(data.cohen_prediction, data.cohen_radius, data.labels, cfg.sigma)
    content["frontier_epsilon"] = {
        f"{e:g}": {
            s: evaluate_one_pass(surrogate, c, data, cfg)
            for s, c in bench.calibrations(
                surrogate, cal, e, files[pcfg.recommended[0]], schemes=("pooled", "shifted")
            ).items()
        }
        for e in cfg.frontier_epsilons
    }
    content["hybrid"] = _hybrid_rows(bench, pcfg, surrogate, cals["pooled"], data, base)
    content["required_radius"] = _required_rows(
        bench, pcfg, surrogate, cals["pooled"], data, base, one_pass[rec]["pooled"]
    )
    content["targets"] = pretrained_targets(content, cfg)
    content["setup"] = dict(
        dataset=cfg.dataset,
        sigma=cfg.sigma,
        alpha=cfg.alpha,
        alpha_mc=cfg.alpha_mc,
        epsilon=cfg.epsilons[0],
        base_model=model,
        base_splits=list(cfg.base_splits),
        test_images=len(data.labels),
        cal_images=5000 if cfg.cal_limit is None else cfg.cal_limit,
        cohen_n=data.n,
        n0=cfg.test_n0,
        pools={p: str(f) for p, f in files.items()},
        config=dataclasses.asdict(pcfg),
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()),
    )
    content["seconds"] = dict(bench.seconds, total=time.perf_counter() - started)
    content["markdown"] = pretrained_markdown(content)
    if out is not None:
        write_text_atomic(out, json.dumps(json_safe(content), indent=2, allow_nan=False), overwrite=True)
    bench.say("\n" + content["markdown"])
    return content


def _key(radius: float) -> str:
    return f"{radius:g}"


def _pp(difference: float) -> float:
    # accuracies are counts over a few hundred images: 0.978 - 0.968 must read as 1.0 pp, not 1.0000000000000009
    return round(100 * difference, 6)


def pretrained_targets(content: dict, cfg: OnePassConfig) -> dict:
    """The issue's targets on this case, each with its numbers and whether it is met."""
    sigma, rec, cohen = cfg.sigma, content["recommended"], content["cohen_10k"]
    ca = cohen["certified_accuracy"]
    one_pass = {}
    for scheme, row in content["one_pass"][rec].items():
        drops = [_pp(ca[_key(m * sigma)] - row["certified_accuracy"][_key(m * sigma)]) for m in (1, 2)]
        ratio = row["acr"] / cohen["acr"] if cohen["acr"] else None
        one_pass[scheme] = dict(
            drop_pp_sigma=drops[0],
            drop_pp_2sigma=drops[1],
            acr_ratio=ratio,
            met=max(drops) <= 2.0 and ratio is not None and ratio >= 0.9,
        )
    hybrid = {}
    for name, row in content["hybrid"].items():
        worst = max(_pp(c - h) for c, h in zip(cohen["curve"], row["curve"]))
        hybrid[name] = dict(
            worst_drop_pp_up_to_2sigma=worst,
            evaluations=row["mean_evaluations"],
            met=worst <= 1.0 and row["mean_evaluations"] <= 200,
        )
    required = {}
    for s, row in content["required_radius"].items():
        m = float(s)
        budget = 200.0 if m <= 2 else cohen["mean_evaluations"] / 10
        options = {
            b: dict(drop_pp=_pp(ca[_key(m * sigma)] - v["accuracy_at_required"]), evaluations=v["evaluations"])
            for b, v in row.get(
                "budgets",
                {
                    "default": dict(
                        accuracy_at_required=row["accuracy_at_required"], evaluations=row["mean_evaluations"]
                    )
                },
            ).items()
        }
        for v in options.values():
            v["met"] = v["drop_pp"] <= 1.0 and v["evaluations"] <= budget
        required[s] = dict(budget=budget, by_sequential_budget=options, met=any(v["met"] for v in options.values()))
    over = {
        f"{pool}/{scheme}": dict(
            over_radius=row["over_radius"],
            allowance=row["over_radius_allowance"],
            rate=row["over_radius_rate"],
            bound=row["over_radius_bound"],
            met=row["over_radius"] <= row["over_radius_allowance"],
        )
        for pool, rows in content["one_pass"].items()
        for scheme, row in rows.items()
    }
    return dict(
        one_pass_best_radius=dict(
            rule="within 2 pp of Cohen-10k at sigma and 2 sigma, ACR >= 0.9x (epsilon 0.01)",
            rows=one_pass,
            met=any(r["met"] for r in one_pass.values()),
        ),
        hybrid_best_radius=dict(
            rule="within 1 pp of Cohen-10k at every r <= 2 sigma, <= 200 evaluations per query",
            rows=hybrid,
            met=any(r["met"] for r in hybrid.values()),
        ),
        required_radius=dict(
            rule="within 1 pp of Cohen-10k at r* <= 2 sigma with <= 200 evaluations per query, "
            "at 3 sigma with <= 1/10 of Cohen's",
            rows=required,
            met=all(r["met"] for r in required.values()),
        ),
        over_radius=dict(
            rule="over-radius rate <= epsilon + alpha_mc (count within the 0.999-quantile allowance)",
            rows=over,
            met=all(r["met"] for r in over.values()),
        ),
    )


def pretrained_markdown(content: dict) -> str:
    """The tables of the pretrained case (docs/one-pass.md)."""
    setup, cohen = content["setup"], content["cohen_10k"]
    sigma = setup["sigma"]
    radii = list(cohen["certified_accuracy"])
    head = "| row | " + " | ".join(f"r={float(r) / sigma:g}σ" for r in radii) + " | ACR | evals/query |"
    rule = "| --- |" + " ---: |" * (len(radii) + 2)
    pct = lambda row: " | ".join(f"{100 * a:.1f}" for a in row["certified_accuracy"].values())  # noqa: E731
    lines = [
        f"{setup['dataset']}, sigma = {sigma}, base on {' + '.join(setup['base_splits'])}: "
        f"{setup['test_images']} test images, epsilon = {setup['epsilon']}",
        "",
        head,
        rule,
        f"| Cohen-10k | {pct(cohen)} | {cohen['acr']:.3f} | {cohen['mean_evaluations']:,.0f} |",
    ]
    for pool, rows in content["one_pass"].items():
        for scheme, row in rows.items():
            lines.append(
                f"| one-pass {scheme}, pool {pool} (q^ {row['q_hat']:.3f}) | {pct(row)} | {row['acr']:.3f} | 0 |"
            )
    for name, row in content["hybrid"].items():
        lines.append(f"| hybrid {name} | {pct(row)} | {row['acr']:.3f} | {row['mean_evaluations']:,.1f} |")
    lines += [
        "",
        "| required radius | Cohen-10k | one-pass | hybrid | hybrid evals/query |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s, row in content["required_radius"].items():
        c = cohen["certified_accuracy"][_key(float(s) * sigma)]
        lines.append(
            f"| {s}σ | {100 * c:.1f} | {100 * row['one_pass']['certified_accuracy']:.1f} | "
            f"{100 * row['accuracy_at_required']:.1f} | {row['mean_evaluations']:,.1f} |"
        )
    lines += [
        "",
        "targets: " + "; ".join(f"{k} {'met' if v['met'] else 'missed'}" for k, v in content["targets"].items()),
    ]
    return "\n".join(lines)
