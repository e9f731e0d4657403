"""Issue 10's plumbing: top-up in the store (same stream, per-row samples, validation), the surrogate split
and old train files, training on several counts files, starting from TorchScript / torch.export bases,
calibration format 3 (and version 2 still loading), and the new command-line flags end to end."""

from __future__ import annotations

import hashlib
import json
import sys

import h5py
import numpy as np
import pytest
import torch

from calibration.artifact import Calibration, _canonical, load_calibration
from calibration.conformal import calibrate, calibrate_arrays
from data_gen.datasets import load_split
from data_gen.generate import generate_counts, top_up_counts
from data_gen.models import TORCHSCRIPT_META
from data_gen.store import CountsWriter, ResumeMismatchError, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core import stats
from surrogate_cert.core.architectures import build
from surrogate_cert.core.errors import CalibrationError, InvalidInputError, ModelError, StoreError
from surrogate_cert.core.groundtruth import linear_problem
from surrogate_cert.core.surrogate import Surrogate, copy_weights
from surrogate_cert.workflows.training import train_surrogate

SIGMA = 0.25


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory):
    """An npz dataset of the exact linear problem and its TorchScript base model."""
    folder = tmp_path_factory.mktemp("linear")
    problem = linear_problem(400, sigma=SIGMA, input_shape=(1, 2, 2), seed=4)
    np.savez(folder / "linear.npz", x=problem.x.numpy(), y=problem.true_class, num_classes=2)
    torch.jit.script(problem.model).save(
        str(folder / "linear.ts"), _extra_files={TORCHSCRIPT_META: '{"num_classes": 2, "input_shape": [1, 2, 2]}'}
    )
    return folder, f"npz:{folder / 'linear.npz'}", str(folder / "linear.ts")


# --------------------------------------------------------------------------- top-up


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_top_up_continues_the_same_stream_and_the_store_checks_the_per_row_samples(linear_data, tmp_path):
    _, data, model = linear_data
    generate_counts(data, "cal", model, SIGMA, 64, str(tmp_path / "cal.h5"), limit=40, device="cpu", progress=False)
    for n in (128, 192):  # one long run each: what the topped-up rows must equal
        generate_counts(
            data, "cal", model, SIGMA, n, str(tmp_path / f"long{n}.h5"), limit=40, device="cpu", progress=False
        )
    long128, long192 = read_counts(tmp_path / "long128.h5"), read_counts(tmp_path / "long192.h5")
    before = read_counts(tmp_path / "cal.h5")
    assert before.samples is None and not before.topped_up  # files without a top-up read as before
    agree = before.counts.max(axis=1) == 64
    assert 0 < agree.sum() < 40
    done = top_up_counts(tmp_path / "cal.h5", model, 64, planned_max=192, device="cpu", progress=False)
    after = read_counts(tmp_path / "cal.h5")
    assert done["rows"] == agree.sum() and np.array_equal(after.counts, before.counts)  # counts keep n samples
    assert np.array_equal(after.samples, np.where(agree, 128, 64)) and after.planned_max_samples == 192
    # The extra samples are the stream's next ones: 64 + 64 topped up equals the first 128 of a long run.
    assert np.array_equal(after.counts_all()[agree], long128.counts[agree])
    # A second top-up continues the rows that still all agree, up to the planned maximum.
    top_up_counts(tmp_path / "cal.h5", model, 500, device="cpu", progress=False)
    again = read_counts(tmp_path / "cal.h5")
    still = agree & (after.counts_all().max(axis=1) == 128)
    assert np.array_equal(again.samples, np.where(still, 192, np.where(agree, 128, 64)))
    assert np.array_equal(again.counts_all()[still], long192.counts[still])
    with pytest.raises(StoreError, match="planned maximum"):
        top_up_counts(tmp_path / "cal.h5", model, 10, planned_max=300, device="cpu", progress=False)
    # The store checks the per-row count against the extra counts.
    with h5py.File(tmp_path / "cal.h5", "r+") as h5:
        samples = h5["samples"][:]
        samples[np.argmax(still)] += 1
        h5["samples"][:] = samples
    with pytest.raises(StoreError, match="counts_topup do not sum"):
        read_counts(tmp_path / "cal.h5")


def test_old_train_file_still_reads_and_a_resume_is_refused(tmp_path):
    train, surrogate = load_split("digits", "train"), load_split("digits", "surrogate")
    old = np.concatenate([train.indices[:3], surrogate.indices[:2]])  # the old train block held both
    labels = np.concatenate([train.y[:3].numpy(), surrogate.y[:2].numpy()])
    attrs = dict(
        sigma=SIGMA,
        n=4,
        n0=0,
        num_classes=10,
        seed=0,
        dataset="digits",
        split="train",
        limit=None,
        model_sha256="0" * 64,
        model_source="x",
        package_version="0",
        noise_scheme="torch-generator-block256-v1",
        device_type="cpu",
        amp=None,
        input_shape=[1, 8, 8],
    )
    with CountsWriter.open(tmp_path / "old.h5", indices=old, labels=labels, attrs=attrs) as writer:
        writer.append(np.tile([[4] + [0] * 9], (2, 1)))
    counts = read_counts(tmp_path / "old.h5")
    assert len(counts) == 2 and counts.images().shape == (2, 1, 8, 8)
    with pytest.raises(ResumeMismatchError, match="surrogate split was carved out"):
        with CountsWriter.open(
            tmp_path / "old.h5", indices=train.indices, labels=train.y.numpy(), attrs=attrs, resume=True
        ):
            pass


# --------------------------------------------------------------------------- training on several files


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_surrogate_trains_on_several_files_and_calibration_keeps_all_their_images_out(linear_data, tmp_path):
    _, data, model = linear_data
    for split, n in (("surrogate", 100), ("train", 30), ("cal", 400)):
        generate_counts(data, split, model, SIGMA, n, str(tmp_path / f"{split}.h5"), device="cpu", progress=False)
    surrogate = train_surrogate(
        [tmp_path / "surrogate.h5", tmp_path / "train.h5"], tmp_path / "s.pt", epochs=2, progress=False, device="cpu"
    )
    both = np.concatenate([read_counts(tmp_path / f).indices for f in ("surrogate.h5", "train.h5")])
    ranges = surrogate.meta["train_index_ranges"]
    assert sum(hi - lo for lo, hi in ranges) == len(both) == surrogate.meta["counts_rows"]
    assert [f["split"] for f in surrogate.meta["counts_files"]] == ["surrogate", "train"]
    assert surrogate.meta["split"] == "surrogate+train"
    with pytest.raises(InvalidInputError, match="share images"):
        train_surrogate([tmp_path / "train.h5", tmp_path / "train.h5"], tmp_path / "x.pt", epochs=1, progress=False)
    for split in ("surrogate", "train"):
        with pytest.raises(CalibrationError, match="training split"):
            calibrate(str(tmp_path / "s.pt"), str(tmp_path / f"{split}.h5"), 0.1, 1e-3)
    calibration = calibrate(str(tmp_path / "s.pt"), str(tmp_path / "cal.h5"), 0.1, 1e-3)
    assert calibration.radius_thresholds and calibration.calibration_size == 80


# --------------------------------------------------------------------------- init from a TorchScript / export base


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_init_from_torchscript_and_export_maps_weights_in_order_and_refuses_another_layout(tmp_path):
    torch.manual_seed(3)
    user = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    scripted = torch.jit.trace(user, torch.zeros(2, 1, 8, 8))
    exported = torch.export.export(
        user, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    ).module()
    for base in (scripted, exported):
        target = build("mlp", (1, 8, 8), 10)
        how = copy_weights(target, base, "mlp")
        assert how in ("by name", "in order")
        x = torch.rand(5, 1, 8, 8)
        assert torch.allclose(target(x), user(x), atol=1e-6)
    with pytest.raises(ModelError, match="do not fit architecture small_cnn"):
        copy_weights(build("small_cnn", (1, 8, 8), 10), scripted, "small_cnn")
    # Through the training workflow: a TorchScript file and --arch mlp.
    torch.jit.save(scripted, str(tmp_path / "user.ts"))
    generate_counts(
        "digits",
        "surrogate",
        str(tmp_path / "user.ts"),
        SIGMA,
        8,
        str(tmp_path / "s.h5"),
        limit=30,
        device="cpu",
        progress=False,
    )
    surrogate = train_surrogate(
        tmp_path / "s.h5",
        tmp_path / "s.pt",
        arch="mlp",
        init_from_base=str(tmp_path / "user.ts"),
        epochs=1,
        progress=False,
        device="cpu",
    )
    assert surrogate.meta["init_mapping"] in ("by name", "in order") and surrogate.meta["training"]["lr"] == 1e-3
    with pytest.raises(ModelError, match="do not fit"):
        train_surrogate(
            tmp_path / "s.h5",
            tmp_path / "t.pt",
            arch="small_cnn",
            init_from_base=str(tmp_path / "user.ts"),
            epochs=1,
            progress=False,
            device="cpu",
        )


# --------------------------------------------------------------------------- calibration format 3


def _cal(problem, **options) -> Calibration:
    surrogate = Surrogate(problem.model, arch="linear", input_shape=(1, 2, 2), num_classes=2, sigma=SIGMA)
    rng = np.random.default_rng(0)
    k1 = rng.binomial(2000, problem.p1)
    return calibrate_arrays(surrogate, problem.x, np.stack([2000 - k1, k1], 1), 0.1, 1e-3, **options)


def _resealed(content: dict) -> dict:
    rest = {k: v for k, v in content.items() if k not in ("checksum_sha256", "integrity_sha256")}
    rest["checksum_sha256"] = hashlib.sha256(_canonical(rest)).hexdigest()
    return rest


def test_format_3_records_score_and_rules_and_refuses_inconsistent_parts_and_version_2_still_loads(tmp_path):
    problem = linear_problem(300, sigma=SIGMA, input_shape=(1, 2, 2), seed=9)
    shifted = _cal(problem, score="shifted", bins=3, indices=np.arange(300) + 7)
    content = shifted.to_dict()
    assert content["format_version"] == 4 and content["score"] == "shifted"  # version 4 keeps version 3's fields
    assert content["partition"]["tune_size"] + content["partition"]["calibration_size"] == 300
    assert len(content["score_params"]["bin_offsets"]) == len(content["score_params"]["bin_edges"]) + 1
    assert (
        content["radius_thresholds"]["rule"].startswith("marginal")
        and content["reference"]["bound"] == "clopper-pearson"
    )
    (tmp_path / "ok.json").write_text(json.dumps(content))
    assert load_calibration(tmp_path / "ok.json").score == "shifted"
    broken = {
        "tau decreases": lambda c: c["radius_thresholds"].__setitem__(
            "tau",
            sorted([t for t in c["radius_thresholds"]["tau"] if t is not None], reverse=True)
            + [None] * c["radius_thresholds"]["tau"].count(None),
        ),
        "partition": lambda c: c.__setitem__("partition", None),
        "bin_offsets": lambda c: c["score_params"].__setitem__("bin_offsets", [0.1]),
        "score": lambda c: c.__setitem__("score", "normalized"),
        "radius_cap": lambda c: c.__setitem__(
            "reference",
            {
                **c["reference"],
                "bound": "clopper-pearson+confidence-sequence",
                "planned_max_samples": 10**5,
                "prior": {"a": [0.5], "b": [0.5], "weights": [1.0]},
            },
        ),
    }
    for edit in broken.values():
        bad = json.loads(json.dumps(content))
        edit(bad)
        (tmp_path / "bad.json").write_text(json.dumps(_resealed(bad)))
        with pytest.raises(CalibrationError, match="contradicts itself"):
            load_calibration(tmp_path / "bad.json")
    # A version-2 file (before this issue): the residual score, a Clopper-Pearson reference, no thresholds.
    old = {
        k: v
        for k, v in _cal(problem).to_dict().items()
        if k not in ("score", "score_params", "partition", "reference", "radius_thresholds", "bin_edges_source")
    }
    old["format_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(_resealed(old)))
    legacy = load_calibration(tmp_path / "v2.json")
    assert (
        legacy.score == "residual"
        and legacy.radius_thresholds is None
        and legacy.reference["bound"] == "clopper-pearson"
    )


# --------------------------------------------------------------------------- the command line


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_new_flags_end_to_end_on_the_linear_problem(linear_data, tmp_path, capsys, monkeypatch):
    _, data, model = linear_data

    def cli(*args):
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", ["surrogate-cert", *argv])
        assert main(argv) == 0, capsys.readouterr().err

    common = ["--dataset", data, "--model", model, "--sigma", SIGMA, "--no-progress"]
    cli("datagen", *common, "--split", "surrogate", "--n", 100, "--out", tmp_path / "sur.h5")
    cli("datagen", *common, "--split", "train", "--n", 50, "--out", tmp_path / "train.h5")
    cli("datagen", *common, "--split", "cal", "--n", 300, "--out", tmp_path / "cal.h5", "--top-up", 700)
    assert "topped up" in capsys.readouterr().out
    assert read_counts(tmp_path / "cal.h5").planned_max_samples == 1000
    cli("datagen", *common, "--split", "test", "--n", 300, "--out", tmp_path / "test.h5")
    cli(
        "train",
        "--counts",
        tmp_path / "sur.h5",
        tmp_path / "train.h5",
        "--epochs",
        3,
        "--no-progress",
        "--out",
        tmp_path / "s.pt",
    )
    for name, extra in (
        ("pooled", []),
        ("shifted", ["--score", "shifted", "--bins", 3]),
        ("mondrian", ["--groups", "confidence", "--edges-from", tmp_path / "sur.h5", "--bins", 3]),
    ):
        cli(
            "calibrate",
            "--surrogate",
            tmp_path / "s.pt",
            "--counts",
            tmp_path / "cal.h5",
            "--epsilon",
            0.1,
            "--out",
            tmp_path / f"{name}.json",
            *extra,
        )
    content = json.loads((tmp_path / "pooled.json").read_text())
    assert content["reference"]["bound"] == "clopper-pearson+confidence-sequence"
    assert content["radius_cap"] == pytest.approx(stats.topup_max_radius(300, 1000, 1e-3, SIGMA))
    assert json.loads((tmp_path / "mondrian.json").read_text())["bin_edges_source"]["split"] == "surrogate"
    cli(
        "certify",
        "--surrogate",
        tmp_path / "s.pt",
        "--calibration",
        tmp_path / "pooled.json",
        "--model",
        model,
        "--dataset",
        data,
        "--split",
        "test",
        "--target-radius",
        0.25,
        "--max-samples",
        500,
        "--no-progress",
        "--out",
        tmp_path / "t.tsv",
    )
    assert "by method" in capsys.readouterr().out
