"""DeterministicCertifier returns one Certificate per input (method ibp/crown, no samples, p_lower
nan), abstains where nothing is certified, validates its inputs with typed errors, and gives the
same answer on CUDA as on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from surrogate_cert.core.certificate import Certificate
from surrogate_cert.core.deterministic import (
    DeterministicCertifier,
    certified_radius,
    interval_bounds,
    margin_lower_bounds,
)
from surrogate_cert.core.errors import InvalidInputError, InvalidParameterError, ModelError


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()


X = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certificates_match_certified_radius(method):
    model = small_net()
    certs = DeterministicCertifier(model, method, batch_size=2).certify(X)
    pred, radii = certified_radius(model, X, method)
    assert len(certs) == 5 and all(isinstance(c, Certificate) for c in certs)
    for c, p, r in zip(certs, pred, radii):
        assert c.n_samples == 0 and math.isnan(c.p_lower) and c.seconds >= 0
        if r > 0:
            # (float rounding differs with the batch composition: equal to the bisection tolerance)
            assert (c.prediction, c.radius, c.method) == (int(p), pytest.approx(float(r), abs=1e-3), method)
        else:
            assert c.abstained and c.radius == 0.0 and c.method == "abstain"


def test_tie_at_the_input_abstains():
    """Two equal top logits: no ball is certified, the certificate is the abstention."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 1.0, 0.0]))
    (cert,) = DeterministicCertifier(model, "crown").certify(X[:1])
    assert cert.abstained and cert.prediction == -1 and cert.radius == 0.0
    _, radii = certified_radius(model, X[:1], "ibp")
    assert radii[0] == 0.0


def test_constant_model_is_certified_up_to_max_radius():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([2.0, 1.0, 0.0]))
    pred, radii = certified_radius(model, X[:2], "crown")
    assert (pred == 0).all() and np.allclose(radii, 8.0)  # sqrt(64): the whole pixel cube
    _, radii = certified_radius(model, X[:2], "crown", max_radius=3.0)
    assert np.allclose(radii, 3.0)


def test_bad_inputs_raise_typed_errors():
    model = small_net()
    with pytest.raises(InvalidInputError):
        certified_radius(model, X * 2)  # pixels outside [0, 1]
    with pytest.raises(InvalidInputError):
        interval_bounds(model, X.numpy(), 0.1)
    with pytest.raises(InvalidInputError):
        interval_bounds(model, torch.full((1, 1, 8, 8), float("nan")), 0.1)
    with pytest.raises(InvalidParameterError):
        interval_bounds(model, X, 0.1, method="deeppoly")
    with pytest.raises(InvalidParameterError):
        interval_bounds(model, X, -0.1)
    with pytest.raises(InvalidParameterError):
        interval_bounds(model, X, [0.1, 0.2])  # one radius per input, or one for all
    with pytest.raises(InvalidParameterError):
        margin_lower_bounds(model, X, 0.1, target=[0, 1, 2, 3, 7])
    with pytest.raises(InvalidParameterError):
        certified_radius(model, X, tol=0)
    with pytest.raises(InvalidParameterError):
        DeterministicCertifier(model, "crown", iterations=0)
    with pytest.raises(ModelError):
        DeterministicCertifier(lambda x: x)


def test_empty_batch():
    model = small_net()
    assert DeterministicCertifier(model).certify(X[:0]) == []
    lower, upper = interval_bounds(model, X[:0], 0.1)
    assert lower.shape == (0, 3) and upper.shape == (0, 3)


def test_target_class_margins():
    """Margins of a chosen class: the columns of other classes, +inf at the target."""
    model = small_net()
    pred, _ = margin_lower_bounds(model, X, 0.0)
    other = (pred + 1) % 3
    classes, lb = margin_lower_bounds(model, X, 0.0, "crown", target=other, dtype=torch.float64)
    with torch.no_grad():
        z = model.double()(X.double()).numpy()
    assert (classes == other).all()
    for i in range(5):
        for j in range(3):
            expected = math.inf if j == other[i] else z[i, other[i]] - z[i, j]
            assert lb[i, j] == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = small_net()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for method in ("ibp", "crown"):
        cpu = certified_radius(model, x, method)
        gpu = certified_radius(model.cuda(), x.cuda(), method)
        model.cpu()
        assert (cpu[0] == gpu[0]).all()
        assert np.allclose(cpu[1], gpu[1], atol=2e-3)
