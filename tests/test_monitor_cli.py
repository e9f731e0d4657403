"""``surrogate-cert monitor``: a stream through the watched one-pass certifier to JSON (and a report), and
one-line errors with nothing written for bad streams and calibrations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import calibrate_arrays
from calibration.artifact import _content_hash
from data_gen.datasets import load_split
from surrogate_cert.cli import main
from surrogate_cert.core.certificate import Certificate, write_tsv
from surrogate_cert.core.surrogate import Surrogate

N_CAL = 200


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An untrained digits surrogate, a calibration with made-up counts (n_cal = 200), a stream of test images."""
    folder = tmp_path_factory.mktemp("monitor")
    surrogate = Surrogate.build((1, 8, 8), 10, 0.25, seed=0, device="cpu")
    surrogate.save(folder / "surrogate.pt")
    cal = load_split("digits", "cal")
    probabilities = surrogate.predict_proba(cal.x)
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(N_CAL, p / p.sum()) for p in probabilities])
    calibrate_arrays(surrogate, cal.x, counts, 0.1, 1e-3).save(folder / "calibration.json")
    test = load_split("digits", "test")
    np.savez(folder / "stream.npz", x=test.x[:150].numpy(), y=test.y[:150].numpy())
    Surrogate.build((1, 8, 8), 10, 0.25, seed=1, device="cpu").save(folder / "other.pt")
    return folder


def _run(
    files, *extra, out="monitor.json", stream="stream.npz", calibration="calibration.json", surrogate="surrogate.pt"
):
    return main(
        [
            "monitor",
            "--surrogate",
            str(files / surrogate),
            "--calibration",
            str(files / calibration),
            "--stream",
            str(files / stream),
            "--no-progress",
            "--out",
            str(files / out),
            *extra,
        ]
    )


def test_monitor_writes_the_drift_and_audit_fields(files, digits_untrained_model, capsys):
    assert (
        _run(
            files,
            "--model",
            digits_untrained_model,
            "--audit-rate",
            "0.3",
            "--delta",
            "0.05",
            "--report",
            str(files / "monitor.html"),
        )
        == 0
    )
    doc = json.loads((files / "monitor.json").read_text())
    assert doc["format"] == "surrogate-cert-monitor" and doc["queries"] == 150
    assert isinstance(doc["drift_alarm"], bool) and doc["delta"] == 0.05
    assert (doc["drift_alarm_at"] is None) == (not doc["drift_alarm"])
    lm = doc["log_martingale"]
    assert len(lm["path"]) == 150 and lm["final"] == pytest.approx(lm["path"][-1], abs=1e-5)
    assert lm["threshold"] == pytest.approx(np.log(20))
    audit = doc["audit"]
    assert audit["n_audit"] == N_CAL and audit["rate"] == 0.3 and 20 <= audit["audited"] <= 70
    assert (
        0.0 <= audit["lower"] <= audit["upper"] <= 1.0 and audit["base_model_evaluations"] == N_CAL * audit["sampled"]
    )
    assert isinstance(doc["audit_alarm"], bool) and sum(doc["routes"].values()) == 150
    html = (files / "monitor.html").read_text()
    assert "Deployment monitor" in html and "data:image/png;base64" in html
    assert (files / "monitor.report.json").exists() and (files / "monitor.report.md").exists()
    assert "wrote" in capsys.readouterr().out
    # The comparison report takes the monitor too.
    write_tsv(files / "r.tsv", [0], [1], [Certificate(1, 0.3, "surrogate", 0, 0.9, 0.01, "surrogate")])
    assert (
        main(
            [
                "report",
                "--results",
                str(files / "r.tsv"),
                "--monitor",
                str(files / "monitor.json"),
                "--out",
                str(files / "report.html"),
            ]
        )
        == 0
    )
    assert "Audit of one-pass certificates" in (files / "report.md").read_text()


def test_monitor_without_model_has_no_audit(files):
    assert _run(files, out="plain.json") == 0
    doc = json.loads((files / "plain.json").read_text())
    assert doc["audit"] is None and doc["audit_alarm"] is False and doc["one_pass_certificates"] >= 0


def _bad_stream(files, name, **arrays):
    np.savez(files / name, **arrays)
    return name


@pytest.mark.parametrize("case", ["shape", "nan", "empty", "no x", "labels", "integers"])
def test_bad_streams_are_one_line_errors_and_nothing_is_written(files, case, capsys):
    x = load_split("digits", "test").x[:10].numpy()
    arrays = {
        "shape": dict(x=np.zeros((5, 1, 4, 4), np.float32)),
        "nan": dict(x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32)),
        "empty": dict(x=np.zeros((0, 1, 8, 8), np.float32)),
        "no x": dict(images=x),
        "labels": dict(x=x, y=np.zeros(3, np.int64)),
        "integers": dict(x=(x * 16).astype(np.uint8)),
    }[case]
    name = _bad_stream(files, f"bad_{case.replace(' ', '_')}.npz", **arrays)
    capsys.readouterr()
    assert _run(files, stream=name, out=f"bad_{case}.json") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surrogate-cert monitor: error:") and len(err.splitlines()) == 1
    assert not (files / f"bad_{case}.json").exists()


def test_bad_calibrations_are_one_line_errors(files, capsys, digits_untrained_model):
    assert _run(files, surrogate="other.pt", out="other.json") == 2
    assert "another surrogate" in capsys.readouterr().err and not (files / "other.json").exists()
    content = json.loads((files / "calibration.json").read_text())
    del content["monitor_reference"], content["checksum_sha256"]
    content["checksum_sha256"] = _content_hash(content)
    (files / "old.json").write_text(json.dumps(content))
    assert _run(files, calibration="old.json", out="old_out.json") == 2
    err = capsys.readouterr().err
    assert "re-run `surrogate-cert calibrate`" in err and not (files / "old_out.json").exists()
    assert _run(files, "--model", digits_untrained_model, "--audit-rate", "0.1", "--n-audit", "50", out="n.json") == 2
    assert "n_cal" in capsys.readouterr().err and not (files / "n.json").exists()
    assert _run(files, "--audit-rate", "0.1", out="m.json") == 2
    assert "--model" in capsys.readouterr().err
    assert _run(files, out="stream.npz") == 2  # an output that is an input
