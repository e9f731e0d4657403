"""Which models the deterministic certifier reads, and the one-line ModelError for the rest.

Supported: straight chains found by torch.fx (nested Sequential, custom forward calling submodules
in order, functional relu, view/flatten with x.size(0)), normalisation modules recognised by their
``mean`` / ``std`` attributes. Rejected with a message that names the layer or operation: residual
adds, unsupported activations, torchvision ResNet, TorchScript, non-uniform adaptive pooling,
training-mode BatchNorm, modules with mean/std that do not normalise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import Normalize

from surrogate_cert.core.deterministic import certified_radius, interval_bounds, read_network
from surrogate_cert.core.errors import InvalidInputError, ModelError

X = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc((x + self.conv(x)).flatten(1))


class Functional(nn.Module):
    """Custom forward: functional relu, ``view(x.size(0), -1)``, a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Identity())
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        x = F.relu(self.body(x))
        return self.fc(x.view(x.size(0), -1))


class MyNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


class FakeNormalize(MyNormalize):
    def forward(self, x):  # has mean/std, but computes something else
        return x * self.std + self.mean


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_residual_add_is_rejected_by_name():
    with pytest.raises(ModelError) as exc:
        read_network(Residual().eval(), (1, 8, 8))
    message = one_line(exc)
    assert "'add'" in message and "supported:" in message


def test_unsupported_activation_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    with pytest.raises(ModelError) as exc:
        interval_bounds(model, X, 0.1)
    message = one_line(exc)
    assert "GELU" in message and "'2'" in message and "Linear" in message


def test_torchvision_resnet_is_rejected():
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    with pytest.raises(ModelError) as exc:
        read_network(model, (3, 32, 32))
    assert "straight chain" in one_line(exc) or "add" in one_line(exc)


def test_torchscript_is_rejected():
    model = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval())
    with pytest.raises(ModelError) as exc:
        certified_radius(model, X)
    assert "TorchScript" in one_line(exc)


def test_non_uniform_adaptive_pooling_is_rejected():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(), nn.Linear(18, 3)
    ).eval()
    with pytest.raises(ModelError) as exc:
        read_network(model, (1, 8, 8))
    assert "AdaptiveAvgPool2d" in one_line(exc) and "8x8 to 3x3" in one_line(exc)
    # the same layer is fine when it is an exact average pooling (8x8 -> 4x4)
    ok = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(), nn.Linear(32, 3)
    ).eval()
    assert read_network(ok, (1, 8, 8)).num_classes == 3


def test_training_mode_batchnorm_is_rejected():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
    with pytest.raises(ModelError) as exc:
        read_network(model, (1, 8, 8))
    assert "model.eval()" in one_line(exc)


def test_mean_std_module_that_does_not_normalise_is_rejected():
    model = nn.Sequential(FakeNormalize(0.5, 0.2), nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.raises(ModelError) as exc:
        read_network(model, (1, 8, 8))
    assert "does not compute (x - mean) / std" in one_line(exc)


def test_wrong_input_shape_is_an_input_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.raises(InvalidInputError):
        interval_bounds(model, torch.rand(2, 1, 9, 9), 0.1)


@pytest.mark.parametrize(
    "norm",
    [
        Normalize([0.4], [0.3]),
        MyNormalize(0.4, 0.3),
        MyNormalize(torch.tensor([0.4]).reshape(1, 1, 1), torch.tensor(0.3)),
    ],
)
def test_normalisation_modules_are_recognised(norm):
    """torchvision's Normalize and a user's own module with mean/std give the same bounds as
    folding the normalisation into the first layer by hand."""
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()
    model = nn.Sequential(norm, body).eval()
    folded = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()
    folded.load_state_dict(body.state_dict())
    with torch.no_grad():
        folded[0].weight /= 0.3
        folded[0].bias -= 0.4 / 0.3 * body[0].weight.sum((1, 2, 3))
    for method in ("ibp", "crown"):
        a = interval_bounds(model, X, 0.2, method, dtype=torch.float64)
        b = interval_bounds(folded, X, 0.2, method, dtype=torch.float64)
        assert np.allclose(a[0], b[0], atol=1e-5) and np.allclose(a[1], b[1], atol=1e-5)


def test_custom_forward_chain_is_read():
    torch.manual_seed(2)
    model = Functional().eval()
    net = read_network(model, (1, 8, 8))
    assert [layer.name for layer in net.layers] == ["Conv2d", "ReLU", "Reshape", "Linear"]
    pred, radii = certified_radius(model, X, "crown")
    assert (radii > 0).all()
