"""Under the sound scheme a datagen job is the same file however it runs, and its counts are Cohen's.

The digits (pixels ``v / 16``, off the 1/255 grid) are counted rounded to the grid, as the command line
does; torchrun shards (simulated in one process) merge into exactly the one-process file, and Cohen's
certificates from the stored counts equal ``CohenCertifier``'s live ones (same streams, same slack).
"""

from __future__ import annotations

import numpy as np
import torch

from data_gen.datasets import load_split
from data_gen.distributed import Shard
from data_gen.generate import generate_counts
from data_gen.models import load_model
from data_gen.store import read_counts
from surrogate_cert.core.cohen import CohenCertifier, certificates_from_counts
from surrogate_cert.core.smoothing import NOISE_SCHEME_SOUND, SmoothedClassifier

LIMIT, N, N0 = 7, 300, 20


class LocalShard(Shard):
    """One rank of a job whose other ranks run before or after it in this process."""

    def agree(self, error):
        if error is not None:
            raise error

    def broadcast(self, value):
        return value

    def gather(self, value):
        return [value] if self.is_main else None


def run(model, out, rank=None, batch_size=500, **kwargs):
    shard = None if rank is None else LocalShard(rank=rank, world_size=2)
    return generate_counts(
        "digits",
        "test",
        model,
        0.25,
        N,
        str(out),
        n0=N0,
        limit=LIMIT,
        seed=3,
        device="cpu",
        progress=False,
        batch_size=batch_size,
        noise_scheme="sound",
        shard=shard,
        **kwargs,
    )


def test_shards_merge_into_the_one_process_file(tmp_path, digits_untrained_model):
    single, merged = tmp_path / "one.h5", tmp_path / "merged.h5"
    run(digits_untrained_model, single)
    run(digits_untrained_model, merged, rank=1, resume=True, batch_size=77)
    run(digits_untrained_model, merged, rank=0, resume=True)
    a, b = read_counts(single), read_counts(merged)
    for name in ("indices", "counts", "counts_select"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.attrs["noise_scheme"] == b.attrs["noise_scheme"] == NOISE_SCHEME_SOUND
    assert 0 < a.attrs["grid_shift_max"] <= 8 / 510  # digits moved onto the grid: at most sqrt(64) / 510


def test_cohen_from_stored_counts_is_cohen_live(tmp_path, digits_untrained_model):
    out = tmp_path / "test.h5"
    run(digits_untrained_model, out)
    counts = read_counts(out)
    stored = certificates_from_counts(counts.counts_select, counts.counts, 0.01, 0.25, slack=counts.radius_slack)
    data = load_split("digits", "test", limit=LIMIT)
    model = load_model(digits_untrained_model, device="cpu").model
    smooth = SmoothedClassifier(model, 10, 0.25, device="cpu", seed=3, noise_scheme="sound", off_grid="quantise")
    live = CohenCertifier(smooth).certify(data.x, n0=N0, n=N, alpha=0.01, indices=data.indices)
    assert [(c.prediction, c.radius, c.p_lower) for c in stored] == [(c.prediction, c.radius, c.p_lower) for c in live]
    assert torch.equal(torch.as_tensor(counts.indices), torch.as_tensor(data.indices))


def test_cohen_command_records_the_scheme_and_the_grid_shift(tmp_path, digits_untrained_model):
    from surrogate_cert.cli import main
    from surrogate_cert.core.certificate import read_meta

    out = tmp_path / "cohen.tsv"
    assert (
        main(
            [
                "cohen",
                "--model",
                digits_untrained_model,
                "--dataset",
                "digits",
                "--limit",
                "3",
                "--n0",
                "10",
                "--samples",
                "100",
                "--sigma",
                "0.25",
                "--noise-scheme",
                "sound",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_meta(str(out))
    assert meta["noise_scheme"] == NOISE_SCHEME_SOUND and 0 < meta["noise_slack"] < 1e-13
    assert 0 < meta["grid_shift_max"] <= 8 / 510 and "rounded to the 1/255 grid" in meta["guarantee_scope"]
