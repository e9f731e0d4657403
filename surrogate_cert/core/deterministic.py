"""Deterministic l2 certificates: interval bound propagation (IBP) and CROWN on PyTorch models.

Beside the probabilistic certifiers (randomized smoothing), this module bounds the logits of the
*base network itself* over a whole l2 ball, with no sampling and no failure probability:

- IBP (Gowal et al. 2018, "On the effectiveness of interval bound propagation"): push a box through
  the network layer by layer. For an l2 ball the first affine layer is exact per neuron:
  ``w.x0 + b +- r * ||w||_2`` (the l2 dual norm of each row; rows of a convolution are computed
  exactly, zero padding included). Elementwise affine layers before it (normalisation) are folded
  in, so the first box is the tightest box around the image of the ball.
- CROWN (Zhang et al. 2018, "Efficient neural network robustness certification with general
  activation functions"): linear relaxations of every ReLU (the chord above, ``z`` or ``0`` below:
  CROWN-Ada), propagated backwards from a specification matrix ``C`` to the input and concretised
  over the ball as ``lam.x0 + c - r*||lam||_2``. Margins ``z_pred - z_j`` are bounded directly with
  ``C = e_pred - e_j`` (not by subtracting logit intervals). Intermediate (pre-activation) bounds
  come from backward passes too (full CROWN), but only for the neurons that cheaper valid bounds
  cannot already prove stable; all bounds of a neuron are intersected.

CROWN work-savers (none changes what is certified; each only skips work or tightens a bound):
interval bounds and, when the input is smaller than the ReLU layers (small images, wide convs),
forward-mode linear bounds prune the neurons that need backward passes; the rows of those passes
stay sparse (index lists) through elementwise layers, ReLUs and the max-pool tournament and become
dense at the first convolution (built from the kernel, not by a transposed convolution); the
transposed convolution (``conv_transpose2d``) does the rest, batched over inputs and rows in
chunks; a small first convolution is kept as a dense matrix. Convolutions are never converted to
dense matrices otherwise, so large inputs only cost memory in proportion to the rows.

Guarantee (all functions): for every input ``x0`` (a batch row, pixels) and every ``x`` with
``||x - x0||_2 <= r`` (Euclidean norm over all ``C*H*W`` input values, in input units, i.e. pixels
before any normalisation layer of the model), the logits ``z(x)`` of the network *in exact real
arithmetic* satisfy the returned bounds. The ball is not intersected with the pixel cube [0, 1]:
the statement holds for the whole ball, which is stronger.

Numerics. Bounds are computed in float32 by default; floating-point rounding can move a bound by
about 1e-6 of the magnitudes involved, so float32 bounds are exact up to that rounding
(``dtype=torch.float64`` makes it ~1e-15; no directed rounding is used, as in other verifiers).
:func:`certified_radius` searches in float32, where a radius counts as certified only when every
margin bound exceeds ``1e-5 * (1 + |margin|)``, and then re-checks each returned radius in float64
near the boundary, where it matters: the final backward pass is recomputed in float64 from the
float32 intermediate bounds widened outward by 1e-5 of their magnitude (about 100 times float32
rounding), and the radius is cut to the largest one that this float64 bound certifies with a
strict ``> 0``. The model's own float32 evaluation (a flip where the true margin is within ~1e-6
of 0) is outside any such bound.

Supported models: a straight chain (as read by ``torch.fx.symbolic_trace``; nested ``nn.Sequential``
and custom modules whose ``forward`` just calls submodules in order, like
:class:`surrogate_cert.core.architectures.SmallCNN`, are fine) of ``nn.Linear``, ``nn.Conv2d`` (zero
padding, any stride, dilation and groups), ``nn.ReLU`` (also ``F.relu``/``torch.relu``/``x.relu()``),
``nn.MaxPool2d``, ``nn.AvgPool2d`` (``ceil_mode=False``; padding only with
``count_include_pad=True``), ``nn.AdaptiveAvgPool2d`` (only when it is a uniform average pooling for
the input size, e.g. 8x8 -> 4x4), ``nn.BatchNorm1d/2d`` in eval mode (running statistics),
``nn.Flatten`` / ``flatten`` / ``view`` / ``reshape`` (keeping the batch dimension), ``nn.Identity``,
``nn.Dropout*`` (eval mode: identity) and a normalisation layer. Anything else (residual adds,
concatenations, other activations, torchvision ResNets, TorchScript modules) raises
:class:`~surrogate_cert.core.errors.ModelError` naming the first unsupported layer or operation.

Normalisation layers. A module is read as ``(x - mean) / std`` when it has attributes ``mean`` and
``std`` (tensors, buffers, numbers or sequences of numbers), e.g. ``torchvision.transforms.Normalize``
used as a module, or your own ``Normalize(nn.Module)`` with ``self.mean`` / ``self.std`` (the module
is treated as one leaf: its ``forward`` is not traced). A 1-D ``mean``/``std`` is per channel (as in
torchvision: shape ``(C, 1, 1)`` on ``N x C x H x W`` inputs); other shapes broadcast against one
input sample (a leading batch dimension of size 1 is allowed). The reading is checked numerically:
if the module's output differs from ``(x - mean) / std`` on random inputs, ModelError.

Every model is also checked end to end: the layer chain read from it must reproduce ``model(x)``
on random inputs, or ModelError. BatchNorm and Dropout layers must be in eval mode (``model.eval()``).

Max pooling in CROWN is rewritten exactly as linear and ReLU layers, ``max(a, b) = b + relu(a - b)``
applied as a tournament over the pooling window (padding cells are replaced by a copy of a real
cell of the same window), so CROWN bounds the differences ``a - b`` with its own backward passes;
IBP pools the lower and upper bounds directly (max is monotone), which is exact for boxes.

Public API: :func:`interval_bounds`, :func:`margin_lower_bounds`, :func:`certified_radius`,
:class:`DeterministicCertifier` (``certify(x) -> list[Certificate]``).
"""
from __future__ import annotations

import copy
import math
import operator
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .certificate import Certificate, abstention
from .errors import InvalidInputError, InvalidParameterError, ModelError
from .smoothing import check_images, noise_indices

METHODS = ("ibp", "crown")
SUPPORTED = ("supported: a straight chain of Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d "
             "(uniform), BatchNorm1d/2d (eval), Flatten/view/reshape, Identity, Dropout, Normalize (mean/std)")
CHUNK_ELEMENTS = 2 ** 24
"""Largest backward-pass tensor (elements) built at once; rows and inputs are processed in chunks."""
FORWARD_MODE = True
"""Whether CROWN first tightens intermediate boxes with forward-mode linear bounds (where the input
is smaller than the ReLU layers), so that fewer neurons need backward passes. Sound either way."""
FORWARD_MODE_ELEMENTS = 2 ** 26
"""Forward-mode bounds of one input take (1 + input size) x (largest layer) values; above this, none."""
DENSE_FIRST_LAYER = 2 ** 22
"""A first convolution with (input size x output size) up to this many entries is also kept dense."""
SPARSE_ENTRIES = 64
"""Rows of intermediate bounds stay sparse (index, coefficient lists) while they have at most this
many entries; then they are made dense."""
REFINE_MAXPOOL = True
"""Whether CROWN computes its own bounds of the max-pool differences ``a - b`` (tighter, slower)
instead of interval bounds for them. Both are sound."""


# =========================================================================== sets of values
class _Set:
    """A per-input set of activations: an l2 ellipsoid ``{center + scale * d : ||d||_2 <= radius}``
    (``scale`` shared by the batch, shape ``1 x *shape``) or a box ``[lower, upper]``.

    ``exact`` says whether the box is the tightest box of the true image of the input ball (true
    after at most one mixing affine layer, so CROWN need not refine those bounds).
    """

    def __init__(self, *, center=None, scale=None, radius=None, lower=None, upper=None, exact=True):
        self.center, self.scale, self.radius = center, scale, radius
        self.lower, self.upper, self.exact = lower, upper, exact

    @property
    def is_ball(self) -> bool:
        return self.center is not None

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_ball:
            return self.lower, self.upper
        half = _per_input(self.radius, self.center) * self.scale.abs()
        return self.center - half, self.center + half


def _per_input(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-input vector (N,) to broadcast against ``like`` (N x ...)."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _box(lower, upper, exact=False) -> _Set:
    return _Set(lower=lower, upper=upper, exact=exact)


def _center_radius(lower, upper):
    return (lower + upper) / 2, (upper - lower) / 2


def _shift_constant(t: torch.Tensor, shift) -> torch.Tensor:
    """Add a per-sample ``shift`` to the constant slice of a linear-bounds stack (in place)."""
    if shift is not None:
        t[:, 0] += shift
    return t


def _signed(w: torch.Tensor, part):
    return w if part is None else (w.clamp(min=0) if part == "pos" else w.clamp(max=0))


def _coalesce(idx: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse rows (N x S x k) with each index once: duplicates summed into their first entry."""
    same = idx.unsqueeze(-1) == idx.unsqueeze(-2)  # N x S x k x k
    total = (same * coef.unsqueeze(-2)).sum(-1)
    repeated = torch.tril(same, diagonal=-1).any(-1)  # an earlier entry has the same index
    return _compact(idx, torch.where(repeated, torch.zeros_like(total), total))


def _compact(idx: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop zero entries of sparse rows (keeping the width of the fullest row)."""
    nonzero = coef != 0
    width = max(1, int(nonzero.sum(-1).max())) if coef.numel() else 1
    if width == coef.shape[-1]:
        return idx, coef
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :width]
    return idx.gather(-1, order), coef.gather(-1, order)


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension after the first two (N x S x ... -> N x S)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


# =========================================================================== layers
# Each layer maps one input sample of shape ``in_shape`` to ``out_shape`` and has, one method each:
#   forward(x)            the layer itself (N x in -> N x out)
#   interval(lo, hi)      IBP rule for a box
#   ball(set)             the exact rule for an l2 ellipsoid (affine layers only)
#   linear_bounds(lo, hi) forward-mode rule for linear bounds in the input (used to prune CROWN work):
#                         lo, hi are N x (1 + D0) x shape stacks [constant, coefficients of x - x0]
#   backward(lam)         CROWN rule: lam (N x S x out) -> (lam A, lam.b) for the affine map A x + b
#   sparse(idx, coef)     optional: the CROWN rule for sparse rows ``sum_e coef_e e_{idx_e}``, kept
#                         sparse (idx, coef: N x S x k; returns idx, coef and the bias term)
#   rows(idx, coef)       optional: sparse rows times A as dense rows, without one-hot matrices
class _Layer:
    name = "layer"
    mixing = True  # False for elementwise layers and reshapes (they keep an ellipsoid an ellipsoid)

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def to(self, dtype) -> "_Layer":
        new = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(new, key, value.to(dtype))
        return new

    def propagate(self, s: _Set) -> _Set:
        if s.is_ball:
            return self.ball(s)
        lo, hi = self.interval(s.lower, s.upper)
        return _box(lo, hi, exact=s.exact and not self.mixing)

    def ball(self, s: _Set) -> _Set:  # default: through the box (sound, not exact)
        lo, hi = self.interval(*s.box())
        return _box(lo, hi, exact=not self.mixing)

    # affine layers: linear bounds A+ lo + A- hi (+ b on the constant slice), and the reverse
    def linear_bounds(self, lo, hi):
        if lo is hi:  # no ReLU yet: the bounds are one exact linear map
            out = _shift_constant(self.apply(lo, None), self.bias_out())
            return out, out
        new_lo = self.apply(lo, "pos") + self.apply(hi, "neg")
        new_hi = self.apply(hi, "pos") + self.apply(lo, "neg")
        return _shift_constant(new_lo, self.bias_out()), _shift_constant(new_hi, self.bias_out())

    def bias_out(self):
        return None


class _Linear(_Layer):
    """``nn.Linear``: ``x W^T + b`` on the last dimension."""
    name = "Linear"

    def __init__(self, weight, bias, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.weight = weight
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                              device=weight.device)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def interval(self, lo, hi):
        c, r = _center_radius(lo, hi)
        c, r = F.linear(c, self.weight, self.bias), F.linear(r, self.weight.abs())
        return c - r, c + r

    def ball(self, s):
        center = F.linear(s.center, self.weight, self.bias)
        half = _per_input(s.radius, center) * F.linear(s.scale.square(), self.weight.square()).sqrt()
        return _box(center - half, center + half, exact=True)

    def apply(self, t, part):
        return F.linear(t, _signed(self.weight, part))

    def bias_out(self):
        return self.bias

    def backward(self, lam):
        return lam @ self.weight, _flat_sum(lam * self.bias)

    def rows(self, idx, coef):
        if len(self.in_shape) != 1:
            return None  # caller falls back to one-hot rows and backward
        w = self.weight[idx]  # N x S x k x in_features
        lam = (coef.unsqueeze(-1) * w).sum(2)
        return lam, (coef * self.bias[idx]).sum(2)


class _Conv(_Layer):
    """``nn.Conv2d`` with zero padding (also average pooling, as a depthwise convolution)."""
    name = "Conv2d"

    def __init__(self, weight, bias, stride, padding, dilation, groups, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.weight = weight
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                              device=weight.device)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        # conv_transpose2d needs output_padding to land exactly on the input size
        kh, kw = weight.shape[2:]
        self.output_padding = tuple(
            in_shape[1 + i] - ((out_shape[1 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1)
            for i, k in enumerate((kh, kw)))

    def _conv(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, self.weight, self.bias)

    def interval(self, lo, hi):
        c, r = _center_radius(lo, hi)
        c, r = self._conv(c, self.weight, self.bias), self._conv(r, self.weight.abs())
        return c - r, c + r

    def ball(self, s):
        # row norms of the convolution matrix (times the ellipsoid's scale), zero padding included
        center = self._conv(s.center, self.weight, self.bias)
        norms = self._conv(s.scale.expand(1, *self.in_shape).square(), self.weight.square()).sqrt()
        half = _per_input(s.radius, center) * norms
        return _box(center - half, center + half, exact=True)

    def apply(self, t, part):
        n, m = t.shape[:2]
        return self._conv(t.reshape(n * m, *self.in_shape), _signed(self.weight, part)).reshape(n, m, *self.out_shape)

    def bias_out(self):
        return self.bias.reshape(-1, 1, 1)

    def backward(self, lam):
        n, s = lam.shape[:2]
        flat = lam.reshape(n * s, *self.out_shape)
        back = F.conv_transpose2d(flat, self.weight, None, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)
        bias = (lam.reshape(n, s, self.out_shape[0], -1).sum(3) * self.bias).sum(2)
        return back.reshape(n, s, *self.in_shape), bias

    def rows(self, idx, coef):
        n, s, k = idx.shape
        c_in, h, w = self.in_shape
        c_out, h_out, w_out = self.out_shape
        kh, kw = self.weight.shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        groups = self.groups
        flat_idx = idx.reshape(-1)
        o, pos = flat_idx // (h_out * w_out), flat_idx % (h_out * w_out)
        ho, wo = pos // w_out, pos % w_out
        group = o // (c_out // groups)
        extra_h = max(0, (h_out - 1) * sh + (kh - 1) * dh + 1 - (h + 2 * ph))
        extra_w = max(0, (w_out - 1) * sw + (kw - 1) * dw + 1 - (w + 2 * pw))
        # channels last, so that one index_put per kernel tap writes all input channels
        canvas = self.weight.new_zeros(n * s, groups, h + 2 * ph + extra_h, w + 2 * pw + extra_w, c_in // groups)
        rows = torch.arange(n * s, device=idx.device).repeat_interleave(k)
        weights = coef.reshape(-1, 1, 1, 1) * self.weight[o]  # (N S k) x C_in/g x kh x kw
        for a in range(kh):
            for b in range(kw):
                canvas.index_put_((rows, group, ho * sh + a * dh, wo * sw + b * dw), weights[:, :, a, b],
                                  accumulate=True)
        lam = canvas[:, :, ph:ph + h, pw:pw + w].permute(0, 1, 4, 2, 3).reshape(n, s, c_in, h, w)
        return lam, (coef * self.bias[o.reshape(n, s, k)]).sum(2)


class _Elementwise(_Layer):
    """``scale * x + shift`` elementwise: BatchNorm in eval mode and ``(x - mean) / std``."""
    name = "Elementwise"
    mixing = False

    def __init__(self, scale, shift, shape, label):
        super().__init__(shape, shape)
        full = (1, *shape)
        self.scale = scale.expand(full).contiguous()
        self.shift = shift.expand(full).contiguous()
        self.name = label

    def forward(self, x):
        return x * self.scale + self.shift

    def interval(self, lo, hi):
        c, r = _center_radius(lo, hi)
        c, r = c * self.scale + self.shift, r * self.scale.abs()
        return c - r, c + r

    def ball(self, s):
        return _Set(center=self.forward(s.center), scale=s.scale * self.scale, radius=s.radius)

    def apply(self, t, part):
        return t * _signed(self.scale, part)

    def bias_out(self):
        return self.shift[0]

    def backward(self, lam):
        return lam * self.scale, _flat_sum(lam * self.shift)

    def sparse(self, idx, coef):
        flat_scale, flat_shift = self.scale.reshape(-1), self.shift.reshape(-1)
        return idx, coef * flat_scale[idx], (coef * flat_shift[idx]).sum(2)


class _Reshape(_Layer):
    """``flatten`` / ``view`` / ``reshape`` of each sample (the batch dimension stays first)."""
    name = "Reshape"
    mixing = False

    def forward(self, x):
        return x.reshape(x.shape[0], *self.out_shape)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def ball(self, s):
        scale = s.scale.expand(1, *self.in_shape).reshape(1, *self.out_shape)
        return _Set(center=self.forward(s.center), scale=scale, radius=s.radius)

    def linear_bounds(self, lo, hi):
        lo2 = lo.reshape(*lo.shape[:2], *self.out_shape)
        return lo2, (lo2 if hi is lo else hi.reshape(*hi.shape[:2], *self.out_shape))

    def backward(self, lam):
        return lam.reshape(*lam.shape[:2], *self.in_shape), lam.new_zeros(lam.shape[:2])

    def sparse(self, idx, coef):  # flat (C-order) indices do not change under a reshape
        return idx, coef, coef.new_zeros(coef.shape[:2])


class _Gather(_Layer):
    """``y = x.flatten()[index]``: copies input values (the first step of a max-pool tournament).

    With ``windows = (kh, kw)`` the gather is the split of a C x H x W sample into its
    non-overlapping kh x kw windows, (kh*kw) x C x H/kh x W/kw: done by reshape and permute.
    """
    name = "Gather"
    mixing = False  # each output is one input value: a box stays the tightest box

    def __init__(self, index, in_shape, out_shape, windows=None):
        super().__init__(in_shape, out_shape)
        self.index = index  # long tensor, one input position per output value
        self.windows = windows

    def _take(self, t, lead: int):
        """Apply the gather to a tensor with ``lead`` leading (batch) dimensions."""
        head = t.shape[:lead]
        if self.windows is None:
            return t.reshape(*head, -1)[..., self.index].reshape(*head, *self.out_shape)
        (kh, kw), (c, h, w) = self.windows, self.in_shape
        split = t.reshape(*head, c, h // kh, kh, w // kw, kw)
        order = [*range(lead), lead + 2, lead + 4, lead, lead + 1, lead + 3]
        return split.permute(order).reshape(*head, *self.out_shape)

    def forward(self, x):
        return self._take(x, 1)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def ball(self, s):  # copies of one coordinate are correlated: continue with the exact box
        lo, hi = s.box()
        return _box(self.forward(lo), self.forward(hi), exact=True)

    def linear_bounds(self, lo, hi):
        new_lo = self._take(lo, 2)
        return new_lo, (new_lo if hi is lo else self._take(hi, 2))

    def backward(self, lam):
        n, s = lam.shape[:2]
        if self.windows is not None:  # each window cell back to its place (strided copies)
            (kh, kw), (c, h, w) = self.windows, self.in_shape
            tiles = lam.reshape(n, s, kh * kw, c, h // kh, w // kw)
            out = lam.new_empty(n, s, c, h, w)
            for a in range(kh):
                for b in range(kw):
                    out[..., a::kh, b::kw] = tiles[:, :, a * kw + b]
            return out, lam.new_zeros(n, s)
        out = lam.new_zeros(n, s, math.prod(self.in_shape))
        out.index_add_(2, self.index, lam.reshape(n, s, -1))
        return out.reshape(n, s, *self.in_shape), lam.new_zeros(n, s)

    def sparse(self, idx, coef):
        return self.index[idx], coef, coef.new_zeros(coef.shape[:2])


class _Stack(_Layer):
    """A small matrix ``T`` (m' x m) applied along the first axis of each sample (m x ...)."""
    name = "Stack"

    def __init__(self, matrix, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.matrix = matrix

    def forward(self, x):
        return torch.einsum("ij,nj...->ni...", self.matrix, x)

    def interval(self, lo, hi):
        c, r = _center_radius(lo, hi)
        c, r = self.forward(c), torch.einsum("ij,nj...->ni...", self.matrix.abs(), r)
        return c - r, c + r

    def ball(self, s):
        center = self.forward(s.center)
        scale = s.scale.expand(1, *self.in_shape).square()
        half = _per_input(s.radius, center) * torch.einsum("ij,nj...->ni...", self.matrix.square(), scale).sqrt()
        return _box(center - half, center + half, exact=True)

    def apply(self, t, part):
        return torch.einsum("ij,nmj...->nmi...", _signed(self.matrix, part), t)

    def backward(self, lam):
        n, s, m = lam.shape[:3]
        back = torch.matmul(self.matrix.t(), lam.reshape(n * s, m, -1))  # small matrix, broadcast
        return back.reshape(n, s, *self.in_shape), lam.new_zeros(n, s)

    def sparse(self, idx, coef):
        n, s, k = idx.shape
        m, rest = self.in_shape[0], math.prod(self.in_shape[1:])
        i, pos = idx // rest, idx % rest
        new_idx = pos.unsqueeze(-1) + torch.arange(m, device=idx.device) * rest  # N x S x k x m
        new_coef = coef.unsqueeze(-1) * self.matrix[i]
        idx, coef = _compact(new_idx.reshape(n, s, k * m), new_coef.reshape(n, s, k * m))
        return idx, coef, coef.new_zeros(n, s)


class _ReLU(_Layer):
    """ReLU; with a ``mask``, only the masked values pass through a ReLU, the rest pass unchanged."""
    name = "ReLU"
    mixing = False

    def __init__(self, shape, mask=None, refine=True):
        super().__init__(shape, shape)
        self.mask = mask  # bool tensor of the sample shape, or None (all values)
        self.refine = refine  # whether CROWN computes its own bounds of this layer's inputs

    def forward(self, x):
        return x.clamp(min=0) if self.mask is None else torch.where(self.mask, x.clamp(min=0), x)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def propagate(self, s):
        return _box(*self.interval(*s.box()), exact=False)

    def unstable(self, lo, hi):
        out = (lo < 0) & (hi > 0)
        return out if self.mask is None else out & self.mask

    def relaxation(self, lo, hi) -> "_Relaxation":
        """CROWN's linear bounds ``lower_slope * z <= relu(z) <= upper_slope * z + upper_shift``.

        Stable neurons are exact (slope 1 or 0). An unstable neuron (lo < 0 < hi) gets the chord
        ``hi / (hi - lo) * (z - lo)`` above and ``z`` (if hi >= -lo) or ``0`` below (CROWN-Ada).
        """
        unstable = (lo < 0) & (hi > 0)
        if self.mask is not None:
            unstable = unstable & self.mask
        active = (lo >= 0).to(lo.dtype)
        chord = torch.where(unstable, hi / torch.where(unstable, hi - lo, torch.ones_like(hi)), active)
        upper_slope = chord
        upper_shift = torch.where(unstable, -chord * lo, torch.zeros_like(lo))
        lower_slope = torch.where(unstable, (hi >= -lo).to(lo.dtype), active)
        if self.mask is not None:
            one = torch.ones_like(lo)
            upper_slope = torch.where(self.mask, upper_slope, one)
            lower_slope = torch.where(self.mask, lower_slope, one)
            upper_shift = torch.where(self.mask, upper_shift, torch.zeros_like(lo))
        return _Relaxation(lower_slope, upper_slope, upper_shift, unstable)

    def linear_bounds(self, lo, hi, relaxation):
        """Forward-mode rule: ``relu(z) >= lower_slope * L(x)``, ``<= upper_slope * U(x) + upper_shift``
        (both slopes are >= 0, so the linear bounds ``L <= z <= U`` of the input carry over)."""
        new_lo = lo * relaxation.lower_slope.unsqueeze(1)
        new_hi = _shift_constant(hi * relaxation.upper_slope.unsqueeze(1), relaxation.upper_shift)
        return new_lo, new_hi

    def sparse(self, idx, coef, relaxation: "_Relaxation"):
        """The CROWN rule below for sparse rows (the entries of a row must have distinct indices)."""
        n, s, k = idx.shape
        flat_idx = idx.reshape(n, -1)

        def at(t):
            return t.reshape(n, -1).gather(1, flat_idx).reshape(n, s, k)

        pos = coef.clamp(min=0)
        neg = coef - pos
        new = pos * at(relaxation.lower_slope) + neg * at(relaxation.upper_slope)
        return idx, new, (neg * at(relaxation.upper_shift)).sum(2)

    def backward(self, lam, relaxation: "_Relaxation"):
        """CROWN rule: ``lam.relu(z) >= lam+ * lower_slope * z + lam- * (upper_slope * z + upper_shift)``.

        Stable neurons have one slope; the sign of ``lam`` matters only at the unstable ones, which
        are gathered (a short list per input) instead of touching the whole tensor again.
        """
        n, s = lam.shape[:2]
        flat = lam.reshape(n, s, -1)
        out = flat * relaxation.stable_slope.unsqueeze(1)
        bias = flat.new_zeros(n, s)
        if relaxation.index.shape[1]:
            idx = relaxation.index.unsqueeze(1).expand(n, s, -1)
            values = flat.gather(2, idx)
            pos = values.clamp(min=0)
            neg = values - pos
            out.scatter_add_(2, idx, pos * relaxation.lower_u.unsqueeze(1) + neg * relaxation.upper_u.unsqueeze(1))
            bias = (neg * relaxation.shift_u.unsqueeze(1)).sum(2)
        return out.reshape(lam.shape), bias


class _Relaxation:
    """The linear bounds of one ReLU layer for a batch (full tensors N x shape), plus the unstable
    neurons of each input as a padded list (``index`` N x U; padding has zero slopes and shift)."""

    def __init__(self, lower_slope, upper_slope, upper_shift, unstable):
        self.lower_slope, self.upper_slope, self.upper_shift = lower_slope, upper_slope, upper_shift
        n = lower_slope.shape[0]
        flat = unstable.reshape(n, -1)
        counts = flat.sum(1)
        width = int(counts.max()) if n else 0
        self.stable_slope = torch.where(flat, torch.zeros_like(upper_slope.reshape(n, -1)), upper_slope.reshape(n, -1))
        self.index = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = (torch.arange(width, device=flat.device).unsqueeze(0) < counts.unsqueeze(1)).to(lower_slope.dtype)
        self.lower_u = lower_slope.reshape(n, -1).gather(1, self.index) * valid
        self.upper_u = upper_slope.reshape(n, -1).gather(1, self.index) * valid
        self.shift_u = upper_shift.reshape(n, -1).gather(1, self.index) * valid

    def __getitem__(self, batch: slice) -> "_Relaxation":
        new = copy.copy(self)
        for key, value in vars(self).items():
            setattr(new, key, value[batch])
        return new


class _MaxPool(_Layer):
    """``nn.MaxPool2d``. IBP pools both bounds; CROWN uses :meth:`relaxation_layers`."""
    name = "MaxPool2d"

    def __init__(self, kernel, stride, padding, dilation, ceil_mode, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode = \
            kernel, stride, padding, dilation, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def interval(self, lo, hi):
        return self.forward(lo), self.forward(hi)

    def propagate(self, s):
        return _box(*self.interval(*s.box()), exact=False)

    def relaxation_layers(self, device, dtype) -> list[_Layer]:
        """The same function as gather + tournament: ``max(a, b) = b + relu(a - b)``, exactly."""
        c, h, w = self.in_shape
        _, h_out, w_out = self.out_shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        rows = torch.arange(h_out).unsqueeze(1) * sh - ph + torch.arange(kh) * dh  # h_out x kh
        cols = torch.arange(w_out).unsqueeze(1) * sw - pw + torch.arange(kw) * dw  # w_out x kw
        ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        if not (ok_r.any(1).all() and ok_c.any(1).all()):
            raise ModelError("MaxPool2d has a window with no input cell (padding too large for this input size); "
                             + SUPPORTED)
        # padding cells (value -inf in PyTorch) are replaced by a real cell of the same window
        rows = torch.where(ok_r, rows, rows.gather(1, ok_r.to(torch.int8).argmax(1, keepdim=True)))
        cols = torch.where(ok_c, cols, cols.gather(1, ok_c.to(torch.int8).argmax(1, keepdim=True)))
        cell = rows.reshape(h_out, 1, kh, 1) * w + cols.reshape(1, w_out, 1, kw)  # h_out x w_out x kh x kw
        cell = cell.permute(2, 3, 0, 1).reshape(kh * kw, 1, h_out, w_out)
        index = (cell + torch.arange(c).reshape(1, c, 1, 1) * (h * w)).reshape(-1).to(device)
        m = kh * kw
        tiles = (self.stride == self.kernel and self.padding == (0, 0) and self.dilation == (1, 1)
                 and h == h_out * kh and w == w_out * kw)  # non-overlapping windows covering the input
        layers: list[_Layer] = [_Gather(index, self.in_shape, (m, c, h_out, w_out), (kh, kw) if tiles else None)]
        pending = None  # matrix of the last combine step, merged into the next difference step
        while m > 1:
            pairs, odd = divmod(m, 2)
            size = 2 * pairs + odd
            diff = torch.zeros(size, m, dtype=dtype)
            combine = torch.zeros(pairs + odd, size, dtype=dtype)
            mask = torch.zeros(size, dtype=torch.bool)
            for k in range(pairs):  # [a - b, b] then a - b -> relu, then relu(a - b) + b
                diff[2 * k, 2 * k], diff[2 * k, 2 * k + 1], diff[2 * k + 1, 2 * k + 1] = 1, -1, 1
                mask[2 * k] = True
                combine[k, 2 * k] = combine[k, 2 * k + 1] = 1
            if odd:
                diff[2 * pairs, m - 1] = 1
                combine[pairs, 2 * pairs] = 1
            if pending is not None:
                layers.pop()
                diff = diff @ pending
            layers.append(_Stack(diff.to(device), layers[-1].out_shape, (size, c, h_out, w_out)))
            full_mask = mask.reshape(size, 1, 1, 1).expand(size, c, h_out, w_out).to(device)
            layers.append(_ReLU((size, c, h_out, w_out), mask=full_mask, refine=REFINE_MAXPOOL))
            layers.append(_Stack(combine.to(device), (size, c, h_out, w_out), (pairs + odd, c, h_out, w_out)))
            pending = combine
            m = pairs + odd
        end = _Reshape(layers[-1].out_shape, self.out_shape)
        layers[0].pool_start, end.pool_end = self, self  # the CROWN pass intersects with direct pooling
        layers.append(end)
        return layers


# =========================================================================== reading a model
def _is_normalize(m: nn.Module) -> bool:
    """A normalisation layer: any module with ``mean`` and ``std`` attributes (not a container)."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.modules.batchnorm._NormBase)):
        return False
    return all(_as_number_tensor(getattr(m, a, None)) is not None for a in ("mean", "std"))


def _as_number_tensor(value):
    if isinstance(value, torch.Tensor):
        return None if value.is_complex() else value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return torch.tensor([float(v) for v in value], dtype=torch.float64)
    return None


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps normalisation modules as single leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_normalize(m) or super().is_leaf_module(m, module_qualified_name)


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_PROBE_BATCH = 3


def _describe(node: torch.fx.Node, gm=None) -> str:
    """How a graph node reads in an error message: the function, method or layer, and where."""
    target = node.target
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" in {list(stack.values())[-1][0]!r} ({list(stack.values())[-1][1].__name__})" if stack else ""
    if node.op == "call_function":
        name = getattr(target, "__name__", str(target))
        hint = ", a residual connection" if name in ("add", "iadd", "cat", "concat") else ""
        return f"function '{name}'{inside}{hint}"
    if node.op == "call_method":
        return f"method '.{target}()'{inside}"
    if node.op == "get_attr":
        return f"tensor attribute '{target}' used in forward"
    if node.op == "call_module" and gm is not None:
        return f"layer '{target}' ({type(gm.get_submodule(target)).__name__})"
    return f"'{target}'"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Network:
    """The layer chain of a model for one input shape, on one device, in one dtype."""

    def __init__(self, source: list[_Layer], in_shape, num_classes: int, device, dtype):
        self.source = source  # layers in the model's own precision; ``layers`` in ``dtype``
        self.layers = [layer.to(dtype) for layer in source]
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.device, self.dtype = device, dtype
        self.crown_layers: list[_Layer] = []
        for layer in self.layers:
            if isinstance(layer, _MaxPool):
                self.crown_layers.extend(layer.relaxation_layers(device, dtype))
            else:
                self.crown_layers.append(layer)
        # largest sample size among layer shapes up to each layer (for chunking backward passes)
        sizes = [math.prod(self.in_shape)]
        for layer in self.crown_layers:
            sizes.append(max(sizes[-1], math.prod(layer.out_shape)))
        self.max_size = sizes
        # forward-mode linear bounds cost (1 + input size) per neuron: worth it when the input is
        # smaller than the ReLU layers whose CROWN rows they save (small images, wide conv layers)
        relu_sizes = [math.prod(layer.in_shape) for layer in self.crown_layers if isinstance(layer, _ReLU)]
        # the first layer as a dense matrix when small (a convolution of a small image): backward
        # passes end with one matmul instead of a transposed convolution with few output channels
        self.first_dense = None
        first = self.crown_layers[0] if self.crown_layers else None
        d_in = math.prod(self.in_shape)
        if isinstance(first, _Conv) and d_in * math.prod(first.out_shape) <= DENSE_FIRST_LAYER:
            eye = torch.eye(d_in, dtype=dtype, device=device).reshape(1, d_in, *self.in_shape)
            self.first_dense = first.apply(eye, None).reshape(d_in, -1).t().contiguous()  # D_out x D_in
        self.forward_mode = (FORWARD_MODE and bool(relu_sizes) and math.prod(self.in_shape) < max(relu_sizes)
                             and (1 + math.prod(self.in_shape)) * max(self.max_size) <= FORWARD_MODE_ELEMENTS)

    def to(self, dtype) -> "_Network":
        if dtype == self.dtype:
            return self
        return _Network(self.source, self.in_shape, self.num_classes, self.device, dtype)

    def forward(self, x: torch.Tensor, crown: bool = False) -> torch.Tensor:
        for layer in self.crown_layers if crown else self.layers:
            x = layer.forward(x)
        return x


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def read_network(model: nn.Module, input_shape: Sequence[int], dtype=torch.float32) -> _Network:
    """Read ``model`` as a chain of supported layers for inputs of shape ``input_shape`` (C, H, W).

    Raises ModelError (one line) naming the first unsupported layer or operation. The result is
    checked against ``model`` itself on random inputs.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("cannot analyse a TorchScript model (its layers are compiled away); load the model as "
                         "an nn.Module (architecture + state dict) for deterministic certificates")
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ModelError(f"BatchNorm layer '{name}' is in training mode; call model.eval() first")
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            raise ModelError(f"Dropout layer '{name}' is in training mode; call model.eval() first")
    device = _model_device(model)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not a static chain
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx ({first}); {SUPPORTED}") from None
    gm = torch.fx.GraphModule(tracer.root, graph)
    # 1. the graph must be a chain of supported nodes (checked before running anything)
    chain: list[tuple[torch.fx.Node, str, nn.Module | None]] = []
    current, aux = None, set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise ModelError(f"model forward takes more than one input ('{node.name}'); {SUPPORTED}")
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise ModelError(f"model output is not the last layer's tensor (it returns {node.args[0]!r}); "
                                 "return the logits tensor only")
            break
        if _is_aux(node, aux):
            aux.add(node)
            continue
        kind, module = _node_kind(gm, node)  # ModelError naming an unsupported layer or operation
        layer_input = [a for a in node.all_input_nodes if a not in aux]
        if layer_input != [current] or not node.args or node.args[0] is not current:
            names = ", ".join(a.name for a in layer_input)
            raise ModelError(f"model is not a straight chain: {_describe(node, gm)} takes [{names}] "
                             f"(residual or branching graphs are not supported); {SUPPORTED}")
        chain.append((node, kind, module))
        current = node
    for node in aux:
        for user in node.users:
            if user not in aux and not (user.op in ("call_method", "call_function")
                                        and _node_kind(gm, user)[0] == "reshape"):
                raise ModelError(f"the shape of a tensor is used by '{user.name}' ({_describe(user)}); "
                                 f"{SUPPORTED}")
    # 2. shapes, from one run of the traced model on a probe batch
    in_shape = tuple(int(v) for v in input_shape)
    probe = torch.rand(_PROBE_BATCH, *in_shape, generator=torch.Generator().manual_seed(0)).to(device)
    probe = probe.to(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    shapes = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            shapes.run(probe)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InvalidInputError(f"the model cannot run on inputs of shape N x {' x '.join(map(str, in_shape))} "
                                f"({first})") from None

    def shape_of(node) -> tuple[int, ...]:
        shape = shapes.shapes.get(node, ())
        if len(shape) < 2 or shape[0] != _PROBE_BATCH:
            raise ModelError(f"{_describe(node, gm)} does not keep the batch dimension first "
                             f"(output shape {shape} for a batch of {_PROBE_BATCH}); {SUPPORTED}")
        return shape[1:]

    # 3. the layers
    layers: list[_Layer] = []
    shape = in_shape
    for node, kind, module in chain:
        out = shape_of(node)
        layers.extend(_make_layers(kind, module, node, shape, out, device))
        shape = out
    out_shape = shape
    if len(out_shape) != 1 or out_shape[0] < 2:
        raise ModelError(f"model output must be N x K logits with K >= 2, got N x {' x '.join(map(str, out_shape))}")
    network = _Network(layers, in_shape, out_shape[0], device, dtype)
    with torch.no_grad():
        expected = model(probe).to(dtype)
        for crown in (False, True):
            got = network.forward(probe.to(dtype), crown=crown)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + float(expected.abs().max()))):
                raise ModelError(
                    f"the layers read from {type(model).__name__} do not reproduce its output (max difference "
                    f"{float((got - expected).abs().max()):.3g}); it computes something else than its layer chain; "
                    f"{SUPPORTED}")
    return network


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced model once and records the shape of every tensor a node produces (like
    torch.fx's ShapeProp, without importing its symbolic-shape machinery)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, tuple[int, ...]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _is_aux(node: torch.fx.Node, aux: set) -> bool:
    """Shape queries (``x.size(0)``, ``x.shape[1]``) that only feed ``view``/``reshape`` arguments."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
            and node.args[1] in ("shape", "ndim"):
        return True
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in aux


def _node_kind(gm, node) -> tuple[str, nn.Module | None]:
    """Classify a graph node: ('reshape' | 'relu' | 'module' | 'skip', module); ModelError otherwise."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Identity, *_DROPOUT)):
            return "skip", module
        if isinstance(module, nn.Flatten):
            return "reshape", module
        if isinstance(module, nn.ReLU):
            return "relu", module
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                               nn.BatchNorm1d, nn.BatchNorm2d)) or _is_normalize(module):
            return "module", module
        raise ModelError(f"unsupported layer '{node.target}' ({type(module).__name__}); {SUPPORTED}")
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu", None
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return "reshape", None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", None
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        return "reshape", None
    raise ModelError(f"unsupported operation: {_describe(node)}; {SUPPORTED}")


def _make_layers(kind, module, node, in_shape, out_shape, device) -> list[_Layer]:
    """The layers (usually one) that compute ``node``; ModelError for unsupported settings."""
    if kind == "skip":
        return []
    if kind == "reshape":
        return [] if in_shape == out_shape else [_Reshape(in_shape, out_shape)]
    if kind == "relu":
        return [_ReLU(in_shape)]
    name = f"'{node.target}' ({type(module).__name__})"

    def param(t):
        return None if t is None else t.detach()

    if isinstance(module, nn.Linear):
        return [_Linear(param(module.weight), param(module.bias), in_shape, out_shape)]
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ModelError(f"layer {name} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported")
        padding = module.padding
        if isinstance(padding, str):
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if padding == "valid":
                padding = (0, 0)
            elif all(t % 2 == 0 for t in total):
                padding = (total[0] // 2, total[1] // 2)
            else:
                raise ModelError(f"layer {name} uses padding='same' with an even kernel (asymmetric padding); "
                                 "use explicit padding")
        return [_Conv(param(module.weight), param(module.bias), _pair(module.stride), _pair(padding),
                      _pair(module.dilation), module.groups, in_shape, out_shape)]
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _average_pool(module, name, in_shape, out_shape, device)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise ModelError(f"layer {name} returns indices; use return_indices=False")
        return [_MaxPool(_pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                         _pair(module.padding), _pair(module.dilation), bool(module.ceil_mode),
                         in_shape, out_shape)]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.running_mean is None or module.running_var is None:
            raise ModelError(f"layer {name} has track_running_stats=False (it normalises with batch statistics); "
                             "only BatchNorm with running statistics is supported")
        channels = module.num_features  # folded in float64, rounded to the computation's dtype later
        scale = torch.rsqrt(param(module.running_var).double() + module.eps)
        if module.weight is not None:
            scale = scale * param(module.weight).double()
        shift = -param(module.running_mean).double() * scale
        if module.bias is not None:
            shift = shift + param(module.bias).double()
        view = (channels,) + (1,) * (len(in_shape) - 1)
        return [_Elementwise(scale.reshape(view), shift.reshape(view), in_shape, type(module).__name__)]
    return [_normalize(module, name, in_shape, device)]


def _average_pool(module, name, in_shape, out_shape, device) -> list[_Layer]:
    """Average pooling as a depthwise convolution with weights 1 / (window size)."""
    c, h, w = in_shape
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if h % oh or w % ow:
            raise ModelError(f"layer {name} maps {h}x{w} to {oh}x{ow}, which is not a uniform average pooling "
                             f"(supported when the input size is a multiple of the output size)")
        kernel, stride, padding, divisor = (h // oh, w // ow), (h // oh, w // ow), (0, 0), None
    else:
        kernel, padding = _pair(module.kernel_size), _pair(module.padding)
        stride = _pair(module.stride or module.kernel_size)
        divisor = module.divisor_override
        if module.ceil_mode:
            raise ModelError(f"layer {name} uses ceil_mode=True; only ceil_mode=False is supported")
        if any(padding) and not module.count_include_pad:
            raise ModelError(f"layer {name} pads with count_include_pad=False (border windows average fewer "
                             "cells); use count_include_pad=True or no padding")
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0) and divisor is None:
        return []  # the identity
    weight = torch.full((c, 1, *kernel), 1.0 / (divisor or kernel[0] * kernel[1]), device=device)
    return [_Conv(weight, None, stride, padding, (1, 1), c, in_shape, out_shape)]


def _normalize(module, name, in_shape, device) -> _Layer:
    """``(x - mean) / std`` as an elementwise layer, checked against the module on random inputs."""
    # folded in float64 (exact for Python numbers), rounded to the computation's dtype later
    mean = _as_number_tensor(module.mean).to(device=device, dtype=torch.float64)
    std = _as_number_tensor(module.std).to(device=device, dtype=torch.float64)
    shapes = []
    for t in (mean, std):
        if t.dim() == 1 and len(in_shape) == 3:
            t = t.reshape(-1, 1, 1)  # per channel, as torchvision.transforms.Normalize
        elif t.dim() == len(in_shape) + 1 and t.shape[0] == 1:
            t = t[0]
        shapes.append(t)
    mean, std = shapes
    try:
        torch.broadcast_shapes(mean.shape, std.shape, in_shape)
        if torch.broadcast_shapes(mean.shape, std.shape, in_shape) != tuple(in_shape):
            raise RuntimeError
    except RuntimeError:
        raise ModelError(f"normalisation layer {name} has mean {tuple(mean.shape)} / std {tuple(std.shape)} that "
                         f"do not broadcast to one input of shape {tuple(in_shape)}") from None
    if not bool(torch.isfinite(mean).all()) or not bool((std.abs() > 0).all() and torch.isfinite(std).all()):
        raise ModelError(f"normalisation layer {name} has a zero or non-finite std / mean")
    layer = _Elementwise(1.0 / std, -mean / std, in_shape, "Normalize")
    probe = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        try:
            out = module(probe.clone())
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"normalisation layer {name} fails on a batch ({str(exc)[:120]})") from None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape or not torch.allclose(
            out.double(), layer.forward(probe.double()), rtol=1e-4, atol=1e-5):
        raise ModelError(f"layer {name} has mean/std attributes but does not compute (x - mean) / std; "
                         f"{SUPPORTED}")
    return layer


# =========================================================================== bound propagation
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


class _Crown:
    """One CROWN evaluation for a batch of inputs and per-input radii.

    The forward sweep keeps an interval set per layer (and, where cheap, forward-mode linear bounds).
    At every ReLU whose input box is not exact, the neurons that these bounds cannot prove stable get
    CROWN bounds (backward passes from one-hot rows), intersected with the cheap ones. ``prior``
    optionally gives valid bounds of ReLU inputs (e.g. computed for a larger ball) to intersect
    first. :meth:`bound` then bounds any specification ``spec @ z``.
    """

    def __init__(self, net: _Network, x0: torch.Tensor, radius: torch.Tensor, prior: dict | None = None,
                 fixed: dict | None = None):
        self.net, self.x0, self.radius = net, x0, radius
        self.relax: dict[int, _Relaxation] = {}
        self.bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ReLU index -> input (lo, hi)
        if fixed is not None:  # given ReLU input bounds (valid for this ball): relaxations only
            for i, layer in enumerate(net.crown_layers):
                if isinstance(layer, _ReLU):
                    self.bounds[i] = fixed[i]
                    self.relax[i] = layer.relaxation(*fixed[i])
            self.output = None
            return
        s = _Set(center=x0, scale=torch.ones(1, *net.in_shape, dtype=x0.dtype, device=x0.device), radius=radius)
        self.before_last = s
        # forward-mode linear bounds (lo, hi); useless for a point (radius 0: every neuron is stable)
        linear = _input_stack(x0) if net.forward_mode and bool((radius > 0).any()) else None
        relus, mixing = 0, 0  # ReLU layers so far, mixing affine layers since the last one
        pools = {}
        for i, layer in enumerate(net.crown_layers):
            self.before_last = s  # the set before the last layer (for the elided interval bound)
            if getattr(layer, "pool_start", None) is not None:
                pools[id(layer.pool_start)] = s.box()
            if isinstance(layer, _ReLU):
                lo, hi = s.box()
                if prior is not None and i in prior:
                    lo, hi = torch.maximum(lo, prior[i][0]), torch.minimum(hi, prior[i][1])
                if not s.exact and linear is not None:
                    flo, fhi = _concretize_stack(*linear, radius)
                    lo, hi = torch.maximum(lo, flo), torch.minimum(hi, fhi)
                # behind one ReLU and one mixing layer, forward-mode bounds equal CROWN's: no refinement
                same_as_crown = linear is not None and relus <= 1 and mixing <= 1
                if not s.exact and layer.refine and not same_as_crown:
                    lo, hi = self._refine(i, layer, lo, hi)
                self.bounds[i] = (lo, hi)
                self.relax[i] = layer.relaxation(lo, hi)
                s = _box(*layer.interval(lo, hi))
                if linear is not None:
                    linear = layer.linear_bounds(*linear, self.relax[i])
                relus, mixing = relus + 1, 0
            else:
                s = layer.propagate(s)
                if linear is not None:
                    linear = layer.linear_bounds(*linear)
                mixing += int(layer.mixing)
            if getattr(layer, "pool_end", None) is not None:
                lo, hi = s.box()
                plo, phi = layer.pool_end.interval(*pools.pop(id(layer.pool_end)))
                s = _box(torch.maximum(lo, plo), torch.minimum(hi, phi))
        self.output = s

    def _refine(self, i: int, layer: _ReLU, lo, hi):
        n = lo.shape[0]
        need = layer.unstable(lo, hi).reshape(n, -1)
        counts = need.sum(1)
        width = int(counts.max()) if n else 0
        if width == 0:
            return lo, hi
        order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :width]  # needed neurons first
        valid = torch.arange(width, device=lo.device).unsqueeze(0) < counts.unsqueeze(1)
        lo, hi = lo.reshape(n, -1).clone(), hi.reshape(n, -1).clone()
        # each needed neuron k gives two rows, +e_k (lower bound) and -e_k (upper bound)
        for b0, b1, s0, s1 in _chunks(n, width, 2 * self.net.max_size[i]):
            idx = order[b0:b1, s0:s1]
            ones = torch.ones_like(idx, dtype=lo.dtype)
            bounds = self._rows_bound(i, torch.cat([idx, idx], 1), torch.cat([ones, -ones], 1), slice(b0, b1))
            k = s1 - s0
            lower, upper = bounds[:, :k], -bounds[:, k:]
            ok = valid[b0:b1, s0:s1]
            rows = torch.arange(b0, b1, device=lo.device).unsqueeze(1).expand_as(idx)
            r_ok, i_ok = rows[ok], idx[ok]
            lo[r_ok, i_ok] = torch.maximum(lo[r_ok, i_ok], lower[ok])
            hi[r_ok, i_ok] = torch.minimum(hi[r_ok, i_ok], upper[ok])
        return lo.reshape(n, *layer.in_shape), hi.reshape(n, *layer.in_shape)

    def _rows_bound(self, i: int, idx, coef, batch: slice) -> torch.Tensor:
        """Lower bounds of ``coef * z_i[idx]`` (input of layer i) over the ball, per row.

        The one-hot rows stay sparse backwards through elementwise layers, reshapes, max-pool
        gathers and tournaments and ReLUs (a few entries per row), and become dense rows at the
        first convolution or linear layer: no transposed convolution of an almost empty tensor.
        """
        layers = self.net.crown_layers
        idx, coef = idx.unsqueeze(-1), coef.unsqueeze(-1)  # N x S x k, k = 1
        bias = coef.new_zeros(coef.shape[:2])
        j = i - 1
        while j >= 0 and idx.shape[-1] <= SPARSE_ENTRIES:
            layer = layers[j]
            if isinstance(layer, _ReLU):
                idx, coef = _coalesce(idx, coef)
                idx, coef, shift = layer.sparse(idx, coef, self.relax[j][batch])
            elif hasattr(layer, "sparse"):
                idx, coef, shift = layer.sparse(idx, coef)
            else:
                break
            bias = bias + shift
            j -= 1
        # the sparse rows now multiply the output of layer j
        lam = None
        if j >= 0 and hasattr(layers[j], "rows") and idx.shape[-1] <= SPARSE_ENTRIES:
            made = layers[j].rows(idx, coef)
            if made is not None:
                lam, shift = made
                bias = bias + shift
                j -= 1
        if lam is None:
            shape = layers[j].out_shape if j >= 0 else self.net.in_shape
            n, s = idx.shape[:2]
            lam = coef.new_zeros(n, s, math.prod(shape)).scatter_add_(2, idx, coef).reshape(n, s, *shape)
        return self._backward(lam, bias, j, batch)[0]

    def _backward(self, lam, bias, j: int, batch: slice):
        """Propagate ``lam`` from the output of layer j to the input; concretise over the ball.
        Returns ``(lb, a, b)`` with ``lb = a - r b`` (see :func:`_concretize`)."""
        layers = self.net.crown_layers
        for k in range(j, -1, -1):
            layer = layers[k]
            if isinstance(layer, _ReLU):
                lam, shift = layer.backward(lam, self.relax[k][batch])
            elif k == 0 and self.net.first_dense is not None:
                n, s = lam.shape[:2]
                flat = lam.reshape(n, s, -1)
                lam, shift = flat @ self.net.first_dense, flat @ layer.bias_out().expand(layer.out_shape).reshape(-1)
            else:
                lam, shift = layer.backward(lam)
            bias = bias + shift
        return _concretize(lam, bias, self.x0[batch], self.radius[batch])

    def bound(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``spec`` (N x S x K): CROWN lower bounds, and their parts ``a`` and ``b`` with
        ``bound = a - radius * b`` (the same relaxation stays valid for any smaller radius)."""
        n, s = spec.shape[:2]
        a = spec.new_empty(n, s)
        b = spec.new_empty(n, s)
        last = len(self.net.crown_layers) - 1
        for b0, b1, _, _ in _chunks(n, s, self.net.max_size[-1], split_rows=False):
            sl = slice(b0, b1)
            _, a[sl], b[sl] = self._backward(spec[sl], spec.new_zeros(b1 - b0, s), last, sl)
        return a - self.radius.unsqueeze(1) * b, a, b


def _input_stack(x0: torch.Tensor) -> torch.Tensor:
    """Forward-mode start: ``x = x0 + I (x - x0)`` as a stack N x (1 + D0) x shape."""
    n, d = x0.shape[0], x0[0].numel()
    eye = torch.eye(d, dtype=x0.dtype, device=x0.device).reshape(1, d, *x0.shape[1:]).expand(n, d, *x0.shape[1:])
    stack = torch.cat([x0.unsqueeze(1), eye], 1)
    return stack, stack


def _concretize_stack(lo, hi, radius):
    """Interval of forward-mode linear bounds over the ball: ``c -+ r ||a||_2`` per value."""
    r = _per_input(radius, lo[:, 0])
    return lo[:, 0] - r * lo[:, 1:].norm(dim=1), hi[:, 0] + r * hi[:, 1:].norm(dim=1)


def _concretize(lam, bias, x0, radius):
    """``min over ||x - x0|| <= r`` of ``lam.x + bias`` = ``lam.x0 + bias - r ||lam||_2`` (per row)."""
    flat = lam.reshape(lam.shape[0], lam.shape[1], -1)
    a = torch.einsum("nsd,nd->ns", flat, x0.reshape(x0.shape[0], -1)) + bias
    b = flat.norm(dim=2)
    return a - radius.unsqueeze(1) * b, a, b


def _chunks(n: int, rows: int, per_row: int, split_rows: bool = True):
    """(b0, b1, s0, s1) blocks of inputs x rows whose backward tensors stay below CHUNK_ELEMENTS."""
    per_input = max(1, rows * per_row)
    if per_input <= CHUNK_ELEMENTS or not split_rows:
        step = max(1, CHUNK_ELEMENTS // per_input)
        for b0 in range(0, n, step):
            yield b0, min(n, b0 + step), 0, rows
        return
    step = max(1, CHUNK_ELEMENTS // per_row)
    for b0 in range(n):
        for s0 in range(0, rows, step):
            yield b0, b0 + 1, s0, min(rows, s0 + step)


# =========================================================================== public API
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidParameterError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _prepare(model, x, dtype) -> tuple[_Network, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    if x.dim() < 2:
        raise InvalidInputError(f"inputs must be a batch (N x C x H x W), got shape {tuple(x.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise InvalidParameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    net = read_network(model, tuple(x.shape[1:]), dtype)
    return net, x.detach().to(device=net.device, dtype=dtype)


def _radii(radius, n: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(radius, torch.Tensor):
        radius = radius.detach().cpu().double().numpy()
    try:
        r = np.asarray(radius, dtype=float)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"radius must be a number or one number per input, got {radius!r}") from None
    if r.ndim == 0:
        r = np.full(n, float(r))
    if r.shape != (n,) or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise InvalidParameterError(f"radius must be a finite number >= 0 or one per input ({n}), got {radius!r}")
    return torch.as_tensor(r, dtype=like.dtype, device=like.device)


def _margin_spec(pred: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Rows ``e_pred - e_j`` for every ``j != pred``: N x (K-1) x K."""
    n = pred.shape[0]
    eye = torch.eye(k, dtype=dtype, device=pred.device)
    others = torch.arange(k, device=pred.device).expand(n, k)
    others = others[others != pred.unsqueeze(1)].reshape(n, k - 1)
    return eye[pred].unsqueeze(1) - eye[others]


def _margins(net: _Network, x0, radius, pred, method, prior=None):
    """Margin lower bounds (N x K-1) and, for CROWN, ``a``, ``b`` with CROWN part ``a - r b`` and the
    ReLU input bounds used (a dict, see :class:`_Crown`)."""
    spec = _margin_spec(pred, net.num_classes, x0.dtype)
    if method == "ibp":
        lb = _ibp_margins(net, x0, radius, spec)
        return lb, lb, torch.zeros_like(lb), {}
    lb, a, b, elided, _, _, bounds = _crown(net, x0, radius, spec, prior)
    # the interval bound (with CROWN's tighter intermediate boxes) is valid too: keep the better one,
    # so CROWN's margins are never below IBP's
    return torch.maximum(lb, elided), a, b, bounds


def _crown(net: _Network, x0, radius, spec, prior=None):
    """CROWN bounds of ``spec @ z`` (``lb = a - r b``), the interval bound of ``spec @ z`` from the
    same forward sweep, the output box and the ReLU input bounds, in batch chunks (forward-mode
    stacks are large)."""
    n = x0.shape[0]
    step = n
    if net.forward_mode:
        step = max(1, CHUNK_ELEMENTS // (2 * (1 + math.prod(net.in_shape)) * net.max_size[-1]))
    parts, bounds = [], []
    for b0 in range(0, n, step):
        sl = slice(b0, b0 + step)
        part_prior = None if prior is None else {i: (lo[sl], hi[sl]) for i, (lo, hi) in prior.items()}
        crown = _Crown(net, x0[sl], radius[sl], part_prior)
        elided = _spec_bound(net.crown_layers[-1], crown.output, crown.before_last, spec[sl], radius[sl])
        parts.append((*crown.bound(spec[sl]), elided, *crown.output.box()))
        bounds.append(crown.bounds)
    out = tuple(torch.cat(t) for t in zip(*parts))
    merged = {i: (torch.cat([b[i][0] for b in bounds]), torch.cat([b[i][1] for b in bounds])) for i in bounds[0]}
    return (*out, merged)


def interval_bounds(model: nn.Module, x: torch.Tensor, radius: float | Sequence[float], method: str = "ibp",
                    *, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of every logit over an l2 ball around each input.

    Parameters
    ----------
    model : nn.Module
        A supported classifier (see the module docstring), N x C x H x W -> N x K logits, eval mode.
    x : torch.Tensor
        Inputs, N x C x H x W, pixels in [0, 1] (before any normalisation inside the model).
    radius : float or sequence of N floats
        l2 radius of each ball, in input (pixel) units, >= 0.
    method : {"ibp", "crown"}
    dtype : torch.float32 or torch.float64
        Arithmetic of the bound computation.

    Returns
    -------
    lower, upper : np.ndarray, N x K (float64)
        For every ``x'`` with ``||x' - x[i]||_2 <= radius[i]``: ``lower[i] <= model(x')[i] <= upper[i]``
        (in exact arithmetic; up to rounding of ``dtype``, see the module docstring).
    """
    _check_method(method)
    net, x0 = _prepare(model, x, dtype)
    n, k = x0.shape[0], net.num_classes
    if n == 0:
        return np.zeros((0, k)), np.zeros((0, k))
    r = _radii(radius, n, x0)
    with torch.no_grad():
        if method == "ibp":
            lo, hi = _ibp_output(net, x0, r)[0].box()
        else:
            eye = torch.eye(k, dtype=dtype, device=x0.device)
            lb, _, _, _, lo, hi, _ = _crown(net, x0, r, torch.cat([eye, -eye]).expand(n, 2 * k, k))
            lo, hi = torch.maximum(lo, lb[:, :k]), torch.minimum(hi, -lb[:, k:])
            # two valid bounds can cross by a rounding error when the interval is a point (radius 0)
            lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return lo.double().cpu().numpy(), hi.double().cpu().numpy()


def _predict(model: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad():
        return model(x.detach().to(device=device, dtype=dtype)).argmax(1)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, radius: float | Sequence[float],
                        method: str = "crown", *, target: Sequence[int] | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Lower bounds of the margins ``z_pred - z_j`` over an l2 ball around each input.

    CROWN bounds each margin directly (specification ``C = e_pred - e_j``); IBP merges the
    specification into the last Linear layer (elision of the last layer), else subtracts intervals.

    Parameters
    ----------
    model, x, radius, method, dtype
        As in :func:`interval_bounds`.
    target : sequence of N ints, optional
        The class to bound the margins of; default ``argmax model(x)``.

    Returns
    -------
    classes : np.ndarray of int64, N
        ``pred`` per input (the target, or ``argmax model(x)``).
    margins : np.ndarray, N x K (float64)
        ``margins[i, j] <= z_pred(x') - z_j(x')`` for every ``x'`` in the ball (input l2 units) and
        every ``j != pred``; ``+inf`` in column ``pred``. The prediction provably cannot change in the
        ball when every entry is > 0.
    """
    _check_method(method)
    net, x0 = _prepare(model, x, dtype)
    n, k = x0.shape[0], net.num_classes
    pred = _targets(model, x0, net, target)
    out = np.full((n, k), np.inf)
    if n == 0:
        return pred.cpu().numpy(), out
    r = _radii(radius, n, x0)
    with torch.no_grad():
        lb = _margins(net, x0, r, pred, method)[0]
    _scatter_margins(out, lb.double().cpu().numpy(), pred.cpu().numpy())
    return pred.cpu().numpy(), out


def _targets(model, x0, net, target) -> torch.Tensor:
    n = x0.shape[0]
    if target is None:
        return _predict(model, x0, net.device) if n else torch.zeros(0, dtype=torch.long, device=net.device)
    t = np.asarray(target)
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer) or np.any((t < 0) | (t >= net.num_classes)):
        raise InvalidParameterError(f"target must be {n} class indices in [0, {net.num_classes}), got {target!r}")
    return torch.as_tensor(t, dtype=torch.long, device=net.device)


def _scatter_margins(out: np.ndarray, lb: np.ndarray, pred: np.ndarray) -> None:
    k = out.shape[1]
    for i, c in enumerate(pred):
        out[i, [j for j in range(k) if j != c]] = lb[i]


def certified_radius(model: nn.Module, x: torch.Tensor, method: str = "crown", *,
                     max_radius: float | None = None, tol: float = 1e-3, iterations: int = 40,
                     verify_float64: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per input, ``argmax model(x)`` and the largest l2 radius (found by bisection) it is certified for.

    Guarantee: no input within l2 distance ``radius`` (input units, i.e. pixels before any
    normalisation layer) of ``x[i]`` changes the network's prediction ``predictions[i]``: a linear
    relaxation (CROWN) or interval bound (IBP) valid on that ball proves every margin
    ``z_pred - z_j`` > 0 there. Every returned radius was itself checked (bisection keeps the lower,
    certified end of its bracket; for CROWN a failed check at ``R`` also certifies
    ``min_j a_j / b_j``, from the relaxation at ``R``, valid on every smaller ball).

    The search runs on the whole batch at once (one batched bound evaluation per step, finished
    inputs drop out): probes start at 1/8 of the distance to the linearised decision boundary and
    double until a check fails; then a bracket wider than a factor 2 is halved on a log scale, and a
    narrower one is cut at the false-position point of the smallest margin bound (Illinois rule).
    ReLU bounds from the last failed check (a larger ball) prune the later checks.
    CROWN/IBP bounds are not guaranteed monotone in the radius, so the result is a certified radius
    within ``tol`` of one where the check fails, not a supremum. For the same reason a fresh
    :func:`margin_lower_bounds` call at the returned radius usually, but not always, proves it too:
    the search intersects ReLU bounds of the ball with those computed for larger balls (valid on it
    as well), which can only tighten CROWN's relaxation, whereas a fresh call starts from scratch.
    Parameters
    ----------
    model, x, method
        As in :func:`interval_bounds`.
    max_radius : float, optional
        Upper end of the search. Default: ``sqrt(C*H*W)``, the diameter of the pixel cube, so a
        radius equal to it covers every valid image.
    tol : float
        Stop once ``hi - lo <= tol * max(1, lo)`` (absolute below radius 1, relative above).
    iterations : int
        Maximum number of bound evaluations of the search (each is one batched evaluation).
    verify_float64 : bool
        Re-check the returned radii in float64 arithmetic (strict ``> 0``), shrinking any that fail.

    Returns
    -------
    predictions : np.ndarray of int64, N
    radii : np.ndarray of float64, N
        0 where no ball (larger than the tolerance) is certified, including ties at ``x`` itself.
    """
    _check_method(method)
    tol = _positive("tol", tol)
    iterations = _integer("iterations", iterations)
    net, x0 = _prepare(model, x, torch.float32)
    n = x0.shape[0]
    pred = _targets(model, x0, net, None)
    if n == 0:
        return pred.cpu().numpy(), np.zeros(0)
    cap = math.sqrt(math.prod(net.in_shape)) if max_radius is None else _positive("max_radius", max_radius)
    with torch.no_grad():
        radii, certifying = _bisect(net, x0, pred, method, cap, tol, int(iterations))
        if verify_float64:
            radii = _verify(net.to(torch.float64), x0.double(), pred, method, radii, certifying)
    return pred.cpu().numpy(), radii.double().cpu().numpy()


def _integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a positive number, got {value!r}") from None
    if not (0.0 < value < math.inf):
        raise InvalidParameterError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check(net, x0, pred, method, r, prior=None):
    """One batched evaluation at per-input radii ``r``. Returns: certified (float32 check with a small
    safety slack), the smallest margin bound minus the slack (for interpolation), the radius that
    the CROWN relaxation computed at ``r`` certifies (``min_j a_j / b_j``, capped at ``r``; 0 for
    IBP), and the ReLU input bounds of the ball of radius ``r``."""
    lb, a, b, bounds = _margins(net, x0, r, pred, method, prior)
    slack = 1e-5 * (1 + a.abs())
    value = (lb - slack).min(1).values
    if method == "ibp":
        return value > 0, value, torch.zeros_like(r), bounds
    inner = torch.where(b > 0, (a - slack) / b.clamp(min=1e-30), torch.where(a > slack, math.inf, 0.0))
    return value > 0, value, torch.minimum(inner.min(1).values.clamp(min=0), r), bounds


def _bisect(net, x0, pred, method, cap, tol, iterations) -> torch.Tensor:
    """Vectorised search for the largest certified radius in [0, cap]; returns checked radii.

    Per input the bracket is ``lo`` (certified) < ``hi`` (failed, or ``cap`` untested). Probes start
    well below the linearised boundary distance (evaluations at large radii cost the most, as most
    neurons are unstable there) and double until a failure; then the next probe is the
    false-position point of the smallest margin bound between ``lo`` and ``hi`` (Illinois rule, kept
    inside the middle 90% of the bracket), which needs fewer evaluations than halving.
    """
    n = x0.shape[0]
    lo = torch.zeros(n, dtype=x0.dtype, device=x0.device)
    hi = torch.full_like(lo, cap)
    margin, linear = _linear_distance(net, x0, pred)
    f_lo = (margin - 1e-5 * (1 + margin.abs())).min(1).values  # margin (bound) at radius 0
    done = f_lo <= 0  # a tie or no margin at x itself: radius 0
    f_hi = torch.full_like(lo, -1.0)
    failed = torch.zeros_like(done)  # whether hi was checked (and failed)
    side = torch.zeros(n, dtype=torch.int8, device=x0.device)  # last bracket end moved: +1 lo, -1 hi
    r = torch.minimum(linear / 8, hi)
    prior: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    certifying: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the bounds that certified each lo
    for _ in range(iterations):
        idx = (~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        # ReLU input bounds of each input's last failed check are valid for every later (smaller)
        # probe: CROWN skips the neurons they already prove stable
        sub = {i: (p_lo[idx], p_hi[idx]) for i, (p_lo, p_hi) in prior.items()} if prior else None
        ok, value, inner, bounds = _check(net, x0[idx], pred[idx], method, r[idx], sub)
        bad = idx[~ok]
        new_lo = torch.where(ok, r[idx], torch.maximum(lo[idx], inner))  # a failed check still certifies inner
        moved = new_lo > lo[idx]
        _store(prior, bounds, n, bad, ~ok)
        _store(certifying, bounds, n, idx[moved], moved)
        good = idx[ok]
        # Illinois: when the same end moves twice in a row, halve the other end's value
        f_hi[good] = torch.where(side[good] == 1, f_hi[good] / 2, f_hi[good])
        f_lo[bad] = torch.where(side[bad] == -1, f_lo[bad] / 2, f_lo[bad])
        f_lo[good], side[good] = value[ok], 1
        hi[bad], f_hi[bad], side[bad], failed[bad] = r[bad], value[~ok], -1, True
        lo[idx] = new_lo
        done = done | (hi - lo <= tol * lo.clamp(min=1.0))
        t = (f_lo / (f_lo - f_hi).clamp(min=1e-30)).clamp(0.05, 0.95)
        # a bracket wider than a factor 2 is halved on a log scale first (false position crawls there)
        wide = torch.where(lo > 0, (lo * hi).sqrt(), hi / 4)
        narrow = lo + t * (hi - lo)
        r = torch.where(failed, torch.where(hi > 2 * lo, wide, narrow), torch.minimum(2 * lo, hi))
    return lo, certifying


def _linear_distance(net: _Network, x0, pred) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins ``z_pred - z_j`` at ``x0`` (N x K-1) and the distance to the linearised decision
    boundary ``min_j margin_j / ||grad margin_j||`` (N), by autograd through the layer chain."""
    spec = _margin_spec(pred, net.num_classes, x0.dtype)
    with torch.enable_grad():
        x = x0.detach().clone().requires_grad_(True)
        z = net.forward(x)
        grads = torch.stack([torch.autograd.grad(z[:, k].sum(), x, retain_graph=True)[0].reshape(len(x), -1)
                             for k in range(net.num_classes)], 1)  # N x K x D
    margin = torch.einsum("nsk,nk->ns", spec, z.detach())
    norm = torch.einsum("nsk,nkd->nsd", spec, grads).norm(dim=2)
    distance = torch.where(norm > 0, margin / norm.clamp(min=1e-30), torch.full_like(margin, math.inf))
    return margin, distance.min(1).values


def _store(store: dict, bounds: dict, n: int, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """``store[i][.][rows] = bounds[i][.][mask]`` for every ReLU layer i (full-batch tensors)."""
    for i, (b_lo, b_hi) in bounds.items():
        if i not in store:
            shape = (n, *b_lo.shape[1:])
            store[i] = (torch.full(shape, -math.inf, dtype=b_lo.dtype, device=b_lo.device),
                        torch.full(shape, math.inf, dtype=b_lo.dtype, device=b_lo.device))
        store[i][0][rows], store[i][1][rows] = b_lo[mask], b_hi[mask]


def _verify(net64: _Network, x64, pred, method, radii, certifying: dict) -> torch.Tensor:
    """Re-check every radius in float64 arithmetic (strict ``> 0``); shrink the radii that fail.

    CROWN: the margin bounds are recomputed in float64 from the ReLU input bounds that certified the
    radius in float32, widened outward by 1e-5 of their magnitude (about 100 times float32 rounding),
    so with this fixed relaxation the bound is ``a - r b`` and the largest radius it certifies is
    exact. Where that loses more than 0.1% of the radius (the interval bound had certified it), the
    whole float64 computation is redone. IBP: the whole computation in float64.
    """
    radii = radii.double()
    check = (radii > 0).nonzero().squeeze(1)
    if method == "crown" and check.numel():
        fixed = {i: _widen(lo[check].double(), hi[check].double()) for i, (lo, hi) in certifying.items()}
        crown = _Crown(net64, x64[check], radii[check], fixed=fixed)
        _, a, b = crown.bound(_margin_spec(pred[check], net64.num_classes, torch.float64))
        limit = torch.where(b > 0, a / b.clamp(min=1e-300), torch.where(a > 0, math.inf, 0.0)).min(1).values
        verified = torch.minimum(radii[check], limit * (1 - 1e-9)).clamp(min=0)
        verified = torch.where((a - verified.unsqueeze(1) * b > 0).all(1), verified, torch.zeros_like(verified))
        lost = verified < radii[check] * (1 - 1e-3)
        radii[check] = torch.where(lost, radii[check], verified)
        check = check[lost]  # fall through to the full float64 check for these
        if check.numel() == 0:
            return radii
        slow = _verify_full(net64, x64[check], pred[check], method, radii[check])
        radii[check] = torch.maximum(slow, verified[lost])
        return radii
    radii[check] = _verify_full(net64, x64[check], pred[check], method, radii[check])
    return radii


def _widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen float32-computed bounds by 1e-5 of the value and of the layer's largest bound."""
    n = lo.shape[0]
    size = torch.maximum(lo.abs(), hi.abs())
    scale = torch.where(torch.isfinite(size), size, torch.zeros_like(size)).reshape(n, -1).max(1).values
    pad = 1e-5 * (size + _per_input(scale, size)) + 1e-30
    return lo - pad, hi + pad


def _verify_full(net64: _Network, x64, pred, method, radii) -> torch.Tensor:
    """Keep each radius only if the float64 margin bounds at it are all > 0; else shrink it."""
    shrink = (1 - 1e-5, 1 - 1e-4, 1 - 1e-3, 0.99, 0.9, 0.5, 0.25)
    for attempt in range(len(shrink) + 1):
        check = (radii > 0).nonzero().squeeze(1)
        if check.numel() == 0:
            break
        lb = _margins(net64, x64[check], radii[check], pred[check], method)[0]
        bad = check[~(lb > 0).all(1)]
        if bad.numel() == 0:
            break
        radii[bad] = radii[bad] * shrink[attempt] if attempt < len(shrink) else 0.0
    return radii


class DeterministicCertifier:
    """Deterministic l2 certificates (IBP or CROWN) for a PyTorch classifier.

    ``certify(x)`` returns one :class:`~surrogate_cert.core.certificate.Certificate` per input with
    ``prediction = argmax model(x)``, ``radius`` from :func:`certified_radius` (the prediction of the
    network itself provably does not change within that l2 distance, input units), ``method`` =
    ``"ibp"`` or ``"crown"``, ``n_samples = 0`` (no sampling) and ``p_lower = nan``: the certificate is
    deterministic and about the base network, not a smoothed classifier, so no bound on ``p_A(x)``
    exists; nan keeps formulas such as ``sigma * Phi^{-1}(p_lower)`` from turning it into a radius.
    Radius 0 gives the abstain certificate (class -1). ``seconds`` is the batch time divided evenly.

    The model is read (and checked) again on every call, so it may change between calls. Work runs on
    the model's device (CPU or CUDA), in float32 with a float64 re-check of every radius.

    Parameters
    ----------
    model : nn.Module
        A supported classifier (see the module docstring), in eval mode.
    method : {"crown", "ibp"}
    max_radius, tol, iterations, verify_float64
        As in :func:`certified_radius`.
    batch_size : int
        Inputs per batched radius search (bounds memory; each batch is one search).
    """

    def __init__(self, model: nn.Module, method: str = "crown", *, max_radius: float | None = None,
                 tol: float = 1e-3, iterations: int = 40, batch_size: int = 256, verify_float64: bool = True):
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.method = model, _check_method(method)
        self.max_radius = None if max_radius is None else _positive("max_radius", max_radius)
        self.tol = _positive("tol", tol)
        self.iterations = _integer("iterations", iterations)
        self.batch_size = _integer("batch_size", batch_size)
        self.verify_float64 = bool(verify_float64)

    def certify(self, x: torch.Tensor, indices=None) -> list[Certificate]:
        """One certificate per row of ``x`` (N x C x H x W, pixels in [0, 1]).

        ``indices`` is accepted so every certifier has the same call, and checked (one per input);
        no noise is drawn.
        """
        check_images(x)
        noise_indices(indices, x.shape[0])
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            t0 = time.perf_counter()
            batch = x[start:start + self.batch_size]
            preds, radii = certified_radius(self.model, batch, self.method, max_radius=self.max_radius,
                                            tol=self.tol, iterations=self.iterations,
                                            verify_float64=self.verify_float64)
            seconds = (time.perf_counter() - t0) / max(1, batch.shape[0])
            for c, r in zip(preds, radii):
                if r > 0:
                    out.append(Certificate(int(c), float(r), self.method, 0, float("nan"), seconds))
                else:
                    out.append(abstention(0, float("nan"), seconds))
        return out


__all__ = ["METHODS", "interval_bounds", "margin_lower_bounds", "certified_radius", "DeterministicCertifier",
           "read_network"]
