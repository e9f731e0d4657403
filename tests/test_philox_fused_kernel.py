"""The fused Triton kernel that draws scheme v3's noise on CUDA gives the eager reference's bits. Run on
the CPU by Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before Triton compiles, so in
a subprocess): the engine's probe accepts the kernel, and its Gaussians and the engine's counts through
it equal the eager ones. Skipped where Triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_gen.datasets import load_split
from surrogate_cert.core.philox import keyed_normal
from surrogate_cert.core.smoothing import NOISE_SCHEME_V3, SmoothedClassifier

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import numpy as np
import torch
from torch import nn
from data_gen.datasets import load_split
from surrogate_cert.core import philox
from surrogate_cert.core.smoothing import NOISE_SCHEME_V3, SmoothedClassifier

torch.set_num_threads(1)
assert philox._fused_fill(torch.device("cpu")) is not None, "the probe refused the kernel"
rng = np.random.default_rng(1)
idx, smp = rng.integers(0, 2**62, 300), rng.integers(0, 2**40, 300)
np.save(sys.argv[1], philox.keyed_normal(7, idx, 2, smp, (3, 5, 5)).numpy())
gen = torch.Generator().manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
with torch.no_grad():
    model[1].weight.copy_(torch.randn(10, 64, generator=gen))
    model[1].bias.zero_()
data = load_split("digits", "test", limit=6)
smooth = SmoothedClassifier(model, 10, 0.25, device="cpu", batch_size=256, seed=3, noise_scheme=NOISE_SCHEME_V3)
np.save(sys.argv[2], smooth.counts(data.x, 500, indices=data.indices, start=40))
"""


def spread_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=gen))
        model[1].bias.zero_()
    return model


@pytest.mark.slow
def test_fused_kernel_reproduces_the_eager_noise_and_counts(tmp_path):
    noise_file, counts_file = tmp_path / "noise.npy", tmp_path / "counts.npy"
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SURROGATE_CERT_FUSED_NOISE", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(noise_file), str(counts_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rng = np.random.default_rng(1)
    idx, smp = rng.integers(0, 2**62, 300), rng.integers(0, 2**40, 300)
    assert np.array_equal(np.load(noise_file, allow_pickle=False), keyed_normal(7, idx, 2, smp, (3, 5, 5)).numpy())
    data = load_split("digits", "test", limit=6)
    smooth = SmoothedClassifier(
        spread_model(), 10, 0.25, device="cpu", batch_size=300, seed=3, noise_scheme=NOISE_SCHEME_V3
    )
    eager = smooth.counts(data.x, 500, indices=data.indices, start=40)
    assert (eager > 0).sum(axis=1).max() >= 3, "the model must spread predictions, or this test has no teeth"
    assert np.array_equal(np.load(counts_file, allow_pickle=False), eager)
