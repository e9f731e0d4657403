"""``surrogate-cert report``: the comparison report from results TSVs (a thin layer over workflows.report)."""

from __future__ import annotations

import argparse

from ..core.errors import InvalidParameterError
from .common import add_key_arg, add_overwrite_arg, add_parser, check_new_outputs, signing_key


def register(sub) -> None:
    p = add_parser(
        sub,
        "report",
        "HTML report (plus .md and .json beside it) comparing certifier runs: certified accuracy, cost, "
        "calibration, amortisation, environment",
        "surrogate-cert report --results cohen.tsv hybrid.tsv --calibration calibration.json "
        "--counts test.h5 --surrogate surrogate.pt --offline-counts train.h5 cal.h5 --out report.html",
    )
    p.add_argument(
        "--results",
        nargs="+",
        required=True,
        metavar="TSV",
        help="results TSVs written by cohen / sequential / certify (one curve each)",
    )
    p.add_argument("--calibration", default=None, metavar="JSON", help="calibration.json: adds the calibration section")
    p.add_argument(
        "--counts",
        default=None,
        metavar="H5",
        help="the test split's counts file: with --surrogate, checks calibrated radii against MC",
    )
    p.add_argument("--surrogate", default=None, metavar="PT", help="the surrogate the calibration belongs to")
    p.add_argument("--data-root", default=None, help="folder of torchvision datasets (for --counts of mnist/cifar)")
    offline = p.add_mutually_exclusive_group()
    offline.add_argument(
        "--offline-evaluations",
        type=int,
        default=None,
        metavar="N",
        help="base-model evaluations spent offline (for break-even queries)",
    )
    offline.add_argument(
        "--offline-counts",
        nargs="+",
        default=None,
        metavar="H5",
        help="counts files made offline (train, cal): their rows x n are the offline evaluations",
    )
    p.add_argument(
        "--monitor",
        default=None,
        metavar="JSON",
        help="a `surrogate-cert monitor` JSON: adds the deployment-monitor section",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="LABEL",
        help="results file stem that savings are measured against (default: the costliest, e.g. cohen)",
    )
    add_key_arg(p, "must have signed", "the calibration, the surrogate and the counts files")
    p.add_argument(
        "--out",
        default="report.html",
        help="HTML output; .md and .json are written beside it (refused if any of the three exists)",
    )
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calibration.summary import offline_evaluations_from_counts

    from ..workflows.report import report_paths, write_report

    key = signing_key(args)
    check_new_outputs(args, *report_paths(args.out).values())
    offline = args.offline_evaluations
    if offline is not None and offline < 0:
        raise InvalidParameterError(f"--offline-evaluations must be >= 0, got {offline}")
    if args.offline_counts:
        offline = offline_evaluations_from_counts(args.offline_counts, key=key)
    paths = write_report(
        args.results,
        args.out,
        calibration=args.calibration,
        counts=args.counts,
        surrogate=args.surrogate,
        offline_evaluations=offline,
        baseline=args.baseline,
        data_root=args.data_root,
        key=key,
        overwrite=args.overwrite,
        monitor=args.monitor,
    )
    for warning in paths.get("warnings", []):
        print(f"warning: {warning}")
    print(f"report: {paths['html']} (also {paths['md']}, {paths['json']})")
    return 0
