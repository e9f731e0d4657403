"""``surrogate-cert sequential``: writes the results TSV; bad input is one line, exit 2."""
from __future__ import annotations

import pytest

from surrogate_cert.core.certificate import read_meta, read_tsv
from surrogate_cert.cli import main


@pytest.mark.parametrize("extra", [["--target-radius", "0.25", "--prior", "4,1"], ["--class-choice", "per_class"]])
def test_sequential_writes_the_results_tsv(digits_untrained_model, tmp_path, extra):
    out = tmp_path / "seq.tsv"
    rc = main(["sequential", "--model", str(digits_untrained_model), "--dataset", "digits", "--split", "test",
               "--sigma", "0.25", "--alpha", "0.01", "--max-samples", "300", "--n0", "20", "--limit", "6",
               "--device", "cpu", "--no-progress", "--out", str(out), *extra])
    assert rc == 0
    rows = read_tsv(out)
    assert len(rows) == 6
    assert all(r["method"] in ("eprocess", "abstain") and 0 < r["n_samples"] <= 320 for r in rows)
    assert read_meta(out)["command"].startswith("surrogate-cert sequential")


@pytest.mark.parametrize(
    "flag,value,word",
    [("--prior", "0,1", "prior"), ("--prior", "flat", "prior"), ("--target-radius", "-1", "target_radius"),
     ("--max-samples", "0", "max_samples"), ("--alpha", "1.5", "alpha")],
)
def test_sequential_bad_parameters_exit_2_with_one_line(digits_untrained_model, tmp_path, capsys, flag, value, word):
    rc = main(["sequential", "--model", str(digits_untrained_model), "--limit", "2", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "x.tsv"), flag, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and word in err
    assert not (tmp_path / "x.tsv").exists()
