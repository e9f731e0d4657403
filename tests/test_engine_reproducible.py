"""The counting engine's reproducibility contract: counts depend on (seed, dataset index, stream, j),
never on batch size, grouping, order, or where a run is split (``start``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from data_gen.datasets import load_split
from surrogate_cert.core.smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier


def spread_model() -> nn.Module:
    """A fixed linear 64 -> 10 classifier whose noisy predictions spread over several classes."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=gen))
        model[1].bias.zero_()
    return model


@pytest.fixture(scope="module")
def digits_x():
    data = load_split("digits", "test", limit=12)
    return data.x, data.indices


def counts(x, idx, n, batch_size, **kw):
    smooth = SmoothedClassifier(spread_model(), 10, 0.25, device="cpu", batch_size=batch_size, seed=3)
    return smooth.counts(x, n, indices=idx, **kw)


def test_counts_identical_across_batch_sizes_and_grouping(digits_x):
    x, idx = digits_x
    big = counts(x, idx, 700, 1000)
    small = counts(x, idx, 700, 37)
    assert np.array_equal(big, small)
    assert (big.sum(axis=1) == 700).all()
    assert (big > 0).sum(axis=1).max() >= 3, "the model must spread predictions, or this test has no teeth"
    order = np.arange(len(idx))[::-1].copy()
    reordered = counts(x[order], idx[order], 700, 64)
    assert np.array_equal(reordered, big[order])
    halves = np.concatenate([counts(x[:5], idx[:5], 700, 128), counts(x[5:], idx[5:], 700, 999)])
    assert np.array_equal(halves, big)


def test_start_splits_a_stream_without_overlap(digits_x):
    x, idx = digits_x
    whole = counts(x, idx, 600, 256)
    first = counts(x, idx, 250, 100)
    rest = counts(x, idx, 350, 300, start=250)
    assert np.array_equal(first + rest, whole)
    per_input = counts(x, idx, np.arange(1, len(idx) + 1) * 10, 50)
    assert (per_input.sum(axis=1) == np.arange(1, len(idx) + 1) * 10).all()


def test_streams_seeds_and_indices_give_independent_noise(digits_x):
    x, idx = digits_x
    base = counts(x, idx, 500, 500, stream=STREAM_ESTIMATE)
    assert not np.array_equal(base, counts(x, idx, 500, 500, stream=STREAM_SELECT))
    assert not np.array_equal(base, counts(x, idx + 10_000, 500, 500))
    other_seed = SmoothedClassifier(spread_model(), 10, 0.25, device="cpu", batch_size=500, seed=4)
    assert not np.array_equal(base, other_seed.counts(x, 500, indices=idx))
