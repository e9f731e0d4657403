"""Argument groups and conversions shared by sub-commands (dataset, model, device, output)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .errors import InvalidParameterError


def example(text: str) -> str:
    """An epilog for a sub-command's --help."""
    return f"example:\n  {text}"


def add_parser(sub, name: str, help: str, example_cmd: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog=example(example_cmd),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_dataset_args(p: argparse.ArgumentParser, split_default: str | None = "test") -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (default, embedded), mnist, cifar10, cifar100, imagefolder:PATH, npz:PATH")
    p.add_argument("--split", default=split_default, choices=("train", "cal", "test"), required=split_default is None)
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets (no download unless --download)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download the dataset into --data-root")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="noise seed; noise of image i depends only on (seed, i)")


def check_output_path(path: str) -> str:
    """Refuse an output whose folder does not exist or is not writable, before any work is done."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise InvalidParameterError(f"output folder {folder} does not exist; create it first or choose another --out")
    if not os.access(folder, os.W_OK):
        raise InvalidParameterError(f"output folder {folder} is not writable; choose another --out")
    return path


def command_line() -> str:
    """The command that is running, for provenance headers."""
    return "surrogate-cert " + " ".join(shlex.quote(a) for a in sys.argv[1:])
