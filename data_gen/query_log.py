"""The query log: what the sequential fallback learned about each query it sampled, kept to retrain on.

Every query the one-pass certificate does not settle is sampled by the sequential certifier anyway; its
class counts are as good a training target for the surrogate as a counts file's (soft labels
``counts / samples``). The log keeps them with the query itself, since a deployment query is in no
dataset. Schema (HDF5, ``FORMAT = "surrogate-cert-queries"``, ``FORMAT_VERSION`` 1)::

    images      float32  N x C x H x W   the query (pixels in [0, 1])
    counts      uint32   N x K           class counts of the base model's noisy evaluations of it
    samples     int64    N               evaluations per row (the row sums of counts, >= 1)
    indices     int64    N               its dataset index where known, else -1
    image_hash  uint64   N               ``core.hashing.image_hashes`` (identifies it without an index)

    attributes: format, format_version, sigma, num_classes, input_shape, model_sha256, dataset (the source
    the indices refer to, or "none"), package_version, rows (committed), created_utc

Rows are appended in arrival order and committed like a counts file's: written and flushed first, then
the ``rows`` counter, so a crash loses at most the rows being appended; readers see committed rows only.
``read_query_log`` returns a ``QueryCounts``, which ``train`` reads beside counts files (its images come
from the file). Which evaluations a row holds (sequential samples up to a data-dependent stop, an audit's
fixed number) does not matter for training: the surrogate is recalibrated on the untouched calibration
split after every retraining, which is what its guarantee rests on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

import h5py
import numpy as np
import torch

from surrogate_cert.core import __version__
from surrogate_cert.core.errors import StoreError
from surrogate_cert.core.files import sniff, wrong_kind
from surrogate_cert.core.hashing import image_hashes

from .store import _open_h5, _plain

__all__ = ["FORMAT", "FORMAT_VERSION", "QueryLog", "QueryCounts", "read_query_log", "is_query_log"]

FORMAT = "surrogate-cert-queries"
FORMAT_VERSION = 1
_KEYS = ("sigma", "num_classes", "input_shape", "model_sha256", "dataset", "package_version", "rows")


@dataclass
class QueryCounts:
    """The committed rows of a query log, shaped like a ``store.CountsFile`` for training.

    ``attrs`` holds what consumers check (``sigma``, ``num_classes``, ``input_shape``, ``model_sha256``,
    ``complete``) plus ``dataset = "queries:<path>"`` and ``split = "queries"``; ``labels`` is None.
    """

    indices: np.ndarray
    counts: np.ndarray
    samples: np.ndarray
    image_hash: np.ndarray
    x: torch.Tensor
    attrs: dict = field(default_factory=dict)
    labels: None = None

    def __len__(self) -> int:
        return int(len(self.counts))

    def images(self, data_root: str | None = None) -> torch.Tensor:
        """The queries themselves (stored in the log; ``data_root`` is not read)."""
        return self.x


class QueryLog:
    """Append-only writer of a query log (see the module docstring); created on first use.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file; an existing log is continued if it matches ``sigma``, ``num_classes``,
        ``input_shape`` and ``model_sha256`` (StoreError otherwise, the file untouched).
    sigma : float
        The noise level the counts were drawn at.
    num_classes : int
        Classes of the base model.
    input_shape : tuple of int
        ``(C, H, W)`` of a query.
    model_sha256 : str, optional
        The base model's digest (the surrogate's ``base_model_sha256``).
    dataset : str, optional
        The source the stored dataset indices refer to.
    """

    def __init__(
        self,
        path,
        *,
        sigma: float,
        num_classes: int,
        input_shape,
        model_sha256: str | None = None,
        dataset: str | None = None,
    ):
        self.path = os.fspath(path)
        self.attrs = dict(
            sigma=float(sigma),
            num_classes=int(num_classes),
            input_shape=[int(v) for v in input_shape],
            model_sha256=model_sha256 or "none",
            dataset=dataset or "none",
        )
        if os.path.exists(self.path):
            have = read_query_log(self.path).attrs
            for key in ("sigma", "num_classes", "input_shape", "model_sha256"):
                mine = self.attrs[key] if self.attrs[key] != "none" else None
                if have.get(key) != mine:
                    raise StoreError(
                        f"{self.path} logs queries of another setting ({key} {have.get(key)!r} vs "
                        f"{mine!r}); give a new query log for this surrogate's base model and sigma"
                    )
        else:
            self._create()

    def _create(self) -> None:
        c, h, w = self.attrs["input_shape"]
        k = self.attrs["num_classes"]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(
                dict(
                    format=FORMAT,
                    format_version=FORMAT_VERSION,
                    package_version=__version__,
                    rows=0,
                    created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **self.attrs,
                )
            )
            opts = dict(compression="gzip", shuffle=True, fletcher32=True)
            h5.create_dataset(
                "images",
                shape=(0, c, h, w),
                maxshape=(None, c, h, w),
                dtype=np.float32,
                chunks=(max(1, min(256, (1 << 18) // max(c * h * w, 1))), c, h, w),
                **opts,
            )
            h5.create_dataset("counts", shape=(0, k), maxshape=(None, k), dtype=np.uint32, chunks=(1024, k), **opts)
            for name, dtype in (("samples", np.int64), ("indices", np.int64), ("image_hash", np.uint64)):
                h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,), **opts)
        os.replace(tmp, self.path)

    def append(self, x: torch.Tensor, counts, indices=None) -> int:
        """Log queries ``x`` (``N x C x H x W``) with their class ``counts`` (``N x K``).

        Returns the rows now committed.

        Rows without a sample are skipped. ``indices``: dataset indices, or None (-1: unknown).
        """
        counts = np.asarray(counts, dtype=np.int64)
        x = x.detach().cpu().float()
        if counts.ndim != 2 or counts.shape != (x.shape[0], self.attrs["num_classes"]) or np.any(counts < 0):
            raise StoreError(
                f"query log rows need N x {self.attrs['num_classes']} non-negative counts, got {counts.shape}"
            )
        idx = np.full(len(counts), -1, np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        keep = counts.sum(axis=1) > 0
        if not keep.any():
            return self.rows
        x, counts, idx = x[torch.as_tensor(np.flatnonzero(keep))], counts[keep], idx[keep]
        with _open_h5(self.path, "r+") as h5:
            rows = int(h5.attrs["rows"])
            new = rows + len(counts)
            for name, values in (
                ("images", x.numpy()),
                ("counts", counts.astype(np.uint32)),
                ("samples", counts.sum(axis=1)),
                ("indices", idx),
                ("image_hash", image_hashes(x)),
            ):
                h5[name].resize(new, axis=0)
                h5[name][rows:new] = values
            h5.flush()
            h5.attrs["rows"] = new  # the commit: rows first, then the counter
        return new

    @property
    def rows(self) -> int:
        with _open_h5(self.path, "r") as h5:
            return int(h5.attrs["rows"])


def is_query_log(path) -> bool:
    """Whether ``path`` is an HDF5 file of this format (a counts file is not)."""
    if not os.path.isfile(path) or sniff(path) != "hdf5":
        return False
    try:
        with _open_h5(os.fspath(path), "r") as h5:
            return _plain(h5.attrs.get("format")) == FORMAT
    except OSError:
        return False


def read_query_log(path) -> QueryCounts:
    """The committed rows of a query log, checked (StoreError for another kind of file or a damaged one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreError(f"query log {path} does not exist")
    kind = sniff(path)
    if kind != "hdf5":
        raise StoreError(wrong_kind(path, kind, "query log"))
    with _open_h5(path, "r") as h5:
        attrs = {k: _plain(v) for k, v in h5.attrs.items()}
        if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} is not a query log of version {FORMAT_VERSION} (format {attrs.get('format')!r})")
        if any(k not in attrs for k in _KEYS):
            raise StoreError(f"{path} lacks attributes {[k for k in _KEYS if k not in attrs]}; the log is damaged")
        rows = int(attrs["rows"])
        try:
            data = {name: h5[name][:rows] for name in ("images", "counts", "samples", "indices", "image_hash")}
        except (KeyError, OSError, ValueError) as exc:
            raise StoreError(f"{path}: reading failed ({str(exc).splitlines()[0]}); the log is damaged") from None
    counts = data["counts"].astype(np.int64)
    if len(counts) and (np.any(counts.sum(axis=1) != data["samples"]) or np.any(data["samples"] < 1)):
        raise StoreError(f"{path}: rows whose counts do not sum to their samples; the log is damaged")
    attrs = {k: (None if v == "none" else v) for k, v in attrs.items()}
    attrs.update(
        dataset=f"queries:{os.path.abspath(path)}",
        source_dataset=attrs.get("dataset"),
        split="queries",
        complete=True,
        n=int(data["samples"].max()) if rows else 0,
        input_shape=[int(v) for v in attrs["input_shape"]],
    )
    return QueryCounts(
        indices=data["indices"].astype(np.int64),
        counts=counts,
        samples=data["samples"],
        image_hash=data["image_hash"],
        x=torch.from_numpy(np.ascontiguousarray(data["images"])),
        attrs=attrs,
    )
