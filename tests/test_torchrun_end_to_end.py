"""The documented torchrun commands, run as written on 2 CPU processes (gloo): a datagen job whose
rank 1 is killed mid-run leaves no merged file and loses no committed row; relaunched with --resume
it continues each shard where it stopped and merges a file identical to a one-process run's. A
Cohen job writes one TSV identical to a one-process run's (but for the time column)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_gen.generate import generate_counts
from data_gen.store import StoreError, find_shards, read_attrs, read_counts, shard_path
from surrogate_cert.cli import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("surrogate-cert")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
LIMIT, N = 60, 400

MODEL_SOURCE = """
import time
import torch
from torch import nn


class Linear(nn.Module):
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
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCRIPT.exists(), reason=f"no surrogate-cert console script next to {sys.executable}"),
]


def environment() -> dict:
    # Subprocesses import the code under test (this checkout), not whatever the script was installed from.
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def committed(path) -> int:
    try:
        return int(read_attrs(path)["rows"])
    except StoreError:
        return 0  # not there yet, or caught mid-creation


def test_killed_rank_then_resume_merges_the_one_process_file(tmp_path):
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
        "--samples",
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
    job = subprocess.Popen(
        [
            *TORCHRUN,
            "--no-python",
            str(SCRIPT),
            "datagen",
            "--model",
            f"{module}:slow",
            "--batch-size",
            "200",
            "--commit-every",
            "0",
            *common,
        ],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while committed(shard_path(out, 1, 2)) == 0:
            assert job.poll() is None, f"the job ended before rank 1 could be killed: {job.communicate()}"
            assert time.monotonic() < deadline, "rank 1 never committed a row"
            time.sleep(0.05)
        rank1 = int(Path(shard_path(out, 1, 2) + ".lock").read_text())  # the lock names its writer
        os.kill(rank1, signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    assert not out.exists(), "no merged file from an incomplete set"
    before = {rank: read_counts(shard_path(out, rank, 2)) for rank in (0, 1)}
    assert 0 < len(before[1]) < LIMIT // 2, "rank 1 must die mid-run"

    relaunch = subprocess.run(
        [
            *TORCHRUN,
            "-m",
            "surrogate_cert",
            "datagen",
            "--model",
            f"{module}:fast",
            "--batch-size",
            "333",
            "--resume",
            *common,
        ],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    for rank, part in before.items():
        rest = LIMIT // 2 - len(part)
        assert (
            f"rank {rank}/2: {shard_path(out, rank, 2)}: {len(part)} of {LIMIT // 2} rows already committed, "
            f"counting {rest}" in relaunch.stderr
        )
    assert relaunch.stdout.count("wrote ") == 1 and find_shards(out) == {}

    reference = tmp_path / "reference.h5"
    generate_counts(
        "digits",
        "train",
        f"{module}:fast",
        0.25,
        N,
        str(reference),
        n0=20,
        limit=LIMIT,
        seed=5,
        device="cpu",
        progress=False,
    )
    merged, expected = read_counts(out), read_counts(reference)
    for name in ("indices", "labels", "counts", "counts_select"):
        assert getattr(merged, name).tobytes() == getattr(expected, name).tobytes(), name
    timing = {"created_utc", "command"}
    assert {k: v for k, v in merged.attrs.items() if k not in timing} == {
        k: v for k, v in expected.attrs.items() if k not in timing
    }
    for rank, part in before.items():  # committed rows were kept, not redone differently
        assert np.array_equal(merged.counts[rank::2][: len(part)], part.counts)


def read_rows(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(fh, delimiter="\t")]


def test_cohen_under_torchrun_writes_the_one_process_tsv(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    program = torch.export.export(
        model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, str(tmp_path / "base.pt2"))
    common = [
        "cohen",
        "--model",
        str(tmp_path / "base.pt2"),
        "--dataset",
        "digits",
        "--split",
        "test",
        "--limit",
        "15",
        "--sigma",
        "0.25",
        "--n0",
        "30",
        "--samples",
        "500",
        "--device",
        "cpu",
        "--no-progress",
    ]
    run = subprocess.run(
        [*TORCHRUN, "-m", "surrogate_cert", *common, "--out", str(tmp_path / "two.tsv")],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one.tsv")]) == 0
    two, one = read_rows(tmp_path / "two.tsv"), read_rows(tmp_path / "one.tsv")
    assert two == one and len(one) == 15
    meta = [json.loads((tmp_path / f"{name}.tsv.meta.json").read_text()) for name in ("two", "one")]
    assert (meta[0].pop("world_size"), meta[1].pop("world_size")) == (2, 1)
    assert {k: v for k, v in meta[0].items() if k != "command"} == {k: v for k, v in meta[1].items() if k != "command"}
