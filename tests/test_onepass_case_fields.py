"""The one-pass case (``benchmarks/onepass_mnist.py``) runs end to end at toy size and reports every section."""

from __future__ import annotations

import json

import pytest

from surrogate_cert.workflows.onepass_case import ONEPASS_TINY, run_onepass


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_onepass_case_reports_every_scheme_the_hybrid_and_required_radius(tmp_path):
    out = tmp_path / "onepass.json"
    content = run_onepass(ONEPASS_TINY, tmp_path / "work", out=str(out), quiet=True)
    data = json.loads(out.read_text())  # strict JSON: no NaN / Infinity
    assert set(data) >= {"setup", "cohen_10k", "one_pass", "hybrid", "required_radius", "frontier", "markdown"}
    for epsilon in ONEPASS_TINY.epsilons:
        key = f"{epsilon:g}"
        assert set(data["one_pass"][key]) >= {"pooled", "shifted", "mondrian_train"}
        for row in data["one_pass"][key].values():
            assert row["mean_evaluations"] == 0 and 0 <= row["certified_accuracy"]["0"] <= 1
            assert row["over_radius"] <= row["over_radius_allowance"]
        for row in data["hybrid"][key].values():
            assert row["mean_evaluations"] <= ONEPASS_TINY.max_samples
    assert data["cohen_10k"]["mean_evaluations"] == ONEPASS_TINY.test_n + ONEPASS_TINY.test_n0
    for both in data["issued"].values():  # the issued guarantee beside the marginal rule
        issued = both["issued"]
        assert issued["guarantee"] == "issued" and both["marginal"]["one_pass"]["guarantee"] == "marginal"
        assert issued["over_radius"] <= issued["over_radius_allowance_among_certified"]
        assert set(issued["required_radius"]) == {f"{s:g}" for s in ONEPASS_TINY.required_sigmas}
        assert issued["hybrid"]["mean_evaluations"] <= ONEPASS_TINY.max_samples
    assert "issued guarantee beside the marginal rule" in data["markdown"]
    assert content["markdown"] == data["markdown"]
