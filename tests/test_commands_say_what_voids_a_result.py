"""What a newcomer would get wrong, said by the command itself: a --sigma other than the model's is
refused (unless asked for), a report of runs on different images warns in its output and in the
report, the monitor takes a dataset split as its stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import calibrate_arrays
from data_gen.datasets import load_split
from surrogate_cert.cli import main
from surrogate_cert.core.certificate import Certificate, write_tsv
from surrogate_cert.core.surrogate import Surrogate


def test_datagen_and_cohen_refuse_a_sigma_the_model_does_not_declare(digits_untrained_model, tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert (
        main(
            [
                "datagen",
                "--dataset",
                "digits",
                "--split",
                "cal",
                "--model",
                digits_untrained_model,
                "--sigma",
                "0.5",
                "--samples",
                "20",
                "--limit",
                "3",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "declares sigma 0.25" in err and "--sigma is 0.5" in err and "--allow-sigma-mismatch" in err
    assert not out.exists()
    assert (
        main(
            [
                "cohen",
                "--model",
                digits_untrained_model,
                "--sigma",
                "0.5",
                "--samples",
                "50",
                "--limit",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(tmp_path / "c.tsv"),
            ]
        )
        == 2
    )
    assert "declares sigma 0.25" in capsys.readouterr().err and not (tmp_path / "c.tsv").exists()
    # Asked for explicitly: done.
    assert (
        main(
            [
                "datagen",
                "--dataset",
                "digits",
                "--split",
                "cal",
                "--model",
                digits_untrained_model,
                "--sigma",
                "0.5",
                "--allow-sigma-mismatch",
                "--samples",
                "20",
                "--limit",
                "3",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )


def _results(path, indices):
    certificates = [
        Certificate(prediction=1, radius=0.3, method="cohen", n_samples=100, p_lower=0.9, seconds=0.01) for _ in indices
    ]
    write_tsv(path, indices, [1] * len(indices), certificates, meta={"sigma": 0.25})


def test_report_warns_when_the_runs_certified_different_images(tmp_path, capsys):
    _results(tmp_path / "cohen.tsv", range(10))
    _results(tmp_path / "hybrid.tsv", range(40))
    assert (
        main(
            [
                "report",
                "--results",
                str(tmp_path / "cohen.tsv"),
                str(tmp_path / "hybrid.tsv"),
                "--out",
                str(tmp_path / "r.html"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "warning: the compared runs certified different images (cohen on 10, hybrid on 40; 10 in common)" in out
    assert "Warning:" in (tmp_path / "r.html").read_text() and "Warning:" in (tmp_path / "r.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["image_sets"]["same"] is False
    # The same images: no warning.
    _results(tmp_path / "other.tsv", range(10))
    assert (
        main(
            [
                "report",
                "--results",
                str(tmp_path / "cohen.tsv"),
                str(tmp_path / "other.tsv"),
                "--out",
                str(tmp_path / "s.html"),
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().out
    assert "Warning:" not in (tmp_path / "s.html").read_text()


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor_split")
    surrogate = Surrogate.build((1, 8, 8), 10, 0.25, seed=0, device="cpu")
    surrogate.meta = dict(dataset="digits")
    surrogate.save(folder / "surrogate.pt")
    cal = load_split("digits", "cal")
    probabilities = surrogate.predict_proba(cal.x)
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(200, p / p.sum()) for p in probabilities])
    calibrate_arrays(surrogate, cal.x, counts, 0.1, 1e-3).save(folder / "calibration.json")
    return folder


def test_monitor_streams_a_dataset_split(monitored, capsys):
    args = [
        "monitor",
        "--surrogate",
        str(monitored / "surrogate.pt"),
        "--calibration",
        str(monitored / "calibration.json"),
        "--no-progress",
    ]
    assert main([*args, "--stream", "test", "--limit", "60", "--out", str(monitored / "m.json")]) == 0
    doc = json.loads((monitored / "m.json").read_text())
    assert doc["queries"] == 60
    # A file is still a file, and --limit belongs to a split.
    test = load_split("digits", "test")
    np.savez(monitored / "q.npz", x=test.x[:5].numpy(), y=test.y[:5].numpy())
    assert main([*args, "--stream", str(monitored / "q.npz"), "--limit", "3", "--out", str(monitored / "n.json")]) == 2
    assert "is a file" in capsys.readouterr().err and not (monitored / "n.json").exists()
    assert main([*args, "--stream", str(monitored / "q.npz"), "--out", str(monitored / "n.json")]) == 0
    assert json.loads((monitored / "n.json").read_text())["queries"] == 5
