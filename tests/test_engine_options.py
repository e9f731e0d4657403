"""The GPU-path options of the counting engine, exercised on the CPU: channels_last memory and
torch.compile leave the counts unchanged; --batch-size auto finds the largest batch that fits (here
under a fake memory limit) once and records it; bf16 autocast is checked against float32 on the same
noise and refused beyond AMP_TOLERANCE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.store import read_attrs
from surrogate_cert.core.architectures import build
from surrogate_cert.core.errors import ModelError
from surrogate_cert.core.smoothing import AMP_TOLERANCE, CACHE_ENV, SmoothedClassifier, find_batch_size


@pytest.fixture(scope="module")
def digits():
    data = load_split("digits", "test", limit=5)
    return data.x, data.indices


def test_channels_last_and_compile_leave_counts_unchanged(digits):
    x, idx = digits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnn = build("small_cnn", (1, 8, 8), 10)
    plain = SmoothedClassifier(cnn, 10, 0.25, device="cpu", channels_last=False)
    assert not plain.channels_last  # off by default on the CPU
    fast = SmoothedClassifier(cnn, 10, 0.25, device="cpu", channels_last=True)
    assert np.array_equal(plain.counts(x, 700, indices=idx), fast.counts(x, 700, indices=idx))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    # The "eager" backend runs TorchDynamo's capture without code generation: the compile path, quickly.
    compiled = SmoothedClassifier(linear, 10, 0.25, device="cpu", compile="eager")
    assert compiled.model is not linear
    assert np.array_equal(
        SmoothedClassifier(linear, 10, 0.25, device="cpu").counts(x, 700, indices=idx),
        compiled.counts(x, 700, indices=idx),
    )


class MemoryLimited(nn.Module):
    """Runs out of memory above ``limit`` samples per forward pass, as a GPU would."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.linear = nn.Linear(64, 10)
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"out of memory: {x.shape[0]} samples (fake limit {self.limit})")
        return self.linear(x.flatten(1))


def test_auto_batch_size_is_the_largest_that_fits_found_once_and_recorded(tmp_path, monkeypatch, digits):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model = MemoryLimited(limit=700)
    smooth = SmoothedClassifier(model, 10, 0.25, device="cpu", batch_size="auto", input_shape=(1, 8, 8))
    assert (smooth.batch_size, smooth.batch_size_source) == (512, "auto (searched)")  # multiple of 256 <= 700
    assert max(model.sizes) > 700  # it did hit the limit
    recorded = json.loads((tmp_path / "batch_size.json").read_text())
    assert list(recorded.values()) == [512]
    model.sizes.clear()
    again = SmoothedClassifier(model, 10, 0.25, device="cpu", batch_size="auto", input_shape=(1, 8, 8))
    assert (again.batch_size, again.batch_size_source, model.sizes) == (512, "auto (recorded)", [])
    x, idx = digits
    assert (again.counts(x, 2000, indices=idx).sum(axis=1) == 2000).all()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fresh"))  # the same architecture would reuse the record
    with pytest.raises(ModelError, match="not even 256 noisy samples"):
        SmoothedClassifier(MemoryLimited(limit=100), 10, 0.25, device="cpu", batch_size="auto", input_shape=(1, 8, 8))


def test_find_batch_size_bisects_to_the_largest_fitting_multiple():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 5000

    assert find_batch_size(fits, maximum=1 << 16) == 4864  # 19 x 256
    assert len(tried) <= 12
    assert find_batch_size(lambda size: True, maximum=1000) == 768


class Tied(nn.Module):
    """Logits 100 + small differences: bfloat16 (8 significant bits) rounds most of them to ties."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        with torch.no_grad():
            self.linear.weight.mul_(0.05)
            self.linear.bias.fill_(100.0)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_bf16_counts_are_checked_against_float32(tmp_path, digits):
    x, idx = digits
    gen = torch.Generator().manual_seed(0)
    spread = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        spread[1].weight.copy_(torch.randn(10, 64, generator=gen))
    share = SmoothedClassifier(spread, 10, 0.25, device="cpu", amp="bf16").amp_disagreement(x, 500, indices=idx)
    assert share.shape == (5,) and share.max() < 0.05  # a few samples near a tie change class
    tied = SmoothedClassifier(Tied(), 10, 0.25, device="cpu", amp="bf16").amp_disagreement(x, 500, indices=idx)
    assert tied.max() > 0.2
    clear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        clear[1].weight.copy_(spread[1].weight * 0.1)
        clear[1].bias.copy_(torch.arange(10.0) * 4)  # one class well ahead: bf16 changes nothing
    for name, model in (("clear", clear), ("tied", Tied())):
        exported = torch.export.export(
            model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
        torch.export.save(exported, str(tmp_path / f"{name}.pt2"))
    generate_counts(
        "digits",
        "test",
        str(tmp_path / "clear.pt2"),
        0.25,
        200,
        str(tmp_path / "s.h5"),
        amp="bf16",
        limit=3,
        device="cpu",
        progress=False,
    )
    attrs = read_attrs(tmp_path / "s.h5")
    assert attrs["amp"] == "bf16" and 0 <= attrs["amp_disagreement"] <= AMP_TOLERANCE
    with pytest.raises(ModelError, match=r"bf16 autocast changes .* of the base model's noisy predictions"):
        generate_counts(
            "digits",
            "test",
            str(tmp_path / "tied.pt2"),
            0.25,
            200,
            str(tmp_path / "c.h5"),
            amp="bf16",
            limit=3,
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "c.h5").exists()
