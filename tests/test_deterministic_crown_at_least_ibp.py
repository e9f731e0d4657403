"""CROWN's radii are at least IBP's, its bounds are tighter on deeper nets, and its speed-ups
(forward-mode pruning, bounds reused across the bisection, the max-pool rewrite) change nothing
that matters: the layer chain CROWN bounds computes exactly the model's function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import surrogate_cert.core.deterministic as det
from surrogate_cert.core.deterministic import certified_radius, interval_bounds, margin_lower_bounds, read_network


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 40),
        nn.ReLU(),
        nn.Linear(40, 30),
        nn.ReLU(),
        nn.Linear(30, 20),
        nn.ReLU(),
        nn.Linear(20, 6),
    ).eval()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def images(n, seed):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [mlp, cnn])
def test_crown_radius_at_least_ibp(make):
    model = make()
    x = images(10, seed=1)
    tol = 1e-3
    pred_c, crown = certified_radius(model, x, "crown", tol=tol)
    pred_i, ibp = certified_radius(model, x, "ibp", tol=tol)
    assert (pred_c == pred_i).all()
    assert (crown >= ibp - tol * np.maximum(1, ibp)).all(), (crown, ibp)
    assert crown.mean() > 1.5 * ibp.mean()  # CROWN is much tighter on these deeper nets


@pytest.mark.parametrize("make", [mlp, cnn])
def test_crown_bounds_tighter_than_ibp(make):
    model = make()
    x = images(6, seed=2)
    r = 0.05
    lo_c, hi_c = interval_bounds(model, x, r, "crown")
    lo_i, hi_i = interval_bounds(model, x, r, "ibp")
    assert (lo_c >= lo_i - 1e-6).all() and (hi_c <= hi_i + 1e-6).all()  # CROWN is intersected with IBP
    assert (hi_c - lo_c).mean() < 0.8 * (hi_i - lo_i).mean()
    _, m_c = margin_lower_bounds(model, x, r, "crown")
    _, m_i = margin_lower_bounds(model, x, r, "ibp")
    finite = np.isfinite(m_c)
    assert (m_c[finite] >= m_i[finite] - 1e-6).all()


def test_speedups_do_not_change_soundness(monkeypatch):
    """Forward-mode pruning and CROWN bounds of the max-pool differences only tighten (on these
    seeded inputs: CROWN's bound is not monotone in its intermediate bounds in general), and every
    variant stays below the margins of points sampled in the ball."""
    model = cnn(seed=3)
    x = images(4, seed=4)
    r = np.array([0.02, 0.05, 0.1, 0.2])
    gen = torch.Generator().manual_seed(7)
    direction = torch.randn(4, 1000, 64, generator=gen, dtype=torch.float64)
    pts = x.double().reshape(4, 1, 64) + torch.as_tensor(r).reshape(4, 1, 1) * direction / direction.norm(
        dim=2, keepdim=True
    )
    with torch.no_grad():
        z = model.double()(pts.reshape(-1, 1, 8, 8)).reshape(4, 1000, -1).numpy()
        model.float()
    _, full = margin_lower_bounds(model, x, r, "crown", dtype=torch.float64)
    monkeypatch.setattr(det, "FORWARD_MODE", False)
    _, no_forward = margin_lower_bounds(model, x, r, "crown", dtype=torch.float64)
    monkeypatch.setattr(det, "REFINE_MAXPOOL", False)
    pred, plain = margin_lower_bounds(model, x, r, "crown", dtype=torch.float64)
    finite = np.isfinite(full)
    sampled = z[np.arange(4), :, pred][:, :, None] - z  # 4 x 1000 x K
    for bound in (full, no_forward, plain):
        assert (sampled.min(1)[finite] >= bound[finite] - 1e-9).all()
    # forward-mode bounds are intersected with CROWN's own: equal or tighter
    assert (full[finite] >= no_forward[finite] - 1e-9).all()
    # refining the max-pool differences with CROWN is tighter than interval bounds for them
    assert (no_forward[finite] >= plain[finite] - 1e-9).all()


def test_network_reproduces_model_and_maxpool_rewrite():
    """The read layer chain (and its CROWN form, with max pooling as a ReLU tournament) computes the
    model's function on fresh inputs, including overlapping, padded and dilated max pooling."""
    torch.manual_seed(5)
    pools = [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(3, stride=1, dilation=2),
        nn.MaxPool2d(2, stride=2, ceil_mode=True),
    ]
    for pool in pools:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), pool, nn.Flatten()).eval()
        with torch.no_grad():
            n_out = model(torch.zeros(1, 2, 9, 9)).shape[1]
        model = nn.Sequential(*model, nn.Linear(n_out, 3)).eval()
        net = read_network(model, (2, 9, 9), dtype=torch.float64)
        x = torch.rand(16, 2, 9, 9, generator=torch.Generator().manual_seed(6)).double()
        with torch.no_grad():
            expected = model.double()(x)
        assert torch.allclose(net.forward(x), expected, atol=1e-12), pool
        assert torch.allclose(net.forward(x, crown=True), expected, atol=1e-12), pool
        lo, hi = interval_bounds(model.float(), x.float(), 0.3, "crown", dtype=torch.float64)
        assert (lo <= expected.numpy() + 1e-9).all() and (hi >= expected.numpy() - 1e-9).all()


def test_sparse_rows_equal_dense_rows(monkeypatch):
    """Intermediate-bound rows kept sparse through ReLUs, max-pool gathers (overlapping windows give
    repeated indices) and tournaments give the same bounds as plain one-hot rows and backward passes."""
    torch.manual_seed(8)
    overlapping = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()
    x = images(4, seed=9)
    r = np.array([0.05, 0.1, 0.2, 0.4])
    for model in (cnn(seed=10), overlapping):
        _, sparse = margin_lower_bounds(model, x, r, "crown", dtype=torch.float64)
        with monkeypatch.context() as patch:
            patch.setattr(det, "SPARSE_ENTRIES", 0)
            _, dense = margin_lower_bounds(model, x, r, "crown", dtype=torch.float64)
        assert np.allclose(sparse, dense, rtol=1e-9, atol=1e-9)
