"""Counter-based keyed noise: Philox4x32-10 words and Gaussians named by (seed, index, stream, sample).

A counter-based generator computes its output as a pure function of a key and a counter, so the
noise of any set of samples is drawn in one vectorised pass, with no generator state and no work per
block (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). This module is the
noise of scheme ``philox4x32-block256-v3`` (``core.smoothing.NOISE_SCHEME_V3``); it is written in
plain torch tensor operations, so the same code runs on every device. On CUDA, a fused Triton kernel
of the same operations (``core.philox_triton``) replaces the ~200 kernel launches of a batch by one,
once it has reproduced this reference bit for bit on a probe of keys
(``SURROGATE_CERT_FUSED_NOISE=0`` turns it off).

Layout (all words unsigned 32-bit): sample ``j`` of stream ``stream`` of the input named ``index``
lies in noise block ``block = j // 256`` at position ``s = j % 256``. Its word ``m``
(``0 <= m < MAX_WORDS``) is lane ``m % 4`` of Philox4x32-10 at

    key     = (seed mod 2**32, (seed >> 32) mod 2**32)              # the seed modulo 2**64
    counter = (s << 24 | m // 4,  block,  index mod 2**32,  (index >> 32) | stream << 30)

with ``0 <= index < 2**62``, ``0 <= stream < 4`` and ``0 <= block < 2**32``. Distinct (seed, index,
stream, j, m) give distinct (key, counter) pairs, and Philox is a bijection of the counter for each
key, so no two samples, streams or inputs ever share a word; how many samples a call draws, in
which order, on how many processes, changes nothing.

Gaussians (``keyed_normal``): value ``p`` of a sample (its pixels in C x H x W order) is component
``p % 2`` of the Box-Muller transform of the sample's words ``2q`` and ``2q + 1``, ``q = p // 2``:

    u = (a + 1/2) 2**-32 in (0, 1),  phi = 2 pi b 2**-32,  (z0, z1) = sqrt(-2 ln u) (cos phi, sin phi).

Precision: the integer-to-float steps and the range reductions (``frexp`` of ``u``, the quadrant of
``phi``) are exact in float64; ``ln`` (atanh series) and ``sin`` / ``cos`` (Taylor series on
[-pi/4, pi/4]) are float32 polynomials truncated below float32 precision. Each value lies within
``1e-6`` of the exact Box-Muller value (``MAX_ABS_ERROR``; about 4 float32 ulps of the
largest values). Uniforms have 32 bits, so ``|z| <= sqrt(66 ln 2) = 6.76`` (``MAX_ABS_NORMAL``): the
tails beyond 6.76 standard deviations (probability 1.4e-11) are cut, as in every 32-bit Box-Muller.

Determinism: only integer operations, the IEEE-754 correctly rounded ``+ - * /``, the exact ``frexp``
and conversions, and a square root made correctly rounded (``_radius``) are used, each as its own
tensor operation, never a library ``log`` / ``sin`` / ``sqrt`` result as is (vectorised and scalar code
paths may round those differently), and every constant is a float32 value. So a value's bits are
those of IEEE arithmetic step for step: they do not depend on how many values one call computes, on
vectorisation or threads, and by construction not on the device either (checked on CPUs only).
torch's int64 multiply wraps modulo 2**64 (two's complement), so the 32 x 32 -> 64-bit product of
Philox is read from it with a shift and a mask (splitting into 16-bit halves would avoid the wrap
but cost half as much again); the Random123 known-answer vectors, whose products wrap, pin this down.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .errors import InvalidParameterError

__all__ = [
    "PHILOX_ROUNDS",
    "BLOCK_SAMPLES",
    "MAX_WORDS",
    "INDEX_LIMIT",
    "STREAM_LIMIT",
    "BLOCK_LIMIT",
    "MAX_ABS_ERROR",
    "MAX_ABS_NORMAL",
    "philox4x32",
    "check_keys",
    "keyed_words",
    "keyed_normal",
    "fill_keyed_normal",
    "box_muller",
    "FUSED_ENV",
]

PHILOX_ROUNDS = 10
"""Rounds of Philox4x32 (the Random123 default, with a safety margin over the 7 that pass BigCrush)."""
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF

BLOCK_SAMPLES = 256
"""Samples per noise block (``core.smoothing.NOISE_BLOCK``): the position in a block takes 8 bits of the counter."""
_GROUP_BITS = 24
MAX_WORDS = 4 << _GROUP_BITS
"""Most 32-bit words (and Gaussians) one sample can have: 2**26 (an image of up to 67 million values)."""
INDEX_LIMIT = 1 << 62
"""Noise names (dataset indices) lie in ``[0, INDEX_LIMIT)``."""
STREAM_LIMIT = 4
"""Streams lie in ``[0, STREAM_LIMIT)``."""
BLOCK_LIMIT = 1 << 32
"""Blocks lie in ``[0, BLOCK_LIMIT)``: 1.1e12 samples per input and stream."""
MAX_ABS_NORMAL = math.sqrt(66.0 * math.log(2.0))
"""Box-Muller's radius at the smallest uniform, ``2**-33``: every ``|z| <= MAX_ABS_NORMAL + MAX_ABS_ERROR``."""
MAX_ABS_ERROR = 1e-6
"""Bound on ``|z - z_exact|`` of every Gaussian (largest seen: 6.6e-7; see the module docstring)."""

_CHUNK = {"cpu": 1 << 14, "cuda": 1 << 22}
"""Philox counters per pass: on a CPU the working set then stays in cache; on a GPU large passes
amortise kernel launches (about 80 bytes of temporaries per counter)."""


def philox4x32(
    counter: Sequence[torch.Tensor], key: tuple[int, int], rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox4x32-``rounds`` bijection of a counter under a key (Random123's ``philox4x32_R``).

    Parameters
    ----------
    counter : sequence of 4 torch.Tensor
        The counter words ``(c0, c1, c2, c3)``: int64 tensors holding values in ``[0, 2**32)``, of
        shapes that broadcast together (a lane that is constant along a dimension may have size 1
        there: the first rounds then cost less).
    key : (int, int)
        The key words ``(k0, k1)``, each in ``[0, 2**32)``.
    rounds : int, optional
        Rounds (default 10, ``PHILOX_ROUNDS``).

    Returns
    -------
    tuple of 4 torch.Tensor
        The output words, int64 with values in ``[0, 2**32)``, broadcast to the counter's shape.

    Examples
    --------
    >>> zero = torch.zeros(1, dtype=torch.int64)
    >>> [f"{int(w):08x}" for w in philox4x32((zero, zero, zero, zero), (0, 0))]
    ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
    """
    c0, c1, c2, c3 = counter
    k0, k1 = int(key[0]) & _M32, int(key[1]) & _M32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _WEYL[0]) & _M32, (k1 + _WEYL[1]) & _M32
        # Each product of two 32-bit words is < 2**64: its high word is (p >> 32) masked (the shift of a
        # product that wrapped to a negative int64 brings in ones), its low word p & M32.
        p0, p1 = c0 * _MULTIPLIERS[0], c2 * _MULTIPLIERS[1]
        lo0, lo1 = p0 & _M32, p1 & _M32
        c0 = torch.bitwise_xor(p1.bitwise_right_shift_(32), c1).bitwise_xor_(k0).bitwise_and_(_M32)
        c2 = torch.bitwise_xor(p0.bitwise_right_shift_(32), c3).bitwise_xor_(k1).bitwise_and_(_M32)
        c1, c3 = lo1, lo0
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)  # views: a lane may still have size 1 after 2 rounds
    return c0, c1, c2, c3


def _seed_key(seed: int) -> tuple[int, int]:
    seed = int(seed) & ((1 << 64) - 1)
    return seed & _M32, seed >> 32


def check_keys(indices, samples, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` and ``samples`` as int64 arrays of one length, each in range; else InvalidParameterError.

    Parameters
    ----------
    indices, samples : array_like of int
        Noise names in ``[0, 2**62)`` and sample numbers in ``[0, 2**40)``, one per row.
    stream : int
        In ``[0, 4)``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Both as flat int64 arrays.

    Raises
    ------
    InvalidParameterError
        If a value is out of range or the lengths differ.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    smp = np.asarray(samples, dtype=np.int64).reshape(-1)
    if idx.shape != smp.shape:
        raise InvalidParameterError(
            f"indices and samples must have one entry per row each, got {idx.size} and {smp.size}"
        )
    if not 0 <= int(stream) < STREAM_LIMIT:
        raise InvalidParameterError(f"stream must be in [0, {STREAM_LIMIT}), got {stream}")
    if idx.size and (idx.min() < 0 or idx.max() >= INDEX_LIMIT):
        raise InvalidParameterError(
            f"noise names (dataset indices) must lie in [0, 2**62), got {idx.min()}..{idx.max()}"
        )
    if smp.size and (smp.min() < 0 or smp.max() >= BLOCK_LIMIT * BLOCK_SAMPLES):
        raise InvalidParameterError("sample numbers must lie in [0, 2**40) (1.1e12 samples per input and stream)")
    return idx, smp


def _row_counters(idx: torch.Tensor, smp: torch.Tensor, stream: int, groups: int):
    """Counters of word groups ``0 .. groups - 1`` of each row: c0 is ``R x groups``, c1..c3 are ``R x 1``."""
    g = torch.arange(groups, dtype=torch.int64, device=idx.device)
    c0 = ((smp & (BLOCK_SAMPLES - 1)) << _GROUP_BITS).unsqueeze(1) | g
    c1 = (smp >> 8).unsqueeze(1)
    c2 = (idx & _M32).unsqueeze(1)
    c3 = ((idx >> 32) | (int(stream) << 30)).unsqueeze(1)
    return c0, c1, c2, c3


def _chunks(rows: int, groups: int, device: torch.device):
    """Row ranges of about ``_CHUNK`` counters each (at least one row)."""
    per = max(1, _CHUNK.get(device.type, _CHUNK["cuda"]) // max(groups, 1))
    return ((lo, min(lo + per, rows)) for lo in range(0, rows, per))


def keyed_words(
    seed: int, indices, stream: int, samples, words: int, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """The first ``words`` 32-bit words of each row's sample (see the module docstring for the layout).

    Row ``r`` is sample ``samples[r]`` of stream ``stream`` of the input named ``indices[r]``; its words
    do not depend on the other rows, on ``words`` (word ``m`` is the same for every ``words > m``) or
    on the device. Other schemes (e.g. an exact discrete Gaussian) can draw their random bits here.

    Parameters
    ----------
    seed : int
        The job's noise seed (taken modulo 2**64).
    indices : array_like of int
        One noise name per row (a dataset index), in ``[0, 2**62)``.
    stream : int
        Which independent stream, in ``[0, 4)``.
    samples : array_like of int
        One sample number per row, in ``[0, 2**40)``.
    words : int
        Words per row, in ``[0, MAX_WORDS]``.
    device : str or torch.device, optional
        Where to compute (default CPU).

    Returns
    -------
    torch.Tensor
        ``len(indices) x words`` int64 words, each in ``[0, 2**32)``, on ``device``.

    Raises
    ------
    InvalidParameterError
        If an index, the stream, a sample number or ``words`` is out of range, or ``indices`` and
        ``samples`` differ in length.

    Examples
    --------
    >>> keyed_words(0, [7], 1, [300], 6).tolist() == keyed_words(0, [5, 7], 1, [0, 300], 9)[1:, :6].tolist()
    True
    """
    idx, smp = check_keys(indices, samples, stream)
    if not 0 <= int(words) <= MAX_WORDS:
        raise InvalidParameterError(f"words must lie in [0, {MAX_WORDS}], got {words}")
    device = torch.device(device or "cpu")
    groups = (int(words) + 3) // 4
    out = torch.empty((idx.size, 4 * groups), dtype=torch.int64, device=device)
    idx_t, smp_t = torch.from_numpy(idx).to(device), torch.from_numpy(smp).to(device)
    for lo, hi in _chunks(idx.size, groups, device):
        lanes = philox4x32(_row_counters(idx_t[lo:hi], smp_t[lo:hi], stream, groups), _seed_key(seed))
        torch.stack(lanes, dim=-1, out=out[lo:hi].view(hi - lo, groups, 4))
    return out[:, :words]


def box_muller(
    radius_words: torch.Tensor, angle_words: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent standard Gaussians per pair of 32-bit words: ``sqrt(-2 ln u) (cos phi, sin phi)``.

    ``u = (a + 1/2) 2**-32`` from ``radius_words``, ``phi = 2 pi b 2**-32`` from ``angle_words``; see the
    module docstring for the precision (``MAX_ABS_ERROR``) and why only correctly rounded operations
    are used (the bits of a value depend on its two words only).

    Parameters
    ----------
    radius_words, angle_words : torch.Tensor
        int64 tensors of one shape, values in ``[0, 2**32)``.
    out : (torch.Tensor, torch.Tensor), optional
        float32 tensors of that shape (views are fine) to write the two Gaussians into.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        float32 ``(z_cos, z_sin)``, each ``|z| <= MAX_ABS_NORMAL + MAX_ABS_ERROR``.

    Examples
    --------
    >>> z = box_muller(torch.tensor([2**31]), torch.tensor([0]))   # u = 1/2 + 2**-33, phi = 0
    >>> round(float(z[0][0]), 5), float(z[1][0])
    (1.17741, 0.0)
    """
    radius = _radius(radius_words)
    quarter = (angle_words + (1 << 29)) >> 30  # nearest quarter turn, 0..4
    cos, sin = _cos_sin_quarter(angle_words - (quarter << 30), (quarter & 1).bool())
    # Half a turn further, cos and sin change sign: fold that into the radius.
    radius = torch.where((quarter & 2).bool(), -radius, radius)
    if out is None:
        return cos.mul_(radius), sin.mul_(radius)
    torch.mul(cos, radius, out=out[0])
    torch.mul(sin, radius, out=out[1])
    return out


def _f32(value: float) -> float:
    """``value`` rounded to float32: every constant of the transform is one, so eager torch (which rounds a
    Python scalar to the tensor's float32) and a compiled kernel use the same number."""
    return float(np.float32(value))


_SPLIT = _f32(math.sqrt(0.5))
"""Where the mantissa range is cut (``[1/2, 1)`` to ``[SPLIT, 2 SPLIT)``): a float32 value, exact in float64."""
_ATANH_SERIES = tuple(_f32(1.0 / k) for k in (9, 7, 5, 3, 1))
_MINUS_2_LN2 = _f32(-2.0 * math.log(2.0))
_THETA_UNIT = _f32(math.pi / 2 * 2.0**-30)
_SIN_SERIES = tuple(_f32(c) for c in (1.0 / 362880, -1.0 / 5040, 1.0 / 120, -1.0 / 6, 1.0))
_COS_SERIES = tuple(_f32(c) for c in (-1.0 / 3628800, 1.0 / 40320, -1.0 / 720, 1.0 / 24, -0.5, 1.0))


def _radius(words: torch.Tensor) -> torch.Tensor:
    """``sqrt(-2 ln u)``, ``u = (w + 1/2) 2**-32``, float32."""
    u = words.to(torch.float64).add_(0.5).mul_(2.0**-32)  # exact: 33 significant bits
    mantissa, exponent = torch.frexp(u)  # u = mantissa 2**exponent, mantissa in [1/2, 1)
    low = mantissa < _SPLIT
    mantissa = torch.where(low, mantissa * 2.0, mantissa)  # now in [SPLIT, 2 SPLIT): |s| <= 0.1716
    exponent = exponent.sub_(low.to(exponent.dtype))
    # ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1)/(m + 1): computed in float64, s keeps
    # its relative precision in float32 even when u is near 1; the series after s^9 is below 2**-28.
    s = (mantissa - 1.0).div_(mantissa.add_(1.0)).to(torch.float32)
    s2 = s * s
    series = s2 * _ATANH_SERIES[0] + _ATANH_SERIES[1]
    for coefficient in _ATANH_SERIES[2:]:
        series.mul_(s2).add_(coefficient)
    ln_mantissa = series.mul_(s)  # ln m / 2
    # -2 ln u = -2 (e ln 2 + ln m)
    square = exponent.to(torch.float32).mul_(_MINUS_2_LN2).sub_(ln_mantissa.mul_(4.0))
    # torch's vectorised sqrt is not correctly rounded on every CPU (1 ulp off for 15% of float32 values on
    # AVX-512), so its result could depend on which code path a value took. The square root of a float32
    # lies at least 2**-50 (relative) from every float32 rounding midpoint, so a float64 square root within
    # 2 ulps, rounded to float32, is the correctly rounded float32 square root, on every path.
    return square.to(torch.float64).sqrt_().to(torch.float32)


def _cos_sin_quarter(offset: torch.Tensor, odd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of ``q pi/2 + theta`` for ``q`` in {0, 1} (``odd``), float32, ``theta = offset 2**-30 pi/2``.

    ``offset`` lies in ``[-2**29, 2**29)``, so ``|theta| <= pi/4``: Taylor series to ``theta**10``, whose
    next terms are below 2**-28. A quarter turn further, ``(cos, sin)`` becomes ``(-sin, cos)``.
    """
    theta = offset.to(torch.float32).mul_(_THETA_UNIT)
    t2 = theta * theta
    sin = t2 * _SIN_SERIES[0] + _SIN_SERIES[1]
    for coefficient in _SIN_SERIES[2:]:
        sin.mul_(t2).add_(coefficient)
    sin.mul_(theta)
    cos = t2 * _COS_SERIES[0] + _COS_SERIES[1]
    for coefficient in _COS_SERIES[2:]:
        cos.mul_(t2).add_(coefficient)
    return torch.where(odd, sin.neg(), cos), torch.where(odd, cos, sin)


def keyed_normal(
    seed: int,
    indices,
    stream: int,
    samples,
    shape: Sequence[int],
    *,
    device: str | torch.device | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard Gaussian noise of each row's sample: value ``p`` is Box-Muller of its words ``2q``, ``2q + 1``.

    A row's noise is a pure function of (seed, index, stream, sample number): it does not depend on
    the other rows, on how many are drawn at once, on threads or on vectorisation (module docstring).

    Parameters
    ----------
    seed : int
        The job's noise seed (taken modulo 2**64).
    indices : array_like of int
        One noise name per row (a dataset index), in ``[0, 2**62)``.
    stream : int
        Which independent stream, in ``[0, 4)``.
    samples : array_like of int
        One sample number per row, in ``[0, 2**40)``.
    shape : sequence of int
        Shape of one sample (e.g. ``(C, H, W)``), at most ``MAX_WORDS`` values.
    device : str or torch.device, optional
        Where to compute (default: ``out``'s device, else CPU).
    out : torch.Tensor, optional
        A contiguous float32 tensor of shape ``(len(indices), *shape)`` to write into.

    Returns
    -------
    torch.Tensor
        ``len(indices) x shape`` float32 standard Gaussians (``out`` when given).

    Raises
    ------
    InvalidParameterError
        If an index, the stream, a sample number or the sample size is out of range, or ``out`` does
        not fit.

    Examples
    --------
    >>> a = keyed_normal(3, [10, 11], 1, [0, 255], (2, 3))
    >>> torch.equal(a[1], keyed_normal(3, [11], 1, [255], (2, 3))[0])
    True
    """
    idx, smp = check_keys(indices, samples, stream)
    shape = tuple(int(v) for v in shape)
    size = math.prod(shape)
    if not 0 <= size <= MAX_WORDS:
        raise InvalidParameterError(f"a sample may have at most {MAX_WORDS} values, got shape {shape}")
    device = torch.device(device) if device is not None else (out.device if out is not None else torch.device("cpu"))
    if out is None:
        out = torch.empty((idx.size, *shape), dtype=torch.float32, device=device)
    elif (
        out.shape != (idx.size, *shape) or out.dtype != torch.float32 or not out.is_contiguous() or out.device != device
    ):
        raise InvalidParameterError(f"out must be a contiguous float32 {(idx.size, *shape)} tensor on {device}")
    return fill_keyed_normal(out, seed, torch.from_numpy(idx).to(device), stream, torch.from_numpy(smp).to(device))


def fill_keyed_normal(
    out: torch.Tensor, seed: int, indices: torch.Tensor, stream: int, samples: torch.Tensor
) -> torch.Tensor:
    """``keyed_normal`` into ``out`` for keys already on its device and already checked (``check_keys``).

    The counting engine's entry: no host round trip, no check per call. ``out`` is a contiguous
    float32 ``R x ...`` tensor, ``indices`` and ``samples`` int64 tensors of length ``R`` on its device.
    """
    fused = _fused_fill(out.device)
    if fused is not None:
        return fused(out, seed, indices, stream, samples)
    return _fill_eager(out, seed, indices, stream, samples)


def _fill_eager(
    out: torch.Tensor, seed: int, indices: torch.Tensor, stream: int, samples: torch.Tensor
) -> torch.Tensor:
    """The reference: ``fill_keyed_normal`` in eager torch operations, chunk by chunk."""
    rows = out.shape[0]
    size = out[0].numel() if rows else 0
    groups = (size + 3) // 4
    flat = out.view(rows, size)
    for lo, hi in _chunks(rows, groups, out.device):
        _normal_rows(flat[lo:hi], indices[lo:hi], samples[lo:hi], stream, groups, _seed_key(seed))
    return out


FUSED_ENV = "SURROGATE_CERT_FUSED_NOISE"
"""Environment variable: ``0`` keeps the eager path on CUDA (default: the fused kernel, once verified)."""
_FUSED: dict = {}


def _fused_fill(device: torch.device):
    """The fused Triton kernel for ``device`` (CUDA; or any device under ``TRITON_INTERPRET=1``, for tests) if
    it reproduces the eager reference bit for bit on a probe of keys, else None (with a warning if it ran)."""
    if os.environ.get(FUSED_ENV, "1") == "0" or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return None
    if str(device) not in _FUSED:
        _FUSED[str(device)] = _verified_kernel(device)
    return _FUSED[str(device)]


def _verified_kernel(device: torch.device):
    try:
        from . import philox_triton
    except Exception:  # noqa: BLE001 - no Triton (or none for this platform): the eager path serves
        return None
    rng = np.random.default_rng(0)
    idx = np.concatenate([[0, INDEX_LIMIT - 1, 2**32 - 1, 2**32], rng.integers(0, INDEX_LIMIT, 1020)])
    smp = np.concatenate([[0, BLOCK_LIMIT * BLOCK_SAMPLES - 1, 255, 256], rng.integers(0, 2**40, 1020)])
    idx_t, smp_t = torch.from_numpy(idx).to(device), torch.from_numpy(smp).to(device)
    try:
        for seed, stream, shape in ((0, 0, (77,)), (2**64 - 1, 3, (1, 8, 8)), (12345, 1, (3, 2, 2))):
            want = _fill_eager(torch.empty((idx.size, *shape), device=device), seed, idx_t, stream, smp_t)
            got = philox_triton.fill(torch.empty_like(want), seed, idx_t, stream, smp_t)
            if not torch.equal(got, want):
                warnings.warn(
                    f"the fused noise kernel differs from the reference on {device} "
                    f"({int((got != want).sum())} of {want.numel()} values); using the eager path",
                    stacklevel=2,
                )
                return None
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile or run here: the eager path serves
        warnings.warn(
            f"the fused noise kernel cannot run on {device} ({type(exc).__name__}: {exc}); using the eager path",
            stacklevel=2,
        )
        return None
    return philox_triton.fill


def _normal_rows(
    flat: torch.Tensor, idx: torch.Tensor, smp: torch.Tensor, stream: int, groups: int, key: tuple[int, int]
) -> None:
    """Fill ``flat`` (``rows x size``) with the Gaussians of its rows."""
    rows, size = flat.shape
    w0, w1, w2, w3 = philox4x32(_row_counters(idx, smp, stream, groups), key)
    # Values 4g, 4g+1 come from words (w0, w1) of group g, values 4g+2, 4g+3 from (w2, w3): both pairs at once.
    radius_words, angle_words = torch.stack((w0, w2)), torch.stack((w1, w3))  # each 2 x rows x groups
    if size == 4 * groups:
        target = flat.view(rows, groups, 2, 2).permute(2, 0, 1, 3)  # pair, row, group, (cos, sin)
        box_muller(radius_words, angle_words, out=(target[..., 0], target[..., 1]))
    else:
        full = torch.empty((rows, groups, 2, 2), dtype=torch.float32, device=flat.device)
        target = full.permute(2, 0, 1, 3)
        box_muller(radius_words, angle_words, out=(target[..., 0], target[..., 1]))
        flat.copy_(full.view(rows, 4 * groups)[:, :size])
