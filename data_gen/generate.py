"""Offline Monte Carlo data generation: class counts of a base model under noise, for one split, in HDF5.

``generate_counts`` is the Python API behind ``surrogate-cert datagen``. Each image's noise comes from
its own generator seeded by ``(seed, dataset index, stream)`` (see ``surrogate_cert.smoothing``), so
the file's counts depend neither on ``batch_size`` nor on how often the job was interrupted and
resumed: a resumed file is identical to one written in a single run.
"""
from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm.auto import tqdm

from surrogate_cert.core import __version__
from surrogate_cert.core.errors import InvalidParameterError, check_count, check_positive
from surrogate_cert.core.smoothing import NOISE_SCHEME, STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier

from .datasets import load_split
from .models import check_model_fits, load_model
from .store import CountsWriter

BATCHES_PER_CALL = 8
"""Forward batches per engine call: progress updates this often; the last batch of a call may be partial."""

COMMIT_SECONDS = 2.0
"""Default time between commits: an interruption loses at most this much work."""


def generate_counts(
    dataset: str,
    split: str,
    model_spec: str,
    sigma: float,
    n: int,
    out: str,
    *,
    n0: int = 0,
    batch_size: int = 1000,
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
    batch_size : int, optional
        Noisy samples per forward pass (counts do not depend on it).
    seed : int, optional
        Seed of the noise streams.
    limit : int, optional
        Count the first ``limit`` images of the split only.
    device : str, torch.device or None, optional
        Where the base model runs.
    amp : {None, "bf16"}, optional
        bfloat16 autocast on CUDA (recorded: a resume must use the same).
    resume : bool, optional
        Continue an existing ``out`` made with the same settings.
    overwrite : bool, optional
        Start an existing ``out`` again from its first row (it is replaced once the new file is
        created); ignored with ``resume``.
    data_root : str, optional
        Folder of the torchvision datasets.
    download : bool, optional
        Download a missing torchvision dataset.
    progress : bool, optional
        Show a progress bar.
    commit_seconds : float, optional
        Most seconds between commits (>= 0).
    command : str, optional
        The command line recorded in the file.

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InvalidParameterError
        If ``sigma``, ``n``, ``n0``, ``batch_size``, ``limit`` or ``commit_seconds`` is out of range,
        or ``n + n0`` does not fit uint32 counts.
    DatasetError
        If the dataset cannot be loaded.
    ModelError
        If the model cannot be loaded or does not fit the dataset's images or classes.
    StoreError
        If ``out`` exists without ``resume`` or ``overwrite``, is locked by another writer (``StoreLockedError``),
        does not match the resume settings (``ResumeMismatchError``), or cannot be written.
    InvalidInputError
        If ``amp`` or ``device`` is not usable.
    """
    sigma = check_positive("sigma", sigma)
    n = check_count("n", n)
    n0 = check_count("n0", n0, minimum=0)
    batch_size = check_count("batch_size", batch_size)
    if n + n0 >= 2**32:
        raise InvalidParameterError(f"n + n0 must be below 2**32 (counts are stored as uint32), got {n + n0}")
    if commit_seconds < 0 or not math.isfinite(commit_seconds):
        raise InvalidParameterError(f"commit_seconds must be a finite number >= 0, got {commit_seconds}")
    data = load_split(dataset, split, data_root=data_root, download=download, limit=limit)
    loaded = load_model(model_spec, device=device, num_classes=data.num_classes, input_shape=data.input_shape)
    smooth = SmoothedClassifier(loaded.model, data.num_classes, sigma, device=device, batch_size=batch_size,
                                amp=amp, seed=seed)
    check_model_fits(smooth, data.x[:1], model_spec)

    attrs = {
        "sigma": sigma, "n": n, "n0": n0, "num_classes": data.num_classes, "seed": int(seed),
        "dataset": data.dataset, "split": split, "limit": limit, "model_sha256": loaded.sha256,
        "model_source": loaded.source, "package_version": __version__, "noise_scheme": NOISE_SCHEME,
        "device_type": smooth.device.type, "amp": smooth.amp, "input_shape": list(data.input_shape),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or "generate_counts()",
    }
    with CountsWriter.open(out, indices=data.indices, labels=data.y.numpy(), attrs=attrs, resume=resume,
                           overwrite=overwrite) as writer:
        _fill(writer, smooth, data, n, n0, batch_size, commit_seconds, progress)
    return os.fspath(out)


def _fill(writer: CountsWriter, smooth: SmoothedClassifier, data, n: int, n0: int, batch_size: int,
          commit_seconds: float, progress: bool) -> None:
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

    bar = tqdm(total=total, initial=writer.committed, unit="img", desc="datagen", disable=not progress,
               dynamic_ncols=True)
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
