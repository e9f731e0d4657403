"""The report renders for every combination of inputs, and its numbers match a hand-computed case."""

from __future__ import annotations

import argparse
import base64
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from calibration import summary
from calibration.artifact import Calibration
from surrogate_cert.cli.report import register
from surrogate_cert.core.errors import CalibrationError, InvalidInputError, InvalidParameterError
from surrogate_cert.core.stats import max_radius
from surrogate_cert.workflows import report as rp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\tn_samples\tp_lower\n"
# Hand-computed case (sigma = 0.25), 4 inputs:
#   certified accuracy at r = 0, 0.25, 0.5, 0.75, 1.0: 2/4, 2/4, 1/4, 0, 0; ACR = (0.6 + 0.3) / 4 = 0.225
#   samples: all mean (10100*3 + 10100)/4 = 10100; certified (0, 1, 3) mean 10100; rest (2) 10100
COHEN = (
    "# surrogate-cert cohen --model base.pt --dataset digits --split test --sigma 0.25 --n 10000 --seed 7\n"
    "# device: cpu\n"
    + HEADER
    + "0\t1\t1\t0.6\t1\t0.5\tcohen\t10100\t0.99\n"
    + "1\t2\t2\t0.3\t1\t0.5\tcohen\t10100\t0.88\n"
    + "2\t3\t-1\t0\t0\t0.5\tabstain\t10100\t0.4\n"
    + "3\t4\t5\t0.8\t0\t0.5\tcohen\t10100\t0.999\n"
)
# Hybrid: surrogate certifies 0 and 3 (0 samples), eprocess certifies 1 (300), 2 abstains (200).
#   accuracy at 0, .25, .5, .75, 1: 2/4, 2/4, 1/4, 1/4, 0; ACR = (0.9 + 0.4) / 4 = 0.325
#   samples: all mean 125; certified (0, 1, 3): mean 100, median 0; rest (2): 200
#   amortisation vs cohen: saved 9975 per query; offline 997500 -> break-even 100 queries
HYBRID = (
    "# surrogate-cert certify --surrogate surrogate.pt --calibration calibration.json --sigma 0.25 --seed 7\n"
    + HEADER
    + "0\t1\t1\t0.9\t1\t0.001\tsurrogate\t0\t0.9998\n"
    + "1\t2\t2\t0.4\t1\t0.2\teprocess\t300\t0.9452\n"
    + "2\t3\t-1\t0\t0\t0.1\tabstain\t200\t0.3\n"
    + "3\t4\t5\t0.1\t0\t0.001\tsurrogate\t0\t0.66\n"
)
CALIBRATION = Calibration(
    surrogate_sha256="ab" * 32,
    sigma=0.25,
    num_classes=3,
    epsilon=0.01,
    alpha_mc=0.001,
    guarantee="marginal",
    method="conformal",
    groups="class",
    offsets={"0": 0.12, "1": float("inf"), "2": float("inf")},
    pooled_offset=0.15,
    calibration_size=400,
    n_cal=10_000,
    group_sizes={"0": 300, "1": 98, "2": 2},
    fallback_groups=["1"],
    min_group_size=99,
    radius_cap=max_radius(10_000, 0.001, 0.25),
    counts_sha256="cd" * 32,
    package_version="0.1.0",
    diagnostics=dict(certified_share=0.8, violation_rate=0.005),
).to_dict()


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.h2 = [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in = tag

    def handle_data(self, data):
        if self._in in ("td", "th"):
            self.cells.append(data)
        if self._in == "h2":
            self.h2.append(data)

    def handle_endtag(self, tag):
        self._in = None


def _parse(path):
    parser = _Collector()
    parser.feed(open(path, encoding="utf-8").read())
    parser.close()
    return parser


def _check_images(parser, expected: int):
    assert len(parser.images) == expected
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")  # self-contained: no network, no files
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "cohen.tsv").write_text(COHEN)
    (tmp_path / "hybrid.tsv").write_text(HYBRID)
    (tmp_path / "calibration.json").write_text(json.dumps(CALIBRATION))
    return tmp_path


def test_numbers_match_hand_computed_case(files):
    paths = rp.write_report(
        [files / "cohen.tsv", files / "hybrid.tsv"], files / "report.html", offline_evaluations=997_500
    )
    data = json.load(open(paths["json"]))
    assert data["sigma"] == 0.25 and data["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    cohen, hybrid = data["runs"]["cohen"], data["runs"]["hybrid"]
    assert cohen["certified_accuracy"] == [0.5, 0.5, 0.25, 0.0, 0.0]
    assert hybrid["certified_accuracy"] == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert cohen["acr"] == pytest.approx(0.225) and hybrid["acr"] == pytest.approx(0.325)
    assert cohen["samples"]["all"]["mean"] == 10100 and cohen["samples"]["rest"]["count"] == 1
    assert hybrid["samples"]["all"]["mean"] == 125
    assert hybrid["samples"]["certified"] == dict(mean=100.0, median=0.0, count=3)
    assert hybrid["samples"]["rest"]["mean"] == 200
    assert hybrid["share_by_method"] == {"abstain": 0.25, "eprocess": 0.25, "surrogate": 0.5}
    assert hybrid["seconds_per_query"]["mean"] == pytest.approx(0.30200 / 4)
    am = data["amortisation"]
    assert am["baseline"] == "cohen" and am["offline_evaluations"] == 997_500
    assert am["per_run"]["hybrid"]["saved_per_query"] == 9975
    assert am["per_run"]["hybrid"]["break_even_queries"] == pytest.approx(100.0)
    assert am["per_run"]["hybrid"]["speedup"] == pytest.approx(80.8)
    env = data["environment"]
    assert env["files"]["cohen"]["seed"] == 7 and env["files"]["cohen"]["device"] == "cpu"
    assert env["versions"]["torch"] and "--sigma 0.25" in env["files"]["cohen"]["header"][0]

    parser = _parse(paths["html"])
    _check_images(parser, 2)  # certified accuracy curves, samples histogram
    cells = parser.cells
    # the seed-001 cost table row for hybrid: method, certified accuracy, ACR, mean all / certified / rest
    i = cells.index("hybrid")
    assert cells[i : i + 7] == ["hybrid", "50.0%", "50.0%", "25.0%", "25.0%", "0.0%", "0.325"]
    assert ["hybrid", "50.0%", "0.325", "125.0", "100.0", "200.0"] == cells[
        cells.index("hybrid", i + 1) : cells.index("hybrid", i + 1) + 6
    ]
    md = open(paths["md"]).read()
    assert "| hybrid | 50.0% | 0.325 | 125.0 | 100.0 | 200.0 |" in md
    assert "| cohen | 50.0% | 50.0% | 25.0% | 0.0% | 0.0% | 0.225 |" in md


def test_with_calibration_and_alone(files):
    paths = rp.write_report(
        [files / "cohen.tsv", files / "hybrid.tsv"], files / "full.html", calibration=files / "calibration.json"
    )
    parser = _parse(paths["html"])
    _check_images(parser, 2)
    assert "Calibration" in parser.h2 and "Amortisation" in parser.h2
    i = parser.cells.index("0", parser.cells.index("too small: never certified by the surrogate"))
    assert parser.cells[i : i + 12] == [
        "0",
        "0.1200",
        "300",
        "no",
        "1",
        "inf (never certifies)",
        "98",
        "yes",
        "2",
        "inf (never certifies)",
        "2",
        "no",
    ]
    assert "0.0110" in parser.cells  # the bound epsilon + alpha_mc
    assert any("counting inputs that get no certificate" in c for c in parser.cells)  # and what it means
    data = json.load(open(paths["json"]))
    assert data["calibration"]["epsilon"] == 0.01 and data["amortisation"]["offline_evaluations"] is None

    alone = rp.write_calibration_report(files / "calibration.json", files / "calibration.html")
    parser = _parse(alone["html"])
    assert parser.h2 == ["Calibration", "Environment"]
    _check_images(parser, 0)
    assert json.load(open(alone["json"]))["runs"] == {}


def test_held_out_check_numbers_and_scatter(files, monkeypatch):
    # Reference radii for k of n = 1000 at alpha_mc = 0.001; image 0 is far above its reference.
    n, sigma = 1000, 0.25
    counts_top = np.array([600, 990, 999, 400])
    calibrated = np.array([1.0, 0.3, 0.1, -0.2])
    check = summary.check_against_reference(
        [0.9, 0.95, 0.99, 0.5], calibrated, counts_top, n, sigma, epsilon=0.01, alpha_mc=0.001
    )
    from surrogate_cert.core import stats

    reference = stats.radius(stats.lower_confidence_bound(counts_top, n, 0.001), sigma)
    assert reference[1] > 0.3 and reference[2] > 0.1 and reference[0] < 1.0  # hand check of the premise
    assert check["num_above"] == 1 and check["rate_above"] == 0.25 and check["share_certified"] == 0.75
    assert check["allowance"] == 1 and check["within_bound"]  # Binomial(4, 0.01) 0.999-quantile is 1
    monkeypatch.setattr(summary, "calibration_check", lambda *a: check)
    paths = rp.write_report(
        [files / "hybrid.tsv"],
        files / "checked.html",
        calibration=files / "calibration.json",
        counts="test.h5",
        surrogate="surrogate.pt",
    )
    parser = _parse(paths["html"])
    _check_images(parser, 3)  # curves, histogram, scatter
    assert "0.2500" in parser.cells
    alone = rp.write_calibration_report(
        files / "calibration.json", files / "cal_checked.html", counts="test.h5", surrogate="surrogate.pt"
    )
    _check_images(_parse(alone["html"]), 1)


def test_other_sigma_adds_scaled_radii_and_cli(files, capsys):
    (files / "wide.tsv").write_text(COHEN.replace("--sigma 0.25", "--sigma 0.5"))
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    parser = sub.choices["report"]
    args = parser.parse_args(["--results", str(files / "wide.tsv"), "--out", str(files / "wide.html")])
    assert args.func(args) == 0
    assert "wide.html" in capsys.readouterr().out
    data = json.load(open(files / "wide.json"))
    assert data["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    assert data["runs"]["wide"]["certified_accuracy"][-2:] == [0.0, 0.0]


def test_bad_inputs_are_one_line_errors(files):
    (files / "empty.tsv").write_text(HEADER)
    (files / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="no result rows"):
        rp.write_report([files / "empty.tsv"], files / "r.html")
    with pytest.raises(InvalidInputError, match="cannot read results file"):
        rp.write_report([files / "missing.tsv"], files / "r.html")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        rp.write_report([files / "cohen.tsv"], files / "r.html", calibration=files / "bad.json")
    with pytest.raises(InvalidParameterError, match="both"):
        rp.write_report([files / "cohen.tsv"], files / "r.html", counts="test.h5")
    with pytest.raises(InvalidParameterError, match="does not exist"):
        rp.write_report([files / "cohen.tsv"], files / "nowhere" / "r.html")
    before = (files / "calibration.json").read_text()
    with pytest.raises(InvalidParameterError, match="overwrite its input"):
        rp.write_report([files / "cohen.tsv"], files / "calibration.html", calibration=files / "calibration.json")
    assert (files / "calibration.json").read_text() == before
    with pytest.raises(InvalidParameterError, match="must end in .html"):
        rp.write_report([files / "cohen.tsv"], files / "r.txt")
    assert not (files / "r.html").exists()


def test_header_parsing_reads_the_certifiers_headers():
    cohen = [
        "surrogate-cert cohen --model base.pt --dataset digits --device auto --out cohen.tsv",
        "surrogate-cert 0.1.0; torch 2.14.1",
        "dataset digits split test images 4; sigma 0.5; alpha 0.001; model sha256 ab; device cuda:0; seed 3",
    ]
    assert summary.parse_header(cohen) == dict(sigma=0.5, seed=3, device="cuda:0")
    assert summary.parse_header(
        ["run_bench()", "bench method hybrid sigma=0.12 seed=1 alpha=0.001 device=cpu"]
    ) == dict(sigma=0.12, seed=1, device="cpu")
    assert summary.parse_header(["max_margin_sigmas=3 the_seeds=4"]) == {}


def test_cohen_original_six_columns_render_without_costs(files):
    """A TSV from Cohen et al.'s own code (no method / n_samples / p_lower) still gets curves and accuracy."""
    (files / "original.tsv").write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t1.2\n1\t2\t-1\t0.0\t0\t1.1\n"
    )
    paths = rp.write_report([files / "original.tsv", files / "hybrid.tsv"], files / "orig.html")
    data = json.load(open(paths["json"]))
    assert data["runs"]["original"]["certified_accuracy"][:3] == [0.5, 0.5, 0.5]
    assert data["runs"]["original"]["samples"]["all"] is None
    assert list(data["amortisation"]["per_run"]) == ["hybrid"]
    _check_images(_parse(paths["html"]), 2)


def test_report_refuses_a_tampered_calibration_file(files):
    content = json.loads((files / "calibration.json").read_text())
    content["epsilon"] = 0.5  # edited after calibrate wrote it
    (files / "tampered.json").write_text(json.dumps(content))
    with pytest.raises(CalibrationError, match="modified"):
        rp.write_report([files / "hybrid.tsv"], files / "tampered.html", calibration=files / "tampered.json")
    assert not (files / "tampered.html").exists()
