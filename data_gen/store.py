"""The HDF5 counts store: Monte Carlo class counts of a base model under noise, one row per image.

Schema (``FORMAT_VERSION`` 1; ``UNLABELED_VERSION`` 2 is the same without ``labels``: counts of an
unlabeled pool)::

    indices        int64   N        dataset index of each row (all planned rows, written up front)
    labels         int64   N        true label of each row (written up front; absent in version 2)
    counts         uint32  N x K    class counts of n noisy evaluations (estimation stream)
    counts_select  uint32  N x K    class counts of n0 noisy evaluations (selection stream), if n0 > 0
    samples        int64   N        estimation samples drawn per row: n, plus any top-up (only in topped-up files)
    counts_topup   uint32  N x K    class counts of the samples n+1 .. samples[i] of the estimation stream
                                    (only in topped-up files; a zero row where a row was not topped up)

    attributes: format, format_version, sigma, n, n0, num_classes, seed, dataset, split, limit,
    model_sha256, model_source, package_version, noise_scheme, device_type, amp, input_shape,
    rows (committed rows), complete, command; in topped-up files also topup_rule, topup_planned_max
    (the most estimation samples any row may reach, fixed before the top-up) and topup_history; in files
    of the sound noise scheme (``noise_scheme`` ``rounded-gaussian-grid255-v1``) also grid_shift_max (the
    largest l2 distance of an image to the 1/255 grid: the counts are those of the images rounded to it,
    0 for 8-bit datasets) and noise_slack (the radius slack of ``stats.grid_radius`` for these images)

Top-up (``datagen --top-up N``, ``data_gen.generate.top_up_counts``): rows whose samples so far all
agree get ``N`` more samples of the same estimation stream (the engine's ``start``), so ``counts``
itself (``n`` samples per row, a fixed number: what Cohen's bound and every consumer read) never
changes and the extra samples sit in ``counts_topup``. Which rows were topped up depends on their
counts: only an anytime-valid bound may use them (``stats.topup_reference_radius``).

Datasets are chunked with explicit chunk shapes and compressed (shuffle + gzip) with Fletcher-32
checksums, so a damaged chunk is reported, never read silently.

Crash safety: rows are written in order, and ``rows`` (the committed-row counter) is updated only
after the rows themselves were written and flushed. The writer keeps the file closed between
commits, so a crash (even SIGKILL) can only interrupt a commit, never leave rows half-counted;
readers return only the first ``rows`` rows. A new file is built under a temporary name and linked
into place, so ``path`` never names a half-initialised file. A sidecar lock (``path + ".lock"``,
``fcntl.flock``) makes a second writer fail at once with ``StoreError``.

Validation, once, here: ``read_counts`` / ``read_attrs`` recognise a file of another kind (text,
JSON, a checkpoint) and refuse a file that contradicts its own attributes (rows that do not sum to
``n`` / ``n0``, labels outside the classes, repeated indices, shapes); ``check_counts_for`` refuses a
sound file that does not fit its consumer (dataset, sigma, classes, image shape, base model,
completeness, images the consumer must not see, by dataset index); ``CountsWriter.append`` refuses
rows that would break those invariants.

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
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import h5py
import numpy as np

from surrogate_cert.core.errors import SIGMA_MAX, SIGMA_MIN, OutputExistsError, StoreError
from surrogate_cert.core.files import atomic_output, file_problem, sniff, wrong_kind
from surrogate_cert.core.signing import resolve_key
from surrogate_cert.core.smoothing import noise_family, noise_slack

from .datasets import load_images, same_dataset
from .distributed import shard_positions
from .signatures import SIGNATURE_ATTRS, check_counts_signature, signature_attrs


class StoreLockedError(StoreError):
    """Another process holds the file's writer lock (a second writer is refused, never queued)."""


class ResumeMismatchError(StoreError):
    """``--resume`` was asked for a file made with other settings (the file is left untouched)."""


class CountsFileExistsError(StoreError, OutputExistsError):
    """The counts file exists and neither ``resume`` nor ``overwrite`` was asked for (the file is kept)."""


class CountsMismatchError(StoreError):
    """A valid counts file that does not fit its consumer (another dataset, sigma, class count, input
    shape or base model; an incomplete file; images the consumer must not see)."""


class ShardError(StoreError):
    """A shard is missing, unfinished, or from another job (another seed, model, sigma, split or world size)."""


FORMAT = "surrogate-cert-counts"
FORMAT_VERSION = 1
"""Version of a counts file with labels (unchanged, so files and caches of earlier versions still match)."""
UNLABELED_VERSION = 2
"""Version of a counts file without labels (an unlabeled pool, ``data_gen.datasets``): version 1 minus
the ``labels`` dataset. Earlier readers refuse it with their version message."""
READ_VERSIONS = (FORMAT_VERSION, UNLABELED_VERSION)


def format_version_for(labels) -> int:
    """The version a new file is written with: ``FORMAT_VERSION`` with labels, ``UNLABELED_VERSION`` without."""
    return FORMAT_VERSION if labels is not None else UNLABELED_VERSION


IDENTITY_KEYS = (
    "format_version",
    "sigma",
    "n",
    "n0",
    "num_classes",
    "seed",
    "dataset",
    "split",
    "limit",
    "model_sha256",
    "noise_scheme",
    "device_type",
    "amp",
    "input_shape",
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
    evaluations of the image with dataset index ``indices[i]`` (true label ``labels[i]``; ``labels`` is
    None for an unlabeled pool: ``require_labels`` says so where labels are needed)."""

    indices: np.ndarray
    labels: np.ndarray | None
    counts: np.ndarray
    counts_select: np.ndarray | None
    attrs: dict = field(default_factory=dict)
    samples: np.ndarray | None = None
    counts_topup: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def require_labels(self, what: str, path="this counts file") -> np.ndarray:
        """``labels``, or a StoreError naming what needed them (the counts of an unlabeled pool have none)."""
        if self.labels is None:
            raise StoreError(
                f"{path} holds counts of an unlabeled pool ({self.attrs.get('dataset')}): {what} needs "
                "labels; give counts of a labelled split for it (the pool's counts train the surrogate)"
            )
        return self.labels

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def sigma(self) -> float:
        return float(self.attrs["sigma"])

    @property
    def n(self) -> int:
        return int(self.attrs["n"])

    @property
    def topped_up(self) -> bool:
        """Whether any row has estimation samples beyond ``n`` (``samples`` and ``counts_topup``)."""
        return self.samples is not None and bool(np.any(self.samples > self.n))

    @property
    def noise_scheme(self) -> str | None:
        """The scheme the counts were drawn with (None in files older than the attribute: float noise)."""
        return self.attrs.get("noise_scheme")

    @property
    def radius_slack(self) -> float:
        """The ``slack`` of every radius computed from these counts (``smoothing.noise_slack``): 0 for float noise."""
        return noise_slack(self.noise_scheme, self.sigma, self.attrs["input_shape"])

    @property
    def planned_max_samples(self) -> int:
        """The most estimation samples a row may hold: ``topup_planned_max`` of a topped-up file, else ``n``."""
        return int(self.attrs.get("topup_planned_max") or self.n)

    def samples_per_row(self) -> np.ndarray:
        """Estimation samples of each row: ``samples`` where recorded, else ``n`` for every row."""
        return self.samples if self.samples is not None else np.full(len(self), self.n, dtype=np.int64)

    def counts_all(self) -> np.ndarray:
        """Class counts over every estimation sample of each row (``counts`` plus ``counts_topup``)."""
        return self.counts if self.counts_topup is None else self.counts + self.counts_topup

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
        return load_images(str(self.attrs["dataset"]), str(self.attrs["split"]), self.indices, data_root=data_root).x


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
        problem = file_problem(path) if os.path.lexists(path) else "does not exist"
        raise StoreError(f"counts file {path} {problem}; create it with `surrogate-cert datagen ... --out {path}`")
    kind = sniff(path)
    if kind != "hdf5":
        raise StoreError(wrong_kind(path, kind, "counts"))
    try:
        return _open_h5(path, "r")
    except OSError as exc:
        raise StoreError(
            f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]}); "
            "regenerate it with `surrogate-cert datagen`"
        ) from None


def _checked_attrs(h5: h5py.File, path) -> dict:
    """The file's attributes, checked against its format and against its own datasets (StoreError)."""
    attrs = {key: _plain(value) for key, value in h5.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path} is an HDF5 file but not a surrogate-cert counts file (no format={FORMAT!r} "
            "attribute); create one with `surrogate-cert datagen`"
        )
    if attrs.get("format_version") not in READ_VERSIONS:
        raise StoreError(
            f"{path} has counts format version {attrs.get('format_version')}, this package reads "
            f"versions {', '.join(map(str, READ_VERSIONS))}; regenerate it with this version's "
            "`surrogate-cert datagen`"
        )
    missing = [key for key in REQUIRED_KEYS if key not in attrs]
    labeled = attrs["format_version"] == FORMAT_VERSION
    if missing or "indices" not in h5 or ("labels" in h5) != labeled or "counts" not in h5:
        raise StoreError(
            f"{path} is missing {missing or 'datasets'} (or has labels its version "
            f"{attrs['format_version']} does not have); the file is damaged, regenerate it"
        )
    attrs = {key: (None if value == "none" else value) for key, value in attrs.items()}
    attrs["complete"] = bool(attrs["complete"])
    problems = _attr_problems(attrs)
    if not problems:
        attrs["input_shape"] = [int(v) for v in attrs["input_shape"]]
        problems = _layout_problems(h5, attrs)
    if problems:
        raise StoreError(
            f"{path} contradicts itself: "
            + "; ".join(problems)
            + "; the file is damaged or was edited, regenerate it with `surrogate-cert datagen`"
        )
    return attrs


def _whole(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _attr_problems(attrs: dict) -> list[str]:
    problems = []
    sigma = attrs["sigma"]
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and SIGMA_MIN <= sigma <= SIGMA_MAX):
        problems.append(
            f"sigma {sigma!r} is not a noise level in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] (core.errors.check_sigma)"
        )
    for key, minimum in (("n", 1), ("n0", 0), ("num_classes", 2), ("rows", 0)):
        if not _whole(attrs[key], minimum):
            problems.append(f"{key} {attrs[key]!r} is not an integer >= {minimum}")
    shape = attrs["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_whole(v, 1) for v in shape)):
        problems.append(f"input_shape {shape!r} is not three positive integers (C, H, W)")
    if _whole(attrs["n"], 1) and _whole(attrs["n0"], 0) and attrs["n"] + attrs["n0"] >= 2**32:
        problems.append("n + n0 does not fit the uint32 counts")
    return problems


def _layout_problems(h5: h5py.File, attrs: dict) -> list[str]:
    """The datasets' shapes and types against the attributes (no data read)."""
    planned, k, rows = len(h5["indices"]), attrs["num_classes"], attrs["rows"]
    problems = []
    if ("labels" in h5 and h5["labels"].shape != (planned,)) or h5["indices"].ndim != 1:
        problems.append(f"indices {h5['indices'].shape} and labels {h5['labels'].shape} differ in length")
    for name in ("counts", "counts_select"):
        if name in h5:
            if h5[name].shape != (planned, k):
                problems.append(f"{name} has shape {h5[name].shape}, expected {planned} x {k} (rows x num_classes)")
            if not np.issubdtype(h5[name].dtype, np.integer):
                problems.append(f"{name} holds {h5[name].dtype}, not integer counts")
    if ("counts_select" in h5) != (attrs["n0"] > 0):
        problems.append(f"counts_select is {'present' if 'counts_select' in h5 else 'absent'} but n0 = {attrs['n0']}")
    if ("samples" in h5) != ("counts_topup" in h5):
        problems.append("samples and counts_topup must come together (a topped-up file has both)")
    elif "samples" in h5:
        if h5["samples"].shape != (planned,) or not np.issubdtype(h5["samples"].dtype, np.integer):
            problems.append(
                f"samples has shape {h5['samples'].shape} ({h5['samples'].dtype}), expected {planned} integers"
            )
        if h5["counts_topup"].shape != (planned, k) or not np.issubdtype(h5["counts_topup"].dtype, np.integer):
            problems.append(
                f"counts_topup has shape {h5['counts_topup'].shape}, expected {planned} x {k} integer counts"
            )
        top = attrs.get("topup_planned_max")
        if not (_whole(top, 1) and top >= attrs["n"]):
            problems.append(f"topup_planned_max {top!r} is not an integer >= n = {attrs['n']}")
        if not attrs["complete"]:
            problems.append("a topped-up file must be complete")
    if rows > planned:
        problems.append(f"rows = {rows} committed but only {planned} planned")
    if attrs["complete"] and rows != planned:
        problems.append(f"complete but only {rows} of {planned} rows committed")
    return problems


def _row_problems(counts: CountsFile) -> list[str]:
    """The committed rows against the attributes: counts sum to n (n0), labels are classes, indices unique."""
    problems = []
    k = counts.num_classes
    for name, table, total in (
        ("counts", counts.counts, counts.n),
        ("counts_select", counts.counts_select, int(counts.attrs["n0"])),
    ):
        if table is None or not len(table):
            continue
        if table.min() < 0:  # a signed dtype can hide a negative count in a row that still sums to n
            row = int(np.argmin(table.min(axis=1)))
            problems.append(f"{name} holds a negative count ({int(table.min())}, row {row})")
            continue
        sums = table.sum(axis=1)
        bad = np.flatnonzero(sums != total)
        if bad.size:
            problems.append(
                f"{bad.size} of {len(table)} rows of {name} do not sum to "
                f"{'n' if name == 'counts' else 'n0'} = {total} (row {int(bad[0])} sums to {int(sums[bad[0]])})"
            )
    if counts.samples is not None and len(counts.samples):
        n, top = counts.n, int(counts.attrs["topup_planned_max"])
        low, high = int(counts.samples.min()), int(counts.samples.max())
        if low < n or high > top:
            problems.append(f"samples per row lie in {low}..{high}, outside n = {n} .. topup_planned_max = {top}")
        topup = cast(np.ndarray, counts.counts_topup)  # present with samples (the layout check above)
        if topup.size and topup.min() < 0:
            problems.append(f"counts_topup holds a negative count ({int(topup.min())})")
        sums = topup.sum(axis=1)
        bad = np.flatnonzero(sums != counts.samples - n)
        if bad.size:
            problems.append(
                f"{bad.size} rows of counts_topup do not sum to samples - n (row {int(bad[0])} sums to "
                f"{int(sums[bad[0]])}, expected {int(counts.samples[bad[0]] - n)})"
            )
    if counts.labels is not None and len(counts.labels) and (counts.labels.min() < 0 or counts.labels.max() >= k):
        bad = counts.labels[(counts.labels < 0) | (counts.labels >= k)]
        problems.append(f"label {int(bad[0])} is not a class of {k}")
    if len(counts.indices) and (counts.indices.min() < 0 or len(np.unique(counts.indices)) != len(counts.indices)):
        problems.append("dataset indices are negative or repeated")
    return problems


def read_counts(path: str | os.PathLike) -> CountsFile:
    """Read the committed rows of a counts file, checked against its own attributes.

    Rows beyond the committed counter are ignored. Every committed row must be consistent with the
    attributes: ``counts`` rows sum to ``n`` and ``counts_select`` rows to ``n0``, labels are classes
    ``0..num_classes-1``, dataset indices are unique and >= 0, datasets have the recorded shapes.
    Whether the file suits a consumer (its dataset, sigma, base model, ...) is ``check_counts_for``.

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
        If the file is missing, is not a counts file of this format version (e.g. a JSON, text or
        model file), contradicts its own attributes, or a chunk fails its checksum.
    """
    with _reader(path) as h5:
        attrs = _checked_attrs(h5, path)
        rows = int(attrs["rows"])
        try:
            counts_select = h5["counts_select"][:rows].astype(np.int64) if "counts_select" in h5 else None
            counts = CountsFile(
                indices=h5["indices"][:rows].astype(np.int64),
                labels=h5["labels"][:rows].astype(np.int64) if "labels" in h5 else None,
                counts=h5["counts"][:rows].astype(np.int64),
                counts_select=counts_select,
                attrs=attrs,
                samples=h5["samples"][:rows].astype(np.int64) if "samples" in h5 else None,
                counts_topup=h5["counts_topup"][:rows].astype(np.int64) if "counts_topup" in h5 else None,
            )
        except (OSError, TypeError, ValueError) as exc:
            raise StoreError(
                f"{path}: reading failed ({str(exc).splitlines()[0]}); the file is damaged, regenerate it"
            ) from None
    problems = _row_problems(counts)
    if problems:
        raise StoreError(
            f"{path} contradicts itself: "
            + "; ".join(problems)
            + "; the file is damaged or was edited, regenerate it with `surrogate-cert datagen`"
        )
    return counts


# --------------------------------------------------------------------------- consumers


def index_ranges(indices) -> list[list[int]]:
    """An exact, compact record of a set of dataset indices: sorted half-open ranges ``[[lo, hi], ...]``.

    Contiguous indices (a torchvision training set, ``--limit`` of it) take one range; a random subset
    takes about one range per index. Plain integers, so the record fits a checkpoint's metadata.

    Parameters
    ----------
    indices : array_like of int
        Dataset indices (any order, repeats allowed).

    Returns
    -------
    list of [int, int]
        Disjoint, sorted ``[lo, hi)`` ranges whose union is the set of ``indices``.

    Examples
    --------
    >>> index_ranges([5, 0, 1, 2, 9, 6])
    [[0, 3], [5, 7], [9, 10]]
    """
    values = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
    if not values.size:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate([[values[0]], values[breaks + 1]])
    stops = np.concatenate([values[breaks], [values[-1]]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def in_ranges(indices, ranges) -> np.ndarray:
    """Which of ``indices`` lie in the ``index_ranges`` record ``ranges`` (a boolean array).

    Raises
    ------
    StoreError
        If ``ranges`` is not a list of ``[lo, hi]`` integer pairs with ``lo < hi``, sorted and disjoint.
    """
    try:
        table = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        valid = bool(np.all(table[:, 0] < table[:, 1]) and np.all(table[1:, 0] >= table[:-1, 1]))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise StoreError(
            "the recorded training indices are malformed (expected sorted [lo, hi) pairs); "
            "retrain the surrogate with `surrogate-cert train`"
        )
    values = np.asarray(indices, dtype=np.int64).reshape(-1)
    slot = np.searchsorted(table[:, 0], values, side="right") - 1
    inside = slot >= 0
    inside[inside] = values[inside] < table[slot[inside], 1]
    return inside


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def check_counts_for(
    counts: CountsFile,
    path: str | os.PathLike = "counts file",
    *,
    dataset: str | None = None,
    sigma: float | None = None,
    num_classes: int | None = None,
    input_shape=None,
    model_sha256: str | None = None,
    complete: bool = True,
    excluded_indices=None,
    excluded_what: str = "the surrogate's training images",
    key: bytes | str | None = None,
    noise_scheme: str | None = None,
) -> None:
    """Refuse a counts file that does not fit its consumer (one place for every such check).

    Every argument left ``None`` is not checked; a model digest is compared only where the file
    records one.

    Parameters
    ----------
    counts : CountsFile
        As ``read_counts`` returned it (already consistent with itself).
    path : str or os.PathLike, optional
        Its path, for the messages.
    dataset : str, optional
        The dataset the consumer was made from (``datasets.same_dataset`` decides).
    sigma : float, optional
        The noise level the consumer expects.
    num_classes : int, optional
        The class count the consumer expects.
    input_shape : sequence of int, optional
        The ``(C, H, W)`` the consumer expects.
    model_sha256 : str, optional
        The base model the consumer's other counts were made with.
    complete : bool, optional
        Require every planned row to be committed (default).
    excluded_indices : list of [int, int], optional
        ``index_ranges`` of images the consumer must not see in this file (the surrogate's training
        images, for a calibration).
    excluded_what : str, optional
        What the excluded images are, for the message.
    key : bytes or str, optional
        The signing key (default: the environment's, ``core.signing.resolve_key``); with one, the file
        must be signed under it (``data_gen.signatures.check_counts_signature``).
    noise_scheme : str, optional
        A scheme of the family the consumer was made with (``smoothing.noise_family``: float or sound);
        the file's must be of the same family (v1 and v2 files mix; sound files mix with no float one).

    Raises
    ------
    CountsMismatchError
        At the first mismatch, naming both values and what to do.
    CountsSignatureError
        If a key is configured and the file is unsigned, signed with another key, or edited after signing.
    """
    secret = resolve_key(key)
    if secret is not None:
        check_counts_signature(counts, path, secret)
    attrs = counts.attrs
    if dataset is not None and not same_dataset(str(attrs["dataset"]), dataset):
        raise CountsMismatchError(
            f"{path} holds counts of dataset {attrs['dataset']!r} but {dataset!r} is expected; "
            "use counts of the same dataset"
        )
    if sigma is not None and not np.isclose(float(attrs["sigma"]), float(sigma), rtol=1e-9, atol=0.0):
        raise CountsMismatchError(
            f"{path} was made at sigma={attrs['sigma']} but sigma={sigma} is expected; "
            "use counts made at the same sigma"
        )
    if num_classes is not None and int(attrs["num_classes"]) != int(num_classes):
        raise CountsMismatchError(
            f"{path} has {attrs['num_classes']} classes but {num_classes} are expected; use counts of the same dataset"
        )
    if input_shape is not None and list(attrs["input_shape"]) != [int(v) for v in input_shape]:
        raise CountsMismatchError(
            f"{path} holds images of shape {tuple(attrs['input_shape'])} but "
            f"{tuple(int(v) for v in input_shape)} are expected; use counts of the same dataset"
        )
    if model_sha256 and attrs.get("model_sha256") and attrs["model_sha256"] != model_sha256:
        raise CountsMismatchError(
            f"{path} was made with another base model (SHA-256 {str(attrs['model_sha256'])[:12]}"
            f"... vs {model_sha256[:12]}...); use counts of the same base model"
        )
    if noise_scheme is not None and noise_family(attrs.get("noise_scheme")) != noise_family(noise_scheme):
        raise CountsMismatchError(
            f"{path} was drawn with noise scheme {attrs.get('noise_scheme')} but "
            f"{noise_scheme} is expected: certificates never mix float and sound (grid) "
            f"noise; make the counts with datagen --noise-scheme {noise_scheme}"
        )
    if complete and not attrs.get("complete", True):
        raise CountsMismatchError(
            f"{path} is incomplete ({len(counts)} rows committed); finish it with `surrogate-cert datagen ... --resume`"
        )
    if excluded_indices is not None:
        overlap = in_ranges(counts.indices, excluded_indices)
        if overlap.any():
            raise CountsMismatchError(
                f"{path} holds {int(overlap.sum())} of {excluded_what} "
                f"(dataset index {int(counts.indices[overlap][0])} "
                f"and more); use counts of images disjoint from them (the cal split)"
            )


# --------------------------------------------------------------------------- top-up


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def write_topup(
    path: str | os.PathLike, samples: np.ndarray, counts_topup: np.ndarray, *, planned_max: int, rule: str, record: dict
) -> CountsFile:
    """Store the top-up of a complete counts file: per-row ``samples`` and the extra counts ``counts_topup``.

    The file is copied, the copy updated and renamed into place under the writer lock, so an
    interruption leaves the previous file intact. A top-up only adds samples: every row keeps at least
    its earlier ``samples`` and ``counts_topup`` (a second top-up continues the first).

    Parameters
    ----------
    path : str or os.PathLike
        A complete counts file.
    samples : numpy.ndarray
        Estimation samples per row after the top-up (``n`` where a row got none), each ``<= planned_max``.
    counts_topup : numpy.ndarray
        ``N x K`` counts of each row's samples beyond ``n``; row ``i`` sums to ``samples[i] - n``.
    planned_max : int
        The most estimation samples a row may ever reach (fixed before the top-up; the calibration's
        radius cap is computed from it).
    rule : str
        The rule that picked the rows (recorded; e.g. ``"all-agree"``).
    record : dict
        What this top-up did (appended to the JSON attribute ``topup_history``).

    Returns
    -------
    CountsFile
        The file as read back (validated).

    Raises
    ------
    StoreError
        If the file is missing, incomplete, locked by another writer, or the top-up would remove samples
        or contradict the file.
    """
    path = os.fspath(path)
    lock = _Lock(path).acquire()
    try:
        before = read_counts(path)
        if not before.attrs["complete"]:
            raise StoreError(
                f"{path} is incomplete; finish it with `surrogate-cert datagen ... --resume` before a top-up"
            )
        samples = np.asarray(samples, dtype=np.int64)
        counts_topup = np.asarray(counts_topup, dtype=np.int64)
        n, rows = before.n, len(before)
        if samples.shape != (rows,) or counts_topup.shape != before.counts.shape:
            raise StoreError(f"{path}: a top-up needs {rows} sample numbers and {rows} x {before.num_classes} counts")
        old_samples = before.samples_per_row()
        old_topup = before.counts_topup if before.counts_topup is not None else np.zeros_like(before.counts)
        if np.any(samples < old_samples) or np.any(counts_topup < old_topup):
            raise StoreError(f"{path}: a top-up may only add samples")
        if np.any(counts_topup.sum(axis=1) != samples - n) or samples.max(initial=n) > planned_max:
            raise StoreError(f"{path}: top-up counts must sum to samples - n and stay within planned_max={planned_max}")
        if before.attrs.get("topup_planned_max") not in (None, int(planned_max)):
            raise StoreError(
                f"{path} was topped up with planned maximum {before.attrs['topup_planned_max']} samples; "
                f"a further top-up must keep it (asked {planned_max}): the calibration's cap depends on it"
            )
        history = json.loads(before.attrs.get("topup_history") or "[]") + [record]
        with atomic_output(path, overwrite=True) as tmp:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "r+") as h5:
                for name in ("samples", "counts_topup"):
                    if name in h5:
                        del h5[name]
                chunk = min(rows, 8192)
                h5.create_dataset("samples", data=samples, chunks=(chunk,), **_filters())
                h5.create_dataset(
                    "counts_topup",
                    data=counts_topup.astype(COUNTS_DTYPE),
                    chunks=(_chunk_rows(rows, before.num_classes), before.num_classes),
                    **_filters(),
                )
                h5.attrs["topup_rule"] = rule
                h5.attrs["topup_planned_max"] = int(planned_max)
                h5.attrs["topup_history"] = json.dumps(history)
                for name in SIGNATURE_ATTRS:  # the content changed: the caller signs it again (sign_counts)
                    if name in h5.attrs:
                        del h5.attrs[name]
        return read_counts(path)
    finally:
        lock.release()


def sign_counts(path: str | os.PathLike, key: bytes | str | None = None, *, lock_held: bool = False) -> bool:
    """Sign a complete counts file under the configured key (``data_gen.signatures``); False without a key.

    A file already signed is checked first (``check_counts_signature``), so a file edited after its
    signature is refused rather than signed again.

    Parameters
    ----------
    path : str or os.PathLike
        A complete counts file.
    key : bytes or str, optional
        The signing key (default: the environment's).
    lock_held : bool, optional
        The caller holds ``path``'s writer lock (``lock_counts_file``); else it is taken here.

    Returns
    -------
    bool
        Whether the file was signed (a key was configured).

    Raises
    ------
    StoreError
        If the file is missing, incomplete, contradicts itself, or is being written by another process.
    CountsSignatureError
        If it carries a signature that does not verify under the key.
    """
    secret = resolve_key(key)
    if secret is None:
        return False
    path = os.fspath(path)
    lock = None if lock_held else _Lock(path).acquire()
    try:
        counts = read_counts(path)
        if not counts.attrs["complete"]:
            raise StoreError(
                f"{path} is incomplete: only a complete counts file is signed; finish it with "
                "`surrogate-cert datagen ... --resume`"
            )
        if counts.attrs.get(SIGNATURE_ATTRS[1]) is not None:
            check_counts_signature(counts, path, secret)
        try:
            with _open_h5(path, "r+") as h5:
                for name, value in signature_attrs(counts, secret).items():
                    h5.attrs[name] = value
        except OSError as exc:
            raise StoreError(f"cannot sign {path} ({str(exc).splitlines()[0]})") from None
    finally:
        if lock is not None:
            lock.release()
    return True


# --------------------------------------------------------------------------- writing
class _Lock:
    """Exclusive, non-blocking ``flock`` on ``path + '.lock'`` (which holds the holder's process id);
    removed again on release."""

    def __init__(self, target: str):
        self.path = target + ".lock"
        self.target = target
        self.fd: int | None = None

    def acquire(self) -> _Lock:
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
        raise StoreError(
            f"could not lock {self.path}: it keeps being replaced; is another job running on {self.target}?"
        )

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

    def __init__(
        self,
        path: str,
        lock: _Lock,
        committed: int,
        total: int,
        with_select: bool,
        attrs: Mapping[str, Any] | None = None,
    ):
        self.path = path
        self._lock = lock
        self.committed = committed
        self.total = total
        self.with_select = with_select
        attrs = attrs or {}
        # What every appended row must satisfy (None: not known, not checked).
        self.num_classes = int(attrs["num_classes"]) if attrs.get("num_classes") is not None else None
        self.n = int(attrs["n"]) if attrs.get("n") is not None else None
        self.n0 = int(attrs.get("n0") or 0)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        indices: np.ndarray,
        labels: np.ndarray | None,
        attrs: Mapping[str, Any],
        resume: bool = False,
        overwrite: bool = False,
    ) -> CountsWriter:
        """Create ``path`` (refused if it exists, unless ``resume`` or ``overwrite``) or resume it.

        A resumed file must have the same identity attributes (``IDENTITY_KEYS``) and the same
        planned indices and labels; otherwise StoreError, and the file is left untouched. The writer
        holds the file's lock until it is closed; use it as a context manager.

        Parameters
        ----------
        path : str or os.PathLike
            The counts file.
        indices : numpy.ndarray
            Dataset index of every planned row.
        labels : numpy.ndarray or None
            True label of every planned row; None for an unlabeled pool (the file is then written with
            ``UNLABELED_VERSION`` and no ``labels``).
        attrs : mapping
            The file's attributes (at least ``IDENTITY_KEYS`` and ``package_version``; see the module
            docstring).
        resume : bool, optional
            Continue an existing file instead of refusing it.
        overwrite : bool, optional
            Replace an existing file (start again from row 0); ignored with ``resume``. The old file
            stays in place until the new one is complete enough to be linked in (its first, empty
            commit), under the writer lock.

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
        attrs = {**attrs, "format_version": format_version_for(labels)}
        lock = _Lock(path).acquire()
        try:
            with_select = int(attrs.get("n0", 0)) > 0
            if os.path.exists(path) and resume:
                committed = cls._check_resume(path, indices, labels, attrs)
            elif os.path.exists(path) and not overwrite:
                raise CountsFileExistsError(
                    f"{path} already exists; pass --resume to continue it, --overwrite to start "
                    "it again, or choose another --out"
                )
            else:
                cls._create(path, indices, labels, attrs, with_select, replace=overwrite)
                committed = 0
            return cls(path, lock, committed, len(indices), with_select, attrs)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _create(path, indices, labels, attrs, with_select, replace: bool = False) -> None:
        if len(indices) < 1:
            raise StoreError("nothing to write: the split has no rows; check --limit and the dataset")
        _write_new(path, lambda tmp: _build(tmp, indices, labels, attrs, with_select), replace=replace)

    @staticmethod
    def _check_resume(path, indices, labels, attrs) -> int:
        with _reader(path) as h5:
            stored = _checked_attrs(h5, path)
            want = _identity(attrs)
            have = _identity(stored)
            diff = [
                f"{key} {have[key]!r} in the file vs {want[key]!r} requested"
                for key in IDENTITY_KEYS
                if _differs(have[key], want[key])
            ]
            if diff:
                raise ResumeMismatchError(
                    f"cannot resume {path}: "
                    + "; ".join(diff)
                    + "; rerun with the file's settings or choose another --out"
                )
            same_rows = (
                len(h5["indices"]) == len(indices)
                and np.array_equal(h5["indices"][:], indices)
                and ("labels" in h5) == (labels is not None)
                and (labels is None or np.array_equal(h5["labels"][:], labels))
            )
            if not same_rows:
                if stored.get("split") == "train" and not np.isin(h5["indices"][:], indices).all():
                    raise ResumeMismatchError(
                        f"cannot resume {path}: it was started before the surrogate split was carved out of the train "
                        "block (version 0.3), so it plans images that are no longer in the train split; its committed "
                        "rows still read (train, calibrate and report accept it), but to finish it start it again "
                        "with --overwrite, or count the new train and surrogate splits"
                    )
                raise ResumeMismatchError(
                    f"cannot resume {path}: it plans different images ({len(h5['indices'])} rows) than "
                    f"this request ({len(indices)} rows); use the same --dataset/--split/--limit"
                )
            if ("counts_select" in h5) != (int(stored["n0"]) > 0):
                raise StoreError(f"cannot resume {path}: counts_select presence does not match n0; the file is damaged")
            return int(stored["rows"])

    # ---------------------------------------------------------------- writing
    def append(self, counts: np.ndarray, counts_select: np.ndarray | None = None) -> None:
        """Write the next ``len(counts)`` rows, then (after they are flushed) advance ``rows``.

        Parameters
        ----------
        counts : numpy.ndarray
            ``rows x K`` integer class counts of the estimation stream, in planned row order; every row
            sums to the file's ``n``.
        counts_select : numpy.ndarray, optional
            The same rows' selection counts (each row sums to ``n0``); given exactly when the file has
            ``n0 > 0``.

        Raises
        ------
        StoreError
            If the rows would exceed the planned rows, ``counts_select`` is given when it must not be
            (or missing when it must), a table is not ``rows x K`` non-negative integers summing to
            ``n`` (``n0``) per row, or writing fails (committed rows are kept).
        """
        if self.with_select != (counts_select is not None):
            raise StoreError(f"{self.path}: counts_select must be given exactly when n0 > 0")
        counts = self._checked_rows(counts, "counts", self.n)
        lo, hi = self.committed, self.committed + len(counts)
        if hi > self.total:
            raise StoreError(f"{self.path}: {hi} rows exceed the {self.total} planned rows")
        if counts_select is not None:
            counts_select = self._checked_rows(counts_select, "counts_select", self.n0)
            if len(counts_select) != len(counts):
                raise StoreError(f"{self.path}: {len(counts_select)} rows of counts_select for {len(counts)} of counts")
        try:
            with _open_h5(self.path, "r+") as h5:
                h5["counts"][lo:hi] = counts
                if counts_select is not None:
                    h5["counts_select"][lo:hi] = counts_select
                h5.flush()
                h5.attrs["rows"] = hi
                if hi == self.total:
                    h5.attrs["complete"] = True
        except OSError as exc:
            raise StoreError(
                f"cannot write {self.path} ({str(exc).splitlines()[0]}); committed rows are kept, "
                "fix the problem and rerun with --resume"
            ) from None
        self.committed = hi

    def _checked_rows(self, table, name: str, total: int | None) -> np.ndarray:
        """``table`` as uint32 after checking it is rows x K of whole numbers >= 0 summing to ``total``."""
        arr = np.asarray(table)
        k = self.num_classes
        if arr.ndim != 2 or (k is not None and arr.shape[1] != k):
            raise StoreError(
                f"{self.path}: {name} must be rows x {k if k is not None else 'K'} (the file's classes), "
                f"got shape {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise StoreError(f"{self.path}: {name} must hold integer counts, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
            raise StoreError(f"{self.path}: {name} must lie in [0, 2**32), got {int(arr.min())}..{int(arr.max())}")
        if total is not None and arr.size and np.any(arr.sum(axis=1) != total):
            raise StoreError(
                f"{self.path}: every row of {name} must sum to {total} (the file's {'n' if name == 'counts' else 'n0'})"
            )
        return arr.astype(COUNTS_DTYPE)

    @property
    def complete(self) -> bool:
        return self.committed >= self.total

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> CountsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _build(
    tmp: str, indices, labels, attrs: Mapping[str, Any], with_select: bool, counts=None, counts_select=None
) -> None:
    """Write a complete counts file at ``tmp``: no rows committed, or all of them when ``counts`` is given."""
    num_rows, k = len(indices), int(attrs["num_classes"])
    with h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = format_version_for(labels)
        for key, value in attrs.items():
            if value is None:
                value = "none"
            h5.attrs[key] = value
        h5.attrs["rows"] = 0 if counts is None else num_rows
        h5.attrs["complete"] = counts is not None
        row_chunk = min(num_rows, 8192)
        h5.create_dataset("indices", data=np.asarray(indices, np.int64), chunks=(row_chunk,), **_filters())
        if labels is not None:
            h5.create_dataset("labels", data=np.asarray(labels, np.int64), chunks=(row_chunk,), **_filters())
        names = ["counts"] + (["counts_select"] if with_select else [])
        for name, data in zip(names, (counts, counts_select)):
            h5.create_dataset(
                name,
                shape=(num_rows, k),
                dtype=COUNTS_DTYPE,
                chunks=(_chunk_rows(num_rows, k), k),
                fillvalue=0,
                **_filters(),
            )
            if data is not None:
                h5[name][:] = np.asarray(data).astype(COUNTS_DTYPE)


def _write_new(path: str, build, replace: bool = False) -> None:
    """``build(tmp)`` a file under a temporary name, then put it at ``path`` (``core.files.atomic_output``).

    Without ``replace`` the file is linked into place, which refuses an existing target: a concurrent
    creator can never be overwritten (``CountsFileExistsError``).
    """
    try:
        with atomic_output(path, overwrite=replace) as tmp:
            build(tmp)
    except OutputExistsError as exc:
        raise CountsFileExistsError(str(exc)) from None
    except OSError as exc:
        raise StoreError(f"cannot write {path} ({str(exc).splitlines()[0]}); choose a writable --out") from None


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
        match = _SHARD_NAME.search(candidate[len(path) :])
        if match and candidate[len(path) :] == match.group(0):
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
        raise ShardError(
            f"{path} has shards of an unfinished torchrun job with {size} processes ({paths[0]}, ...); "
            f"finish it with the same torchrun command (world size {size}) and --resume, or delete "
            f"{path}.shard-* to start over"
        )


def open_shard(
    path: str | os.PathLike,
    rank: int,
    world_size: int,
    *,
    indices: np.ndarray,
    labels: np.ndarray | None,
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
    return CountsWriter.open(
        shard_path(path, rank, world_size),
        indices=np.asarray(indices)[rows],
        labels=None if labels is None else np.asarray(labels)[rows],
        attrs={**attrs, "shard_rank": int(rank), "shard_count": int(world_size)},
        resume=resume,
    )


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


def check_sharded_job(
    path: str | os.PathLike,
    world_size: int,
    *,
    indices: np.ndarray,
    labels: np.ndarray | None,
    attrs: Mapping[str, Any],
    resume: bool,
) -> bool:
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
        committed = CountsWriter._check_resume(
            path, indices, labels, {**attrs, "format_version": format_version_for(labels)}
        )
        if committed >= len(indices):
            return True
        raise ShardError(
            f"{path} is an unfinished one-process datagen file ({committed} of {len(indices)} rows); "
            "finish it without torchrun, with the same command and --resume"
        )
    shards = find_shards(path)
    others = {size: paths for size, paths in shards.items() if size != world_size}
    if others:
        size, paths = next(iter(others.items()))
        raise ShardError(
            f"{path} has shards of a torchrun job with {size} processes ({paths[0]}, ...), this one has "
            f"{world_size}; relaunch with {size} processes and --resume, or delete {path}.shard-* to "
            "start over"
        )
    if shards.get(world_size) and not resume:
        raise ShardError(
            f"{path} has shards of an unfinished job ({shards[world_size][0]}, ...); pass --resume to "
            "continue them, or delete them to start over"
        )
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


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def merge_shards(
    path: str | os.PathLike,
    world_size: int,
    *,
    indices: np.ndarray,
    labels: np.ndarray | None,
    attrs: Mapping[str, Any],
    lock_held: bool = False,
) -> None:
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
    attrs = {**attrs, "format_version": format_version_for(labels)}
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
                raise ShardError(
                    f"cannot merge {path}: shard {shard} is missing; relaunch the same torchrun "
                    "command with --resume to redo it"
                )
            locks.append(_Lock(shard).acquire())
            part = read_counts(shard)
            have = _identity(part.attrs)
            diff = [f"{key} {have[key]!r} vs {want[key]!r}" for key in IDENTITY_KEYS if _differs(have[key], want[key])]
            if diff or (part.attrs.get("shard_rank"), part.attrs.get("shard_count")) != (rank, world_size):
                diff = diff or [
                    f"shard_rank/shard_count {part.attrs.get('shard_rank')}/{part.attrs.get('shard_count')}"
                ]
                raise ShardError(
                    f"cannot merge {path}: shard {shard} comes from another job ({'; '.join(diff)}); "
                    "delete it and relaunch with --resume"
                )
            rows = shard_positions(num_rows, rank, world_size)
            if not part.attrs["complete"] or len(part) != len(rows):
                raise ShardError(
                    f"cannot merge {path}: shard {shard} has {len(part)} of {len(rows)} rows; relaunch "
                    "the same torchrun command with --resume to finish it"
                )
            if not (
                np.array_equal(part.indices, np.asarray(indices)[rows])
                and (
                    labels is None
                    or (part.labels is not None and np.array_equal(part.labels, np.asarray(labels)[rows]))
                )
            ):
                raise ShardError(
                    f"cannot merge {path}: shard {shard} holds other images than this job plans; "
                    "delete it and relaunch with --resume"
                )
            counts[rows] = part.counts
            if with_select:
                if part.counts_select is None:
                    raise ShardError(f"cannot merge {path}: shard {shard} has no counts_select; the file is damaged")
                select = cast(np.ndarray, counts_select)  # allocated above whenever with_select
                select[rows] = part.counts_select
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
