"""``surrogate-cert quickstart`` and ``surrogate-cert bench``: thin layers over pipeline.py and bench.py."""

from __future__ import annotations

import argparse
import dataclasses

from ..core.errors import InvalidParameterError
from .choices import BENCH_QUICK_TEST_LIMIT, BENCH_TEST_LIMIT, QUICKSTART_QUICK_TEST_LIMIT, QUICKSTART_TEST_LIMIT
from .common import (
    add_device_arg,
    add_noise_scheme_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    check_new_outputs,
    command_line,
)


def _limit(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of images (0 = all), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all images), got {value}")
    return value or None


def register(sub) -> None:
    p = add_parser(
        sub,
        "quickstart",
        "the whole pipeline on the embedded digits data, in the measured best flow: base model, counts (the "
        "surrogate split, cal, test), surrogate started from the base model, calibration, hybrid and Cohen-10k "
        "certification, report (re-runnable: finished stages are reused)",
        "surrogate-cert quickstart --out surrogate-cert-quickstart",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for every output (default: surrogate-cert-quickstart, or ...-quick with --quick); "
        "a folder that holds files is refused unless --resume or --overwrite",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the pipeline in an existing --out folder: finished stages are reused, an "
        "interrupted counts file resumes from its last committed row",
    )
    add_overwrite_arg(p, resumable=True)
    p.add_argument(
        "--quick", action="store_true", help="reduced sizes (under a minute on 2 CPU cores; the CI end-to-end check)"
    )
    p.add_argument(
        "--test-limit",
        type=_limit,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"test images to certify (default {QUICKSTART_TEST_LIMIT}, {QUICKSTART_QUICK_TEST_LIMIT} with "
        "--quick; "
        "0 = all 397)",
    )
    add_device_arg(p)
    add_noise_scheme_arg(p, "default float; sound writes to ...-sound folders by default")
    add_progress_arg(p)
    p.set_defaults(func=run_quickstart)

    p = add_parser(
        sub,
        "bench",
        "every certifier side by side on the same images and base model (Cohen-10k, Cohen-1k, sequential KT, "
        "sequential surrogate prior, surrogate only, hybrid, and the deterministic IBP and CROWN), plus "
        "wrong-certificate rates on the exact linear problem; JSON out",
        "surrogate-cert bench --quick --out bench.json",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only: seconds, Cohen n scaled down
    p.add_argument("--out", default="bench.json", help="JSON file to write (default bench.json); refused if it exists")
    add_overwrite_arg(p)
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="folder of the offline stage (default: the quickstart's folder, whose work is reused)",
    )
    p.add_argument(
        "--test-limit",
        type=_limit,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"test images to certify (default {BENCH_TEST_LIMIT}, {BENCH_QUICK_TEST_LIMIT} with --quick; 0 = all 397)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="R",
        help="best-radius tolerance of the sequential certifiers, l2 units (default: the certifier's)",
    )
    add_device_arg(p, default=None)
    add_noise_scheme_arg(p, "default float; with sound the offline stage is the sound quickstart's")
    add_progress_arg(p)
    p.set_defaults(func=run_bench_command)


def run_quickstart(args: argparse.Namespace) -> int:
    from ..core.smoothing import noise_family
    from ..workflows.pipeline import FULL, QUICK, quickstart

    config = dataclasses.replace(QUICK if args.quick else FULL, device=args.device)
    if hasattr(args, "test_limit"):
        config = dataclasses.replace(config, test_limit=args.test_limit)
    if args.noise_scheme:
        config = dataclasses.replace(config, noise_scheme=args.noise_scheme)
    sound = bool(args.noise_scheme) and noise_family(args.noise_scheme) == "grid"
    out = args.out or ("surrogate-cert-quickstart-quick" if args.quick else "surrogate-cert-quickstart") + (
        "-sound" if sound else ""
    )
    if args.resume and args.overwrite:
        raise InvalidParameterError("--resume reuses finished stages and --overwrite redoes them: give one of them")
    quickstart(
        out,
        config,
        progress=not args.no_progress,
        command=command_line(args),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    from ..workflows.bench import BENCH_FULL, BENCH_QUICK, BENCH_TINY, run_bench

    check_new_outputs(args, args.out)
    config = BENCH_TINY if args.tiny else BENCH_QUICK if args.quick else BENCH_FULL
    if args.noise_scheme:
        offline = dataclasses.replace(config.offline, noise_scheme=args.noise_scheme)
        config = dataclasses.replace(config, offline=offline)
    if hasattr(args, "test_limit"):
        config = dataclasses.replace(config, test_limit=args.test_limit)
    if args.tolerance is not None:
        if not args.tolerance >= 0:
            raise InvalidParameterError(f"--tolerance must be a radius >= 0 (l2 units), got {args.tolerance}")
        config = dataclasses.replace(config, tolerance=args.tolerance)
    run_bench(
        args.out,
        config,
        workdir=args.workdir,
        device=args.device,
        progress=not args.no_progress,
        command=command_line(args),
        overwrite=args.overwrite,
    )
    return 0
