"""The HDF5 counts store: Monte Carlo class counts of a base model under noise, one row per image.

Schema (``FORMAT_VERSION`` 1)::

    indices        int64   N        dataset index of each row (all planned rows, written up front)
    labels         int64   N        true label of each row (written up front)
    counts         uint32  N x K    class counts of n noisy evaluations (estimation stream)
    counts_select  uint32  N x K    class counts of n0 noisy evaluations (selection stream), if n0 > 0

    attributes: format, format_version, sigma, n, n0, num_classes, seed, dataset, split, limit,
    model_sha256, model_source, package_version, noise_scheme, device_type, amp, input_shape,
    rows (committed rows), complete, command

Datasets are chunked with explicit chunk shapes and compressed (shuffle + gzip) with Fletcher-32
checksums, so a damaged chunk is reported, never read silently.

Crash safety: rows are written in order, and ``rows`` (the committed-row counter) is updated only
after the rows themselves were written and flushed. The writer keeps the file closed between
commits, so a crash (even SIGKILL) can only interrupt a commit, never leave rows half-counted;
readers return only the first ``rows`` rows. A new file is built under a temporary name and linked
into place, so ``path`` never names a half-initialised file. A sidecar lock (``path + ".lock"``,
``fcntl.flock``) makes a second writer fail at once with ``StoreError``.

Shards (``torchrun``): process ``r`` of ``W`` writes the rows ``r, r + W, ...`` of the split to its own
counts file ``path.shard-r-of-W`` (``shard_path``), with the same rules, plus the attributes
``shard_rank`` and ``shard_count``. ``merge_shards`` checks that all ``W`` shards are there, complete,
and made by this job (``IDENTITY_KEYS``, planned rows), then builds ``path`` under a temporary name,
links it into place complete, and only then removes the shards: ``path`` is never written from an
incomplete or foreign set, and a shard is never removed before its rows are in ``path``.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import h5py
import numpy as np

from surrogate_cert.core.errors import StoreError

from .datasets import load_split
from .distributed import shard_positions

class StoreLockedError(StoreError):
    """Another process holds the file's writer lock (a second writer is refused, never queued)."""


class ResumeMismatchError(StoreError):
    """``--resume`` was asked for a file made with other settings (the file is left untouched)."""


class ShardError(StoreError):
    """A shard is missing, unfinished, or from another job (another seed, model, sigma, split or world size)."""


FORMAT = "surrogate-cert-counts"
FORMAT_VERSION = 1

IDENTITY_KEYS = (
    "format_version", "sigma", "n", "n0", "num_classes", "seed", "dataset", "split", "limit",
    "model_sha256", "noise_scheme", "device_type", "amp", "input_shape",
)
"""Attributes a resumed job must match exactly: together they fix every row's counts."""

REQUIRED_KEYS = IDENTITY_KEYS + ("package_version", "rows", "complete")

SHARD_KEYS = ("shard_rank", "shard_count")
"""Attributes of a shard file only: which process of how many wrote it."""

COUNTS_DTYPE = np.uint32
CHUNK_BYTES = 64 * 1024
"""Target size of one counts chunk before compression."""

_LOCK_RETRY_SECONDS = 10.0


@dataclass
class CountsFile:
    """The committed rows of a counts file: ``counts[i]`` are the class counts of ``attrs["n"]`` noisy
    evaluations of the image with dataset index ``indices[i]`` (true label ``labels[i]``)."""

    indices: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    counts_select: np.ndarray | None
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def sigma(self) -> float:
        return float(self.attrs["sigma"])

    @property
    def n(self) -> int:
        return int(self.attrs["n"])

    def images(self, data_root: str | None = None):
        """The images of these rows, read from the dataset and split the file records.

        Parameters
        ----------
        data_root : str, optional
            Folder of the torchvision datasets.

        Returns
        -------
        torch.Tensor
            ``N x C x H x W`` float32 images in [0, 1], in row order.

        Raises
        ------
        DatasetError
            If the dataset cannot be loaded or lacks one of the file's dataset indices.
        """
        split = load_split(str(self.attrs["dataset"]), str(self.attrs["split"]), data_root=data_root)
        return split.take(self.indices).x


# --------------------------------------------------------------------------- reading
def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _open_h5(path: str, mode: str) -> h5py.File:
    """Open with HDF5's own file locking, retrying briefly while another process holds the file
    for a moment (a reader, or the writer's commit)."""
    deadline = time.monotonic() + _LOCK_RETRY_SECONDS
    while True:
        try:
            # best-effort: lock where the file system supports it (not all network file systems do).
            return h5py.File(path, mode, locking="best-effort")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
        except OSError as exc:
            text = str(exc).lower()
            if "lock" not in text or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def read_attrs(path: str | os.PathLike) -> dict:
    """The attributes of a counts file (StoreError if it is missing or not a counts file).

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 counts file.

    Returns
    -------
    dict
        Plain Python values (see the module docstring); ``"none"`` is read back as None,
        ``complete`` as bool and ``input_shape`` as a list of int.

    Raises
    ------
    StoreError
        If the file is missing, not readable HDF5, not a counts file of this format version, or
        lacks attributes or datasets.
    """
    with _reader(path) as h5:
        return _checked_attrs(h5, path)


def _reader(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreError(f"counts file {path} does not exist; create it with `surrogate-cert datagen ... --out {path}`")
    try:
        return _open_h5(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]}); "
                         "regenerate it with `surrogate-cert datagen`") from None


def _checked_attrs(h5: h5py.File, path) -> dict:
    attrs = {key: _plain(value) for key, value in h5.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a surrogate-cert counts file (no format={FORMAT!r} attribute); "
                         "create one with `surrogate-cert datagen`")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path} has counts format version {attrs.get('format_version')}, this package reads "
                         f"version {FORMAT_VERSION}; regenerate it with this version's `surrogate-cert datagen`")
    missing = [key for key in REQUIRED_KEYS if key not in attrs]
    if missing or "indices" not in h5 or "labels" not in h5 or "counts" not in h5:
        raise StoreError(f"{path} is missing {missing or 'datasets'}; the file is damaged, regenerate it")
    attrs = {key: (None if value == "none" else value) for key, value in attrs.items()}
    attrs["complete"] = bool(attrs["complete"])
    attrs["input_shape"] = [int(v) for v in attrs["input_shape"]]
    return attrs


def read_counts(path: str | os.PathLike) -> CountsFile:
    """Read the committed rows of a counts file (rows beyond the committed counter are ignored).

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 counts file.

    Returns
    -------
    CountsFile
        ``indices``, ``labels``, ``counts`` and ``counts_select`` (None without selection samples)
        as int64 arrays of the committed rows, and the attributes (as ``read_attrs``).

    Raises
    ------
    StoreError
        If the file is missing, is not a counts file of this format version, or a chunk fails its
        checksum.
    """
    with _reader(path) as h5:
        attrs = _checked_attrs(h5, path)
        rows = int(attrs["rows"])
        try:
            counts_select = h5["counts_select"][:rows].astype(np.int64) if "counts_select" in h5 else None
            return CountsFile(
                indices=h5["indices"][:rows].astype(np.int64),
                labels=h5["labels"][:rows].astype(np.int64),
                counts=h5["counts"][:rows].astype(np.int64),
                counts_select=counts_select,
                attrs=attrs,
            )
        except OSError as exc:
            raise StoreError(f"{path}: reading failed ({str(exc).splitlines()[0]}); the file is damaged, "
                             "regenerate it") from None


# --------------------------------------------------------------------------- writing
class _Lock:
    """Exclusive, non-blocking ``flock`` on ``path + '.lock'`` (which holds the holder's process id);
    removed again on release."""

    def __init__(self, target: str):
        self.path = target + ".lock"
        self.target = target
        self.fd: int | None = None

    def acquire(self) -> "_Lock":
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"cannot create {self.path} ({exc.strerror}); choose a writable --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreLockedError(
                        f"{self.target} is being written by another process (lock {self.path} is held); "
                        "wait for it to finish or choose another --out"
                    ) from None
                raise StoreError(f"cannot lock {self.path} ({exc.strerror})") from None
            # The previous holder may have removed the lock file between our open and our flock:
            # then we hold a lock on an orphan inode, and must retry on the current file.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    # The holder's process id, for people (and tests) looking for the writer.
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)
        raise StoreError(f"could not lock {self.path}: it keeps being replaced; is another job running on {self.target}?")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _chunk_rows(num_rows: int, num_classes: int) -> int:
    return int(max(1, min(num_rows, CHUNK_BYTES // (4 * num_classes))))


def _filters() -> dict:
    return {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True}


def _identity(attrs: Mapping[str, Any]) -> dict:
    out = {}
    for key in IDENTITY_KEYS:
        value = attrs.get(key)
        out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


class CountsWriter:
    """Appends rows to a counts file, committing each block only after it is on disk.

    Use ``CountsWriter.open(path, ...)`` as a context manager. ``committed`` is the number of rows
    already in the file (non-zero on resume); ``append`` must receive the next rows in order.
    """

    def __init__(self, path: str, lock: _Lock, committed: int, total: int, with_select: bool):
        self.path = path
        self._lock = lock
        self.committed = committed
        self.total = total
        self.with_select = with_select

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        indices: np.ndarray,
        labels: np.ndarray,
        attrs: Mapping[str, Any],
        resume: bool = False,
    ) -> "CountsWriter":
        """Create ``path`` (refused if it exists, unless ``resume``) or resume it.

        A resumed file must have the same identity attributes (``IDENTITY_KEYS``) and the same
        planned indices and labels; otherwise StoreError, and the file is left untouched. The writer
        holds the file's lock until it is closed; use it as a context manager.

        Parameters
        ----------
        path : str or os.PathLike
            The counts file.
        indices : numpy.ndarray
            Dataset index of every planned row.
        labels : numpy.ndarray
            True label of every planned row.
        attrs : mapping
            The file's attributes (at least ``IDENTITY_KEYS`` and ``package_version``; see the module
            docstring).
        resume : bool, optional
            Continue an existing file instead of refusing it.

        Returns
        -------
        CountsWriter
            ``committed`` is the number of rows already in the file (0 for a new file).

        Raises
        ------
        StoreLockedError
            If another process is writing the file.
        ResumeMismatchError
            If a resumed file was made with other settings or plans other rows.
        StoreError
            If ``path`` is a folder, its folder is missing or not writable, it exists without
            ``resume``, the split has no rows, or it cannot be created or read.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise StoreError(f"{path} is a folder; give a file name for --out, e.g. {os.path.join(path, 'counts.h5')}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise StoreError(f"cannot write {path}: folder {folder} is missing or not writable; choose another --out")
        attrs = {**attrs, "format_version": FORMAT_VERSION}
        lock = _Lock(path).acquire()
        try:
            with_select = int(attrs.get("n0", 0)) > 0
            if os.path.exists(path):
                if not resume:
                    raise StoreError(f"{path} already exists; pass --resume to continue it, or choose another --out")
                committed = cls._check_resume(path, indices, labels, attrs)
            else:
                cls._create(path, indices, labels, attrs, with_select)
                committed = 0
            return cls(path, lock, committed, len(indices), with_select)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _create(path, indices, labels, attrs, with_select) -> None:
        if len(indices) < 1:
            raise StoreError("nothing to write: the split has no rows; check --limit and the dataset")
        _write_new(path, lambda tmp: _build(tmp, indices, labels, attrs, with_select))

    @staticmethod
    def _check_resume(path, indices, labels, attrs) -> int:
        with _reader(path) as h5:
            stored = _checked_attrs(h5, path)
            want = _identity(attrs)
            have = _identity(stored)
            diff = [f"{key} {have[key]!r} in the file vs {want[key]!r} requested" for key in IDENTITY_KEYS
                    if _differs(have[key], want[key])]
            if diff:
                raise ResumeMismatchError(f"cannot resume {path}: " + "; ".join(diff)
                                 + "; rerun with the file's settings or choose another --out")
            same_rows = (len(h5["indices"]) == len(indices) and np.array_equal(h5["indices"][:], indices)
                         and np.array_equal(h5["labels"][:], labels))
            if not same_rows:
                raise ResumeMismatchError(f"cannot resume {path}: it plans different images ({len(h5['indices'])} rows) than "
                                 f"this request ({len(indices)} rows); use the same --dataset/--split/--limit")
            if ("counts_select" in h5) != (int(stored["n0"]) > 0):
                raise StoreError(f"cannot resume {path}: counts_select presence does not match n0; the file is damaged")
            return int(stored["rows"])

    # ---------------------------------------------------------------- writing
    def append(self, counts: np.ndarray, counts_select: np.ndarray | None = None) -> None:
        """Write the next ``len(counts)`` rows, then (after they are flushed) advance ``rows``.

        Parameters
        ----------
        counts : numpy.ndarray
            ``rows x K`` class counts of the estimation stream, in planned row order, non-negative and
            below 2**32 (stored as uint32 without a range check).
        counts_select : numpy.ndarray, optional
            The same rows' selection counts; given exactly when the file has ``n0 > 0``.

        Raises
        ------
        StoreError
            If the rows would exceed the planned rows, ``counts_select`` is given when it must not be
            (or missing when it must), or writing fails (committed rows are kept).
        """
        counts = np.asarray(counts)
        lo, hi = self.committed, self.committed + len(counts)
        if hi > self.total:
            raise StoreError(f"{self.path}: {hi} rows exceed the {self.total} planned rows")
        if self.with_select != (counts_select is not None):
            raise StoreError(f"{self.path}: counts_select must be given exactly when n0 > 0")
        try:
            with _open_h5(self.path, "r+") as h5:
                h5["counts"][lo:hi] = counts.astype(COUNTS_DTYPE)
                if counts_select is not None:
                    h5["counts_select"][lo:hi] = np.asarray(counts_select).astype(COUNTS_DTYPE)
                h5.flush()
                h5.attrs["rows"] = hi
                if hi == self.total:
                    h5.attrs["complete"] = True
        except OSError as exc:
            raise StoreError(f"cannot write {self.path} ({str(exc).splitlines()[0]}); committed rows are kept, "
                             "fix the problem and rerun with --resume") from None
        self.committed = hi

    @property
    def complete(self) -> bool:
        return self.committed >= self.total

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CountsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _build(tmp: str, indices, labels, attrs: Mapping[str, Any], with_select: bool, counts=None,
           counts_select=None) -> None:
    """Write a complete counts file at ``tmp``: no rows committed, or all of them when ``counts`` is given."""
    num_rows, k = len(indices), int(attrs["num_classes"])
    with h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            if value is None:
                value = "none"
            h5.attrs[key] = value
        h5.attrs["rows"] = 0 if counts is None else num_rows
        h5.attrs["complete"] = counts is not None
        row_chunk = min(num_rows, 8192)
        h5.create_dataset("indices", data=np.asarray(indices, np.int64), chunks=(row_chunk,), **_filters())
        h5.create_dataset("labels", data=np.asarray(labels, np.int64), chunks=(row_chunk,), **_filters())
        names = ["counts"] + (["counts_select"] if with_select else [])
        for name, data in zip(names, (counts, counts_select)):
            h5.create_dataset(name, shape=(num_rows, k), dtype=COUNTS_DTYPE, chunks=(_chunk_rows(num_rows, k), k),
                              fillvalue=0, **_filters())
            if data is not None:
                h5[name][:] = np.asarray(data).astype(COUNTS_DTYPE)


def _write_new(path: str, build) -> None:
    """``build(tmp)`` a file under a temporary name, then link it to ``path`` (refused if ``path`` exists)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        build(tmp)
        # link() refuses an existing target, so a concurrent creator can never be overwritten.
        os.link(tmp, path)
    except FileExistsError:
        raise StoreError(f"{path} appeared while it was being created; choose another --out") from None
    except OSError as exc:
        raise StoreError(f"cannot write {path} ({str(exc).splitlines()[0]}); choose a writable --out") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- shards (torchrun)
_SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """The shard file of process ``rank`` of ``world_size`` for the counts file ``path``: ``path.shard-R-of-W``.

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file (``--out``).
    rank : int
        The process, ``0 <= rank < world_size``.
    world_size : int
        Processes of the job.

    Returns
    -------
    str
        The shard's path, in ``path``'s folder.
    """
    return f"{os.fspath(path)}.shard-{int(rank)}-of-{int(world_size)}"


def find_shards(path: str | os.PathLike) -> dict[int, list[str]]:
    """Shard files of ``path`` on disk, by world size (``{2: [path.shard-0-of-2, ...]}``); ``{}`` if none.

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file.

    Returns
    -------
    dict
        World size -> sorted shard paths.
    """
    path = os.fspath(path)
    found: dict[int, list[str]] = {}
    for candidate in glob.glob(glob.escape(path) + ".shard-*-of-*"):
        match = _SHARD_NAME.search(candidate[len(path):])
        if match and candidate[len(path):] == match.group(0):
            found.setdefault(int(match.group(2)), []).append(candidate)
    return {size: sorted(paths) for size, paths in sorted(found.items())}


def recorded_noise_scheme(path: str | os.PathLike) -> str | None:
    """The ``noise_scheme`` of ``path`` or, failing that, of one of its shards; None if neither exists.

    A resume continues with the scheme its file records, so old files resume as they were started.

    Parameters
    ----------
    path : str or os.PathLike
        The counts file (``--out``).

    Returns
    -------
    str or None
        The recorded scheme name.

    Raises
    ------
    StoreError
        If the file or shard exists but is not a readable counts file.
    """
    candidates = [os.fspath(path)] + [p for paths in find_shards(path).values() for p in paths]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return read_attrs(candidate)["noise_scheme"]
    return None


def check_no_shards(path: str | os.PathLike) -> None:
    """StoreError if shards of a torchrun job exist for ``path``: a one-process run must not mix with them.

    Parameters
    ----------
    path : str or os.PathLike
        The counts file a one-process job is about to write.

    Raises
    ------
    ShardError
        If any ``path.shard-*-of-*`` exists.
    """
    shards = find_shards(path)
    if shards:
        size, paths = next(iter(shards.items()))
        raise ShardError(f"{path} has shards of an unfinished torchrun job with {size} processes ({paths[0]}, ...); "
                         f"finish it with the same torchrun command (world size {size}) and --resume, or delete "
                         f"{path}.shard-* to start over")


def open_shard(
    path: str | os.PathLike,
    rank: int,
    world_size: int,
    *,
    indices: np.ndarray,
    labels: np.ndarray,
    attrs: Mapping[str, Any],
    resume: bool = False,
) -> CountsWriter:
    """``CountsWriter`` of process ``rank``'s shard: its rows (``rank, rank + W, ...``) of the planned ones.

    Same rules as ``CountsWriter.open`` (refused if it exists without ``resume``, same settings on
    resume, locked while open), with ``shard_rank`` and ``shard_count`` recorded.

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file (``--out``); the shard is ``shard_path(path, rank, world_size)``.
    rank, world_size : int
        This process and the number of processes.
    indices, labels : numpy.ndarray
        Dataset index and label of every planned row of the whole job, in split order.
    attrs : mapping
        The job's attributes (as for ``CountsWriter.open``).
    resume : bool, optional
        Continue an existing shard.

    Returns
    -------
    CountsWriter
        The shard's writer.

    Raises
    ------
    StoreError
        As ``CountsWriter.open``.
    """
    rows = shard_positions(len(indices), rank, world_size)
    return CountsWriter.open(shard_path(path, rank, world_size), indices=np.asarray(indices)[rows],
                             labels=np.asarray(labels)[rows], attrs={**attrs, "shard_rank": int(rank),
                                                                     "shard_count": int(world_size)},
                             resume=resume)


def remove_shards(path: str | os.PathLike, world_size: int, *, locked: bool = False) -> None:
    """Remove the shards of a merged ``path`` (each under its lock unless the caller holds them).

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file; call only once it is complete.
    world_size : int
        Processes of the job whose shards go.
    locked : bool, optional
        The caller holds every shard's lock.
    """
    for rank in range(world_size):
        shard = shard_path(path, rank, world_size)
        if not os.path.exists(shard):
            continue
        lock = None if locked else _Lock(shard).acquire()
        try:
            os.unlink(shard)
        finally:
            if lock is not None:
                lock.release()


def check_sharded_job(path: str | os.PathLike, world_size: int, *, indices: np.ndarray, labels: np.ndarray,
                      attrs: Mapping[str, Any], resume: bool) -> bool:
    """Before a torchrun job starts: may it run, and is there anything left to do?

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file (``--out``).
    world_size : int
        Processes of the job.
    indices, labels : numpy.ndarray
        The job's planned rows.
    attrs : mapping
        The job's attributes.
    resume : bool
        ``--resume`` was given.

    Returns
    -------
    bool
        True if ``path`` already holds the finished job (a resume then has nothing to do).

    Raises
    ------
    StoreError
        If ``path`` exists without ``resume``; ``ResumeMismatchError`` if it was made with other
        settings; ``ShardError`` if it is an unfinished one-process file, if shards of another world
        size exist, or if shards of this one exist without ``resume``.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        if not resume:
            raise StoreError(f"{path} already exists; pass --resume to continue it, or choose another --out")
        committed = CountsWriter._check_resume(path, indices, labels, {**attrs, "format_version": FORMAT_VERSION})
        if committed >= len(indices):
            return True
        raise ShardError(f"{path} is an unfinished one-process datagen file ({committed} of {len(indices)} rows); "
                         "finish it without torchrun, with the same command and --resume")
    shards = find_shards(path)
    others = {size: paths for size, paths in shards.items() if size != world_size}
    if others:
        size, paths = next(iter(others.items()))
        raise ShardError(f"{path} has shards of a torchrun job with {size} processes ({paths[0]}, ...), this one has "
                         f"{world_size}; relaunch with {size} processes and --resume, or delete {path}.shard-* to "
                         "start over")
    if shards.get(world_size) and not resume:
        raise ShardError(f"{path} has shards of an unfinished job ({shards[world_size][0]}, ...); pass --resume to "
                         "continue them, or delete them to start over")
    return False


def lock_counts_file(path: str | os.PathLike):
    """Take ``path``'s writer lock (as a writer does) without opening it: a torchrun job's rank 0 holds it
    from start to merge, so no other job writes ``path`` meanwhile. Release it with ``.release()``.

    Parameters
    ----------
    path : str or os.PathLike
        The counts file.

    Returns
    -------
    object
        The held lock (``release()`` frees it).

    Raises
    ------
    StoreLockedError
        If another process holds it.
    """
    return _Lock(os.fspath(path)).acquire()


def merge_shards(path: str | os.PathLike, world_size: int, *, indices: np.ndarray, labels: np.ndarray,
                 attrs: Mapping[str, Any], lock_held: bool = False) -> None:
    """Merge the ``world_size`` shards of ``path`` into ``path``, in the split's row order, then remove them.

    Every shard must exist, be complete, hold exactly its planned rows and match the job's
    ``IDENTITY_KEYS``; otherwise nothing is written and every shard is left as it is. ``path`` is
    built under a temporary name and linked into place complete, so it never holds a partial merge.
    The merged file has the job's attributes (no shard attributes): the file a one-process run writes.

    Parameters
    ----------
    path : str or os.PathLike
        The merged counts file to create (refused if it exists).
    world_size : int
        Processes of the job.
    indices, labels : numpy.ndarray
        The job's planned rows, in split order.
    attrs : mapping
        The job's attributes.
    lock_held : bool, optional
        The caller holds ``path``'s writer lock (``lock_counts_file``); else it is taken here.

    Raises
    ------
    ShardError
        If a shard is missing, unfinished, or from another job.
    StoreLockedError
        If a shard is still being written.
    StoreError
        If ``path`` exists or cannot be written.
    """
    path = os.fspath(path)
    attrs = {**attrs, "format_version": FORMAT_VERSION}
    want = _identity(attrs)
    num_rows, k = len(indices), int(attrs["num_classes"])
    with_select = int(attrs.get("n0", 0)) > 0
    counts = np.zeros((num_rows, k), np.int64)
    counts_select = np.zeros((num_rows, k), np.int64) if with_select else None
    locks = []
    try:
        for rank in range(world_size):
            shard = shard_path(path, rank, world_size)
            if not os.path.isfile(shard):
                raise ShardError(f"cannot merge {path}: shard {shard} is missing; relaunch the same torchrun "
                                 "command with --resume to redo it")
            locks.append(_Lock(shard).acquire())
            part = read_counts(shard)
            have = _identity(part.attrs)
            diff = [f"{key} {have[key]!r} vs {want[key]!r}" for key in IDENTITY_KEYS if _differs(have[key], want[key])]
            if diff or (part.attrs.get("shard_rank"), part.attrs.get("shard_count")) != (rank, world_size):
                diff = diff or [f"shard_rank/shard_count {part.attrs.get('shard_rank')}/{part.attrs.get('shard_count')}"]
                raise ShardError(f"cannot merge {path}: shard {shard} comes from another job ({'; '.join(diff)}); "
                                 "delete it and relaunch with --resume")
            rows = shard_positions(num_rows, rank, world_size)
            if not part.attrs["complete"] or len(part) != len(rows):
                raise ShardError(f"cannot merge {path}: shard {shard} has {len(part)} of {len(rows)} rows; relaunch "
                                 "the same torchrun command with --resume to finish it")
            if not (np.array_equal(part.indices, np.asarray(indices)[rows])
                    and np.array_equal(part.labels, np.asarray(labels)[rows])):
                raise ShardError(f"cannot merge {path}: shard {shard} holds other images than this job plans; "
                                 "delete it and relaunch with --resume")
            counts[rows] = part.counts
            if with_select:
                if part.counts_select is None:
                    raise ShardError(f"cannot merge {path}: shard {shard} has no counts_select; the file is damaged")
                counts_select[rows] = part.counts_select
        if os.path.exists(path):
            raise StoreError(f"cannot merge into {path}: it already exists; choose another --out")
        lock = None if lock_held else _Lock(path).acquire()
        try:
            _write_new(path, lambda tmp: _build(tmp, indices, labels, attrs, with_select, counts, counts_select))
        finally:
            if lock is not None:
                lock.release()
        remove_shards(path, world_size, locked=True)
    finally:
        for lock in locks:
            lock.release()


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not np.isclose(float(a), float(b), rtol=1e-12, atol=0.0)
        except (TypeError, ValueError):
            return True
    return a != b
