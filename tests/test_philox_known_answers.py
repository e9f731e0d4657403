"""The counter-based generator of noise scheme v3 (``core.philox``): Philox4x32-10 gives Random123's
known answers and agrees with an independent scalar implementation (including products that wrap
int64); words and Gaussians follow the documented counter layout; Gaussians are the Box-Muller values
of their words within ``MAX_ABS_ERROR``; and a row's values do not depend on which rows share its call,
their order, the chunking or the thread count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surrogate_cert.core import philox
from surrogate_cert.core.errors import InvalidParameterError
from surrogate_cert.core.philox import (
    MAX_ABS_ERROR,
    MAX_ABS_NORMAL,
    box_muller,
    keyed_normal,
    keyed_words,
    philox4x32,
)

M32 = 0xFFFFFFFF

# Random123's kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words), expected output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def scalar_philox(counter, key, rounds=10):
    """Philox4x32-R written from Salmon et al. (2011) with Python integers: key bumped before rounds 2..R."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def as_tensors(words):
    return tuple(torch.tensor([w], dtype=torch.int64) for w in words)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_gives_random123_known_answers(counter, key, expected):
    assert scalar_philox(counter, key) == expected
    assert tuple(int(w) for w in philox4x32(as_tensors(counter), key)) == expected


def test_philox_agrees_with_a_scalar_implementation_on_random_and_extreme_words():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(400, 4), dtype=np.uint64).astype(np.int64)
    counters[:50] = M32 - rng.integers(0, 3, size=(50, 4))  # products of the largest words wrap int64
    keys = [(0, 0), (M32, M32), (0x12345678, 0x9ABCDEF0)]
    for key in keys:
        lanes = philox4x32(tuple(torch.from_numpy(counters[:, i].copy()) for i in range(4)), key)
        got = np.stack([lane.numpy() for lane in lanes], axis=1)
        want = np.array([scalar_philox(tuple(int(v) for v in row), key) for row in counters], dtype=np.int64)
        assert np.array_equal(got, want), key
    # Lanes constant along a dimension may be passed with size 1 there (broadcast by the rounds).
    wide = philox4x32(
        (torch.arange(5).view(1, 5), torch.tensor([[3], [4]]), torch.tensor([[9], [9]]), torch.tensor([[1], [2]])),
        (7, 8),
    )
    for row, (c1, c3) in enumerate([(3, 1), (4, 2)]):
        for g in range(5):
            assert tuple(int(lane[row, g]) for lane in wide) == scalar_philox((g, c1, 9, c3), (7, 8))


@pytest.mark.parametrize(
    "seed,index,stream,sample",
    [(0, 0, 0, 0), (3, 811, 1, 300), (2**40 + 5, 2**33 + 7, 3, 2**35 + 511), (-1, 2**62 - 1, 2, 255)],
)
def test_words_follow_the_documented_counter_layout(seed, index, stream, sample):
    words = keyed_words(seed, [index], stream, [sample], 11)[0].tolist()
    s64 = seed & (2**64 - 1)
    key = (s64 & M32, s64 >> 32)
    block, position = divmod(sample, 256)
    for m, word in enumerate(words):
        counter = (position << 24 | m // 4, block, index & M32, index >> 32 | stream << 30)
        assert word == scalar_philox(counter, key)[m % 4], m


def test_gaussians_are_box_muller_of_their_words_within_the_stated_error():
    rows, size = 300, 75  # an odd number of values per sample: the last one is the cos half of a pair
    idx, smp = np.arange(rows) // 7, np.arange(rows) * 3 + 1000
    z = keyed_normal(11, idx, 2, smp, (3, 5, 5)).view(rows, size)
    words = keyed_words(11, idx, 2, smp, size + 1)
    pairs = box_muller(words[:, 0::2].contiguous(), words[:, 1::2].contiguous())
    expected = torch.stack(pairs, dim=-1).reshape(rows, -1)[:, :size]
    assert torch.equal(z, expected)

    edge = torch.tensor([0, 1, 2**29 - 1, 2**29, 2**30 - 1, 2**30, 3 * 2**29, 2**31, 3 * 2**30, 2**32 - 2, 2**32 - 1])
    draw = [torch.randint(0, 2**32, (1 << 18,), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    a = torch.cat([edge.repeat_interleave(len(edge)), draw[0]])
    b = torch.cat([edge.repeat(len(edge)), draw[1]])
    cos, sin = box_muller(a, b)
    radius = torch.sqrt(-2 * torch.log((a.double() + 0.5) * 2.0**-32))
    phi = b.double() * 2.0**-32 * 2 * math.pi
    assert float((cos.double() - radius * torch.cos(phi)).abs().max()) <= MAX_ABS_ERROR
    assert float((sin.double() - radius * torch.sin(phi)).abs().max()) <= MAX_ABS_ERROR
    assert float(torch.maximum(cos.abs(), sin.abs()).max()) <= MAX_ABS_NORMAL + MAX_ABS_ERROR


def numpy_box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented transform step for step in NumPy, whose float32 / float64 arithmetic and square root
    are IEEE-754 correctly rounded: an independent reference for the bits of every Gaussian."""
    f32 = np.float32
    u = (a.astype(np.float64) + 0.5) * 2.0**-32
    mantissa, exponent = np.frexp(u)
    low = mantissa < philox._SPLIT
    mantissa = np.where(low, mantissa * 2.0, mantissa)
    exponent = exponent - low
    s = ((mantissa - 1.0) / (mantissa + 1.0)).astype(f32)
    s2 = s * s
    series = s2 * f32(philox._ATANH_SERIES[0]) + f32(philox._ATANH_SERIES[1])
    for c in philox._ATANH_SERIES[2:]:
        series = series * s2 + f32(c)
    radius = np.sqrt(exponent.astype(f32) * f32(philox._MINUS_2_LN2) - series * s * f32(4.0))
    quarter = (b + 2**29) >> 30
    theta = (b - (quarter << 30)).astype(f32) * f32(philox._THETA_UNIT)
    t2 = theta * theta
    sin = t2 * f32(philox._SIN_SERIES[0]) + f32(philox._SIN_SERIES[1])
    for c in philox._SIN_SERIES[2:]:
        sin = sin * t2 + f32(c)
    sin = sin * theta
    cos = t2 * f32(philox._COS_SERIES[0]) + f32(philox._COS_SERIES[1])
    for c in philox._COS_SERIES[2:]:
        cos = cos * t2 + f32(c)
    odd, half = (quarter & 1) == 1, (quarter & 2) == 2
    radius = np.where(half, -radius, radius)
    return np.where(odd, -sin, cos) * radius, np.where(odd, cos, sin) * radius


def test_gaussian_bits_are_those_of_ieee_arithmetic_step_for_step():
    # torch's own vectorised sqrt is not correctly rounded on every CPU: the transform must not depend on it.
    rng = np.random.default_rng(5)
    for size in (1, 15, 17, 1000, 1 << 16):  # vector bodies and scalar tails alike
        a, b = rng.integers(0, 2**32, size), rng.integers(0, 2**32, size)
        got = box_muller(torch.from_numpy(a), torch.from_numpy(b))
        want = numpy_box_muller(a, b)
        assert np.array_equal(got[0].numpy(), want[0]) and np.array_equal(got[1].numpy(), want[1]), size


def test_a_rows_noise_does_not_depend_on_the_other_rows_order_chunks_or_threads(monkeypatch):
    rng = np.random.default_rng(3)
    idx, smp = rng.integers(0, 2**40, 120), rng.integers(0, 2**36, 120)
    whole = keyed_normal(5, idx, 1, smp, (3, 8, 8))
    alone = torch.cat([keyed_normal(5, idx[i : i + 1], 1, smp[i : i + 1], (3, 8, 8)) for i in range(len(idx))])
    assert torch.equal(whole, alone)
    order = rng.permutation(len(idx))
    assert torch.equal(keyed_normal(5, idx[order], 1, smp[order], (3, 8, 8)), whole[order])
    monkeypatch.setitem(philox._CHUNK, "cpu", 1000)  # chunks of 1000 counters: 5 rows each, ragged end
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(keyed_normal(5, idx, 1, smp, (3, 8, 8)), whole)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(keyed_words(5, idx[:3], 1, smp[:3], 7), keyed_words(5, idx, 1, smp, 9)[:3, :7])


def test_v3_noise_is_pinned():
    # Values of this version: a change of the layout or the transform must come with a new scheme name.
    words = keyed_words(3, [811], 1, [300], 4)[0].tolist()
    assert words == [scalar_philox(((300 % 256) << 24, 1, 811, 1 << 30), (3, 0))[i] for i in range(4)]
    z = keyed_normal(3, [811], 1, [300], (4,))[0]
    assert torch.equal(z, torch.tensor(PINNED_NORMAL, dtype=torch.float32)), z.tolist()


PINNED_NORMAL = [float.fromhex(h) for h in ("0x1.eff264p-1", "0x1.395df4p+0", "0x1.2f3b5cp-1", "0x1.6c630cp-1")]


@pytest.mark.parametrize(
    "call",
    [
        lambda: keyed_words(0, [-1], 0, [0], 4),
        lambda: keyed_words(0, [2**62], 0, [0], 4),
        lambda: keyed_words(0, [0], 4, [0], 4),
        lambda: keyed_words(0, [0], 0, [2**40], 4),
        lambda: keyed_words(0, [0, 1], 0, [0], 4),
        lambda: keyed_words(0, [0], 0, [0], philox.MAX_WORDS + 1),
        lambda: keyed_normal(0, [0], 0, [0], (4,), out=torch.empty(1, 5)),
    ],
)
def test_keys_out_of_range_are_refused(call):
    with pytest.raises(InvalidParameterError):
        call()
