"""Exact ground truth for soundness checks: a linear binary base model.

For ``f(x) = 1[w.x + b > 0]`` and noise ``N(0, sigma^2 I)``, ``w.(x + eps) + b ~ N(w.x + b, sigma^2 ||w||^2)``,
so ``p_1(x) = Phi((w.x + b) / (sigma ||w||))`` exactly, ``g(x) = 1[w.x + b > 0]``, and the largest
radius any certificate may claim is the distance to the hyperplane, ``|w.x + b| / ||w||``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as _st
from torch import nn


class LinearBinaryModel(nn.Module):
    """Logits ``(-(w.x + b), w.x + b)``: class 1 iff ``w.x + b > 0``. TorchScript-compatible."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.reshape(-1).float())
        self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)

    def as_sequential(self) -> nn.Sequential:
        """The same logits as ``Flatten -> Linear(d, 2)``: the form bound propagation reads."""
        linear = nn.Linear(self.w.numel(), 2)
        with torch.no_grad():
            linear.weight.copy_(torch.stack([-self.w, self.w]))
            linear.bias.copy_(torch.stack([-self.b, self.b]))
        return nn.Sequential(nn.Flatten(), linear).eval()


@dataclass
class LinearProblem:
    """Inputs with known smoothed class, ``p_1`` and true certified radius (input l2 units)."""

    model: LinearBinaryModel
    sigma: float
    x: torch.Tensor  # N x C x H x W, in [0, 1]
    margin: np.ndarray  # signed distance (w.x + b) / ||w||
    true_class: np.ndarray  # g(x)
    true_radius: np.ndarray  # |margin|
    p1: np.ndarray  # P(f(x + eps) = 1)

    def wrong(self, predictions: Sequence[int], radii: Sequence[float]) -> np.ndarray:
        """DESIGN.md's wrong certificate: ``R > 0`` and (``A != g(x)`` or ``R > true radius``).

        Parameters
        ----------
        predictions : sequence of int
            Certified class per input (-1 = abstain).
        radii : sequence of float
            Certified radius per input, input l2 units (0 = abstain).

        Returns
        -------
        numpy.ndarray
            Boolean, one per input. ``R > true radius`` allows a float slack of 1e-9 relative plus
            1e-12 absolute.
        """
        pred = np.asarray(predictions)
        rad = np.asarray(radii, dtype=float)
        return (rad > 0) & ((pred != self.true_class) | (rad > self.true_radius * (1 + 1e-9) + 1e-12))

    def wrong_certificates(self, certificates) -> np.ndarray:
        return self.wrong([c.prediction for c in certificates], [c.radius for c in certificates])


def linear_problem(
    num_inputs: int,
    sigma: float = 0.25,
    max_margin_sigmas: float = 3.0,
    input_shape: tuple[int, int, int] = (1, 2, 2),
    seed: int = 0,
) -> LinearProblem:
    """``num_inputs`` points with margins spread uniformly over ``[-m, m] * sigma``, inside [0, 1]^d.

    The hyperplane passes through the centre of the cube; points are the centre moved by the margin
    along the unit normal plus a small orthogonal jitter, so every pixel stays in [0, 1] for
    ``max_margin_sigmas * sigma <= 0.75``. Pixels are clipped to [0, 1] regardless, and the margins
    recomputed after clipping, so the recorded ground truth is exact.

    Parameters
    ----------
    num_inputs : int
        Number of points ``N``.
    sigma : float, optional
        Noise level (l2, input units); default 0.25.
    max_margin_sigmas : float, optional
        ``m``: margins are drawn uniformly from ``[-m * sigma, m * sigma]``; default 3.
    input_shape : tuple of int, optional
        ``(C, H, W)`` of one point; default ``(1, 2, 2)``.
    seed : int, optional
        Seed of the margins and the jitter.

    Returns
    -------
    LinearProblem
        The model ``f(x) = 1[w.x + b > 0]`` with ``w = (1, ..., 1) / sqrt(d)``, the points
        (``N x C x H x W`` float32) and, for each, the exact ``p_1``, the smoothed class ``g(x)`` and
        the true certified radius ``|w.x + b|`` (input l2 units).
    """
    rng = np.random.default_rng(seed)
    d = int(np.prod(input_shape))
    w = np.ones(d) / np.sqrt(d)
    b = -float(w @ np.full(d, 0.5))
    margin = rng.uniform(-max_margin_sigmas * sigma, max_margin_sigmas * sigma, size=num_inputs)
    jitter = rng.normal(scale=0.05, size=(num_inputs, d))
    jitter -= np.outer(jitter @ w, w)  # orthogonal to w: leaves the margin unchanged
    x = np.clip(0.5 + margin[:, None] * w[None, :] + jitter, 0.0, 1.0)
    margin = x @ w + b  # exact after clipping
    model = LinearBinaryModel(torch.tensor(w, dtype=torch.float32), b)
    return LinearProblem(
        model=model,
        sigma=float(sigma),
        x=torch.tensor(x, dtype=torch.float32).reshape(num_inputs, *input_shape),
        margin=margin,
        true_class=(margin > 0).astype(int),
        true_radius=np.abs(margin),
        p1=_st.norm.cdf(margin / sigma),
    )


# --------------------------------------------------------------------------- the sound (grid) noise scheme


def grid_sum_tail(table, pixels: int) -> tuple[int, np.ndarray]:
    """Law of ``S = j_1 + ... + j_pixels`` for i.i.d. offsets of the sound scheme's table (``core.grid_noise``).

    Returns ``(lowest, tail)`` with ``tail[i] = P(S >= lowest + i)``, from the exact sampled masses
    (float64 convolutions: accurate to about 1e-15).
    """
    pmf = np.array(table.pmf())
    law = np.array([1.0])
    for _ in range(int(pixels)):
        law = np.convolve(law, pmf)
    return int(pixels) * table.first, np.cumsum(law[::-1])[::-1]


def grid_flip_distance(steps, pixels: int) -> np.ndarray:
    """Shortest l2 distance (input units) between grid images whose pixel sums differ by ``steps`` (grid units).

    Spread ``D = q * pixels + r`` as evenly as integers allow: ``sqrt(r (q+1)^2 + (pixels - r) q^2) / 255``.
    """
    steps = np.abs(np.asarray(steps, dtype=np.int64))
    q, r = np.divmod(steps, int(pixels))
    return np.sqrt(r * (q + 1.0) ** 2 + (int(pixels) - r) * q**2.0) / 255.0


def grid_linear_problem(
    num_inputs: int,
    sigma: float = 0.25,
    max_margin_sigmas: float = 3.0,
    input_shape: tuple[int, int, int] = (1, 2, 2),
    seed: int = 0,
    table=None,
) -> LinearProblem:
    """Grid images and a linear model whose smoothed class and robustness under the sound scheme are exact.

    ``f(y) = 1[sum(y) > (T0 - 1/2) / 255]`` with ``T0 = 255 d / 2`` (``d`` pixels), so on a noisy grid image
    ``(a + j) / 255`` the class is ``1[sum(a) + S >= T0]``, ``S`` the sum of the ``d`` offsets, whose law
    ``grid_sum_tail`` gives exactly. The sampled law is symmetric, so the smoothed class of a grid image
    is ``1[sum(a) >= T0]`` and the nearest grid image of the other class lies at
    ``grid_flip_distance`` of the pixel-sum gap: ``true_radius`` is that distance, the radius beyond
    which an explicit adversarial example (on the grid) refutes a certificate. ``p1`` is the exact
    ``P(f(x + eps) = 1)`` under the sampled law. Pixel sums are spread uniformly over
    ``T0 +- max_margin_sigmas * sigma * 255 * sqrt(d)``.

    Parameters
    ----------
    num_inputs : int
        Number of images.
    sigma : float, optional
        Noise level of the sound scheme (input units).
    max_margin_sigmas : float, optional
        Spread of the pixel sums, in standard deviations of ``S``.
    input_shape : tuple of int, optional
        ``(C, H, W)``; default 4 pixels.
    seed : int, optional
        Seed of the sums and of how they are split into pixels.
    table : GridTable, optional
        The thresholds (default ``grid_table(sigma)``, the scheme's own).

    Returns
    -------
    LinearProblem
        ``x`` on the grid (float32 ``a / 255``), ``true_class``, ``true_radius`` (flip distance, input l2
        units), ``p1`` (exact), ``margin`` (signed pixel-sum gap, grid units).
    """
    from .grid_noise import grid_table  # the table is pure Python: imported where it is needed

    table = table if table is not None else grid_table(float(sigma))
    rng = np.random.default_rng(seed)
    d = int(np.prod(input_shape))
    t0 = 255 * d // 2
    spread = int(max_margin_sigmas * sigma * 255 * np.sqrt(d))
    sums = t0 + rng.integers(-spread, spread + 1, size=num_inputs)
    sums = np.clip(sums, 0, 255 * d)
    pixels = np.repeat((sums // d)[:, None], d, axis=1)
    pixels[np.arange(d)[None, :] < (sums % d)[:, None]] += 1
    if d > 1:  # move a few steps between the first two pixels: the sum (hence the truth) stays
        move = np.clip(
            rng.integers(-8, 9, size=num_inputs),
            -np.minimum(255 - pixels[:, 0], pixels[:, 1]),
            np.minimum(pixels[:, 0], 255 - pixels[:, 1]),
        )
        pixels[:, 0] -= move
        pixels[:, 1] += move
    lowest, tail = grid_sum_tail(table, d)
    cut = np.clip(t0 - sums - lowest, 0, len(tail))
    p1 = np.where(cut < len(tail), tail[np.minimum(cut, len(tail) - 1)], 0.0)
    true_class = (sums >= t0).astype(int)
    gap = np.where(true_class == 1, sums - (t0 - 1), t0 - sums)
    model = LinearBinaryModel(torch.ones(d), -(t0 - 0.5) / 255.0)
    return LinearProblem(
        model=model,
        sigma=float(sigma),
        x=torch.tensor(pixels.reshape(num_inputs, *input_shape), dtype=torch.float32) / 255.0,
        margin=(sums - t0 + 0.5),
        true_class=true_class,
        true_radius=grid_flip_distance(gap, d),
        p1=p1,
    )
