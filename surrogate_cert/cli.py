"""``surrogate-cert``: one console script, a thin layer over the Python API.

Each sub-command lives in the module that owns its feature and registers itself here. Any
``SurrogateCertError`` (bad input, bad file) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, purpose) in the order a user meets them; each module defines register(subparsers).
COMMAND_MODULES = (
    "surrogate_cert.cli_pipeline",   # quickstart, bench
    "data_gen.cli",                  # train-base, datagen
    "surrogate_cert.cli_surrogate",  # train, certify
    "calibration.cli",               # calibrate
    "calibration.cli_report",        # report
    "surrogate_cert.cli_baselines",  # cohen, sequential
)


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
    from . import __version__

    parser.add_argument("--version", action="version", version=f"surrogate-cert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import SurrogateCertError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except SurrogateCertError as exc:
        print(f"surrogate-cert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"surrogate-cert {args.command}: interrupted; committed work is kept (re-run with --resume where offered)",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
