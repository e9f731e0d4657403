"""Offline Monte Carlo data generation: class counts of a base model under noise, for one split, in HDF5.

``generate_counts`` is the Python API behind ``surrogate-cert datagen``. Each image's noise comes from
its own generator seeded by ``(seed, dataset index, stream)`` (see ``surrogate_cert.core.smoothing``),
so the file's counts depend neither on ``batch_size``, nor on how often the job was interrupted and
resumed, nor on how many torchrun processes shared it: a resumed or merged file is identical to one
written in a single run.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm.auto import tqdm

from surrogate_cert.core import __version__
from surrogate_cert.core.errors import (
    InvalidParameterError,
    ModelError,
    StoreError,
    SurrogateCertError,
    check_count,
    check_seed,
    check_sigma,
)
from surrogate_cert.core.signing import resolve_key
from surrogate_cert.core.smoothing import (
    AMP_TOLERANCE,
    NOISE_SCHEME,
    SOUND_SCHEMES,
    STREAM_ESTIMATE,
    STREAM_SELECT,
    SmoothedClassifier,
    check_noise_scheme,
    grid_shift,
)

from .datasets import SplitData, load_split
from .distributed import SINGLE, Shard
from .models import check_model_fits, load_model
from .store import (
    CountsWriter,
    check_counts_for,
    check_no_shards,
    check_sharded_job,
    lock_counts_file,
    merge_shards,
    open_shard,
    read_counts,
    recorded_noise_scheme,
    remove_shards,
    sign_counts,
    write_topup,
)

BATCHES_PER_CALL = 8
"""Forward batches per engine call: progress updates this often; the last batch of a call may be partial."""

COMMIT_SECONDS = 2.0
"""Default time between commits: an interruption loses at most this much work."""

AMP_CHECK_IMAGES = 8
AMP_CHECK_SAMPLES = 1024
"""``--amp bf16`` is checked against float32 on this many of the split's first images and samples each."""


def _first_error(step):
    """``(step(), None)``, or ``(None, error)`` if it raised a SurrogateCertError (to share with the other ranks)."""
    try:
        return step(), None
    except SurrogateCertError as exc:
        return None, exc


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def generate_counts(
    dataset: str,
    split: str,
    model_spec: str,
    sigma: float,
    n: int,
    out: str,
    *,
    n0: int = 0,
    batch_size: int | str = 1000,
    seed: int = 0,
    limit: int | None = None,
    device: str | torch.device | None = None,
    amp: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    commit_seconds: float = COMMIT_SECONDS,
    command: str | None = None,
    noise_scheme: str | None = None,
    channels_last: bool | None = None,
    compile: bool | str = False,
    shard: Shard | None = None,
    key: bytes | str | None = None,
) -> str:
    """Write ``out``: the class counts of ``n`` noisy evaluations of the base model per image of ``split``.

    For every image, ``counts`` holds the class counts of ``n`` noisy evaluations (stream
    ``STREAM_ESTIMATE``) and, if ``n0 > 0``, ``counts_select`` those of ``n0`` more from the
    independent selection stream (``STREAM_SELECT``). Refuses an existing ``out`` unless
    ``resume``; a resumed file must have been started with the same dataset, split, limit, model,
    sigma, n, n0, seed, noise scheme, device type and amp, and continues from its last committed
    row. Rows are committed at least every ``commit_seconds``; an interruption loses at most the
    rows since the last commit. Every failure is a one-line ``SurrogateCertError`` raised before
    any existing file is changed.

    Under torchrun (``shard`` from ``data_gen.distributed.launch``), process ``r`` of ``W`` counts the
    rows ``r, r + W, ...`` into its own shard file (``store.open_shard``, same rules), and rank 0
    merges the shards into ``out`` once all are complete (``store.merge_shards``): the same file a
    one-process run writes, but for the ``command`` and ``created_utc`` attributes.

    Parameters
    ----------
    dataset : str
        Dataset spec (``load_split``).
    split : {"train", "cal", "test"}
        The split to count.
    model_spec : str
        Base model spec (``load_model``).
    sigma : float
        Noise level (l2, input units), > 0.
    n : int
        Estimation samples per image (>= 1).
    out : str
        The HDF5 counts file to write.
    n0 : int, optional
        Selection samples per image (>= 0); 0 writes no ``counts_select``.
    batch_size : int or "auto", optional
        Noisy samples per forward pass (counts do not depend on it); ``"auto"``: the largest that
        fits (``SmoothedClassifier``).
    seed : int, optional
        Seed of the noise streams.
    limit : int, optional
        Count the first ``limit`` images of the split only.
    device : str, torch.device or None, optional
        Where the base model runs (under torchrun, ``cuda`` means ``cuda:LOCAL_RANK``).
    amp : {None, "bf16"}, optional
        bfloat16 autocast (recorded: a resume must use the same). Refused when, on the split's first
        ``AMP_CHECK_IMAGES`` images, it changes more than ``AMP_TOLERANCE`` of an image's
        predictions against float32 on the same noise; the largest share is recorded as
        ``amp_disagreement``.
    resume : bool, optional
        Continue an existing ``out`` (or its shards) made with the same settings.
    overwrite : bool, optional
        Start an existing ``out`` again from its first row (it is replaced once the new file is
        created); ignored with ``resume``.
    data_root : str, optional
        Folder of the torchvision datasets.
    download : bool, optional
        Download a missing torchvision dataset.
    progress : bool, optional
        Show a progress bar (rank 0's, under torchrun).
    commit_seconds : float, optional
        Most seconds between commits (>= 0).
    command : str, optional
        The command line recorded in the file.
    noise_scheme : str, optional
        ``NOISE_SCHEMES`` or an alias (``"sound"``); default: the one a resumed file records, else
        ``NOISE_SCHEME``. With the sound scheme, images off the 1/255 grid (``digits``: ``v / 16``) are
        counted rounded to it, and the file records how far they moved (``grid_shift_max``) and the
        radius slack of its counts (``noise_slack``).
    channels_last : bool, optional
        ``channels_last`` memory for the model (default: on for convolutional models on CUDA).
    compile : bool or str, optional
        ``torch.compile`` the model (``True`` or a backend name).
    shard : Shard, optional
        This process's part of a torchrun job (``data_gen.distributed.launch``); default one process.
    key : bytes or str, optional
        Signing key (default: the environment's, ``core.signing.resolve_key``): with one, the complete
        file is signed (``store.sign_counts``), so consumers with the key refuse any later edit.

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InvalidParameterError
        If ``sigma``, ``n``, ``n0``, ``batch_size``, ``limit``, ``commit_seconds`` or
        ``noise_scheme`` is out of range, ``n + n0`` does not fit uint32 counts, or there are more
        processes than images.
    DatasetError
        If the dataset cannot be loaded.
    ModelError
        If the model cannot be loaded, does not fit the dataset's images or classes, or bf16 changes
        too many of its predictions.
    StoreError
        If ``out`` exists without ``resume``, is locked by another writer (``StoreLockedError``),
        does not match the resume settings (``ResumeMismatchError``), cannot be written, or its
        shards are missing, unfinished or from another job (``ShardError``).
    InvalidInputError
        If ``amp`` or ``device`` is not usable.
    """
    shard = shard or SINGLE
    if shard.distributed and overwrite and not resume:
        raise InvalidParameterError(
            "--overwrite is not supported under torchrun: remove the old file (and its "
            "shards) first, or continue it with --resume"
        )

    secret = resolve_key(key)
    setup = functools.partial(
        _prepare_job,
        dataset,
        split,
        model_spec,
        sigma,
        n,
        out,
        n0=n0,
        batch_size=batch_size,
        seed=seed,
        limit=limit,
        device=device,
        amp=amp,
        resume=resume,
        data_root=data_root,
        download=download,
        commit_seconds=commit_seconds,
        command=command,
        noise_scheme=noise_scheme,
        channels_last=channels_last,
        compile=compile,
        shard=shard,
    )
    if not shard.distributed:
        job = setup()
        check_no_shards(out)
        with CountsWriter.open(
            out, indices=job.data.indices, labels=_labels(job.data), attrs=job.attrs, resume=resume, overwrite=overwrite
        ) as writer:
            _fill(writer, job.smooth, job.data, job.n, job.n0, job.smooth.batch_size, commit_seconds, progress)
        sign_counts(out, secret)
        return os.fspath(out)

    ready, error = _first_error(setup)
    shard.agree(error)
    _count_sharded(ready, out, shard, secret, resume=resume, commit_seconds=commit_seconds, progress=progress)
    return os.fspath(out)


@dataclass
class _Job:
    """What ``generate_counts`` counts, every argument checked: the images, the rows of this process
    (``positions`` into ``data``), the engine, the counts file's attributes, and the checked ``n`` / ``n0``."""

    data: SplitData
    positions: np.ndarray
    smooth: SmoothedClassifier
    attrs: dict
    n: int
    n0: int


def _prepare_job(
    dataset,
    split,
    model_spec,
    sigma,
    n,
    out,
    *,
    n0,
    batch_size,
    seed,
    limit,
    device,
    amp,
    resume,
    data_root,
    download,
    commit_seconds,
    command,
    noise_scheme,
    channels_last,
    compile,
    shard: Shard,
) -> _Job:
    """Check ``generate_counts``'s arguments, load the split and the model, build the engine and the
    file's attributes; nothing is written (under torchrun every rank runs it before any file is touched)."""
    sigma = check_sigma(sigma)
    check_seed(seed)
    n = check_count("n", n)
    n0 = check_count("n0", n0, minimum=0)
    if batch_size != "auto":
        check_count("batch_size", batch_size)
    if n + n0 >= 2**32:
        raise InvalidParameterError(f"n + n0 must be below 2**32 (counts are stored as uint32), got {n + n0}")
    if commit_seconds < 0 or not math.isfinite(commit_seconds):
        raise InvalidParameterError(f"commit_seconds must be a finite number >= 0, got {commit_seconds}")
    scheme = check_noise_scheme(noise_scheme or (resume and recorded_noise_scheme(out)) or NOISE_SCHEME)
    data = load_split(dataset, split, data_root=data_root, download=download, limit=limit)
    positions = shard.positions(len(data))
    here = shard.device(device)
    loaded = load_model(model_spec, device=here, num_classes=data.num_classes, input_shape=data.input_shape)
    data = _with_class_count(data, loaded, here)
    smooth = SmoothedClassifier(
        loaded.model,
        data.num_classes,
        sigma,
        device=here,
        batch_size=batch_size,
        amp=amp,
        seed=seed,
        noise_scheme=scheme,
        channels_last=channels_last,
        compile=compile,
        input_shape=data.input_shape,
        off_grid="quantise",
    )
    check_model_fits(smooth, data.x[:1], model_spec)
    attrs = _file_attrs(
        data,
        loaded,
        smooth,
        sigma=sigma,
        n=n,
        n0=n0,
        scheme=scheme,
        split=split,
        limit=limit,
        seed=seed,
        command=command,
        shard=shard,
    )
    return _Job(data, positions, smooth, attrs, n, n0)


def _file_attrs(
    data: SplitData,
    loaded,
    smooth: SmoothedClassifier,
    *,
    sigma,
    n,
    n0,
    scheme,
    split,
    limit,
    seed,
    command,
    shard: Shard,
) -> dict:
    """The counts file's attributes: what was counted, by which model and how (a resume must match them)."""
    attrs = {
        "sigma": sigma,
        "n": n,
        "n0": n0,
        "num_classes": data.num_classes,
        "seed": int(seed),
        "dataset": data.dataset,
        "split": split,
        "limit": limit,
        "model_sha256": loaded.sha256,
        "model_source": loaded.source,
        "package_version": __version__,
        "noise_scheme": scheme,
        "device_type": smooth.device.type,
        "amp": smooth.amp,
        "input_shape": list(data.input_shape),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": (command or "generate_counts()")
        + (f" [torchrun, {shard.world_size} processes]" if shard.distributed else ""),
    }
    if scheme in SOUND_SCHEMES:  # images off the 1/255 grid are counted rounded to it: say how far
        attrs["grid_shift_max"] = float(grid_shift(data.x).max()) if len(data) else 0.0
        attrs["noise_slack"] = smooth.radius_slack(data.input_shape)
    if smooth.amp:
        attrs["amp_disagreement"] = _check_amp(smooth, data)
    return attrs


def _count_sharded(
    job: _Job, out, shard: Shard, secret, *, resume: bool, commit_seconds: float, progress: bool
) -> None:
    """Under torchrun: rank 0 locks the job and checks it against what is on disk, every rank counts its
    rows into its own shard, and rank 0 merges the shards into ``out`` and signs it."""
    data, labels, attrs = job.data, _labels(job.data), job.attrs
    job_lock = None
    try:

        def preflight() -> bool:
            nonlocal job_lock
            if not shard.is_main:
                return False
            job_lock = lock_counts_file(out)
            return check_sharded_job(
                out, shard.world_size, indices=data.indices, labels=labels, attrs=attrs, resume=resume
            )

        done, error = _first_error(preflight)
        shard.agree(error)
        if shard.broadcast(done):
            if shard.is_main:
                remove_shards(out, shard.world_size)  # left over if a merge was cut short after linking out
                sign_counts(out, secret, lock_held=True)
            return
        writer, error = _first_error(
            lambda: open_shard(
                out, shard.rank, shard.world_size, indices=data.indices, labels=labels, attrs=attrs, resume=resume
            )
        )
        try:
            shard.agree(error)
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        with writer:
            print(
                f"datagen {shard.label}: {writer.path}: {writer.committed} of {writer.total} rows already "
                f"committed, counting {writer.total - writer.committed}",
                file=sys.stderr,
                flush=True,
            )
            mine = replace(
                data,
                x=data.x[torch.as_tensor(job.positions)],
                y=None if data.y is None else data.y[torch.as_tensor(job.positions)],
                indices=data.indices[job.positions],
            )
            _fill(
                writer,
                job.smooth,
                mine,
                job.n,
                job.n0,
                job.smooth.batch_size,
                commit_seconds,
                progress and shard.is_main,
            )
        shard.barrier()
        if shard.is_main:
            merge_shards(out, shard.world_size, indices=data.indices, labels=labels, attrs=attrs, lock_held=True)
            sign_counts(out, secret, lock_held=True)
    finally:
        if job_lock is not None:
            job_lock.release()


def _labels(data) -> np.ndarray | None:
    """The labels to store: None for an unlabeled pool (its counts file has no ``labels``)."""
    return None if data.y is None else data.y.numpy()


def _with_class_count(data, loaded, device):
    """``data`` with its class count: the dataset's, else (an unlabeled pool that declares none) the model's.

    A model that does not record it tells it by its output width on the first image.
    """
    if data.num_classes is not None:
        return data
    k = loaded.num_classes
    if k is None:
        with torch.inference_mode():
            out = loaded.model(data.x[:1].to(device))
        k = int(out.shape[-1]) if out.ndim == 2 else 0
    if k < 2:
        raise ModelError(f"the base model returns {k} class scores per image; a classifier needs at least 2")
    return replace(data, num_classes=int(k))


def _check_amp(smooth: SmoothedClassifier, data) -> float:
    """The largest share of predictions bf16 changes on the split's first images; ModelError above the tolerance."""
    rows = min(AMP_CHECK_IMAGES, len(data))
    shares = smooth.amp_disagreement(data.x[:rows], AMP_CHECK_SAMPLES, indices=data.indices[:rows])
    worst = float(shares.max())
    if worst > AMP_TOLERANCE:
        raise ModelError(
            f"bf16 autocast changes {worst:.1%} of the base model's noisy predictions on an image "
            f"(tolerance {AMP_TOLERANCE:.0%}); run without --amp"
        )
    return worst


def _fill(
    writer: CountsWriter,
    smooth: SmoothedClassifier,
    data,
    n: int,
    n0: int,
    batch_size: int,
    commit_seconds: float,
    progress: bool,
) -> None:
    total = writer.total
    per_call = max(1, (BATCHES_PER_CALL * batch_size) // (n + n0))
    pending: list[tuple[np.ndarray, np.ndarray | None]] = []
    last_commit = time.monotonic()
    started = time.perf_counter()
    done_samples = 0

    def commit() -> None:
        nonlocal pending, last_commit
        if pending:
            counts = np.concatenate([c for c, _ in pending])
            select = np.concatenate([s for _, s in pending]) if n0 else None
            writer.append(counts, select)
            pending = []
        last_commit = time.monotonic()

    def show_rate(refresh: bool) -> None:
        rate = done_samples / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} samples/s, committed {writer.committed}", refresh=refresh)

    bar = tqdm(
        total=total, initial=writer.committed, unit="img", desc="datagen", disable=not progress, dynamic_ncols=True
    )
    next_row = writer.committed
    try:
        while next_row < total:
            hi = min(next_row + per_call, total)
            x, idx = data.x[next_row:hi], data.indices[next_row:hi]
            select = smooth.counts(x, n0, indices=idx, stream=STREAM_SELECT) if n0 else None
            counts = smooth.counts(x, n, indices=idx, stream=STREAM_ESTIMATE)
            pending.append((counts, select))
            done_samples += (hi - next_row) * (n + n0)
            next_row = hi
            if time.monotonic() - last_commit >= commit_seconds:
                commit()
            bar.update(len(idx))
            show_rate(refresh=False)
        commit()
        show_rate(refresh=True)
    except KeyboardInterrupt:
        commit()  # pending rows are complete: keep them, so --resume loses nothing
        raise
    finally:
        bar.close()


TOPUP_RULES = ("all-agree",)
"""Which rows a top-up extends: ``all-agree``, the rows whose estimation samples so far all returned one class
(where the calibration's reference radius is capped by the sample size, not by the base model)."""


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def top_up_counts(
    path: str | os.PathLike,
    model_spec: str,
    extra: int,
    *,
    planned_max: int | None = None,
    rule: str = "all-agree",
    batch_size: int | str = 1000,
    device: str | torch.device | None = None,
    data_root: str | None = None,
    progress: bool = True,
    command: str | None = None,
    key: bytes | str | None = None,
) -> dict:
    """Draw ``extra`` more estimation samples for the rows of a complete counts file that ``rule`` picks.

    The samples continue each row's estimation stream (samples ``samples[i] .. samples[i] + extra - 1``,
    the engine's ``start``), so they are fresh and independent of the first ones, and a rerun draws the
    same. ``counts`` is left as it is (``n`` samples per row); the extra counts go to ``counts_topup``
    and the per-row total to ``samples`` (``store.write_topup``). A row never goes past ``planned_max``
    samples, the number the calibration's radius cap is computed from: fixed by the first top-up
    (default ``n + extra``) and kept by later ones, which continue the rows that still all agree.

    Which rows get more samples depends on their counts, so only an anytime-valid bound may use the
    extra samples (``stats.topup_reference_radius``); Cohen's bound and every other consumer keep
    reading ``counts`` alone.

    Parameters
    ----------
    path : str or os.PathLike
        A complete counts file.
    model_spec : str
        The base model the file was made with (checked by SHA-256).
    extra : int
        Samples to add per picked row (>= 1; fewer where ``planned_max`` is reached).
    planned_max : int, optional
        The most estimation samples any row may reach; default: the file's, else ``n + extra``.
    rule : {"all-agree"}, optional
        Which rows to extend (``TOPUP_RULES``).
    batch_size : int or "auto", optional
        Noisy samples per forward pass.
    device : str, torch.device or None, optional
        Where the base model runs; must be of the device type the file was made on (the noise of a
        sample depends on it).
    data_root : str, optional
        Folder of the torchvision datasets.
    progress : bool, optional
        Show a progress bar.
    command : str, optional
        The command line, recorded in the file's ``topup_history``.
    key : bytes or str, optional
        Signing key (default: the environment's): with one, the file must be signed before the top-up
        and is signed again after it.

    Returns
    -------
    dict
        ``rows`` topped up, ``samples`` drawn, ``planned_max``, ``seconds``.

    Raises
    ------
    InvalidParameterError
        If ``extra``, ``planned_max`` or ``rule`` is out of range.
    StoreError
        If the file is missing, incomplete, of another base model, noise scheme or device type, or is
        being written by another process.
    ModelError
        If the model cannot be loaded or does not fit.
    """
    extra = check_count("extra", extra)
    if rule not in TOPUP_RULES:
        raise InvalidParameterError(f"top-up rule must be one of {TOPUP_RULES}, got {rule!r}")
    started = time.perf_counter()
    secret = resolve_key(key)
    counts = read_counts(path)
    attrs = counts.attrs
    check_counts_for(counts, path, complete=True, key=secret)
    scheme = _replayable_scheme(path, attrs)
    n = counts.n
    planned_max = _planned_max(path, attrs, n, extra, planned_max)
    samples = counts.samples_per_row().copy()
    counts_topup = (counts.counts_topup if counts.counts_topup is not None else np.zeros_like(counts.counts)).copy()
    every = counts.counts + counts_topup
    picked = np.flatnonzero((every.max(axis=1) == samples) & (samples < planned_max))
    draw = np.minimum(extra, planned_max - samples[picked])
    smooth = _topup_engine(path, counts, model_spec, scheme, device=device, batch_size=batch_size)
    if picked.size:
        images = counts.images(data_root)
        check_model_fits(smooth, images[:1], model_spec)
        _draw_topup(smooth, counts, images, picked, draw, samples, counts_topup, extra=extra, progress=progress)
        samples[picked] += draw
    record = dict(
        rule=rule,
        extra=int(extra),
        rows=int(picked.size),
        samples_drawn=int(draw.sum()),
        planned_max=int(planned_max),
        command=command or "top_up_counts()",
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_topup(path, samples, counts_topup, planned_max=planned_max, rule=rule, record=record)
    sign_counts(path, secret)
    return dict(
        rows=int(picked.size),
        samples=int(draw.sum()),
        planned_max=int(planned_max),
        seconds=time.perf_counter() - started,
    )


def _replayable_scheme(path, attrs) -> str:
    """The noise scheme a counts file records, if this version can continue its streams (else StoreError)."""
    try:  # continue the file's own streams: the scheme it records (v1, v2, v3 or sound), never the default
        return check_noise_scheme(attrs.get("noise_scheme", ""))
    except InvalidParameterError:
        raise StoreError(
            f"{path} records noise scheme {attrs.get('noise_scheme')!r}, which this version cannot "
            f"replay: a top-up would not continue its streams; regenerate it"
        ) from None


def _planned_max(path, attrs, n: int, extra: int, planned_max: int | None) -> int:
    """The most samples a row may reach: the file's, once fixed by a first top-up (default ``n + extra``)."""
    stored_max = attrs.get("topup_planned_max")
    if planned_max is None:
        planned_max = int(stored_max) if stored_max is not None else n + extra
    planned_max = check_count("planned_max", planned_max, minimum=n)
    if stored_max is not None and planned_max != int(stored_max):
        raise StoreError(
            f"{path} was topped up with planned maximum {stored_max} samples per row; a further top-up "
            f"keeps it (asked {planned_max}), since the calibration's radius cap is computed from it"
        )
    return planned_max


def _topup_engine(path, counts, model_spec: str, scheme: str, *, device, batch_size) -> SmoothedClassifier:
    """The engine that continues a counts file's streams: its base model (checked by SHA-256), seed,
    scheme and amp, on its device type."""
    attrs = counts.attrs
    loaded = load_model(
        model_spec, device=device, num_classes=counts.num_classes, input_shape=tuple(attrs["input_shape"])
    )
    if attrs.get("model_sha256") and loaded.sha256 != attrs["model_sha256"]:
        raise StoreError(
            f"{path} was made with another base model (SHA-256 {str(attrs['model_sha256'])[:12]}... vs "
            f"{loaded.sha256[:12]}...); top it up with the model it was made with"
        )
    smooth = SmoothedClassifier(
        loaded.model,
        counts.num_classes,
        counts.sigma,
        device=device,
        batch_size=batch_size,
        amp=attrs.get("amp"),
        seed=int(attrs["seed"]),
        noise_scheme=scheme,
        input_shape=tuple(attrs["input_shape"]),
        off_grid="quantise",
    )
    if smooth.device.type != attrs.get("device_type"):
        raise StoreError(
            f"{path} was made on {attrs.get('device_type')}; top it up on the same device type "
            f"(--device {attrs.get('device_type')}), since the noise of a sample depends on it"
        )
    return smooth


def _draw_topup(smooth, counts, images, picked, draw, samples, counts_topup, *, extra: int, progress: bool) -> None:
    """Add ``draw`` samples to each picked row's ``counts_topup``, continuing its estimation stream at
    ``samples`` (its samples so far)."""
    chunk = max(1, (BATCHES_PER_CALL * smooth.batch_size) // extra)
    bar = tqdm(total=int(picked.size), unit="img", desc="top-up", disable=not progress, dynamic_ncols=True)
    for lo in range(0, picked.size, chunk):
        rows = picked[lo : lo + chunk]
        counts_topup[rows] += smooth.counts(
            images[rows],
            draw[lo : lo + chunk],
            indices=counts.indices[rows],
            stream=STREAM_ESTIMATE,
            start=samples[rows],
        )
        bar.update(len(rows))
    bar.close()
