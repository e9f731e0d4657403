"""The ``shaped`` best-radius score: the required-radius thresholds' shape, one conformal shift for all radii.

Required-radius thresholds ``tau(r)`` (``conformal.fit_radius_thresholds``) certify each fixed radius far
better than the residual score's ``R~ - q^ >= r``, but reading a best radius off them (the largest ``r``
with ``z~ > tau(r)``) is not covered: each ``tau(r)`` holds for its own ``r``, and the union over ``r`` is
not bounded (``tests/test_shaped_score_soundness.py`` shows it failing). The ``shaped`` score keeps their
shape and pays for the union once: on a tuning part of the calibration split the thresholds ``g(r)`` are
fitted (any non-decreasing ``g`` would do; these follow ``z~``'s relation to the radius); on the other
part, the scores ``z~_i - g(r+(y_i))`` (``stats.shaped_scores``) give one conformal shift ``c``. Deployed,
``R^(x) = max{r in grid : z~ > g(r) + c}`` (``core.one_pass.deployed_radius``), and
``P(R^ > y) <= epsilon`` for an exchangeable test point (``shaped_scores`` says why), so a certificate is
wrong with probability at most ``epsilon + alpha_mc``, marginally, as with every one-pass score.
"""

from __future__ import annotations

import numpy as np

from surrogate_cert.core import stats

from .conformal import fit_radius_thresholds, quantile_rank

__all__ = ["fit_shaped"]


SHAPE_LEVEL = 0.5
"""The shape ``g`` is the tuning part's thresholds at ``SHAPE_LEVEL * epsilon``. Where fewer points than that
level allows have ``y < r``, a threshold is ``-inf`` (every input certifies ``r``); points whose ``y`` falls
there then score above any finite shift. At half the level they are about half of the ``epsilon`` budget the
shift may leave above it, so the shift lands among the other points' scores instead of on theirs."""


def fit_shaped(
    z_tune,
    y_tune,
    z_cal,
    y_cal,
    cap: float,
    sigma: float,
    epsilon: float,
    *,
    guarantee: str = "marginal",
    delta: float | None = None,
    shape_level: float = SHAPE_LEVEL,
) -> dict:
    """The ``shaped`` score's parameters: the shape ``g`` on the TUNING points, the shift ``c`` on the others.

    Parameters
    ----------
    z_tune, y_tune : array_like of float
        ``z~`` and reference radius ``y`` of the tuning points (never the calibration part).
    z_cal, y_cal : array_like of float
        The same of the calibration part: ``c`` is the conformal quantile of their scores.
    cap : float
        The calibration's radius cap (the grid's end).
    sigma : float
        Noise level.
    epsilon : float
        Target rate of the shift.
    guarantee : {"marginal", "pac"}, optional
        The quantile rule of ``c`` (``quantile_rank``).
    delta : float, optional
        PAC confidence parameter.
    shape_level : float, optional
        The shape's level, a share of ``epsilon`` (``SHAPE_LEVEL``); it shapes ``g`` only.

    Returns
    -------
    dict
        ``score_params``: ``grid`` (radii, l2 units), ``shape`` (``g``, ``null`` = never), ``shift`` (``c``,
        ``null`` = never certifies), ``rule``.
    """
    table = fit_radius_thresholds(z_tune, y_tune, cap, sigma, shape_level * epsilon)
    grid, shape = table["grid"], table["tau"]
    scores = np.sort(stats.shaped_scores(z_cal, y_cal, grid, shape))
    m = len(scores)
    rank = quantile_rank(m, epsilon, guarantee, delta)
    if rank > m:
        shift = None  # too few points for epsilon: never certifies
    else:
        # -inf: the quantile point cannot be wrong at any radius; the lowest z~ keeps the shift finite.
        shift = max(float(scores[rank - 1]), -(stats.Z_MAX + 1.0))
    return dict(
        grid=grid,
        shape=shape,
        shift=shift,
        shape_level=float(shape_level),
        rule="g = required-radius thresholds of the tuning part at shape_level * epsilon; c = conformal "
        "quantile of z~ - g(r+(y)) on the calibration part (stats.shaped_scores)",
    )
