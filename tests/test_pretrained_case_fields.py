"""The pretrained one-pass case and the learning stream run end to end at toy size and report every field."""

from __future__ import annotations

import pytest

from surrogate_cert.workflows.learning_case import LEARNING_TINY, run_learning_case
from surrogate_cert.workflows.pretrained_case import PRETRAINED_TINY, run_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def test_pretrained_case_reports_pools_hybrids_required_radius_and_targets(workdir):
    content = run_pretrained(PRETRAINED_TINY, workdir, quiet=True)
    assert set(content["one_pass"]) == {"seen", "augmented+test_pool"}
    assert content["recommended"] == "augmented+test_pool"
    assert {"fallback", "refine_price0.1sigma_sequential", "refine_price0.1sigma_max_upto2sigma"} == set(
        content["hybrid"]
    )
    assert set(content["required_radius"]) == {"1", "2", "3"}
    assert set(content["targets"]) == {"one_pass_best_radius", "hybrid_best_radius", "required_radius", "over_radius"}
    assert len(content["cohen_10k"]["curve"]) == len(content["hybrid"]["fallback"]["curve"])
    assert "| Cohen-10k |" in content["markdown"]


def test_learning_stream_reports_blocks_retrainings_and_targets(workdir):
    content = run_learning_case(LEARNING_TINY, workdir, quiet=True)
    blocks = content["learning"]["blocks"]
    assert sum(b["queries"] for b in blocks) == 120 and len(content["control"]["blocks"]) == 3
    assert len(content["learning"]["retrainings"]) == 1
    assert set(content["targets"]) == {"evaluations", "one_pass_share", "audited_over_radius"}
    assert content["targets"]["audited_over_radius"]["audited"] > 0
