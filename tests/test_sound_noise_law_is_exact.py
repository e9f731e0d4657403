"""The sound scheme samples exactly the law its integer thresholds define, and that law is pinned down exactly.

- The thresholds are those of the rounded Gaussian: the same at a higher working precision, inside the
  interval enclosures, symmetric, and the per-pixel total variation bound covers the distance to the
  ideal law (checked at coarse precisions where that distance is large enough to measure).
- The sampler (NumPy on the CPU, torch as on a GPU) draws that law (chi-square), the two paths agree
  offset for offset, and a block's noise is a function of its key and sample positions alone: counts do
  not depend on batch size or on how a stream is split (resume, sequential draws).
- Off-grid images are refused (one line, saying what to do) or, when asked, counted rounded to the grid.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats as st
from torch import nn

from surrogate_cert.core import grid_noise
from surrogate_cert.core.errors import InvalidInputError, InvalidParameterError
from surrogate_cert.core.grid_noise import grid_table, upper_tail_interval
from surrogate_cert.core.smoothing import (
    NOISE_SCHEME_SOUND,
    GridSampler,
    SmoothedClassifier,
    WordStream,
    block_uniform_words,
    check_noise_scheme,
    noise_slack,
    quantise_to_grid,
)


def test_thresholds_do_not_depend_on_the_working_precision(monkeypatch):
    usual = grid_table(0.25).thresholds
    grid_table.cache_clear()
    grid_noise._pi.cache_clear()
    monkeypatch.setattr(grid_noise, "_PREC", 352)
    monkeypatch.setattr(grid_noise, "_WIDTH_BOUND", Fraction(1, 1 << 250))
    try:
        assert grid_table(0.25).thresholds == usual
    finally:
        grid_table.cache_clear()
        grid_noise._pi.cache_clear()


@pytest.mark.parametrize("t", [Fraction(1, 510), Fraction(1, 10), Fraction(196, 100), Fraction(37, 5)])
def test_enclosures_bracket_the_normal_tail(t):
    lo, hi = upper_tail_interval(t)
    assert 0 <= hi - lo < 2**96
    assert float(Fraction(lo, 1 << 256)) == pytest.approx(st.norm.sf(float(t)), rel=1e-13)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_table_is_a_symmetric_law_of_total_mass_one(sigma):
    table = grid_table(sigma)
    t = table.thresholds
    assert all(0 < v < 2**64 for v in t) and list(t) == sorted(t)
    assert all(a + b == 2**64 for a, b in zip(t, reversed(t)))
    assert sum(table.weights()) == 2**64 and table.last == -table.first
    # the table reaches where the Gaussian tail drops below half a unit of 2**-64
    assert st.norm.sf((table.last + 0.5) / (255 * sigma)) < 2**-64
    assert table.tv_bound < (len(t) + 2) * 2.0**-64


def _tv_to_rounded_gaussian(table) -> float:
    """TV over the grid offsets (float64): the sampled law is 0 beyond the table, the ideal one is not."""
    pad = 400
    j = np.arange(table.first - pad, table.last + pad + 1)
    scale = 255 * table.sigma
    ideal = st.norm.cdf((j + 0.5) / scale) - st.norm.cdf((j - 0.5) / scale)
    sampled = np.concatenate([np.zeros(pad), table.pmf(), np.zeros(pad)])
    return 0.5 * float(np.abs(sampled - ideal).sum())


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_tv_bound_covers_the_distance_to_the_rounded_gaussian(bits):
    table = grid_table(0.25, bits=bits)
    tv = _tv_to_rounded_gaussian(table)
    assert tv <= table.tv_bound + 1e-12
    assert table.tv_bound <= tv * 1.001 + 1e-12  # and it is not loose


def test_sampled_offsets_follow_the_exact_law():
    table = grid_table(0.25)
    sampler = GridSampler(table, torch.device("cpu"))
    out = torch.empty(256, 784)
    words = WordStream(torch.device("cpu"))
    values = np.concatenate([sampler.draw(key, out, words).view(-1).numpy().astype(np.int64) for key in range(12)])
    observed = np.bincount(values - table.first, minlength=len(table.weights()))
    expected = np.array(table.pmf()) * values.size
    keep = expected > 20
    rest = observed[~keep].sum(), expected[~keep].sum()
    statistic, p = st.chisquare(np.append(observed[keep], rest[0]), np.append(expected[keep], rest[1]))
    assert p > 1e-4
    assert abs(values.mean()) < 5 * 255 * 0.25 / np.sqrt(values.size)


@pytest.mark.parametrize("sigma, shape", [(0.12, (256, 3, 3)), (0.25, (256, 784)), (1.0, (256, 50))])
def test_torch_path_draws_the_same_offsets_as_the_numpy_path(sigma, shape):
    table = grid_table(sigma)
    numpy_path = GridSampler(table, torch.device("cpu"))
    torch_path = GridSampler(table, torch.device("cpu"), dense=True)
    assert not numpy_path.dense and torch_path.dense
    for key in range(6):
        a, b = torch.empty(shape), torch.empty(shape)
        numpy_path.draw(key, a, WordStream(torch.device("cpu")))
        torch_path.draw(key, b, WordStream(torch.device("cpu")))
        assert torch.equal(a, b)


def test_words_are_a_function_of_key_and_position():
    whole = block_uniform_words(11, 13)
    stream = WordStream(torch.device("cpu"))
    pieces = [block_uniform_words(11, c, start=s, stream=stream) for s, c in ((0, 3), (3, 1), (4, 5), (9, 4))]
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(block_uniform_words(11, 4, start=9), whole[9:])  # a fresh stream seeks
    assert not torch.equal(block_uniform_words(12, 13), whole)
    bits = np.unpackbits(block_uniform_words(5, 4096).numpy().view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01


class Quadrants(nn.Module):
    """Four classes from the signs of two pixel sums: every noisy sample's class depends on its noise."""

    def forward(self, y):
        flat = y.flatten(1)
        a = flat[:, : flat.shape[1] // 2].sum(1) > flat.shape[1] / 4
        b = flat[:, flat.shape[1] // 2 :].sum(1) > flat.shape[1] / 4
        return nn.functional.one_hot(a.long() * 2 + b.long(), 4).float()


@pytest.fixture(scope="module")
def grid_images():
    # pixels near 1/2: both half-sums sit near their thresholds, so the noise decides the class
    return torch.randint(110, 146, (5, 1, 6, 6), generator=torch.Generator().manual_seed(0)).float() / 255.0


def sound(batch_size=512, **kwargs):
    return SmoothedClassifier(Quadrants(), 4, 0.25, device="cpu", batch_size=batch_size, noise_scheme="sound", **kwargs)


def test_counts_do_not_depend_on_batching_or_on_how_a_stream_is_split(grid_images):
    idx = np.array([3, 10, 11, 40, 41])
    whole = sound(512).counts(grid_images, 700, indices=idx)
    assert np.array_equal(whole, sound(97).counts(grid_images, 700, indices=idx))
    assert np.array_equal(whole, sound(5000).counts(grid_images, 700, indices=idx))
    split = sound().counts(grid_images, 300, indices=idx) + sound().counts(grid_images, 400, indices=idx, start=300)
    assert np.array_equal(whole, split)
    one_by_one = np.concatenate([sound().counts(grid_images[i : i + 1], 700, indices=idx[i : i + 1]) for i in range(5)])
    assert np.array_equal(whole, one_by_one)
    outcomes = sound().sample_predictions(grid_images, 700, indices=idx)
    assert np.array_equal(whole, np.stack([np.bincount(row, minlength=4) for row in outcomes]))
    assert ((whole > 0).sum(axis=1) >= 3).all()  # the noise moves every image across classes


def test_off_grid_images_are_refused_or_counted_rounded(grid_images):
    digits_like = torch.randint(0, 17, (3, 1, 6, 6)).float() / 16.0
    with pytest.raises(InvalidInputError, match="1/255 grid") as caught:
        sound().counts(digits_like, 10)
    assert "\n" not in str(caught.value) and "quantise" in str(caught.value)
    rounded = quantise_to_grid(digits_like)
    assert torch.equal(torch.round(rounded * 255) / 255, rounded)
    assert np.array_equal(sound(off_grid="quantise").counts(digits_like, 300), sound().counts(rounded, 300))
    with pytest.raises(InvalidParameterError):
        sound(off_grid="nearest")


def test_scheme_names_slack_and_alias():
    assert check_noise_scheme("sound") == NOISE_SCHEME_SOUND
    assert noise_slack("torch-generator-block256-v2", 0.25, (1, 28, 28)) == 0.0
    small = noise_slack(NOISE_SCHEME_SOUND, 0.25, (1, 28, 28))
    large = noise_slack(NOISE_SCHEME_SOUND, 0.25, (3, 32, 32))
    assert 0 < small < large < 1e-13
    assert large == pytest.approx(small * 3072 / 784, rel=1e-6)
