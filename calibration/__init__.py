"""Conformal calibration of the surrogate (MAPIE), the calibration artifact, and report numbers.

``calibrate(surrogate, counts_file, epsilon, alpha_mc, ...)`` returns a ``Calibration`` whose
``save`` writes calibration.json; ``load_calibration(path, surrogate=None)`` reads it back and
refuses tampered or mismatched files. ``fit_offsets`` / ``calibrate_arrays`` do the same on
arrays. ``summary`` computes the numbers of the reports and ``figures`` draws them.

This package imports the core (``surrogate_cert.core``) and the counts store's reader
(``data_gen.store``), nothing else of the project.
"""

from __future__ import annotations

from surrogate_cert.core.one_pass import deployed_radius
from surrogate_cert.core.stats import conformity_scores, reference_radius, surrogate_radius

from .artifact import Calibration, load_calibration
from .conformal import SurrogateRadiusRegressor, calibrate, calibrate_arrays, fit_offsets

__all__ = [
    "Calibration",
    "load_calibration",
    "calibrate",
    "calibrate_arrays",
    "fit_offsets",
    "deployed_radius",
    "SurrogateRadiusRegressor",
    "reference_radius",
    "conformity_scores",
    "surrogate_radius",
]
