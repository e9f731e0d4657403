"""The sound noise scheme's distribution: a Gaussian rounded to the 1/255 grid, sampled from exact integer thresholds.

Pure Python integers (no torch, no floats in any bound): this module fixes *which* distribution the
``sound`` noise scheme draws and proves how far it is from the ideal one. The engine
(``core.smoothing``) only compares fair random integers with the thresholds computed here.

The ideal distribution
----------------------
Per pixel, ``eps = round(255 * sigma * Z) / 255`` with ``Z ~ N(0, 1)`` and ``round`` to the nearest
integer: the Gaussian ``N(0, sigma^2)`` rounded to the grid ``{j / 255}``, whose mass at ``j / 255`` is
``pi_j = Phi(t_j) - Phi(t_{j-1})``, edges ``t_j = (j + 1/2) / (255 sigma)``. For an image ``x`` on the
grid, ``x + eps = r(x + sigma Z)`` with ``r`` rounding every pixel to the grid (rounding commutes with
shifts by grid points), so smoothing ``f`` with ``eps`` IS Gaussian smoothing of ``f o r``, and Cohen
et al.'s theorem applies to it unchanged (``stats.grid_radius``).

The distribution actually sampled
---------------------------------
A ``bits``-bit uniform integer ``U`` (fair bits) is compared with the integer thresholds
``T_j = round(2**bits * Phi(t_j))``; the sample is ``j_min + #{T_j <= U}``. So the sampled mass of
``j`` is ``(T_j - T_{j-1}) / 2**bits``, a dyadic rational known exactly (``GridTable.weights``); the
table stops where the thresholds round to 0 (and, by symmetry, to ``2**bits``), which truncates the
tails to a mass below ``2**-(bits+1)`` each. ``Phi`` at the edges is enclosed in an interval of width
below ``2**-160`` by integer interval arithmetic (``_upper_tail``), so ``|T_j / 2**bits - Phi(t_j)|
<= 2**-(bits+1) + 2**-160 =: e`` for every edge, and the total variation distance between the sampled
and the ideal law of one pixel is at most ``(L + 2) e`` for ``L`` thresholds (``GridTable.tv_bound``;
the derivation is in ``docs/noise-schemes.md``). ``stats.grid_slack`` turns it into the slack of
``d`` pixels and ``stats.grid_radius`` into a radius.

Examples
--------
>>> table = grid_table(0.25)
>>> table.first, table.last, len(table.thresholds)
(-584, 584, 1168)
>>> sum(table.weights()) == 2 ** table.bits
True
>>> table.tv_bound < 1e-16
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["GRID_LEVELS", "THRESHOLD_BITS", "GridTable", "grid_table", "upper_tail_interval"]

GRID_LEVELS = 255
"""Pixels of 8-bit images: the grid is ``{j / GRID_LEVELS}``."""

THRESHOLD_BITS = 64
"""Bits of the uniform integer compared with the thresholds (4 digits of 16 fair bits)."""

_PREC = 256
"""Working precision of the interval arithmetic, in bits: every enclosure is narrower than 2**-160."""

_WIDTH_BOUND = Fraction(1, 1 << 160)
"""What ``_upper_tail`` guarantees (and checks) about the width of its enclosures."""


# --------------------------------------------------------------------------- interval arithmetic
#
# A positive real v is enclosed as integers (lo, hi) with lo <= v * 2**_PREC <= hi. Every operation
# rounds its lower end down and its upper end up, so the enclosure stays valid whatever the rounding.


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _from_fraction(v: Fraction) -> tuple[int, int]:
    num = v.numerator << _PREC
    return num // v.denominator, _ceil_div(num, v.denominator)


def _mul(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (a[0] * b[0]) >> _PREC, _ceil_div(a[1] * b[1], 1 << _PREC)


def _div(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (a[0] << _PREC) // b[1], _ceil_div(a[1] << _PREC, b[0])


def _series(first: Fraction, ratio) -> tuple[int, int]:
    """Enclosure of ``sum_n a_n`` with ``a_0 = first > 0`` and ``a_{n+1} = a_n * num / den`` for
    ``(num, den) = ratio(n)``, positive integers whose quotient decreases in ``n``: summed until a term is
    below one unit and the quotient at most 1/2, then the tail (at most that last term, a geometric
    bound) is added to the upper end."""
    lo, hi = _from_fraction(first)
    total_lo, total_hi = lo, hi
    n = 0
    while True:
        num, den = ratio(n)
        lo, hi = (lo * num) // den, _ceil_div(hi * num, den)
        n += 1
        total_lo, total_hi = total_lo + lo, total_hi + hi
        if hi <= 1 and 2 * num <= den:
            # the remaining terms are each at most half the one before: their sum <= this term <= hi
            return total_lo, total_hi + hi


@functools.lru_cache(maxsize=1)
def _pi() -> tuple[int, int]:
    """``pi`` by Machin's formula, ``16 atan(1/5) - 4 atan(1/239)``; each alternating series brackets its limit."""

    def atan_inv(k: int) -> tuple[int, int]:
        # partial sums of an alternating series with decreasing terms lie alternately above and below the limit
        scale, k2 = 1 << (_PREC + 16), k * k
        term, total, n, sign = scale // k, 0, 0, 1
        sums = []
        while term:
            total += sign * (term // (2 * n + 1))
            sums.append(total)
            term //= k2
            n, sign = n + 1, -sign
        low, high = min(sums[-2:]), max(sums[-2:])
        # each floor is off by less than one unit, and a term carries at most 3 of them: <= 3 per term
        return (low - 4 * n - 4) >> 16, (high + 4 * n + 4 + (1 << 16)) >> 16

    a, b = atan_inv(5), atan_inv(239)
    return 16 * a[0] - 4 * b[1], 16 * a[1] - 4 * b[0]


def upper_tail_interval(t: Fraction) -> tuple[int, int]:
    """Integers ``(lo, hi)`` with ``lo <= (1 - Phi(t)) * 2**256 <= hi`` and ``hi - lo < 2**96``, for rational ``t > 0``.

    ``1 - Phi(t) = 1/2 - phi(t) * S(t)`` with ``S(t) = sum_n t^(2n+1) / (2n+1)!!`` (positive terms) and
    ``phi(t) = exp(-t^2/2) / sqrt(2 pi)``; ``exp(t^2/2)`` by its Taylor series, ``pi`` by Machin's formula,
    every step an enclosure. Exact up to the stated width; no floating point is involved.

    Examples
    --------
    >>> lo, hi = upper_tail_interval(Fraction(196, 100))   # 1 - Phi(1.96) = 0.0249979...
    >>> round(lo / 2**256, 7), hi - lo < 2**96
    (0.0249979, True)
    """
    t = Fraction(t)
    if t <= 0:
        raise ValueError(f"t must be a positive rational, got {t}")
    p2, q2 = t.numerator**2, t.denominator**2
    series = _series(t, lambda n: (p2, q2 * (2 * n + 3)))
    exp_half = _series(Fraction(1), lambda n: (p2, 2 * q2 * (n + 1)))
    two_pi = (2 * _pi()[0], 2 * _pi()[1])
    root = (_isqrt(two_pi[0] << _PREC), _isqrt(two_pi[1] << _PREC) + 1)
    density = _div(_from_fraction(Fraction(1)), _mul(exp_half, root))
    central = _mul(density, series)
    half = 1 << (_PREC - 1)
    lo, hi = half - central[1], half - central[0]
    if lo < 0 or Fraction(hi - lo, 1 << _PREC) >= _WIDTH_BOUND:
        raise ArithmeticError(f"the enclosure of 1 - Phi({t}) is too wide; raise the working precision")
    return lo, hi


def _isqrt(v: int) -> int:
    import math

    return math.isqrt(v)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class GridTable:
    """Integer thresholds of the rounded Gaussian on the ``1/levels`` grid, and what they guarantee.

    A ``bits``-bit uniform integer ``U`` maps to the grid offset ``first + #{T in thresholds : T <= U}``
    (noise ``offset / levels`` in input units); offsets run from ``first`` to ``last = -first``.

    Attributes
    ----------
    sigma : float
        Standard deviation of the Gaussian before rounding, input units (its exact binary value is used).
    levels : int
        Grid steps per unit (255).
    bits : int
        Bits of ``U`` (thresholds lie in ``[0, 2**bits]``).
    first : int
        The smallest offset (``-K``, ``K`` the number of edges per side whose threshold is positive).
    thresholds : tuple of int
        ``2K`` nondecreasing integers, symmetric: ``T[i] + T[-1-i] == 2**bits``.
    tv_bound : float
        Upper bound (rounded up to a float) on the total variation distance between the sampled law of
        one pixel and the ideal rounded Gaussian: bin by bin, exact sampled mass against enclosed ideal
        mass, plus both truncated tails; below ``(len(thresholds) + 2) * (2**-(bits+1) + 2**-160)``.
    """

    sigma: float
    levels: int
    bits: int
    first: int
    thresholds: tuple[int, ...]
    tv_bound: float

    @property
    def last(self) -> int:
        return self.first + len(self.thresholds)

    def weights(self) -> list[int]:
        """Sampled mass of each offset ``first .. last``, in units of ``2**-bits`` (integers summing to ``2**bits``).

        Examples
        --------
        >>> w = grid_table(0.25).weights()
        >>> w == w[::-1], max(w) / 2**64 > 0.006
        (True, True)
        """
        edges = (0,) + self.thresholds + (1 << self.bits,)
        return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]

    def pmf(self) -> list[float]:
        """``weights`` as probabilities (float64: for tests and ground truth, never for a bound)."""
        scale = float(1 << self.bits)
        return [w / scale for w in self.weights()]

    def scaled(self, bits: int = THRESHOLD_BITS) -> tuple[int, ...]:
        """The thresholds as ``bits``-bit integers (exact: multiplied by ``2**(bits - self.bits)``)."""
        if bits < self.bits:
            raise ValueError(f"cannot narrow {self.bits}-bit thresholds to {bits} bits")
        return tuple(t << (bits - self.bits) for t in self.thresholds)


@functools.lru_cache(maxsize=16)
def grid_table(sigma: float, bits: int = THRESHOLD_BITS, levels: int = GRID_LEVELS) -> GridTable:
    """The sound scheme's thresholds for noise level ``sigma`` (input units): see the module docstring.

    ``T`` of the edge ``-t_k`` (``t_k = (2k + 1) / (2 levels sigma)``) is ``2**bits (1 - Phi(t_k))``
    rounded to the nearest integer from an enclosure narrower than ``2**-160``; edges are added until
    a threshold rounds to 0; the upper edges mirror the lower ones (``2**bits - T``), so the sampled
    law is exactly symmetric. ``tv_bound`` adds, bin by bin, the largest difference between the
    sampled mass (exact) and the ideal mass (enclosed), plus the two truncated tails. Cached.

    Parameters
    ----------
    sigma : float
        Noise level, finite and > 0, at most 4 (the table grows linearly with it).
    bits : int, optional
        Bits of the uniform integer (default ``THRESHOLD_BITS``); fewer bits give a coarser law with a
        larger ``tv_bound`` (the tests use 8 to show the bound is needed).
    levels : int, optional
        Grid steps per unit (default 255).

    Returns
    -------
    GridTable

    Raises
    ------
    ValueError
        If an argument is out of range.

    Examples
    --------
    >>> coarse = grid_table(0.25, bits=12)   # 12-bit thresholds: far from the ideal law
    >>> coarse.first, coarse.thresholds[:3], round(coarse.tv_bound, 4)
    (-234, (1, 1, 1), 0.0178)
    """
    sigma_q = Fraction(float(sigma))
    if not (0 < sigma_q <= 4) or not (8 <= int(bits) <= 64) or int(levels) < 1:
        raise ValueError(f"need 0 < sigma <= 4, 8 <= bits <= 64 and levels >= 1; got {sigma}, {bits}, {levels}")
    bits, levels = int(bits), int(levels)
    scale = 1 << bits
    lower, tails = [], []  # thresholds of the edges -t_0, -t_1, ... (decreasing) and enclosures of Phi there
    while True:
        tails.append(upper_tail_interval(Fraction(2 * len(lower) + 1, 2 * levels) / sigma_q))
        lo, hi = tails[-1]
        # the midpoint of the enclosure, rounded to the nearest integer at 2**bits
        threshold = ((lo + hi) * scale + (1 << _PREC)) >> (_PREC + 1)
        if threshold == 0:
            break
        lower.append(threshold)
    thresholds = tuple(reversed(lower)) + tuple(scale - v for v in lower)
    if any(b < a for a, b in zip(thresholds, thresholds[1:])):
        raise ArithmeticError("thresholds are not monotone; the enclosures are too wide")
    return GridTable(
        sigma=float(sigma),
        levels=levels,
        bits=bits,
        first=-len(lower),
        thresholds=thresholds,
        tv_bound=_float_up(_tv_bound(lower, tails, bits)),
    )


def _tv_bound(lower: list[int], tails: list[tuple[int, int]], bits: int) -> Fraction:
    """Upper bound on ``TV(sampled, ideal)`` of one pixel (both laws symmetric, so the lower half counts twice).

    ``lower[k]`` is the threshold of the edge ``-t_k`` and ``tails[k]`` an enclosure of ``Phi(-t_k)``,
    in units of ``2**-_PREC``; ``tails[-1]`` is the first edge left out (threshold 0).
    """
    shift = _PREC - bits
    edges = [v << shift for v in lower] + [0]  # sampled CDF at -t_0, ..., -t_K
    one = 1 << _PREC

    def gap(exact: int, low: int, high: int) -> int:
        return max(abs(exact - low), abs(exact - high))

    twice = 2 * tails[-1][1]  # both truncated tails: ideal mass Phi(-t_K), sampled 0
    for k in range(len(lower)):  # the bin between -t_{k+1} and -t_k, and its mirror image
        low, high = tails[k][0] - tails[k + 1][1], tails[k][1] - tails[k + 1][0]
        twice += 2 * gap(edges[k] - edges[k + 1], low, high)
    twice += gap(one - 2 * edges[0], one - 2 * tails[0][1], one - 2 * tails[0][0])  # the bin of 0
    return Fraction(twice, 2 * one)


def _float_up(v: Fraction) -> float:
    """The smallest float >= ``v``."""
    import math

    f = float(v)
    return f if Fraction(f) >= v else math.nextafter(f, math.inf)
