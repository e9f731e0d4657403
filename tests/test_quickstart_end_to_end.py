"""The whole pipeline, end to end, in its reduced mode: the CI check that every stage fits together."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from surrogate_cert.cli import main
from surrogate_cert.core.certificate import read_tsv
from surrogate_cert.workflows.pipeline import QUICK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    # One folder per test session, shared with the bench test (which reuses its offline stage).
    return tmp_path_factory.getbasetemp() / "quickstart-quick"


def test_quickstart_quick_runs_every_stage_and_reuses_them(quick_dir, capsys):
    # --resume: the bench test may already have made the offline stage in this folder.
    assert main(["quickstart", "--quick", "--out", str(quick_dir), "--no-progress", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "certified accuracy at radius" in out and "report:" in out and "speed-up" in out
    for name in (
        "base.pt",
        "train.h5",
        "cal.h5",
        "test.h5",
        "surrogate.pt",
        "calibration.json",
        "calibration-report.html",
        "hybrid.tsv",
        "cohen-300.tsv",
        "report.html",
        "report.md",
        "report.json",
    ):
        assert (quick_dir / name).stat().st_size > 0, name

    hybrid = read_tsv(quick_dir / "hybrid.tsv")
    cohen = read_tsv(quick_dir / "cohen-300.tsv")
    assert len(hybrid) == len(cohen) == QUICK.test_limit
    assert [r["idx"] for r in hybrid] == [r["idx"] for r in cohen]
    assert {r["method"] for r in hybrid} <= {"surrogate", "eprocess", "abstain"}
    assert all(r["n_samples"] == QUICK.test_n + QUICK.test_n0 for r in cohen)
    assert all(0 <= r["n_samples"] <= QUICK.max_samples for r in hybrid)

    report = json.loads((quick_dir / "report.json").read_text())
    assert set(report["runs"]) == {"cohen-300", "hybrid"}
    assert report["calibration"]["check"]["num_images"] == QUICK.test_limit
    html = (quick_dir / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)

    summary = json.loads((quick_dir / "quickstart.json").read_text())["summary"]
    assert (
        summary["methods"]["hybrid"]["mean_evaluations_per_query"]
        < summary["methods"]["cohen-300"]["mean_evaluations_per_query"]
    )

    # Re-run: refused without --resume (the folder holds files); with it, every stage is reused.
    assert main(["quickstart", "--quick", "--out", str(quick_dir), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["quickstart", "--quick", "--out", str(quick_dir), "--no-progress", "--resume"]) == 0
    again = capsys.readouterr().out
    assert again.count(": reused") == 8
    assert read_tsv(quick_dir / "hybrid.tsv") == hybrid


def test_cohen_from_stored_counts_equals_cohen_certifier(quick_dir):
    """The quickstart's Cohen results come from test.h5: they must be CohenCertifier's, to the bit."""
    from data_gen.datasets import load_split
    from data_gen.models import load_model
    from data_gen.store import read_counts
    from surrogate_cert import CohenCertifier, SmoothedClassifier
    from surrogate_cert.core.cohen import certificates_from_counts

    if not (quick_dir / "test.h5").exists():
        main(["quickstart", "--quick", "--out", str(quick_dir), "--no-progress", "--resume"])
    counts = read_counts(quick_dir / "test.h5")
    rows = np.arange(4)
    from_counts = certificates_from_counts(counts.counts_select[rows], counts.counts[rows], QUICK.alpha, QUICK.sigma)
    data = load_split("digits", "test").take(counts.indices[rows])
    model = load_model(str(quick_dir / "base.pt"), device="cpu").model
    smooth = SmoothedClassifier(model, 10, QUICK.sigma, device="cpu", seed=QUICK.seed)
    direct = CohenCertifier(smooth).certify(
        data.x, n0=QUICK.test_n0, n=QUICK.test_n, alpha=QUICK.alpha, indices=data.indices
    )
    assert [(c.prediction, c.radius, c.n_samples, c.p_lower) for c in from_counts] == [
        (c.prediction, c.radius, c.n_samples, c.p_lower) for c in direct
    ]
