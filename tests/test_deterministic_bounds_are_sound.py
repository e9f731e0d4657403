"""IBP and CROWN bounds hold on every point of the l2 ball, and certified radii resist an l2 attack.

Random small networks (an MLP with BatchNorm1d; CNNs with Normalize, BatchNorm2d, strided/dilated
and grouped convolutions, overlapping and non-overlapping max pooling, average pooling and an
adaptive average pooling) on 1 x 8 x 8 images:

- thousands of points sampled inside and on the surface of each ball give logits inside the
  interval bounds and margins above the margin lower bounds, for IBP and CROWN;
- a projected-gradient l2 attack (many restarts) never finds a smaller margin than the certified
  lower bound, and never changes the prediction inside the certified radius; teeth: the same attack
  does change most predictions at a few times the certified radius, so it is not toothless.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import Normalize

from surrogate_cert.core.architectures import build
from surrogate_cert.core.deterministic import (
    DeterministicCertifier,
    certified_radius,
    interval_bounds,
    margin_lower_bounds,
)


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 5),
    )
    _randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def make_cnn(seed: int = 0) -> nn.Module:
    """Normalize, conv, BN, ReLU, 2x2 max pool, conv, ReLU, average pool, dense head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.45], [0.3]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    _randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


class Scale(nn.Module):
    """A user's own normalisation module (recognised by its ``mean`` / ``std`` attributes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]).reshape(1, 1, 1))
        self.register_buffer("std", torch.tensor([0.2]).reshape(1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Odd(nn.Module):
    """Strided, dilated and grouped convolutions, overlapping padded max pooling, adaptive pooling."""

    def __init__(self):
        super().__init__()
        self.norm = Scale()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=1, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.adapt = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(self.norm(x)))
        x = self.pool(x)
        x = self.adapt(self.conv2(x).relu())
        return self.fc(x.view(x.size(0), -1))


def make_odd(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Odd().eval()


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "odd": make_odd}


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def ball_points(x: torch.Tensor, radius: np.ndarray, per_input: int, seed: int) -> torch.Tensor:
    """Points uniform in each ball, half of them exactly on its surface: N x per_input x C x H x W."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape[0], x[0].numel()
    direction = torch.randn(n, per_input, d, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=2, keepdim=True)
    scale = torch.rand(n, per_input, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
    scale[:, per_input // 2 :] = 1.0
    r = torch.as_tensor(radius, dtype=torch.float64).reshape(n, 1, 1)
    points = x.double().reshape(n, 1, d) + r * scale * direction
    return points.reshape(n, per_input, *x.shape[1:])


def pgd_min_margin(
    model: nn.Module, x: torch.Tensor, pred: torch.Tensor, radius: torch.Tensor, restarts: int = 16, steps: int = 40
) -> torch.Tensor:
    """Smallest margin z_pred - max_{j != pred} z_j found by an l2 PGD attack (projected steps of
    2.5 r / steps along the normalised gradient, random starts in the ball), per input."""
    n, d = x.shape[0], x[0].numel()
    gen = torch.Generator().manual_seed(123)
    xr = x.double().repeat(restarts, 1, 1, 1)
    pr = pred.repeat(restarts)
    rr = radius.double().repeat(restarts).reshape(-1, 1)
    model = model.double()
    delta = torch.randn(xr.shape[0], d, generator=gen, dtype=torch.float64)
    delta = (
        delta / delta.norm(dim=1, keepdim=True) * rr * torch.rand(xr.shape[0], 1, generator=gen, dtype=torch.float64)
    )
    best = torch.full((xr.shape[0],), math.inf, dtype=torch.float64)
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        z = model(xr + delta.reshape(xr.shape))
        other = z.clone()
        other[torch.arange(len(pr)), pr] = -math.inf
        margin = z[torch.arange(len(pr)), pr] - other.max(1).values
        best = torch.minimum(best, margin.detach())
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            step = grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
            delta = delta.detach() - 2.5 * rr / steps * step
            norm = delta.norm(dim=1, keepdim=True)
            delta = delta * torch.clamp(rr / norm.clamp(min=1e-12), max=1.0)
    model.float()
    return best.reshape(restarts, n).min(0).values


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_interval_bounds_contain_sampled_outputs(name, method):
    model = MODELS[name]()
    x = inputs(6, seed=1)
    radius = np.array([0.0, 0.02, 0.05, 0.1, 0.3, 1.0])
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        lower, upper = interval_bounds(model, x, radius, method, dtype=dtype)
        pts = ball_points(x, radius, 2000, seed=2)
        with torch.no_grad():
            z = model.double()(pts.reshape(-1, *x.shape[1:])).reshape(6, 2000, -1).numpy()
            model.float()
        scale = tol * (1 + np.abs(z).max())
        assert (z >= lower[:, None, :] - scale).all(), (name, method, dtype)
        assert (z <= upper[:, None, :] + scale).all(), (name, method, dtype)
        assert (lower <= upper).all()
    # at radius 0 the (float64) bounds are the logits themselves
    with torch.no_grad():
        z0 = model.double()(x.double()).numpy()
        model.float()
    assert np.allclose(lower[0], z0[0], atol=1e-9) and np.allclose(upper[0], z0[0], atol=1e-9)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_margin_bounds_below_sampled_margins(name, method):
    model = MODELS[name]()
    x = inputs(5, seed=3)
    radius = np.array([0.01, 0.03, 0.1, 0.2, 0.5])
    pred, lb = margin_lower_bounds(model, x, radius, method, dtype=torch.float64)
    pts = ball_points(x, radius, 2000, seed=4)
    with torch.no_grad():
        z = model.double()(pts.reshape(-1, *x.shape[1:])).reshape(5, 2000, -1).numpy()
        model.float()
    margins = z[np.arange(5), :, pred][:, :, None] - z  # N x points x K; column pred is 0
    assert np.isinf(lb[np.arange(5), pred]).all()
    lb_finite = np.where(np.isinf(lb), -np.inf, lb)
    assert (margins >= lb_finite[:, None, :] - 1e-9).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_attack_finds_no_margin_below_the_bound(name):
    """PGD minimises the margin over the ball; the certified lower bound must stay below it."""
    model = MODELS[name]()
    x = inputs(8, seed=5)
    pred, radii = certified_radius(model, x, "crown")
    assert (radii > 0).sum() >= 6, radii
    torch_pred = torch.as_tensor(pred)
    found = pgd_min_margin(model, x, torch_pred, torch.as_tensor(radii))
    assert (found[radii > 0] > 0).all(), (radii, found)
    for method in ("ibp", "crown"):
        _, lb = margin_lower_bounds(model, x, radii, method, dtype=torch.float64)
        assert (found.numpy() >= lb.min(1) - 1e-9).all()
    # teeth: the attack beats random sampling of the same balls ...
    pts = ball_points(x, radii, 2000, seed=8)
    with torch.no_grad():
        z = model.double()(pts.reshape(-1, *x.shape[1:])).reshape(8, 2000, -1)
        model.float()
    top = z[torch.arange(8), :, torch_pred]
    sampled = (
        (top.unsqueeze(2) - z)
        .masked_fill(nn.functional.one_hot(torch_pred, z.shape[2]).bool().unsqueeze(1), math.inf)
        .amin((1, 2))
    )
    assert (found <= sampled + 1e-9).all()
    # ... and flips most predictions at three times the certified radius (where the random network
    # is not nearly constant there: the CNN's BatchNorm shifts make it flat far beyond its radius)
    if name != "cnn":
        big = pgd_min_margin(model, x, torch_pred, torch.as_tensor(3 * radii))
        assert (big[radii > 0] < 0).double().mean() >= 0.5, (radii, big)


def test_certified_radius_itself_certifies():
    """A fresh margin bound at the returned radius proves it here (in general the search's own proof
    may also use ReLU bounds of larger balls, see ``certified_radius``)."""
    model = make_cnn()
    x = inputs(8, seed=6)
    for method in ("ibp", "crown"):
        pred, radii = certified_radius(model, x, method)
        ok = radii > 0
        assert ok.sum() >= 4
        for dtype in (torch.float32, torch.float64):
            _, lb = margin_lower_bounds(model, x[ok], radii[ok], method, dtype=dtype)
            assert (lb.min(1) > 0).all(), (method, dtype, lb.min(1))


def test_small_cnn_end_to_end_resists_attack():
    """The built-in SmallCNN (random weights, digits shape) certifies with both methods; PGD at the
    certified radius never changes the prediction."""
    torch.manual_seed(0)
    model = build("small_cnn", (1, 8, 8), 10).eval()
    x = inputs(2, seed=7)
    certs = {m: DeterministicCertifier(model, m, tol=1e-2).certify(x) for m in ("ibp", "crown")}
    with torch.no_grad():
        pred = model(x).argmax(1)
    crown_r = np.array([c.radius for c in certs["crown"]])
    ibp_r = np.array([c.radius for c in certs["ibp"]])
    assert (crown_r > 0).all()
    assert (crown_r >= ibp_r - 1e-2).all()
    assert all(c.prediction == int(p) for c, p in zip(certs["crown"], pred))
    found = pgd_min_margin(model, x, pred, torch.as_tensor(crown_r), restarts=8, steps=25)
    assert (found > 0).all(), (crown_r, found)


def random_architecture(seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """A random chain: optional Normalize, 1-2 conv blocks (random stride, padding, dilation, groups,
    BatchNorm, max or average pooling), a dense head."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    c, h = int(rng.choice([1, 2])), int(rng.choice([7, 8, 9]))
    layers: list[nn.Module] = []
    if rng.random() < 0.5:
        layers.append(Normalize([0.4] * c, [float(rng.uniform(0.2, 1.0))] * c))
    shape = (c, h, h)
    for _ in range(int(rng.choice([1, 2]))):
        out = int(rng.choice([2, 4]))
        groups = 2 if shape[0] % 2 == 0 and rng.random() < 0.4 else 1
        conv = nn.Conv2d(
            shape[0],
            out,
            int(rng.choice([2, 3])),
            stride=int(rng.choice([1, 2])),
            padding=int(rng.choice([0, 1])),
            dilation=int(rng.choice([1, 2])),
            groups=groups,
        )
        candidate = [conv, nn.BatchNorm2d(out), nn.ReLU()]
        candidate.append([nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.Identity()][int(rng.integers(4))])
        try:
            size = nn.Sequential(*layers, *candidate).eval()(torch.zeros(1, c, h, h)).shape[1:]
        except RuntimeError:
            continue
        layers += candidate
        shape = tuple(size)
    _randomise_batchnorm(nn.Sequential(*layers), torch.Generator().manual_seed(seed))
    n = int(np.prod(shape))
    layers += [nn.Flatten(), nn.Linear(n, 10), nn.ReLU(), nn.Linear(10, int(rng.choice([2, 3, 5])))]
    return nn.Sequential(*layers).eval(), (c, h, h)


@pytest.mark.parametrize("seed", range(8))
def test_random_architectures_are_sound(seed):
    """Both methods' logit and margin bounds contain every sampled point of the ball, CROWN's radius
    is at least IBP's, and an attack at the CROWN radius changes no prediction."""
    model, shape = random_architecture(seed)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(seed))
    radius = np.array([0.03, 0.2, 1.0])
    pts = ball_points(x, radius, 1000, seed=seed)
    with torch.no_grad():
        z = model.double()(pts.reshape(-1, *shape)).reshape(3, 1000, -1).numpy()
        model.float()
    for method in ("ibp", "crown"):
        lower, upper = interval_bounds(model, x, radius, method, dtype=torch.float64)
        assert (z >= lower[:, None] - 1e-9).all() and (z <= upper[:, None] + 1e-9).all(), method
        pred, lb = margin_lower_bounds(model, x, radius, method, dtype=torch.float64)
        margins = z[np.arange(3), :, pred][:, :, None] - z
        finite = np.isfinite(lb)
        assert (margins.min(1)[finite] >= lb[finite] - 1e-9).all(), method
    pred, crown = certified_radius(model, x, "crown")
    _, ibp = certified_radius(model, x, "ibp")
    assert (crown >= ibp - 1e-3 * np.maximum(1, ibp)).all(), (crown, ibp)
    found = pgd_min_margin(model, x, torch.as_tensor(pred), torch.as_tensor(crown), restarts=8, steps=25)
    assert (found[crown > 0] > 0).all()
