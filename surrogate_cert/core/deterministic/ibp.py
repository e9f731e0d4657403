"""Interval bound propagation (IBP): boxes pushed through the layers, the first affine layer exact on the ball."""

from __future__ import annotations

import torch

from .layers import _Layer, _Linear
from .network import _Network
from .sets import _center_radius, _Set


def _ibp_output(net: _Network, x0: torch.Tensor, radius: torch.Tensor) -> tuple[_Set, _Set | None]:
    """IBP through every layer; returns the output set and the set before the last layer."""
    s = _Set(center=x0, scale=torch.ones(1, *net.in_shape, dtype=x0.dtype, device=x0.device), radius=radius)
    before = s
    for layer in net.layers:
        before = s
        s = layer.propagate(s)
    return s, before


def _ibp_margins(net: _Network, x0, radius, spec) -> torch.Tensor:
    """Lower bounds of ``spec @ z`` by IBP (see :func:`_spec_bound`)."""
    out, before = _ibp_output(net, x0, radius)
    return _spec_bound(net.layers[-1] if net.layers else None, out, before, spec, radius)


def _spec_bound(last: _Layer | None, out: _Set, before: _Set, spec, radius) -> torch.Tensor:
    """Lower bounds of ``spec @ z`` from interval sets: ``spec`` is merged into the last Linear layer
    (Gowal et al.'s elision of the last layer) when the network ends with one on flat features, so
    the box before it is used once; otherwise the output box ``out`` is used."""
    if isinstance(last, _Linear) and len(last.in_shape) == 1:
        weight = spec @ last.weight  # N x S x D
        bias = spec @ last.bias
        if before.is_ball:
            center = torch.einsum("nsd,nd->ns", weight, before.center) + bias
            norm = torch.einsum("nsd,d->ns", weight.square(), before.scale.reshape(-1).square()).sqrt()
            return center - radius.unsqueeze(1) * norm
        c, r = _center_radius(*before.box())
        return torch.einsum("nsd,nd->ns", weight, c) + bias - torch.einsum("nsd,nd->ns", weight.abs(), r)
    lo, hi = out.box()
    c, r = _center_radius(lo, hi)
    return torch.einsum("nsk,nk->ns", spec, c) - torch.einsum("nsk,nk->ns", spec.abs(), r)
