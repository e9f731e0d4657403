"""The affine and copying layers of a read network, each with its IBP, ellipsoid, forward-mode and CROWN rules."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .sets import _box, _center_radius, _compact, _flat_sum, _per_input, _Set, _shift_constant, _signed


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

    def to(self, dtype) -> _Layer:
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
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

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
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        # conv_transpose2d needs output_padding to land exactly on the input size
        kh, kw = weight.shape[2:]
        self.output_padding = tuple(
            in_shape[1 + i] - ((out_shape[1 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1)
            for i, k in enumerate((kh, kw))
        )

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
        back = F.conv_transpose2d(
            flat, self.weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )
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
                canvas.index_put_(
                    (rows, group, ho * sh + a * dh, wo * sw + b * dw), weights[:, :, a, b], accumulate=True
                )
        lam = canvas[:, :, ph : ph + h, pw : pw + w].permute(0, 1, 4, 2, 3).reshape(n, s, c_in, h, w)
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
