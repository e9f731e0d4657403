"""Nothing unsafe runs, nothing absurd is certified: files and settings from untrusted or careless hands.

Three tables, each row one command of ``surrogate-cert`` run in-process:

- ``MALICIOUS``: a ``torch.export`` archive (``.pt2``) built to run code when loaded, of every kind
  (a weight or a tensor constant stored as a pickle, a pickled custom object, pickled sample inputs in
  protocol 2 and 4, a shape expression that sympy would evaluate, a node calling ``torch.os.system``),
  given to every command that takes a model (``MODEL_COMMANDS``) and to the Python loaders. The
  payload would create a marker file; the marker must never appear, and the command must exit 2 with
  one line naming what was refused. A ``guards_code`` payload (``exec``-ed by ``torch.export``) is
  dropped instead: the model loads, certifies, and the marker never appears.
- ``CASES``: the issue's other points: absurd settings (sigma, NaN or overflowing models, radii,
  learning rates, bins, seeds), files that contradict themselves (negative counts, incomplete or
  row-inconsistent counts, stream labels outside the classes, an ``.npy`` given for an ``.npz``), the
  calibration used on its own images, forged checkpoints (unkeyed and keyed), counts and checkpoints
  under a signing key, arguments that used to be refused only after a file was written, and files the
  operating system will not open (symbolic-link loops, dangling links, permission denied).
- Every row: exit code 2, one line on stderr with the words given, and the work folder unchanged
  (hashed before and after): nothing written, nothing altered.

Python-level checks (the counting engine's own checks, the loaders' typed errors) follow the tables.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from calibration.conformal import calibrate
from data_gen.generate import generate_counts
from data_gen.models import load_model
from data_gen.store import CountsWriter, read_counts
from surrogate_cert.cli import main
from surrogate_cert.core.architectures import CHECKSUM_FIELD, checkpoint_message, save_checkpoint
from surrogate_cert.core.certificate import write_tsv
from surrogate_cert.core.cohen import certificates_from_counts
from surrogate_cert.core.errors import (
    ArtifactSignatureError,
    CheckpointSignatureError,
    CountsSignatureError,
    InvalidParameterError,
    ModelError,
)
from surrogate_cert.core.pt2 import load_exported_program
from surrogate_cert.core.signing import ENV_KEY, ENV_KEY_FILE
from surrogate_cert.core.smoothing import SmoothedClassifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.hybrid import HybridCertifier
from surrogate_cert.workflows.training import train_surrogate

pytestmark = pytest.mark.slow

KEY_A = "a" * 32
KEY_B = "b" * 32


# --------------------------------------------------------------------------- malicious archives
class _Payload:
    """Unpickling this creates ``marker`` and returns a tensor: a stealthy model would then work normally."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"(__import__('pathlib').Path({self.marker!r}).touch(), __import__('torch').zeros(10, 64))[1]",))


def _pickled(marker: str, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer, pickle_protocol=protocol)
    return buffer.getvalue()


class _Tiny(nn.Module):
    """A digits classifier with a weight and a lifted tensor constant, so both can be made pickles."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) * torch.tensor([1.0] * 64))


def _rewrite(src: str, dst: str, edit) -> str:
    with zipfile.ZipFile(src) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(files)).split("/")[0] + "/"
    edit(files, root)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return dst


def _config(files, root, name):
    return json.loads(files[root + name])


def _pickle_entry(files, root, config_name, folder, marker, fqn=None):
    config = _config(files, root, config_name)
    fqn = fqn or next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    files[root + folder + config["config"][fqn]["path_name"]] = _pickled(marker)
    files[root + config_name] = json.dumps(config).encode()


def _weight(files, root, marker):
    _pickle_entry(files, root, "data/weights/model_weights_config.json", "data/weights/", marker, "fc.weight")


def _constant(files, root, marker):
    _pickle_entry(files, root, "data/constants/model_constants_config.json", "data/constants/", marker)


def _opaque(files, root, marker):
    config = _config(files, root, "data/constants/model_constants_config.json")
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    files[root + "data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
    files[root + "data/constants/model_constants_config.json"] = json.dumps(config).encode()


def _sample_inputs(files, root, marker):
    files[root + "data/sample_inputs/model.pt"] = _pickled(marker)


def _sample_inputs_p4(files, root, marker):
    files[root + "data/sample_inputs/model.pt"] = _pickled(marker, protocol=4)


def _program_text(files, root, edit):
    files[root + "models/model.json"] = edit(files[root + "models/model.json"].decode()).encode()


def _sympy(files, root, marker):
    code = f"(__import__('pathlib').Path('{marker}').touch(), Symbol('s0', positive=True, integer=True))[1]"

    def edit(text):
        doc = json.loads(text)
        values = doc["graph_module"]["graph"]["tensor_values"]
        for value in values.values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = code
                    return json.dumps(doc)
        raise AssertionError("no symbolic size to poison")

    _program_text(files, root, edit)


def _target(files, root, marker):
    def edit(text):
        doc = json.loads(text)
        doc["graph_module"]["graph"]["nodes"].insert(
            0,
            {
                "target": "torch.os.system",
                "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                "outputs": [],
                "metadata": {},
                "name": "evil",
            },
        )
        return json.dumps(doc)

    _program_text(files, root, edit)


def _guards(files, root, marker):
    def edit(text):
        doc = json.loads(text)
        doc["guards_code"] = [f"(__import__('pathlib').Path({marker!r}).touch() or True)"]
        return json.dumps(doc)

    _program_text(files, root, edit)


MALICIOUS = {
    # name: (how the archive is poisoned, words of the refusal)
    "pickled-weight": (_weight, ["stores 'fc.weight' as a pickle", "builtins.eval"]),
    "pickled-constant": (_constant, ["as a pickle", "builtins.eval"]),
    "pickled-custom-object": (_opaque, ["opaque_obj_0", "only a pickle could rebuild"]),
    "pickled-sample-inputs": (_sample_inputs, ["sample inputs", "builtins.eval"]),
    "pickled-sample-inputs-protocol-4": (_sample_inputs_p4, ["sample inputs", "builtins.eval"]),
    "sympy-expression": (_sympy, ["shape expression", "not a plain sympy expression"]),
    "os-system-node": (_target, ["torch.os.system", "not a registered torch operator"]),
}


# --------------------------------------------------------------------------- artefacts
def _forge_json(content: dict, **changes) -> dict:
    """A calibration edited by someone without the key: the unkeyed checksum recomputed."""
    content = {k: v for k, v in content.items() if k not in ("checksum_sha256", "signature_hmac_sha256")}
    content.update(changes)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    content["checksum_sha256"] = hashlib.sha256(canonical).hexdigest()
    return content


def _edit_checkpoint(src: str, dst: str, edit, recompute: bool = True) -> str:
    """A checkpoint edited as a forger without the key can: fields changed, the checksum recomputed."""
    payload = torch.load(src, weights_only=True)
    edit(payload)
    if recompute:
        payload[CHECKSUM_FIELD] = hashlib.sha256(checkpoint_message(payload)).hexdigest()
    torch.save(payload, dst)
    return dst


def _edit_h5(src: str, dst: str, edit) -> str:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as h5:
        edit(h5)
    return dst


def _negative_counts(h5):
    counts = h5["counts"][:].astype(np.int64)
    counts[0, 0] += 1
    counts[0, 1] -= counts[0, 1] + 1  # -1: the row still sums to n
    counts[0, 0] += int(h5["counts"][0, 1])
    del h5["counts"]
    h5.create_dataset("counts", data=counts)


def _move_one_count(h5):
    counts = h5["counts"][:]
    top = int(np.argmax(counts[0]))
    counts[0, top] -= 1
    counts[0, (top + 1) % counts.shape[1]] += 1
    h5["counts"][:] = counts


@pytest.fixture(scope="module")
def work(tmp_path_factory, digits_untrained_model):
    """Good artefacts and bad ones in one folder (``{name: path}``); outputs go to ``out/``."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("untrusted")
    f = {"root": str(root), "out_dir": str(root / "out"), "markers": str(root / "markers")}
    os.mkdir(f["out_dir"])
    os.mkdir(f["markers"])
    p = lambda name: f.setdefault(name, str(root / name))  # noqa: E731
    shutil.copy(digits_untrained_model, p("base.pt"))
    kw = dict(device="cpu", progress=False)
    generate_counts("digits", "train", f["base.pt"], 0.25, 20, p("train.h5"), limit=30, **kw)
    generate_counts("digits", "cal", f["base.pt"], 0.25, 50, p("cal.h5"), limit=40, **kw)
    generate_counts("digits", "cal", f["base.pt"], 0.25, 20, p("cal_small.h5"), limit=30, **kw)
    generate_counts("digits", "test", f["base.pt"], 0.25, 20, p("test.h5"), limit=8, **kw)
    train_surrogate(f["train.h5"], p("surrogate.pt"), epochs=1, **kw)
    train_surrogate(f["cal_small.h5"], p("surrogate_cal.pt"), epochs=1, **kw)  # trained on calibration images
    calibrate(f["surrogate.pt"], f["cal.h5"], 0.05, 1e-3, device="cpu").save(p("calibration.json"))
    test = read_counts(f["test.h5"])
    write_tsv(
        p("results.tsv"),
        test.indices,
        test.labels,
        certificates_from_counts(test.counts, test.counts, 1e-3, 0.25),
        meta={"sigma": 0.25},
    )

    # Absurd models: NaN weights; finite weights whose logits overflow.
    def scaled(name, value, every=False):
        payload = torch.load(f["base.pt"], weights_only=True)
        weights = [k for k in payload["state_dict"] if k.endswith("weight")]
        for weight in weights if every else weights[:1]:
            payload["state_dict"][weight] = payload["state_dict"][weight] * value
        payload.pop(CHECKSUM_FIELD, None)
        torch.save(payload, p(name))

    scaled("nan.pt", float("nan"))
    scaled("overflow.pt", 1e20, every=True)  # finite weights (1e19), logits past float32's 3.4e38

    # Counts that contradict themselves, or are incomplete.
    _edit_h5(f["train.h5"], p("negative.h5"), _negative_counts)
    _edit_h5(f["train.h5"], p("rowsums.h5"), lambda h5: h5["counts"].__setitem__((0, 0), h5["counts"][0, 0] + 5))
    data = read_counts(f["test.h5"])
    with CountsWriter.open(p("incomplete.h5"), indices=data.indices, labels=data.labels, attrs=dict(data.attrs)) as w:
        w.append(data.counts[:3])
    Path(p("truncated.h5")).write_bytes(Path(f["test.h5"]).read_bytes()[:2000])
    Path(p("text.txt")).write_text("not a counts file\n")

    # Streams and datasets.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 1, 8, 8)).astype(np.float32)
    np.savez(p("stream.npz"), x=x, y=np.array([0, 1, 5, 2, 3, 4]))
    np.savez(p("stream_minus1.npz"), x=x, y=np.array([0, 1, -1, 2, 3, 4]))
    np.savez(p("stream_99.npz"), x=x, y=np.array([0, 1, 99, 2, 3, 4]))
    np.save(p("plain.npy"), x)
    np.savez(
        p("classes_array.npz"),
        x=rng.uniform(size=(40, 1, 8, 8)).astype(np.float32),
        y=np.arange(40) % 10,
        num_classes=np.array([10, 10]),
    )

    # The calibration used where its guarantee does not hold.
    content = json.loads(Path(f["calibration.json"]).read_text())
    Path(p("cal_on_test.json")).write_text(json.dumps(_forge_json(content, split="test")))

    # Forged checkpoints, unkeyed: a surrogate relabelled as a base model; a surrogate trained on
    # calibration images relabelled as trained on the train split, its training indices deleted.
    _edit_checkpoint(f["surrogate.pt"], p("relabelled_base.pt"), lambda c: c.update(kind="base"))
    _edit_checkpoint(f["surrogate.pt"], p("relabelled_base_raw.pt"), lambda c: c.update(kind="base"), recompute=False)

    def relabel(c):
        c["meta"]["split"] = "train"
        del c["meta"]["train_index_ranges"]

    _edit_checkpoint(f["surrogate_cal.pt"], p("split_relabelled.pt"), relabel)

    # Keyed artefacts: counts and a surrogate signed with key A (and B); then edited without the key.
    generate_counts("digits", "cal", f["base.pt"], 0.25, 50, p("cal_a.h5"), limit=40, key=KEY_A, **kw)
    generate_counts("digits", "cal", f["base.pt"], 0.25, 50, p("cal_b.h5"), limit=40, key=KEY_B, **kw)
    _edit_h5(f["cal_a.h5"], p("cal_a_edited.h5"), _move_one_count)
    Surrogate.load(f["surrogate_cal.pt"]).save(p("surrogate_cal_a.pt"), key=KEY_A)

    def relabel_all(c):  # every field a legacy file would lack: unkeyed checks cannot see this one
        relabel(c)
        for name in ("counts_files", "counts_rows"):
            c["meta"].pop(name, None)

    _edit_checkpoint(f["surrogate_cal_a.pt"], p("split_relabelled_a.pt"), relabel_all)
    Surrogate.load(f["surrogate.pt"]).save(p("surrogate_b.pt"), key=KEY_B)
    Path(p("key_a")).write_text(KEY_A + "\n")

    # Files the operating system refuses to open.
    os.symlink(str(root / "loop_b"), p("loop_a"))
    os.symlink(str(root / "loop_a"), p("loop_b"))
    os.symlink(str(root / "gone.pt"), p("dangling.pt"))

    # torch.export archives: a good one and the malicious ones.
    program = torch.export.export(
        _Tiny().eval(), (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, p("good.pt2"))
    for name, (poison, _) in MALICIOUS.items():
        marker = os.path.join(f["markers"], name)
        _rewrite(
            f["good.pt2"], p(f"{name}.pt2"), lambda files, r, poison=poison, marker=marker: poison(files, r, marker)
        )
    guard_marker = os.path.join(f["markers"], "guards-code")
    _rewrite(f["good.pt2"], p("guards-code.pt2"), lambda files, r: _guards(files, r, guard_marker))

    # Outputs that exist (a refusal must leave them alone).
    Path(p("exists.json")).write_text("precious\n")
    return f


# --------------------------------------------------------------------------- running one row
def _snapshot(root: str) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = "link:" + os.readlink(path)
                continue
            with io.open(path, "rb") as fh:  # noqa: UP020  (the permission test replaces builtins.open)
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _fill(work, text: str) -> str:
    if text.startswith("OUT:"):
        return os.path.join(work["out_dir"], text[4:])
    for name in sorted(work, key=len, reverse=True):
        text = text.replace("{" + name + "}", work[name])
    return text


def _run_refused(work, capsys, monkeypatch, argv, needles, env=None, case_id=""):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, _fill(work, value))
    argv = [_fill(work, a) for a in argv]
    before = _snapshot(work["root"])
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"{case_id}: exit {code}; stderr: {err[-3000:]}"
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{case_id}: {needle!r} not in {lines[0]!r}"
    assert _snapshot(work["root"]) == before, f"{case_id} created or changed a file"
    return lines[0]


# --------------------------------------------------------------------------- table 1: malicious archives
TINY = ["--limit", "2", "--device", "cpu", "--no-progress"]
MODEL_COMMANDS = {
    "datagen": [
        "datagen",
        "--split",
        "test",
        "--sigma",
        "0.25",
        "--n",
        "10",
        *TINY,
        "--model",
        "{MODEL}",
        "--out",
        "OUT:m.h5",
    ],
    "cohen": ["cohen", "--sigma", "0.25", "--n0", "5", "--n", "10", *TINY, "--model", "{MODEL}", "--out", "OUT:m.tsv"],
    "sequential": [
        "sequential",
        "--sigma",
        "0.25",
        "--max-samples",
        "32",
        "--n0",
        "5",
        *TINY,
        "--model",
        "{MODEL}",
        "--out",
        "OUT:m.tsv",
    ],
    "sequential --class-from": [
        "sequential",
        "--sigma",
        "0.25",
        "--max-samples",
        "32",
        *TINY,
        "--model",
        "{base.pt}",
        "--class-from",
        "{MODEL}",
        "--out",
        "OUT:m.tsv",
    ],
    "deterministic": ["deterministic", "--method", "ibp", *TINY, "--model", "{MODEL}", "--out", "OUT:m.tsv"],
    "certify": [
        "certify",
        *TINY,
        "--surrogate",
        "{surrogate.pt}",
        "--calibration",
        "{calibration.json}",
        "--model",
        "{MODEL}",
        "--out",
        "OUT:m.tsv",
    ],
    "train --init-from-base": [
        "train",
        "--counts",
        "{train.h5}",
        "--epochs",
        "1",
        "--no-progress",
        "--init-from-base",
        "{MODEL}",
        "--arch",
        "mlp",
        "--out",
        "OUT:m.pt",
    ],
    "monitor --model": [
        "monitor",
        "--surrogate",
        "{surrogate.pt}",
        "--calibration",
        "{calibration.json}",
        "--stream",
        "{stream.npz}",
        "--model",
        "{MODEL}",
        "--audit-rate",
        "0.5",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        "OUT:m.json",
    ],
}
"""Every command that takes a model file (quickstart and bench take none: they train their own)."""


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("archive", list(MALICIOUS))
def test_a_malicious_model_archive_runs_nothing_and_is_refused(work, capsys, monkeypatch, archive, command):
    argv = [a.replace("{MODEL}", "{" + archive + ".pt2}") for a in MODEL_COMMANDS[command]]
    line = _run_refused(
        work, capsys, monkeypatch, argv, MALICIOUS[archive][1] + ["refused"], case_id=f"{command}/{archive}"
    )
    assert "data, never code" in line
    assert not os.listdir(work["markers"]), f"{command} ran the payload of {archive}"


@pytest.mark.parametrize("archive", list(MALICIOUS))
def test_the_python_loaders_refuse_malicious_archives_with_a_typed_error(work, archive):
    path = work[f"{archive}.pt2"]
    for load in (
        lambda: load_exported_program(path),
        lambda: load_model(path, device="cpu"),
        lambda: HybridCertifier.load(work["surrogate.pt"], work["calibration.json"], base_model=path, device="cpu"),
        lambda: train_surrogate(
            work["train.h5"],
            os.path.join(work["out_dir"], "py.pt"),
            epochs=1,
            init_from_base=path,
            arch="mlp",
            device="cpu",
            progress=False,
        ),
    ):
        with pytest.raises(ModelError, match="refused"):
            load()
    assert not os.listdir(work["markers"])
    assert not os.path.exists(os.path.join(work["out_dir"], "py.pt"))


@pytest.mark.parametrize("archive", list(MALICIOUS))
def test_a_surrogate_carrying_a_malicious_program_runs_nothing_and_is_refused(work, archive, tmp_path):
    """A surrogate started from a user's ``.pt2`` carries that program: it is read as data like any model file."""
    path = str(tmp_path / f"surrogate-{archive}.pt")
    save_checkpoint(
        path,
        _Tiny(),
        arch="torch-export",
        input_shape=(1, 8, 8),
        num_classes=10,
        kind="surrogate",
        meta={"sigma": 0.25, "kappa": 10.0, "w": 0.5},
        network=Path(work[f"{archive}.pt2"]).read_bytes(),
    )
    with pytest.raises(ModelError, match="refused"):
        Surrogate.load(path, device="cpu")
    assert not os.listdir(work["markers"]), f"loading a surrogate ran the payload of {archive}"


def test_guards_code_is_dropped_not_run_and_good_archives_still_certify(work, capsys):
    """``torch.export`` exec-utes an archive's guards_code when it makes a module: it is dropped here."""
    for name in ("good.pt2", "guards-code.pt2"):
        out = os.path.join(work["out_dir"], f"{name}.tsv")
        code = main(["cohen", "--sigma", "0.25", "--n0", "5", "--n", "20", *TINY, "--model", work[name], "--out", out])
        assert code == 0, capsys.readouterr().err
        assert Path(out).read_text().startswith("idx\tlabel\tpredict")
        os.unlink(out)
        os.unlink(out + ".meta.json")
    assert not os.listdir(work["markers"])
    loaded = load_model(work["good.pt2"], device="cpu", num_classes=10, input_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded.model(x), _Tiny().eval()(x), atol=1e-6)


# --------------------------------------------------------------------------- table 2: every other case
DATAGEN = ["datagen", "--split", "cal", "--sigma", "0.25", "--n", "10", *TINY]
COHEN = ["cohen", "--sigma", "0.25", "--n0", "5", "--n", "10", *TINY]
SEQUENTIAL = ["sequential", "--sigma", "0.25", "--max-samples", "32", "--n0", "5", *TINY]
CERTIFY = [
    "certify",
    "--fallback",
    "none",
    *TINY,
    "--surrogate",
    "{surrogate.pt}",
    "--calibration",
    "{calibration.json}",
]
CALIBRATE = ["calibrate", "--epsilon", "0.05", "--device", "cpu"]
TRAIN = ["train", "--epochs", "1", "--no-progress"]
REPORT = ["report", "--results", "{results.tsv}"]
MONITOR = [
    "monitor",
    "--surrogate",
    "{surrogate.pt}",
    "--calibration",
    "{calibration.json}",
    "--device",
    "cpu",
    "--no-progress",
]
SIGMA = ["sigma must lie in [0.0001, 1000]", "float32"]
NOT_FINITE = ["NaN or infinite"]
KEY = {ENV_KEY: KEY_A}

CASES = [
    # ---- 2. absurd settings: sigma out of range, NaN and overflowing models
    ("2/train-base/sigma-1e308", ["train-base", "--sigma", "1e308", "--epochs", "1", "--out", "OUT:b.pt"], SIGMA, None),
    ("2/datagen/sigma-1e308", DATAGEN + ["--model", "{base.pt}", "--sigma", "1e308", "--out", "OUT:c.h5"], SIGMA, None),
    ("2/cohen/sigma-1e308", COHEN + ["--model", "{base.pt}", "--sigma", "1e308", "--out", "OUT:c.tsv"], SIGMA, None),
    ("2/cohen/sigma-1e-9", COHEN + ["--model", "{base.pt}", "--sigma", "1e-9", "--out", "OUT:c.tsv"], SIGMA, None),
    (
        "2/sequential/sigma-inf",
        SEQUENTIAL + ["--model", "{base.pt}", "--sigma", "inf", "--out", "OUT:s.tsv"],
        SIGMA,
        None,
    ),
    ("2/datagen/nan-model", DATAGEN + ["--model", "{nan.pt}", "--out", "OUT:c.h5"], NOT_FINITE, None),
    ("2/cohen/nan-model", COHEN + ["--model", "{nan.pt}", "--out", "OUT:c.tsv"], NOT_FINITE, None),
    (
        "2/cohen/overflowing-logits",
        COHEN + ["--model", "{overflow.pt}", "--out", "OUT:c.tsv"],
        NOT_FINITE + ["probe batch"],
        None,
    ),
    (
        "2/certify/nan-model",
        [
            "certify",
            *TINY,
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{calibration.json}",
            "--model",
            "{nan.pt}",
            "--out",
            "OUT:h.tsv",
        ],
        NOT_FINITE,
        None,
    ),
    (
        "2/deterministic/nan-model",
        ["deterministic", *TINY, "--model", "{nan.pt}", "--out", "OUT:d.tsv"],
        NOT_FINITE,
        None,
    ),
    # ---- 3. settings and files silently accepted or altered
    (
        "3/certify/target-radius-nan",
        CERTIFY + ["--target-radius", "nan", "--out", "OUT:h.tsv"],
        ["--target-radius", "finite radius"],
        None,
    ),
    (
        "3/sequential/target-radius-nan",
        SEQUENTIAL + ["--model", "{base.pt}", "--target-radius", "nan", "--out", "OUT:s.tsv"],
        ["--target-radius", "finite radius"],
        None,
    ),
    (
        "3/sequential/target-radius-inf",
        SEQUENTIAL + ["--model", "{base.pt}", "--target-radius", "inf", "--out", "OUT:s.tsv"],
        ["--target-radius", "finite radius"],
        None,
    ),
    ("3/train/lr-0", TRAIN + ["--counts", "{train.h5}", "--lr", "0", "--out", "OUT:s.pt"], ["lr must be"], None),
    (
        "3/calibrate/bins-0",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--score",
            "shifted",
            "--bins",
            "0",
            "--out",
            "OUT:c.json",
        ],
        ["bins must be an integer >= 1"],
        None,
    ),
    (
        "3/calibrate/bins-unused",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{cal.h5}", "--bins", "4", "--out", "OUT:c.json"],
        ["--bins sets the bins"],
        None,
    ),
    (
        "3/train/negative-int64-counts",
        TRAIN + ["--counts", "{negative.h5}", "--out", "OUT:s.pt"],
        ["negative count"],
        None,
    ),
    (
        "3/calibrate/negative-int64-counts",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{negative.h5}", "--out", "OUT:c.json"],
        ["negative count"],
        None,
    ),
    (
        "3/report/incomplete-counts",
        REPORT
        + [
            "--calibration",
            "{calibration.json}",
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{incomplete.h5}",
            "--out",
            "OUT:r.html",
        ],
        ["incomplete"],
        None,
    ),
    (
        "3/report/offline-counts-row-sums",
        REPORT + ["--offline-counts", "{rowsums.h5}", "--out", "OUT:r.html"],
        ["do not sum to n"],
        None,
    ),
    (
        "3/monitor/label-minus-1",
        MONITOR + ["--stream", "{stream_minus1.npz}", "--out", "OUT:m.json"],
        ["label -1", "not a class"],
        None,
    ),
    (
        "3/monitor/label-99",
        MONITOR + ["--stream", "{stream_99.npz}", "--out", "OUT:m.json"],
        ["label 99", "not a class"],
        None,
    ),
    # ---- 4. the calibration used on its own images
    (
        "4/calibrate/test-split",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{test.h5}", "--out", "OUT:c.json"],
        ["test split", "cal split"],
        None,
    ),
    ("4/certify/split-cal", CERTIFY + ["--split", "cal", "--out", "OUT:h.tsv"], ["calibration images"], None),
    (
        "4/certify/test-calibration-on-test",
        [
            "certify",
            "--fallback",
            "none",
            *TINY,
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{cal_on_test.json}",
            "--split",
            "test",
            "--out",
            "OUT:h.tsv",
        ],
        ["calibration images"],
        None,
    ),
    (
        "4/certify/surrogate-training-images",
        CERTIFY + ["--split", "train", "--out", "OUT:h.tsv"],
        ["the surrogate was trained on"],
        None,
    ),
    (
        "4/report/check-on-calibration-counts",
        REPORT
        + [
            "--calibration",
            "{calibration.json}",
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:r.html",
        ],
        ["calibration's own counts file"],
        None,
    ),
    (
        "4/report/check-on-other-calibration-split-file",
        REPORT
        + [
            "--calibration",
            "{calibration.json}",
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal_small.h5}",
            "--out",
            "OUT:r.html",
        ],
        ["calibration images"],
        None,
    ),
    # ---- 5. forged checkpoints and counts, unkeyed and keyed
    (
        "5/datagen/surrogate-kind-edited-to-base",
        DATAGEN + ["--model", "{relabelled_base.pt}", "--out", "OUT:c.h5"],
        ["kind is 'base'", "surrogate's fields"],
        None,
    ),
    (
        "5/datagen/kind-edited-checksum-stale",
        DATAGEN + ["--model", "{relabelled_base_raw.pt}", "--out", "OUT:c.h5"],
        ["modified after it was written", "checksum"],
        None,
    ),
    (
        "5/calibrate/split-relabelled-indices-deleted",
        CALIBRATE + ["--surrogate", "{split_relabelled.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["contradicts itself", "no training indices"],
        None,
    ),
    (
        "5/calibrate/keyed-consistent-relabel",
        CALIBRATE + ["--surrogate", "{split_relabelled_a.pt}", "--counts", "{cal_a.h5}", "--out", "OUT:c.json"],
        ["signature does not verify", "altered"],
        KEY,
    ),
    (
        "5/calibrate/keyed-unsigned-surrogate",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{cal_a.h5}", "--out", "OUT:c.json"],
        ["not signed"],
        KEY,
    ),
    (
        "5/calibrate/keyed-unsigned-counts",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate_cal_a.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--key-file",
            "{key_a}",
        ],
        ["counts file", "not signed"],
        None,
    ),
    (
        "5/calibrate/keyed-edited-counts",
        CALIBRATE + ["--surrogate", "{surrogate_cal_a.pt}", "--counts", "{cal_a_edited.h5}", "--out", "OUT:c.json"],
        ["signature does not verify", "altered"],
        KEY,
    ),
    (
        "5/train/keyed-counts-of-another-key",
        TRAIN + ["--counts", "{cal_b.h5}", "--out", "OUT:s.pt"],
        ["another key"],
        KEY,
    ),
    (
        "5/certify/keyed-surrogate-of-another-key",
        [
            "certify",
            "--fallback",
            "none",
            *TINY,
            "--surrogate",
            "{surrogate_b.pt}",
            "--calibration",
            "{calibration.json}",
            "--out",
            "OUT:h.tsv",
            "--key-file",
            "{key_a}",
        ],
        ["another key"],
        None,
    ),
    (
        "5/sequential/keyed-class-from-unsigned-surrogate",
        SEQUENTIAL[:-1]
        + ["--no-progress", "--model", "{base.pt}", "--class-from", "{surrogate.pt}", "--out", "OUT:s.tsv"],
        ["not signed"],
        KEY,
    ),
    # ---- 6. former tracebacks
    (
        "6/train/batch-size-0",
        TRAIN + ["--counts", "{train.h5}", "--batch-size", "0", "--out", "OUT:s.pt"],
        ["batch_size must be an integer >= 1"],
        None,
    ),
    (
        "6/train/lr-negative",
        TRAIN + ["--counts", "{train.h5}", "--lr", "-0.001", "--out", "OUT:s.pt"],
        ["lr must be a finite number > 0"],
        None,
    ),
    (
        "6/train/lr-nan",
        TRAIN + ["--counts", "{train.h5}", "--lr", "nan", "--out", "OUT:s.pt"],
        ["lr must be a finite number > 0"],
        None,
    ),
    (
        "6/datagen/seed-2**70",
        DATAGEN + ["--model", "{base.pt}", "--seed", str(2**70), "--out", "OUT:c.h5"],
        ["--seed", "2**63 - 1"],
        None,
    ),
    (
        "6/datagen/num-classes-array",
        DATAGEN + ["--dataset", "npz:{classes_array.npz}", "--model", "{base.pt}", "--out", "OUT:c.h5"],
        ["num_classes must be one integer"],
        None,
    ),
    (
        "6/datagen/npy-as-dataset",
        DATAGEN + ["--dataset", "npz:{plain.npy}", "--model", "{base.pt}", "--out", "OUT:c.h5"],
        [".npy array", "not an .npz"],
        None,
    ),
    ("6/monitor/npy-as-stream", MONITOR + ["--stream", "{plain.npy}", "--out", "OUT:m.json"], [".npy array"], None),
    # ---- 7. arguments refused before the first byte is written
    (
        "7/datagen/top-up-max-below-n",
        DATAGEN + ["--model", "{base.pt}", "--top-up", "10", "--top-up-max", "5", "--out", "OUT:c.h5"],
        ["--top-up-max 5 is below"],
        None,
    ),
    (
        "7/calibrate/report-counts-truncated",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--report",
            "OUT:c.html",
            "--report-counts",
            "{truncated.h5}",
        ],
        ["truncated.h5"],
        None,
    ),
    (
        "7/calibrate/report-counts-wrong-file",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--report",
            "OUT:c.html",
            "--report-counts",
            "{text.txt}",
        ],
        ["text file"],
        None,
    ),
    (
        "7/calibrate/report-counts-incomplete",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--report",
            "OUT:c.html",
            "--report-counts",
            "{incomplete.h5}",
        ],
        ["incomplete"],
        None,
    ),
    (
        "7/calibrate/report-counts-are-the-calibration",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--report",
            "OUT:c.html",
            "--report-counts",
            "{cal.h5}",
        ],
        ["calibration's own counts file"],
        None,
    ),
    (
        "7/calibrate/report-counts-without-report",
        CALIBRATE
        + [
            "--surrogate",
            "{surrogate.pt}",
            "--counts",
            "{cal.h5}",
            "--out",
            "OUT:c.json",
            "--report-counts",
            "{test.h5}",
        ],
        ["add --report"],
        None,
    ),
    # ---- 8. what the operating system said
    (
        "8/datagen/model-symlink-loop",
        DATAGEN + ["--model", "{loop_a}", "--out", "OUT:c.h5"],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/datagen/model-dangling-link",
        DATAGEN + ["--model", "{dangling.pt}", "--out", "OUT:c.h5"],
        ["symbolic link to", "which does not exist"],
        None,
    ),
    (
        "8/train/counts-symlink-loop",
        TRAIN + ["--counts", "{loop_a}", "--out", "OUT:s.pt"],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/certify/calibration-symlink-loop",
        [
            "certify",
            "--fallback",
            "none",
            *TINY,
            "--surrogate",
            "{surrogate.pt}",
            "--calibration",
            "{loop_a}",
            "--out",
            "OUT:h.tsv",
        ],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/calibrate/surrogate-symlink-loop",
        CALIBRATE + ["--surrogate", "{loop_a}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/cohen/dataset-symlink-loop",
        COHEN + ["--model", "{base.pt}", "--dataset", "npz:{loop_a}", "--out", "OUT:c.tsv"],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/monitor/stream-symlink-loop",
        MONITOR + ["--stream", "{loop_a}", "--out", "OUT:m.json"],
        ["Too many levels of symbolic links"],
        None,
    ),
    (
        "8/report/results-symlink-loop",
        ["report", "--results", "{loop_a}", "--out", "OUT:r.html"],
        ["Too many levels of symbolic links"],
        None,
    ),
]


@pytest.mark.parametrize("case_id, argv, needles, env", CASES, ids=[c[0] for c in CASES])
def test_untrusted_input_is_one_line_exit_2_and_writes_nothing(work, capsys, monkeypatch, case_id, argv, needles, env):
    _run_refused(work, capsys, monkeypatch, argv, needles, env, case_id)


PERMISSION_DENIED = [
    ("datagen --model", DATAGEN + ["--model", "{base.pt}", "--out", "OUT:c.h5"], "base.pt"),
    ("train --counts", TRAIN + ["--counts", "{train.h5}", "--out", "OUT:s.pt"], "train.h5"),
    (
        "calibrate --surrogate",
        CALIBRATE + ["--surrogate", "{surrogate.pt}", "--counts", "{cal.h5}", "--out", "OUT:c.json"],
        "surrogate.pt",
    ),
    ("certify --calibration", CERTIFY + ["--out", "OUT:h.tsv"], "calibration.json"),
    (
        "cohen --dataset npz:",
        COHEN + ["--model", "{base.pt}", "--dataset", "npz:{stream_99.npz}", "--out", "OUT:c.tsv"],
        "stream_99.npz",
    ),
    ("monitor --stream", MONITOR + ["--stream", "{stream.npz}", "--out", "OUT:m.json"], "stream.npz"),
    ("report --results", ["report", "--results", "{results.tsv}", "--out", "OUT:r.html"], "results.tsv"),
]


@pytest.mark.parametrize("case_id, argv, name", PERMISSION_DENIED, ids=[c[0] for c in PERMISSION_DENIED])
def test_permission_denied_is_said_as_the_os_says_it(work, capsys, monkeypatch, case_id, argv, name):
    """The file is refused by the operating system (``open`` raises EACCES, as for mode 000 as another user)."""
    real_open = builtins.open
    target = os.path.realpath(work[name])

    def denying_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(os.fspath(file)) == target:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    _run_refused(work, capsys, monkeypatch, argv, ["Permission denied", name], case_id=case_id)


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens files of mode 000; the patched test above covers it")
def test_mode_000_file_is_refused_with_the_os_message(work, capsys, monkeypatch, tmp_path):
    locked = tmp_path / "locked.pt"
    shutil.copy(work["base.pt"], locked)
    locked.chmod(0)
    argv = DATAGEN + ["--model", str(locked), "--out", "OUT:c.h5"]
    _run_refused(work, capsys, monkeypatch, argv, ["Permission denied"], case_id="mode-000")


def test_the_tables_cover_every_point_of_the_issue():
    points = {c[0].split("/")[0] for c in CASES}
    assert points == {"2", "3", "4", "5", "6", "7", "8"}
    assert len(MALICIOUS) >= 7 and len(MODEL_COMMANDS) == 8
    assert sum(1 for c in CASES if c[0].startswith("6/")) >= 7  # the seven former tracebacks


# --------------------------------------------------------------------------- keyed: the good path still works
def test_with_a_key_the_whole_pipeline_signs_and_verifies(work, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_KEY, KEY_A)
    out = tmp_path
    base = work["base.pt"]
    for argv in (
        [
            "datagen",
            "--split",
            "train",
            "--sigma",
            "0.25",
            "--n",
            "20",
            "--limit",
            "30",
            "--device",
            "cpu",
            "--no-progress",
            "--model",
            base,
            "--out",
            str(out / "train.h5"),
        ],
        [
            "datagen",
            "--split",
            "cal",
            "--sigma",
            "0.25",
            "--n",
            "50",
            "--limit",
            "40",
            "--device",
            "cpu",
            "--no-progress",
            "--model",
            base,
            "--out",
            str(out / "cal.h5"),
        ],
        ["train", "--counts", str(out / "train.h5"), "--epochs", "1", "--no-progress", "--out", str(out / "s.pt")],
        [
            "calibrate",
            "--surrogate",
            str(out / "s.pt"),
            "--counts",
            str(out / "cal.h5"),
            "--epsilon",
            "0.05",
            "--device",
            "cpu",
            "--out",
            str(out / "c.json"),
        ],
        CERTIFY[: CERTIFY.index("--surrogate")]
        + ["--surrogate", str(out / "s.pt"), "--calibration", str(out / "c.json"), "--out", str(out / "h.tsv")],
    ):
        assert main(argv) == 0, capsys.readouterr().err
    assert read_counts(out / "cal.h5").attrs["signature_key_id"]
    assert torch.load(out / "s.pt", weights_only=True)["signature_hmac_sha256"]
    # The same files without the key still load (nothing is verified), and with another key they are refused.
    monkeypatch.setenv(ENV_KEY, KEY_B)
    with pytest.raises(CheckpointSignatureError, match="another key"):
        Surrogate.load(out / "s.pt")
    with pytest.raises(CountsSignatureError, match="another key"):
        train_surrogate(str(out / "train.h5"), str(out / "s2.pt"), epochs=1, device="cpu", progress=False)
    monkeypatch.delenv(ENV_KEY)
    assert Surrogate.load(out / "s.pt").num_classes == 10
    assert issubclass(CountsSignatureError, ArtifactSignatureError) and issubclass(CheckpointSignatureError, ModelError)


# --------------------------------------------------------------------------- the engine's own checks
class _NaNUnderNoise(nn.Module):
    """Finite on clean images in [0, 1], NaN as soon as a pixel leaves it (every noisy copy)."""

    def forward(self, x):
        logits = x.flatten(1)[:, :10].clone()
        return torch.where((x.flatten(1) < 0).any(1, keepdim=True), torch.full_like(logits, float("nan")), logits)


def test_the_counting_engine_refuses_nonfinite_logits_and_rows_that_do_not_sum_to_n():
    x = torch.rand(3, 1, 8, 8)
    smooth = SmoothedClassifier(_NaNUnderNoise(), 10, 0.25, device="cpu", batch_size=64)
    with pytest.raises(ModelError, match="NaN or infinite logits on"):
        smooth.counts(x, 100)
    with pytest.raises(ModelError, match="NaN or infinite logits on"):
        smooth.sample_predictions(x, 50)
    # The row-sum check, on the device: a table whose rows do not sum to n is never returned.
    good = SmoothedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, 0.25, device="cpu")
    counts = good.counts(x, 300)
    assert counts.sum(axis=1).tolist() == [300, 300, 300] and counts.dtype == np.int64
    table = torch.as_tensor(counts)
    table[1, 0] += 1
    with pytest.raises(ModelError, match="do not sum to the samples"):
        good._checked_result(table, np.array([300, 300, 300]), torch.zeros((), dtype=torch.int64))


def test_absurd_settings_are_typed_errors_in_python(work):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    for sigma in (1e308, float("nan"), 0.0, 1e-9, 1e4):
        with pytest.raises(InvalidParameterError, match="sigma must lie in"):
            SmoothedClassifier(model, 10, sigma, device="cpu")
    with pytest.raises(InvalidParameterError, match="seed"):
        SmoothedClassifier(model, 10, 0.25, device="cpu", seed=2**70)
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_model(work["nan.pt"], device="cpu")
    with pytest.raises(ModelError, match="probe batch"):
        load_model(work["overflow.pt"], device="cpu")


def test_the_allowlists_keep_legitimate_programs(tmp_path):
    """What ``sympy.srepr`` prints for shape arithmetic passes; attribute access, calls of other names, strings
    that are not symbol names, subscripts and lambdas do not; a program with symbolic reshapes loads."""
    import sympy
    from torch.utils._sympy.functions import CeilDiv, FloorDiv, Mod

    from surrogate_cert.core.pt2 import _expression_ok

    s0 = sympy.Symbol("s0", positive=True, integer=True)
    for expr in (
        2 * s0,
        s0 + 1,
        sympy.Max(1, s0),
        FloorDiv(s0, 2),
        Mod(s0, 3),
        sympy.Rational(1, 2) * s0,
        sympy.Float(0.5) * s0,
        CeilDiv(s0, 4),
        sympy.Eq(s0, 3),
        sympy.Le(s0, 4096),
        -s0,
    ):
        assert _expression_ok(sympy.srepr(expr)), sympy.srepr(expr)
    for text in (
        "__import__('os')",
        "Symbol('s0').__class__",
        "exec('1')",
        "Symbol('a b')",
        "[s0][0]",
        "(lambda: 0)()",
        'Symbol("s0")',
        "preview(s0)",
        "Integer(1" + "0" * 60 + ")",
    ):
        assert not _expression_ok(text), text

    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1).reshape(-1, 32)).reshape(x.shape[0], 2, 10).mean(1)

    program = torch.export.export(
        Reshaping().eval(), (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, str(tmp_path / "reshaping.pt2"))
    loaded = load_model(str(tmp_path / "reshaping.pt2"), device="cpu", num_classes=10, input_shape=(1, 8, 8))
    assert loaded.model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
