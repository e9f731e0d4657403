"""Watching a stream: ``surrogate-cert monitor``.

Reads a stream of images (an NPZ with ``x``, ``N x C x H x W`` floats in [0, 1], and optionally
``y``, in arrival order), runs it through the one-pass certifier with a ``DriftMonitor`` and,
given the base model, a ``CertificateAudit`` attached (``deploy.hybrid.HybridCertifier`` with no
fallback: after an alarm the one-pass certificates are withheld), and writes one JSON document
(format ``surrogate-cert-monitor``): the drift martingale's path and alarm, the audit's rate and
bounds, and how many queries took each route. The whole stream is checked before any work, and the
JSON is written atomically at the end, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration.artifact import Calibration, load_calibration

from ..core import __version__
from ..core.errors import InvalidInputError, InvalidParameterError
from ..core.files import commit_outputs, read_npz
from ..core.smoothing import check_images
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier
from ..deploy.monitor import DEFAULT_DELTA

__all__ = ["FORMAT", "FORMAT_VERSION", "load_stream", "load_stream_split", "monitor_stream", "write_monitor"]

FORMAT = "surrogate-cert-monitor"
FORMAT_VERSION = 1

STREAM_CHUNK = 1024
"""Queries handed to the certifier and the watchers at once (results do not depend on it)."""


def load_stream(
    path: str | os.PathLike, input_shape, num_classes: int | None = None
) -> tuple[torch.Tensor, np.ndarray | None]:
    """The images (and labels, if any) of a stream NPZ, checked whole before any work.

    Parameters
    ----------
    path : str or os.PathLike
        NPZ with ``x`` (``N x C x H x W`` floats in [0, 1], in arrival order) and optionally ``y``
        (``N`` integer labels).
    input_shape : sequence of int
        ``(C, H, W)`` the surrogate expects.
    num_classes : int, optional
        The surrogate's class count: every label must be a class ``0 .. num_classes - 1`` (a label
        outside would make the reported accuracy wrong).

    Returns
    -------
    x : torch.Tensor
        ``N x C x H x W`` float32.
    y : numpy.ndarray or None
        int64 labels, if the file has them.

    Raises
    ------
    InvalidInputError
        If the file cannot be read as NPZ (a plain ``.npy`` array included), lacks ``x``, is empty, has
        images of another shape, non-float, non-finite or out-of-range pixels, or labels that are not one
        class per image.
    """
    arrays = read_npz(path, "a stream .npz with arrays x (N x C x H x W in [0, 1]) and optional y")
    if "x" not in arrays:
        raise InvalidInputError(
            f"stream {path} has no array 'x' (N x C x H x W images in [0, 1]); it has {sorted(arrays) or 'nothing'}"
        )
    x = arrays["x"]
    expected = " x ".join(map(str, input_shape))
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInputError(f"stream {path}: x has shape {tuple(x.shape)} but the surrogate expects N x {expected}")
    if x.shape[0] == 0:
        raise InvalidInputError(f"stream {path} is empty (x has no images)")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidInputError(f"stream {path}: x must hold floats in [0, 1], got dtype {x.dtype}")
    images = check_images(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), input_shape)
    y = arrays.get("y")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise InvalidInputError(
                f"stream {path}: y must hold one integer label per image, got shape {y.shape} and dtype {y.dtype}"
            )
        y = y.astype(np.int64)
        outside = (y < 0) | (y >= num_classes) if num_classes is not None else (y < 0)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            classes = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
            raise InvalidInputError(
                f"stream {path}: label {int(y[first])} (query {first}) is not a class of "
                f"{classes}; fix y (labels are class indices)"
            )
    return images, y


def load_stream_split(
    dataset: str,
    split: str,
    input_shape,
    *,
    data_root: str | None = None,
    download: bool = False,
    limit: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """A dataset split as a stream of queries, in the split's (random, fixed) order.

    The ``test`` split is exchangeable with ``cal`` (both are random halves of one source), so the
    drift monitor stays quiet on it with probability at least ``1 - delta``: the way to try the
    monitor before a real stream exists.

    Parameters
    ----------
    dataset : str
        Dataset spec (``data_gen.datasets.load_split``).
    split : str
        ``train``, ``surrogate``, ``cal`` or ``test``.
    input_shape : sequence of int
        ``(C, H, W)`` the surrogate expects.
    data_root : str, optional
        Folder of the torchvision datasets.
    download : bool, optional
        Download a missing torchvision dataset.
    limit : int, optional
        The first ``limit`` images of the split only.

    Returns
    -------
    x : torch.Tensor
        ``N x C x H x W`` float32 images in [0, 1].
    y : numpy.ndarray
        int64 labels.

    Raises
    ------
    DatasetError
        If the dataset or split cannot be loaded.
    InvalidInputError
        If its images are not of ``input_shape``.
    """
    from data_gen.datasets import load_split

    data = load_split(dataset, split, data_root=data_root, download=download, limit=limit)
    if tuple(data.input_shape) != tuple(input_shape):
        expected = " x ".join(map(str, input_shape))
        raise InvalidInputError(
            f"{dataset} {split} has images of shape {tuple(data.input_shape)} but the surrogate "
            f"expects {expected}; stream the dataset the surrogate was trained on"
        )
    return data.x.to(torch.float32), data.y.numpy().astype(np.int64)


def monitor_stream(
    surrogate,
    calibration,
    x: torch.Tensor,
    y: np.ndarray | None = None,
    *,
    base_model=None,
    audit_rate: float | None = None,
    n_audit: int | None = None,
    delta: float = DEFAULT_DELTA,
    seed: int = 0,
    device=None,
    batch_size: int = 1000,
    chunk: int = STREAM_CHUNK,
    progress: bool = False,
    key: bytes | None = None,
) -> dict:
    """Run a stream through the watched one-pass certifier; returns the monitor document (a dict).

    Parameters
    ----------
    surrogate : Surrogate or path
        The surrogate.
    calibration : Calibration or path
        Its calibration (with a monitor reference: written by ``calibrate`` of this version).
    x : torch.Tensor
        The stream's images, in arrival order.
    y : numpy.ndarray, optional
        Their labels (for the accuracy of the one-pass certificates issued).
    base_model : torch.nn.Module or str, optional
        The base model; needed for the audit.
    audit_rate : float, optional
        Share of queries audited (None or 0: no audit).
    n_audit : int, optional
        Samples per audited certificate (default and only value: the calibration's ``n_cal``).
    delta : float, optional
        False-alarm probability of each watcher over the whole stream.
    seed : int, optional
        Seed of the watchers' randomness and of the audit's noise.
    device, batch_size : optional
        Where the models run; noisy samples per forward pass of the audit.
    chunk : int, optional
        Queries handed over at once.
    progress : bool, optional
        Show a progress bar on stderr.

    Returns
    -------
    dict
        The document ``write_monitor`` writes (see the module docstring).
    """
    started = time.perf_counter()
    if not isinstance(surrogate, Surrogate):
        surrogate = Surrogate.load(surrogate, device=device, key=key)
    if not isinstance(calibration, Calibration):
        calibration = load_calibration(calibration, key=key)
    hybrid = _watched_certifier(
        surrogate,
        calibration,
        base_model=base_model,
        audit_rate=audit_rate,
        n_audit=n_audit,
        delta=delta,
        seed=seed,
        device=device,
        batch_size=batch_size,
        key=key,
    )
    certificates = _certify_stream(hybrid, x, chunk=chunk, progress=progress)
    return _monitor_document(hybrid, calibration, certificates, y, started)


def _watched_certifier(
    surrogate: Surrogate,
    calibration: Calibration,
    *,
    base_model,
    audit_rate,
    n_audit,
    delta,
    seed,
    device,
    batch_size,
    key,
) -> HybridCertifier:
    """The one-pass certifier with no fallback, its drift monitor and (given ``audit_rate``) its audit attached."""
    audit_rate = None if not audit_rate else audit_rate
    if audit_rate is not None and base_model is None:
        raise InvalidParameterError("--audit-rate needs the base model (--model) to re-check certificates")
    return HybridCertifier.load(
        surrogate,
        calibration,
        base_model=base_model,
        fallback="none",
        device=device,
        batch_size=batch_size,
        seed=seed,
        drift_delta=delta,
        audit_rate=audit_rate,
        n_audit=n_audit,
        audit_delta=delta,
        key=key,
    )


def _certify_stream(hybrid: HybridCertifier, x: torch.Tensor, *, chunk: int, progress: bool) -> list:
    """The stream's certificates, in arrival order, handed to the certifier ``chunk`` queries at a time."""
    certificates = []
    with tqdm(total=len(x), desc="monitor", unit="img", disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(x), chunk):
            hi = min(lo + chunk, len(x))
            certificates.extend(hybrid.certify(x[lo:hi], indices=np.arange(lo, hi)))
            bar.update(hi - lo)
    return certificates


def _monitor_document(
    hybrid: HybridCertifier, calibration: Calibration, certificates: list, y: np.ndarray | None, started: float
) -> dict:
    """The monitor document: the watchers' state after the stream, the routes taken and the calibration used."""
    monitor, audit = hybrid.monitor, hybrid.audit
    drift = monitor.summary(path=True)
    path = drift.pop("path")
    routes = Counter(c.route for c in certificates)
    issued = [i for i, c in enumerate(certificates) if c.method == "surrogate"]
    doc = dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        queries=len(certificates),
        drift_alarm=monitor.alarm,
        drift_alarm_at=monitor.alarm_at,
        log_martingale=dict(
            final=monitor.log_martingale, max=monitor.max_log_martingale, threshold=monitor.threshold, path=path
        ),
        delta=monitor.delta,
        drift=drift,
        audit_alarm=bool(audit is not None and audit.alarm),
        audit_alarm_at=None if audit is None else audit.alarm_at,
        audit=None if audit is None else audit.summary(path=True),
        routes=dict(sorted(routes.items())),
        one_pass_certificates=len(issued),
        one_pass_accuracy=(
            float(np.mean([certificates[i].prediction == y[i] for i in issued])) if y is not None and issued else None
        ),
        calibration=dict(
            epsilon=calibration.epsilon,
            alpha_mc=calibration.alpha_mc,
            n_cal=calibration.n_cal,
            calibration_size=calibration.calibration_size,
            guarantee=calibration.guarantee,
            method=calibration.method,
            groups=calibration.groups,
            bound=calibration.bound,
            surrogate_sha256=calibration.surrogate_sha256,
            dataset=calibration.dataset,
        ),
        seconds=time.perf_counter() - started,
    )
    return doc


def write_monitor(doc: dict, out: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Write the monitor document as JSON, atomically (temporary file, rename); returns the path.

    ``overwrite=False`` refuses an existing ``out`` (``OutputExistsError``)."""
    out = os.fspath(out)
    commit_outputs({out: json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n"}, overwrite=overwrite)
    return out


def _finite(value):
    """Strict JSON: non-finite floats become None, NumPy values Python ones."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def provenance_fields() -> dict:
    """Versions for the document's ``provenance`` (the command line adds the command)."""
    return dict(package_version=__version__, torch=torch.__version__, numpy=np.__version__)
