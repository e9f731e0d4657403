"""Certifying commands under torchrun: each process certifies its strided share of the split and
rank 0 puts the certificates back in the split's order. Noise is named by dataset index, so the
Cohen, sequential and hybrid certificates equal a one-process run's (all but the wall time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import calibrate_arrays
from data_gen.datasets import SplitData
from data_gen.distributed import Shard
from surrogate_cert.cli.common import certify_split
from surrogate_cert.core.cohen import CohenCertifier
from surrogate_cert.core.groundtruth import LinearBinaryModel, linear_problem
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier

SIGMA, SHAPE = 0.25, (1, 2, 2)


class Handoff(Shard):
    """Ranks run one after another in this process; rank 0 receives what the others handed over."""

    def __init__(self, rank, world_size, mailbox):
        super().__init__(rank=rank, world_size=world_size)
        self.mailbox = mailbox

    def gather(self, value):
        self.mailbox[self.rank] = value
        return [self.mailbox[r] for r in range(self.world_size)] if self.is_main else None


def sharded(data, certify, world_size, chunk):
    mailbox = {}
    for rank in reversed(range(world_size)):  # rank 0 last: it gathers
        merged = certify_split(data, certify, chunk, False, "test", Handoff(rank, world_size, mailbox))
    return merged


def fields(certificates):
    return [(c.prediction, c.radius, c.method, c.n_samples, c.p_lower) for c in certificates]


@pytest.fixture(scope="module")
def setup():
    cal = linear_problem(300, sigma=SIGMA, input_shape=SHAPE, seed=11)
    w = cal.model.w.double() + 0.5 * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) / 2
    w = w / torch.linalg.norm(w)
    scale = 1.702 * 1.5 / (2 * SIGMA)
    surrogate = Surrogate(
        LinearBinaryModel(w.float() * scale, -float(w @ torch.full((4,), 0.5, dtype=torch.float64)) * scale),
        arch="linear",
        input_shape=SHAPE,
        num_classes=2,
        sigma=SIGMA,
        kappa=50.0,
        w=0.2,
        device="cpu",
    )
    k1 = np.random.default_rng(0).binomial(10**5, cal.p1)
    calibration = calibrate_arrays(surrogate, cal.x, np.stack([10**5 - k1, k1], axis=1), 0.05, 1e-3)
    test = linear_problem(25, sigma=SIGMA, input_shape=SHAPE, seed=12)
    data = SplitData(
        "linear",
        "test",
        test.x,
        torch.zeros(25, dtype=torch.int64),
        np.random.default_rng(1).permutation(1000)[:25].astype(np.int64),
        2,
    )
    return surrogate, calibration, test, data


@pytest.mark.parametrize("world_size", [2, 3])
def test_cohen_sequential_and_hybrid_shards_equal_one_process(setup, world_size):
    surrogate, calibration, test, data = setup
    smooth = SmoothedClassifier(test.model, 2, SIGMA, device="cpu", batch_size=512, seed=7)
    cohen = CohenCertifier(smooth)
    sequential = EProcessCertifier(smooth, 1e-3, max_samples=2000, tolerance=0.02)
    hybrid = HybridCertifier(
        SurrogateCertifier(surrogate, calibration), EProcessCertifier(smooth, 1e-3, max_samples=2000, tolerance=0.02)
    )
    runs = {
        "cohen": lambda x, idx: cohen.certify(x, n0=50, n=1000, alpha=1e-3, indices=idx),
        "sequential": lambda x, idx: sequential.certify(x, indices=idx),
        "hybrid": lambda x, idx: hybrid.certify(x, indices=idx),
    }
    for name, certify in runs.items():
        one = certify_split(data, certify, 2048, False, name)
        many = sharded(data, certify, world_size, 2048)
        assert fields(many) == fields(one), name
    methods = {c.method for c in certify_split(data, runs["hybrid"], 2048, False, "hybrid")}
    assert {"surrogate", "eprocess"} <= methods  # both paths are compared
