"""datagen's torchrun shards, simulated in one process: process r of W counts rows r, r + W, ... into
its own shard file, rank 0 merges them into exactly the file a one-process run writes, and every bad
input (missing, unfinished or foreign shard, another world size, a one-process run over shards, more
processes than images) gets a one-line error with nothing committed lost and no merged file written."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from data_gen.distributed import Shard, shard_positions
from data_gen.generate import generate_counts
from data_gen.store import (
    ResumeMismatchError,
    ShardError,
    find_shards,
    read_attrs,
    read_counts,
    shard_path,
)
from surrogate_cert.core.errors import InvalidParameterError

LIMIT, N, N0 = 11, 300, 20  # 11 rows: the world size 2 does not divide them (shards of 6 and 5 rows)


class LocalShard(Shard):
    """One rank of a job whose other ranks run before or after it in this process: collective steps
    that only synchronise are no-ops, and a rank's own error is raised as torchrun's ranks would."""

    def agree(self, error):
        if error is not None:
            raise error

    def broadcast(self, value):
        return value

    def gather(self, value):
        return [value] if self.is_main else None


def run(model, out, rank=None, world_size=2, **kwargs):
    kwargs = {"n0": N0, "limit": LIMIT, "seed": 4, "device": "cpu", "progress": False, "batch_size": 500, **kwargs}
    shard = None if rank is None else LocalShard(rank=rank, world_size=world_size)
    return generate_counts("digits", "cal", model, 0.25, N, str(out), shard=shard, **kwargs)


def assert_same_file(a, b):
    a, b = read_counts(a), read_counts(b)
    for name in ("indices", "labels", "counts", "counts_select"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    timing = {"created_utc", "command"}
    assert {k: v for k, v in a.attrs.items() if k not in timing} == {
        k: v for k, v in b.attrs.items() if k not in timing
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory, digits_untrained_model):
    out = tmp_path_factory.mktemp("single") / "cal.h5"
    run(digits_untrained_model, out)
    return out


def test_strided_shards_are_balanced_and_cover_every_row_once():
    for rows, world in [(11, 2), (10, 3), (7, 7), (100, 8)]:
        parts = [shard_positions(rows, r, world) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(rows))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_merged_shards_equal_the_one_process_file(tmp_path, digits_untrained_model, single):
    out = tmp_path / "cal.h5"
    # Rank 0 finishes first: at merge time shard 1 is missing, so no merged file is written.
    with pytest.raises(ShardError, match=r"shard .*shard-1-of-2 is missing; relaunch .* --resume"):
        run(digits_untrained_model, out, rank=0, resume=True)
    assert not out.exists() and read_attrs(shard_path(out, 0, 2))["complete"]
    run(digits_untrained_model, out, rank=1, resume=True, batch_size=77)  # batch size does not matter
    assert not out.exists()  # only rank 0 merges
    run(digits_untrained_model, out, rank=0, resume=True)
    assert_same_file(out, single)
    assert find_shards(out) == {} and not [p for p in os.listdir(tmp_path) if p != "cal.h5"]
    # A relaunch of the finished job has nothing to do; a one-process resume of the merged file neither.
    run(digits_untrained_model, out, rank=0, resume=True)
    run(digits_untrained_model, out, resume=True)
    assert_same_file(out, single)


def test_shards_of_another_job_or_world_size_are_refused(tmp_path, digits_untrained_model):
    out = tmp_path / "cal.h5"
    run(digits_untrained_model, out, rank=1)
    # Rank 0 of a job with another seed counts its shard, but refuses to merge rank 1's seed-4 shard.
    with pytest.raises(ShardError, match=r"shard-1-of-2 comes from another job \(seed 4 vs 5\)"):
        run(digits_untrained_model, out, rank=0, seed=5, resume=True)
    assert not out.exists()
    # Relaunching the seed-4 job resumes rank 1's shard, but rank 0's seed-5 shard is refused.
    with pytest.raises(ResumeMismatchError, match="seed 5 in the file vs 4 requested"):
        run(digits_untrained_model, out, rank=0, resume=True)
    # Another world size, or a one-process run, must not mix with these shards.
    with pytest.raises(ShardError, match="shards of a torchrun job with 2 processes.*this one has 3"):
        run(digits_untrained_model, out, rank=0, world_size=3, resume=True)
    with pytest.raises(ShardError, match="unfinished torchrun job with 2 processes"):
        run(digits_untrained_model, out, resume=True)
    with pytest.raises(ShardError, match="pass --resume to continue them"):
        run(digits_untrained_model, out, rank=0)
    assert read_attrs(shard_path(out, 1, 2))["complete"] and not out.exists()


def test_unfinished_shard_is_not_merged_and_resumes(tmp_path, digits_untrained_model, single, capfd):
    out = tmp_path / "cal.h5"
    with pytest.raises(InvalidParameterError, match="12 processes for 11 images"):
        run(digits_untrained_model, out, rank=0, world_size=12)
    run(digits_untrained_model, out, rank=1)
    with h5py.File(shard_path(out, 1, 2), "r+") as h5:  # as if rank 1 had died after committing 2 rows
        h5.attrs["rows"], h5.attrs["complete"] = 2, False
    with pytest.raises(ShardError, match=r"shard-1-of-2 has 2 of 5 rows; relaunch .* --resume"):
        run(digits_untrained_model, out, rank=0, resume=True)
    assert not out.exists()
    capfd.readouterr()
    run(digits_untrained_model, out, rank=1, resume=True)  # continues after the committed rows
    assert "rank 1/2: " in (err := capfd.readouterr().err) and "2 of 5 rows already committed, counting 3" in err
    run(digits_untrained_model, out, rank=0, resume=True)
    assert_same_file(out, single)
