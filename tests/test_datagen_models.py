"""Base-model loading: built-in checkpoints, TorchScript, torch.export programs, and
module:factory=weights specs, always weights-only (no pickled code runs), with the weights' SHA-256."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from torch import nn

from data_gen.models import TORCHSCRIPT_META, load_model
from surrogate_cert.core.architectures import build, load_checkpoint, save_checkpoint
from surrogate_cert.core.errors import ModelError
from surrogate_cert.core.hashing import sha256_file

FACTORY_SOURCE = """
from torch import nn


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""


def test_builtin_checkpoint_round_trip(digits_untrained_model):
    loaded = load_model(digits_untrained_model, device="cpu", num_classes=10)
    assert loaded.sha256 == sha256_file(digits_untrained_model)
    assert (loaded.num_classes, loaded.input_shape, loaded.sigma) == (10, (1, 8, 8), 0.25)
    assert not loaded.model.training
    model, header = load_checkpoint(digits_untrained_model)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model(x), loaded.model(x))
    assert header["kind"] == "base" and header["arch"] == "small_cnn" and "state_dict" not in header
    with pytest.raises(ModelError, match="10 output classes but the dataset has 3"):
        load_model(digits_untrained_model, device="cpu", num_classes=3)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(5, 1, 8, 8)
    torch.jit.save(
        torch.jit.script(model),
        str(tmp_path / "m.ts"),
        _extra_files={TORCHSCRIPT_META: '{"num_classes": 10, "input_shape": [1, 8, 8], "sigma": 0.5}'},
    )
    scripted = load_model(str(tmp_path / "m.ts"), device="cpu")
    assert (scripted.num_classes, scripted.input_shape, scripted.sigma) == (10, (1, 8, 8), 0.5)
    assert torch.allclose(scripted.model(x), model(x)) and scripted.sha256 == sha256_file(tmp_path / "m.ts")


@pytest.mark.slow
def test_torch_export_program(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(5, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    exported = load_model(str(tmp_path / "m.pt2"), device="cpu")
    # The program records its input shape and output width, so they are checked like a checkpoint's.
    assert (exported.num_classes, exported.input_shape) == (10, (1, 8, 8))
    assert torch.allclose(exported.model(x[:3]), model(x[:3]))


def test_factory_specs(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORY_SOURCE)
    reference = torch.nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    x = torch.rand(3, 1, 8, 8)
    by_path = load_model(f"{tmp_path / 'user_models.py'}:net={tmp_path / 'w.pt'}", device="cpu")
    assert torch.allclose(by_path.model(x), reference(x)) and by_path.sha256 == sha256_file(tmp_path / "w.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_model(f"user_models:net={tmp_path / 'w.pt'}", device="cpu")
    assert torch.allclose(by_module.model(x), reference(x)) and by_module.num_classes is None
    no_weights = load_model("user_models:net", device="cpu")
    assert len(no_weights.sha256) == 64
    # A surrogate-cert checkpoint is accepted as the weights file too.
    save_checkpoint(
        tmp_path / "ck.pt",
        reference,
        arch="small_cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        kind="base",
        meta={"sigma": 0.3},
    )
    from_checkpoint = load_model(f"user_models:net={tmp_path / 'ck.pt'}", device="cpu")
    assert from_checkpoint.sigma == 0.3 and torch.allclose(from_checkpoint.model(x), reference(x))
    torch.save(build("small_cnn", (1, 8, 8), 10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit net"):
        load_model(f"user_models:net={tmp_path / 'other.pt'}", device="cpu")
    with pytest.raises(ModelError, match="no callable 'nope'"):
        load_model("user_models:nope", device="cpu")
    sys.modules.pop("user_models", None)


class Payload:
    """Unpickling this would create a file: weights-only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "surrogate-cert-model", "payload": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="weights-only"):
        load_model(str(tmp_path / "evil.pt"), device="cpu")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "junk.pt"), device="cpu")
    torch.save({"just": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ModelError, match="not a surrogate-cert model checkpoint"):
        load_model(str(tmp_path / "plain.pt"), device="cpu")
