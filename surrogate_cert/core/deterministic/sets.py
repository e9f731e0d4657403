"""Sets of activations (an l2 ellipsoid or a box per input) and the tensor helpers of the layer rules."""

from __future__ import annotations

import torch


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
