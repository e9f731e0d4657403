"""The quickstart's counts made by several worker processes (the torchrun shard path on one machine)
are the files one process makes, and a worker's error reaches the caller with its type."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from data_gen.store import read_counts
from surrogate_cert.core.errors import ModelError
from surrogate_cert.workflows.pipeline import QUICK, Pipeline

pytestmark = pytest.mark.slow

JOBS = [("surrogate", 40, 0, 30), ("cal", 60, 0, 25), ("test", 50, 10, 7)]


def pipeline(folder, base, workers):
    folder.mkdir()
    shutil.copy(base, folder / "base.pt")
    config = dataclasses.replace(QUICK, workers=workers, device="cpu")
    return Pipeline(folder, config, progress=False, quiet=True, resume=True)


def test_worker_processes_write_the_one_process_files(tmp_path, digits_untrained_model):
    one = pipeline(tmp_path / "one", digits_untrained_model, workers=1)
    one.counts_together(JOBS)
    two = pipeline(tmp_path / "two", digits_untrained_model, workers=2)
    two.counts_together(JOBS)
    for split, *_ in JOBS:
        a, b = read_counts(tmp_path / "one" / f"{split}.h5"), read_counts(tmp_path / "two" / f"{split}.h5")
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.counts, b.counts), split
        assert (a.counts_select is None) == (b.counts_select is None)
        if a.counts_select is not None:
            assert np.array_equal(a.counts_select, b.counts_select)
    assert not list((tmp_path / "two").glob("*.shard-*"))  # merged, shards removed
    assert two.manifest.data["stages"]["datagen cal"]["workers"] == 2
    # Done stages are reused, not counted again.
    two_again = Pipeline(two.folder, two.cfg, progress=False, quiet=True, resume=True)
    two_again.counts_together(JOBS)
    assert set(two_again.timings.values()) == {"reused"}


def test_a_workers_error_is_raised_with_its_type(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "base.pt").write_text("not a model\n")
    config = dataclasses.replace(QUICK, workers=2, device="cpu")
    run = Pipeline(folder, config, progress=False, quiet=True, resume=True)
    with pytest.raises(ModelError, match="text"):
        run.counts_together([("cal", 20, 0, 10)])
    assert not (folder / "cal.h5").exists()
