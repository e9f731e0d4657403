"""The Pareto benchmark's machinery: recorded streams replay exactly what a live run draws, and a tiny
run reports every row, target and figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.sequential import EProcessCertifier
from surrogate_cert.core.smoothing import STREAM_SELECT, STREAM_SEQUENTIAL, SmoothedClassifier
from surrogate_cert.workflows.pareto import ParetoConfig, RecordedSmoothed, record_streams, run_pareto


def test_replayed_streams_give_the_certificates_of_a_live_run(tmp_path):
    problem = linear_problem(25, sigma=0.25, seed=4)
    smooth = SmoothedClassifier(problem.model, 2, 0.25, device="cpu", seed=9)
    names = np.arange(100, 125)
    cache = tmp_path / "rec.npz"
    rec = record_streams(smooth, problem.x, names, {STREAM_SELECT: 50, STREAM_SEQUENTIAL: 700}, cache)
    again = record_streams(smooth, problem.x, names, {STREAM_SELECT: 50, STREAM_SEQUENTIAL: 600}, cache)
    assert np.array_equal(again[STREAM_SEQUENTIAL], rec[STREAM_SEQUENTIAL][:, :600])  # served from the cache
    replay = RecordedSmoothed(smooth, names, rec)
    for kw in (dict(policy="target_radius", target_radius=0.2), dict(price=0.05), dict(class_choice="per_class")):
        live = EProcessCertifier(smooth, 0.01, max_samples=700, n0=50, **kw).certify(problem.x, indices=names)
        replayed = EProcessCertifier(replay, 0.01, max_samples=700, n0=50, **kw).certify(problem.x, indices=names)
        assert [(c.prediction, c.radius, c.n_samples, c.stop_time) for c in live] == [
            (c.prediction, c.radius, c.n_samples, c.stop_time) for c in replayed
        ]
    with pytest.raises(Exception, match="recorded"):
        replay.sample_predictions(problem.x[:1], 10, indices=[100], stream=STREAM_SEQUENTIAL, start=695)


@pytest.mark.slow
def test_tiny_pareto_run_reports_rows_targets_and_a_figure(tmp_path):
    cfg = ParetoConfig(
        dataset="linear",
        linear_points=40,
        cohen_n=(100, 300),
        max_samples=300,
        prices=(0.1,),
        target_multiples=(1,),
        n0=20,
        linear_offline=(100, 120, 100, 500),
        linear_epochs=3,
    )
    out = tmp_path / "pareto.json"
    content = run_pareto(out, [cfg], workdir=tmp_path / "work", say=lambda _: None)
    data = json.loads(out.read_text())
    rows = data["datasets"]["linear"]["rows"]
    assert {"cohen_100", "cohen_300", "target_1sigma_truncated_model", "best_kt_price0.1_model"} <= set(rows)
    for row in rows.values():
        assert row["samples"] >= row["stop_time"] > 0 and 0 <= row["acr"]
        assert set(row["certified_accuracy"]) == {"0", "1sigma", "2sigma", "3sigma"}
        assert row["wrong"] <= row["allowance"]
    assert (tmp_path / "pareto_linear.png").stat().st_size > 0
    report = (tmp_path / "pareto.html").read_text()
    assert content["report"] == str(tmp_path / "pareto.html") and "data:image/png;base64," in report
    assert "Cohen-100" in report and "overshoot" in report
    assert "overshoot" in data["datasets"]["linear"]["targets"] and "| Cohen-100 |" in content["markdown"]
