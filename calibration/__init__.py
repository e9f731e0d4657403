"""Conformal calibration of the surrogate (MAPIE), the calibration artifact, and reports.

``calibrate(surrogate, counts_file, epsilon, alpha_mc, ...)`` returns a ``Calibration`` whose
``save`` writes calibration.json; ``load_calibration(path, surrogate=None)`` reads it back and
refuses tampered or mismatched files. ``fit_offsets`` is the same calibration on plain arrays.
"""
from __future__ import annotations

from .artifact import Calibration, load_calibration
from .conformal import (
    SurrogateRadiusRegressor,
    calibrate,
    calibrate_arrays,
    conformity_scores,
    deployed_radius,
    fit_offsets,
    reference_radius,
    surrogate_radius,
)

__all__ = [
    "Calibration", "load_calibration", "calibrate", "calibrate_arrays", "fit_offsets", "deployed_radius",
    "SurrogateRadiusRegressor", "reference_radius", "conformity_scores", "surrogate_radius",
]
