"""The whole command line on the exact linear problem: datagen -> train -> calibrate -> certify.

The base model is the linear classifier of ``groundtruth.linear_problem`` saved as TorchScript,
the images an ``npz:`` dataset; every certificate in the TSV is checked against the exact radius.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as st

from surrogate_cert.cli import main
from surrogate_cert.core.certificate import read_meta, read_tsv
from surrogate_cert.core.groundtruth import linear_problem

pytestmark = pytest.mark.slow

SIGMA = 0.25
EPSILON, ALPHA_MC, ALPHA = 0.05, 1e-3, 1e-3


def test_linear_problem_through_the_command_line(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    problem = linear_problem(1000, sigma=SIGMA, input_shape=(1, 2, 2), seed=21)
    np.savez(tmp_path / "linear.npz", x=problem.x.numpy(), y=problem.true_class, num_classes=2)
    torch.jit.script(problem.model).save(str(tmp_path / "linear.pt"))
    data, model = f"npz:{tmp_path / 'linear.npz'}", str(tmp_path / "linear.pt")

    def cli(*args):
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", ["surrogate-cert", *argv])  # the TSV header records the command line
        assert main(argv) == 0

    for split, n in (("train", 200), ("cal", 5000), ("test", 100)):
        cli(
            "datagen",
            "--dataset",
            data,
            "--split",
            split,
            "--model",
            model,
            "--sigma",
            SIGMA,
            "--n",
            n,
            "--no-progress",
            "--out",
            tmp_path / f"{split}.h5",
        )
    cli("train", "--counts", tmp_path / "train.h5", "--out", tmp_path / "surrogate.pt", "--epochs", 15, "--no-progress")
    cli(
        "calibrate",
        "--surrogate",
        tmp_path / "surrogate.pt",
        "--counts",
        tmp_path / "cal.h5",
        "--epsilon",
        EPSILON,
        "--alpha-mc",
        ALPHA_MC,
        "--out",
        tmp_path / "calibration.json",
    )
    cli(
        "certify",
        "--surrogate",
        tmp_path / "surrogate.pt",
        "--calibration",
        tmp_path / "calibration.json",
        "--model",
        model,
        "--dataset",
        data,
        "--split",
        "test",
        "--alpha",
        ALPHA,
        "--max-samples",
        2000,
        "--no-progress",
        "--out",
        tmp_path / "hybrid.tsv",
    )
    out = capsys.readouterr().out
    assert "by method: surrogate" in out

    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["calibration_size"] == 200 and calibration["n_cal"] == 5000
    rows = read_tsv(tmp_path / "hybrid.tsv")
    assert len(rows) == 200
    assert read_meta(tmp_path / "hybrid.tsv")["command"].startswith("surrogate-cert certify")
    methods = {r["method"] for r in rows}
    assert "surrogate" in methods and methods <= {"surrogate", "eprocess", "abstain"}
    for r in rows:
        assert (r["n_samples"] == 0) == (r["method"] == "surrogate") or r["method"] == "abstain"
    idx = np.array([r["idx"] for r in rows])
    assert np.all(np.array([r["label"] for r in rows]) == problem.true_class[idx])
    predict = np.array([r["predict"] for r in rows])
    radius = np.array([r["radius"] for r in rows])
    rows_problem = replace(problem, true_class=problem.true_class[idx], true_radius=problem.true_radius[idx])
    wrong = rows_problem.wrong(predict, radius)
    bound = EPSILON + ALPHA_MC + ALPHA
    assert wrong.sum() <= st.binom.ppf(0.999, len(rows), bound), wrong.sum()
    assert np.mean([r["correct"] and r["radius"] > 0 for r in rows]) > 0.7


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    assert (
        main(
            [
                "calibrate",
                "--surrogate",
                str(tmp_path / "none.pt"),
                "--counts",
                str(tmp_path / "none.h5"),
                "--epsilon",
                "0.01",
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("surrogate-cert calibrate: error:") and "\n" not in err
    assert (
        main(
            [
                "calibrate",
                "--surrogate",
                "s.pt",
                "--counts",
                "c.h5",
                "--epsilon",
                "1.5",
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
        == 2
    )
    assert "epsilon" in capsys.readouterr().err
