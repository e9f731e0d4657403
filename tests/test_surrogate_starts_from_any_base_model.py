"""`train` starts the surrogate from any base model the project loads, in that model's own layout:
a user's torch.export program (.pt2), a TorchScript file and a factory model; by default from the
base model the counts were made with. The network travels inside the surrogate's checkpoint (loaded
with weights_only=True), is part of its fingerprint, and calibration and certification use it."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from surrogate_cert.cli import main
from surrogate_cert.core.architectures import PROGRAM_ARCHITECTURES, load_checkpoint
from surrogate_cert.core.errors import ModelError
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.workflows.training import train_surrogate

BATCH = torch.export.Dim("batch", min=1)


class UserNet(nn.Module):
    """A layout no built-in architecture has (so only the program itself can carry it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6 * 16, 10)

    def forward(self, x):
        z = torch.relu(self.conv(x))
        z = nn.functional.avg_pool2d(z, 2)
        return self.head(z.flatten(1))


def user_net() -> nn.Module:
    torch.manual_seed(0)
    model = UserNet()
    # A few steps on noisy digits, so the counts are not those of a constant classifier.
    from data_gen.datasets import load_split

    train = load_split("digits", "train")
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        rows = torch.randint(0, len(train), (128,))
        loss = nn.functional.cross_entropy(model(train.x[rows] + 0.25 * torch.randn(128, 1, 8, 8)), train.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    model = user_net()
    program = torch.export.export(model, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: BATCH},))
    torch.export.save(
        program, str(folder / "mine.pt2"), extra_files={"surrogate_cert.json": json.dumps({"sigma": 0.25})}
    )
    torch.jit.save(torch.jit.script(model), str(folder / "mine.ts"))
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "user_factory.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn


        class UserNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 6, 3, padding=1)
                self.head = nn.Linear(6 * 16, 10)

            def forward(self, x):
                z = torch.relu(self.conv(x))
                z = nn.functional.avg_pool2d(z, 2)
                return self.head(z.flatten(1))


        def build():
            return UserNet()
    """)
    )
    run = lambda *args: main([*args, "--no-progress"])  # noqa: E731
    for split, n, limit in (("surrogate", 50, 80), ("cal", 400, 120)):
        assert (
            run(
                "datagen",
                "--dataset",
                "digits",
                "--split",
                split,
                "--model",
                str(folder / "mine.pt2"),
                "--sigma",
                "0.25",
                "--samples",
                str(n),
                "--limit",
                str(limit),
                "--device",
                "cpu",
                "--out",
                str(folder / f"{split}.h5"),
            )
            == 0
        )
    return folder, model


def test_train_defaults_to_the_users_exported_model_and_its_layout(user_models, capsys):
    folder, model = user_models
    assert (
        main(
            [
                "train",
                "--counts",
                str(folder / "surrogate.h5"),
                "--out",
                str(folder / "s.pt"),
                "--epochs",
                "2",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "started from the base model" in capsys.readouterr().out
    surrogate = Surrogate.load(folder / "s.pt", device="cpu")
    assert surrogate.arch == "torch-export"
    assert surrogate.meta["init_from_base"].endswith("mine.pt2")
    assert surrogate.meta["init_mapping"] == "the base model itself"
    # The file is plain data: weights_only loading works, the network is a uint8 tensor in it.
    payload = torch.load(folder / "s.pt", weights_only=True)
    assert payload["arch"] in PROGRAM_ARCHITECTURES and payload["network"].dtype == torch.uint8
    # Trained: its weights moved away from the base model's, within the base model's layout.
    assert surrogate.model.state_dict().keys() == {f"program.{k}" for k in model.state_dict()}
    # Calibrate and certify with it (one pass), end to end through the command line.
    assert (
        main(
            [
                "calibrate",
                "--surrogate",
                str(folder / "s.pt"),
                "--counts",
                str(folder / "cal.h5"),
                "--epsilon",
                "0.05",
                "--out",
                str(folder / "c.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "radius cap" in capsys.readouterr().out  # no calibrated radius can pass what n_cal samples show
    assert (
        main(
            [
                "certify",
                "--surrogate",
                str(folder / "s.pt"),
                "--calibration",
                str(folder / "c.json"),
                "--fallback",
                "none",
                "--dataset",
                "digits",
                "--split",
                "test",
                "--limit",
                "20",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(folder / "h.tsv"),
            ]
        )
        == 0
    )


def test_the_carried_network_is_part_of_the_fingerprint(user_models):
    folder, _ = user_models
    if not (folder / "s.pt").exists():
        pytest.skip("needs the surrogate of the previous test")
    surrogate = Surrogate.load(folder / "s.pt", device="cpu")
    before = surrogate.fingerprint()
    surrogate.network = surrogate.network + b"\0"
    assert surrogate.fingerprint() != before


def test_torchscript_and_factory_models_start_the_surrogate_in_their_layout(user_models, monkeypatch):
    folder, model = user_models
    x = torch.rand(5, 1, 8, 8)
    factory = f"{folder / 'user_factory.py'}:build={folder / 'weights.pt'}"
    for name, spec, arch in (("ts", str(folder / "mine.ts"), "torchscript"), ("factory", factory, "torch-export")):
        out = folder / f"{name}.pt"
        surrogate = train_surrogate(
            folder / "surrogate.h5", out, init_from_base=spec, epochs=1, lr=1e-12, device="cpu", progress=False
        )
        assert surrogate.arch == arch
        loaded, header = load_checkpoint(out, kind="surrogate")
        # lr ~ 0: the surrogate is still the base model, so the carried network is the user's own.
        assert torch.allclose(loaded(x), model(x), atol=1e-4), name
    sys.modules.pop("user_factory", None)


def test_a_mapped_built_in_arch_still_works_and_a_wrong_one_is_refused(user_models):
    folder, _ = user_models
    with pytest.raises(ModelError, match="do not fit architecture mlp"):
        train_surrogate(
            folder / "surrogate.h5",
            folder / "x.pt",
            arch="mlp",
            init_from_base=str(folder / "mine.pt2"),
            epochs=1,
            device="cpu",
            progress=False,
        )
    assert not (folder / "x.pt").exists()


def test_default_start_falls_back_to_random_weights_when_the_base_model_is_gone(user_models, tmp_path, capsys):
    folder, _ = user_models
    moved = tmp_path / "elsewhere.pt2"
    # A copy of the counts made with a model that is no longer at the recorded path.
    model = user_net()
    program = torch.export.export(model, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: BATCH},))
    torch.export.save(program, str(moved))
    assert (
        main(
            [
                "datagen",
                "--dataset",
                "digits",
                "--split",
                "surrogate",
                "--model",
                str(moved),
                "--sigma",
                "0.25",
                "--samples",
                "20",
                "--limit",
                "30",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(tmp_path / "s.h5"),
            ]
        )
        == 0
    )
    moved.unlink()
    assert (
        main(
            [
                "train",
                "--counts",
                str(tmp_path / "s.h5"),
                "--out",
                str(tmp_path / "s.pt"),
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trained from random weights" in out and "is not there any more" in out
    assert Surrogate.load(tmp_path / "s.pt", device="cpu").arch == "small_cnn"
    assert np.isfinite(Surrogate.load(tmp_path / "s.pt", device="cpu").predict_proba(torch.rand(2, 1, 8, 8))).all()
