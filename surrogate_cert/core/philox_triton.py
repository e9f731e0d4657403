"""One fused GPU kernel for ``core.philox.fill_keyed_normal``: the same words and the same operations,
in the same order, in Triton, so a batch's noise costs one launch instead of about 200.

Imported only on CUDA, where Triton ships with PyTorch (and, for tests, on the CPU under
``TRITON_INTERPRET=1``). The kernel is compiled without floating-point contraction
(``enable_fp_fusion=False``), uses correctly rounded division and square root, and its float constants
are float32 values (``philox._f32``) or exact in float64, so its bits can equal the eager reference's;
``core.philox`` checks that on a probe of keys before it uses the kernel, and keeps the eager path
otherwise.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import philox as _ref

_BLOCK = 256
"""Philox counters per Triton program (each gives 4 values)."""

# The transform's constants: philox's float32 values (compile-time constants of the kernel).
SPLIT, MINUS_2_LN2, THETA_UNIT = (tl.constexpr(v) for v in (_ref._SPLIT, _ref._MINUS_2_LN2, _ref._THETA_UNIT))
A9, A7, A5, A3, A1 = (tl.constexpr(v) for v in _ref._ATANH_SERIES)
S9, S7, S5, S3, S1 = (tl.constexpr(v) for v in _ref._SIN_SERIES)
C10, C8, C6, C4, C2, C0 = (tl.constexpr(v) for v in _ref._COS_SERIES)


@triton.jit
def _radius(words):
    """``sqrt(-2 ln u)``, ``u = (w + 1/2) 2**-32``: ``philox._radius``, step for step."""
    u = (words.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2**-32, exact in float32 too
    bits = u.to(tl.int64, bitcast=True)
    exponent = ((bits >> 52) & 0x7FF) - 1022  # frexp: u = mantissa 2**exponent, mantissa in [1/2, 1)
    mantissa = ((bits & 0xFFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)
    low = mantissa < SPLIT
    mantissa = tl.where(low, mantissa * 2.0, mantissa)
    exponent = exponent - low.to(tl.int64)
    s = ((mantissa - 1.0) / (mantissa + 1.0)).to(tl.float32)  # float64 division: IEEE, div.rn.f64
    s2 = s * s
    series = s2 * A9 + A7
    series = series * s2 + A5
    series = series * s2 + A3
    series = series * s2 + A1
    ln_half = series * s
    return tl.sqrt_rn(exponent.to(tl.float32) * MINUS_2_LN2 - ln_half * 4.0)


@triton.jit
def _box_muller(radius_words, angle_words):
    """``philox.box_muller`` for one pair of word tensors: ``(z_cos, z_sin)``."""
    radius = _radius(radius_words)
    quarter = (angle_words + (1 << 29)) >> 30
    offset = angle_words - (quarter << 30)
    odd = (quarter & 1) != 0
    theta = offset.to(tl.float32) * THETA_UNIT
    t2 = theta * theta
    sin = t2 * S9 + S7
    sin = sin * t2 + S5
    sin = sin * t2 + S3
    sin = sin * t2 + S1
    sin = sin * theta
    cos = t2 * C10 + C8
    cos = cos * t2 + C6
    cos = cos * t2 + C4
    cos = cos * t2 + C2
    cos = cos * t2 + C0
    radius = tl.where((quarter & 2) != 0, -radius, radius)
    return tl.where(odd, -sin, cos) * radius, tl.where(odd, cos, sin) * radius


@triton.jit(do_not_specialize=["total", "size", "groups", "k0", "k1", "stream"])
def _keyed_normal_kernel(out_ptr, idx_ptr, smp_ptr, total, size, groups, k0, k1, stream, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    row = offs // groups
    group = offs - row * groups
    idx = tl.load(idx_ptr + row, mask=live, other=0)
    smp = tl.load(smp_ptr + row, mask=live, other=0)
    c0 = (((smp & 255) << 24) | group).to(tl.uint32)
    c1 = ((smp >> 8) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((idx >> 32) | (stream.to(tl.int64) << 30)).to(tl.uint32)
    key0 = tl.zeros_like(c0) + k0.to(tl.uint32)
    key1 = tl.zeros_like(c0) + k1.to(tl.uint32)
    w0, w1, w2, w3 = tl.random.philox_impl(c0, c1, c2, c3, key0, key1, 10)
    z0, z1 = _box_muller(w0.to(tl.int64) & 0xFFFFFFFF, w1.to(tl.int64) & 0xFFFFFFFF)
    z2, z3 = _box_muller(w2.to(tl.int64) & 0xFFFFFFFF, w3.to(tl.int64) & 0xFFFFFFFF)
    base = row * size + 4 * group
    first = 4 * group
    tl.store(out_ptr + base, z0, mask=live & (first < size))
    tl.store(out_ptr + base + 1, z1, mask=live & (first + 1 < size))
    tl.store(out_ptr + base + 2, z2, mask=live & (first + 2 < size))
    tl.store(out_ptr + base + 3, z3, mask=live & (first + 3 < size))


def fill(out: torch.Tensor, seed: int, indices: torch.Tensor, stream: int, samples: torch.Tensor) -> torch.Tensor:
    """``philox.fill_keyed_normal`` in one launch (same arguments, same contract)."""
    rows = out.shape[0]
    size = out[0].numel() if rows else 0
    groups = (size + 3) // 4
    total = rows * groups
    if total:
        k0, k1 = _ref._seed_key(seed)
        grid = (triton.cdiv(total, _BLOCK),)
        with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():  # e.g. cuda:LOCAL_RANK
            _keyed_normal_kernel[grid](
                out, indices, samples, total, size, groups, k0, k1, stream, BLOCK=_BLOCK, enable_fp_fusion=False
            )
    return out
