"""The Monte Carlo counting engine: class counts of a base classifier under Gaussian noise.

Noise is reproducible per input, not per call: sample ``j`` of input ``i`` in stream ``stream``
comes from block ``j // NOISE_BLOCK`` of a generator seeded by ``(seed, index_i, stream, block)``.
So counts do not depend on batch size, on which inputs share a forward pass, on sharding, or on
where an interrupted job resumes; and two streams of one input (selection / estimation) are
independent.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidInputError, ModelError, check_count, check_positive

NOISE_BLOCK = 256
"""Samples per noise block: the unit of reproducibility (and of per-block seeding cost)."""

NOISE_SCHEME = "torch-generator-block256-v1"
"""Names how noise is derived from (seed, index, stream, sample); stored in counts files, so a resume
never mixes two schemes. Change it whenever the noise of a given (seed, index, stream, j) changes."""

STREAM_SELECT = 0
STREAM_ESTIMATE = 1
STREAM_SEQUENTIAL = 2


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
    InvalidInputError
        If a CUDA device is requested but none is available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """64-bit seed of one noise block, mixed by NumPy's SeedSequence (no correlated neighbours)."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream), int(block)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@functools.lru_cache(maxsize=1 << 16)
def _cached_block_seed(seed: int, index: int, stream: int, block: int) -> int:
    """``block_seed``, remembered: a sequential test draws one block over several rounds."""
    return block_seed(seed, index, stream, block)


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
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInputError(
            f"inputs have shape {tuple(x.shape)} but the model expects N x {' x '.join(map(str, input_shape))}"
        )
    if x.ndim < 2:
        raise InvalidInputError(f"inputs must be a batch (N x C x H x W), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError("inputs contain NaN or infinite values; clean or drop those images")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise InvalidInputError(
            f"inputs must lie in [0, 1] (pixels, before any normalisation), got range "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; put normalisation inside the model"
        )
    return x


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
        Where to compute (``resolve_device``); default CUDA when present, else CPU.
    batch_size : int, optional
        Noisy samples per forward pass (>= 1). Counts do not depend on it.
    amp : {None, "none", "bf16"}, optional
        ``"bf16"`` runs the forward passes under bfloat16 autocast (CUDA only); the noise is the same,
        but the base model's answers, hence the counts, may differ from float32 ones.
    seed : int, optional
        Seed of every noise stream; with an input's noise name, the stream and the sample number it
        fixes the noise.

    Raises
    ------
    InvalidParameterError
        If ``num_classes``, ``sigma`` or ``batch_size`` is out of range.
    InvalidInputError
        If ``amp`` is not supported, ``amp="bf16"`` is asked for off CUDA, or CUDA is requested but
        unavailable.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        sigma: float,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 1000,
        amp: str | None = None,
        seed: int = 0,
    ):
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.sigma = check_positive("sigma", sigma)
        self.batch_size = check_count("batch_size", batch_size)
        self.seed = int(seed)
        self.device = resolve_device(device)
        if amp not in (None, "none", "bf16"):
            raise InvalidInputError(f"amp must be 'bf16' or None, got {amp!r}")
        if amp == "bf16" and self.device.type != "cuda":
            raise InvalidInputError("--amp bf16 needs a CUDA device; drop --amp on the CPU")
        self.amp = amp if amp == "bf16" else None
        self.model = model.to(self.device).eval()
        self._checked_width = False

    # ------------------------------------------------------------------ forward
    def _autocast(self):
        if self.amp == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        """``argmax f(x)`` for a batch already on the device (no noise added)."""
        with self._autocast():
            logits = self.model(x)
        if not self._checked_width:
            if logits.ndim != 2 or logits.shape[1] != self.num_classes:
                raise ModelError(
                    f"the model outputs shape {tuple(logits.shape)} but num_classes={self.num_classes}; "
                    "pass the model trained for this dataset or fix --num-classes"
                )
            self._checked_width = True
        return logits.argmax(dim=1)

    # ------------------------------------------------------------------ counting
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
        copies of several inputs share one forward pass; counts stay on the device until the call
        ends, and only the counts are copied to the host.

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
            ``STREAM_SEQUENTIAL``); default ``STREAM_ESTIMATE``.
        start : int or array_like of int, optional
            First sample of the stream to draw (>= 0), one value or one per input: a sequential test
            passes the samples drawn so far, so it draws the next ones and never reuses any.

        Returns
        -------
        numpy.ndarray
            ``N x K`` int64 counts on the host; row ``i`` sums to ``n_i``.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch (``check_images``), ``n`` or ``start`` is negative, or
            ``indices`` does not hold one entry per input.
        ModelError
            If the model's output is not ``N x num_classes``.
        """
        x = check_images(x)
        num = x.shape[0]
        n_arr = np.broadcast_to(np.asarray(n, dtype=np.int64), (num,))
        start_arr = np.broadcast_to(np.asarray(start, dtype=np.int64), (num,))
        if num and (n_arr.min() < 0 or start_arr.min() < 0):
            raise InvalidInputError("n and start must be >= 0")
        idx_arr = noise_indices(indices, num)

        k = self.num_classes
        x_dev = x.to(self.device, dtype=torch.float32)
        counts = torch.zeros(num * k, dtype=torch.int64, device=self.device)
        capacity = max(self.batch_size, NOISE_BLOCK)
        noise = torch.empty((capacity + NOISE_BLOCK, *x.shape[1:]), device=self.device)
        owners = torch.empty(capacity + NOISE_BLOCK, dtype=torch.int64, device=self.device)
        gen = torch.Generator(device=self.device)
        filled = 0

        def flush(rows: int) -> None:
            for lo in range(0, rows, self.batch_size):
                hi = min(lo + self.batch_size, rows)
                own = owners[lo:hi]
                noisy = x_dev[own] + noise[lo:hi] * self.sigma
                pred = self.predict_labels(noisy)
                counts.add_(torch.bincount(own * k + pred, minlength=num * k))

        for i in range(num):
            first, last = int(start_arr[i]), int(start_arr[i] + n_arr[i])
            for block in range(first // NOISE_BLOCK, (last + NOISE_BLOCK - 1) // NOISE_BLOCK):
                lo = max(first - block * NOISE_BLOCK, 0)
                hi = min(last - block * NOISE_BLOCK, NOISE_BLOCK)
                gen.manual_seed(block_seed(self.seed, idx_arr[i], stream, block))
                block_noise = torch.randn((NOISE_BLOCK, *x.shape[1:]), generator=gen, device=self.device)
                take = hi - lo
                noise[filled : filled + take] = block_noise[lo:hi]
                owners[filled : filled + take] = i
                filled += take
                if filled >= capacity:
                    flush(filled)
                    filled = 0
        if filled:
            flush(filled)
        return counts.view(num, k).cpu().numpy()

    # ------------------------------------------------------------------ per-sample outcomes
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
        blocks, same seeding per (seed, index, stream, block)), so
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
            If ``x`` is not a valid image batch, ``n`` or ``start`` is negative, or ``indices`` does not
            hold one entry per input.
        ModelError
            If the model's output is not ``N x num_classes``.
        """
        x = check_images(x)
        num = x.shape[0]
        n_arr = np.broadcast_to(np.asarray(n, dtype=np.int64), (num,))
        start_arr = np.broadcast_to(np.asarray(start, dtype=np.int64), (num,))
        if num and (n_arr.min() < 0 or start_arr.min() < 0):
            raise InvalidInputError("n and start must be >= 0")
        idx_arr = noise_indices(indices, num)
        width = int(n_arr.max()) if num else 0

        x_dev = x.to(self.device, dtype=torch.float32)
        out = torch.full((num * width,), -1, dtype=torch.int32, device=self.device)
        capacity = max(self.batch_size, NOISE_BLOCK)
        noise = torch.empty((capacity + NOISE_BLOCK, *x.shape[1:]), device=self.device)
        owners = torch.empty(capacity + NOISE_BLOCK, dtype=torch.int64, device=self.device)
        slots = torch.empty(capacity + NOISE_BLOCK, dtype=torch.int64, device=self.device)
        gen = torch.Generator(device=self.device)
        offsets = torch.arange(NOISE_BLOCK, device=self.device)
        filled = 0

        def flush(rows: int) -> None:
            for lo in range(0, rows, self.batch_size):
                hi = min(lo + self.batch_size, rows)
                noisy = x_dev[owners[lo:hi]] + noise[lo:hi] * self.sigma
                out[slots[lo:hi]] = self.predict_labels(noisy).to(torch.int32)

        for i in range(num):
            first, last = int(start_arr[i]), int(start_arr[i] + n_arr[i])
            for block in range(first // NOISE_BLOCK, (last + NOISE_BLOCK - 1) // NOISE_BLOCK):
                lo = max(first - block * NOISE_BLOCK, 0)
                hi = min(last - block * NOISE_BLOCK, NOISE_BLOCK)
                gen.manual_seed(_cached_block_seed(self.seed, int(idx_arr[i]), stream, block))
                block_noise = torch.randn((NOISE_BLOCK, *x.shape[1:]), generator=gen, device=self.device)
                take = hi - lo
                noise[filled : filled + take] = block_noise[lo:hi]
                owners[filled : filled + take] = i
                slots[filled : filled + take] = offsets[:take] + (i * width + block * NOISE_BLOCK + lo - first)
                filled += take
                if filled >= capacity:
                    flush(filled)
                    filled = 0
        if filled:
            flush(filled)
        return out.view(num, width).cpu().numpy()
