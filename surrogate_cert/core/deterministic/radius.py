"""The largest certified l2 radius per input: a batched search, then a float64 re-check."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import InvalidParameterError
from .bounds import _check_method, _margin_spec, _margins, _prepare, _targets
from .crown import _Crown
from .network import _Network
from .sets import _per_input


def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "crown",
    *,
    max_radius: float | None = None,
    tol: float = 1e-3,
    iterations: int = 40,
    verify_float64: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
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
        grads = torch.stack(
            [
                torch.autograd.grad(z[:, k].sum(), x, retain_graph=True)[0].reshape(len(x), -1)
                for k in range(net.num_classes)
            ],
            1,
        )  # N x K x D
    margin = torch.einsum("nsk,nk->ns", spec, z.detach())
    norm = torch.einsum("nsk,nkd->nsd", spec, grads).norm(dim=2)
    distance = torch.where(norm > 0, margin / norm.clamp(min=1e-30), torch.full_like(margin, math.inf))
    return margin, distance.min(1).values


def _store(store: dict, bounds: dict, n: int, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """``store[i][.][rows] = bounds[i][.][mask]`` for every ReLU layer i (full-batch tensors)."""
    for i, (b_lo, b_hi) in bounds.items():
        if i not in store:
            shape = (n, *b_lo.shape[1:])
            store[i] = (
                torch.full(shape, -math.inf, dtype=b_lo.dtype, device=b_lo.device),
                torch.full(shape, math.inf, dtype=b_lo.dtype, device=b_lo.device),
            )
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
