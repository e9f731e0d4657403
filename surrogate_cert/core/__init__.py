"""The core layer: statistics, noise sampling, certificate records, the certifiers and the surrogate.

It imports no other part of the project (``data_gen``, ``calibration`` and the top layers import
it), so a formula can be read and changed here without travelling:

- ``stats``: every formula of DESIGN.md, pure functions on numbers (no torch);
- ``smoothing``: noise sampling and Monte Carlo class counts (``SmoothedClassifier``);
- ``certificate``: the ``Certificate`` record and the results TSV;
- ``cohen``, ``sequential``, ``one_pass``: the Cohen, E-process and one-pass certifiers;
- ``surrogate``, ``architectures``: the surrogate model and its training on arrays;
- ``groundtruth``: the exact linear problem the soundness checks use;
- ``errors``, ``hashing``: typed errors, file digests;
- ``files``: what a file is (``sniff``), output checks (``--overwrite``) and atomic writes;
- ``signing``: the HMAC-SHA256 key of calibration signatures (``--key-file``, environment).
"""

from __future__ import annotations

__version__ = "0.1.0"
