"""Bounds of the logits and of the margins over an l2 ball (public: interval_bounds, margin_lower_bounds)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, InvalidParameterError, ModelError
from ..smoothing import check_images
from .crown import _crown
from .ibp import _ibp_margins, _ibp_output
from .network import _Network
from .reading import read_network
from .support import METHODS


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


def interval_bounds(
    model: nn.Module,
    x: torch.Tensor,
    radius: float | Sequence[float],
    method: str = "ibp",
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of every logit over an l2 ball around each input.

    Parameters
    ----------
    model : nn.Module
        A supported classifier (see :mod:`surrogate_cert.core.deterministic`), N x C x H x W -> N x K logits, eval mode.
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
        (in exact arithmetic; up to rounding of ``dtype``, see :mod:`surrogate_cert.core.deterministic`).
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


def margin_lower_bounds(
    model: nn.Module,
    x: torch.Tensor,
    radius: float | Sequence[float],
    method: str = "crown",
    *,
    target: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
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
