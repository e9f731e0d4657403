"""CROWN: linear relaxations of the ReLUs propagated backwards and concretised over the l2 ball."""

from __future__ import annotations

import math

import torch

from .. import deterministic as _package  # its work-saving settings, read when bounds are computed
from .ibp import _spec_bound
from .network import _Network
from .nonlinear import _Relaxation, _ReLU
from .sets import _box, _coalesce, _per_input, _Set


class _Crown:
    """One CROWN evaluation for a batch of inputs and per-input radii.

    The forward sweep keeps an interval set per layer (and, where cheap, forward-mode linear bounds).
    At every ReLU whose input box is not exact, the neurons that these bounds cannot prove stable get
    CROWN bounds (backward passes from one-hot rows), intersected with the cheap ones. ``prior``
    optionally gives valid bounds of ReLU inputs (e.g. computed for a larger ball) to intersect
    first. :meth:`bound` then bounds any specification ``spec @ z``.
    """

    def __init__(
        self,
        net: _Network,
        x0: torch.Tensor,
        radius: torch.Tensor,
        prior: dict | None = None,
        fixed: dict | None = None,
    ):
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
        while j >= 0 and idx.shape[-1] <= _package.SPARSE_ENTRIES:
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
        if j >= 0 and hasattr(layers[j], "rows") and idx.shape[-1] <= _package.SPARSE_ENTRIES:
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
    if per_input <= _package.CHUNK_ELEMENTS or not split_rows:
        step = max(1, _package.CHUNK_ELEMENTS // per_input)
        for b0 in range(0, n, step):
            yield b0, min(n, b0 + step), 0, rows
        return
    step = max(1, _package.CHUNK_ELEMENTS // per_row)
    for b0 in range(n):
        for s0 in range(0, rows, step):
            yield b0, b0 + 1, s0, min(rows, s0 + step)


def _crown(net: _Network, x0, radius, spec, prior=None):
    """CROWN bounds of ``spec @ z`` (``lb = a - r b``), the interval bound of ``spec @ z`` from the
    same forward sweep, the output box and the ReLU input bounds, in batch chunks (forward-mode
    stacks are large)."""
    n = x0.shape[0]
    step = n
    if net.forward_mode:
        step = max(1, _package.CHUNK_ELEMENTS // (2 * (1 + math.prod(net.in_shape)) * net.max_size[-1]))
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
