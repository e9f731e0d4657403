"""Datasets and their fixed, seeded, disjoint splits ``train`` / ``surrogate`` / ``cal`` / ``test``.

Every image keeps its **dataset index**, an integer unique within the dataset, which seeds its
noise in the counting engine; so the same image gets the same noise whichever split, batch or
shard it is read in.

=================  ============  =====================================================================
spec               shape         splits (dataset indices)
=================  ============  =====================================================================
``digits``         1 x 8 x 8     scikit-learn's bundled 8x8 digits (1797 images, no download); a fixed
                                 random permutation split 750 / 250 / 400 / 397.
``mnist``          1 x 28 x 28   torchvision, from ``data_root``. ``surrogate`` = a fixed seeded random
``cifar10``        3 x 32 x 32   sixth of the official training set (10,000 MNIST images), ``train`` =
``cifar100``       3 x 32 x 32   the rest of it (indices in ``0..N_train-1``); ``cal`` and ``test`` =
                                 fixed random halves of the official test set (indices ``N_train + j``).
``imagefolder:P``  C x H x W     torchvision ``ImageFolder`` at ``P`` (one class per sub-folder, all
                                 images the same size); random split 45 / 15 / 20 / 20 %.
``npz:P``          C x H x W     ``np.load(P)`` with arrays ``x`` (N x C x H x W floats in [0, 1]) and
                                 ``y`` (N ints), optional scalar ``num_classes``; split 45 / 15 / 20 / 20 %.
                                 Without ``y``: an unlabeled pool (below).
``images:P``       C x H x W     every image file under folder ``P`` (sub-folders too, no classes; one
                                 size), in sorted path order: an unlabeled pool (below).
=================  ============  =====================================================================

**Unlabeled pools.** The surrogate learns the base model's counts, which need no label, so it can
train on any images from the deployment distribution that the base model never saw: an ``npz`` without
``y`` or an ``images:`` folder. Such a source has one split, ``pool`` (all its images, ``y`` None);
its counts files carry no ``labels`` (``data_gen.store``), and whatever needs labels (training a base
model, certified accuracy) says so and stops. A torchvision split serves as a pool as it is (its labels
are stored and never read by ``train``). The calibration later refuses calibration images the
surrogate was trained on by content (``image_hashes``), so a pool made of copies of them is caught.

``cal`` and ``test`` are random halves of one source, so they are exchangeable: the assumption
split conformal calibration rests on. Within a split, rows come in the split's (random) order, so
``limit`` takes a random subset of fixed size (the torchvision ``train`` split keeps ascending
dataset indices).

``surrogate`` holds images the built-in base model never sees (``train-base`` trains on ``train``
only): the surrogate learns the base model's behaviour on unseen images there, which is what a
deployment input is. A surrogate trained on images the base model fitted learns that hard images
do not exist (on MNIST the Monte Carlo majority equals the label on 99.8 % of the base model's own
training images against 98.8 % of unseen ones) and its calibrated radius comes out smaller. Using
your own base model that saw these images gains nothing (validity is unaffected either way).

Before the ``surrogate`` split existed, its images belonged to ``train`` (digits: 1000 images; torchvision:
the whole official training set; one-source sets: 60 %). Counts files of the old ``train`` split keep
their recorded dataset indices and still read (``load_images`` finds each image by its index); they
cannot be resumed (``--resume`` refuses them with a message).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch

from surrogate_cert.core.errors import DatasetError, InvalidInputError, InvalidParameterError
from surrogate_cert.core.files import read_npz
from surrogate_cert.core.smoothing import check_images

SPLITS = ("train", "surrogate", "cal", "test")
"""Split names of a labeled dataset, disjoint within it."""

POOL_SPLIT = "pool"
"""The one split of an unlabeled source (npz without ``y``, ``images:``): all its images."""

ALL_SPLITS = SPLITS + (POOL_SPLIT,)
"""Every split name ``load_split`` takes."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
"""File name endings an ``images:`` folder's images may have (case-insensitive); other files are skipped."""

SPLIT_SEED = 20_190_208
"""Seed of every split permutation (fixed forever: changing it changes every split)."""

DIGITS_SIZES = (1000, 400)
"""Sizes of digits' train block (``train`` + ``surrogate``) and of ``cal``; ``test`` gets the remaining 397."""

SINGLE_SOURCE_FRACTIONS = (0.6, 0.2)
"""Fractions of a one-source dataset (imagefolder, npz) in the train block (``train`` + ``surrogate``) and in
``cal``; ``test`` gets the rest."""

SURROGATE_SHARE_SINGLE_SOURCE = 0.25
"""Share of a one-source dataset's train block that forms the ``surrogate`` split (its last quarter, in the
fixed permutation's order): 250 of digits' 1000."""

SURROGATE_SHARE_TORCHVISION = 1 / 6
"""Share of a torchvision training set in the ``surrogate`` split: 10,000 of MNIST's 60,000."""

SURROGATE_SEED = SPLIT_SEED + 1
"""Seed of the random block of a torchvision training set that forms the ``surrogate`` split."""

TORCHVISION = {
    # name: (torchvision class, number of classes, files expected under data_root)
    "mnist": ("MNIST", 10, "MNIST/raw/train-images-idx3-ubyte (and t10k-*)"),
    "cifar10": ("CIFAR10", 10, "cifar-10-batches-py/data_batch_1..5 and test_batch"),
    "cifar100": ("CIFAR100", 100, "cifar-100-python/train and test"),
}

DATASET_HELP = (
    "digits, mnist, cifar10, cifar100, imagefolder:PATH or npz:PATH; unlabeled pools (split pool): "
    "npz:PATH without y, images:FOLDER"
)

DEFAULT_DATA_ROOT = os.path.join("~", ".cache", "surrogate-cert", "data")
"""Where torchvision datasets are looked for when no ``data_root`` is given."""


@dataclass
class SplitData:
    """One split of a dataset, in memory: images ``x`` (float32, N x C x H x W, in [0, 1]),
    labels ``y`` (int64; None for an unlabeled pool), and each row's dataset index (``indices``, NumPy
    int64). ``num_classes`` is None for an unlabeled source that does not declare it (the base model's
    output width then decides)."""

    dataset: str
    split: str
    x: torch.Tensor
    y: torch.Tensor | None
    indices: np.ndarray
    num_classes: int | None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return cast(tuple[int, int, int], tuple(int(v) for v in self.x.shape[1:]))

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def require_labels(self, what: str) -> torch.Tensor:
        """``y``, or a DatasetError naming what needed the labels (an unlabeled pool has none)."""
        if self.y is None:
            raise DatasetError(
                f"{self.dataset} ({self.split}) is an unlabeled pool: {what} needs labels; use it to "
                "train the surrogate (datagen, train), and labelled data for this"
            )
        return self.y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, indices: Sequence[int] | np.ndarray) -> SplitData:
        """The rows whose dataset indices are ``indices``, in that order (DatasetError if one is absent).

        Parameters
        ----------
        indices : sequence of int or numpy.ndarray
            Dataset indices, e.g. the ``indices`` of a counts file.

        Returns
        -------
        SplitData
            A new split with those rows (``x``, ``y``, ``indices``) in the order given.

        Raises
        ------
        DatasetError
            If an index is not in this split.
        """
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        order = np.argsort(self.indices, kind="stable")
        if len(order):
            rows = order[np.clip(np.searchsorted(self.indices, wanted, sorter=order), 0, len(order) - 1)]
            found = self.indices[rows] == wanted
        else:
            rows, found = np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
        if not found.all():
            missing = wanted[~found]
            raise DatasetError(
                f"{len(missing)} dataset indices (first: {int(missing[0])}) are not in the {self.split} split of "
                f"{self.dataset}; check that the counts file and the dataset/split/limit match"
            )
        take = torch.as_tensor(rows)
        return replace(self, x=self.x[take], y=None if self.y is None else self.y[take], indices=wanted.copy())


# --------------------------------------------------------------------------- split rules
def _permutation(n: int) -> np.ndarray:
    return np.random.default_rng(SPLIT_SEED).permutation(n).astype(np.int64)


def _single_source_split(n: int, split: str, sizes: tuple[int, int] | None = None) -> np.ndarray:
    """Dataset indices of ``split`` for a one-source dataset of ``n`` images (a fixed permutation).

    The permutation's first block is the train block (``sizes[0]`` images): ``train`` its first three
    quarters, ``surrogate`` its last quarter (``SURROGATE_SHARE_SINGLE_SOURCE``); then ``cal``, then ``test``.
    """
    if sizes is None:
        n_block = int(round(n * SINGLE_SOURCE_FRACTIONS[0]))
        n_cal = int(round(n * SINGLE_SOURCE_FRACTIONS[1]))
    else:
        n_block, n_cal = sizes
    n_surrogate = int(round(n_block * SURROGATE_SHARE_SINGLE_SOURCE))
    n_train = n_block - n_surrogate
    if min(n_train, n_surrogate, n_cal, n - n_block - n_cal) < 1:
        raise DatasetError(
            f"a dataset of {n} images is too small to split into train / surrogate / cal / test; use at least 7 images"
        )
    perm = _permutation(n)
    bounds = {
        "train": (0, n_train),
        "surrogate": (n_train, n_block),
        "cal": (n_block, n_block + n_cal),
        "test": (n_block + n_cal, n),
    }
    lo, hi = bounds[split]
    return perm[lo:hi]


def _torchvision_train_block(n_train: int, split: str) -> np.ndarray:
    """``train`` / ``surrogate`` of a torchvision set: a seeded random sixth of the official training set
    is ``surrogate`` (in random order), the rest ``train`` (ascending indices)."""
    n_surrogate = int(round(n_train * SURROGATE_SHARE_TORCHVISION))
    if min(n_surrogate, n_train - n_surrogate) < 1:
        raise DatasetError(f"a training set of {n_train} images is too small to split into train / surrogate")
    surrogate = np.random.default_rng(SURROGATE_SEED).permutation(n_train)[:n_surrogate].astype(np.int64)
    if split == "surrogate":
        return surrogate
    keep = np.ones(n_train, dtype=bool)
    keep[surrogate] = False
    return np.flatnonzero(keep).astype(np.int64)


def _test_halves(n_train: int, n_test: int, split: str) -> np.ndarray:
    """``cal`` / ``test`` of a torchvision set: fixed random halves of the official test set."""
    perm = _permutation(n_test)
    half = n_test // 2
    local = perm[:half] if split == "cal" else perm[half:]
    return local + n_train


def _apply_limit(indices: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None:
        return indices
    if isinstance(limit, bool) or int(limit) != limit or int(limit) < 1:
        raise InvalidParameterError(f"limit must be an integer >= 1, got {limit!r}")
    return indices[: int(limit)]


# --------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, bunch.target.astype(np.int64)


def _load_digits(split: str, limit: int | None):
    x, y = _digits_arrays()
    idx = _apply_limit(_single_source_split(len(y), split, DIGITS_SIZES), limit)
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), idx, 10


def _torchvision_set(name: str, train: bool, data_root: str | None, download: bool):
    import torchvision

    cls_name, _, expected = TORCHVISION[name]
    root = os.path.expanduser(data_root or DEFAULT_DATA_ROOT)
    try:
        return getattr(torchvision.datasets, cls_name)(root=root, train=train, download=download)
    except (RuntimeError, OSError) as exc:
        if download:
            raise DatasetError(
                f"could not download {name} into {root} ({str(exc).splitlines()[0]}); "
                "check the network or place the files there by hand"
            ) from None
        raise DatasetError(
            f"{name} not found under {root}: expected {expected}; pass --data-root FOLDER holding them, "
            "or add --download to fetch them"
        ) from None


def _as_nchw_float(data) -> np.ndarray:
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 3:  # MNIST: N x H x W
        arr = arr[:, None]
    else:  # CIFAR: N x H x W x C
        arr = arr.transpose(0, 3, 1, 2)
    return arr.astype(np.float32) / 255.0


def _load_torchvision(name: str, split: str, data_root, download, limit):
    train_set = _torchvision_set(name, True, data_root, download)
    n_train = len(train_set)
    num_classes = TORCHVISION[name][1]
    if split in ("train", "surrogate"):
        source, idx = train_set, _apply_limit(_torchvision_train_block(n_train, split), limit)
        local = idx
    else:
        source = _torchvision_set(name, False, data_root, download)
        idx = _apply_limit(_test_halves(n_train, len(source), split), limit)
        local = idx - n_train
    # Index the uint8 arrays directly: converting only the rows needed, without PIL round trips.
    x = _as_nchw_float(source.data[local] if isinstance(source.data, torch.Tensor) else np.asarray(source.data)[local])
    y = np.asarray(source.targets, dtype=np.int64)[local]
    return torch.from_numpy(x), torch.from_numpy(y), idx, num_classes


def _load_imagefolder(path: str, split: str, limit):
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    if not os.path.isdir(path):
        raise DatasetError(f"imagefolder:{path}: no such folder; give a folder with one sub-folder of images per class")
    try:
        folder = torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(
            f"imagefolder:{path}: {str(exc).splitlines()[0]}; expected one sub-folder of images per class"
        ) from None
    idx = _apply_limit(_single_source_split(len(folder), split), limit)
    images, labels = [], []
    for i in idx:
        img_path, label = folder.samples[int(i)]
        try:
            img = folder.loader(img_path)
        except OSError as exc:
            raise DatasetError(f"imagefolder:{path}: cannot read {img_path} ({exc}); remove or fix that file") from None
        images.append(pil_to_tensor(img))
        labels.append(label)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DatasetError(
            f"imagefolder:{path}: images have different shapes {sorted(shapes)[:3]}; resize them to one size first"
        )
    x = torch.stack(images).float() / 255.0
    return x, torch.tensor(labels, dtype=torch.int64), idx, len(folder.classes)


def _load_npz(path: str, split: str, limit):
    try:
        data = read_npz(path, "npz", DatasetError)
    except DatasetError as exc:
        raise DatasetError(f"npz:{exc}") from None
    if "x" not in data:
        raise DatasetError(f"npz:{path}: needs arrays named x and y (x alone: an unlabeled pool), found {sorted(data)}")
    x = data["x"]
    y = data["y"] if "y" in data else None
    num_classes = None
    if "num_classes" in data:
        k = data["num_classes"]
        if k.ndim != 0 or not np.issubdtype(k.dtype, np.integer) or int(k) < 2:
            raise DatasetError(
                f"npz:{path}: num_classes must be one integer >= 2, got an array of shape {k.shape} "
                f"and dtype {k.dtype}; store it as a plain integer (np.savez(..., num_classes=10))"
            )
        num_classes = int(k)
    if y is None:
        return _unlabeled(f"npz:{path}", x, split, limit, num_classes)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"npz:{path}: x must be N x C x H x W and y of length N, got x {x.shape} and y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"npz:{path}: y must hold non-negative integer labels, got dtype {y.dtype}")
    try:
        check_images(torch.from_numpy(np.ascontiguousarray(x)))
    except InvalidInputError as exc:
        raise InvalidInputError(f"npz:{path}: x: {exc}") from None
    if num_classes is None:
        num_classes = max(int(y.max()) + 1, 2) if len(y) else 2
    elif len(y) and int(y.max()) >= num_classes:
        raise DatasetError(f"npz:{path}: label {int(y.max())} >= num_classes {num_classes}; fix y or num_classes")
    idx = _apply_limit(_single_source_split(len(y), split), limit)
    return torch.from_numpy(x[idx].astype(np.float32)), torch.from_numpy(y[idx].astype(np.int64)), idx, num_classes


def _unlabeled(spec: str, x: np.ndarray, split: str, limit, num_classes: int | None):
    """An unlabeled pool: every image in split ``pool`` (dataset indices ``0..N-1``), no labels."""
    if split != POOL_SPLIT:
        raise DatasetError(
            f"{spec} has no labels: it is an unlabeled pool, whose only split is pool (for datagen and "
            f"train); {split} needs a labelled dataset"
        )
    if x.ndim != 4 or len(x) < 1:
        raise DatasetError(f"{spec}: x must be N x C x H x W with N >= 1, got shape {x.shape}")
    if num_classes is not None and num_classes < 2:
        raise DatasetError(f"{spec}: num_classes must be >= 2, got {num_classes}")
    try:
        check_images(torch.from_numpy(np.ascontiguousarray(x)))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{spec}: x: {exc}") from None
    idx = _apply_limit(np.arange(len(x), dtype=np.int64), limit)
    return torch.from_numpy(x[idx].astype(np.float32)), None, idx, num_classes


def _image_files(folder: str) -> list[str]:
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(files, key=lambda f: os.path.relpath(f, folder))


def _load_images_folder(path: str, split: str, limit):
    """``images:PATH``: every image file under the folder, in sorted relative-path order, unlabeled."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    if not os.path.isdir(path):
        raise DatasetError(f"images:{path}: no such folder; give a folder of image files (sub-folders allowed)")
    files = _image_files(path)
    if not files:
        raise DatasetError(f"images:{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    if split != POOL_SPLIT:
        raise DatasetError(f"images:{path} has no labels: it is an unlabeled pool, whose only split is pool")
    idx = _apply_limit(np.arange(len(files), dtype=np.int64), limit)
    images = []
    for i in idx:
        try:
            with Image.open(files[int(i)]) as img:
                images.append(
                    pil_to_tensor(img.convert("L") if img.mode in ("1", "L", "P", "I;16") else img.convert("RGB"))
                )
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"images:{path}: cannot read {files[int(i)]} ({exc}); remove or fix that file") from None
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DatasetError(
            f"images:{path}: images have different shapes {sorted(shapes)[:3]}; resize them to one size first"
        )
    return torch.stack(images).float() / 255.0, None, idx, None


# --------------------------------------------------------------------------- public API
def dataset_key(spec: str) -> str:
    """A dataset spec in canonical form: ``npz:`` / ``imagefolder:`` paths made absolute and resolved.

    Parameters
    ----------
    spec : str
        A dataset spec as ``load_split`` takes it.

    Returns
    -------
    str
        The built-in name unchanged, or ``kind:/absolute/real/path``.
    """
    name, sep, path = str(spec).partition(":")
    if sep and name in ("npz", "imagefolder", "images") and path:
        return f"{name}:{os.path.realpath(os.path.expanduser(path))}"
    return str(spec)


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset specs name the same dataset (``dataset_key`` of both agree)."""
    return dataset_key(a) == dataset_key(b)


def load_split(
    dataset: str,
    split: str,
    data_root: str | None = None,
    download: bool = False,
    limit: int | None = None,
) -> SplitData:
    """Load split ``split`` of ``dataset`` (see the module docstring) into memory.

    ``limit`` keeps the first ``limit`` rows of the split (a fixed random subset). torchvision sets
    are read from ``data_root`` and downloaded only when ``download`` is true; a missing dataset is
    a one-line ``DatasetError`` that names the files expected.

    Parameters
    ----------
    dataset : str
        ``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder:PATH`` or ``npz:PATH``.
    split : {"train", "surrogate", "cal", "test", "pool"}
        The split; splits are disjoint and fixed by ``SPLIT_SEED`` (and ``SURROGATE_SEED``); ``pool`` is
        the one split of an unlabeled source (npz without ``y``, ``images:``).
    data_root : str, optional
        Folder of the torchvision datasets; default ``DEFAULT_DATA_ROOT``.
    download : bool, optional
        Download a missing torchvision dataset.
    limit : int, optional
        Keep the first ``limit`` rows (>= 1); default all.

    Returns
    -------
    SplitData
        Images (float32, ``N x C x H x W``, in [0, 1]), labels (int64; None for a pool) and dataset indices.

    Raises
    ------
    DatasetError
        If the dataset or split is unknown (``pool`` of a labelled dataset, a labelled split of a pool), or
        its files are missing, unreadable or malformed.
    InvalidParameterError
        If ``limit`` is not an integer >= 1.
    InvalidInputError
        If an npz's images are not finite or not in [0, 1].
    """
    if split not in ALL_SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(ALL_SPLITS)}")
    spec = str(dataset)
    name, _, path = spec.partition(":")
    if split == POOL_SPLIT and not (name in ("npz", "images") and path):
        raise DatasetError(
            f"{spec} is labelled: its splits are {', '.join(SPLITS)} (pool is the split of an "
            "unlabeled source: npz:PATH without y, or images:FOLDER); any of them may serve as a pool"
        )
    if spec == "digits":
        x, y, idx, k = _load_digits(split, limit)
    elif spec in TORCHVISION:
        x, y, idx, k = _load_torchvision(spec, split, data_root, download, limit)
    elif name == "imagefolder" and path:
        x, y, idx, k = _load_imagefolder(os.path.expanduser(path), split, limit)
    elif name == "npz" and path:
        x, y, idx, k = _load_npz(os.path.expanduser(path), split, limit)
    elif name == "images" and path:
        x, y, idx, k = _load_images_folder(os.path.expanduser(path), split, limit)
    else:
        raise DatasetError(f"unknown dataset {spec!r}; choose {DATASET_HELP}")
    return SplitData(
        dataset=spec,
        split=split,
        x=x.contiguous(),
        y=y,
        indices=np.asarray(idx, dtype=np.int64),
        num_classes=None if k is None else int(k),
    )


OLD_TRAIN_SPLITS = {"train": ("train", "surrogate")}
"""Splits whose images, before version 0.3, lay in one split: an old ``train`` counts file may name
images of today's ``surrogate`` split."""


def load_images(dataset: str, split: str, indices, data_root: str | None = None, download: bool = False) -> SplitData:
    """The images of ``split`` with dataset indices ``indices``, in that order (as ``load_split(...).take``).

    A counts file of the ``train`` split written before the ``surrogate`` split was carved out of the
    train block names images of both: they are looked up in the union of the two (see the module
    docstring), so such files still read.

    Parameters
    ----------
    dataset : str
        Dataset spec (``load_split``).
    split : str
        The split the indices were drawn from.
    indices : array_like of int
        Dataset indices, e.g. the ``indices`` of a counts file.
    data_root : str, optional
        Folder of the torchvision datasets.
    download : bool, optional
        Download a missing torchvision dataset.

    Returns
    -------
    SplitData
        Those rows, in the order given.

    Raises
    ------
    DatasetError
        If the dataset cannot be loaded or an index is in none of the splits looked at.
    """
    data = load_split(dataset, split, data_root=data_root, download=download)
    try:
        return data.take(indices)
    except DatasetError:
        if split not in OLD_TRAIN_SPLITS:
            raise
    parts = [data] + [
        load_split(dataset, s, data_root=data_root, download=download) for s in OLD_TRAIN_SPLITS[split] if s != split
    ]
    union = replace(
        data,
        x=torch.cat([p.x for p in parts]),
        y=torch.cat([p.require_labels("a union") for p in parts]),
        indices=np.concatenate([p.indices for p in parts]),
    )
    return union.take(indices)
