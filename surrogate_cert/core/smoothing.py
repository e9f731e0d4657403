"""The Monte Carlo counting engine: class counts of a base classifier under Gaussian noise.

Noise is reproducible per input, not per call: sample ``j`` of input ``i`` in stream ``stream``
comes from block ``j // NOISE_BLOCK`` of a generator seeded by ``(seed, index_i, stream, block)``.
So counts do not depend on batch size, on which inputs share a forward pass, on sharding, or on
where an interrupted job resumes; and two streams of one input (selection / estimation) are
independent.

How a block's generator is seeded is the *noise scheme*, recorded in every counts file
(``noise_scheme``) so a resume never mixes two:

- ``torch-generator-block256-v2`` (``NOISE_SCHEME``, the default): the block's 32-bit seed is a
  bijective mix of ``stream`` (2 bits) and ``h(seed, index) XOR block`` (30 bits), computed for all
  of a call's blocks at once in NumPy. PyTorch's CPU generator (MT19937) keeps only the low 32 bits
  of any seed, so 32 bits are all a block can have; this layout spends them so that no two blocks of
  one input (any stream, up to 2**30 blocks) ever share a seed.
- ``philox4x32-block256-v3`` (``NOISE_SCHEME_V3``): no generator per block. Every sample's noise
  is computed from its key by the counter-based Philox4x32-10 (``core.philox``: key = the seed,
  counter = (position in the block and word, block, index, stream)), Gaussians by Box-Muller from
  exactly rounded operations only, for all the blocks of a batch in one vectorised pass. No two
  samples of any inputs or streams share a counter, and the values do not depend on the device's
  generator or vectorisation.
- ``torch-generator-block256-v1``: NumPy ``SeedSequence`` per block (``block_seed``). Kept, bit for
  bit, to reproduce and resume files made with it. Its seeds are random 32-bit values once the CPU
  generator truncates them, so two blocks of one input collide with probability about
  ``blocks**2 / 2**33`` (e.g. 7e-5 per image at n = 100,000), and the per-block ``SeedSequence``
  cost 14 us per block.

With v1 and v2, noise is drawn on the engine's device by that device's generator (MT19937 on the
CPU, Philox on CUDA), so counts are reproducible for one device type; CUDA's kernels lay a block's values out by
the GPU's multiprocessor count, so CUDA noise is reproducible on one GPU model.

The schemes above draw float Gaussian noise, whose law is not the Gaussian the certificates assume
(Voracek and Hein, ICLR 2023, build classifiers whose float-noise certificates are false). The
sound scheme, ``rounded-gaussian-grid255-v1`` (``NOISE_SCHEME_SOUND``, alias ``sound``), draws per
pixel an integer offset ``j`` from exact integer thresholds (``core.grid_noise``) with fair 32-bit
words of the block's generator (``block_uniform_words``, seeded by the v2 keys), and evaluates the
model on ``(round(255 x) + j) / 255``: an integer sum rounded once, a function of the grid point
alone. The law sampled is known exactly, and ``noise_slack`` / ``stats.grid_radius`` give the radius
for it. Inputs must lie on the 1/255 grid (``off_grid``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch

from . import stats
from .errors import InvalidInputError, InvalidParameterError, ModelError, check_count, check_seed, check_sigma
from .grid_noise import GRID_LEVELS, GridTable, grid_table
from .philox import BLOCK_SAMPLES, check_keys, fill_keyed_normal

NOISE_BLOCK = BLOCK_SAMPLES
"""Samples per noise block (256): the unit of reproducibility (and of per-block seeding cost)."""

NOISE_SCHEME_V1 = "torch-generator-block256-v1"
"""Per-block NumPy ``SeedSequence`` seeds (``block_seed``): files of version 0.1."""

NOISE_SCHEME_V2 = "torch-generator-block256-v2"
"""Per-block 32-bit seeds, collision-free within an input (``block_keys``)."""

NOISE_SCHEME_V3 = "philox4x32-block256-v3"
"""Counter-based noise: each sample's Gaussians are a function of (seed, index, stream, block, position),
drawn for many blocks at once (``core.philox``)."""

NOISE_SCHEME = NOISE_SCHEME_V2
"""The scheme new counts files and certifiers use. Stored in counts files, so a resume never mixes two
schemes. A new scheme gets a new name whenever the noise of a given (seed, index, stream, j) changes."""

NOISE_SCHEME_SOUND = "rounded-gaussian-grid255-v1"
"""The sound scheme: the Gaussian rounded to the 1/255 grid, drawn from exact integer thresholds with fair bits."""

NOISE_SCHEMES = (NOISE_SCHEME_V1, NOISE_SCHEME_V2, NOISE_SCHEME_V3, NOISE_SCHEME_SOUND)
"""Every reproducible scheme this version can draw (and so resume)."""

NOISE_ALIASES = {"sound": NOISE_SCHEME_SOUND, "float": NOISE_SCHEME_V2}
"""Short names the command line accepts for ``--noise-scheme``."""

SOUND_SCHEMES = (NOISE_SCHEME_SOUND,)
"""Schemes whose sampled law is known exactly (inputs on the grid; radius ``stats.grid_radius``)."""

OFF_GRID_CHOICES = ("refuse", "quantise")
"""What the sound scheme does with an input off the 1/255 grid: refuse it (the library's default), or certify
the input rounded to the grid (``quantise_to_grid``; the command line's choice, recorded with its l2 shift)."""

NOISE_UNSEEDED = "unseeded-benchmark-only"
"""One generator per call, seeded once: NOT reproducible per input. Only the throughput benchmark uses
it, to measure what per-block seeding costs; counts files refuse it."""

STREAM_SELECT = 0
STREAM_ESTIMATE = 1
STREAM_SEQUENTIAL = 2
STREAM_AUDIT = 3
"""Noise of a deployment audit's re-check (``deploy.monitor.CertificateAudit``): shared with no other use."""
_STREAM_BITS = 2
_BLOCK_BITS = 32 - _STREAM_BITS

AMP_TOLERANCE = 0.01
"""Largest share of an input's noisy predictions that bf16 autocast may change (total variation
distance between its bf16 and float32 counts on the same noise, per input); see ``amp_disagreement``."""

DEFAULT_BATCH_SIZE = 1000
AUTO_BATCH_MAX = {"cpu": 1024, "cuda": 1 << 16}
"""Largest batch the automatic search tries, per device type: on a GPU, the largest batch that fits
is the fastest; on a CPU throughput is flat past a few hundred samples, so the search stops early."""

CACHE_ENV = "SURROGATE_CERT_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/surrogate-cert``)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on: ``None`` or ``"auto"`` picks CUDA when present, else CPU.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` or ``"auto"`` for the automatic choice, else anything ``torch.device`` accepts
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    InvalidParameterError
        If ``device`` is not a device name torch knows (e.g. ``"gpu"``).
    InvalidInputError
        If a CUDA device is requested but none is available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidParameterError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """Seed of one noise block in scheme ``torch-generator-block256-v1`` (kept bit for bit for old files).

    Mixed by NumPy's SeedSequence. It was meant as 64 bits but is 63 (``<< 31``), and the CPU
    generator keeps only its low 32 bits; ``block_keys`` (v2) replaces it.
    """
    state = np.random.SeedSequence([int(seed), int(index), int(stream), int(block)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that scatters neighbouring values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))


def block_keys(seed: int, index: int, stream: int, blocks: Sequence[int] | np.ndarray) -> np.ndarray:
    """Generator seeds of noise blocks ``blocks`` of one input and stream, scheme ``torch-generator-block256-v2``.

    The seed of block ``b`` is ``fmix32(stream << 30 | (h(seed, index) XOR b))`` with ``h`` the low 30
    bits of a SplitMix64 hash: a bijection of ``(stream, b)`` for a fixed input, so no two blocks of
    one input share a seed. 32 bits because PyTorch's CPU generator keeps no more.

    Parameters
    ----------
    seed : int
        The job's noise seed.
    index : int
        The input's noise name (its dataset index).
    stream : int
        0 to 3 (``STREAM_SELECT``, ``STREAM_ESTIMATE``, ``STREAM_SEQUENTIAL``).
    blocks : sequence of int or numpy.ndarray
        Block numbers, each in ``[0, 2**30)``.

    Returns
    -------
    numpy.ndarray
        One uint64 seed (below ``2**32``) per block.

    Raises
    ------
    InvalidParameterError
        If ``stream`` or a block number is out of range.
    """
    blocks = np.asarray(blocks, dtype=np.int64)
    if not 0 <= int(stream) < (1 << _STREAM_BITS):
        raise InvalidParameterError(f"stream must be in [0, {1 << _STREAM_BITS}), got {stream}")
    if blocks.size and (blocks.min() < 0 or blocks.max() >= (1 << _BLOCK_BITS)):
        raise InvalidParameterError(f"noise blocks must lie in [0, 2**{_BLOCK_BITS}) (2.7e11 samples per input)")
    h = _input_hash(seed, index)
    words = np.uint64(int(stream) << _BLOCK_BITS) | (np.uint64(h) ^ blocks.astype(np.uint64)) & np.uint64(
        (1 << _BLOCK_BITS) - 1
    )
    return _fmix32(words)


def _input_hash(seed: int, index: int) -> int:
    """``h(seed, index)`` of ``block_keys``: the low 30 bits of a SplitMix64 hash."""
    return _splitmix64(_splitmix64(int(seed) & _M64) ^ (int(index) & _M64)) & ((1 << _BLOCK_BITS) - 1)


def _block_key(h: int, stream: int, block: int) -> int:
    """``block_keys`` for one block, in plain integers: the engine's per-block cost is a few operations."""
    x = (stream << _BLOCK_BITS) | ((h ^ block) & ((1 << _BLOCK_BITS) - 1))
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def check_noise_scheme(scheme: str, *, allow_unseeded: bool = False) -> str:
    """``scheme`` (or the scheme an alias names) if this version can draw it; else InvalidParameterError."""
    scheme = NOISE_ALIASES.get(scheme, scheme)
    known = NOISE_SCHEMES + ((NOISE_UNSEEDED,) if allow_unseeded else ())
    if scheme not in known:
        raise InvalidParameterError(
            f"unknown noise scheme {scheme!r}; this version draws {', '.join(NOISE_SCHEMES)} "
            f"(aliases: {', '.join(NOISE_ALIASES)})"
        )
    return scheme


def noise_indices(indices: Sequence[int] | np.ndarray | None, num: int) -> np.ndarray:
    """Each input's noise name (its dataset index) as int64, ``0..num-1`` when not given.

    The noise of input ``i`` is seeded by its name (see the module docstring), so passing dataset
    indices makes counts independent of batching, order and sharding.

    Parameters
    ----------
    indices : sequence of int, numpy.ndarray or None
        One noise name per input, or ``None`` for ``0..num-1``.
    num : int
        Number of inputs.

    Returns
    -------
    numpy.ndarray
        Shape ``(num,)``, dtype int64.

    Raises
    ------
    InvalidInputError
        If ``indices`` does not hold exactly one entry per input.
    """
    if indices is None:
        return np.arange(num, dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.shape != (num,):
        raise InvalidInputError(f"indices must have one entry per input ({num}), got shape {idx.shape}")
    return idx


def check_images(x: torch.Tensor, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Validate a batch of images: float tensor ``N x C x H x W`` (or the model's shape), finite, in [0, 1].

    Parameters
    ----------
    x : torch.Tensor
        The batch; pixels in [0, 1], before any normalisation (normalisation belongs inside the
        model). An empty batch (``N = 0``) is valid.
    input_shape : sequence of int, optional
        The per-image shape the model expects, e.g. ``(C, H, W)``; compared with ``x.shape[1:]``
        when given.

    Returns
    -------
    torch.Tensor
        ``x`` itself (neither copied nor moved).

    Raises
    ------
    InvalidInputError
        If ``x`` is not a floating-point tensor, is not a batch, does not match ``input_shape``,
        contains NaN or infinite values, or has pixels outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InvalidInputError(f"inputs must be a floating-point tensor with pixels in [0, 1], got dtype {x.dtype}")
    if x.ndim < 2 or (input_shape is not None and x.ndim != len(input_shape) + 1):
        raise InvalidInputError(f"inputs must be a batch (N x C x H x W), got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInputError(
            f"inputs have shape {tuple(x.shape)} but the model expects N x {' x '.join(map(str, input_shape))}"
        )
    if x.numel():
        # One pass over the pixels: NaN fails both comparisons, +-inf one of them.
        low, high = (float(v) for v in torch.aminmax(x))
        if not (low >= 0.0 and high <= 1.0):
            if not bool(torch.isfinite(x).all()):
                raise InvalidInputError("inputs contain NaN or infinite values; clean or drop those images")
            raise InvalidInputError(
                f"inputs must lie in [0, 1] (pixels, before any normalisation), got range "
                f"[{low:.3g}, {high:.3g}]; put normalisation inside the model"
            )
    return x


def _whole_per_input(name: str, value, num: int) -> np.ndarray:
    """One whole number >= 0 for all inputs, or one per input, as an int64 array of shape ``(num,)``."""
    try:
        arr = np.asarray(value)
        whole = arr.dtype != object and (
            np.issubdtype(arr.dtype, np.integer)
            or (np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr) & (arr == np.round(arr)))))
        )
        arr = np.broadcast_to(arr, (num,))
    except (TypeError, ValueError):
        whole = False
    if not whole or (num and arr.min() < 0):
        raise InvalidParameterError(
            f"{name} must be a whole number >= 0 (one value, or one per input), got {value!r:.80}"
        )
    return arr.astype(np.int64)


def _is_convolutional(model: torch.nn.Module) -> bool:
    """Whether the model has 4-D (convolution) weights: then channels_last memory pays on GPUs."""
    try:
        return any(p.ndim == 4 for p in model.parameters())
    except (RuntimeError, AttributeError):
        return False


def _architecture_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's class and of its parameters' and buffers' names, shapes and dtypes: what
    its memory use depends on (not the weights' values)."""
    parts = [type(model).__qualname__]
    try:
        parts += [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()]
    except (RuntimeError, AttributeError):
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def find_batch_size(fits: Callable[[int], bool], maximum: int, granularity: int = NOISE_BLOCK) -> int:
    """The largest multiple of ``granularity`` up to ``maximum`` for which ``fits`` holds.

    Doubles from ``granularity`` until ``fits`` fails (or ``maximum`` is reached), then bisects
    between the last size that fitted and the first that did not: about ``2 log2(maximum /
    granularity)`` calls. Assumes that a batch fits whenever a larger one does.

    Parameters
    ----------
    fits : callable
        ``fits(batch_size) -> bool``: runs one batch of that size and says whether it fitted in memory.
    maximum : int
        The largest batch size to try (>= ``granularity``).
    granularity : int, optional
        Batch sizes are multiples of it (default ``NOISE_BLOCK``).

    Returns
    -------
    int
        The batch size.

    Raises
    ------
    ModelError
        If not even ``granularity`` samples fit.
    """
    granularity = check_count("granularity", granularity)
    maximum = max(check_count("maximum", maximum) // granularity * granularity, granularity)
    if not fits(granularity):
        raise ModelError(
            f"not even {granularity} noisy samples per forward pass fit in the device's memory; "
            "use a smaller model or a device with more memory"
        )
    good, bad = granularity, None
    while good < maximum:
        trial = min(2 * good, maximum)
        if fits(trial):
            good = trial
        else:
            bad = trial
            break
    while bad is not None and bad - good > granularity:
        trial = (good + bad) // 2 // granularity * granularity
        if trial <= good:
            break
        if fits(trial):
            good = trial
        else:
            bad = trial
    return good


def _cache_folder() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "surrogate-cert"))


def _read_batch_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_batch_cache(path: str, key: str, value: int) -> None:
    """Best effort: a cache that cannot be written only means the next run searches again."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_batch_cache(path)
        data[key] = int(value)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _keyed_segments(start: np.ndarray, n: np.ndarray, capacity: int):
    """Cut samples ``start_i .. start_i + n_i - 1`` of every input, inputs in order, into batches of at most
    ``capacity`` rows. Yields ``(inputs, first_samples, takes)`` per batch: input ``inputs[s]`` gives the
    batch ``takes[s]`` rows, its samples ``first_samples[s], first_samples[s] + 1, ...``."""
    ends = np.cumsum(n)
    begins = ends - n
    total = int(ends[-1]) if n.size else 0
    for lo in range(0, total, capacity):
        hi = min(lo + capacity, total)
        inputs = np.arange(np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi - 1, side="right") + 1)
        seg_lo, seg_hi = np.maximum(begins[inputs], lo), np.minimum(ends[inputs], hi)
        keep = seg_hi > seg_lo  # inputs with n_i = 0 take no rows
        inputs, seg_lo, seg_hi = inputs[keep], seg_lo[keep], seg_hi[keep]
        yield inputs, start[inputs] + seg_lo - begins[inputs], seg_hi - seg_lo


# --------------------------------------------------------------------------- the sound scheme (grid noise)


def noise_family(scheme: str | None) -> str:
    """``"grid"`` for a sound scheme, ``"float"`` for the float-Gaussian ones (``None``: a file older than the
    field, which was float). Artifacts of one family may be combined; of two, never (``check_same_noise``)."""
    return "grid" if scheme in SOUND_SCHEMES else "float"


def check_same_noise(have: str | None, want: str | None, what: str, fix: str) -> None:
    """InvalidInputError unless ``have`` and ``want`` are of one family: certificates never mix the two laws.

    Parameters
    ----------
    have, want : str or None
        Noise schemes (None: recorded by no field, i.e. float).
    what : str
        What is being combined, for the message (e.g. ``"the counts file cal.h5"``).
    fix : str
        What to do, for the message.
    """
    if noise_family(have) != noise_family(want):
        raise InvalidInputError(
            f"{what} uses noise scheme {have or NOISE_SCHEME_V2 + ' (float)'} but "
            f"{want or NOISE_SCHEME_V2 + ' (float)'} is expected; certificates never mix the "
            f"float and the sound (grid) noise: {fix}"
        )


def noise_slack(scheme: str | None, sigma: float, input_shape: Sequence[int] | int) -> float:
    """The slack ``delta`` of ``stats.grid_radius`` for inputs of ``input_shape`` (0 for the float schemes).

    ``stats.grid_slack`` of the scheme's per-pixel total variation bound (``GridTable.tv_bound``) over
    ``prod(input_shape)`` pixels. The float schemes carry no such accounting and return 0, i.e. the
    certificates of the literature (not sound in floating point).

    Examples
    --------
    >>> noise_slack("rounded-gaussian-grid255-v1", 0.25, (1, 28, 28)) < 1e-13, noise_slack(None, 0.25, (1, 28, 28))
    (True, 0.0)
    """
    if noise_family(scheme) != "grid":
        return 0.0
    pixels = int(np.prod(input_shape)) if not isinstance(input_shape, (int, np.integer)) else int(input_shape)
    return stats.grid_slack(grid_table(float(sigma)).tv_bound, pixels)


def grid_shift(x: torch.Tensor) -> np.ndarray:
    """Per image, the l2 distance to its rounding to the 1/255 grid (0 for 8-bit images read as ``v / 255``).

    A certificate of the rounded image ``q(x)`` with radius ``R`` holds around ``x`` itself for grid
    points within ``R - grid_shift(x)`` (triangle inequality); at most ``sqrt(d) / 510``.
    """
    x = x.detach().to("cpu", torch.float32)
    moved = x.double() - quantise_to_grid(x).double()  # to the float32 grid point the engine certifies
    return torch.linalg.vector_norm(moved.flatten(1), dim=1).numpy()


def quantise_to_grid(x: torch.Tensor) -> torch.Tensor:
    """``round(255 x) / 255`` in float32: the grid point the sound scheme certifies for an off-grid image."""
    return (torch.round(x.to(torch.float32) * GRID_LEVELS) / GRID_LEVELS).to(x.dtype)


def grid_integers(x: torch.Tensor, off_grid: str = "refuse") -> torch.Tensor:
    """The pixels ``round(255 x)`` as float32 integers, checking that ``x`` lies on the grid.

    On the grid means ``float32(round(255 x) / 255) == x`` bit for bit, which is how 8-bit images read
    as ``v / 255`` (torchvision, ``ToTensor``) come. ``off_grid="quantise"`` accepts other images and
    certifies their rounding instead (``grid_shift`` says how far it moved them).

    Raises
    ------
    InvalidInputError
        If an image is off the grid and ``off_grid`` is ``"refuse"``.
    """
    if off_grid not in OFF_GRID_CHOICES:
        raise InvalidParameterError(f"off_grid must be one of {OFF_GRID_CHOICES}, got {off_grid!r}")
    levels = torch.round(x.to(torch.float32) * GRID_LEVELS)
    if off_grid == "refuse" and x.numel() and not bool(torch.equal(levels / GRID_LEVELS, x.to(torch.float32))):
        worst = float(grid_shift(x).max())
        raise InvalidInputError(
            f"the sound noise scheme needs pixels on the 1/255 grid (8-bit images read as v/255), but an image lies "
            f"{worst:.3g} (l2) off it; round the images first (x = round(255 x) / 255: quantise_to_grid), or pass "
            "off_grid='quantise' to certify the rounded image (radius around x smaller by that distance)"
        )
    return levels


class WordStream:
    """The fair 32-bit words of one noise block, read in order; word ``i`` is a function of ``(key, i)`` alone.

    Backed by the device's ``torch.Generator`` seeded with the block's key: ``random_`` over the full
    int64 range returns the generator's 64-bit outputs unchanged (no modulo), each split into two
    words, low half first. Reading words ``start .. start + count - 1`` right after words
    ``.. start - 1`` continues the generator (an odd word left over is kept for the next read); any
    other start re-seeds and skips.
    """

    def __init__(self, device: torch.device, generator: torch.Generator | None = None):
        self.device = torch.device(device)
        self.generator = generator if generator is not None else torch.Generator(device=self.device)
        self.key: int | None = None
        self.position = 0
        self._spare: torch.Tensor | None = None  # word number ``position`` when a read ended inside a pair

    def read(self, key: int, start: int, count: int) -> torch.Tensor:
        if self.key != key or self.position != start:
            self.generator.manual_seed(int(key))
            self.key, self.position, self._spare = int(key), 0, None
            if start:
                self.read(key, 0, start)
        parts = []
        if count and self._spare is not None:
            parts.append(self._spare)
            self._spare, count, self.position = None, count - 1, self.position + 1
        if count:
            pairs = torch.empty((count + 1) // 2, dtype=torch.int64, device=self.device)
            pairs.random_(-(1 << 63), None, generator=self.generator)
            words = pairs.view(torch.int32) if sys.byteorder == "little" else _split_pairs(pairs)
            if count % 2:
                words, self._spare = words[:count], words[count:]
            parts.append(words)
            self.position += count
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32, device=self.device)


def _split_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """64-bit values as 32-bit words, low half first, on a big-endian host (where ``view`` orders them otherwise)."""
    low = (pairs & 0xFFFFFFFF).to(torch.int64)
    high = (pairs >> 32) & 0xFFFFFFFF
    both = torch.stack((low, high), dim=1).view(-1)
    return torch.where(both >= 1 << 31, both - (1 << 32), both).to(torch.int32)


def block_uniform_words(
    key: int, count: int, device: str | torch.device = "cpu", *, start: int = 0, stream: WordStream | None = None
) -> torch.Tensor:
    """Words ``start .. start + count - 1`` of noise block ``key``'s stream of fair 32-bit words.

    The one place the sound scheme draws randomness: an int32 tensor whose bit patterns are
    independent uniform 32-bit words, a pure function of ``(key, start, count)`` on one device type.
    Pass the same ``stream`` to read a block's words in order without re-seeding.

    Examples
    --------
    >>> a = block_uniform_words(7, 7)
    >>> bool(torch.equal(a[3:], block_uniform_words(7, 4, start=3))), a.dtype
    (True, torch.int32)
    """
    stream = stream if stream is not None else WordStream(torch.device(device))
    return stream.read(int(key), int(start), check_count("count", count, minimum=0))


_IMPURE = -(1 << 15)
"""Marks a first digit whose 2**48-wide slice of the 64-bit range straddles a threshold (refined with 3 more digits)."""


def _digits(words: torch.Tensor) -> torch.Tensor:
    """The 16-bit digits of 32-bit words as int16, low half of each word first (on every host)."""
    if sys.byteorder == "little":
        return words.view(torch.int16)
    wide = words.to(torch.int64)
    return torch.stack(((wide & 0xFFFF), (wide >> 16) & 0xFFFF), dim=1).view(-1).to(torch.int32).to(torch.int16)


class GridSampler:
    """Draws blocks of the sound scheme's noise, as grid offsets ``j`` (noise ``j / 255``), on one device.

    Each pixel reads a 64-bit uniform integer ``U`` as four 16-bit digits, most significant first,
    lazily: the first digit (pixel ``i`` takes the ``i``-th digit of the block's first ``count / 2``
    words, low half of each word first) decides the offset through a table whenever its slice of the
    64-bit range holds no threshold (about 99 % of pixels); the pixels whose slice holds one read their
    three further digits from the words after those, three by three in pixel order, and compare ``U``
    with the thresholds. The offset is always ``first + #{T <= U}``: the law of ``core.grid_noise``
    exactly. On the CPU the work is done in NumPy (few calls per block); on CUDA in torch, with enough
    words read for every pixel so that no per-block count crosses to the host (``dense``); both give
    the same offsets from the same words.

    Parameters
    ----------
    table : GridTable
        The thresholds (``grid_table``); any ``bits`` up to 64.
    device : torch.device
        Where to draw.
    dense : bool, optional
        Use the torch path (default: on CUDA only; the tests run it on the CPU against the NumPy path).
    """

    def __init__(self, table: GridTable, device: torch.device, dense: bool | None = None):
        self.table, self.device = table, torch.device(device)
        self.wide = np.array(table.scaled(64), dtype=np.uint64)
        starts = np.arange(1 << 16, dtype=np.uint64) << np.uint64(48)
        below = np.searchsorted(self.wide, starts, side="right")
        upto = np.searchsorted(self.wide, starts + np.uint64((1 << 48) - 1), side="right")
        self.first_digit = np.where(below == upto, table.first + below, _IMPURE).astype(np.int16)
        self.dense = self.device.type == "cuda" if dense is None else bool(dense)
        if self.dense:
            # torch has no uint16 indexing: the table is indexed by the digit's int16 value + 32768
            self.lut = torch.from_numpy(np.roll(self.first_digit, 1 << 15)).to(self.device)
            self.thresholds = torch.tensor(
                [t - (1 << 63) for t in table.scaled(64)], dtype=torch.int64, device=self.device
            )

    def draw(self, key: int, out: torch.Tensor, stream: WordStream) -> torch.Tensor:
        """Fill ``out`` (contiguous float32, an even number of elements) with block ``key``'s offsets."""
        if self.dense:
            return self._draw_dense(key, out, stream)
        flat = out.view(-1).numpy()
        count = flat.size
        digits = _digits(block_uniform_words(key, count // 2, self.device, stream=stream)).numpy().view(np.uint16)
        offsets = self.first_digit.take(digits)
        flat[:] = offsets
        where = np.flatnonzero(offsets == _IMPURE)
        if where.size:
            more = (
                _digits(
                    block_uniform_words(key, (3 * where.size + 1) // 2, self.device, start=count // 2, stream=stream)
                )
                .numpy()
                .view(np.uint16)
            )
            rest = more[: 3 * where.size].reshape(-1, 3).astype(np.uint64)
            wide = (
                (digits[where].astype(np.uint64) << np.uint64(48))
                | (rest[:, 0] << np.uint64(32))
                | (rest[:, 1] << np.uint64(16))
                | rest[:, 2]
            )
            flat[where] = np.searchsorted(self.wide, wide, side="right") + self.table.first
        return out

    def _draw_dense(self, key: int, out: torch.Tensor, stream: WordStream) -> torch.Tensor:
        flat = out.view(-1)
        count = flat.numel()
        digits = _digits(block_uniform_words(key, count // 2, self.device, stream=stream))
        offsets = torch.index_select(self.lut, 0, digits.to(torch.int32).add_(1 << 15))
        impure = offsets == _IMPURE
        more = _digits(block_uniform_words(key, (3 * count + 1) // 2, self.device, start=count // 2, stream=stream))
        rank = torch.cumsum(impure.to(torch.int64), 0).sub_(1).clamp_(min=0)
        rest = more[: 3 * count].view(-1, 3)[rank].to(torch.int64) & 0xFFFF
        head = digits.to(torch.int64) & 0xFFFF
        signed = (head - (1 << 15)) * (1 << 48) + rest[:, 0] * (1 << 32) + rest[:, 1] * (1 << 16) + rest[:, 2]
        refined = torch.searchsorted(self.thresholds, signed, right=True) + self.table.first
        flat.copy_(torch.where(impure, refined, offsets.to(torch.int64)))
        return out


class SmoothedClassifier:
    """A base classifier ``f`` and its Gaussian smoothing ``g`` at noise level ``sigma`` (l2, input units).

    The one job of this class is noise sampling and counting: ``counts`` returns, per input, the
    K-vector of how often ``argmax f(x + eps)``, ``eps ~ N(0, sigma^2 I)``, took each class. It
    computes no bound.

    Parameters
    ----------
    model : torch.nn.Module
        The base classifier ``f``: pixels in [0, 1] (``N x C x H x W``) to ``N x K`` logits. It is
        moved to ``device`` and put in eval mode.
    num_classes : int
        Number of classes ``K`` (>= 2); the model's output width is checked against it on the first
        forward pass.
    sigma : float
        Noise level: standard deviation of the Gaussian noise per pixel, in input units (pixels in
        [0, 1]); finite and > 0.
    device : str, torch.device or None, optional
        Where to compute (``resolve_device``); default CUDA when present, else CPU. The noise is drawn
        there too.
    batch_size : int or "auto", optional
        Noisy samples per forward pass (>= 1). Counts do not depend on it. ``"auto"``: the largest
        multiple of ``NOISE_BLOCK`` (up to ``AUTO_BATCH_MAX``) whose forward pass fits in the device's
        memory, found once per (device, model architecture, input shape, settings) by
        ``find_batch_size`` and recorded in ``$SURROGATE_CERT_CACHE/batch_size.json``; needs
        ``input_shape``. ``batch_size_source`` says which.
    amp : {None, "none", "bf16"}, optional
        ``"bf16"`` runs the forward passes under bfloat16 autocast (CUDA, or CPUs with bf16 support);
        the noise is the same, but the base model's answers, hence the counts, may differ from
        float32 ones: ``amp_disagreement`` measures by how much.
    seed : int, optional
        Seed of every noise stream; with an input's noise name, the stream and the sample number it
        fixes the noise.
    noise_scheme : str, optional
        How a noise block's generator is seeded (``NOISE_SCHEMES``; default ``NOISE_SCHEME``). Pass
        ``NOISE_SCHEME_V1`` to reproduce counts of version 0.1, ``NOISE_SCHEME_SOUND`` (alias ``"sound"``)
        for noise whose law is known exactly (inputs on the 1/255 grid; radii by ``radius_slack``).
    channels_last : bool, optional
        Run the model on ``channels_last`` memory (faster convolutions on GPUs). Default: on for a
        convolutional model on CUDA, off otherwise. The counts do not depend on it beyond rounding.
    compile : bool or str, optional
        ``torch.compile`` the model (``True`` for the default backend, or a backend name); the first
        batches of each new size pay the compilation.
    input_shape : sequence of int, optional
        ``(C, H, W)`` of the inputs; needed by ``batch_size="auto"``.
    off_grid : {"refuse", "quantise"}, optional
        The sound scheme only: refuse inputs off the 1/255 grid (default), or count the rounded input
        ``quantise_to_grid(x)`` instead (the certificate is then about that image).

    Raises
    ------
    InvalidParameterError
        If ``num_classes``, ``sigma``, ``batch_size`` or ``noise_scheme`` is out of range.
    InvalidInputError
        If ``amp`` is not supported, or CUDA is requested but unavailable.
    ModelError
        If ``batch_size="auto"`` finds that not even ``NOISE_BLOCK`` samples fit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        sigma: float,
        *,
        device: str | torch.device | None = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        amp: str | None = None,
        seed: int = 0,
        noise_scheme: str = NOISE_SCHEME,
        channels_last: bool | None = None,
        compile: bool | str = False,
        input_shape: Sequence[int] | None = None,
        off_grid: str = "refuse",
    ):
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.sigma = check_sigma(sigma)
        self.seed = check_seed(seed)
        self.noise_scheme = check_noise_scheme(noise_scheme, allow_unseeded=True)
        if off_grid not in OFF_GRID_CHOICES:
            raise InvalidParameterError(f"off_grid must be one of {OFF_GRID_CHOICES}, got {off_grid!r}")
        self.off_grid = off_grid
        self._sampler: GridSampler | None = None
        self.device = resolve_device(device)
        if amp not in (None, "none", "bf16"):
            raise InvalidInputError(f"amp must be 'bf16' or None, got {amp!r}")
        self.amp = amp if amp == "bf16" else None
        model = model.to(self.device).eval()
        self.channels_last = (
            (self.device.type == "cuda" and _is_convolutional(model)) if channels_last is None else bool(channels_last)
        )
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.compile = "inductor" if compile is True else (compile or None)
        self._fingerprint = _architecture_fingerprint(model)
        self.base_model = model  # uncompiled: what bound propagation and hashing read
        self.model = torch.compile(model, backend=self.compile) if self.compile else model
        self._checked_width = False
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
        if batch_size == "auto":
            if self.input_shape is None:
                raise InvalidParameterError("batch_size='auto' needs input_shape (C, H, W) to probe the device")
            self.batch_size, self.batch_size_source = self._auto_batch_size()
        else:
            self.batch_size = check_count("batch_size", cast(int, batch_size))  # other text is refused here
            self.batch_size_source = "given"

    # ------------------------------------------------------------------ forward
    def _autocast(self):
        if self.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict_labels(self, x: torch.Tensor, nonfinite: torch.Tensor | None = None) -> torch.Tensor:
        """``argmax f(x)`` for a batch already on the device (no noise added).

        ``nonfinite`` (a 0-d int64 tensor on the device), when given, is increased by the number of rows
        whose logits hold NaN or infinity, on the device (no host synchronisation): the counting
        engine reads it once per call and refuses the counts (argmax of NaN is class 0).
        """
        with self._autocast():
            logits = self.model(x)
        # The width is host metadata: checking it on every batch costs nothing and keeps a model whose
        # output changes width from writing its answers into another input's counts.
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or logits.shape[0] != x.shape[0]:
            raise ModelError(
                f"the model outputs shape {tuple(logits.shape)} for {x.shape[0]} inputs but num_classes="
                f"{self.num_classes}; pass the model trained for this dataset or fix --num-classes"
            )
        self._checked_width = True
        if nonfinite is not None:
            nonfinite += (~torch.isfinite(logits)).any(dim=1).sum()
        return logits.argmax(dim=1)

    def _checked_result(self, table: torch.Tensor, totals: np.ndarray | None, nonfinite: torch.Tensor) -> np.ndarray:
        """``table`` on the host, after the engine's own checks (computed on the device, read once per call).

        Refuses (``ModelError``) the result of a call where the model returned NaN or infinite logits, or
        whose rows do not sum to the samples asked (``totals``): no certificate may come from them.
        """
        wrong = (
            (table.sum(dim=1) != torch.from_numpy(totals).to(table.device)).sum()
            if totals is not None
            else torch.zeros_like(nonfinite)
        )
        bad_rows, bad_sums = torch.stack([nonfinite, wrong]).tolist()
        if bad_rows:
            raise ModelError(
                f"the base model returned NaN or infinite logits on {bad_rows} noisy samples (sigma="
                f"{self.sigma:g}); counts from them would certify class 0 by accident, so none are "
                "returned; fix the model (or lower sigma)"
            )
        if bad_sums:
            raise ModelError(
                f"{bad_sums} inputs' counts do not sum to the samples drawn for them (the model's answers "
                "fell outside its classes or samples were lost); no counts are returned"
            )
        return table.cpu().numpy()

    # ------------------------------------------------------------------ batch size
    def _auto_batch_size(self) -> tuple[int, str]:
        input_shape = cast(tuple[int, ...], self.input_shape)  # __init__ refuses "auto" without one
        device_name = (
            f"{torch.cuda.get_device_name(self.device)} {torch.cuda.get_device_properties(self.device).total_memory}"
            if self.device.type == "cuda"
            else self.device.type
        )
        key = json.dumps(
            [
                device_name,
                torch.__version__,
                self._fingerprint,
                list(input_shape),
                self.num_classes,
                self.amp,
                self.channels_last,
                self.compile,
            ],
            separators=(",", ":"),
        )
        cache = os.path.join(_cache_folder(), "batch_size.json")
        cached = _read_batch_cache(cache).get(key)
        if isinstance(cached, int) and cached >= 1:
            return cached, "auto (recorded)"
        probe = torch.zeros((1, *input_shape))

        def fits(size: int) -> bool:
            self.batch_size = size
            try:
                self.counts(probe, size)
                return True
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors mean "does not fit"
                if not _is_out_of_memory(exc):
                    raise
                return False
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

        found = find_batch_size(fits, AUTO_BATCH_MAX.get(self.device.type, AUTO_BATCH_MAX["cpu"]))
        _write_batch_cache(cache, key, found)
        return found, "auto (searched)"

    # ------------------------------------------------------------------ counting
    def _block_keys(self, index: int, stream: int, first_block: int, end_block: int):
        if self.noise_scheme in (NOISE_SCHEME_V2, NOISE_SCHEME_SOUND):
            if end_block > (1 << _BLOCK_BITS) or not 0 <= stream < (1 << _STREAM_BITS):
                block_keys(self.seed, index, stream, [end_block - 1])  # raises the error that says why
            h = _input_hash(self.seed, index)
            return [_block_key(h, stream, b) for b in range(first_block, end_block)]
        if self.noise_scheme == NOISE_SCHEME_V1:
            return [block_seed(self.seed, index, stream, b) for b in range(first_block, end_block)]
        return None

    # ------------------------------------------------------------------ what a noise scheme does
    @property
    def sound(self) -> bool:
        """Whether the noise is the sound scheme's (law known exactly; certify with ``radius_slack``)."""
        return self.noise_scheme in SOUND_SCHEMES

    def radius_slack(self, input_shape: Sequence[int] | int) -> float:
        """``noise_slack`` of this classifier's scheme and sigma for inputs of ``input_shape``: the ``slack``
        every radius computed from its counts takes (``stats.radius``); 0 for the float schemes."""
        return noise_slack(self.noise_scheme, self.sigma, input_shape)

    def _engine_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What noise is added to, on the device: the pixels, or for the sound scheme ``round(255 x)``."""
        if self.sound:
            return grid_integers(x, self.off_grid).to(self.device)
        return x.to(self.device, dtype=torch.float32)

    def _block_noise(self, words: WordStream, key: int, out: torch.Tensor) -> None:
        """Fill ``out`` (``NOISE_BLOCK`` samples) with block ``key``'s noise: N(0, 1) floats, or grid offsets."""
        if self.sound:
            if self._sampler is None:
                self._sampler = GridSampler(grid_table(self.sigma), self.device)
            self._sampler.draw(key, out, words)
            return
        words.generator.manual_seed(key)
        torch.randn(out.shape, generator=words.generator, out=out)

    def _noisy(self, noise: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The model's input, in place in ``noise``: ``x + sigma * noise``, or ``(round(255 x) + j) / 255``.

        Both round alike wherever they run. The sound scheme's sum is an exact integer (float32 holds
        integers up to 2**24), divided once: the model sees a function of the grid point alone.
        """
        if self.sound:
            return noise.add_(clean).div_(GRID_LEVELS)
        return noise.mul_(self.sigma).add_(clean)

    def _noise_blocks(self, start_arr: np.ndarray, n_arr: np.ndarray, idx_arr: np.ndarray, stream: int):
        """Walk the noise blocks that samples ``start_i .. start_i + n_i - 1`` of each input fall in.

        Yields ``(i, block, key, lo, hi)``: input ``i`` uses rows ``lo:hi`` of noise block ``block``,
        whose generator seed is ``key`` (None for the unseeded scheme). ``counts`` and
        ``sample_predictions`` both walk the streams this way, so they see the same samples.
        """
        for i in range(len(n_arr)):
            first, last = int(start_arr[i]), int(start_arr[i] + n_arr[i])
            if last <= first:
                continue
            first_block, end_block = first // NOISE_BLOCK, (last + NOISE_BLOCK - 1) // NOISE_BLOCK
            keys = self._block_keys(int(idx_arr[i]), stream, first_block, end_block)
            for j, block in enumerate(range(first_block, end_block)):
                yield (
                    i,
                    block,
                    None if keys is None else keys[j],
                    max(first - block * NOISE_BLOCK, 0),
                    min(last - block * NOISE_BLOCK, NOISE_BLOCK),
                )

    def _keyed_batches(
        self,
        noise: torch.Tensor,
        start_arr: np.ndarray,
        n_arr: np.ndarray,
        idx_arr: np.ndarray,
        stream: int,
        capacity: int,
    ):
        """Scheme v3: fill ``noise`` with batches of at most ``capacity`` noisy-sample rows, inputs in order.

        Yields ``(rows, owners, samples)``: rows ``0 .. rows - 1`` of ``noise`` hold samples ``samples``
        (stream numbers) of inputs ``owners`` (positions in the call), both int64 tensors on the device.
        Every row's noise is a pure function of its key (``core.philox``), so all the blocks of a batch
        are drawn in one pass; ``counts`` and ``sample_predictions`` both walk the streams this way.
        """
        live = n_arr > 0
        check_keys(idx_arr[live], (start_arr + n_arr - 1)[live], stream)  # the largest sample is the one to check
        device = noise.device
        names = torch.from_numpy(idx_arr).to(device)
        for inputs, firsts, takes in _keyed_segments(start_arr, n_arr, capacity):
            rows = int(takes.sum())
            takes_t = torch.from_numpy(takes).to(device)
            owners = torch.repeat_interleave(torch.from_numpy(inputs).to(device), takes_t, output_size=rows)
            # sample of row r: firsts[s] + (r - first row of segment s)
            shift = torch.from_numpy(firsts - (np.cumsum(takes) - takes)).to(device)
            samples = torch.arange(rows, device=device) + torch.repeat_interleave(shift, takes_t, output_size=rows)
            fill_keyed_normal(noise[:rows], self.seed, names[owners], stream, samples)
            yield rows, owners, samples

    # long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
    @torch.inference_mode()
    def counts(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] | np.ndarray,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        stream: int = STREAM_ESTIMATE,
        start: int | Sequence[int] | np.ndarray = 0,
    ) -> np.ndarray:
        """Class counts of ``n`` noisy evaluations of each input: an ``N x K`` int64 array.

        Row ``i`` counts how often ``argmax f(x_i + sigma * eps_j)`` took each class, for the samples
        ``j = start_i, ..., start_i + n_i - 1`` of stream ``stream`` of noise name ``indices[i]``. Noisy
        copies of several inputs share one forward pass; noise is drawn on the device, straight into
        the forward batch, counts stay on the device until the call ends, and only the counts are
        copied to the host.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        n : int or array_like of int
            Samples per input (>= 0): one value for all inputs, or one per input.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (use dataset indices); default ``0..N-1``.
        stream : int, optional
            Separates independent uses of one input (``STREAM_SELECT``, ``STREAM_ESTIMATE``,
            ``STREAM_SEQUENTIAL``, ``STREAM_AUDIT``); default ``STREAM_ESTIMATE``.
        start : int or array_like of int, optional
            First sample of the stream to draw (>= 0), one value or one per input: a sequential test
            passes the samples drawn so far, so it draws the next ones and never reuses any.

        Returns
        -------
        numpy.ndarray
            ``N x K`` int64 counts on the host; row ``i`` sums to ``n_i`` (checked here, on the device).

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch (``check_images``), or ``indices`` does not hold one
            entry per input.
        InvalidParameterError
            If ``n`` or ``start`` is not a whole number >= 0, or not one value or one per input.
        ModelError
            If the model's output is not ``N x num_classes``, a logit is NaN or infinite, or a row of counts
            does not sum to its ``n_i``.
        """
        x = check_images(x)
        num = x.shape[0]
        n_arr = _whole_per_input("n", n, num)
        start_arr = _whole_per_input("start", start, num)
        idx_arr = noise_indices(indices, num)

        k, shape, device = self.num_classes, tuple(x.shape[1:]), self.device
        x_dev = self._engine_inputs(x)
        counts = torch.zeros(num * k, dtype=torch.int64, device=device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        capacity = max(self.batch_size, NOISE_BLOCK)
        noise = torch.empty((capacity + NOISE_BLOCK, *shape), device=device)
        scratch = None
        words = WordStream(device)
        gen = words.generator
        unseeded = self.noise_scheme == NOISE_UNSEEDED
        if unseeded:
            gen.manual_seed(self.seed)
        owner_ids: list[int] = []
        owner_takes: list[int] = []
        filled = 0

        def flush(rows: int, owners: torch.Tensor | None = None) -> None:
            if owners is None:
                owners = torch.from_numpy(np.repeat(np.asarray(owner_ids, np.int64), owner_takes)).to(device)
                owner_ids.clear()
                owner_takes.clear()
            if unseeded:
                torch.randn((rows, *shape), generator=gen, out=noise[:rows])
            for lo in range(0, rows, self.batch_size):
                hi = min(lo + self.batch_size, rows)
                own = owners[lo:hi]
                noisy = self._noisy(noise[lo:hi], x_dev[own])
                if self.channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                pred = self.predict_labels(noisy, nonfinite)
                counts.add_(torch.bincount(own * k + pred, minlength=num * k))

        if self.noise_scheme == NOISE_SCHEME_V3:
            for rows, owners, _ in self._keyed_batches(noise, start_arr, n_arr, idx_arr, stream, capacity):
                flush(rows, owners)
            return self._checked_result(counts.view(num, k), n_arr, nonfinite)
        for i, _, key, lo, hi in self._noise_blocks(start_arr, n_arr, idx_arr, stream):
            take = hi - lo
            if key is not None:
                if take == NOISE_BLOCK:
                    self._block_noise(words, key, noise[filled : filled + take])
                else:
                    if scratch is None:
                        scratch = torch.empty((NOISE_BLOCK, *shape), device=device)
                    self._block_noise(words, key, scratch)
                    noise[filled : filled + take] = scratch[lo:hi]
            owner_ids.append(i)
            owner_takes.append(take)
            filled += take
            if filled >= capacity:
                flush(filled)
                filled = 0
        if filled:
            flush(filled)
        # Row sums against n, and the model's non-finite answers, checked on the device: one copy per call.
        return self._checked_result(counts.view(num, k), n_arr, nonfinite)

    def amp_disagreement(
        self,
        x: torch.Tensor,
        n: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        stream: int = STREAM_ESTIMATE,
    ) -> np.ndarray:
        """Per input, the share of ``n`` noisy predictions that bf16 autocast moves to another class.

        Counts the same noise twice, under this classifier's ``amp`` and in float32, and returns the
        total variation distance of the two count vectors, ``|c_amp - c_fp32|_1 / (2 n)``: a lower
        bound on the share of samples whose class changed, and an upper bound on how far any class
        frequency moved. ``AMP_TOLERANCE`` is the share ``datagen --amp bf16`` accepts.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        n : int
            Samples per input (>= 1).
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name; default ``0..N-1``.
        stream : int, optional
            Noise stream to draw from.

        Returns
        -------
        numpy.ndarray
            ``(N,)`` float64 shares in [0, 1].

        Raises
        ------
        InvalidParameterError
            If this classifier runs without ``amp``, or ``n`` is not >= 1.
        """
        n = check_count("n", n)
        if self.amp is None:
            raise InvalidParameterError(
                "amp_disagreement compares bf16 with float32: build the classifier with amp='bf16'"
            )
        with_amp = self.counts(x, n, indices=indices, stream=stream)
        saved, self.amp = self.amp, None
        try:
            fp32 = self.counts(x, n, indices=indices, stream=stream)
        finally:
            self.amp = saved
        return np.abs(with_amp - fp32).sum(axis=1) / (2.0 * n)

    # ------------------------------------------------------------------ per-sample outcomes
    # long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
    @torch.inference_mode()
    def sample_predictions(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] | np.ndarray,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        stream: int = STREAM_ESTIMATE,
        start: int | Sequence[int] | np.ndarray = 0,
    ) -> np.ndarray:
        """The class ``argmax f(x_i + sigma * eps_j)`` of every noisy sample, in order: ``N x max(n)``.

        Row ``i`` holds samples ``j = start_i, ..., start_i + n_i - 1`` of stream ``stream`` of noise
        name ``indices[i]``, then -1 where ``n_i < max(n)``. The noise is that of ``counts`` (same
        blocks, same keys, same arithmetic), so
        ``counts(x, n, ...)[i] == bincount(sample_predictions(x, n, ...)[i, :n_i])``: a sequential test
        that reads outcomes one by one sees exactly the samples a count would have summed. Noisy
        copies of several inputs share forward passes, as in ``counts``.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        n : int or array_like of int
            Samples per input (>= 0): one value for all inputs, or one per input.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (use dataset indices); default ``0..N-1``.
        stream : int, optional
            Which independent noise stream (``STREAM_SELECT``, ``STREAM_ESTIMATE``, ``STREAM_SEQUENTIAL``).
        start : int or array_like of int, optional
            First sample of the stream to draw (>= 0), one value or one per input.

        Returns
        -------
        numpy.ndarray
            ``N x max(n)`` int32 class indices on the host, -1 past each row's ``n_i``.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch, or ``indices`` does not hold one entry per input.
        InvalidParameterError
            If ``n`` or ``start`` is not a whole number >= 0, or the noise scheme is unseeded (its
            samples cannot be replayed in order).
        ModelError
            If the model's output is not ``N x num_classes``.
        """
        if self.noise_scheme == NOISE_UNSEEDED:
            raise InvalidParameterError("sample_predictions needs a seeded noise scheme (v1, v2 or v3), not 'unseeded'")
        x = check_images(x)
        num = x.shape[0]
        n_arr = _whole_per_input("n", n, num)
        start_arr = _whole_per_input("start", start, num)
        idx_arr = noise_indices(indices, num)
        width = int(n_arr.max()) if num else 0

        shape, device = tuple(x.shape[1:]), self.device
        x_dev = self._engine_inputs(x)
        out = torch.full((num * width,), -1, dtype=torch.int32, device=device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        capacity = max(self.batch_size, NOISE_BLOCK)
        noise = torch.empty((capacity + NOISE_BLOCK, *shape), device=device)
        scratch = torch.empty((NOISE_BLOCK, *shape), device=device)
        owners = torch.empty(capacity + NOISE_BLOCK, dtype=torch.int64, device=device)
        slots = torch.empty(capacity + NOISE_BLOCK, dtype=torch.int64, device=device)
        offsets = torch.arange(NOISE_BLOCK, device=device)
        words = WordStream(device)
        filled = 0

        def flush(rows: int) -> None:
            for lo in range(0, rows, self.batch_size):
                hi = min(lo + self.batch_size, rows)
                noisy = self._noisy(noise[lo:hi], x_dev[owners[lo:hi]])  # as in counts, bit for bit
                if self.channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                out[slots[lo:hi]] = self.predict_labels(noisy, nonfinite).to(torch.int32)

        if self.noise_scheme == NOISE_SCHEME_V3:
            firsts = torch.from_numpy(start_arr).to(device)
            for rows, own, samples in self._keyed_batches(noise, start_arr, n_arr, idx_arr, stream, capacity):
                owners[:rows] = own
                slots[:rows] = own * width + samples - firsts[own]  # column: the sample's offset from start_i
                flush(rows)
            return self._checked_result(out.view(num, width), None, nonfinite)
        for i, block, key, lo, hi in self._noise_blocks(start_arr, n_arr, idx_arr, stream):
            take = hi - lo
            self._block_noise(words, key, scratch)
            noise[filled : filled + take] = scratch[lo:hi]
            owners[filled : filled + take] = i
            # column of sample (block * NOISE_BLOCK + lo) in row i: its offset from start_i
            slots[filled : filled + take] = offsets[:take] + (i * width + block * NOISE_BLOCK + lo - int(start_arr[i]))
            filled += take
            if filled >= capacity:
                flush(filled)
                filled = 0
        if filled:
            flush(filled)
        return self._checked_result(out.view(num, width), None, nonfinite)
