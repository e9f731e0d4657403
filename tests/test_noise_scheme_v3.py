"""Noise scheme philox4x32-block256-v3 in the counting engine: a sample's noise is a pure function of
its key, so counts do not depend on batch size, grouping, order, where a stream is split, an
interrupted-and-resumed job or the number of torchrun processes; ``counts`` and ``sample_predictions``
see the same samples; files record the scheme, a resume never mixes it with another, and the older
schemes still reproduce."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from data_gen.datasets import load_split
from data_gen.distributed import Shard
from data_gen.generate import generate_counts
from data_gen.store import ResumeMismatchError, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.philox import keyed_normal
from surrogate_cert.core.smoothing import (
    NOISE_SCHEME_V2,
    NOISE_SCHEME_V3,
    NOISE_SCHEMES,
    STREAM_SELECT,
    SmoothedClassifier,
)


def spread_model() -> nn.Module:
    """A fixed linear 64 -> 10 classifier whose noisy predictions spread over several classes."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=gen))
        model[1].bias.zero_()
    return model


class LocalShard(Shard):
    """One rank of a job whose other ranks run before or after it in this process (as in
    test_datagen_shards): collective steps that only synchronise are no-ops."""

    def agree(self, error):
        if error is not None:
            raise error

    def broadcast(self, value):
        return value

    def gather(self, value):
        return [value] if self.is_main else None


def run_shard(model, out, rank=None, world_size=2, **kwargs):
    kwargs = {"n0": 20, "limit": 11, "seed": 4, "device": "cpu", "progress": False, "batch_size": 500, **kwargs}
    shard = None if rank is None else LocalShard(rank=rank, world_size=world_size)
    return generate_counts("digits", "cal", model, 0.25, 300, str(out), shard=shard, **kwargs)


def assert_same_file(a, b):
    a, b = read_counts(a), read_counts(b)
    for name in ("indices", "labels", "counts", "counts_select"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    timing = {"created_utc", "command"}
    assert {k: v for k, v in a.attrs.items() if k not in timing} == {
        k: v for k, v in b.attrs.items() if k not in timing
    }


class Recorder(nn.Module):
    """Records every noisy image it is shown (to compare the engine's noise with ``keyed_normal``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 10)


@pytest.fixture(scope="module")
def digits():
    data = load_split("digits", "test", limit=12)
    return data.x, data.indices


def engine(batch_size=1000, model=None, seed=3):
    return SmoothedClassifier(
        model or spread_model(), 10, 0.25, device="cpu", batch_size=batch_size, seed=seed, noise_scheme=NOISE_SCHEME_V3
    )


def test_v3_counts_do_not_depend_on_batching_grouping_order_or_splits(digits):
    x, idx = digits
    whole = engine(1000).counts(x, 700, indices=idx)
    assert (whole.sum(axis=1) == 700).all()
    assert (whole > 0).sum(axis=1).max() >= 3, "the model must spread predictions, or this test has no teeth"
    assert np.array_equal(engine(37).counts(x, 700, indices=idx), whole)
    order = np.arange(len(idx))[::-1].copy()
    assert np.array_equal(engine(64).counts(x[order], 700, indices=idx[order]), whole[order])
    halves = np.concatenate(
        [engine(128).counts(x[:5], 700, indices=idx[:5]), engine(999).counts(x[5:], 700, indices=idx[5:])]
    )
    assert np.array_equal(halves, whole)
    split = engine(300).counts(x, 250, indices=idx) + engine(77).counts(x, 450, indices=idx, start=250)
    assert np.array_equal(split, whole)
    assert not np.array_equal(whole, engine(1000).counts(x, 700, indices=idx, stream=STREAM_SELECT))
    assert not np.array_equal(whole, engine(1000, seed=4).counts(x, 700, indices=idx))
    v2 = SmoothedClassifier(spread_model(), 10, 0.25, device="cpu", seed=3, noise_scheme=NOISE_SCHEME_V2)
    assert not np.array_equal(whole, v2.counts(x, 700, indices=idx))


def test_v3_engine_noise_is_keyed_normal_of_each_sample(digits):
    x, idx = digits
    recorder = Recorder()
    smooth = engine(100, model=recorder)
    n, start = np.array([3, 0, 300, 1]), np.array([0, 5, 250, 2**20])
    smooth.counts(x[:4], n, indices=idx[:4], start=start)
    noisy = torch.cat(recorder.seen)
    owners = np.repeat(np.arange(4), n)
    samples = np.concatenate([np.arange(s, s + k) for s, k in zip(start, n)])
    noise = keyed_normal(3, idx[:4][owners], 1, samples, (1, 8, 8))
    assert torch.equal(noisy, noise.mul_(0.25).add_(x[:4][owners]))


def test_v3_counts_equal_the_bincount_of_sample_predictions(digits):
    x, idx = digits
    n, start = np.arange(1, 13) * 37, np.arange(12) * 5
    outcomes = engine(200).sample_predictions(x, n, indices=idx, start=start)
    counts = engine(999).counts(x, n, indices=idx, start=start)
    for i in range(len(idx)):
        assert np.array_equal(np.bincount(outcomes[i, : n[i]], minlength=10), counts[i])
        assert (outcomes[i, n[i] :] == -1).all()
    later = engine(64).sample_predictions(x[1:3], 50, indices=idx[1:3], start=start[1:3] + 20)  # n = 74, 111
    assert np.array_equal(later, outcomes[1:3, 20:70])


def test_v3_resume_gives_the_uninterrupted_file_and_never_mixes(tmp_path, digits_untrained_model):
    model, kwargs = digits_untrained_model, dict(limit=5, seed=2, device="cpu", progress=False, n0=10)
    ref = tmp_path / "ref.h5"
    generate_counts("digits", "test", model, 0.25, 300, str(ref), noise_scheme=NOISE_SCHEME_V3, **kwargs)
    part = tmp_path / "part.h5"
    generate_counts(
        "digits", "test", model, 0.25, 300, str(part), noise_scheme=NOISE_SCHEME_V3, batch_size=77, **kwargs
    )
    with h5py.File(part, "r+") as h5:  # an interrupted job
        h5.attrs["rows"], h5.attrs["complete"] = 2, False
    with pytest.raises(ResumeMismatchError, match="noise_scheme"):
        generate_counts(
            "digits", "test", model, 0.25, 300, str(part), noise_scheme=NOISE_SCHEME_V2, resume=True, **kwargs
        )
    generate_counts("digits", "test", model, 0.25, 300, str(part), resume=True, **kwargs)  # the file's scheme
    resumed, expected = read_counts(part), read_counts(ref)
    assert resumed.attrs["noise_scheme"] == NOISE_SCHEME_V3 and resumed.attrs["complete"]
    assert np.array_equal(resumed.counts, expected.counts)
    assert np.array_equal(resumed.counts_select, expected.counts_select)


def test_v3_torchrun_shards_merge_into_the_one_process_file(tmp_path, digits_untrained_model):
    single = tmp_path / "single.h5"
    run_shard(digits_untrained_model, single, noise_scheme=NOISE_SCHEME_V3)
    for world_size in (2, 3):
        out = tmp_path / f"cal-{world_size}.h5"
        for rank in reversed(range(world_size)):  # rank 0 last: it merges
            run_shard(
                digits_untrained_model,
                out,
                rank=rank,
                world_size=world_size,
                resume=True,
                noise_scheme=NOISE_SCHEME_V3,
                batch_size=[500, 77, 256][rank],
            )
        assert_same_file(out, single)
    assert read_counts(single).attrs["noise_scheme"] == NOISE_SCHEME_V3


def test_cli_offers_the_v3_scheme(tmp_path, digits_untrained_model, capsys):
    assert NOISE_SCHEME_V3 in NOISE_SCHEMES
    out = tmp_path / "cli.h5"
    code = main(
        [
            "datagen",
            "--dataset",
            "digits",
            "--split",
            "test",
            "--model",
            digits_untrained_model,
            "--sigma",
            "0.25",
            "--samples",
            "200",
            "--limit",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "--noise-scheme",
            NOISE_SCHEME_V3,
            "--out",
            str(out),
        ]
    )
    assert code in (0, None)
    assert read_counts(out).attrs["noise_scheme"] == NOISE_SCHEME_V3


def test_v3_refuses_keys_out_of_range(digits):
    x, _ = digits
    with pytest.raises(InvalidParameterError, match="dataset indices"):
        engine().counts(x[:1], 10, indices=[-1])
    with pytest.raises(InvalidParameterError, match="sample numbers"):
        engine().counts(x[:1], 10, start=2**40)
