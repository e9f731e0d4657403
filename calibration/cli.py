"""``surrogate-cert calibrate``: conformal calibration of a surrogate, a thin layer over ``calibration.calibrate``."""
from __future__ import annotations

import argparse

from surrogate_cert.cli_common import add_parser, check_output_path

from .conformal import GROUPINGS, GUARANTEES, METHODS


def register(sub) -> None:
    p = add_parser(
        sub, "calibrate",
        "calibrate the surrogate's radius by split conformal prediction on a cal-split counts file",
        "surrogate-cert calibrate --surrogate surrogate.pt --counts cal.h5 --epsilon 0.01 --alpha-mc 0.001 "
        "--out calibration.json",
    )
    add_calibrate_arguments(p)
    p.set_defaults(func=run)


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    """The calibration options (a report option may be added beside them by calibration.report)."""
    p.add_argument("--surrogate", required=True, metavar="PT", help="surrogate checkpoint (from train)")
    p.add_argument("--counts", required=True, metavar="H5",
                   help="counts file of the cal split (from datagen, n=10000 recommended)")
    p.add_argument("--epsilon", type=float, default=0.01,
                   help="target probability that a calibrated radius exceeds the reference radius (default 0.01)")
    p.add_argument("--alpha-mc", type=float, default=1e-3,
                   help="Clopper-Pearson level of the reference radius (default 0.001)")
    p.add_argument("--guarantee", choices=GUARANTEES, default="marginal",
                   help="marginal (default): in expectation over calibration draws; pac: with probability 1 - delta")
    p.add_argument("--delta", type=float, default=0.05, help="PAC / LTT confidence parameter (default 0.05)")
    p.add_argument("--groups", choices=GROUPINGS, default="none",
                   help="Mondrian calibration per predicted class or per surrogate-confidence bin (default none)")
    p.add_argument("--method", choices=METHODS, default="conformal",
                   help="conformal (default): score quantile; ltt: Learn-then-Test on the rate among issued certificates")
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--out", required=True, help="calibration.json to write")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write the calibration report (HTML; .report.md and .report.json beside it)")
    p.add_argument("--report-counts", default=None, metavar="H5",
                   help="test-split counts for the report's held-out check of calibrated radii against MC")


def run(args: argparse.Namespace) -> int:
    from .conformal import calibrate

    check_output_path(args.out)
    if args.report:
        check_output_path(args.report)
    calibration = calibrate(
        args.surrogate, args.counts, args.epsilon, args.alpha_mc, guarantee=args.guarantee, delta=args.delta,
        groups=args.groups, method=args.method, data_root=args.data_root, device=args.device,
    )
    calibration.save(args.out)
    d = calibration.diagnostics
    q = calibration.pooled_offset
    print(f"wrote {args.out}: {calibration.calibration_size} points (n_cal={calibration.n_cal}), "
          f"{calibration.guarantee} {calibration.method}, groups {calibration.groups}; q^ {q:.4g} (pooled); "
          f"certifies {d['certified_share']:.1%} of the calibration set; bound epsilon + alpha_mc = {calibration.bound:g}"
          + (f"; groups on the pooled q^: {', '.join(calibration.fallback_groups)}" if calibration.fallback_groups else ""))
    # Post-calibration outputs (e.g. a calibration report) go here, reading `calibration` or args.out.
    if args.report:
        from .report import write_calibration_report

        paths = write_calibration_report(args.out, args.report, counts=args.report_counts,
                                         surrogate=args.surrogate if args.report_counts else None,
                                         data_root=args.data_root)
        print(f"calibration report: {paths['html']}")
    return 0
