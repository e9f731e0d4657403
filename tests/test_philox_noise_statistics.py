"""Statistical quality of scheme v3's Gaussians (``core.philox.keyed_normal``), at sizes with teeth:
pooled moments, a Kolmogorov-Smirnov test per noise block (and of the blocks' p-values), and no
correlation, of values or of their squares, between neighbouring keys (adjacent indices, streams,
blocks, seeds, samples of a block, values of a sample). Broken twins fail the same checks: a counter
that drops the lowest bit of the index (neighbouring inputs share their noise), one that ignores the
stream, Philox with 2 or 4 rounds instead of 10, and Box-Muller with the radius and angle from one word."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from surrogate_cert.core import philox
from surrogate_cert.core.philox import keyed_normal

BLOCK, VALUES = 256, 64  # one block of an 8 x 8 image: 16,384 values
FAMILY_ALPHA = 1e-4  # false alarm of each check (Bonferroni over its parts)


def block(seed: int, index: int, stream: int, number: int) -> np.ndarray:
    """The 256 x 64 Gaussians of one noise block."""
    samples = np.arange(number * BLOCK, (number + 1) * BLOCK)
    return keyed_normal(seed, np.full(BLOCK, index), stream, samples, (VALUES,)).numpy().astype(np.float64)


def moment_problems(values: np.ndarray) -> list[str]:
    """Pooled mean, variance, skewness and excess kurtosis against N(0, 1), each at 5 standard errors."""
    n = values.size
    found = {
        "mean": values.mean(),
        "variance": values.var() - 1,
        "skewness": stats.skew(values),
        "kurtosis": stats.kurtosis(values),
    }
    errors = {
        "mean": np.sqrt(1 / n),
        "variance": np.sqrt(2 / n),
        "skewness": np.sqrt(6 / n),
        "kurtosis": np.sqrt(24 / n),
    }
    return [f"{name} {value:.2e}" for name, value in found.items() if abs(value) > 5 * errors[name]]


def ks_problems(blocks: list[np.ndarray]) -> list[str]:
    """A KS test of each block against N(0, 1) (Bonferroni), and a KS test of the blocks' p-values against U(0, 1)."""
    p_values = np.array([stats.kstest(b.ravel(), "norm").pvalue for b in blocks])
    problems = []
    if p_values.min() < FAMILY_ALPHA / len(blocks):
        problems.append(f"block KS p = {p_values.min():.2e}")
    if stats.kstest(p_values, "uniform").pvalue < FAMILY_ALPHA:
        problems.append("block KS p-values not uniform")
    return problems


def correlation_problems(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Under independence each pair's correlation r (of values, and of squares) has sqrt(L) r ~ N(0, 1):
    their mean must be near 0 and their sum of squares chi-squared with as many degrees of freedom."""
    problems = []
    for name, transform in (("values", lambda v: v), ("squares", lambda v: v * v - 1)):
        z = np.array(
            [np.sqrt(a.size) * np.corrcoef(transform(a).ravel(), transform(b).ravel())[0, 1] for a, b in pairs]
        )
        k = len(z)
        low, high = stats.chi2.ppf([FAMILY_ALPHA / 4, 1 - FAMILY_ALPHA / 4], k)
        if abs(z.sum() / np.sqrt(k)) > stats.norm.isf(FAMILY_ALPHA / 4) or not low < (z * z).sum() < high:
            problems.append(f"{name}: mean z {z.mean():.2f}, sum z^2 {(z * z).sum():.1f} (df {k})")
    return problems


def neighbour_pairs(relation: str, count: int = 48) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` pairs of noise that differ by one step of ``relation`` in their key."""
    pairs = []
    for k in range(count):
        seed, index, stream, number = 7, 1000 + 2 * k, k % 3, k
        if relation == "index":
            pairs.append((block(seed, index, stream, number), block(seed, index + 1, stream, number)))
        elif relation == "stream":
            pairs.append((block(seed, index, stream, number), block(seed, index, stream + 1, number)))
        elif relation == "block":
            pairs.append((block(seed, index, stream, number), block(seed, index, stream, number + 1)))
        elif relation == "seed":
            pairs.append((block(seed + k, index, stream, number), block(seed + k + 1, index, stream, number)))
        elif relation == "sample":  # samples j and j + 1 of one block
            b = block(seed, index, stream, number)
            pairs.append((b[:-1], b[1:]))
        elif relation == "value":  # values p and p + 1 (the two halves of a Box-Muller pair, and across pairs)
            b = block(seed, index, stream, number)
            pairs.append((b[:, :-1], b[:, 1:]))
        elif relation == "group":  # values p and p + 4 (neighbouring counters of one sample)
            b = block(seed, index, stream, number)
            pairs.append((b[:, :-4], b[:, 4:]))
    return pairs


RELATIONS = ("index", "stream", "block", "seed", "sample", "value", "group")


def distribution_problems() -> list[str]:
    blocks = [block(3, index, stream, number) for index in range(16) for stream in range(2) for number in (0, 5, 2**20)]
    return moment_problems(np.concatenate([b.ravel() for b in blocks])) + ks_problems(blocks)


@pytest.mark.slow
def test_gaussians_have_normal_moments_and_pass_ks_per_block():
    assert distribution_problems() == []


@pytest.mark.slow
@pytest.mark.parametrize("relation", RELATIONS)
def test_neighbouring_keys_give_uncorrelated_noise(relation):
    assert correlation_problems(neighbour_pairs(relation)) == []


def _counters_dropping(bit_of: str):
    right = philox._row_counters

    def broken(idx, smp, stream, groups):
        if bit_of == "index":  # inputs 2k and 2k + 1 share their counters
            idx = idx & ~1
        return right(idx, smp, 0 if bit_of == "stream" else stream, groups)

    return broken


@pytest.mark.slow
@pytest.mark.parametrize("bit_of,relation", [("index", "index"), ("stream", "stream")])
def test_a_counter_shared_by_neighbouring_keys_is_caught(monkeypatch, bit_of, relation):
    monkeypatch.setattr(philox, "_row_counters", _counters_dropping(bit_of))
    assert correlation_problems(neighbour_pairs(relation, count=16)) != []


@pytest.mark.slow
@pytest.mark.parametrize("rounds", [2, 4])
def test_too_few_rounds_are_caught(monkeypatch, rounds):
    # With 4 rounds the moments and the KS tests pass, but neighbouring indices and blocks still correlate.
    right = philox.philox4x32
    monkeypatch.setattr(philox, "philox4x32", lambda counter, key, rounds_=10: right(counter, key, rounds))
    assert correlation_problems(neighbour_pairs("index", count=16)) != []
    assert correlation_problems(neighbour_pairs("block", count=16)) != []


@pytest.mark.slow
def test_radius_and_angle_from_one_word_is_caught(monkeypatch):
    right = philox.box_muller
    monkeypatch.setattr(philox, "box_muller", lambda radius, angle, out=None: right(radius, radius, out))
    assert distribution_problems() != []
