"""Every command on every kind of bad input: exit code 2, one line on stderr, nothing written or changed.

One table (``CASES``): each row runs one command of ``surrogate-cert`` in-process on one bad input
(a file of the wrong kind, an artifact that contradicts itself or its partners, a forged or unsigned
calibration, an output that already exists, ...). For every row the whole work folder is hashed
before and after: no output may appear, and no file may change.

The artefacts are built once for the module at toy sizes from the instant untrained digits model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from calibration.conformal import calibrate
from data_gen.generate import generate_counts
from data_gen.store import CountsWriter, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core.certificate import write_tsv
from surrogate_cert.core.cohen import certificates_from_counts
from surrogate_cert.core.signing import ENV_KEY, ENV_KEY_FILE
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.workflows.training import train_surrogate

KEY_A = "a" * 32
KEY_B = "b" * 32


def _forge(content: dict, **changes) -> dict:
    """What an attacker without the key can do: edit, then recompute the unkeyed checksum."""
    content = {k: v for k, v in content.items() if k not in ("checksum_sha256", "signature_hmac_sha256")}
    for key, value in changes.items():
        if value is _DROP:
            content.pop(key, None)
        else:
            content[key] = value
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    content["checksum_sha256"] = hashlib.sha256(canonical).hexdigest()
    return content


_DROP = object()


@pytest.fixture(scope="module")
def work(tmp_path_factory, digits_untrained_model):
    """The good artefacts and the bad ones, in one folder: ``{name: path}``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    f = {
        name: str(root / name)
        for name in (
            "base.pt",
            "train.h5",
            "cal.h5",
            "test.h5",
            "cal_small.h5",
            "cal_sigma.h5",
            "other_cal.h5",
            "surrogate.pt",
            "surrogate_cal.pt",
            "calibration.json",
            "results.tsv",
            "text.pt",
            "empty.pt",
            "empty.npz",
            "five.npz",
            "other.npz",
            "pool.npz",
            "rowsums.h5",
            "label99.h5",
            "incomplete.h5",
            "binary.json",
            "short.key",
            "key_a",
        )
    }
    shutil.copy(digits_untrained_model, f["base.pt"])
    base = f["base.pt"]
    kw = dict(device="cpu", progress=False)
    generate_counts("digits", "train", base, 0.25, 20, f["train.h5"], limit=30, **kw)
    generate_counts("digits", "cal", base, 0.25, 50, f["cal.h5"], limit=40, **kw)
    generate_counts("digits", "cal", base, 0.25, 20, f["cal_small.h5"], limit=30, **kw)
    generate_counts("digits", "cal", base, 0.5, 20, f["cal_sigma.h5"], limit=20, **kw)
    generate_counts("digits", "test", base, 0.25, 20, f["test.h5"], n0=10, limit=5, **kw)
    train_surrogate(f["train.h5"], f["surrogate.pt"], epochs=1, **kw)
    train_surrogate(f["cal_small.h5"], f["surrogate_cal.pt"], epochs=1, **kw)  # trained on cal images
    calibrate(f["surrogate.pt"], f["cal.h5"], 0.05, 1e-3, device="cpu").save(f["calibration.json"])
    test = read_counts(f["test.h5"])
    write_tsv(
        f["results.tsv"],
        test.indices,
        test.labels,
        certificates_from_counts(test.counts_select, test.counts, 1e-3, 0.25),
        meta={"sigma": 0.25},
    )

    Path(f["text.pt"]).write_text("this is not a model\n")
    Path(f["empty.pt"]).write_bytes(b"")
    np.savez(f["empty.npz"])
    rng = np.random.default_rng(0)
    np.savez(f["five.npz"], x=rng.uniform(size=(30, 1, 8, 8)).astype(np.float32), y=np.arange(30) % 5)
    np.savez(f["pool.npz"], x=rng.uniform(size=(12, 1, 8, 8)).astype(np.float32))  # unlabeled
    np.savez(
        f["other.npz"], x=rng.uniform(size=(120, 1, 8, 8)).astype(np.float32), y=np.arange(120) % 10, num_classes=10
    )
    generate_counts(f"npz:{f['other.npz']}", "cal", base, 0.25, 20, f["other_cal.h5"], **kw)
    for name, edit in (
        ("rowsums.h5", lambda h5: h5["counts"].__setitem__((0, 0), h5["counts"][0, 0] + 100)),
        ("label99.h5", lambda h5: h5["labels"].__setitem__(0, 99)),
    ):
        shutil.copy(f["cal.h5"], f[name])
        with h5py.File(f[name], "r+") as h5:
            edit(h5)
    data = read_counts(f["cal.h5"])
    attrs = dict(data.attrs)
    with CountsWriter.open(f["incomplete.h5"], indices=data.indices, labels=data.labels, attrs=attrs) as writer:
        writer.append(data.counts[:10])
    Path(f["binary.json"]).write_bytes(bytes(range(256)))
    Path(f["short.key"]).write_text("short\n")
    Path(f["key_a"]).write_text(KEY_A + "\n")

    content = json.loads(Path(f["calibration.json"]).read_text())
    for name, forged in (
        ("cal_qstring.json", _forge(content, pooled_offset="abc", offsets={"all": "abc"})),
        ("cal_qnan.json", _forge(content, pooled_offset=float("nan"), offsets={"all": float("nan")})),
        ("cal_qneg.json", _forge(content, pooled_offset=-10.0, offsets={"all": -10.0}, radius_cap=100.0)),
        ("cal_eps.json", _forge(content, epsilon=1e-6, bound=1e-6 + content["alpha_mc"])),
        ("cal_missing.json", _forge(content, offsets=_DROP)),
        ("cal_edited.json", dict(content, pooled_offset=content["pooled_offset"] - 0.2)),
    ):
        f[name] = str(root / name)
        Path(f[name]).write_text(json.dumps(forged))
    # Signed with key B, then checked against key A below, with the surrogate signed with key A (with a key
    # configured the surrogate must be signed too); the same weights, so the calibration still fits it.
    f["cal_signed_b.json"] = str(root / "cal_signed_b.json")
    calibrate(f["surrogate.pt"], f["cal.h5"], 0.05, 1e-3, device="cpu").save(f["cal_signed_b.json"], key=KEY_B)
    f["surrogate_a.pt"] = str(root / "surrogate_a.pt")
    Surrogate.load(f["surrogate.pt"]).save(f["surrogate_a.pt"], key=KEY_A)
    # Outputs that already exist (each command must leave them alone).
    f["exists.out"] = str(root / "exists.out")
    Path(f["exists.out"]).write_text("precious\n")
    f["exists.tsv"] = str(root / "exists.tsv")
    Path(f["exists.tsv"]).write_text("precious\n")
    f["meta_only.tsv"] = str(root / "meta_only.tsv")
    Path(f["meta_only.tsv"] + ".meta.json").write_text("{}\n")
    f["exists.html"] = str(root / "exists.html")
    Path(str(root / "exists.md")).write_text("precious\n")  # the report's .md beside it exists
    f["calrep.html"] = str(root / "calrep.html")
    Path(str(root / "calrep.report.json")).write_text("precious\n")
    f["nonempty_dir"] = str(root / "nonempty_dir")
    os.mkdir(f["nonempty_dir"])
    Path(f["nonempty_dir"], "notes.txt").write_text("mine\n")
    f["out_dir"] = str(root / "out")
    os.mkdir(f["out_dir"])
    f["root"] = str(root)
    return f


def _out(f, name):
    return os.path.join(f["out_dir"], name)


# Each case: (id, argv as a function of the files, words the one-line message must contain, env).
# {name} in an argument is replaced by the path of artefact ``name``; "OUT:x" by a fresh output path.
DATAGEN = [
    "datagen",
    "--split",
    "cal",
    "--sigma",
    "0.25",
    "--n",
    "10",
    "--limit",
    "3",
    "--device",
    "cpu",
    "--no-progress",
]
CALIBRATE = ["calibrate", "--epsilon", "0.05", "--device", "cpu"]
CERTIFY = ["certify", "--fallback", "none", "--device", "cpu", "--limit", "4", "--no-progress"]
COHEN = ["cohen", "--sigma", "0.25", "--n0", "5", "--n", "10", "--limit", "2", "--device", "cpu", "--no-progress"]
SEQUENTIAL = [
    "sequential",
    "--sigma",
    "0.25",
    "--max-samples",
    "32",
    "--n0",
    "5",
    "--limit",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
REPORT = ["report"]

CASES = [
    # ---- train-base
    (
        "train-base/empty-npz",
        ["train-base", "--dataset", "npz:{empty.npz}", "--epochs", "1", "--out", "OUT:b.pt"],
        ["x and y"],
        None,
    ),
    (
        "train-base/existing-out",
        ["train-base", "--epochs", "1", "--out", "{exists.out}"],
        ["already exists", "--overwrite"],
        None,
    ),
    ("train-base/out-is-folder", ["train-base", "--epochs", "1", "--out", "{out_dir}"], ["is a folder"], None),
    # ---- datagen
    (
        "datagen/text-as-model",
        DATAGEN + ["--model", "{text.pt}", "--out", "OUT:c.h5"],
        ["text file", "not a model"],
        None,
    ),
    ("datagen/empty-file-as-model", DATAGEN + ["--model", "{empty.pt}", "--out", "OUT:c.h5"], ["empty file"], None),
    (
        "datagen/json-as-model",
        DATAGEN + ["--model", "{calibration.json}", "--out", "OUT:c.h5"],
        ["JSON file", "calibrate"],
        None,
    ),
    ("datagen/hdf5-as-model", DATAGEN + ["--model", "{train.h5}", "--out", "OUT:c.h5"], ["HDF5", "datagen"], None),
    (
        "datagen/surrogate-as-model",
        DATAGEN + ["--model", "{surrogate.pt}", "--out", "OUT:c.h5"],
        ["surrogate checkpoint", "train-base"],
        None,
    ),
    (
        "datagen/empty-npz",
        DATAGEN + ["--dataset", "npz:{empty.npz}", "--model", "{base.pt}", "--out", "OUT:c.h5"],
        ["x and y"],
        None,
    ),
    (
        "datagen/five-class-dataset",
        DATAGEN + ["--dataset", "npz:{five.npz}", "--model", "{base.pt}", "--out", "OUT:c.h5"],
        ["10 output classes", "5"],
        None,
    ),
    (
        "datagen/existing-out",
        DATAGEN + ["--model", "{base.pt}", "--out", "{exists.out}"],
        ["already exists", "--resume"],
        None,
    ),
    (
        "datagen/resume-and-overwrite",
        DATAGEN + ["--model", "{base.pt}", "--out", "OUT:c.h5", "--resume", "--overwrite"],
        ["one of them"],
        None,
    ),
    # ---- train
    (
        "train/text-as-counts",
        ["train", "--counts", "{text.pt}", "--out", "OUT:s.pt", "--no-progress"],
        ["text file", "counts"],
        None,
    ),
    (
        "train/json-as-counts",
        ["train", "--counts", "{calibration.json}", "--out", "OUT:s.pt", "--no-progress"],
        ["JSON file", "counts"],
        None,
    ),
    (
        "train/row-sums",
        ["train", "--counts", "{rowsums.h5}", "--out", "OUT:s.pt", "--no-progress"],
        ["rows of counts do not sum to n = 50"],
        None,
    ),
    ("train/label-99", ["train", "--counts", "{label99.h5}", "--out", "OUT:s.pt", "--no-progress"], ["label 99"], None),
    (
        "train/incomplete",
        ["train", "--counts", "{incomplete.h5}", "--out", "OUT:s.pt", "--no-progress"],
        ["incomplete"],
        None,
    ),
    (
        "train/text-as-init-from-base",
        ["train", "--counts", "{train.h5}", "--init-from-base", "{text.pt}", "--out", "OUT:s.pt", "--no-progress"],
        ["text file"],
        None,
    ),
    (
        "train/surrogate-as-init-from-base",
        ["train", "--counts", "{train.h5}", "--init-from-base", "{surrogate.pt}", "--out", "OUT:s.pt", "--no-progress"],
        ["surrogate checkpoint"],
        None,
    ),
    (
        "train/existing-out",
        ["train", "--counts", "{train.h5}", "--out", "{exists.out}", "--no-progress"],
        ["already exists"],
        None,
    ),
    # ---- calibrate
    (
        "calibrate/text-as-surrogate",
        CALIBRATE + ["--surrogate", "{text.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["text file", "surrogate"],
        None,
    ),
    (
        "calibrate/base-as-surrogate",
        CALIBRATE + ["--surrogate", "{base.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["base model, not a surrogate"],
        None,
    ),
    (
        "calibrate/hdf5-as-surrogate",
        CALIBRATE + ["--surrogate", "{cal.h5}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["HDF5"],
        None,
    ),
    (
        "calibrate/text-as-counts",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{text.pt}", "--out", "OUT:c.json"],
        ["text file", "counts"],
        None,
    ),
    (
        "calibrate/row-sums",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{rowsums.h5}", "--out", "OUT:c.json"],
        ["rows of counts do not sum to n = 50"],
        None,
    ),
    (
        "calibrate/label-99",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{label99.h5}", "--out", "OUT:c.json"],
        ["label 99"],
        None,
    ),
    (
        "calibrate/other-dataset",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{other_cal.h5}", "--out", "OUT:c.json"],
        ["dataset", "other.npz"],
        None,
    ),
    (
        "calibrate/other-sigma",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{cal_sigma.h5}", "--out", "OUT:c.json"],
        ["sigma=0.5"],
        None,
    ),
    (
        "calibrate/training-split",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{train.h5}", "--out", "OUT:c.json"],
        ["training split"],
        None,
    ),
    (
        "calibrate/leak-by-index",
        CALIBRATE + ["--surrogate", "{surrogate_cal.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["30 of the surrogate's training images"],
        None,
    ),
    (
        "calibrate/incomplete",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{incomplete.h5}", "--out", "OUT:c.json"],
        ["incomplete"],
        None,
    ),
    (
        "calibrate/existing-out",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{cal.h5}", "--out", "{exists.out}"],
        ["already exists"],
        None,
    ),
    (
        "calibrate/existing-report",
        CALIBRATE
        + ["--surrogate", "{surrogate.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json", "--report", "{calrep.html}"],
        ["calrep.report.json already exists"],
        None,
    ),
    (
        "calibrate/short-key",
        CALIBRATE
        + ["--surrogate", "{surrogate.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json", "--key-file", "{short.key}"],
        ["at least 16"],
        None,
    ),
    # ---- certify
    (
        "certify/text-as-surrogate",
        CERTIFY + ["--surrogate", "{text.pt}", "--calibration", "{calibration.json}", "--out", "OUT:h.tsv"],
        ["text file"],
        None,
    ),
    (
        "certify/text-as-model",
        [
            "certify",
            "--device",
            "cpu",
            "--limit",
            "2",
            "--no-progress",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--model",
            "{text.pt}",
            "--out",
            "OUT:h.tsv",
        ],
        ["text file"],
        None,
    ),
    (
        "certify/surrogate-as-model",
        [
            "certify",
            "--device",
            "cpu",
            "--limit",
            "2",
            "--no-progress",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--model",
            "{surrogate.pt}",
            "--out",
            "OUT:h.tsv",
        ],
        ["surrogate checkpoint"],
        None,
    ),
    (
        "certify/hdf5-as-calibration",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal.h5}", "--out", "OUT:h.tsv"],
        ["HDF5", "calibration JSON"],
        None,
    ),
    (
        "certify/binary-as-calibration",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{binary.json}", "--out", "OUT:h.tsv"],
        ["binary", "calibration JSON"],
        None,
    ),
    (
        "certify/q-string",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_qstring.json}", "--out", "OUT:h.tsv"],
        ["pooled_offset 'abc'"],
        None,
    ),
    (
        "certify/q-nan",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_qnan.json}", "--out", "OUT:h.tsv"],
        ["pooled_offset nan"],
        None,
    ),
    (
        "certify/q-negative-cap-100",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_qneg.json}", "--out", "OUT:h.tsv"],
        ["radius_cap 100.0"],
        None,
    ),
    (
        "certify/epsilon-edited",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_eps.json}", "--out", "OUT:h.tsv"],
        ["epsilon"],
        None,
    ),
    (
        "certify/missing-field",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_missing.json}", "--out", "OUT:h.tsv"],
        ["lacks the fields ['offsets']"],
        None,
    ),
    (
        "certify/edited-not-rehashed",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{cal_edited.json}", "--out", "OUT:h.tsv"],
        ["modified", "checksum"],
        None,
    ),
    (
        "certify/another-surrogate",
        CERTIFY + ["--surrogate", "{surrogate_cal.pt}", "--calibration", "{calibration.json}", "--out", "OUT:h.tsv"],
        ["another surrogate"],
        None,
    ),
    (
        "certify/five-class-dataset",
        CERTIFY
        + [
            "--dataset",
            "npz:{five.npz}",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:h.tsv",
        ],
        ["5 classes", "10 classes"],
        None,
    ),
    (
        "certify/empty-npz",
        CERTIFY
        + [
            "--dataset",
            "npz:{empty.npz}",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:h.tsv",
        ],
        ["x and y"],
        None,
    ),
    (
        "certify/refine-without-price",
        CERTIFY
        + ["--surrogate", "{surrogate.pt}", "--calibration", "{calibration.json}", "--refine", "--out", "OUT:h.tsv"],
        ["price"],
        None,
    ),
    (
        "certify/unlabeled-pool",
        CERTIFY
        + [
            "--dataset",
            "npz:{pool.npz}",
            "--split",
            "pool",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:h.tsv",
        ],
        ["unlabeled pool", "needs labels"],
        None,
    ),
    (
        "datagen/pool-split-of-labelled-data",
        DATAGEN + ["--split", "pool", "--model", "{base.pt}", "--out", "OUT:c.h5"],
        ["labelled"],
        None,
    ),
    (
        "certify/other-dataset",
        CERTIFY
        + [
            "--dataset",
            "npz:{other.npz}",
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:h.tsv",
        ],
        ["computed on 'digits'"],
        None,
    ),
    (
        "certify/unsigned-with-key",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{calibration.json}", "--out", "OUT:h.tsv"],
        ["not signed"],
        {ENV_KEY: KEY_A},
    ),
    (
        "certify/signed-with-another-key",
        CERTIFY
        + [
            "--surrogate",
            "{surrogate_a.pt}",
            "--calibration",
            "{cal_signed_b.json}",
            "--out",
            "OUT:h.tsv",
            "--key-file",
            "{key_a}",
        ],
        ["another key"],
        None,
    ),
    (
        "certify/both-key-variables",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{calibration.json}", "--out", "OUT:h.tsv"],
        ["unset one"],
        {ENV_KEY: KEY_A, ENV_KEY_FILE: "{key_a}"},
    ),
    (
        "certify/existing-out",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{calibration.json}", "--out", "{exists.tsv}"],
        ["already exists"],
        None,
    ),
    (
        "certify/existing-meta-json",
        CERTIFY + ["--surrogate", "{surrogate.pt}", "--calibration", "{calibration.json}", "--out", "{meta_only.tsv}"],
        ["meta_only.tsv.meta.json already exists"],
        None,
    ),
    # ---- cohen
    ("cohen/text-as-model", COHEN + ["--model", "{text.pt}", "--out", "OUT:c.tsv"], ["text file"], None),
    ("cohen/json-as-model", COHEN + ["--model", "{calibration.json}", "--out", "OUT:c.tsv"], ["JSON file"], None),
    (
        "cohen/surrogate-as-model",
        COHEN + ["--model", "{surrogate.pt}", "--out", "OUT:c.tsv"],
        ["surrogate checkpoint"],
        None,
    ),
    (
        "cohen/empty-npz",
        COHEN + ["--dataset", "npz:{empty.npz}", "--model", "{base.pt}", "--out", "OUT:c.tsv"],
        ["x and y"],
        None,
    ),
    (
        "cohen/five-class-dataset",
        COHEN + ["--dataset", "npz:{five.npz}", "--model", "{base.pt}", "--out", "OUT:c.tsv"],
        ["10 output classes"],
        None,
    ),
    ("cohen/existing-out", COHEN + ["--model", "{base.pt}", "--out", "{exists.tsv}"], ["already exists"], None),
    # ---- sequential
    ("sequential/text-as-model", SEQUENTIAL + ["--model", "{text.pt}", "--out", "OUT:s.tsv"], ["text file"], None),
    ("sequential/hdf5-as-model", SEQUENTIAL + ["--model", "{cal.h5}", "--out", "OUT:s.tsv"], ["HDF5"], None),
    (
        "sequential/empty-npz",
        SEQUENTIAL + ["--dataset", "npz:{empty.npz}", "--model", "{base.pt}", "--out", "OUT:s.tsv"],
        ["x and y"],
        None,
    ),
    (
        "sequential/existing-out",
        SEQUENTIAL + ["--model", "{base.pt}", "--out", "{exists.tsv}"],
        ["already exists"],
        None,
    ),
    # ---- report
    (
        "report/hdf5-as-results",
        REPORT + ["--results", "{cal.h5}", "--out", "OUT:r.html"],
        ["HDF5", "results TSV"],
        None,
    ),
    (
        "report/json-as-results",
        REPORT + ["--results", "{calibration.json}", "--out", "OUT:r.html"],
        ["JSON file", "results TSV"],
        None,
    ),
    (
        "report/inconsistent-row",
        REPORT + ["--results", "{bad_row.tsv}", "--out", "OUT:r.html"],
        ["row 2", "correct=1"],
        None,
    ),
    ("report/missing-columns", REPORT + ["--results", "{cols.tsv}", "--out", "OUT:r.html"], ["missing columns"], None),
    (
        "report/hdf5-as-calibration",
        REPORT + ["--results", "{results.tsv}", "--calibration", "{cal.h5}", "--out", "OUT:r.html"],
        ["HDF5"],
        None,
    ),
    (
        "report/q-string",
        REPORT + ["--results", "{results.tsv}", "--calibration", "{cal_qstring.json}", "--out", "OUT:r.html"],
        ["'abc'"],
        None,
    ),
    (
        "report/q-negative-cap-100",
        REPORT + ["--results", "{results.tsv}", "--calibration", "{cal_qneg.json}", "--out", "OUT:r.html"],
        ["radius_cap"],
        None,
    ),
    (
        "report/counts-of-another-dataset",
        REPORT
        + [
            "--results",
            "{results.tsv}",
            "--calibration",
            "{calibration.json}",
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{other_cal.h5}",
            "--out",
            "OUT:r.html",
        ],
        ["dataset"],
        None,
    ),
    (
        "report/text-as-counts",
        REPORT
        + [
            "--results",
            "{results.tsv}",
            "--calibration",
            "{calibration.json}",
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{text.pt}",
            "--out",
            "OUT:r.html",
        ],
        ["text file"],
        None,
    ),
    (
        "report/unsigned-with-key",
        REPORT
        + [
            "--results",
            "{results.tsv}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:r.html",
            "--key-file",
            "{key_a}",
        ],
        ["not signed"],
        None,
    ),
    (
        "report/existing-md",
        REPORT + ["--results", "{results.tsv}", "--out", "{exists.html}"],
        ["exists.md already exists"],
        None,
    ),
    # ---- bench and quickstart
    ("bench/existing-out", ["bench", "--tiny", "--out", "{exists.out}", "--no-progress"], ["already exists"], None),
    (
        "quickstart/non-empty-folder",
        ["quickstart", "--quick", "--out", "{nonempty_dir}", "--no-progress"],
        ["already holds files", "--resume"],
        None,
    ),
    (
        "quickstart/out-is-a-file",
        ["quickstart", "--quick", "--out", "{exists.out}", "--no-progress"],
        ["is a file"],
        None,
    ),
]


def _snapshot(root: str) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _fill(work, text: str) -> str:
    if text.startswith("OUT:"):
        return _out(work, text[4:])
    for name, path in work.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.fixture(scope="module")
def results_variants(work):
    rows = Path(work["results.tsv"]).read_text().splitlines()
    cells = rows[1].split("\t")
    cells[4] = "1" if cells[4] == "0" else "0"  # correct contradicts predict == label
    Path(work["root"], "bad_row.tsv").write_text("\n".join([rows[0], "\t".join(cells)] + rows[2:]) + "\n")
    Path(work["root"], "cols.tsv").write_text("idx\tlabel\tradius\n0\t1\t0.5\n")
    return {"bad_row.tsv": str(Path(work["root"], "bad_row.tsv")), "cols.tsv": str(Path(work["root"], "cols.tsv"))}


@pytest.mark.parametrize("case_id, argv, needles, env", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    work, results_variants, capsys, monkeypatch, case_id, argv, needles, env
):
    files = {**work, **results_variants}
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, _fill(files, value))
    argv = [_fill(files, a) for a in argv]
    before = _snapshot(work["root"])
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"{case_id}: exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _snapshot(work["root"]) == before, f"{case_id} created or changed a file"


def test_the_table_covers_every_command_that_reads_or_writes_files():
    commands = {c[1][0] for c in CASES}
    assert commands == {
        "train-base",
        "datagen",
        "train",
        "calibrate",
        "certify",
        "cohen",
        "sequential",
        "report",
        "bench",
        "quickstart",
    }
    assert len(CASES) >= 70


def test_a_good_run_still_works_and_overwrite_replaces(work, capsys):
    """The same artefacts pass when nothing is wrong, and --overwrite is what lets an output be replaced."""
    out = _out(work, "ok.tsv")
    argv = CERTIFY + ["--surrogate", work["surrogate.pt"], "--calibration", work["calibration.json"], "--out", out]
    assert main(argv) == 0
    first = Path(out).read_text()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0 and Path(out).read_text().splitlines()[0] == first.splitlines()[0]
    assert not [n for n in os.listdir(work["out_dir"]) if ".tmp-" in n]  # no temporary file left behind
    os.unlink(out)
    os.unlink(out + ".meta.json")
