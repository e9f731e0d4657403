"""surrogate-cert: certified robustness by randomized smoothing, fast enough for every query.

Certifiers (each returns ``Certificate`` records):

- ``CohenCertifier``: fixed-sample baseline (Cohen et al. 2019); wrong w.p. <= alpha per input.
- ``EProcessCertifier``: anytime-valid sequential test; wrong w.p. <= alpha per input, any stopping rule.
- ``SurrogateCertifier``: one forward pass, split-conformal calibration; wrong w.p. <= epsilon + alpha_mc.
- ``HybridCertifier``: surrogate first, sequential fallback where the calibrated radius is not positive.

Watchers of a deployment: ``DriftMonitor`` (alarms when queries stop being exchangeable with the
calibration images) and ``CertificateAudit`` (re-checks a random share of one-pass certificates).

The public names below are imported lazily (module ``__getattr__``), so ``import surrogate_cert``
and importing its core never import the layers above the core. Layers, top down: ``cli``,
``workflows``, ``deploy``, the domain packages ``calibration`` and ``data_gen``, and ``core``
(see ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib

from . import _moved
from .core import __version__

# ``surrogate_cert.stats`` is public API (DESIGN.md: ``sc.stats.clopper_pearson``): the module
# ``surrogate_cert/stats.py`` is ``core.stats`` itself, imported on first use (SciPy loads then).
_moved.install()

_LAZY = {
    "Certificate": ".core.certificate",
    "read_tsv": ".core.certificate",
    "write_tsv": ".core.certificate",
    "read_meta": ".core.certificate",
    "SmoothedClassifier": ".core.smoothing",
    "CohenCertifier": ".core.cohen",
    "EProcessCertifier": ".core.sequential",
    "SurrogateCertifier": ".core.one_pass",
    "Surrogate": ".core.surrogate",
    "HybridCertifier": ".deploy.hybrid",
    "DriftMonitor": ".deploy.monitor",
    "CertificateAudit": ".deploy.monitor",
    "SurrogateCertError": ".core.errors",
    "InvalidParameterError": ".core.errors",
    "InvalidInputError": ".core.errors",
    "DatasetError": ".core.errors",
    "ModelError": ".core.errors",
    "StoreError": ".core.errors",
    "CalibrationError": ".core.errors",
    "SignatureError": ".core.errors",
    "OutputExistsError": ".core.errors",
}


def __getattr__(name: str):
    if name == "stats":
        return importlib.import_module(".stats", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'surrogate_cert' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"stats"})


__all__ = ["__version__", "stats", *_LAZY]
