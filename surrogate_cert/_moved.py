"""Module paths of version 0.1, kept importable (with a DeprecationWarning) after the move to layers.

``import surrogate_cert.hybrid`` (or ``from surrogate_cert.smoothing import SmoothedClassifier``)
still works: a meta-path finder answers each old name with a small alias module whose attributes
are looked up, in order, in the modules that now hold them. Nothing here is used by the package
itself; remove an entry one release after its deprecation.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "surrogate_cert.errors": ("surrogate_cert.core.errors",),
    "surrogate_cert.hashing": ("surrogate_cert.core.hashing",),
    "surrogate_cert.smoothing": ("surrogate_cert.core.smoothing",),
    "surrogate_cert.certificate": ("surrogate_cert.core.certificate",),
    "surrogate_cert.cohen": ("surrogate_cert.core.cohen",),
    "surrogate_cert.sequential": ("surrogate_cert.core.sequential",),
    "surrogate_cert.architectures": ("surrogate_cert.core.architectures",),
    "surrogate_cert.groundtruth": ("surrogate_cert.core.groundtruth",),
    "surrogate_cert.surrogate": ("surrogate_cert.core.surrogate", "surrogate_cert.workflows.training"),
    "surrogate_cert.hybrid": ("surrogate_cert.deploy.hybrid", "surrogate_cert.core.one_pass"),
    "surrogate_cert.pipeline": ("surrogate_cert.workflows.pipeline",),
    "surrogate_cert.bench": ("surrogate_cert.workflows.bench",),
    "calibration.report": ("surrogate_cert.workflows.report", "calibration.summary", "calibration.figures"),
}
"""Old module name -> the modules its names now live in (searched in order)."""


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default: a fresh, empty module

    def exec_module(self, module):
        targets = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} is deprecated; import from {' or '.join(targets)}", DeprecationWarning, stacklevel=2
        )
        homes = [importlib.import_module(name) for name in targets]

        def __getattr__(name: str):
            for home in homes:
                if hasattr(home, name):
                    return getattr(home, name)
            raise AttributeError(
                f"module {module.__name__!r} (moved to {', '.join(targets)}) has no attribute {name!r}"
            )

        module.__getattr__ = __getattr__
        module.__doc__ = f"Deprecated alias of {', '.join(targets)}."


_FINDER = _AliasFinder()


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


__all__ = ["MOVED", "install"]
