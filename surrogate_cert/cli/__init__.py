"""``surrogate-cert``: one console script, a thin layer over the Python API.

One module per command group, each with ``register(subparsers)``; the options they share are
defined once in ``common``, the choices they offer in ``choices`` (torch-free copies). Each command
imports what it needs when it runs, so the parser alone loads no torch, SciPy, MAPIE or matplotlib.
Any ``SurrogateCertError`` (bad input, bad file) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core import __version__
from ..core.errors import InvalidParameterError, SurrogateCertError
from . import baselines, data, monitor, pipeline, report, surrogate

COMMAND_GROUPS = (
    pipeline,  # quickstart, bench
    data,  # train-base, datagen
    surrogate,  # train, calibrate, certify
    monitor,  # monitor
    report,  # report
    baselines,  # cohen, sequential
)
"""In the order a user meets them."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="surrogate-cert",
        description="Certified robustness by randomized smoothing: Cohen baseline, anytime-valid "
        "sequential certifier, and a conformally calibrated one-pass surrogate.",
    )
    parser.add_argument("--version", action="version", version=f"surrogate-cert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, code 2), --help or --version: a code, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = argv  # provenance records the command as given
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Imported once a command runs: building the parser loads no torch, SciPy, MAPIE or matplotlib
    # (`--help` and argument errors answer at once; benchmarks/cli_startup.py measures it).
    from data_gen.distributed import launch, torchrun_world_size

    try:
        if torchrun_world_size() > 1 and not getattr(args, "torchrun", False):
            if os.environ.get("RANK") != "0":
                return 2  # rank 0 says why
            raise InvalidParameterError(
                f"{args.command} runs as one process: start it without torchrun (torchrun "
                "shares the work of datagen, cohen, sequential and certify)"
            )
        # Under torchrun: one shard of the work per process (data_gen.distributed); else the whole job.
        with launch(getattr(args, "device", None)) as shard:
            args.shard = shard
            result = args.func(args)
    except SurrogateCertError as exc:
        if not getattr(exc, "silent", False):  # another process's error, which rank 0 reports
            print(f"surrogate-cert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"surrogate-cert {args.command}: interrupted; committed work is kept (re-run with --resume where offered)",
            file=sys.stderr,
        )
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
