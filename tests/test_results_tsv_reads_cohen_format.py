"""Results TSVs written by Cohen et al.'s reference code (time as H:MM:SS.ffffff, six columns) read unchanged."""

from surrogate_cert.core.certificate import Certificate, read_tsv, write_tsv


def test_cohen_reference_time_column_is_read_as_seconds(tmp_path):
    path = tmp_path / "cohen_reference.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.512\t1\t0:00:01.250000\n1\t7\t-1\t0.0\t0\t0:01:02.5\n"
    )
    rows = read_tsv(path)
    assert [r["time"] for r in rows] == [1.25, 62.5]
    assert [r["method"] for r in rows] == ["cohen", "abstain"]


def test_our_tsv_round_trips(tmp_path):
    path = tmp_path / "ours.tsv"
    certs = [Certificate(3, 0.5, "surrogate", 0, 0.977, 0.001), Certificate(-1, 0.0, "abstain", 10_000, 0.4, 2.0)]
    write_tsv(path, [10, 11], [3, 5], certs, meta={"command": "surrogate-cert certify ..."})
    rows = read_tsv(path)
    assert [(r["predict"], r["radius"], r["correct"], r["method"], r["n_samples"]) for r in rows] == [
        (3, 0.5, 1, "surrogate", 0),
        (-1, 0.0, 0, "abstain", 10_000),
    ]
