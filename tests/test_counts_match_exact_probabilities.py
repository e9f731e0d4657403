"""Counts agree with exactly known class probabilities: for a linear binary model,
P(f(x + eps) = 1) = Phi(margin / sigma) (surrogate_cert.groundtruth). Binomial tests, with a check
that the same test rejects counts from a slightly wrong noise level (so it has teeth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from data_gen.generate import generate_counts
from data_gen.models import TORCHSCRIPT_META
from data_gen.store import read_counts
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.smoothing import SmoothedClassifier

SIGMA = 0.25


def chi2_pvalue(k, n, p):
    """Joint two-sided test that every k_i ~ Binomial(n_i, p_i): sum of squared z-scores ~ chi2(m)."""
    z2 = (k - n * p) ** 2 / (n * p * (1 - p))
    return stats.chi2.sf(z2.sum(), df=len(k))


def test_engine_counts_are_binomial_with_the_exact_probability():
    problem = linear_problem(40, sigma=SIGMA, max_margin_sigmas=2.0, input_shape=(1, 4, 4), seed=11)
    n = 20_000
    smooth = SmoothedClassifier(problem.model, 2, SIGMA, device="cpu", batch_size=4096, seed=7)
    counts = smooth.counts(problem.x, n, indices=np.arange(40) + 1000)
    k = counts[:, 1]
    assert (counts.sum(axis=1) == n).all()
    # Each input alone (Bonferroni over 40 inputs at family level 1e-3) and all inputs jointly.
    pvalues = [stats.binomtest(int(ki), n, pi).pvalue for ki, pi in zip(k, problem.p1)]
    assert min(pvalues) > 1e-3 / 40
    assert chi2_pvalue(k, n, problem.p1) > 1e-3
    # Teeth: the same counts are rejected against the probabilities of a 10% larger noise level.
    wrong_p = stats.norm.cdf(problem.margin / (1.1 * SIGMA))
    assert chi2_pvalue(k, n, wrong_p) < 1e-6


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_datagen_file_matches_exact_probabilities(tmp_path):
    """End to end: npz dataset, TorchScript model, HDF5 file; rows are matched by dataset index."""
    problem = linear_problem(60, sigma=SIGMA, max_margin_sigmas=2.0, input_shape=(1, 2, 2), seed=3)
    np.savez(tmp_path / "linear.npz", x=problem.x.numpy(), y=problem.true_class, num_classes=2)
    scripted = torch.jit.script(problem.model)
    torch.jit.save(
        scripted,
        str(tmp_path / "linear.ts"),
        _extra_files={TORCHSCRIPT_META: '{"num_classes": 2, "input_shape": [1, 2, 2]}'},
    )
    out = tmp_path / "test.h5"
    n = 8_000
    generate_counts(
        f"npz:{tmp_path / 'linear.npz'}",
        "train",
        str(tmp_path / "linear.ts"),
        SIGMA,
        n,
        str(out),
        n0=100,
        device="cpu",
        progress=False,
    )
    counts = read_counts(out)
    assert len(counts) == 27 and counts.num_classes == 2  # the train split: 45 % of 60
    p1 = problem.p1[counts.indices]
    assert np.array_equal(counts.labels, problem.true_class[counts.indices])
    assert chi2_pvalue(counts.counts[:, 1], n, p1) > 1e-3
    assert chi2_pvalue(counts.counts_select[:, 1], 100, p1) > 1e-3
    assert chi2_pvalue(counts.counts[:, 1], n, stats.norm.cdf(problem.margin[counts.indices] / (1.1 * SIGMA))) < 1e-6
