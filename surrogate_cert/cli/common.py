"""Options and helpers shared by the sub-commands, defined once: dataset, model, device, output
(``--out`` checks and ``--overwrite``), signing key (``--key-file``), progress; running a certifier over
a split and writing its results with their provenance."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from ..core import __version__
from ..core.errors import SurrogateCertError, check_radius, check_seed
from ..core.files import check_outputs
from ..core.signing import ENV_KEY, ENV_KEY_FILE, resolve_key
from .choices import ALL_SPLITS, DATASET_HELP, NOISE_ALIASES, NOISE_SCHEME, NOISE_SCHEME_SOUND, NOISE_SCHEMES

if TYPE_CHECKING:
    from data_gen.distributed import Shard

MODEL_HELP = (
    "base model: a checkpoint from train-base (base.pt), a TorchScript file, a torch.export "
    "program (.pt2), or package.module:factory=weights.pt (weights loaded with weights_only=True)"
)
SUMMARY_RADII = (0.0, 0.25, 0.5, 0.75)
"""Radii of the one-line summary a certifying command prints."""


def add_parser(sub, name: str, help: str, example_cmd: str) -> argparse.ArgumentParser:
    """A sub-command whose --help shows its purpose and one example."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example_cmd}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_dataset_args(p: argparse.ArgumentParser, split_default: str | None = "test") -> None:
    p.add_argument("--dataset", default="digits", help=f"{DATASET_HELP} (default digits, embedded)")
    p.add_argument(
        "--split",
        default=split_default,
        choices=ALL_SPLITS,
        required=split_default is None,
        help="train, surrogate, cal, test; pool for an unlabeled source (npz without y, images:FOLDER)",
    )
    add_data_root_args(p)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")


def add_data_root_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root", default=None, help="folder holding torchvision datasets (no download unless --download)"
    )
    p.add_argument("--download", action="store_true", help="allow torchvision to download the dataset into --data-root")


def add_model_arg(p: argparse.ArgumentParser, required: bool = True, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=required, default=None, help=help)


def add_device_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")


def batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a positive integer, or ``auto`` (the largest that fits on the device)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'auto', got {text!r}") from None


def _checked_type(convert, check):
    """An argparse type: ``convert`` the text, then a core checker; its message becomes argparse's one line."""

    def parse(text: str):
        try:
            return check(convert(text))
        except (ValueError, OverflowError) as exc:  # InvalidParameterError is a ValueError
            raise argparse.ArgumentTypeError(
                str(exc) if isinstance(exc, SurrogateCertError) else f"expected a number, got {text!r}"
            ) from None

    return parse


seed_arg = _checked_type(int, check_seed)
"""``--seed``: a whole number in [0, 2**63 - 1] (refused by argparse, before any work)."""

radius_arg = _checked_type(float, lambda v: check_radius(v, "target_radius"))
"""``--target-radius``: a finite radius >= 0 in input l2 units (``nan`` and ``inf`` refused)."""


def add_device_args(p: argparse.ArgumentParser) -> None:
    """Device, noisy samples per forward pass, and the noise seed."""
    add_device_arg(p)
    p.add_argument(
        "--batch-size",
        type=batch_size_arg,
        default=1000,
        help="noisy samples per forward pass, or auto: the largest that fits on the device, found once "
        "and recorded (default 1000)",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="noise seed; noise of image i depends only on (seed, i)")


def add_samples_arg(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--samples`` (alias ``--n``).

    Not ``--n`` first: torchrun's own parser mistakes ``--n`` for its ``--nnodes`` / ``--nproc-per-node``.
    """
    p.add_argument("--samples", "--n", dest="n", type=int, default=default, metavar="N", help=help)


def add_engine_args(p: argparse.ArgumentParser, amp: bool = True) -> None:
    """How the counting engine runs the base model and draws noise: mixed precision, memory layout,
    compilation, noise scheme."""
    if amp:
        p.add_argument(
            "--amp",
            choices=("bf16",),
            default=None,
            help="bfloat16 autocast (GPUs; CPUs with bf16 support): checked against float32 first",
        )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory for convolutional models (default: on with CUDA, off on the CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the base model (pays off on long GPU jobs)")
    add_noise_scheme_arg(p)


NOISE_SCHEME_HELP = (
    f"the noise: {NOISE_SCHEME} (default: float Gaussian, as in the literature), sound "
    f"(= {NOISE_SCHEME_SOUND}: the Gaussian rounded to the 1/255 grid, drawn from exact integer "
    "thresholds: certificates hold for the law actually sampled; images off the grid are rounded "
    f"to it), or {NOISE_SCHEMES[0]} (reproduces version 0.1)"
)


RESUME_HELP = "datagen --resume continues the scheme of its file"


def add_noise_scheme_arg(p: argparse.ArgumentParser, default_help: str = "") -> None:
    """``--noise-scheme``: a scheme of ``NOISE_SCHEMES`` or an alias (``sound``), resolved by ``noise_scheme_arg``."""
    p.add_argument(
        "--noise-scheme",
        type=noise_scheme_arg,
        default=None,
        metavar="SCHEME",
        help=f"{NOISE_SCHEME_HELP}; {default_help or RESUME_HELP}",
    )


def noise_scheme_arg(text: str) -> str:
    """``--noise-scheme``: the scheme's full name (``check_noise_scheme`` resolves aliases)."""
    scheme = NOISE_ALIASES.get(text.strip(), text.strip())
    if scheme not in NOISE_SCHEMES:  # the message of core.smoothing.check_noise_scheme, without importing torch
        raise argparse.ArgumentTypeError(
            f"unknown noise scheme {scheme!r}; this version draws "
            f"{', '.join(NOISE_SCHEMES)} (aliases: {', '.join(NOISE_ALIASES)})"
        )
    return scheme


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_overwrite_arg(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    """``--overwrite``: the one switch that lets a command replace files it would otherwise refuse."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (default: refuse them"
        + (", or continue them with --resume)" if resumable else ")"),
    )


def add_key_arg(p: argparse.ArgumentParser, action: str, what: str = "the calibration") -> None:
    """``--key-file``: the HMAC-SHA256 key that signs (the writers) or must have signed (the readers) the
    artifacts a guarantee depends on: counts files, surrogate checkpoints, the calibration (docs/security.md)."""
    p.add_argument(
        "--key-file",
        default=None,
        metavar="FILE",
        help=f"file holding the secret key that {action} {what} (HMAC-SHA256); default: "
        f"${ENV_KEY_FILE} or ${ENV_KEY} if set, else no signature",
    )


def signing_key(args: argparse.Namespace) -> bytes | None:
    """The key of ``--key-file``, else of the environment, else None (``core.signing.resolve_key``)."""
    return resolve_key(key_file=getattr(args, "key_file", None))


def check_output_path(path: str) -> str:
    """Refuse an output whose folder does not exist or is not writable, before any work is done.

    Deprecated in favour of ``check_new_outputs`` (which also refuses existing files); kept for callers.
    """
    check_outputs([path], overwrite=True)
    return path


def check_new_outputs(args: argparse.Namespace, *paths, option: str = "--out", resumable: bool = False) -> list[str]:
    """Refuse, before any work, outputs that exist (unless ``--overwrite``) or cannot be written.

    ``paths`` are every file of one output (a TSV and its ``.meta.json``; a report's three files).
    """
    return check_outputs(paths, overwrite=bool(getattr(args, "overwrite", False)), option=option, resumable=resumable)


def results_paths(out: str) -> tuple[str, str]:
    """The two files of a results output: the TSV and its ``.meta.json``."""
    from ..core.certificate import meta_path

    return out, meta_path(out)


def command_line(args: argparse.Namespace) -> str:
    """The command that is running (as ``main`` received it), for provenance."""
    return "surrogate-cert " + " ".join(shlex.quote(a) for a in args.argv)


def provenance(args: argparse.Namespace, **fields) -> dict:
    """The ``.meta.json`` of a results file: the command line and versions, then ``fields``."""
    import numpy as np
    import scipy
    import torch

    return dict(
        command=command_line(args),
        package_version=__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        scipy=scipy.__version__,
        **fields,
    )


def noise_provenance(smooth, data) -> dict:
    """What a results sidecar records about the sound scheme: the radius slack of its certificates and how far
    the images were moved onto the 1/255 grid (the certificates are those of the rounded images); {} otherwise."""
    if smooth is None or not smooth.sound:
        return {}
    from ..core.smoothing import grid_shift

    return dict(
        noise_slack=smooth.radius_slack(data.input_shape),
        grid_shift_max=float(grid_shift(data.x).max()) if len(data) else 0.0,
        guarantee_scope="grid images within the radius of the image rounded to the 1/255 grid",
    )


def certify_split(data, certify, chunk: int, progress: bool, desc: str, shard: Shard | None = None) -> list | None:
    """``certify(x, indices)`` over a split in chunks of ``chunk`` images, with a progress bar.

    Under torchrun each process certifies its rows (``shard.positions``: ``rank, rank + W, ...``) and
    rank 0 receives every process's certificates and returns them all in the split's order (the
    others return None). Each input's noise is named by its dataset index, so the certificates are
    those of a one-process run. ``shard`` None: the whole job in this process.
    """
    import torch
    from tqdm.auto import tqdm

    from data_gen.distributed import SINGLE

    shard = SINGLE if shard is None else shard
    positions = shard.positions(len(data))
    x, indices = (
        (data.x[torch.as_tensor(positions)], data.indices[positions]) if shard.distributed else (data.x, data.indices)
    )
    certificates = []
    with tqdm(
        total=len(positions), desc=desc, unit="img", disable=not (progress and shard.is_main), file=sys.stderr
    ) as bar:
        for lo in range(0, len(positions), chunk):
            hi = min(lo + chunk, len(positions))
            certificates.extend(certify(x[lo:hi], indices[lo:hi]))
            bar.update(hi - lo)
    gathered = shard.gather((positions, certificates))
    if gathered is None:
        return None
    merged = [None] * len(data)
    for rows, part in gathered:
        for row, certificate in zip(rows.tolist(), part):
            merged[row] = certificate
    return merged


def write_results(out: str, data, certificates, meta: dict, overwrite: bool = False) -> int:
    """Write the results TSV (+ ``.meta.json``) and print a one-line summary; returns exit code 0."""
    import numpy as np

    from ..core.certificate import certified_accuracy, write_tsv

    write_tsv(out, data.indices, data.y.tolist(), certificates, meta=meta, overwrite=overwrite)
    rows = [dict(correct=int(c.prediction == y), radius=c.radius) for c, y in zip(certificates, data.y.tolist())]
    accuracy = certified_accuracy(rows, SUMMARY_RADII)
    samples = np.mean([c.n_samples for c in certificates]) if certificates else 0.0
    seconds = sum(c.seconds for c in certificates)
    summary = ", ".join(f"{a:.3f}@{r:g}" for a, r in zip(accuracy, SUMMARY_RADII))
    print(
        f"wrote {out}: {len(certificates)} images; certified accuracy {summary}; "
        f"mean samples {samples:.1f}; {seconds:.1f} s"
    )
    return 0
