"""The bound methods offered and the models the deterministic certifier can read."""

from __future__ import annotations

METHODS = ("ibp", "crown")
SUPPORTED = (
    "supported: a straight chain of Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d "
    "(uniform), BatchNorm1d/2d (eval), Flatten/view/reshape, Identity, Dropout, Normalize (mean/std)"
)
