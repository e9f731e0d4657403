"""`train-base` on digits reaches >= 90% accuracy on noisy test inputs at sigma = 0.25 (the
session fixture trains it once; the issue's budget is 2 minutes on 2 CPU cores)."""

from __future__ import annotations

import pytest

from data_gen.datasets import load_split
from data_gen.models import load_model, noisy_accuracy
from surrogate_cert.core.architectures import load_checkpoint


@pytest.mark.slow
def test_digits_base_model_is_accurate_under_noise(digits_base_model):
    _, header = load_checkpoint(digits_base_model)
    meta = header["meta"]
    assert header["kind"] == "base" and meta["sigma"] == 0.25 and meta["dataset"] == "digits"
    assert meta["noisy_test_accuracy"] >= 0.90 and meta["seconds"] < 120
    # Independently re-measured with other noise draws.
    loaded = load_model(digits_base_model, device="cpu")
    test = load_split("digits", "test")
    assert noisy_accuracy(loaded.model, test.x, test.y, 0.25, draws=4, seed=123) >= 0.90


def test_train_base_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    from surrogate_cert.cli import main

    out = tmp_path / "tiny.pt"
    assert main(["train-base", "--epochs", "1", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "noisy test accuracy" in capsys.readouterr().out
    model, header = load_checkpoint(out)
    assert header["meta"]["epochs"] == 1 and header["num_classes"] == 10 and header["input_shape"] == [1, 8, 8]


def test_train_base_mlp_architecture_from_the_command_line(tmp_path, capsys):
    """``train-base --arch mlp``: the 784-512-256-10 layout (here on 8x8 digits), loadable as a base model."""
    from data_gen.models import load_model
    from surrogate_cert.cli import main
    from surrogate_cert.core.architectures import load_checkpoint

    out = tmp_path / "mlp.pt"
    assert (
        main(
            [
                "train-base",
                "--dataset",
                "digits",
                "--arch",
                "mlp",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "mlp on digits" in capsys.readouterr().out
    model, header = load_checkpoint(out)
    assert header["arch"] == "mlp" and [tuple(p.shape) for p in model.parameters()][::2] == [
        (512, 64),
        (256, 512),
        (10, 256),
    ]
    assert load_model(str(out), device="cpu").input_shape == (1, 8, 8)
