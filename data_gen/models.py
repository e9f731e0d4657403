"""Base models: loading (built-in checkpoints, TorchScript, ``module:factory=weights``) and the
built-in training recipe (``train-base``: a small CNN with Gaussian-noise augmentation).

Model specs accepted by ``load_model`` (and ``--model``):

- ``base.pt``: a checkpoint written by ``surrogate-cert train-base`` (or ``train``), rebuilt from its
  architecture name and loaded with ``torch.load(..., weights_only=True)``;
- ``model.ts``: a TorchScript file (``torch.jit.save``); an optional extra file
  ``surrogate_cert.json`` (``_extra_files``) may declare ``num_classes``, ``input_shape`` and ``sigma``;
- ``model.pt2``: a ``torch.export`` program (``torch.export.save``), the format PyTorch recommends now
  that TorchScript is deprecated. Read by ``surrogate_cert.core.pt2.load_exported_program``, never by
  ``torch.export.load``, which unpickles parts of the archive: nothing in the file is run.
  Export it with a dynamic batch dimension (``dynamic_shapes=({0:
  torch.export.Dim("batch", min=1)},)``), since the engine evaluates batches of any size; a program
  with a static batch is refused. Its input shape and class count are read from the program, so the
  same shape checks apply as for a checkpoint; the same optional ``surrogate_cert.json``
  (``extra_files``) may declare ``sigma``;
- ``package.module:factory=weights.pt``: ``factory()`` (called without arguments) builds the
  ``nn.Module`` and ``weights.pt`` holds its state dict (plain, or a surrogate-cert checkpoint),
  loaded with ``weights_only=True``; ``path/to/file.py:factory=weights.pt`` works too, and
  ``=weights.pt`` may be left out when the factory sets the weights itself.

Every model takes pixels in [0, 1] (N x C x H x W) and returns N x K logits; any normalisation
belongs inside the model. The SHA-256 of the weights file (or of the weights themselves, for a
factory without a file) is recorded, so counts files name the exact model they came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from surrogate_cert.core import __version__
from surrogate_cert.core.architectures import (
    CHECKPOINT_FILE_KINDS,
    ExportedModel,
    build,
    check_checkpoint_integrity,
    check_finite_outputs,
    check_finite_weights,
    default_arch,
    load_checkpoint,
    load_weights_file,
    read_checkpoint_header,
    save_checkpoint,
)
from surrogate_cert.core.errors import (
    InvalidInputError,
    InvalidParameterError,
    ModelError,
    check_count,
    check_positive,
    check_seed,
    check_sigma,
)
from surrogate_cert.core.files import check_outputs, file_problem, sniff, wrong_kind
from surrogate_cert.core.hashing import sha256_bytes, sha256_file
from surrogate_cert.core.pt2 import load_exported_program
from surrogate_cert.core.signing import resolve_key
from surrogate_cert.core.smoothing import resolve_device

from .datasets import load_split

_FACTORY_MODULE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*|.+\.py")
"""The part before ':' of a factory spec: a dotted module name, or a path to a .py file."""

TORCHSCRIPT_META = "surrogate_cert.json"
"""Name of the optional ``_extra_files`` entry of a TorchScript model: JSON with num_classes, input_shape, sigma."""


@dataclass
class LoadedModel:
    """A base model ready to evaluate: ``model`` (eval mode, on the device) and what is known about it.

    ``num_classes`` / ``input_shape`` / ``sigma`` are ``None`` when the file does not record them
    (TorchScript without metadata, factories); the counting engine then checks the output width
    on the first forward pass.
    """

    model: nn.Module
    sha256: str
    num_classes: int | None
    input_shape: tuple[int, int, int] | None
    sigma: float | None
    source: str


# --------------------------------------------------------------------------- loading
def _state_dict_sha256(model: nn.Module) -> str:
    parts = []
    for name, tensor in model.state_dict().items():
        parts.append(name.encode())
        parts.append(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha256_bytes(b"\0".join(parts))


def _load_torchscript(path: str, device: torch.device) -> LoadedModel:
    extra = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript is deprecated, still supported
            model = torch.jit.load(path, map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"cannot load TorchScript file {path} ({str(exc).strip().splitlines()[0][:160]})") from None
    meta = _read_meta(extra, path)
    shape = meta.get("input_shape")
    return LoadedModel(
        model=model.eval(),
        sha256=sha256_file(path),
        num_classes=int(meta["num_classes"]) if meta.get("num_classes") is not None else None,
        input_shape=cast(tuple[int, int, int], tuple(int(v) for v in shape)) if shape else None,
        sigma=float(meta["sigma"]) if meta.get("sigma") is not None else None,
        source=os.path.abspath(path),
    )


def _export_signature(program, path: str) -> tuple[tuple[int, ...] | None, int | None]:
    """(input shape C x H x W, output classes) of an exported program; refuses one it cannot batch."""
    signature = program.graph_signature
    inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in signature.user_inputs]
    if len(inputs) != 1 or "val" not in inputs[0].meta:
        raise ModelError(
            f"torch.export program {path} takes {len(inputs)} inputs; export a model of one image batch (N x C x H x W)"
        )
    shape = tuple(inputs[0].meta["val"].shape)
    fix = "re-export it with dynamic_shapes=({0: torch.export.Dim('batch', min=1)},) (docs: bring your own model)"
    if len(shape) < 2:
        raise ModelError(
            f"torch.export program {path} takes inputs of shape {shape}; export it on a batch N x C x H x W"
        )
    if not isinstance(shape[0], torch.SymInt):
        raise ModelError(
            f"torch.export program {path} was exported with a static batch of {shape[0]}, but the engine "
            f"evaluates batches of any size; {fix}"
        )
    lowest = None
    for symbol, bounds in program.range_constraints.items():
        if str(symbol) == str(shape[0].node.expr):
            lowest = bounds.lower
    if lowest is not None and int(lowest) > 1:
        raise ModelError(f"torch.export program {path} accepts batches of at least {lowest} only; {fix}")
    rest = shape[1:]
    input_shape = tuple(int(v) for v in rest) if all(isinstance(v, int) for v in rest) else None
    num_classes = None
    for node in program.graph.nodes:
        if node.op == "output":
            outputs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            value = getattr(outputs[0], "meta", {}).get("val") if outputs else None
            if value is not None and value.ndim == 2 and isinstance(value.shape[1], int):
                num_classes = int(value.shape[1])
    return input_shape, num_classes


def _load_exported(path: str, device: torch.device) -> LoadedModel:
    # Never torch.export.load: it unpickles parts of the archive and evaluates strings of it (pt2.py).
    program, extra = load_exported_program(path)
    input_shape, num_classes = _export_signature(program, path)
    meta = _read_meta(extra, path)
    if (
        meta.get("input_shape") is not None
        and input_shape is not None
        and tuple(int(v) for v in meta["input_shape"]) != input_shape
    ):
        raise ModelError(
            f"{path}: {TORCHSCRIPT_META} declares input_shape {meta['input_shape']} but the program takes "
            f"{input_shape}; fix the extra file"
        )
    try:
        if device.type != "cpu":
            # Moves the constants the graph creates on a device too, which module().to() would miss.
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        model = ExportedModel(program.module()).to(device)
    except Exception as exc:  # noqa: BLE001 - as above
        raise ModelError(
            f"cannot prepare torch.export program {path} for {device} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})"
        ) from None
    declared = meta.get("num_classes")
    return LoadedModel(
        model=model.eval(),
        sha256=sha256_file(path),
        num_classes=num_classes if num_classes is not None else (int(declared) if declared is not None else None),
        input_shape=cast(
            "tuple[int, int, int] | None",
            input_shape
            if input_shape is not None
            else (tuple(int(v) for v in meta["input_shape"]) if meta.get("input_shape") else None),
        ),
        sigma=float(meta["sigma"]) if meta.get("sigma") is not None else None,
        source=os.path.abspath(path),
    )


def _read_meta(extra: dict, path: str) -> dict:
    """The ``surrogate_cert.json`` extra file of a TorchScript or torch.export model, or {}."""
    if not extra.get(TORCHSCRIPT_META):
        return {}
    try:
        meta = json.loads(extra[TORCHSCRIPT_META])
    except (ValueError, TypeError):
        raise ModelError(f"{path}: extra file {TORCHSCRIPT_META} is not valid JSON; fix or drop it") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: extra file {TORCHSCRIPT_META} must hold a JSON object; fix or drop it")
    return meta


def _import_factory(module_part: str, factory_name: str, spec: str):
    try:
        if module_part.endswith(".py"):
            module_part = os.path.expanduser(module_part)
            if not os.path.isfile(module_part):
                raise ModelError(f"model spec {spec!r}: no such file {module_part}")
            mod_spec = importlib.util.spec_from_file_location(
                f"_surrogate_cert_user_{abs(hash(os.path.abspath(module_part)))}", module_part
            )
            if mod_spec is None or mod_spec.loader is None:
                raise ModelError(f"model spec {spec!r}: {module_part} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_part)
            except ModuleNotFoundError:
                # Console scripts do not put the working folder on sys.path; `python -m` does.
                if os.getcwd() in sys.path:
                    raise
                sys.path.append(os.getcwd())
                module = importlib.import_module(module_part)
    except ModelError:
        raise
    except Exception as exc:  # user code: any failure to import is a bad --model
        raise ModelError(
            f"model spec {spec!r}: cannot import {module_part} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); check the module path"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelError(f"model spec {spec!r}: {module_part} has no callable {factory_name!r}")
    return factory


def _load_factory(spec: str, device: torch.device) -> LoadedModel:
    module_part, _, rest = spec.partition(":")
    factory_name, _, weights = rest.partition("=")
    if not module_part or not factory_name:
        raise ModelError(f"model spec {spec!r} must look like package.module:factory=weights.pt")
    factory = _import_factory(module_part, factory_name, spec)
    try:
        model = factory()
    except Exception as exc:  # user code
        raise ModelError(
            f"model spec {spec!r}: {factory_name}() failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model spec {spec!r}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    num_classes = input_shape = sigma = None
    if weights:
        weights = os.path.expanduser(weights)
        if not os.path.isfile(weights):
            raise ModelError(f"model spec {spec!r}: weights file {weights} does not exist")
        state = load_weights_file(weights, "a state dict saved with torch.save")
        if isinstance(state, dict) and state.get("format") is not None:
            check_checkpoint_integrity(state, weights, resolve_key(None))
            header = read_checkpoint_header(state)
            if header["kind"] != "base":
                raise ModelError(
                    f"model spec {spec!r}: {weights} is a {header['kind']} checkpoint, not a base model's "
                    "weights; give the base model's state dict"
                )
            num_classes, input_shape = header["num_classes"], tuple(header["input_shape"])
            sigma = header["meta"].get("sigma")
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ModelError(
                f"model spec {spec!r}: weights in {weights} do not fit {factory_name}() "
                f"({str(exc).strip().splitlines()[0][:160]})"
            ) from None
        digest = sha256_file(weights)
    else:
        digest = _state_dict_sha256(model)
    return LoadedModel(
        model=model.to(device).eval(),
        sha256=digest,
        num_classes=num_classes,
        input_shape=input_shape,
        sigma=sigma,
        source=spec,
    )


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def load_model(
    spec: str,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    input_shape=None,
    *,
    key: bytes | str | None = None,
) -> LoadedModel:
    """Load a base model from ``spec`` (see the module docstring) onto ``device`` (default: CUDA if present).

    If ``num_classes`` (or ``input_shape``) is given and the file records a different one, raises
    ModelError. A file is recognised by its content (``core.files.sniff``): text, JSON, HDF5 or
    NumPy files are refused by name, and so is a surrogate checkpoint (made by ``train``): the
    surrogate is never a base model. Never unpickles code: every ``torch.load`` uses
    ``weights_only=True``, and a ``torch.export`` archive is read by ``surrogate_cert.core.pt2`` (no pickle, no
    evaluated string). A model whose logits on a probe batch of images in [0, 1] are NaN or infinite is
    refused (``core.architectures.check_finite_outputs``).

    Parameters
    ----------
    spec : str
        A checkpoint, TorchScript or ``torch.export`` file, or ``module:factory[=weights.pt]``.
    device : str, torch.device or None, optional
        Where to load the model (``resolve_device``).
    num_classes : int, optional
        The class count the model must have, where the file records one.
    input_shape : sequence of int, optional
        The ``(C, H, W)`` of the images it will see, checked where the file records its input shape.
    key : bytes or str, optional
        Signing key for a built-in checkpoint (default: the environment's): a signed one must verify.

    Returns
    -------
    LoadedModel
        The model in eval mode on ``device``, its SHA-256 and what the file records about it.

    Raises
    ------
    ModelError
        If the spec names no file or factory, the file is not a model (or is a surrogate), the file or
        factory cannot be loaded (a ``.pt2`` that needs code to run included), the weights do not fit,
        the recorded class count or input shape differs from ``num_classes`` / ``input_shape``, or its
        logits on the probe batch are not finite.
    InvalidInputError
        If CUDA is requested but unavailable.
    """
    device = resolve_device(device)
    spec = str(spec)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        kind = sniff(path)
        if kind == "torchscript":
            loaded = _load_torchscript(path, device)
        elif kind == "torch-export":
            loaded = _load_exported(path, device)
        elif kind not in CHECKPOINT_FILE_KINDS:
            raise ModelError(wrong_kind(path, kind, "model"))
        else:
            model, header = load_checkpoint(path, device=device, kind="base", key=key)
            loaded = LoadedModel(
                model=model,
                sha256=sha256_file(path),
                num_classes=int(header["num_classes"]),
                input_shape=tuple(header["input_shape"]),
                sigma=header["meta"].get("sigma"),
                source=os.path.abspath(path),
            )
    elif os.path.lexists(path):  # a symbolic-link loop or a dangling link: say what the OS says
        raise ModelError(f"model file {spec} {file_problem(path)}; give a readable model file")
    elif ":" in spec and _FACTORY_MODULE.fullmatch(spec.partition(":")[0]):
        loaded = _load_factory(spec, device)
    else:
        raise ModelError(
            f"model file {spec} does not exist; give a checkpoint from `surrogate-cert train-base`, "
            "a TorchScript file, or package.module:factory=weights.pt"
        )
    if num_classes is not None and loaded.num_classes is not None and loaded.num_classes != int(num_classes):
        raise ModelError(
            f"model {spec} has {loaded.num_classes} output classes but the dataset has {num_classes}; "
            "use the model trained for this dataset"
        )
    if input_shape is not None and loaded.input_shape is not None and tuple(loaded.input_shape) != tuple(input_shape):
        raise ModelError(
            f"model {spec} expects inputs {tuple(loaded.input_shape)} but the images are "
            f"{tuple(input_shape)}; use the model trained for this dataset"
        )
    probe_shape = loaded.input_shape or (tuple(input_shape) if input_shape is not None else None)
    if probe_shape is not None and not (os.path.isfile(path) and kind in CHECKPOINT_FILE_KINDS):
        check_finite_outputs(loaded.model, probe_shape, f"model {spec}", device=device)  # checkpoints: at load
    return loaded


SIGMA_FLAG = "--allow-sigma-mismatch"
"""The command-line switch that accepts a noise level other than the one a model declares."""


def declared_sigma(spec: str) -> float | None:
    """The noise level a model file declares it was trained at, read from its metadata only, or None.

    A ``train-base`` checkpoint's ``meta``, a ``.pt2`` / TorchScript file's ``surrogate_cert.json`` extra
    file (read from the archive: nothing is built or run), a factory's weights file when it is a
    surrogate-cert checkpoint. A file that cannot be read says nothing here: the command's own loader
    reports it.

    Parameters
    ----------
    spec : str
        A model spec (``load_model``).

    Returns
    -------
    float or None
        The declared sigma (l2, input units), or None when nothing is declared.
    """
    spec = str(spec)
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        weights = spec.partition(":")[2].partition("=")[2]
        path = os.path.expanduser(weights)
        if not weights or not os.path.isfile(path):
            return None
    try:
        kind = sniff(path)
        if kind in ("torchscript", "torch-export"):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("extra/" + TORCHSCRIPT_META)]
                meta = _read_meta({TORCHSCRIPT_META: archive.read(names[0]).decode()}, path) if names else {}
        elif kind in CHECKPOINT_FILE_KINDS:
            payload = load_weights_file(path)
            is_checkpoint = isinstance(payload, dict) and payload.get("format") is not None
            meta = read_checkpoint_header(payload)["meta"] if is_checkpoint else {}
        else:
            return None
    except (ModelError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    sigma = meta.get("sigma")
    return float(sigma) if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) else None


def check_sigma_agrees(declared: float | None, sigma: float, spec: str, allow: bool = False) -> None:
    """Refuse a noise level other than the one the model declares it was trained at, unless ``allow``.

    A model trained with noise at one sigma and smoothed at another gives valid but much smaller
    radii (or none): almost always a slip of the command line, so the commands refuse it before any
    work (the Python API leaves the choice to its caller).

    Parameters
    ----------
    declared : float or None
        The sigma the model declares (``declared_sigma``, or ``LoadedModel.sigma``); None: nothing to check.
    sigma : float
        The noise level asked for (l2, input units).
    spec : str
        The model spec, for the message.
    allow : bool, optional
        Accept the difference (the command line's ``--allow-sigma-mismatch``).

    Raises
    ------
    InvalidParameterError
        If the model declares another sigma and ``allow`` is false.
    """
    check_sigma(sigma)  # an absurd noise level is refused as such, whatever the model declares
    if allow or declared is None or math.isclose(float(declared), float(sigma), rel_tol=1e-9):
        return
    raise InvalidParameterError(
        f"model {spec} declares sigma {float(declared):g} (the noise it was trained at) "
        f"but --sigma is {float(sigma):g}; use --sigma {float(declared):g}, or add "
        f"{SIGMA_FLAG} to smooth it at another noise level anyway"
    )


def check_model_fits(smooth, x: torch.Tensor, spec: str) -> None:
    """Forward passes before any work or file: catch wrong input shapes, output widths and non-finite logits.

    The images are evaluated clean and with one draw of noise at the classifier's sigma (a private
    generator); every logit must be finite.

    Parameters
    ----------
    smooth : SmoothedClassifier
        The model wrapped with its class count (its first pass checks the output width).
    x : torch.Tensor
        One or a few images of the dataset.
    spec : str
        The model spec, for the message.

    Raises
    ------
    ModelError
        If the model fails on these images, its output is not ``N x num_classes``, or a logit is NaN or infinite.
    """
    try:
        with torch.inference_mode():
            x = x.to(smooth.device)
            smooth.predict_labels(x)
            gen = torch.Generator(device="cpu").manual_seed(0)
            noisy = x + smooth.sigma * torch.randn(x.shape, generator=gen).to(smooth.device)
            logits = smooth.model(torch.cat([x, noisy]))
    except ModelError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelError(
            f"model {spec} fails on inputs of shape {tuple(x.shape)} "
            f"({str(exc).strip().splitlines()[0][:160]}); use the model trained for this dataset"
        ) from None
    if not bool(torch.isfinite(logits).all()):
        raise ModelError(
            f"model {spec} returns NaN or infinite logits on the dataset's images (clean or with noise at "
            f"sigma={smooth.sigma:g}); a certificate computed from them would be meaningless; fix or "
            "retrain the model"
        )


# --------------------------------------------------------------------------- training
def _default_epochs(num_train: int) -> int:
    # Small datasets need many passes; the noise makes every pass a fresh augmentation.
    return 25 if num_train <= 5_000 else 15


def noisy_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 2048,
) -> float:
    """Mean accuracy of ``argmax model(x + eps)``, ``eps ~ N(0, sigma^2 I)``, over ``draws`` noise draws.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier, in eval mode; inputs are moved to the device of its first parameter (the
        CPU for a model without parameters).
    x : torch.Tensor
        ``N x C x H x W`` images on the CPU, pixels in [0, 1] (``N >= 1``).
    y : torch.Tensor
        ``N`` true labels on the CPU.
    sigma : float
        Noise level (l2, input units); 0 for clean accuracy.
    draws : int, optional
        Noise draws per image.
    seed : int, optional
        Seed of the noise (a private CPU generator; the global RNG is not touched).
    batch_size : int, optional
        Images per forward pass.

    Returns
    -------
    float
        The share of correct predictions over all ``draws * N`` noisy images.

    Raises
    ------
    InvalidInputError
        If ``x`` holds no image or ``y`` not one label per image.
    """
    if len(x) == 0 or len(y) != len(x):
        raise InvalidInputError(
            f"noisy_accuracy needs at least one image and one label per image, got {len(x)} images and {len(y)} labels"
        )
    device = next(iter(model.parameters()), torch.empty(0)).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    correct = 0
    with torch.inference_mode():
        for _ in range(draws):
            for lo in range(0, len(x), batch_size):
                xb = x[lo : lo + batch_size]
                noisy = xb + sigma * torch.randn(xb.shape, generator=gen) if sigma > 0 else xb
                pred = model(noisy.to(device)).argmax(1).cpu()
                correct += int((pred == y[lo : lo + batch_size]).sum())
    return correct / (draws * len(x))


def _training_images(dataset: str, splits: Sequence[str], data_root, download: bool):
    """The images ``train_base`` fits: the union of ``splits`` (never ``cal`` or ``test``)."""
    splits = tuple(splits)
    if not splits or any(s not in ("train", "surrogate") for s in splits) or len(set(splits)) != len(splits):
        raise InvalidParameterError(
            f"train-base trains on the train and/or surrogate split, got {list(splits)}; "
            "cal and test must stay unseen (the guarantee and the evaluation live there)"
        )
    parts = [load_split(dataset, s, data_root=data_root, download=download) for s in splits]
    if len(parts) == 1:
        return parts[0]
    return replace(
        parts[0],
        split="+".join(splits),
        x=torch.cat([p.x for p in parts]),
        y=torch.cat([cast(torch.Tensor, p.y) for p in parts]),  # the train and surrogate splits are labeled
        indices=np.concatenate([p.indices for p in parts]),
    )


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def train_base(
    dataset: str = "digits",
    sigma: float = 0.25,
    out: str = "base.pt",
    epochs: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    arch: str | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    download: bool = False,
    overwrite: bool = True,
    key: bytes | str | None = None,
    splits: Sequence[str] = ("train",),
) -> dict:
    """Train the built-in base model on ``dataset``'s ``train`` split (or ``splits``) and save it to ``out``.

    Gaussian-noise augmentation at ``sigma`` (fresh noise every step); the checkpoint is written
    with ``save_checkpoint``, kind ``base``. Deterministic for a given ``seed`` on one device; the
    caller's global RNG state is preserved.

    Parameters
    ----------
    dataset : str, optional
        Dataset spec (``load_split``); default ``digits``.
    sigma : float, optional
        Noise level of the augmentation (l2, input units), > 0.
    out : str, optional
        Checkpoint file to write.
    epochs : int, optional
        Epochs (>= 1); default 25 for at most 5000 training images, else 15.
    seed : int, optional
        Seed of the initialisation, the batch order and the noise.
    data_root : str, optional
        Folder of the torchvision datasets.
    device : str, torch.device or None, optional
        Where to train (``resolve_device``).
    progress : bool, optional
        Show a progress bar.
    arch : str, optional
        Architecture name; default ``default_arch`` of the input shape.
    batch_size : int, optional
        Images per step.
    lr : float, optional
        Peak learning rate of the one-cycle AdamW schedule.
    download : bool, optional
        Download a missing torchvision dataset.
    overwrite : bool, optional
        Replace an existing ``out`` (default); if false, an existing ``out`` is refused before training
        (``OutputExistsError``) and kept.
    key : bytes or str, optional
        Signing key (default: the environment's, ``core.signing.resolve_key``; none: unsigned).
    splits : sequence of str, optional
        The splits trained on (default ``("train",)``). ``("train", "surrogate")`` trains on every
        training image, as a user's own model usually is: then no training image is unseen, and a
        surrogate needs an unlabeled pool (``pool:`` datasets) for unseen images. ``cal`` and ``test``
        are refused (the guarantee and the evaluation are measured there).

    Returns
    -------
    dict
        Metrics, also stored in the checkpoint: ``train_splits``, ``noisy_test_accuracy`` (accuracy on noisy ``test``
        inputs at ``sigma``, mean over 8 draws), ``clean_test_accuracy``, ``epochs``, ``seconds``,
        ``dataset``, ``sigma``, ``arch``, ``seed``, ``train_size``; plus ``sha256`` and ``out`` (the
        absolute path written).

    Raises
    ------
    InvalidParameterError
        If ``sigma`` (``core.errors.check_sigma``), ``epochs``, ``seed``, ``batch_size`` or ``lr`` is out of range.
    DatasetError
        If the dataset cannot be loaded.
    ModelError
        If ``arch`` is unknown or ``out`` cannot be written.
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    InvalidInputError
        If CUDA is requested but unavailable.
    """
    sigma = check_sigma(sigma)
    seed = check_seed(seed)
    batch_size = check_count("batch_size", batch_size)
    lr = check_positive("lr", lr)
    key = resolve_key(key)
    if not overwrite:
        check_outputs([out], overwrite=False)
    device = resolve_device(device)
    train = _training_images(dataset, splits, data_root, download)
    test = load_split(dataset, "test", data_root=data_root, download=download)
    test_y = cast(torch.Tensor, test.y)  # a named dataset's test split is labeled
    epochs = _default_epochs(len(train)) if epochs is None else check_count("epochs", epochs)
    arch = arch or default_arch(train.input_shape)
    started = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build(arch, train.input_shape, train.num_classes).to(device)
    _fit_under_noise(
        model, train, sigma, epochs=epochs, batch_size=batch_size, lr=lr, gen=gen, device=device, progress=progress
    )
    model.eval()
    check_finite_weights(model.state_dict(), f"the base model trained for {out}")
    metrics = {
        "dataset": dataset,
        "sigma": sigma,
        "arch": arch,
        "epochs": epochs,
        "seed": int(seed),
        "train_splits": list(splits),
        "train_size": len(train),
        "noisy_test_accuracy": noisy_accuracy(model, test.x, test_y, sigma, seed=int(seed) + 1),
        "clean_test_accuracy": noisy_accuracy(model, test.x, test_y, 0.0, draws=1),
        "seconds": time.perf_counter() - started,
    }
    save_checkpoint(
        out,
        model,
        arch=arch,
        input_shape=train.input_shape,
        num_classes=train.num_classes,
        kind="base",
        meta={**metrics, "package_version": __version__},
        overwrite=overwrite,
        key=key,
    )
    metrics.update(out=os.path.abspath(out), sha256=sha256_file(out))
    return metrics


def _fit_under_noise(model, train, sigma: float, *, epochs, batch_size, lr, gen, device, progress) -> None:
    """Train ``model`` on ``train`` with Gaussian noise of ``sigma`` added to every image (AdamW, one-cycle
    learning rate); ``gen`` draws the batch order and the noise."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(range(epochs), desc="train-base", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for lo in range(0, len(train), batch_size):
            rows = order[lo : lo + batch_size]
            xb = train.x[rows]
            xb = xb + sigma * torch.randn(xb.shape, generator=gen)
            loss = loss_fn(model(xb.to(device)), train.y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
        bar.set_postfix(loss=f"{total / len(train):.3f}")


__all__ = [
    "LoadedModel",
    "ExportedModel",
    "load_model",
    "check_model_fits",
    "check_sigma_agrees",
    "declared_sigma",
    "SIGMA_FLAG",
    "train_base",
    "noisy_accuracy",
    "TORCHSCRIPT_META",
]
