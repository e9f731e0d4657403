"""The piecewise-linear layers: ReLU (with CROWN's relaxation of it) and max pooling (IBP pools the
bounds; CROWN rewrites it exactly as a tournament of ReLUs)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import deterministic as _package  # its work-saving settings, read when a layer is used
from ..errors import ModelError
from .layers import _Gather, _Layer, _Reshape, _Stack
from .sets import _box, _shift_constant
from .support import SUPPORTED


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

    def relaxation(self, lo, hi) -> _Relaxation:
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

    def sparse(self, idx, coef, relaxation: _Relaxation):
        """The CROWN rule below for sparse rows (the entries of a row must have distinct indices)."""
        n, s, k = idx.shape
        flat_idx = idx.reshape(n, -1)

        def at(t):
            return t.reshape(n, -1).gather(1, flat_idx).reshape(n, s, k)

        pos = coef.clamp(min=0)
        neg = coef - pos
        new = pos * at(relaxation.lower_slope) + neg * at(relaxation.upper_slope)
        return idx, new, (neg * at(relaxation.upper_shift)).sum(2)

    def backward(self, lam, relaxation: _Relaxation):
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

    def __getitem__(self, batch: slice) -> _Relaxation:
        new = copy.copy(self)
        for key, value in vars(self).items():
            setattr(new, key, value[batch])
        return new


class _MaxPool(_Layer):
    """``nn.MaxPool2d``. IBP pools both bounds; CROWN uses :meth:`relaxation_layers`."""

    name = "MaxPool2d"

    def __init__(self, kernel, stride, padding, dilation, ceil_mode, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode = (
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        )

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
            raise ModelError(
                "MaxPool2d has a window with no input cell (padding too large for this input size); " + SUPPORTED
            )
        # padding cells (value -inf in PyTorch) are replaced by a real cell of the same window
        rows = torch.where(ok_r, rows, rows.gather(1, ok_r.to(torch.int8).argmax(1, keepdim=True)))
        cols = torch.where(ok_c, cols, cols.gather(1, ok_c.to(torch.int8).argmax(1, keepdim=True)))
        cell = rows.reshape(h_out, 1, kh, 1) * w + cols.reshape(1, w_out, 1, kw)  # h_out x w_out x kh x kw
        cell = cell.permute(2, 3, 0, 1).reshape(kh * kw, 1, h_out, w_out)
        index = (cell + torch.arange(c).reshape(1, c, 1, 1) * (h * w)).reshape(-1).to(device)
        m = kh * kw
        tiles = (
            self.stride == self.kernel
            and self.padding == (0, 0)
            and self.dilation == (1, 1)
            and h == h_out * kh
            and w == w_out * kw
        )  # non-overlapping windows covering the input
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
            layers.append(_ReLU((size, c, h_out, w_out), mask=full_mask, refine=_package.REFINE_MAXPOOL))
            layers.append(_Stack(combine.to(device), (size, c, h_out, w_out), (pairs + odd, c, h_out, w_out)))
            pending = combine
            m = pairs + odd
        end = _Reshape(layers[-1].out_shape, self.out_shape)
        layers[0].pool_start, end.pool_end = self, self  # the CROWN pass intersects with direct pooling
        layers.append(end)
        return layers
