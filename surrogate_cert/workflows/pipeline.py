"""The whole pipeline on one dataset, start to finish: ``surrogate-cert quickstart``.

Stages (each writes files into one folder and is skipped when its output is already there and
was made from the same inputs and settings, so an interrupted or repeated run picks up where it
stopped)::

    train-base   -> base.pt           small CNN, Gaussian-noise augmentation at sigma (train split)
    datagen      -> train.h5 cal.h5 test.h5   MC counts (interrupted counts resume from their last row)
    train        -> surrogate.pt      soft-label cross-entropy on train.h5, started from base.pt
    calibrate    -> calibration.json  split conformal on cal.h5 (+ calibration-report.html)
    certify      -> hybrid.tsv        surrogate first, sequential fallback, on the test images
    cohen        -> cohen-10k.tsv     Cohen-10k on the same test images
    report       -> report.html       (+ report.md, report.json)

Cohen-10k is computed from ``test.h5``, whose ``n0 = 100`` selection and ``n = 10,000``
estimation counts are drawn from the same noise streams as ``CohenCertifier`` with the same seed
(noise is fixed by seed, dataset index, stream and sample number): the certificates are exactly
those of ``surrogate-cert cohen --n0 100 --n 10000``, and the same counts serve as the Monte Carlo
reference that checks the calibration on held-out images. Its wall time per query is the time
spent drawing those samples.

The surrogate follows the flow measured best on this data (``benchmarks/surrogate_training_data.py``):
it starts from the base model's weights and learns from 100 samples per image (as good as 10^4) of
the largest split it may see, ``train`` (750 images; the ``surrogate`` split's 250 unseen images
made larger offsets here, although unseen images win on MNIST, where there are 10,000 of them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import torch
from tqdm.auto import tqdm

from calibration.conformal import calibrate
from calibration.summary import offline_evaluations_from_counts
from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.models import load_model, train_base
from data_gen.store import ResumeMismatchError, find_shards, read_attrs, read_counts, remove_shards

from ..core import __version__
from ..core.certificate import Certificate, write_tsv
from ..core.cohen import certificates_from_counts
from ..core.errors import InvalidParameterError, OutputExistsError, StoreError
from ..core.files import write_text_atomic
from ..core.hashing import sha256_file
from ..core.smoothing import NOISE_SCHEME, check_noise_scheme, resolve_device
from ..deploy.hybrid import HybridCertifier
from .report import write_calibration_report, write_report
from .training import train_surrogate

MANIFEST = "quickstart.json"
"""Per-stage record in the output folder: the key of the inputs and settings, outputs, seconds."""


@dataclass(frozen=True)
class QuickstartConfig:
    """Sizes and parameters of the pipeline (defaults: the full digits run, under 5 minutes on 2 cores).

    ``*_n``: noisy samples per image for each split's counts; ``*_limit``: images used from a split
    (None = all); ``surrogate_data``: the split whose counts the surrogate learns from (``surrogate_n``
    samples each); ``test_n0``/``test_n``: Cohen's selection / estimation samples on the test images;
    ``init_from_base``: the surrogate starts from the base model's weights; ``threads``: torch's
    intra-op threads while the pipeline runs (None: torch's default); ``noise_scheme``: the noise of
    every count and sequential sample (``sound``: the sound scheme, the digits rounded to the 1/255 grid).
    """

    dataset: str = "digits"
    sigma: float = 0.25
    base_epochs: int | None = 20
    surrogate_data: str = "train"
    surrogate_n: int = 100
    surrogate_limit: int | None = None
    cal_n: int = 10_000
    cal_limit: int | None = None
    test_n0: int = 100
    test_n: int = 10_000
    test_limit: int | None = 100
    surrogate_epochs: int | None = None
    init_from_base: bool = True
    epsilon: float = 0.01
    alpha_mc: float = 0.001
    alpha: float = 0.001
    max_samples: int = 10_000
    seed: int = 0
    batch_size: int = 2048  # noisy samples per forward pass: the fastest with one thread for the digits CNN
    device: str = "auto"
    data_root: str | None = None
    threads: int | None = 1
    workers: int | None = None
    noise_scheme: str = NOISE_SCHEME

    def count_workers(self) -> int:
        """Processes that share the counts (``workers``; default one per CPU core, at most 4, and one
        on a GPU): each counts a strided share of every split's rows with one thread, the torchrun
        path on one machine. One thread per process: on a small CPU, OpenMP's hand-off between two
        threads costs more than a small model's forward pass (measured twice as slow under load)."""
        if self.workers is not None:
            return max(int(self.workers), 1)
        if resolve_device(self.device).type != "cpu":
            return 1
        return max(1, min(4, os.cpu_count() or 1))

    @property
    def cohen_label(self) -> str:
        return f"cohen-{self.test_n // 1000}k" if self.test_n % 1000 == 0 else f"cohen-{self.test_n}"


FULL = QuickstartConfig()

QUICK = QuickstartConfig(
    base_epochs=4,
    surrogate_n=100,
    surrogate_limit=300,
    cal_n=600,
    cal_limit=110,
    test_n0=20,
    test_n=300,
    test_limit=20,
    surrogate_epochs=6,
    max_samples=300,
    workers=1,
)
"""The reduced run (``quickstart --quick``; the CI end-to-end check): under a minute on 2 cores."""


# --------------------------------------------------------------------------- stage bookkeeping


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_key(path: Path) -> str:
    return sha256_file(path)


class _Manifest:
    """``quickstart.json``: which stage made which outputs from which inputs, and how long it took."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("stages", {})

    def done(self, stage: str, key: str, outputs: list[Path]) -> bool:
        """Made from these inputs and settings, and every output still as the stage left it."""
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("key") != key:
            return False
        recorded = entry.get("outputs", {})
        return all(p.exists() and recorded.get(p.name) == _file_key(p) for p in outputs)

    def seconds(self, stage: str) -> float | None:
        entry = self.data["stages"].get(stage)
        return entry.get("seconds") if entry else None

    def record(self, stage: str, key: str, seconds: float, **extra) -> None:
        self.data["stages"][stage] = dict(key=key, seconds=seconds, **extra)
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, default=str))


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


# --------------------------------------------------------------------------- the pipeline


class Pipeline:
    """The stages of the quickstart over one folder, each skipped when already done (see module doc).

    ``offline()`` makes base.pt, train.h5 (``surrogate_data``), cal.h5, surrogate.pt and calibration.json
    (what a deployment needs; ``bench`` reuses it); ``quickstart()`` adds the test counts, the hybrid and
    Cohen results and the reports.

    The folder is the pipeline's own: a folder that already holds files is refused unless ``resume``
    (continue it: finished stages are reused, an interrupted counts file resumes) or ``overwrite``
    (redo every stage, replacing what is there).
    """

    FILES = (
        "base.pt",
        "train.h5",
        "surrogate.h5",
        "cal.h5",
        "test.h5",
        "surrogate.pt",
        "calibration.json",
        "calibration-report.html",
        "hybrid.tsv",
        "report.html",
    )

    def __init__(
        self,
        out: str | os.PathLike,
        config: QuickstartConfig = FULL,
        *,
        progress: bool = True,
        quiet: bool = False,
        command: str | None = None,
        total_stages: int = 9,
        resume: bool = True,
        overwrite: bool = False,
    ):
        self.folder = Path(out)
        if self.folder.exists() and not self.folder.is_dir():
            raise InvalidParameterError(f"--out {self.folder} is a file; give a folder for the quickstart's outputs")
        if not (resume or overwrite) and self.folder.is_dir() and any(self.folder.iterdir()):
            raise OutputExistsError(
                f"{self.folder} already holds files; pass --resume to continue the pipeline there "
                "(finished stages are reused), --overwrite to redo every stage, or choose another --out"
            )
        self.overwrite = overwrite
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidParameterError(
                f"cannot create output folder {self.folder} ({exc.strerror}); choose another --out"
            ) from None
        if not os.access(self.folder, os.W_OK):
            raise InvalidParameterError(f"output folder {self.folder} is not writable; choose another --out")
        self.cfg = config
        self.progress = progress
        self.quiet = quiet
        self.command = command or "surrogate_cert.pipeline.quickstart()"
        self.total_stages = total_stages
        self.manifest = _Manifest(self.folder)
        if overwrite:
            self.manifest.data["stages"] = {}  # nothing is reused
        self.manifest.data["config"] = dataclasses.asdict(config)
        self.paths = {name: self.folder / name for name in self.FILES}
        # the report labels each curve by its file name
        self.paths["cohen.tsv"] = self.folder / f"{config.cohen_label}.tsv"
        self.timings: dict[str, float | str] = {}
        self.started = time.perf_counter()

    @property
    def surrogate_counts(self) -> Path:
        """The counts file the surrogate learns from (``QuickstartConfig.surrogate_data``)."""
        return self.paths[f"{self.cfg.surrogate_data}.h5"]

    def say(self, message: str) -> None:
        _say(message, self.quiet)

    def stage(self, name: str, key: str, outputs: list[Path], run: Callable[[], dict | None], what: str) -> None:
        """Run ``run`` unless ``outputs`` were made by a run with the same ``key``; record it."""
        number = len(self.timings) + 1
        if self.manifest.done(name, key, outputs):
            self.timings[name] = "reused"
            self.say(f"[{number}/{self.total_stages}] {name}: reused {', '.join(p.name for p in outputs)}")
            return
        self.say(f"[{number}/{self.total_stages}] {name}: {what}")
        t0 = time.perf_counter()
        extra = run() or {}
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        self.manifest.record(name, key, seconds, outputs={p.name: _file_key(p) for p in outputs}, **extra)

    # ------------------------------------------------------------------ offline stages
    def offline(self, test_counts: bool = False) -> None:
        """Base model, surrogate / cal counts (and the test split's, with ``test_counts``: counted in the
        same worker processes), surrogate, calibration."""
        cfg = self.cfg
        self._train_base_stage()
        jobs = [(cfg.surrogate_data, cfg.surrogate_n, 0, cfg.surrogate_limit), ("cal", cfg.cal_n, 0, cfg.cal_limit)]
        if test_counts:
            jobs.append(("test", cfg.test_n, cfg.test_n0, cfg.test_limit))
        self.counts_together(jobs)
        self._train_stage()
        self._calibrate_stage()

    def _train_base_stage(self) -> None:
        """The base model: a small CNN trained with noise augmentation (skipped when its outputs are current)."""
        cfg, paths = self.cfg, self.paths

        def run_base():
            metrics = train_base(
                dataset=cfg.dataset,
                sigma=cfg.sigma,
                out=str(paths["base.pt"]),
                epochs=cfg.base_epochs,
                seed=cfg.seed,
                data_root=cfg.data_root,
                device=cfg.device,
                progress=self.progress,
            )
            self.say(f"      noisy test accuracy {metrics['noisy_test_accuracy']:.3f} at sigma {cfg.sigma}")
            return dict(noisy_test_accuracy=metrics["noisy_test_accuracy"])

        self.stage(
            "train-base",
            _key("base", cfg.dataset, cfg.sigma, cfg.base_epochs, cfg.seed),
            [paths["base.pt"]],
            run_base,
            f"small CNN on {cfg.dataset} with noise augmentation at sigma={cfg.sigma}",
        )

    def _train_stage(self) -> None:
        """The surrogate, trained on the surrogate split's counts (skipped when its outputs are current)."""
        cfg, paths = self.cfg, self.paths

        def run_train():
            surrogate = train_surrogate(
                self.surrogate_counts,
                paths["surrogate.pt"],
                epochs=cfg.surrogate_epochs,
                seed=cfg.seed,
                data_root=cfg.data_root,
                device=cfg.device,
                init_from_base=str(paths["base.pt"]) if cfg.init_from_base else None,
                progress=self.progress,
            )
            self.say(
                f"      fallback prior: kappa={surrogate.kappa:g}, w={surrogate.w:g} (tuned on held-out "
                f"{cfg.surrogate_data}-split counts)"
            )

        self.stage(
            "train",
            _key(
                "train",
                _file_key(self.surrogate_counts),
                _file_key(paths["base.pt"]),
                cfg.surrogate_epochs,
                cfg.init_from_base,
                cfg.seed,
            ),
            [paths["surrogate.pt"]],
            run_train,
            f"surrogate on {self.surrogate_counts.name} (soft-label cross-entropy), "
            + ("started from base.pt" if cfg.init_from_base else "from random weights"),
        )

    def _calibrate_stage(self) -> None:
        """The calibration on the cal split's counts (skipped when its outputs are current)."""
        cfg, paths = self.cfg, self.paths

        def run_calibrate():
            calibration = calibrate(
                str(paths["surrogate.pt"]),
                str(paths["cal.h5"]),
                cfg.epsilon,
                cfg.alpha_mc,
                data_root=cfg.data_root,
                device=cfg.device,
            )
            calibration.save(paths["calibration.json"])
            self.say(
                f"      q^ = {calibration.pooled_offset:.4f} (radius offset); the surrogate certifies "
                f"{100 * calibration.diagnostics.get('certified_share', float('nan')):.1f}% of the "
                "calibration images"
            )

        self.stage(
            "calibrate",
            _key("calibrate", _file_key(paths["surrogate.pt"]), _file_key(paths["cal.h5"]), cfg.epsilon, cfg.alpha_mc),
            [paths["calibration.json"]],
            run_calibrate,
            f"split conformal on cal.h5, epsilon={cfg.epsilon}, alpha_mc={cfg.alpha_mc}",
        )

    def counts(self, split: str, n: int, n0: int, limit: int | None) -> None:
        """``datagen`` for one split (resumed where an interrupted run of the same settings stopped)."""
        self.counts_together([(split, n, n0, limit)])

    def counts_together(self, jobs: list[tuple[str, int, int, int | None]]) -> None:
        """``datagen`` for several splits ``(split, n, n0, limit)``: in this process, or, with more than one
        ``count_workers()``, in that many processes started once for every split still to do."""
        cfg, base = self.cfg, self.paths["base.pt"]
        pending = []
        for split, n, n0, limit in jobs:
            target = self.paths[f"{split}.h5"]
            key = _key(
                "datagen",
                cfg.dataset,
                split,
                n,
                n0,
                limit,
                cfg.sigma,
                cfg.seed,
                _file_key(base),
                *(() if cfg.noise_scheme == NOISE_SCHEME else (check_noise_scheme(cfg.noise_scheme),)),
            )
            what = f"{'all' if limit is None else limit} {split} images x {n:,} noisy samples" + (
                f" (+ {n0} selection samples: Cohen's n0)" if n0 else ""
            )
            if self.manifest.done(f"datagen {split}", key, [target]):
                self.stage(f"datagen {split}", key, [target], lambda: None, what)  # says "reused"
            else:
                pending.append((split, n, n0, limit, target, key, what))
        workers = cfg.count_workers()
        if workers == 1 or not pending:
            for split, n, n0, limit, target, key, what in pending:
                run = functools.partial(
                    _run_datagen,
                    cfg,
                    split,
                    n,
                    n0,
                    limit,
                    target,
                    base,
                    self.progress,
                    self.command,
                    fresh=self.overwrite,
                )
                self.stage(f"datagen {split}", key, [target], run, what)
            return
        for number, (split, *_, what) in enumerate(pending, start=len(self.timings) + 1):
            self.say(
                f"[{number}/{self.total_stages}] datagen {split}: {what}"
                + (f" ({workers} processes)" if number == len(self.timings) + 1 else "")
            )
        specs = [
            dict(split=split, n=n, n0=n0, limit=limit, out=str(target)) for split, n, n0, limit, target, _, _ in pending
        ]
        seconds = _count_in_workers(cfg, specs, str(base), workers, self.progress, self.command, fresh=self.overwrite)
        for (split, n, n0, _, target, key, _), spent in zip(pending, seconds):
            attrs = read_attrs(target)
            self.timings[f"datagen {split}"] = spent
            self.manifest.record(
                f"datagen {split}",
                key,
                spent,
                outputs={target.name: _file_key(target)},
                rows=int(attrs["rows"]),
                n=n,
                n0=n0,
                evaluations=int(attrs["rows"]) * (n + n0),
                workers=workers,
            )

    # ------------------------------------------------------------------ online stages
    def certify_hybrid(self) -> None:
        cfg, paths = self.cfg, self.paths
        key = _key(
            "certify",
            *(_file_key(paths[f]) for f in ("base.pt", "surrogate.pt", "calibration.json", "test.h5")),
            cfg.alpha,
            cfg.max_samples,
        )
        self.stage(
            "certify",
            key,
            [paths["hybrid.tsv"]],
            lambda: _run_hybrid(cfg, paths, self.progress, self.command),
            f"hybrid on the test images (surrogate, then sequential with alpha={cfg.alpha}, "
            f"at most {cfg.max_samples:,} samples)",
        )

    def cohen(self) -> None:
        cfg, paths = self.cfg, self.paths
        seconds = self.manifest.seconds("datagen test")
        # The key names the inputs only: the time column (datagen seconds) is not an input.
        self.stage(
            "cohen",
            _key("cohen", _file_key(paths["test.h5"]), cfg.alpha),
            [paths["cohen.tsv"]],
            lambda: _run_cohen(cfg, paths, seconds, self.command),
            f"{cfg.cohen_label} on the same test images (n0={cfg.test_n0}, n={cfg.test_n:,}, alpha={cfg.alpha})",
        )

    def reports(self) -> dict[str, str]:
        """report.html (+ .md, .json) and calibration-report.html; always rewritten (cheap)."""
        cfg, paths = self.cfg, self.paths
        self.say(
            f"[{len(self.timings) + 1}/{self.total_stages}] report: certified accuracy, cost, calibration, amortisation"
        )
        t0 = time.perf_counter()
        write_calibration_report(
            paths["calibration.json"],
            paths["calibration-report.html"],
            counts=paths["test.h5"],
            surrogate=paths["surrogate.pt"],
            data_root=cfg.data_root,
        )
        offline = offline_evaluations_from_counts([self.surrogate_counts, paths["cal.h5"]])
        report_paths = write_report(
            [paths["cohen.tsv"], paths["hybrid.tsv"]],
            paths["report.html"],
            calibration=paths["calibration.json"],
            counts=paths["test.h5"],
            surrogate=paths["surrogate.pt"],
            offline_evaluations=offline,
            baseline=paths["cohen.tsv"].stem,
            data_root=cfg.data_root,
        )
        self.timings["report"] = time.perf_counter() - t0
        return report_paths


def quickstart(
    out: str | os.PathLike = "surrogate-cert-quickstart",
    config: QuickstartConfig = FULL,
    *,
    progress: bool = True,
    quiet: bool = False,
    command: str | None = None,
    resume: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) every stage into folder ``out``; returns the summary (also in quickstart.json).

    The summary holds, per method, certified accuracy at radii 0, 0.25, ..., 1.0 (l2, input units),
    mean base-model evaluations per query, images per second, the speed-up of the hybrid over
    Cohen, the break-even number of queries, the seconds of each stage and the paths of every
    output.

    Parameters
    ----------
    out : str or os.PathLike, optional
        The output folder (created if missing).
    config : QuickstartConfig, optional
        Sizes and parameters; default ``FULL`` (``QUICK`` for the reduced run).
    progress : bool, optional
        Show progress bars.
    quiet : bool, optional
        Print nothing.
    command : str, optional
        The command line recorded in the outputs' provenance.
    resume : bool, optional
        Continue a folder that already holds files (default, the Python API's behaviour; the command
        line asks for ``--resume``): finished stages are reused.
    overwrite : bool, optional
        Redo every stage, replacing the folder's outputs.

    Returns
    -------
    dict
        ``config``, ``methods``, ``speedup``, ``break_even_queries``, ``offline_evaluations``,
        ``calibration_check``, ``stage_seconds``, ``total_seconds`` and ``paths``.

    Raises
    ------
    InvalidParameterError
        If ``out`` cannot be created or written.
    OutputExistsError
        If ``out`` already holds files and neither ``resume`` nor ``overwrite`` is set.
    SurrogateCertError
        Any typed error of a stage (``DatasetError``, ``ModelError``, ``StoreError``,
        ``CalibrationError``, ...).
    """
    run = Pipeline(out, config, progress=progress, quiet=quiet, command=command, resume=resume, overwrite=overwrite)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        run.offline(test_counts=True)
        run.certify_hybrid()
        run.cohen()
        report_paths = run.reports()
    finally:
        torch.set_num_threads(threads)
    summary = _summary(report_paths["json"], config, run.timings, time.perf_counter() - run.started)
    summary["paths"] = {
        **{k: str(v) for k, v in run.paths.items()},
        **{f"report.{k}": v for k, v in report_paths.items() if k != "warnings"},
    }
    run.manifest.data["summary"] = summary
    run.manifest.save()
    run.say(format_summary(summary))
    return summary


def _run_datagen(
    cfg: QuickstartConfig,
    split: str,
    n: int,
    n0: int,
    limit,
    target: Path,
    base: Path,
    progress: bool,
    command: str,
    fresh: bool = False,
) -> dict:
    """Counts for one split; an interrupted file of the same settings is resumed (unless ``fresh``), any
    other replaced."""
    kwargs = dict(
        n0=n0,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        limit=limit,
        device=cfg.device,
        data_root=cfg.data_root,
        progress=progress,
        command=command,
        noise_scheme=cfg.noise_scheme,
    )
    resume = target.exists() and not fresh
    if resume:
        try:
            read_attrs(target)
        except StoreError:
            resume = False  # not a sound counts file (e.g. a crash before the first commit): start again
    try:
        generate_counts(
            cfg.dataset, split, str(base), cfg.sigma, n, str(target), resume=resume, overwrite=True, **kwargs
        )
    except ResumeMismatchError:
        # Made with other settings or another base model: start again. Any other store error (a
        # second writer holding the lock, an unwritable folder) propagates and nothing is replaced.
        generate_counts(
            cfg.dataset, split, str(base), cfg.sigma, n, str(target), resume=False, overwrite=True, **kwargs
        )
    attrs = read_attrs(target)
    return dict(rows=int(attrs["rows"]), n=n, n0=n0, evaluations=int(attrs["rows"]) * (n + n0))


def _count_in_workers(
    cfg: QuickstartConfig, jobs: list[dict], base: str, workers: int, progress: bool, command: str, fresh: bool = False
) -> list[float]:
    """Count every job's split in ``workers`` processes (the torchrun path on this machine); seconds per job.

    Each process takes the rows ``rank, rank + W, ...`` of every split into its shard, and rank 0 merges
    them (``data_gen.generate``): the files are those of a one-process run. What a job left behind
    that cannot be continued (a file of another run, shards of another process count, or ``fresh``)
    is removed first: the folder is the pipeline's own. A worker's error is raised here, typed.
    """
    for job in jobs:
        _clear_for_workers(job["out"], workers, fresh)
        job["resume"] = workers in find_shards(job["out"])  # continue this job's shards, else start them
    try:
        return _spawn_counts(cfg, jobs, base, workers, progress, command)
    except ResumeMismatchError:
        # Shards of the same process count but other settings (another base model, sample size): again.
        for job in jobs:
            _clear_for_workers(job["out"], workers, fresh=True)
            job["resume"] = False
        return _spawn_counts(cfg, jobs, base, workers, progress, command)


def _clear_for_workers(out: str, workers: int, fresh: bool) -> None:
    for size in find_shards(out):
        if fresh or size != workers:
            remove_shards(out, size)
    if os.path.exists(out):
        os.unlink(out)  # the stage is not done (else it was reused): a stale or one-process partial file


MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}
"""glibc's allocator settings for the counting processes (ignored elsewhere). By default every noise batch
of a few hundred KB is mapped from the kernel and handed back, so each one page-faults afresh: on the
digits CNN that was a quarter of the counting CPU time in the kernel (60 million minor faults in one
quickstart), and keeping the memory cut a single process's time per sample by 25-45%."""


def _spawn_counts(
    cfg: QuickstartConfig, jobs: list[dict], base: str, workers: int, progress: bool, command: str
) -> list[float]:
    # Fresh interpreters (``python -m surrogate_cert.workflows.count_worker``), not multiprocessing: a
    # caller's script is never re-imported, and no process forks one that holds torch's threads.
    port = _free_port()
    # The workers import this package from where this process did, whatever put it on sys.path here.
    root = str(Path(__file__).resolve().parents[2])
    python_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    spec = dict(
        jobs=jobs,
        base=base,
        dataset=cfg.dataset,
        sigma=cfg.sigma,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        data_root=cfg.data_root,
        command=command,
        progress=progress,
        noise_scheme=cfg.noise_scheme,
    )
    with tempfile.TemporaryDirectory(prefix="surrogate-cert-workers-") as folder:
        processes = []
        for rank in range(workers):
            env = dict(MALLOC_SETTINGS, **os.environ)  # the caller's own settings win
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(workers),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(workers),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=python_path,
            )
            result = os.path.join(folder, f"rank{rank}.json")
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "surrogate_cert.workflows.count_worker", json.dumps(spec), result],
                        # Rank 0 speaks for all (progress bar, its shard line); every error comes back through `result`.
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL if rank else None,
                        stderr=subprocess.DEVNULL if rank else None,
                    ),
                    result,
                )
            )
        try:
            codes = [process.wait() for process, _ in processes]
        except BaseException:  # Ctrl-C: the workers got it too and commit their rows; wait for them
            for process, _ in processes:
                process.wait()
            raise
        reports = []
        for (_, result), code in zip(processes, codes):
            try:
                with open(result, encoding="utf-8") as fh:
                    reports.append(json.load(fh))
            except (OSError, ValueError):
                reports.append(
                    dict(
                        seconds=[],
                        error=dict(
                            type="StoreError",
                            message=(
                                f"a counting process stopped (exit code {code}); committed rows are kept: "
                                "run the quickstart again with --resume"
                            ),
                        ),
                    )
                )
    errors = [r["error"] for r in reports if r.get("error")]
    if errors:
        first = next((e for e in errors if not e.get("silent")), errors[0])
        raise _typed_error(first["type"], first["message"])
    return reports[0]["seconds"]


def _typed_error(name: str, message: str) -> Exception:
    """The project's error type of that name (``core.errors`` or the store's), else ``SurrogateCertError``."""
    from data_gen import store

    from ..core import errors

    kind = getattr(errors, name, None) or getattr(store, name, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.SurrogateCertError)):
        kind = errors.SurrogateCertError
    return kind(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def provenance(command: str, method: str, **fields) -> dict:
    """The ``.meta.json`` of a results file: command, method, versions, then the run's fields."""
    return dict(
        command=command,
        method=method,
        package_version=__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        scipy=scipy.__version__,
        **fields,
    )


def _meta(cfg: QuickstartConfig, command: str, method: str, **fields) -> dict:
    return provenance(
        command,
        method,
        dataset=cfg.dataset,
        split="test",
        limit=cfg.test_limit,
        sigma=cfg.sigma,
        seed=cfg.seed,
        alpha=cfg.alpha,
        device=str(resolve_device(cfg.device)),
        noise_scheme=check_noise_scheme(cfg.noise_scheme),
        **fields,
    )


def _run_hybrid(cfg: QuickstartConfig, paths: dict, progress: bool, command: str) -> dict:
    test = read_counts(paths["test.h5"])
    data = load_split(cfg.dataset, "test", data_root=cfg.data_root, limit=cfg.test_limit).take(test.indices)
    base = load_model(str(paths["base.pt"]), device=cfg.device)
    hybrid = HybridCertifier.load(
        str(paths["surrogate.pt"]),
        str(paths["calibration.json"]),
        base_model=base.model,
        alpha=cfg.alpha,
        max_samples=cfg.max_samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        off_grid="quantise",
    )
    certificates: list[Certificate] = []
    chunk = 50
    bar = tqdm(total=len(data), unit="img", desc="certify", disable=not progress, dynamic_ncols=True)
    for lo in range(0, len(data), chunk):
        hi = min(lo + chunk, len(data))
        certificates += hybrid.certify(data.x[lo:hi], indices=data.indices[lo:hi])
        bar.update(hi - lo)
    bar.close()
    write_tsv(
        paths["hybrid.tsv"],
        data.indices,
        data.y.numpy(),
        certificates,
        meta=_meta(
            cfg,
            command,
            "hybrid",
            surrogate="surrogate.pt",
            calibration="calibration.json",
            fallback="eprocess",
            max_samples=cfg.max_samples,
        ),
    )
    return dict(inputs=len(certificates))


def _run_cohen(cfg: QuickstartConfig, paths: dict, datagen_seconds: float | None, command: str) -> dict:
    test = read_counts(paths["test.h5"])
    seconds = (datagen_seconds or 0.0) / max(len(test), 1)
    certificates = certificates_from_counts(
        test.counts_select, test.counts, cfg.alpha, float(test.attrs["sigma"]), seconds, slack=test.radius_slack
    )
    write_tsv(
        paths["cohen.tsv"],
        test.indices,
        test.labels,
        certificates,
        meta=_meta(
            cfg,
            command,
            cfg.cohen_label,
            n0=int(test.attrs["n0"]),
            n=int(test.attrs["n"]),
            note="Cohen et al. CERTIFY from test.h5, the noise streams of `surrogate-cert cohen` "
            "with the same seed; time = datagen seconds per image",
        ),
    )
    return dict(inputs=len(certificates))


# --------------------------------------------------------------------------- summary

SUMMARY_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def _summary(report_json: str, cfg: QuickstartConfig, timings: dict, total_seconds: float) -> dict:
    report = json.loads(Path(report_json).read_text())
    radii = report["radii"]
    methods = {}
    for label, run in report["runs"].items():
        methods[label] = dict(
            inputs=run["num_inputs"],
            certified_accuracy={
                f"{r:g}": run["certified_accuracy"][radii.index(r)] for r in SUMMARY_RADII if r in radii
            },
            acr=run["acr"],
            mean_evaluations_per_query=run["samples"]["all"]["mean"] if run["samples"]["all"] else None,
            images_per_second=run["images_per_second"],
            share_by_method=run["share_by_method"],
        )
    am = report["amortisation"] or {}
    hybrid = (am.get("per_run") or {}).get("hybrid", {})
    return dict(
        config=dataclasses.asdict(cfg),
        methods=methods,
        speedup=hybrid.get("speedup"),
        break_even_queries=hybrid.get("break_even_queries"),
        offline_evaluations=am.get("offline_evaluations"),
        calibration_check=(report.get("calibration") or {}).get("check", {})
        and {k: v for k, v in report["calibration"]["check"].items() if k != "points"},
        stage_seconds=timings,
        total_seconds=total_seconds,
    )


def format_summary(summary: dict) -> str:
    """The short table printed at the end of the quickstart."""
    cfg = summary["config"]
    radii = list(next(iter(summary["methods"].values()))["certified_accuracy"]) if summary["methods"] else []
    width = max([len(m) for m in summary["methods"]] + [8])
    lines = [
        "",
        "certified accuracy at radius (l2, sigma = {:g}) and cost per query:".format(cfg["sigma"]),
        f"  {'method':<{width}}  " + "  ".join(f"{r:>6}" for r in radii) + "  evaluations/query  images/s",
    ]
    for label, m in summary["methods"].items():
        evals = m["mean_evaluations_per_query"]
        ips = m["images_per_second"]
        lines.append(
            f"  {label:<{width}}  "
            + "  ".join(f"{100 * a:5.1f}%" for a in m["certified_accuracy"].values())
            + f"  {'n/a' if evals is None else f'{evals:,.1f}':>17}  {'n/a' if ips is None else f'{ips:,.1f}':>8}"
        )
    inputs = next(iter(summary["methods"].values()))["inputs"] if summary["methods"] else 0
    lines.append(
        f"  on {inputs} test images"
        + (
            f" (the first {cfg['test_limit']} of the test split, to keep Cohen within the time budget)"
            if cfg["test_limit"]
            else ""
        )
    )
    if summary.get("speedup"):
        text = (
            f"speed-up: the hybrid spends {summary['speedup']:,.1f}x fewer base-model evaluations per query than Cohen"
        )
        if summary.get("break_even_queries"):
            text += (
                f"; the offline stage ({summary['offline_evaluations']:,} evaluations) pays for itself after "
                f"{summary['break_even_queries']:,.0f} queries"
            )
        lines.append(text)
    check = summary.get("calibration_check")
    if check:
        lines.append(
            f"calibration check on the test images: {check['num_above']} of {check['num_images']} calibrated "
            f"radii above the MC reference (allowed by the bound epsilon={check['bound']}: "
            f"{check['allowance']})"
        )
    spent = ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.0f} s'}" for k, v in summary["stage_seconds"].items())
    lines.append(f"time: {summary['total_seconds']:.0f} s ({spent})")
    lines.append(f"report: {summary['paths']['report.html'] if 'paths' in summary else ''}")
    return "\n".join(lines)


__all__ = ["QuickstartConfig", "FULL", "QUICK", "Pipeline", "quickstart", "format_summary", "provenance"]
