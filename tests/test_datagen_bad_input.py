"""Bad input to `datagen` / `train-base`: one line on stderr, exit code 2, no traceback, and no
file created or changed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from surrogate_cert.cli import main
from surrogate_cert.core.hashing import sha256_file


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def datagen(tmp_path, digits_untrained_model):
    """Call `datagen` with sane defaults, overridden by keyword; returns (exit code, stderr)."""

    def call(capsys, **overrides):
        args = {
            "--dataset": "digits",
            "--split": "test",
            "--model": digits_untrained_model,
            "--sigma": "0.25",
            "--n": "20",
            "--limit": "3",
            "--device": "cpu",
            "--out": str(tmp_path / "out.h5"),
        }
        args.update(overrides)
        argv = ["datagen", "--no-progress"]
        for key, value in args.items():
            if value == "":  # a flag
                argv.append(key)
            elif value is not None:
                argv += [key, value]
        return run(capsys, *argv)

    return call


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"--dataset": "imagenet"}, ["unknown dataset 'imagenet'"]),
        ({"--dataset": "npz:/no/such.npz"}, ["no such file"]),
        ({"--model": "/no/such/base.pt"}, ["does not exist"]),
        ({"--model": "no_such_package.mod:factory"}, ["cannot import no_such_package.mod"]),
        ({"--sigma": "0"}, ["sigma must lie in [0.0001, 1000]"]),
        ({"--sigma": "-0.5"}, ["sigma must lie in [0.0001, 1000]"]),
        ({"--sigma": "nan"}, ["sigma"]),
        ({"--n": "0"}, ["n must be an integer >= 1"]),
        ({"--n0": "-1"}, ["n0 must be an integer >= 0"]),
        ({"--batch-size": "0"}, ["batch_size"]),
        ({"--limit": "0"}, ["limit must be an integer >= 1"]),
    ],
)
def test_bad_arguments(capsys, tmp_path, datagen, overrides, needles):
    assert_one_line_error(*datagen(capsys, **overrides), *needles)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.lock").exists()


def test_missing_torchvision_files_name_what_is_expected(capsys, tmp_path, datagen):
    code, err = datagen(capsys, **{"--dataset": "mnist", "--data-root": str(tmp_path / "empty")})
    assert_one_line_error(code, err, "mnist not found under", "MNIST/raw/train-images-idx3-ubyte", "--download")
    assert not (tmp_path / "empty").exists() or not os.listdir(tmp_path / "empty")


@pytest.mark.parametrize("bad", ["above_one", "nan", "inf"])
def test_inputs_outside_unit_interval_or_not_finite(capsys, tmp_path, datagen, bad):
    x = np.random.default_rng(0).uniform(size=(20, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 2] = {"above_one": 1.5, "nan": np.nan, "inf": np.inf}[bad]
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(20) % 10)
    code, err = datagen(capsys, **{"--dataset": f"npz:{tmp_path / 'bad.npz'}"})
    assert_one_line_error(code, err, "bad.npz", "[0, 1]" if bad == "above_one" else "NaN or infinite")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_model_output_width_differs_from_number_of_classes(capsys, tmp_path, datagen, digits_untrained_model):
    # A TorchScript model without metadata: caught by the probe forward pass, before any file exists.
    two_class = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)))
    torch.jit.save(two_class, str(tmp_path / "two.ts"))
    code, err = datagen(capsys, **{"--model": str(tmp_path / "two.ts")})
    assert_one_line_error(code, err, "outputs shape (1, 2)", "num_classes=10")
    # A built-in checkpoint that records 10 classes, on a 3-class dataset.
    x = np.random.default_rng(0).uniform(size=(20, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "three.npz", x=x, y=np.arange(20) % 3)
    code, err = datagen(capsys, **{"--dataset": f"npz:{tmp_path / 'three.npz'}"})
    assert_one_line_error(code, err, "10 output classes but the dataset has 3")
    # A model whose input shape differs from the images'.
    x = np.random.default_rng(0).uniform(size=(20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(20) % 10)
    code, err = datagen(capsys, **{"--dataset": f"npz:{tmp_path / 'rgb.npz'}"})
    assert_one_line_error(code, err, "expects inputs (1, 8, 8)")
    assert not (tmp_path / "out.h5").exists()


def test_unwritable_output(capsys, tmp_path, datagen):
    code, err = datagen(capsys, **{"--out": str(tmp_path / "missing" / "out.h5")})
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "a_file").write_text("x")
    code, err = datagen(capsys, **{"--out": str(tmp_path / "a_file" / "out.h5")})
    assert_one_line_error(code, err, "--out")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = datagen(capsys, **{"--out": str(locked / "out.h5")})
        assert_one_line_error(code, err, "not writable")


def test_existing_output_and_mismatched_resume_leave_the_file_unchanged(capsys, tmp_path, datagen):
    assert datagen(capsys)[0] == 0
    before = sha256_file(tmp_path / "out.h5")
    assert_one_line_error(*datagen(capsys), "already exists", "--resume")
    assert_one_line_error(*datagen(capsys, **{"--resume": "", "--n": "21"}), "cannot resume", "n 20 in the file vs 21")
    assert_one_line_error(*datagen(capsys, **{"--resume": "", "--seed": "9"}), "cannot resume", "seed")
    assert_one_line_error(*datagen(capsys, **{"--resume": "", "--limit": "4"}), "cannot resume", "limit")
    assert sha256_file(tmp_path / "out.h5") == before
    assert not (tmp_path / "out.h5.lock").exists()
    # --overwrite starts the file again with the new settings (and --resume with it is refused).
    assert_one_line_error(*datagen(capsys, **{"--resume": "", "--overwrite": ""}), "one of them")
    assert datagen(capsys, **{"--overwrite": "", "--n": "21"})[0] == 0
    from data_gen.store import read_attrs

    assert read_attrs(tmp_path / "out.h5")["n"] == 21
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]  # no lock, no temporary file left


def test_train_base_bad_input(capsys, tmp_path):
    out = tmp_path / "base.pt"
    assert_one_line_error(*run(capsys, "train-base", "--sigma", "0", "--out", str(out), "--no-progress"), "sigma")
    assert_one_line_error(
        *run(capsys, "train-base", "--dataset", "nope", "--out", str(out), "--no-progress"), "unknown dataset"
    )
    assert_one_line_error(*run(capsys, "train-base", "--epochs", "0", "--out", str(out), "--no-progress"), "epochs")
    assert not out.exists()
