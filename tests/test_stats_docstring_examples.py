"""The ``Examples`` in the statistics module's docstrings run, and give what they say."""

from __future__ import annotations

import doctest

from surrogate_cert.core import stats


def test_every_public_formula_has_an_example():
    missing = [
        name
        for name in stats.__all__
        if callable(getattr(stats, name)) and "Examples" not in (getattr(stats, name).__doc__ or "")
    ]
    assert missing == []


def test_stats_examples_pass():
    result = doctest.testmod(stats, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 20 and result.failed == 0
