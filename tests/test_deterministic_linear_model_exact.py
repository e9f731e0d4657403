"""On a linear classifier the deterministic radius is the exact distance to the decision boundary.

For ``z = W x + b`` the largest l2 ball around ``x`` on which ``argmax z`` stays ``c`` has radius
``min_j (z_c - z_j) / ||w_c - w_j||_2``. CROWN bounds each margin ``(w_c - w_j).x + b_c - b_j``
directly, so its radius equals it to the bisection tolerance (and never exceeds it). IBP merges the
margin specification into the last (here: only) Linear layer and uses the exact l2 dual norm on the
first affine layer, so it is exact on a linear model too (without that merge it would subtract two
logit intervals and lose up to a factor ||w_c|| + ||w_j|| over ||w_c - w_j||).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import Normalize

from surrogate_cert.core.deterministic import certified_radius, interval_bounds, margin_lower_bounds


def linear_model(d_shape=(1, 8, 8), k=4, seed=0, normalize=None):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(int(np.prod(d_shape)), k)]
    if normalize is not None:
        layers.insert(0, Normalize(*normalize))
    return nn.Sequential(*layers).eval()


def exact_radius(model, x):
    """min over j of (z_c - z_j) / ||w_c - w_j||, with the normalisation folded into the weights."""
    lin = model[-1]
    w = lin.weight.detach().double()
    if isinstance(model[0], Normalize):
        std = torch.tensor(model[0].std, dtype=torch.float64)
        w = w / std.repeat_interleave(w.shape[1] // len(std))
    with torch.no_grad():
        z = model.double()(x.double())
        model.float()
    c = z.argmax(1)
    radius = []
    for i in range(len(x)):
        ratios = [float((z[i, c[i]] - z[i, j]) / (w[c[i]] - w[j]).norm()) for j in range(z.shape[1]) if j != c[i]]
        radius.append(min(ratios))
    return c.numpy(), np.array(radius)


@pytest.mark.parametrize("normalize", [None, ([0.5], [0.25])])
@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_radius_equals_distance_to_boundary(method, normalize):
    model = linear_model(normalize=normalize)
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tol = 1e-3
    pred, radii = certified_radius(model, x, method, tol=tol)
    c, exact = exact_radius(model, x)
    assert (pred == c).all()
    assert (radii <= exact * (1 + 1e-6)).all(), (radii, exact)  # sound
    assert (exact - radii <= tol * np.maximum(1.0, radii) + 1e-9).all(), (radii, exact)  # tight


def test_margin_bounds_are_exact_minimum_over_ball():
    """Each margin bound equals the exact minimum (z_c - z_j)(x0) - r ||w_c - w_j||, for both methods."""
    model = linear_model(k=5, seed=2)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    r = np.linspace(0.0, 2.0, 6)
    w = model[-1].weight.detach().double()
    with torch.no_grad():
        z = model.double()(x.double()).numpy()
        model.float()
    for method in ("crown", "ibp"):
        pred, lb = margin_lower_bounds(model, x, r, method, dtype=torch.float64)
        for i in range(6):
            for j in range(5):
                if j == pred[i]:
                    continue
                expected = z[i, pred[i]] - z[i, j] - r[i] * float((w[pred[i]] - w[j]).norm())
                assert lb[i, j] == pytest.approx(expected, abs=1e-9)


def test_logit_bounds_use_row_dual_norms():
    """On a linear model both methods give z_k(x0) -+ r ||w_k||_2 exactly (the l2 dual norm)."""
    model = linear_model(k=3, seed=4)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    r = np.array([0.0, 0.1, 0.5, 3.0])
    norms = model[-1].weight.detach().double().norm(dim=1).numpy()
    with torch.no_grad():
        z = model.double()(x.double()).numpy()
        model.float()
    for method in ("crown", "ibp"):
        lower, upper = interval_bounds(model, x, r, method, dtype=torch.float64)
        assert np.allclose(lower, z - r[:, None] * norms, atol=1e-9)
        assert np.allclose(upper, z + r[:, None] * norms, atol=1e-9)
