"""``bench`` reports every method with every field, on the dataset and on the linear ground truth."""

from __future__ import annotations

import json

import pytest

from surrogate_cert.cli import main
from surrogate_cert.workflows.bench import BENCH_TINY, METHODS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    # Shared with the quickstart test: whichever runs first makes the offline stage, the other reuses it.
    return tmp_path_factory.getbasetemp() / "quickstart-quick"


def test_bench_has_every_method_and_field(quick_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--workdir", str(quick_dir), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())  # strict JSON: no NaN / Infinity
    assert list(data["methods"]) == list(METHODS)
    for name, record in data["methods"].items():
        assert set(record["certified_accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
        assert all(0 <= a <= 1 for a in record["certified_accuracy"].values())
        assert record["acr"] >= 0
        assert set(record["mean_evaluations"]) == {"all", "certified", "rest"}
        assert record["mean_evaluations"]["all"] >= 0
        assert record["images_per_second"] > 0
        assert record["evaluations_vs_cohen_10k"] >= 0 and record["images_per_second_vs_cohen_10k"] > 0
        truth = record["ground_truth"]
        assert truth["inputs"] == BENCH_TINY.linear_points[2]
        assert 0 <= truth["wrong"] <= truth["certified"] <= truth["inputs"]
        assert truth["rate"] == truth["wrong"] / truth["inputs"]
        assert truth["bound"] > 0 or (name in ("ibp", "crown") and truth["wrong"] == 0)
        assert truth["within_bound"], (name, truth)
        assert record["label"] in printed
    methods = data["methods"]
    n_big, n_small = BENCH_TINY.cohen_n
    assert methods["cohen_10k"]["mean_evaluations"]["all"] == n_big + BENCH_TINY.n0
    assert methods["cohen_1k"]["mean_evaluations"]["all"] == n_small + BENCH_TINY.n0
    assert methods["surrogate"]["mean_evaluations"]["all"] == 0
    assert methods["ibp"]["mean_evaluations"]["all"] == methods["crown"]["mean_evaluations"]["all"] == 0
    assert methods["hybrid"]["mean_evaluations"]["all"] <= methods["sequential_surrogate"]["mean_evaluations"]["all"]
    assert data["setup"]["test_images"] == BENCH_TINY.test_limit and data["setup"]["offline_evaluations"] > 0
    assert "| Hybrid |" in data["markdown"]
    assert (quick_dir / "bench" / "report.html").exists()
