"""train_surrogate / calibrate read images and provenance from counts files, and refuse the wrong ones."""

from __future__ import annotations

import pytest
import torch

from calibration import calibrate
from data_gen.generate import generate_counts
from surrogate_cert.core.errors import CalibrationError, InvalidParameterError
from surrogate_cert.core.hashing import sha256_file
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.workflows.training import train_surrogate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def counts_files(tmp_path_factory, digits_untrained_model):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("counts")
    files = {}
    for split, limit, n, sigma in (("train", 40, 20, 0.25), ("cal", 120, 50, 0.25), ("test", 20, 20, 0.5)):
        files[split] = str(folder / f"{split}.h5")
        generate_counts(
            "digits", split, digits_untrained_model, sigma, n, files[split], limit=limit, device="cpu", progress=False
        )
    return folder, files


def test_train_from_counts_file_records_provenance_and_init_from_base(counts_files, digits_untrained_model):
    folder, files = counts_files
    out = folder / "surrogate.pt"
    surrogate = train_surrogate(
        files["train"], out, init_from_base=digits_untrained_model, epochs=2, device="cpu", progress=False
    )
    loaded = Surrogate.load(out)
    assert (loaded.arch, loaded.input_shape, loaded.num_classes, loaded.sigma) == ("small_cnn", (1, 8, 8), 10, 0.25)
    assert loaded.meta["counts_sha256"] == sha256_file(files["train"])
    assert loaded.meta["dataset"] == "digits" and loaded.meta["split"] == "train"
    assert loaded.meta["init_from_base"].endswith(".pt")
    assert (loaded.kappa, loaded.w) == (surrogate.kappa, surrogate.w)
    assert loaded.meta["prior_tuning"]["table"]
    with pytest.raises(InvalidParameterError, match="--arch"):
        train_surrogate(
            files["train"],
            folder / "x.pt",
            arch="resnet18",
            init_from_base=digits_untrained_model,
            epochs=1,
            device="cpu",
            progress=False,
        )


def test_calibrate_refuses_training_counts_and_another_sigma(counts_files):
    folder, files = counts_files
    out = folder / "surrogate2.pt"
    train_surrogate(files["train"], out, epochs=1, device="cpu", progress=False)
    with pytest.raises(CalibrationError, match="training split"):
        calibrate(str(out), files["train"], 0.1, 1e-3)
    with pytest.raises(CalibrationError, match="sigma"):
        calibrate(str(out), files["test"], 0.1, 1e-3)
    calibration = calibrate(str(out), files["cal"], 0.1, 1e-3, groups="confidence")
    assert calibration.calibration_size == 120 and calibration.n_cal == 50
    assert calibration.counts_sha256 == sha256_file(files["cal"]) and calibration.split == "cal"
    assert calibration.surrogate_file_sha256 == sha256_file(out)
    assert calibration.bin_edges == [1.0, 2.0, 3.0]
