"""Unlabeled image pools train the surrogate: an npz without y, a folder of images, counts without labels.

The surrogate learns counts, which need no label: an unlabeled source has one split, ``pool``; its counts
file carries no ``labels`` (format version 2); ``train`` mixes it with a labelled split; ``calibrate`` keeps
the surrogate's training images out of the calibration by content, so a pool holding calibration images is
refused whatever its source; whatever needs labels says so in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from calibration import calibrate
from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.store import UNLABELED_VERSION, read_attrs, read_counts
from surrogate_cert.core.errors import CalibrationError, DatasetError, StoreError
from surrogate_cert.core.hashing import image_hashes, unpack_hashes
from surrogate_cert.workflows.training import train_surrogate


def _npz_pool(path, x) -> str:
    np.savez(path, x=x.numpy())
    return f"npz:{path}"


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_untrained_model):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("pools")
    test = load_split("digits", "test")
    out = dict(folder=folder, model=digits_untrained_model)
    out["pool_spec"] = _npz_pool(folder / "pool.npz", test.x[200:260])  # test images beyond the first 200
    for name, dataset, split, limit, n in (
        ("pool", out["pool_spec"], "pool", None, 20),
        ("train", "digits", "train", 30, 20),
        ("cal", "digits", "cal", 60, 40),
    ):
        out[name] = str(folder / f"{name}.h5")
        generate_counts(
            dataset, split, digits_untrained_model, 0.25, n, out[name], limit=limit, device="cpu", progress=False
        )
    return out


def test_a_pool_has_one_split_and_its_counts_carry_no_labels(files):
    pool = load_split(files["pool_spec"], "pool")
    assert pool.y is None and len(pool) == 60 and pool.num_classes is None
    with pytest.raises(DatasetError, match="unlabeled pool"):
        load_split(files["pool_spec"], "train")
    with pytest.raises(DatasetError, match="labelled"):
        load_split("digits", "pool")
    counts = read_counts(files["pool"])
    assert counts.labels is None and counts.num_classes == 10  # the base model's output width
    assert read_attrs(files["pool"])["format_version"] == UNLABELED_VERSION
    assert read_attrs(files["train"])["format_version"] == 1  # labelled files keep version 1
    with pytest.raises(StoreError, match="needs labels"):
        counts.require_labels("certified accuracy")
    with pytest.raises(DatasetError, match="needs labels"):
        pool.require_labels("the results file")


@pytest.mark.slow
def test_surrogate_trains_on_a_pool_beside_a_split_and_calibrates(files):
    out = files["folder"] / "surrogate.pt"
    surrogate = train_surrogate([files["pool"], files["train"]], out, epochs=1, device="cpu", progress=False)
    meta = surrogate.meta
    assert meta["counts_rows"] == 90 and [r["split"] for r in meta["counts_files"]] == ["pool", "train"]
    trained = unpack_hashes(meta["image_hashes"])
    assert len(trained) == 90
    assert set(meta["train_index_ranges_by_dataset"]) == {f"npz:{files['folder'] / 'pool.npz'}", "digits"}
    calibration = calibrate(str(out), files["cal"], 0.1, 1e-3)
    assert calibration.calibration_size == 60


@pytest.mark.slow
def test_a_pool_holding_calibration_images_is_refused_by_content(files):
    cal = load_split("digits", "cal", limit=60)
    leaky = files["folder"] / "leaky.h5"
    spec = _npz_pool(files["folder"] / "leaky.npz", torch.cat([cal.x[:5], load_split("digits", "test").x[300:320]]))
    generate_counts(spec, "pool", files["model"], 0.25, 10, str(leaky), device="cpu", progress=False)
    out = files["folder"] / "leaky.pt"
    train_surrogate([str(leaky)], out, epochs=1, device="cpu", progress=False)
    with pytest.raises(CalibrationError, match="5 images the surrogate was trained on"):
        calibrate(str(out), files["cal"], 0.1, 1e-3)


def test_a_folder_of_images_is_a_pool(tmp_path, digits_untrained_model):
    x = load_split("digits", "test").x[:6]
    for i, img in enumerate(x):
        sub = tmp_path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), mode="L").save(sub / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    pool = load_split(f"images:{tmp_path}", "pool")
    assert pool.x.shape == (6, 1, 8, 8) and pool.y is None
    assert sorted(image_hashes(pool.x).tolist()) == sorted(image_hashes(x).tolist())  # 8-bit content survives PNG
    out = tmp_path / "pool.h5"
    generate_counts(
        f"images:{tmp_path}", "pool", digits_untrained_model, 0.25, 5, str(out), device="cpu", progress=False
    )
    assert read_counts(out).labels is None
