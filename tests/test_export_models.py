"""Base models as torch.export programs (.pt2, the format PyTorch recommends over TorchScript):
detected by content, a dynamic batch required, input shape and class count read from the program and
checked against the dataset like a checkpoint's, optional surrogate_cert.json metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from data_gen.generate import generate_counts
from data_gen.models import TORCHSCRIPT_META, load_model
from data_gen.store import read_counts
from surrogate_cert.core.errors import ModelError
from surrogate_cert.core.hashing import sha256_file
from surrogate_cert.core.smoothing import SmoothedClassifier

BATCH = torch.export.Dim("batch", min=1)


def small_cnn(classes=10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, classes)).eval()


def export(model, path, dynamic=True, extra=None, batch=BATCH):
    program = torch.export.export(model, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: batch},) if dynamic else None)
    torch.export.save(program, str(path), extra_files=extra)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model = small_cnn()
    return model, export(model, folder / "cnn.pt2", extra={TORCHSCRIPT_META: '{"sigma": 0.25}'})


def test_exported_program_loads_with_its_shapes_and_counts(exported):
    model, path = exported
    loaded = load_model(path, device="cpu", num_classes=10)
    assert (loaded.num_classes, loaded.input_shape, loaded.sigma) == (10, (1, 8, 8), 0.25)
    assert loaded.sha256 == sha256_file(path) and not loaded.model.training
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded.model(x), model(x), atol=1e-6)
    # eval(), channels_last and batches of any size, as the engine needs (exported modules refuse eval()).
    smooth = SmoothedClassifier(loaded.model, 10, 0.25, device="cpu", batch_size=300, channels_last=True)
    reference = SmoothedClassifier(model, 10, 0.25, device="cpu", batch_size=1000)
    assert np.array_equal(smooth.counts(x, 700), reference.counts(x, 700))
    with pytest.raises(ModelError, match="10 output classes but the dataset has 3"):
        load_model(path, device="cpu", num_classes=3)


def test_static_batch_and_wrong_shapes_are_refused(tmp_path, exported):
    static = export(small_cnn(), tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(
        ModelError, match=r"static batch of 4.*dynamic_shapes=\(\{0: torch.export.Dim\('batch', min=1\)\},\)"
    ):
        load_model(static, device="cpu")
    at_least_two = export(small_cnn(), tmp_path / "min2.pt2", batch=torch.export.Dim("batch", min=2))
    with pytest.raises(ModelError, match="batches of at least 2 only"):
        load_model(at_least_two, device="cpu")
    _, path = exported
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", x=rng.random((30, 1, 4, 4), dtype=np.float32), y=rng.integers(0, 10, 30))
    with pytest.raises(ModelError, match=r"expects inputs \(1, 8, 8\) but .* images are \(1, 4, 4\)"):
        generate_counts(
            f"npz:{tmp_path / 'small.npz'}",
            "train",
            path,
            0.25,
            100,
            str(tmp_path / "c.h5"),
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "c.h5").exists()


def test_datagen_with_an_exported_model_equals_the_module(tmp_path, exported):
    _, path = exported
    generate_counts("digits", "test", path, 0.25, 300, str(tmp_path / "e.h5"), limit=4, device="cpu", progress=False)
    counts = read_counts(tmp_path / "e.h5")
    model = small_cnn()
    data_x = counts.images()
    expected = SmoothedClassifier(model, 10, 0.25, device="cpu").counts(data_x, 300, indices=counts.indices)
    assert np.array_equal(counts.counts, expected)
