"""Float and sound noise never mix between counts, surrogate, calibration and certification (one-line errors).

Counts files record their scheme (and, for the sound one, the radius slack and how far the images were
moved onto the grid); a surrogate records the scheme of its training counts; a calibration the scheme
of its counts (optional fields ``noise_scheme`` / ``noise_slack``, absent = float); deployment draws its
fallback with the calibration's scheme. Combining the two families is refused wherever they meet.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibration.artifact import content_problems
from calibration.conformal import calibrate
from data_gen.generate import generate_counts
from data_gen.models import TORCHSCRIPT_META
from data_gen.store import read_attrs, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core.errors import CalibrationError, InvalidInputError
from surrogate_cert.core.groundtruth import grid_linear_problem
from surrogate_cert.core.smoothing import NOISE_SCHEME_SOUND, NOISE_SCHEME_V2, noise_slack
from surrogate_cert.deploy.hybrid import HybridCertifier
from surrogate_cert.workflows.onepass_case import _matches, counts_key
from surrogate_cert.workflows.training import train_surrogate

SIGMA = 0.25


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A grid dataset, its TorchScript base model, counts of both schemes, a surrogate and a calibration (sound)."""
    folder = tmp_path_factory.mktemp("mixing")
    problem = grid_linear_problem(600, sigma=SIGMA, seed=5)
    np.savez(folder / "grid.npz", x=problem.x.numpy(), y=problem.true_class, num_classes=2)
    meta = '{"num_classes": 2, "input_shape": [1, 2, 2]}'
    torch.jit.script(problem.model).save(str(folder / "base.ts"), _extra_files={TORCHSCRIPT_META: meta})
    dataset, model = f"npz:{folder / 'grid.npz'}", str(folder / "base.ts")
    files = {}
    for scheme in ("float", "sound"):
        for split, n in (("surrogate", 60), ("cal", 300), ("train", 60)):
            path = folder / f"{split}-{scheme}.h5"
            generate_counts(
                dataset, split, model, SIGMA, n, str(path), progress=False, noise_scheme=scheme, batch_size=4096
            )
            files[split, scheme] = str(path)
    surrogate = train_surrogate(files["surrogate", "sound"], folder / "sur-sound.pt", epochs=2, progress=False)
    calibration = calibrate(surrogate, files["cal", "sound"], 0.1, 0.01, thresholds=False)
    calibration.save(folder / "cal-sound.json")
    return dict(folder=folder, dataset=dataset, model=model, files=files, surrogate=surrogate, calibration=calibration)


def test_counts_files_record_their_scheme(made):
    sound = read_attrs(made["files"]["cal", "sound"])
    assert sound["noise_scheme"] == NOISE_SCHEME_SOUND
    assert sound["grid_shift_max"] == 0.0  # the images are on the grid already
    assert sound["noise_slack"] == noise_slack(NOISE_SCHEME_SOUND, SIGMA, (1, 2, 2)) > 0
    assert read_attrs(made["files"]["cal", "float"])["noise_scheme"] == NOISE_SCHEME_V2
    assert read_counts(made["files"]["cal", "float"]).radius_slack == 0.0


def test_surrogate_and_calibration_record_the_scheme(made):
    assert made["surrogate"].meta["noise_scheme"] == NOISE_SCHEME_SOUND
    content = json.loads((made["folder"] / "cal-sound.json").read_text())
    assert content["noise_scheme"] == NOISE_SCHEME_SOUND and content["noise_slack"] > 0
    assert content_problems(dict(content, noise_slack=0.0))  # a sound calibration without its slack
    assert content_problems(dict(content, noise_scheme=NOISE_SCHEME_V2))  # a float one with a slack
    assert content_problems(dict(content, noise_scheme="gaussian-v9"))


def test_calibrating_on_counts_of_the_other_scheme_is_refused(made):
    with pytest.raises(CalibrationError, match="never mix") as caught:
        calibrate(made["surrogate"], made["files"]["cal", "float"], 0.1, 0.01)
    assert "\n" not in str(caught.value)


def test_training_on_files_of_both_schemes_is_refused(made, tmp_path):
    with pytest.raises(InvalidInputError, match="never mix"):
        train_surrogate(
            [made["files"]["surrogate", "sound"], made["files"]["train", "float"]],
            tmp_path / "s.pt",
            epochs=1,
            progress=False,
        )


def test_certifying_with_the_other_scheme_is_refused(made, tmp_path, capsys):
    folder = made["folder"]
    hybrid = HybridCertifier.load(made["surrogate"], made["calibration"], base_model=made["model"], device="cpu")
    assert hybrid.sequential.smooth.noise_scheme == NOISE_SCHEME_SOUND  # the calibration's, by default
    with pytest.raises(InvalidInputError, match="never mix"):
        HybridCertifier.load(
            made["surrogate"], made["calibration"], base_model=made["model"], device="cpu", noise_scheme="float"
        )
    code = main(
        [
            "certify",
            "--surrogate",
            str(folder / "sur-sound.pt"),
            "--calibration",
            str(folder / "cal-sound.json"),
            "--model",
            made["model"],
            "--dataset",
            made["dataset"],
            "--split",
            "test",
            "--limit",
            "5",
            "--noise-scheme",
            NOISE_SCHEME_V2,
            "--out",
            str(tmp_path / "h.tsv"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "never mix" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "h.tsv").exists()


def test_the_one_pass_cache_serves_a_scheme_only_its_own_files(made):
    attrs = read_attrs(made["files"]["cal", "float"])
    key = dict(
        dataset=made["dataset"], split="cal", sha=attrs["model_sha256"], sigma=SIGMA, n=300, n0=0, seed=0, limit=None
    )
    as_float = counts_key(key["dataset"], "cal", key["sha"], SIGMA, 300, 0, 0, None)
    as_sound = counts_key(key["dataset"], "cal", key["sha"], SIGMA, 300, 0, 0, None, "sound")
    assert _matches(attrs, as_float) and not _matches(attrs, as_sound)
    assert _matches(read_attrs(made["files"]["cal", "sound"]), as_sound)
    assert not _matches(read_attrs(made["files"]["cal", "sound"]), as_float)
