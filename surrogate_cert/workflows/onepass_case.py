"""The one-pass case on real data: Cohen-10k, the one-pass certificate, the hybrid and required-radius mode.

``benchmarks/onepass_mnist.py`` is a configuration of ``run_onepass``; counts are cached by content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration.conformal import calibrate
from calibration.summary import environment
from data_gen.datasets import dataset_key
from data_gen.generate import generate_counts, top_up_counts
from data_gen.models import load_model, train_base
from data_gen.store import read_attrs, read_counts

from ..core import stats
from ..core.files import check_outputs, write_text_atomic
from ..core.hashing import sha256_file
from ..core.one_pass import SurrogateCertifier, certified_at_required
from ..core.sequential import EProcessCertifier
from ..core.smoothing import NOISE_SCHEME, SmoothedClassifier, check_noise_scheme, noise_family
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier
from .bench import json_safe
from .training import builtin_base_arch, train_surrogate

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
    the topped-up calibration. ``issued`` adds the issued guarantee beside the marginal rule (``issued_rows``).
    ``noise_scheme`` draws every count and fallback sample (``sound``: the sound scheme, images rounded to
    the 1/255 grid; the base model is the same either way).
    """

    dataset: str = "mnist"
    data_root: str | None = None
    model: str | None = None
    base_arch: str | None = "mlp"
    base_epochs: int | None = None
    base_splits: tuple[str, ...] = ("train",)
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
    issued: bool = True
    seed: int = 0
    batch_size: int = 4096
    device: str = "cpu"
    noise_scheme: str = NOISE_SCHEME
    noise_seed: int | None = None
    """Seed of every count's and fallback sample's noise (default ``seed``); the base model and the surrogate's
    training keep ``seed``, so two runs that differ here differ by the Monte Carlo noise alone."""

    @property
    def sampling_seed(self) -> int:
        return self.seed if self.noise_seed is None else self.noise_seed


ONEPASS_MNIST_CPU = OnePassConfig()
"""MNIST at the size that runs end to end in under 45 minutes on 2 CPU cores (uncontended): counts of 10,000
surrogate-split images x 100, 5,000 cal images x 10^4, 500 test images x (100 + 10^4)."""

ONEPASS_MNIST_GPU = dataclasses.replace(
    ONEPASS_MNIST_CPU, train_n=100, test_limit=None, cal_topup=90_000, frontier_images=(2500, 5000, 10_000)
)
"""The full size for a GPU (not measured here): the train split's counts too, every test image, the
calibration counts topped up to 10^5 samples where all agree."""

ONEPASS_DIGITS = OnePassConfig(
    dataset="digits",
    base_arch=None,
    base_epochs=None,
    test_limit=None,
    batch_size=2048,
    frontier_images=(125, 250),
    cal_topup=20_000,
    mondrian_bins=3,
    shift_bins=4,
)
"""The embedded digits: 250 surrogate-split images, all 400 cal and 397 test images."""

ONEPASS_TINY = OnePassConfig(
    dataset="digits",
    base_arch=None,
    base_epochs=3,
    surrogate_n=50,
    cal_n=300,
    cal_limit=200,
    test_n0=20,
    test_n=300,
    test_limit=20,
    epsilons=(0.05,),
    frontier_epsilons=(0.05, 0.1),
    max_samples=300,
    surrogate_epochs=3,
    batch_size=2048,
    shift_bins=3,
    mondrian_bins=2,
    required_sigmas=(1.0,),
    cal_topup=200,
)
"""Test-only: every section in seconds."""


def counts_key(
    dataset: str,
    split: str,
    model_sha256: str,
    sigma: float,
    n: int,
    n0: int,
    seed: int,
    limit: int | None,
    noise_scheme: str = NOISE_SCHEME,
) -> dict:
    """What a counts file's content depends on (the cache key): dataset, split, base model, sigma, n, n0,
    seed, limit and the noise scheme (a file of any float scheme serves a float key: ``_matches``)."""
    return dict(
        dataset=dataset_key(dataset),
        split=split,
        model_sha256=model_sha256,
        sigma=float(sigma),
        n=int(n),
        n0=int(n0),
        seed=int(seed),
        limit=None if limit is None else int(limit),
        noise_scheme=check_noise_scheme(noise_scheme),
    )


def _matches(attrs: dict, key: dict) -> bool:
    have = dict(
        dataset=dataset_key(str(attrs.get("dataset"))),
        split=attrs.get("split"),
        model_sha256=attrs.get("model_sha256"),
        sigma=float(attrs.get("sigma", -1)),
        n=attrs.get("n"),
        n0=attrs.get("n0"),
        seed=attrs.get("seed"),
        limit=attrs.get("limit"),
        noise_scheme=attrs.get("noise_scheme"),
    )
    # Any float scheme serves a float key: its counts are as valid, only not bit-identical to the other's. The
    # sound scheme's law differs (and its images are rounded to the grid): only its own files serve it.
    if noise_family(have["noise_scheme"]) == noise_family(key["noise_scheme"]) == "float":
        have["noise_scheme"] = key["noise_scheme"]
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
    name = (
        f"{key['dataset'].replace('/', '_').replace(':', '_')[-40:]}-{key['split']}-n{key['n']}-n0{key['n0']}"
        f"-limit{key['limit']}-seed{key['seed']}"
        f"-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}.h5"
    )
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
        if tuple(cfg.base_splits) != ("train",):  # the key of a base model on the train split stays as it was
            key["splits"] = list(cfg.base_splits)
        path = self.cache / "models" / f"base-{cfg.dataset}-{cfg.base_arch or 'default'}-{_key(key)[:10]}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.say(
                f"      train-base --dataset {cfg.dataset} --arch {cfg.base_arch or 'default'} "
                f"(on the {' + '.join(cfg.base_splits)} split{'s' if len(cfg.base_splits) > 1 else ''})"
            )
            self.timed(
                "train-base",
                lambda: train_base(
                    dataset=cfg.dataset,
                    sigma=cfg.sigma,
                    out=str(path),
                    epochs=cfg.base_epochs,
                    seed=cfg.seed,
                    data_root=cfg.data_root,
                    device=cfg.device,
                    progress=self.progress,
                    arch=cfg.base_arch,
                    splits=cfg.base_splits,
                ),
            )
        return str(path)

    def counts(self, model: str, split: str, n: int, n0: int = 0, limit: int | None = None) -> Path:
        cfg = self.cfg
        sha = load_model(model, device="cpu").sha256
        key = counts_key(cfg.dataset, split, sha, cfg.sigma, n, n0, cfg.sampling_seed, limit, cfg.noise_scheme)

        def make(path: Path) -> None:
            self.say(
                f"      datagen {split}: {'all' if limit is None else limit} images x {n:,}"
                + (f" (+ {n0} selection)" if n0 else "")
            )
            self.timed(
                f"datagen {split}",
                lambda: generate_counts(
                    cfg.dataset,
                    split,
                    model,
                    cfg.sigma,
                    n,
                    str(path),
                    n0=n0,
                    batch_size=cfg.batch_size,
                    seed=cfg.sampling_seed,
                    limit=limit,
                    device=cfg.device,
                    data_root=cfg.data_root,
                    progress=self.progress,
                    resume=path.exists(),
                    command="bench one-pass case",
                    noise_scheme=cfg.noise_scheme,
                ),
            )

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
        self.say(
            f"      datagen --top-up {cfg.cal_topup:,}: calibration rows whose samples all agree, up to {planned:,}"
        )
        self.timed(
            "datagen top-up",
            lambda: top_up_counts(
                target,
                model,
                cfg.cal_topup,
                planned_max=planned,
                batch_size=cfg.batch_size,
                device=cfg.device,
                data_root=cfg.data_root,
                progress=self.progress,
            ),
        )
        return target

    def surrogate(self, model: str, files: list[Path], name: str, init: bool = True) -> Surrogate:
        cfg = self.cfg
        arch = builtin_base_arch(model) or cfg.base_arch
        key = dict(
            files=[sha256_of(f) for f in files],
            init=init,
            arch=arch,
            epochs=cfg.surrogate_epochs,
            seed=cfg.seed,
            batch=cfg.surrogate_batch_size,
            model=sha256_of(model),
        )
        path = self.workdir / "surrogates" / f"{name}-{_key(key)[:10]}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.say(
                f"      train {name}: {', '.join(f.name for f in files)}"
                + (" from the base model's weights" if init else "")
            )
            self.timed(
                "train",
                lambda: train_surrogate(
                    [str(f) for f in files],
                    path,
                    arch=arch,
                    init_from_base=model if init else None,
                    epochs=cfg.surrogate_epochs,
                    seed=cfg.seed,
                    data_root=cfg.data_root,
                    device=cfg.device,
                    batch_size=cfg.surrogate_batch_size,
                    patience=5,
                    progress=self.progress,
                ),
            )
        return Surrogate.load(path, device=cfg.device)

    def calibrations(
        self, surrogate: Surrogate, cal: Path, epsilon: float, edges_from: Path, schemes=ONEPASS_SCHEMES
    ) -> dict:
        cfg = self.cfg
        out = {}
        for scheme in schemes:
            options = dict(
                pooled={},
                shifted=dict(score="shifted", bins=cfg.shift_bins),
                mondrian_train=dict(groups="confidence", edges_from=str(edges_from), bins=cfg.mondrian_bins),
                issued=dict(guarantee="issued"),
            )[scheme]
            out[scheme] = self.timed(
                "calibrate",
                lambda options=options: calibrate(
                    surrogate, str(cal), epsilon, cfg.alpha_mc, data_root=cfg.data_root, **options
                ),
            )
        return out

    def test_data(self, test: Path) -> OnePassData:
        counts = read_counts(test)
        x = counts.images(self.cfg.data_root)
        prediction, _, radius = stats.cohen_certify(
            counts.counts_select, counts.counts, self.cfg.alpha, counts.sigma, slack=counts.radius_slack
        )
        labels = counts.require_labels("the one-pass case's certified accuracy", test)
        return OnePassData(x, labels, counts.indices, counts.counts, counts.n, prediction, radius)


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
    reference = np.atleast_1d(
        stats.reference_radius(
            data.counts[np.arange(len(classes)), classes], data.n, cfg.alpha_mc, sigma, slack=calibration.noise_slack
        )
    )
    over = certified & (radius > reference)
    bound = calibration.epsilon + calibration.alpha_mc
    row = dict(
        certified_accuracy=_accuracy(prediction, radius, data.labels, radii),
        acr=_acr(prediction, radius, data.labels),
        certified_share=float(certified.mean()),
        over_radius=int(over.sum()),
        over_radius_rate=float(over.mean()),
        over_radius_bound=bound,
        over_radius_allowance=stats.binomial_allowance(len(radius), bound),
        q_hat=calibration.pooled_offset,
        radius_cap=calibration.radius_cap,
        mean_evaluations=0.0,
        guarantee=calibration.guarantee,
        **among_certified(over, certified, bound),
    )
    required = {}
    for s in cfg.required_sigmas:
        r = s * sigma
        ok = certified_at_required(calibration, z, r) if calibration.radius_thresholds else radius >= r
        wrong_ref = ok & (reference < r)
        required[f"{s:g}"] = dict(
            radius=r,
            certified_accuracy=float(np.mean(ok & (classes == data.labels))),
            certified_share=float(ok.mean()),
            below_reference=int(wrong_ref.sum()),
            **among_certified(wrong_ref, ok, bound),
            legacy_rule_accuracy=float(np.mean((radius >= r) & (classes == data.labels))),
        )
    row["required_radius"] = required
    return row


def among_certified(over, certified, bound: float) -> dict:
    """The over-radius rate among the certified test images, the rate the ``issued`` guarantee bounds, with its
    allowance (the 0.999-quantile of Binomial(certified images, bound)); a marginal calibration bounds only the
    rate over all images."""
    count = int(np.sum(certified))
    return dict(
        certified_images=count,
        over_radius_among_certified=float(np.sum(over) / count) if count else 0.0,
        over_radius_allowance_among_certified=stats.binomial_allowance(count, bound),
    )


def issued_rows(
    bench: OnePassBench, surrogate: Surrogate, cal: Path, sur_counts: Path, data: OnePassData, base, content: dict
) -> dict:
    """The ``issued`` guarantee beside the marginal (pooled) rule, per epsilon: the one-pass certificate at its best
    radius and at each required radius, the hybrid in both modes, and the over-radius rate among certified images
    (what the issued guarantee bounds; the marginal rule's pooled rows are ``content``'s)."""
    cfg = bench.cfg
    out = {}
    for epsilon in cfg.epsilons:
        e = f"{epsilon:g}"
        calibration = bench.calibrations(surrogate, cal, epsilon, sur_counts, schemes=("issued",))["issued"]
        row = evaluate_one_pass(surrogate, calibration, data, cfg)
        row["statement"] = calibration.statement
        row["hybrid"] = bench.timed(
            "hybrid", lambda calibration=calibration: evaluate_hybrid(surrogate, calibration, data, base, cfg)
        )
        for s in cfg.required_sigmas:
            row["required_radius"][f"{s:g}"]["hybrid"] = bench.timed(
                "hybrid",
                lambda s=s, calibration=calibration: evaluate_hybrid(
                    surrogate, calibration, data, base, cfg, required=s * cfg.sigma
                ),
            )
        marginal = content["one_pass"][e]["pooled"]
        out[e] = dict(
            issued=row,
            marginal=dict(
                one_pass=marginal,
                hybrid=content["hybrid"][e]["pooled"],
                required_radius={
                    s: dict(one_pass=marginal["required_radius"][s], hybrid=r)
                    for s, r in content["required_radius"][e].items()
                },
            ),
        )
    return out


def issued_markdown(content: dict) -> str:
    """The table of the issued guarantee beside the marginal rule (``issued_rows``)."""
    setup, rows = content["setup"], content.get("issued") or {}
    sigma = setup["sigma"]
    lines = [
        "| ε | guarantee | r* | one-pass acc. | share certified | over-radius among certified (allowed) | "
        "over-radius, all images | hybrid acc. | hybrid evals/query |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e, both in rows.items():
        issued, marginal = both["issued"], both["marginal"]
        for name, one_pass, hybrid in (
            ("marginal", marginal["one_pass"], marginal["hybrid"]),
            ("issued", issued, issued["hybrid"]),
        ):
            lines.append(
                f"| {e} | {name} | best | {100 * one_pass['certified_accuracy'][f'{sigma:g}']:.1f} (at σ) | "
                f"{100 * one_pass['certified_share']:.1f}% | {one_pass['over_radius']}/"
                f"{one_pass['certified_images']} ({one_pass['over_radius_allowance_among_certified']}) | "
                f"{one_pass['over_radius']}/{setup['test_images']} | "
                f"{100 * hybrid['certified_accuracy'][f'{sigma:g}']:.1f} (at σ) | "
                f"{hybrid['mean_evaluations']:,.1f} |"
            )
        for s, r in issued["required_radius"].items():
            for name, one_pass, hybrid in (
                ("marginal", marginal["required_radius"][s]["one_pass"], marginal["required_radius"][s]["hybrid"]),
                ("issued", r, r["hybrid"]),
            ):
                lines.append(
                    f"| {e} | {name} | {s}σ | {100 * one_pass['certified_accuracy']:.1f} | "
                    f"{100 * one_pass['certified_share']:.1f}% | {one_pass['below_reference']}/"
                    f"{one_pass['certified_images']} ({one_pass['over_radius_allowance_among_certified']}) | "
                    f"{one_pass['below_reference']}/{setup['test_images']} | "
                    f"{100 * hybrid['accuracy_at_required']:.1f} | {hybrid['mean_evaluations']:,.1f} |"
                )
    return "\n".join(lines)


def evaluate_hybrid(
    surrogate: Surrogate, calibration, data: OnePassData, base, cfg: OnePassConfig, required: float | None = None
) -> dict:
    """The hybrid on the test images, its sequential fallback run on the base model (best radius, or target
    mode at ``required``): certified accuracy, ACR, mean base-model evaluations per query, seconds."""
    smooth = SmoothedClassifier(
        base,
        surrogate.num_classes,
        cfg.sigma,
        device=cfg.device,
        batch_size=cfg.batch_size,
        seed=cfg.sampling_seed,
        noise_scheme=cfg.noise_scheme,
        off_grid="quantise",
    )
    hybrid = HybridCertifier(
        SurrogateCertifier(surrogate, calibration),
        EProcessCertifier(smooth, cfg.alpha, max_samples=cfg.max_samples, tolerance=cfg.tolerance),
    )
    t0 = time.perf_counter()
    certificates = hybrid.certify(data.x, required_radius=required, indices=data.indices)
    seconds = time.perf_counter() - t0
    prediction = np.array([c.prediction for c in certificates])
    radius = np.array([c.radius for c in certificates])
    samples = np.array([c.n_samples for c in certificates], dtype=float)
    methods = [c.method for c in certificates]
    radii = [s * cfg.sigma for s in cfg.radii_sigmas]
    row = dict(
        certified_accuracy=_accuracy(prediction, radius, data.labels, radii),
        acr=_acr(prediction, radius, data.labels),
        mean_evaluations=float(samples.mean()),
        surrogate_share=float(np.mean([m == "surrogate" for m in methods])),
        seconds=seconds,
    )
    if required is not None:
        row["accuracy_at_required"] = float(np.mean((prediction == data.labels) & (radius >= required - 1e-12)))
    return row


def cohen_row(data: OnePassData, cfg: OnePassConfig) -> dict:
    radii = [s * cfg.sigma for s in cfg.radii_sigmas]
    return dict(
        certified_accuracy=_accuracy(data.cohen_prediction, data.cohen_radius, data.labels, radii),
        acr=_acr(data.cohen_prediction, data.cohen_radius, data.labels),
        mean_evaluations=float(cfg.test_n0 + data.n),
    )


def run_onepass(
    cfg: OnePassConfig = ONEPASS_MNIST_CPU,
    workdir="surrogate-cert-onepass",
    *,
    out=None,
    cache_dir=None,
    extra_cache_dirs=(),
    progress: bool = False,
    quiet: bool = False,
    overwrite: bool = True,
) -> dict:
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
    content: dict = dict(
        cohen_10k=cohen_row(data, cfg), one_pass={}, hybrid={}, required_radius={}, frontier={}, levers={}
    )
    for epsilon in cfg.epsilons:
        _epsilon_rows(bench, content, surrogate, cal, sur_counts, data, base, epsilon)
    content["frontier"] = _frontier(bench, model, surrogate, cal, sur_counts, data)
    epsilon = cfg.epsilons[0]
    if cfg.controls:
        content["levers"].update(_control_levers(bench, model, train_files, sur_counts, cal, data))
    if cfg.issued:
        content["issued"] = issued_rows(bench, surrogate, cal, sur_counts, data, base, content)
    if cfg.cal_topup:
        topped = bench.topped_up(model, cal)
        c = bench.calibrations(surrogate, topped, epsilon, sur_counts, schemes=("pooled", "shifted"))
        content["levers"]["cal_topup"] = {s: evaluate_one_pass(surrogate, cal_, data, cfg) for s, cal_ in c.items()}
        content["levers"]["cal_topup"]["reference"] = c["pooled"].reference
    content["setup"] = _setup_record(cfg, model, data, cal, sur_counts, surrogate)
    content["seconds"] = dict(bench.seconds, total=time.perf_counter() - started)
    content["markdown"] = onepass_markdown(content)
    if content.get("issued"):
        content["markdown"] += "\n\nThe issued guarantee beside the marginal rule:\n\n" + issued_markdown(content)
    if out is not None:
        write_text_atomic(out, json.dumps(json_safe(content), indent=2, allow_nan=False), overwrite=overwrite)
    bench.say("\n" + content["markdown"])
    return content


def _epsilon_rows(bench: OnePassBench, content: dict, surrogate, cal, sur_counts, data, base, epsilon: float) -> None:
    """One epsilon's rows into ``content``: the one-pass certificate of each calibration scheme, the hybrid
    of the pooled and shifted ones, and the hybrid at each required radius."""
    cfg = bench.cfg
    sigma = cfg.sigma
    e = f"{epsilon:g}"
    calibrations = bench.calibrations(surrogate, cal, epsilon, sur_counts)
    content["one_pass"][e] = {s: evaluate_one_pass(surrogate, c, data, cfg) for s, c in calibrations.items()}
    bench.say(
        f"      epsilon={e}: one-pass "
        + ", ".join(
            f"{s} {100 * r['certified_accuracy'][f'{sigma:g}']:.1f}%@sigma ACR {r['acr']:.3f}"
            for s, r in content["one_pass"][e].items()
        )
    )
    content["hybrid"][e] = {
        s: bench.timed("hybrid", lambda c=c: evaluate_hybrid(surrogate, c, data, base, cfg))
        for s, c in calibrations.items()
        if s in ("pooled", "shifted")
    }
    content["required_radius"][e] = {
        f"{s:g}": bench.timed(
            "hybrid",
            lambda s=s, calibrations=calibrations: evaluate_hybrid(
                surrogate, calibrations["pooled"], data, base, cfg, required=s * sigma
            ),
        )
        for s in cfg.required_sigmas
    }
    for s, row in content["required_radius"][e].items():
        row["one_pass"] = content["one_pass"][e]["pooled"]["required_radius"][s]


def _frontier(bench: OnePassBench, model, surrogate, cal, sur_counts, data) -> dict:
    """Frontier: epsilon (calibration only) and unseen training images (retrained surrogates)."""
    cfg = bench.cfg
    frontier: dict = {}
    for epsilon in cfg.frontier_epsilons:
        c = bench.calibrations(surrogate, cal, epsilon, sur_counts, schemes=("pooled", "shifted"))
        frontier.setdefault("epsilon", {})[f"{epsilon:g}"] = {
            s: evaluate_one_pass(surrogate, cal_, data, cfg) for s, cal_ in c.items()
        }
    for images in cfg.frontier_images:
        files = [bench.counts(model, "surrogate", cfg.surrogate_n, limit=images)]
        sur = bench.surrogate(model, files, f"images{images}")
        c = bench.calibrations(sur, cal, cfg.epsilons[0], files[0], schemes=("pooled", "shifted"))
        frontier.setdefault("unseen_images", {})[str(images)] = {
            s: evaluate_one_pass(sur, cal_, data, cfg) for s, cal_ in c.items()
        }
    return frontier


def _control_levers(bench: OnePassBench, model, train_files, sur_counts, cal, data) -> dict:
    """The controls: a surrogate trained on images the base model saw, and one trained from random weights."""
    cfg = bench.cfg
    epsilon = cfg.epsilons[0]
    levers: dict = {}
    rows = int(read_attrs(sur_counts)["rows"])
    seen_files = [bench.counts(model, "train", cfg.surrogate_n, limit=rows)]
    variants = dict(
        seen_by_base=bench.surrogate(model, seen_files, "seen"),
        random_init=bench.surrogate(model, train_files, "random-init", init=False),
    )
    for name, sur in variants.items():
        c = bench.calibrations(sur, cal, epsilon, sur_counts, schemes=("pooled",))["pooled"]
        levers[name] = evaluate_one_pass(sur, c, data, cfg)
        levers[name]["surrogate_agrees_with_counts"] = c.diagnostics.get("surrogate_agrees_with_counts")
    return levers


def _setup_record(cfg: OnePassConfig, model, data, cal, sur_counts, surrogate) -> dict:
    """What the case ran on: the settings, the base model and surrogate, the image counts, the machine."""
    env = environment()
    return dict(
        dataset=cfg.dataset,
        sigma=cfg.sigma,
        alpha=cfg.alpha,
        alpha_mc=cfg.alpha_mc,
        base_model=model,
        noise_scheme=check_noise_scheme(cfg.noise_scheme),
        base_model_sha256=sha256_of(model),
        test_images=len(data.labels),
        cal_images=int(_rows(cal)),
        surrogate_images=int(_rows(sur_counts)),
        cohen_n=data.n,
        n0=cfg.test_n0,
        max_samples=cfg.max_samples,
        tolerance=cfg.tolerance,
        surrogate=dict(
            arch=surrogate.arch,
            init=surrogate.meta.get("init_mapping"),
            epochs=surrogate.meta.get("epochs_run"),
            kappa=surrogate.kappa,
            w=surrogate.w,
        ),
        device=cfg.device,
        torch_threads=torch.get_num_threads(),
        cpu_count=env["cpu_count"],
        load_average=list(os.getloadavg()),
        versions=env["versions"],
        config=dataclasses.asdict(cfg),
    )


def _rows(path) -> int:
    return int(read_attrs(path)["rows"])


def onepass_markdown(content: dict) -> str:
    """The README tables of the one-pass case."""
    setup = content["setup"]
    sigma = setup["sigma"]
    radii = list(content["cohen_10k"]["certified_accuracy"])
    head = (
        "| method | "
        + " | ".join(f"r={float(r) / sigma:g}σ" for r in radii)
        + " | ACR | evals/query | q^ | cap | over-radius (allowed) |"
    )
    rule = "| --- |" + " ---: |" * (len(radii) + 5)
    pct = lambda row: " | ".join(f"{100 * a:.1f}" for a in row["certified_accuracy"].values())  # noqa: E731
    noise = setup.get("noise_scheme", NOISE_SCHEME)
    lines = [
        f"{setup['dataset']}: {setup['test_images']} test images, noise {noise}, "
        f"sigma = {sigma}, alpha = {setup['alpha']}, "
        f"alpha_mc = {setup['alpha_mc']}; {setup['surrogate_images']} surrogate-split images, "
        f"{setup['cal_images']} cal images x {setup['config']['cal_n']:,}",
        "",
        head,
        rule,
    ]
    c = content["cohen_10k"]
    n = setup["cohen_n"]
    lines.append(
        f"| Cohen-{f'{n // 1000}k' if n % 1000 == 0 else n} | {pct(c)} | {c['acr']:.3f} | "
        f"{c['mean_evaluations']:,.0f} | | | |"
    )
    for e, schemes in content["one_pass"].items():
        for s, r in schemes.items():
            lines.append(
                f"| one-pass {s}, ε={e} | {pct(r)} | {r['acr']:.3f} | 0 | {r['q_hat']:.3f} | "
                f"{r['radius_cap']:.3f} | {r['over_radius']}/{setup['test_images']} ({r['over_radius_allowance']}) |"
            )
        for s, r in content["hybrid"].get(e, {}).items():
            lines.append(f"| hybrid {s}, ε={e} | {pct(r)} | {r['acr']:.3f} | {r['mean_evaluations']:,.1f} | | | |")
    lines += [
        "",
        "| required radius r* | ε | Cohen acc. | one-pass acc. (legacy rule R^ ≥ r*) | hybrid acc. | "
        "hybrid evals/query | share one-pass |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e, per_r in content["required_radius"].items():
        for s, r in per_r.items():
            cohen = content["cohen_10k"]["certified_accuracy"].get(f"{float(s) * sigma:g}")
            lines.append(
                f"| {s}σ | {e} | {'' if cohen is None else f'{100 * cohen:.1f}'} | "
                f"{100 * r['one_pass']['certified_accuracy']:.1f} "
                f"({100 * r['one_pass']['legacy_rule_accuracy']:.1f}) | "
                f"{100 * r['accuracy_at_required']:.1f} | {r['mean_evaluations']:,.1f} | "
                f"{100 * r['surrogate_share']:.1f}% |"
            )
    return "\n".join(lines)


__all__ = [
    "OnePassConfig",
    "ONEPASS_MNIST_CPU",
    "ONEPASS_MNIST_GPU",
    "ONEPASS_DIGITS",
    "ONEPASS_TINY",
    "run_onepass",
    "counts_key",
    "cached_counts",
    "evaluate_one_pass",
    "evaluate_hybrid",
    "onepass_markdown",
    "issued_rows",
    "issued_markdown",
    "among_certified",
]
