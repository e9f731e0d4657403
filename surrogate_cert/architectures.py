"""Network architectures shared by base models and surrogates, built from (input shape, classes).

A checkpoint stores ``arch`` (a name here) and ``input_shape`` / ``num_classes``, never pickled code,
so every model file loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ModelError


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and an MLP head; any C x H x W input, any class count.

    Sized so a forward pass dominates the noise generation of the counting engine on small images.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if min(h, w) >= 8 else nn.Identity(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 4)) if min(h, w) >= 4 else nn.Identity(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet18(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stem for small (CIFAR-sized) images."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


ARCHITECTURES = {
    "small_cnn": SmallCNN,
    "resnet18": _resnet18,
}


def default_arch(input_shape: Sequence[int]) -> str:
    """``small_cnn`` for small inputs (up to 16 x 16 pixels), ``resnet18`` above."""
    return "small_cnn" if max(input_shape[1:]) <= 16 else "resnet18"


def build(arch: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate architecture ``arch`` for ``input_shape`` (C, H, W) and ``num_classes`` outputs."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if len(input_shape) != 3:
        raise ModelError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return ARCHITECTURES[arch](tuple(int(v) for v in input_shape), int(num_classes))
