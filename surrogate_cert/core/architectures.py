"""Network architectures shared by base models and surrogates, built from (input shape, classes).

A checkpoint stores ``arch`` (a name here) and ``input_shape`` / ``num_classes``, never pickled code,
so every model file loads with ``torch.load(..., weights_only=True)``. Besides the built-in
architectures, a checkpoint may carry its network itself (``PROGRAM_ARCHITECTURES``): the serialized
``torch.export`` program or TorchScript module of a user's base model, as bytes, so a surrogate
started from any base model keeps that model's layout.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ModelError, OutputExistsError
from .files import atomic_output, describe, sniff, wrong_kind


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and an MLP head; any C x H x W input, any class count.

    Sized so a forward pass dominates the noise generation of the counting engine on small images.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if min(h, w) >= 8 else nn.Identity(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
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
            program = torch.export.load(io.BytesIO(data))
            if device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            return ExportedModel(program.module()).to(device)
        if arch == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript is deprecated, still supported
                return torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch.export / TorchScript raise many types for malformed archives
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot rebuild the {arch} network stored in the checkpoint ({first}); the file is "
                         "damaged") from None
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
        raise ModelError(f"cannot export the base model with torch.export ({type(exc).__name__}: {first}); export it "
                         "yourself to a .pt2 file, or give --arch to map its weights onto a built-in "
                         "architecture") from None
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
    """
    if kind not in CHECKPOINT_KINDS:
        raise ModelError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    if arch not in ARCHITECTURES and arch not in PROGRAM_ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if (arch in PROGRAM_ARCHITECTURES) != (network is not None):
        raise ModelError(f"architecture {arch!r} " + ("needs its serialized network" if network is None
                                                      else "is built in: it takes no serialized network"))
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
        raise ModelError("not a surrogate-cert model checkpoint (no format='surrogate-cert-model'); "
                         "give a file written by `surrogate-cert train-base` / `train`, or a TorchScript file")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise ModelError(f"checkpoint format version {payload.get('format_version')} is not supported "
                         f"(this package reads {CHECKPOINT_VERSION}); retrain it with this version")
    missing = [k for k in ("kind", "arch", "input_shape", "num_classes", "state_dict", "meta") if k not in payload]
    if missing:
        raise ModelError(f"checkpoint lacks {missing}; the file is damaged, retrain it")
    problems = []
    if not (isinstance(payload["kind"], str) and payload["kind"] in CHECKPOINT_KINDS):
        problems.append(f"kind {payload['kind']!r} is not one of {CHECKPOINT_KINDS}")
    if not (isinstance(payload["arch"], str) and (payload["arch"] in ARCHITECTURES
                                                  or payload["arch"] in PROGRAM_ARCHITECTURES)):
        problems.append(f"architecture {payload['arch']!r} is unknown")
    elif payload["arch"] in PROGRAM_ARCHITECTURES:
        network = payload.get("network")
        if not (isinstance(network, torch.Tensor) and network.dtype == torch.uint8 and network.ndim == 1
                and network.numel() > 0):
            problems.append(f"architecture {payload['arch']} lacks its serialized network (a uint8 tensor)")
    shape = payload["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
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
    elif meta.get("sigma") is not None and not _positive_number(meta["sigma"]):
        problems.append(f"sigma {meta['sigma']!r} is not a finite number > 0")
    if problems:
        raise ModelError("checkpoint is inconsistent: " + "; ".join(problems) + "; the file is damaged, retrain it")
    return {k: v for k, v in payload.items() if k not in ("state_dict", "network")}


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
    if kind not in CHECKPOINT_FILE_KINDS:
        raise ModelError(wrong_kind(path, kind, expected))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, KeyError, EOFError, ...) on bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {path} ({describe(kind)}) as a weights-only checkpoint ({first[:160]}); "
                         "the file is damaged or not a surrogate-cert model") from None


def load_checkpoint(path, device=None, *, kind: str | None = None) -> tuple[nn.Module, dict]:
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

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    header : dict
        The checkpoint without its weights.

    Raises
    ------
    ModelError
        If the file is missing, not a checkpoint, inconsistent, of the other ``kind``, or its weights do
        not fit its architecture.
    """
    path = os.fspath(path)
    payload = load_weights_file(path, "surrogate" if kind == "surrogate" else "model")
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
        raise ModelError(f"{path}: weights do not fit architecture {header['arch']} "
                         f"({str(exc).splitlines()[0][:160]}); the file is damaged") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, header


def _wrong_checkpoint_kind(path: str, have: str, want: str) -> str:
    if want == "surrogate":
        return (f"{path} is a {have} model, not a surrogate; train one with "
                "`surrogate-cert train --counts train.h5 --out surrogate.pt`")
    return (f"{path} is a surrogate checkpoint (made by `surrogate-cert train`), not a base model: the surrogate "
            "predicts the base model's counts and is never a base model itself; give the checkpoint from "
            "`surrogate-cert train-base` (or your own model)")
