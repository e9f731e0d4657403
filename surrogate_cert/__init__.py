"""surrogate-cert: certified robustness by randomized smoothing, fast enough for every query.

Certifiers (each returns ``Certificate`` records):

- ``CohenCertifier``: fixed-sample baseline (Cohen et al. 2019); wrong w.p. <= alpha per input.
- ``EProcessCertifier``: anytime-valid sequential test; wrong w.p. <= alpha per input, any stopping rule.
- ``SurrogateCertifier``: one forward pass, split-conformal calibration; wrong w.p. <= epsilon + alpha_mc.
- ``HybridCertifier``: surrogate first, sequential fallback where the calibrated radius is not positive.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import stats
from .certificate import Certificate, read_tsv, write_tsv
from .errors import (
    CalibrationError,
    DatasetError,
    InvalidInputError,
    InvalidParameterError,
    ModelError,
    StoreError,
    SurrogateCertError,
)
from .smoothing import SmoothedClassifier

_LAZY = {
    "CohenCertifier": ".cohen",
    "EProcessCertifier": ".sequential",
    "SurrogateCertifier": ".hybrid",
    "HybridCertifier": ".hybrid",
    "Surrogate": ".surrogate",
}


def __getattr__(name: str):
    # Certifiers import lazily so `import surrogate_cert` stays cheap and modules can land one by one.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'surrogate_cert' has no attribute {name!r}")


__all__ = [
    "stats", "Certificate", "read_tsv", "write_tsv", "SmoothedClassifier", *_LAZY,
    "SurrogateCertError", "InvalidParameterError", "InvalidInputError", "DatasetError", "ModelError",
    "StoreError", "CalibrationError",
]
