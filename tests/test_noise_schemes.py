"""Noise schemes: the new default (v2) gives every block of an input its own seed and is as
reproducible as v1; v1 still reproduces version 0.1's counts bit for bit; a counts file records its
scheme and a resume continues with it, never mixing two; unseeded noise is for benchmarks only."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from data_gen.datasets import load_split
from data_gen.generate import generate_counts
from data_gen.store import ResumeMismatchError, read_counts
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.smoothing import (
    NOISE_SCHEME,
    NOISE_SCHEME_V1,
    NOISE_SCHEME_V2,
    NOISE_UNSEEDED,
    STREAM_SELECT,
    SmoothedClassifier,
    block_keys,
    block_seed,
)


def spread_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=gen))
        model[1].bias.zero_()
    return model


@pytest.fixture(scope="module")
def digits():
    data = load_split("digits", "test", limit=4)
    return data.x, data.indices


def counts(x, idx, scheme, batch_size=300, **kw):
    smooth = SmoothedClassifier(
        spread_model(), 10, 0.25, device="cpu", batch_size=batch_size, seed=3, noise_scheme=scheme
    )
    return smooth.counts(x, 600, indices=idx, **kw)


def test_v1_reproduces_version_0_1_counts(digits):
    x, idx = digits
    assert idx.tolist() == [388, 811, 255, 390]
    # Computed by version 0.1 (scheme torch-generator-block256-v1) for this model, seed 3, start 100.
    expected = [
        [228, 0, 0, 15, 0, 32, 324, 0, 1, 0],
        [285, 0, 0, 7, 0, 96, 212, 0, 0, 0],
        [356, 0, 0, 7, 0, 0, 234, 0, 1, 2],
        [285, 0, 1, 16, 0, 23, 30, 34, 127, 84],
    ]
    assert counts(x, idx, NOISE_SCHEME_V1, start=100).tolist() == expected
    assert counts(x, idx, NOISE_SCHEME_V1, batch_size=77, start=100).tolist() == expected
    assert block_seed(3, 5, 1, 2) == 3902024954858693794


def test_v2_is_the_default_reproducible_and_independent_of_batching(digits):
    x, idx = digits
    assert NOISE_SCHEME == NOISE_SCHEME_V2
    whole = counts(x, idx, NOISE_SCHEME_V2)
    assert np.array_equal(whole, counts(x, idx, NOISE_SCHEME_V2, batch_size=41))
    assert np.array_equal(whole[::-1], counts(x.flip(0), idx[::-1].copy(), NOISE_SCHEME_V2))
    smooth = SmoothedClassifier(spread_model(), 10, 0.25, device="cpu", seed=3)
    split = smooth.counts(x, 250, indices=idx) + smooth.counts(x, 350, indices=idx, start=250)
    assert np.array_equal(split, whole)
    assert not np.array_equal(whole, counts(x, idx, NOISE_SCHEME_V1))
    assert not np.array_equal(whole, counts(x, idx, NOISE_SCHEME_V2, stream=STREAM_SELECT))


def test_v2_blocks_of_an_input_never_share_a_seed():
    # PyTorch's CPU generator keeps only the low 32 bits of a seed: v1's 63-bit seeds are 32-bit ones.
    draw = [torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in (12345, 12345 + 2**32)]
    assert torch.equal(*draw)
    blocks = np.arange(40_000)
    for seed, index in [(0, 0), (7, 123_456), (2**40, 2**33)]:
        keys = np.concatenate([block_keys(seed, index, stream, blocks) for stream in range(4)])
        assert keys.max() < 2**32 and len(np.unique(keys)) == len(keys)
    assert block_keys(0, 1, 1, [0])[0] != block_keys(0, 2, 1, [0])[0] != block_keys(1, 1, 1, [0])[0]
    with pytest.raises(InvalidParameterError, match="stream"):
        block_keys(0, 0, 4, [0])


def test_resume_continues_with_the_files_scheme_and_never_mixes(tmp_path, digits_untrained_model):
    model, kwargs = digits_untrained_model, dict(limit=5, seed=2, device="cpu", progress=False, n0=10)
    ref = tmp_path / "v1.h5"
    generate_counts("digits", "test", model, 0.25, 300, str(ref), noise_scheme=NOISE_SCHEME_V1, **kwargs)
    old = tmp_path / "old.h5"
    generate_counts("digits", "test", model, 0.25, 300, str(old), noise_scheme=NOISE_SCHEME_V1, **kwargs)
    with h5py.File(old, "r+") as h5:  # an interrupted version 0.1 job
        h5.attrs["rows"], h5.attrs["complete"] = 2, False
    with pytest.raises(ResumeMismatchError, match="noise_scheme"):
        generate_counts(
            "digits", "test", model, 0.25, 300, str(old), noise_scheme=NOISE_SCHEME_V2, resume=True, **kwargs
        )
    generate_counts("digits", "test", model, 0.25, 300, str(old), resume=True, **kwargs)  # the file's scheme
    resumed, expected = read_counts(old), read_counts(ref)
    assert resumed.attrs["noise_scheme"] == NOISE_SCHEME_V1 and resumed.attrs["complete"]
    assert np.array_equal(resumed.counts, expected.counts)
    assert np.array_equal(resumed.counts_select, expected.counts_select)
    with pytest.raises(InvalidParameterError, match="unknown noise scheme"):
        generate_counts(
            "digits", "test", model, 0.25, 300, str(tmp_path / "u.h5"), noise_scheme=NOISE_UNSEEDED, **kwargs
        )


def test_engine_keys_equal_the_documented_block_keys():
    from surrogate_cert.core.smoothing import _block_key, _input_hash

    for seed, index, stream in [(0, 0, 0), (3, 811, 1), (2**40, 2**33 + 5, 2)]:
        blocks = np.arange(0, 3000, 7)
        h = _input_hash(seed, index)
        assert [_block_key(h, stream, int(b)) for b in blocks] == block_keys(seed, index, stream, blocks).tolist()
