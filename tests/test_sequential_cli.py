"""``surrogate-cert sequential``: writes the results TSV; bad input is one line, exit 2."""

from __future__ import annotations

import pytest

from surrogate_cert.cli import main
from surrogate_cert.core.certificate import read_meta, read_tsv


@pytest.mark.parametrize("extra", [["--target-radius", "0.25", "--prior", "4,1"], ["--class-choice", "per_class"]])
def test_sequential_writes_the_results_tsv(digits_untrained_model, tmp_path, extra):
    out = tmp_path / "seq.tsv"
    rc = main(
        [
            "sequential",
            "--model",
            str(digits_untrained_model),
            "--dataset",
            "digits",
            "--split",
            "test",
            "--sigma",
            "0.25",
            "--alpha",
            "0.01",
            "--max-samples",
            "300",
            "--n0",
            "20",
            "--limit",
            "6",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    rows = read_tsv(out)
    assert len(rows) == 6
    assert all(r["method"] in ("eprocess", "abstain") and 0 < r["n_samples"] <= 320 for r in rows)
    assert read_meta(out)["command"].startswith("surrogate-cert sequential")


@pytest.mark.parametrize(
    "flag,value,word",
    [
        ("--prior", "0,1", "prior"),
        ("--prior", "flat", "prior"),
        ("--target-radius", "-1", "target_radius"),
        ("--max-samples", "0", "max_samples"),
        ("--alpha", "1.5", "alpha"),
    ],
)
def test_sequential_bad_parameters_exit_2_with_one_line(digits_untrained_model, tmp_path, capsys, flag, value, word):
    rc = main(
        [
            "sequential",
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


@pytest.fixture(scope="module")
def untrained_surrogate(tmp_path_factory):
    from surrogate_cert.core.surrogate import Surrogate

    path = tmp_path_factory.mktemp("surrogate") / "surrogate.pt"
    Surrogate.build((1, 8, 8), 10, 0.25, seed=0, device="cpu").save(path)
    return str(path)


def _sequential(model, out, *extra):
    return main(
        [
            "sequential",
            "--model",
            str(model),
            "--dataset",
            "digits",
            "--split",
            "test",
            "--sigma",
            "0.25",
            "--alpha",
            "0.01",
            "--max-samples",
            "300",
            "--limit",
            "6",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "source,extra", [("model", []), ("surrogate", ["--prior", "surrogate"]), ("surrogate", ["--target-radius", "0.25"])]
)
def test_class_from_a_model_or_surrogate_draws_no_pilot(
    digits_untrained_model, untrained_surrogate, tmp_path, source, extra
):
    out = tmp_path / "seq.tsv"
    class_from = digits_untrained_model if source == "model" else untrained_surrogate
    assert _sequential(digits_untrained_model, out, "--class-from", class_from, *extra) == 0
    rows = read_tsv(out)
    assert len(rows) == 6 and all(0 < r["stop_time"] <= r["n_samples"] <= 300 for r in rows)  # no pilot
    meta = read_meta(out)
    assert meta["class_source"] == source and meta["n0"] == 0


def test_price_flag_and_stop_time_column(digits_untrained_model, tmp_path):
    out = tmp_path / "seq.tsv"
    assert _sequential(digits_untrained_model, out, "--price", "0.05", "--class-choice", "per_class") == 0
    assert "\tn_samples\tstop_time\t" in out.read_text().splitlines()[0]
    assert read_meta(out)["price"] == 0.05


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--prior", "surrogate"], "class-from"),
        (["--prior", "truncated"], "target-radius"),
        (["--price", "0.05", "--target-radius", "0.25"], "price"),
        (["--price", "-1"], "price"),
        (["--class-from", "missing.pt"], "class-from"),
        (["--class-from", "MODEL", "--class-choice", "pilot"], "class"),
        (["--class-from", "MODEL", "--prior", "surrogate"], "surrogate"),
    ],
)
def test_sequential_flag_conflicts_exit_2_with_one_line(digits_untrained_model, tmp_path, capsys, extra, word):
    extra = [digits_untrained_model if e == "MODEL" else e for e in extra]
    rc = _sequential(digits_untrained_model, tmp_path / "x.tsv", *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and word in err
    assert not (tmp_path / "x.tsv").exists()
