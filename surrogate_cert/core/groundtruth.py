"""Exact ground truth for soundness checks: a linear binary base model.

For ``f(x) = 1[w.x + b > 0]`` and noise ``N(0, sigma^2 I)``, ``w.(x + eps) + b ~ N(w.x + b, sigma^2 ||w||^2)``,
so ``p_1(x) = Phi((w.x + b) / (sigma ||w||))`` exactly, ``g(x) = 1[w.x + b > 0]``, and the largest
radius any certificate may claim is the distance to the hyperplane, ``|w.x + b| / ||w||``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    x: torch.Tensor            # N x C x H x W, in [0, 1]
    margin: np.ndarray         # signed distance (w.x + b) / ||w||
    true_class: np.ndarray     # g(x)
    true_radius: np.ndarray    # |margin|
    p1: np.ndarray             # P(f(x + eps) = 1)

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
