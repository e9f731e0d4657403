"""``surrogate_cert.stats``: the public name of ``surrogate_cert.core.stats`` (every formula, pure numbers).

The same module object, not a copy: importing this one puts ``core.stats`` in its place.
"""

from __future__ import annotations

import sys

from .core import stats as _stats

sys.modules[__name__] = _stats
