"""Float Gaussian noise certifies a radius that a grid image inside it refutes; the sound scheme does not.

The classifier reads its input's floating-point bits: class 0 iff some pixel is a nonzero float32 of
magnitude below 2**-9 that is not a multiple of 2**-32, else class 1. With float noise
``fl(sigma * n)`` around the black image ``x0 = 0``, pixels that land near 0 keep all the low bits of
``n`` (for ``sigma = 1/4`` the product is exact), so class 0 is frequent and Cohen's certifier gives
``x0`` a radius of about 0.43 (Cohen-10k). Around ``x1 = 1/255`` in every pixel (a grid image at distance
``28 / 255 = 0.11`` from ``x0``, well inside that radius), every noisy pixel below 2**-9 is
``fl(1/255) + fl(sigma n)`` computed exactly, a multiple of 2**-32: class 0 never occurs, and the
float sampler's smoothed classifier says class 1 at ``x1`` with probability 1. The certificate at
``x0`` is false, refuted by an explicit example on the grid (the flaw Voracek and Hein, ICLR 2023,
point out, with a construction of our own).

The sound scheme evaluates the model on ``(round(255 x) + j) / 255``: a pixel below 2**-9 is exactly
0, so class 0 never occurs at any grid image; it certifies class 1 at both points, and its claim is
true on the whole grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from surrogate_cert.core.cohen import CohenCertifier
from surrogate_cert.core.smoothing import NOISE_SCHEME_SOUND, NOISE_SCHEME_V2, SmoothedClassifier

SIGMA = 0.25
SHAPE = (1, 28, 28)


class FloatBitsDetector(nn.Module):
    """Class 0 iff a pixel is a nonzero float32 below 2**-9 in magnitude that is not a multiple of 2**-32."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.flatten(1)
        small = (flat != 0) & (flat.abs() < 2.0**-9)
        fine = torch.frac(flat * 2.0**32) != 0  # exact: a power-of-two scaling of a float32 below 2**-9
        hit = (small & fine).any(dim=1).float()
        return torch.stack([hit, 1.0 - hit], dim=1)


@pytest.fixture(scope="module")
def points():
    x0 = torch.zeros(1, *SHAPE)
    x1 = torch.full((1, *SHAPE), 1.0) / 255.0  # float32(1/255), as an 8-bit image reads
    return x0, x1


def classifier(scheme: str) -> SmoothedClassifier:
    return SmoothedClassifier(FloatBitsDetector(), 2, SIGMA, device="cpu", batch_size=2048, noise_scheme=scheme)


def test_float_noise_certificate_is_refuted_by_a_grid_image_inside_it(points):
    x0, x1 = points
    distance = float(torch.linalg.vector_norm(x1 - x0))
    assert 0.109 < distance < 0.110
    smooth = classifier(NOISE_SCHEME_V2)
    at_x0 = CohenCertifier(smooth).certify(x0, n0=100, n=10_000, alpha=1e-3, indices=[0])[0]
    assert at_x0.prediction == 0 and at_x0.radius > 2.5 * distance  # "class 0 on a ball of radius ~0.43"
    # the adversarial example: at x1 no noisy sample is ever of class 0 (exact: every small pixel is a
    # multiple of 2**-32), so the float sampler's smoothed class there is 1, with probability 1
    counts = smooth.counts(x1, 20_000, indices=[1])
    assert counts[0, 0] == 0
    at_x1 = CohenCertifier(smooth).certify(x1, n0=100, n=10_000, alpha=1e-3, indices=[1])[0]
    assert at_x1.prediction == 1 and at_x1.radius > distance  # two certificates that contradict each other


def test_sound_scheme_does_not_certify_the_refuted_claim(points):
    x0, x1 = points
    smooth = classifier(NOISE_SCHEME_SOUND)
    for index, x in enumerate(points):
        assert smooth.counts(x, 20_000, indices=[index])[0, 0] == 0  # the bits trick finds nothing on the grid
    at_x0 = CohenCertifier(smooth).certify(x0, n0=100, n=10_000, alpha=1e-3, indices=[0])[0]
    at_x1 = CohenCertifier(smooth).certify(x1, n0=100, n=10_000, alpha=1e-3, indices=[1])[0]
    assert at_x0.prediction == at_x1.prediction == 1  # no class-0 certificate; both agree
    assert at_x0.radius > float(torch.linalg.vector_norm(x1 - x0))


def test_sound_noisy_pixels_are_a_function_of_the_grid_point():
    """The model sees float32((round(255 x) + j) / 255): for the same integer, the same float."""
    seen = []

    class Spy(nn.Module):
        def forward(self, y):
            seen.append(y.detach().clone())
            return torch.zeros(y.shape[0], 2)

    x = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255.0
    SmoothedClassifier(Spy(), 2, 0.5, device="cpu", batch_size=512, noise_scheme="sound").counts(x, 300)
    y = torch.cat(seen).flatten()
    levels = torch.round(y * 255)
    assert torch.equal(levels / 255, y)  # every input pixel is float32(m / 255) for an integer m
    assert float(levels.abs().max()) > 255  # noise of sigma = 0.5 leaves [0, 1]: nothing is clipped
    counts = np.bincount((levels - levels.min()).long().numpy())
    assert counts.max() < 0.01 * y.numel()  # a spread law, not a few values
