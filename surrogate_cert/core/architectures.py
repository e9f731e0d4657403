"""Network architectures shared by base models and surrogates, built from (input shape, classes).

A checkpoint stores ``arch`` (a name here) and ``input_shape`` / ``num_classes``, never pickled code,
so every model file loads with ``torch.load(..., weights_only=True)``. Besides the built-in
architectures, a checkpoint may carry its network itself (``PROGRAM_ARCHITECTURES``): the serialized
``torch.export`` program or TorchScript module of a user's base model, as bytes, so a surrogate
started from any base model keeps that model's layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .errors import CheckpointSignatureError, ModelError, OutputExistsError
from .files import atomic_output, describe, sniff, unreadable, wrong_kind
from .pt2 import load_exported_program
from .signing import KEY_ID_FIELD, SIGNATURE_FIELD, check_signature, key_id, resolve_key, sign


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and an MLP head; any C x H x W input, any class count.

    Sized so a forward pass dominates the noise generation of the counting engine on small images.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if min(h, w) >= 8 else nn.Identity(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 4)) if min(h, w) >= 4 else nn.Identity(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512, 256)) -> nn.Sequential:
    """Flatten, then fully connected ReLU layers ``hidden`` and a linear head (784-512-256-10 on MNIST).

    A plain ``nn.Sequential`` (parameter names ``1.weight``, ``1.bias``, ``3.weight``, ...), the
    layout most users write, so such a model's weights load into it directly; on a CPU it is the
    cheapest base model for MNIST-sized inputs.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _resnet18(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stem for small (CIFAR-sized) images."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


ARCHITECTURES = {
    "small_cnn": SmallCNN,
    "mlp": mlp,
    "resnet18": _resnet18,
}

PROGRAM_ARCHITECTURES = ("torch-export", "torchscript")
"""Architectures a checkpoint carries itself (its ``network`` entry: the serialized program as a uint8
tensor; ``state_dict`` holds the weights that replace the program's own). ``torch-export``: a
``torch.export`` program (a user's ``.pt2``, or a factory model exported when training starts);
``torchscript``: a TorchScript module."""


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module. Its train / eval behaviour was fixed when it was exported
    (exported modules refuse ``.eval()``), so ``train()`` / ``eval()`` only set the flag here. Its
    parameters are ordinary ones: gradients flow through the program, so it can be trained."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program = program_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = bool(mode)
        return self


def load_program(arch: str, data: bytes, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a network of ``PROGRAM_ARCHITECTURES`` from its serialized bytes.

    Parameters
    ----------
    arch : {"torch-export", "torchscript"}
        What the bytes are.
    data : bytes
        A ``torch.export.save`` archive or a ``torch.jit.save`` file.
    device : str or torch.device, optional
        Where to put it (a program's constants are moved too); default the CPU.

    Returns
    -------
    torch.nn.Module
        The network, with the weights it was serialized with.

    Raises
    ------
    ModelError
        If ``arch`` is not a program architecture or the bytes do not load.
    """
    device = torch.device("cpu" if device is None else device)
    try:
        if arch == "torch-export":
            # Never torch.export.load: it unpickles parts of the archive and evaluates strings of it (pt2.py).
            program, _ = load_exported_program("the torch.export network of the checkpoint", data)
            if device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            return ExportedModel(program.module()).to(device)
        if arch == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript is deprecated, still supported
                return torch.jit.load(io.BytesIO(data), map_location=device)
    except ModelError:
        raise  # the archive reader's own refusal says what was wrong
    except Exception as exc:  # torch.export / TorchScript raise many types for malformed archives
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot rebuild the {arch} network stored in the checkpoint ({first}); the file is damaged"
        ) from None
    raise ModelError(f"{arch!r} is not a program architecture ({', '.join(PROGRAM_ARCHITECTURES)})")


def export_program(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """``model`` as a ``torch.export`` archive with a dynamic batch dimension (bytes).

    Used for a factory base model, whose code is not data: the surrogate keeps the exported graph.

    Parameters
    ----------
    model : torch.nn.Module
        The network (exported in eval mode, on the CPU).
    input_shape : sequence of int
        ``(C, H, W)`` of one image.

    Returns
    -------
    bytes
        What ``torch.export.save`` writes.

    Raises
    ------
    ModelError
        If ``torch.export`` cannot capture the model.
    """
    model = model.to("cpu").eval()
    example = torch.rand(2, *(int(v) for v in input_shape))
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    except Exception as exc:  # torch.export raises many types for code it cannot capture
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot export the base model with torch.export ({type(exc).__name__}: {first}); export it "
            "yourself to a .pt2 file, or give --arch to map its weights onto a built-in "
            "architecture"
        ) from None
    return buffer.getvalue()


def default_arch(input_shape: Sequence[int]) -> str:
    """``small_cnn`` for small inputs (up to 28 x 28 pixels: digits, MNIST), ``resnet18`` above."""
    return "small_cnn" if max(input_shape[1:]) <= 28 else "resnet18"


def build(arch: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate architecture ``arch`` for ``input_shape`` (C, H, W) and ``num_classes`` outputs."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if len(input_shape) != 3:
        raise ModelError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return ARCHITECTURES[arch](tuple(int(v) for v in input_shape), int(num_classes))


# --------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "surrogate-cert-model"
CHECKPOINT_VERSION = 1
CHECKPOINT_KINDS = ("base", "surrogate")


def save_checkpoint(
    path,
    model: nn.Module,
    *,
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    kind: str,
    meta: dict,
    overwrite: bool = True,
    key: bytes | str | None = None,
    network: bytes | None = None,
) -> None:
    """Write ``model``'s weights and how to rebuild it (``arch``, shapes) to ``path``, atomically.

    For an ``arch`` of ``PROGRAM_ARCHITECTURES``, ``network`` is the serialized program (its bytes are
    stored as a uint8 tensor, so the file still loads with ``weights_only=True``).

    The file holds only tensors and plain values, so ``load_checkpoint`` reads it with
    ``torch.load(..., weights_only=True)``. ``meta`` (plain values: numbers, strings, lists, dicts)
    records how the model was made (e.g. ``sigma``, ``dataset``, metrics). Written to a temporary
    file and renamed into place (``core.files.atomic_output``): an interrupted save leaves no half
    file; with ``overwrite=False`` an existing ``path`` is kept and ``OutputExistsError`` raised.

    Every checkpoint carries ``checksum_sha256`` (unkeyed: an edit that does not recompute it is
    refused at load) and, when a signing key is configured (``key``, else the environment:
    ``core.signing.resolve_key``), ``signature_hmac_sha256`` and ``signature_key_id`` over the same
    content (``checkpoint_message``: every field and every tensor).
    """
    if kind not in CHECKPOINT_KINDS:
        raise ModelError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    if arch not in ARCHITECTURES and arch not in PROGRAM_ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if (arch in PROGRAM_ARCHITECTURES) != (network is not None):
        raise ModelError(
            f"architecture {arch!r} "
            + ("needs its serialized network" if network is None else "is built in: it takes no serialized network")
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "kind": kind,
        "arch": arch,
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        "meta": dict(meta),
    }
    if network is not None:
        payload["network"] = torch.frombuffer(bytearray(network), dtype=torch.uint8)
    secret = resolve_key(key)
    payload[KEY_ID_FIELD] = key_id(secret) if secret is not None else None
    message = checkpoint_message(payload)
    payload[CHECKSUM_FIELD] = hashlib.sha256(message).hexdigest()
    if secret is not None:
        payload[SIGNATURE_FIELD] = sign(message, secret)
    path = os.fspath(path)
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            torch.save(payload, tmp)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise ModelError(f"cannot write {path} ({exc.strerror or exc}); choose a writable --out") from None


def read_checkpoint_header(payload) -> dict:
    """Validate a loaded checkpoint dict; return it without ``state_dict`` (ModelError if malformed).

    Checks the format and version, that every field is present and of its type: ``kind`` one of
    ``CHECKPOINT_KINDS``, ``arch`` a known architecture, ``input_shape`` three positive integers,
    ``num_classes`` an integer >= 2, ``state_dict`` a dict of tensors, ``meta`` a dict whose
    ``sigma`` (when present) is a finite number > 0.
    """
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            "not a surrogate-cert model checkpoint (no format='surrogate-cert-model'); "
            "give a file written by `surrogate-cert train-base` / `train`, or a TorchScript file"
        )
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise ModelError(
            f"checkpoint format version {payload.get('format_version')} is not supported "
            f"(this package reads {CHECKPOINT_VERSION}); retrain it with this version"
        )
    missing = [k for k in ("kind", "arch", "input_shape", "num_classes", "state_dict", "meta") if k not in payload]
    if missing:
        raise ModelError(f"checkpoint lacks {missing}; the file is damaged, retrain it")
    problems = []
    if not (isinstance(payload["kind"], str) and payload["kind"] in CHECKPOINT_KINDS):
        problems.append(f"kind {payload['kind']!r} is not one of {CHECKPOINT_KINDS}")
    if not (
        isinstance(payload["arch"], str)
        and (payload["arch"] in ARCHITECTURES or payload["arch"] in PROGRAM_ARCHITECTURES)
    ):
        problems.append(f"architecture {payload['arch']!r} is unknown")
    elif payload["arch"] in PROGRAM_ARCHITECTURES:
        network = payload.get("network")
        if not (
            isinstance(network, torch.Tensor)
            and network.dtype == torch.uint8
            and network.ndim == 1
            and network.numel() > 0
        ):
            problems.append(f"architecture {payload['arch']} lacks its serialized network (a uint8 tensor)")
    shape = payload["input_shape"]
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        problems.append(f"input_shape {shape!r} is not three positive integers (C, H, W)")
    k = payload["num_classes"]
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
        problems.append(f"num_classes {k!r} is not an integer >= 2")
    state = payload["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
        problems.append("state_dict is not a dict of tensors")
    meta = payload["meta"]
    if not isinstance(meta, dict):
        problems.append("meta is not a dict")
    else:
        if meta.get("sigma") is not None and not _positive_number(meta["sigma"]):
            problems.append(f"sigma {meta['sigma']!r} is not a finite number > 0")
        surrogate_fields = sorted(SURROGATE_ONLY_META & set(meta))
        if payload["kind"] == "base" and surrogate_fields:
            problems.append(
                f"kind is 'base' but meta holds a surrogate's fields {surrogate_fields} (the kind was "
                "edited: a surrogate is never a base model)"
            )
    if problems:
        raise ModelError("checkpoint is inconsistent: " + "; ".join(problems) + "; the file is damaged, retrain it")
    return {k: v for k, v in payload.items() if k not in ("state_dict", "network")}


SURROGATE_ONLY_META = frozenset(
    {
        "kappa",
        "w",
        "fingerprint",
        "train_index_ranges",
        "counts_sha256",
        "counts_files",
        "prior_tuning",
        "base_model_sha256",
    }
)
"""Metadata only ``Surrogate.save`` writes: a checkpoint of kind ``base`` that holds any was relabelled."""

CHECKSUM_FIELD = "checksum_sha256"
"""The unkeyed SHA-256 of ``checkpoint_message``: detects an edit that did not recompute it (not a forger)."""


def checkpoint_message(payload: dict) -> bytes:
    """The canonical content a checkpoint's checksum and signature cover: every field and every tensor.

    Every field but ``state_dict``, ``network``, the checksum and the signature, as sorted compact JSON,
    then each tensor (the weights, and a carried program's bytes) by sorted name: name, dtype, shape and
    raw bytes; hashed into one SHA-256 (so a large model
    is never held twice in memory).

    Parameters
    ----------
    payload : dict
        A checkpoint as ``torch.load`` returns it (or as ``save_checkpoint`` builds it).

    Returns
    -------
    bytes
        ``b"surrogate-cert checkpoint\\0"`` and the hex digest.
    """
    header = {k: v for k, v in payload.items() if k not in ("state_dict", "network", CHECKSUM_FIELD, SIGNATURE_FIELD)}
    digest = hashlib.sha256(
        json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=True, default=repr).encode("utf-8")
    )
    state = payload.get("state_dict") if isinstance(payload.get("state_dict"), dict) else {}
    if "network" in payload:  # a carried program is covered byte for byte, like the weights
        state = {**state, "\0network": payload["network"]}
    for name in sorted(state, key=str):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"\0{name}\0{tensor!r}".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"surrogate-cert checkpoint\0" + digest.hexdigest().encode()


def check_checkpoint_integrity(payload: dict, path: str, key: bytes | None) -> None:
    """Refuse a checkpoint edited after it was written: its checksum, then (with ``key``) its signature.

    Parameters
    ----------
    payload : dict
        The loaded checkpoint.
    path : str
        Its file, for the messages.
    key : bytes or None
        The configured signing key. With one, a surrogate checkpoint must be signed under it; a base
        checkpoint (base models come from anywhere: TorchScript, torch.export, factories) is checked
        only if it is signed.

    Raises
    ------
    ModelError
        If the stored checksum does not match the content.
    CheckpointSignatureError
        If a key is configured and the checkpoint is an unsigned surrogate, or its signature does not verify.
    """
    try:
        message = checkpoint_message(payload)
    except (TypeError, ValueError, RuntimeError) as exc:  # fields of types save_checkpoint never writes
        raise ModelError(
            f"{path}: checkpoint fields cannot be read ({type(exc).__name__}); the file is damaged, retrain it"
        ) from None
    stored = payload.get(CHECKSUM_FIELD)
    if stored is not None and stored != hashlib.sha256(message).hexdigest():
        raise ModelError(
            f"{path} was modified after it was written (checksum mismatch); restore the original or retrain it"
        )
    if key is None:
        return
    kind = payload.get("kind")
    make = "`surrogate-cert train`" if kind == "surrogate" else "`surrogate-cert train-base`"
    check_signature(
        message,
        payload.get(SIGNATURE_FIELD),
        payload.get(KEY_ID_FIELD),
        key,
        what=path,
        fix=f"use the right key (--key-file), or re-run {make} with it",
        error=CheckpointSignatureError,
        required=kind != "base",
    )


def check_finite_weights(state: dict, path: str) -> None:
    """Refuse (``ModelError``) weights holding NaN or infinity: no certificate may come out of them."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(
                f"{path}: weight {name} holds NaN or infinite values; the model is broken (training "
                "diverged?), retrain it"
            )


def check_finite_outputs(model: nn.Module, input_shape: Sequence[int], what: str, device=None) -> None:
    """One forward pass on a fixed probe batch in [0, 1]; ``ModelError`` unless every logit is finite.

    The probe is four images (all 0, all 1, all 0.5 and a seeded uniform one): a model whose answers
    are NaN or infinite there would make argmax pick class 0 and certify it, so it is refused at load.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode.
    input_shape : sequence of int
        ``(C, H, W)`` of its inputs.
    what : str
        The model, for the message.
    device : str or torch.device, optional
        Where the model is (default: its first parameter's device, else the CPU).

    Raises
    ------
    ModelError
        If a logit of the probe batch is NaN or infinite (a model failing on the probe is left to the
        callers' shape checks).
    """
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = tuple(int(v) for v in input_shape)
    probe = torch.stack(
        [torch.zeros(shape), torch.ones(shape), torch.full(shape, 0.5), torch.rand(shape, generator=gen)]
    )
    try:
        with torch.inference_mode():
            logits = model(probe.to(device))
    except Exception:  # noqa: BLE001 - a model that cannot run on the probe fails the callers' own fit check
        return
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and not bool(torch.isfinite(logits).all()):
        raise ModelError(
            f"{what} returns NaN or infinite logits on a probe batch of images in [0, 1]; a certificate "
            "computed from it would be meaningless (argmax of NaN); fix or retrain the model"
        )


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


CHECKPOINT_FILE_KINDS = ("torch-zip", "pickle")
"""What ``sniff`` calls a file ``torch.load`` can read: a zip ``torch.save`` file, or the legacy pickle one."""


def load_weights_file(path: str | os.PathLike, expected: str = "model"):
    """``torch.load(path, weights_only=True)`` of a file that ``sniff`` recognises as a ``torch.save`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    expected : str, optional
        What the caller wanted (a key of ``core.files.MAKERS``), for the message.

    Returns
    -------
    object
        What the file holds (tensors and plain values only: no pickled code runs).

    Raises
    ------
    ModelError
        If the file is missing, of another kind (text, JSON, HDF5, NumPy, ...), or cannot be loaded.
    """
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "missing":
        raise ModelError(f"model file {path} does not exist; train one with `surrogate-cert train-base --out {path}`")
    if kind == "unreadable":
        raise ModelError(unreadable(path, expected))
    if kind not in CHECKPOINT_FILE_KINDS:
        raise ModelError(wrong_kind(path, kind, expected))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, KeyError, EOFError, ...) on bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load {path} ({describe(kind)}) as a weights-only checkpoint ({first[:160]}); "
            "the file is damaged or not a surrogate-cert model"
        ) from None


def load_checkpoint(
    path, device=None, *, kind: str | None = None, key: bytes | str | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by ``save_checkpoint``: ``(model in eval mode, header)``.

    The header is the saved dict without ``state_dict`` (``kind``, ``arch``, ``input_shape``,
    ``num_classes``, ``meta``, ...; for a program architecture also ``network``, its bytes). Loaded
    with ``weights_only=True``: no pickled code runs. A file of another kind (text, JSON, HDF5, NumPy)
    is refused by name, before ``torch.load`` sees it.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.
    device : str or torch.device, optional
        Where to put the model.
    kind : {"base", "surrogate"}, optional
        Refuse a checkpoint of the other kind (``ModelError`` naming the command that makes the
        right one).
    key : bytes or str, optional
        The signing key (default: the environment's, ``core.signing.resolve_key``); with one, a
        surrogate checkpoint must be signed under it and a signed base checkpoint must verify
        (``check_checkpoint_integrity``).

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    header : dict
        The checkpoint without its weights.

    Raises
    ------
    ModelError
        If the file is missing, not a checkpoint, inconsistent, edited after it was written (checksum), of
        the other ``kind``, its weights do not fit its architecture or are not finite, or its logits on
        a probe batch are not finite.
    CheckpointSignatureError
        If a key is configured and the checkpoint is an unsigned surrogate or its signature does not verify.
    """
    path = os.fspath(path)
    secret = resolve_key(key)
    payload = load_weights_file(path, "surrogate" if kind == "surrogate" else "model")
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint_integrity(payload, path, secret)  # first: an edited file says so, whatever the edit
    try:
        header = read_checkpoint_header(payload)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if kind is not None and header["kind"] != kind:
        raise ModelError(_wrong_checkpoint_kind(path, header["kind"], kind))
    if header["arch"] in PROGRAM_ARCHITECTURES:
        header["network"] = payload["network"].numpy().tobytes()
        model = load_program(header["arch"], header["network"], device)
    else:
        model = build(header["arch"], header["input_shape"], header["num_classes"])
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise ModelError(
            f"{path}: weights do not fit architecture {header['arch']} "
            f"({str(exc).splitlines()[0][:160]}); the file is damaged"
        ) from None
    check_finite_weights(payload["state_dict"], path)
    model.eval()
    if device is not None:
        model.to(device)
    check_finite_outputs(model, header["input_shape"], path)
    return model, header


def _wrong_checkpoint_kind(path: str, have: str, want: str) -> str:
    if want == "surrogate":
        return (
            f"{path} is a {have} model, not a surrogate; train one with "
            "`surrogate-cert train --counts train.h5 --out surrogate.pt`"
        )
    return (
        f"{path} is a surrogate checkpoint (made by `surrogate-cert train`), not a base model: the surrogate "
        "predicts the base model's counts and is never a base model itself; give the checkpoint from "
        "`surrogate-cert train-base` (or your own model)"
    )
