"""Datasets: fixed, seeded, disjoint train / surrogate / cal / test splits that keep dataset indices, for
the embedded digits, torchvision sets (a fake MNIST on disk), npz and imagefolder."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from data_gen.datasets import SPLITS, load_split
from surrogate_cert.core.errors import DatasetError


def test_digits_splits_are_fixed_disjoint_and_cover_the_dataset():
    splits = {s: load_split("digits", s) for s in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [750, 250, 400, 397]
    all_idx = np.concatenate([splits[s].indices for s in SPLITS])
    assert sorted(all_idx.tolist()) == list(range(1797))
    for s in SPLITS:
        d = splits[s]
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64 and d.indices.dtype == np.int64
        assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and d.dataset == "digits" and d.split == s
        assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    again = load_split("digits", "cal")
    assert np.array_equal(again.indices, splits["cal"].indices) and torch.equal(again.x, splits["cal"].x)
    # cal and test are random halves of one source: neither sits at one end of the dataset.
    assert abs(np.median(splits["cal"].indices) - np.median(splits["test"].indices)) < 200


def test_limit_and_take_keep_dataset_indices():
    test = load_split("digits", "test")
    first = load_split("digits", "test", limit=7)
    assert np.array_equal(first.indices, test.indices[:7]) and torch.equal(first.x, test.x[:7])
    wanted = test.indices[[30, 2, 11]]
    sub = test.take(wanted)
    assert np.array_equal(sub.indices, wanted) and torch.equal(sub.x, test.x[[30, 2, 11]])
    assert torch.equal(sub.y, test.y[[30, 2, 11]])
    train_index = load_split("digits", "train", limit=1).indices
    with pytest.raises(DatasetError, match="not in the test split"):
        test.take(train_index)


def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_sets_use_official_train_and_halves_of_official_test(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (20, 28, 28))}
    for prefix, imgs in images.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(imgs)) % 10, 2049)
    train = load_split("mnist", "train", data_root=str(tmp_path))
    surrogate = load_split("mnist", "surrogate", data_root=str(tmp_path))
    cal, test = (load_split("mnist", s, data_root=str(tmp_path)) for s in ("cal", "test"))
    # A seeded random sixth of the official training set is the surrogate split; train is the rest, ascending.
    assert len(surrogate) == 5 and len(train) == 25 and train.input_shape == (1, 28, 28)
    assert sorted(train.indices.tolist() + surrogate.indices.tolist()) == list(range(30))
    assert train.indices.tolist() == sorted(train.indices.tolist())
    assert surrogate.indices.tolist() != list(range(25, 30))  # not simply the last block
    i = int(train.indices[4])
    assert torch.allclose(train.x[4, 0], torch.tensor(images["train"][i] / 255.0, dtype=torch.float32))
    j = int(surrogate.indices[0])
    assert torch.allclose(surrogate.x[0, 0], torch.tensor(images["train"][j] / 255.0, dtype=torch.float32))
    assert len(cal) == len(test) == 10
    assert sorted(np.concatenate([cal.indices, test.indices]).tolist()) == list(range(30, 50))
    j = int(cal.indices[0]) - 30
    assert torch.allclose(cal.x[0, 0], torch.tensor(images["t10k"][j] / 255.0, dtype=torch.float32))
    assert int(cal.y[0]) == j % 10


def test_npz_dataset(tmp_path):
    x = np.random.default_rng(1).uniform(size=(50, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 4, num_classes=6)
    parts = {s: load_split(f"npz:{tmp_path / 'd.npz'}", s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [22, 8, 10, 10]
    assert sorted(np.concatenate([parts[s].indices for s in SPLITS]).tolist()) == list(range(50))
    d = parts["cal"]
    assert d.num_classes == 6 and d.input_shape == (3, 4, 4)
    assert np.allclose(d.x.numpy(), x[d.indices]) and d.y.tolist() == (d.indices % 4).tolist()
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(50) % 4, num_classes=3)
    with pytest.raises(DatasetError, match="num_classes"):
        load_split(f"npz:{tmp_path / 'bad.npz'}", "train")


def test_imagefolder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    parts = {s: load_split(f"imagefolder:{tmp_path}", s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [4, 2, 2, 2]
    assert parts["train"].input_shape == (3, 6, 6) and parts["train"].num_classes == 2
    assert sorted(np.concatenate([parts[s].indices for s in SPLITS]).tolist()) == list(range(10))
    assert parts["test"].y.tolist() == [int(i >= 5) for i in parts["test"].indices]


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split("cifar11", "train")
    with pytest.raises(DatasetError, match="unknown split"):
        load_split("digits", "validation")


def test_old_train_split_files_still_read_their_images():
    """Counts written before the surrogate split existed name images now in the surrogate split."""
    from data_gen.datasets import load_images

    train, surrogate = load_split("digits", "train"), load_split("digits", "surrogate")
    old_rows = np.concatenate([surrogate.indices[:3], train.indices[:2]])  # the old train block held both
    data = load_images("digits", "train", old_rows)
    assert np.array_equal(data.indices, old_rows)
    assert torch.equal(data.x[:3], surrogate.x[:3]) and torch.equal(data.x[3:], train.x[:2])
    with pytest.raises(DatasetError, match="not in the cal split"):
        load_images("digits", "cal", old_rows)
