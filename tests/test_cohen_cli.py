"""``surrogate-cert cohen``: writes the results TSV (header first) and its provenance sidecar.

Bad input is one line, exit 2.
"""

from __future__ import annotations

import pytest

from surrogate_cert.cli import main
from surrogate_cert.core.certificate import TSV_COLUMNS, meta_path, read_meta, read_tsv


def test_cohen_writes_the_results_tsv(digits_untrained_model, tmp_path, capsys):
    out = tmp_path / "cohen.tsv"
    rc = main(
        [
            "cohen",
            "--model",
            str(digits_untrained_model),
            "--dataset",
            "digits",
            "--split",
            "test",
            "--sigma",
            "0.25",
            "--n0",
            "20",
            "--n",
            "200",
            "--alpha",
            "0.01",
            "--limit",
            "6",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = read_tsv(out)
    assert len(rows) == 6
    assert all(r["n_samples"] == 220 and r["method"] in ("cohen", "abstain") for r in rows)
    assert all((r["predict"] == -1) == (r["radius"] == 0) for r in rows)
    meta = read_meta(out)
    assert meta["command"].startswith("surrogate-cert cohen") and meta["torch"] and meta["n"] == 200
    assert meta["sigma"] == 0.25 and meta["device"] == "cpu" and (tmp_path / "cohen.tsv.meta.json").exists()
    assert meta_path(out) == str(out) + ".meta.json"
    assert out.read_text().splitlines()[0].split("\t") == list(TSV_COLUMNS)
    assert "certified accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,word", [("--alpha", "0", "alpha"), ("--n", "0", "n"), ("--n0", "-3", "n0")])
def test_cohen_bad_parameters_exit_2_with_one_line(digits_untrained_model, tmp_path, capsys, flag, value, word):
    rc = main(
        [
            "cohen",
            "--model",
            str(digits_untrained_model),
            "--limit",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / "x.tsv"),
            flag,
            value,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and word in err
    assert not (tmp_path / "x.tsv").exists()
