"""A datagen job killed with SIGKILL mid-run and resumed with --resume gives exactly the file an
uninterrupted run gives (no lost, no duplicated rows); a second writer is refused meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_gen.generate import generate_counts
from data_gen.store import read_attrs, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core.errors import StoreError

MODEL_SOURCE = '''
import time
import torch
from torch import nn


class Linear(nn.Module):
    """A fixed linear digits classifier; ``delay`` seconds of sleep per forward pass make a job slow."""

    def __init__(self, delay):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(64, 10)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(10, 64, generator=gen))
            self.linear.bias.zero_()
        self.delay = delay

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.linear(x.flatten(1))


def slow():
    return Linear(0.03)


def fast():
    return Linear(0.0)
'''

LIMIT, N = 60, 400


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    module = tmp_path / "linear_model.py"
    module.write_text(MODEL_SOURCE)
    out = tmp_path / "train.h5"
    common = [
        "--dataset",
        "digits",
        "--split",
        "train",
        "--sigma",
        "0.25",
        "--n",
        str(N),
        "--n0",
        "20",
        "--limit",
        str(LIMIT),
        "--seed",
        "5",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "surrogate_cert",
            "datagen",
            "--model",
            f"{module}:slow",
            "--batch-size",
            "200",
            "--commit-every",
            "0",
            *common,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        rows = 0
        while rows == 0:
            assert proc.poll() is None, f"datagen ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "datagen never committed a row"
            time.sleep(0.05)
            if out.exists():
                try:
                    rows = read_attrs(out)["rows"]
                except StoreError:
                    rows = 0  # caught between the file's creation and its first readable state
        # A second writer on the same file is refused at once, and changes nothing.
        with pytest.raises(StoreError, match="another process"):
            generate_counts(
                "digits",
                "train",
                f"{module}:fast",
                0.25,
                N,
                str(out),
                n0=20,
                limit=LIMIT,
                seed=5,
                device="cpu",
                resume=True,
                progress=False,
            )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    partial = read_counts(out)
    assert 0 < len(partial) < LIMIT, "the kill must land mid-run"
    assert partial.attrs["complete"] is False

    # Resume with the same weights (the fast factory has the same SHA-256) and another batch size.
    assert main(["datagen", "--model", f"{module}:fast", "--batch-size", "333", "--resume", *common]) == 0
    resumed = read_counts(out)

    reference = tmp_path / "reference.h5"
    generate_counts(
        "digits",
        "train",
        f"{module}:fast",
        0.25,
        N,
        str(reference),
        n0=20,
        batch_size=1000,
        limit=LIMIT,
        seed=5,
        device="cpu",
        progress=False,
    )
    expected = read_counts(reference)
    assert resumed.attrs["complete"] is True and resumed.attrs["rows"] == LIMIT
    assert np.array_equal(resumed.indices, expected.indices)
    assert np.array_equal(resumed.counts, expected.counts)
    assert np.array_equal(resumed.counts_select, expected.counts_select)
    assert np.array_equal(resumed.counts[: len(partial)], partial.counts)
    assert (resumed.counts.sum(axis=1) == N).all() and (resumed.counts_select.sum(axis=1) == 20).all()
    assert not os.path.exists(str(out) + ".lock")
