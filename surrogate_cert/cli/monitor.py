"""``surrogate-cert monitor``: watch a stream of queries (a thin layer over workflows.monitoring)."""

from __future__ import annotations

import argparse
import os

from ..core.errors import InvalidParameterError
from .choices import DATASET_HELP, SPLITS
from .common import (
    add_data_root_args,
    add_device_arg,
    add_key_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    check_new_outputs,
    provenance,
    seed_arg,
    signing_key,
)


def register(sub) -> None:
    p = add_parser(
        sub,
        "monitor",
        "watch a stream of queries: a drift monitor (alarms when queries stop being exchangeable with the "
        "calibration images) and, with --model, a random audit of the one-pass certificates; writes JSON",
        "surrogate-cert monitor --surrogate surrogate.pt --calibration calibration.json --stream queries.npz "
        "--model base.pt --audit-rate 0.01 --out monitor.json\n  surrogate-cert monitor --surrogate surrogate.pt "
        "--calibration calibration.json --stream test --out monitor.json   (the test split as the stream)",
    )
    p.add_argument("--surrogate", required=True, metavar="PT", help="surrogate checkpoint (from train)")
    p.add_argument(
        "--calibration",
        required=True,
        metavar="JSON",
        help="calibration.json (from calibrate; holds the monitor's reference sample)",
    )
    p.add_argument(
        "--stream",
        required=True,
        metavar="NPZ_OR_SPLIT",
        help="the queries in arrival order: an NPZ file with x (N x C x H x W floats in [0, 1]) and "
        "optionally y (integer labels), e.g. np.savez('queries.npz', x=x, y=y); or a split "
        f"({', '.join(SPLITS)}) of --dataset, e.g. test (exchangeable with cal: no alarm expected)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help=f"with --stream SPLIT: {DATASET_HELP} (default: the dataset the surrogate was trained on)",
    )
    add_data_root_args(p)
    p.add_argument("--limit", type=int, default=None, help="with --stream SPLIT: only the first N images of the split")
    p.add_argument("--model", default=None, help="base model, for the audit (the one the counts were made with)")
    p.add_argument(
        "--audit-rate",
        type=float,
        default=None,
        metavar="R",
        help="share of queries whose one-pass certificate is re-checked with the base model (needs --model)",
    )
    p.add_argument(
        "--n-audit",
        type=int,
        default=None,
        metavar="N",
        help="noisy samples per audited certificate (default and only value: the calibration's n_cal)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=0.01,
        metavar="D",
        help="false-alarm probability of each watcher over the whole stream (default 0.01)",
    )
    p.add_argument(
        "--seed", type=seed_arg, default=0, help="seed of the tie-breaking, the audit's selection and its noise"
    )
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass of the audit")
    add_progress_arg(p)
    p.add_argument("--out", required=True, metavar="JSON", help="the monitor's JSON to write")
    p.add_argument(
        "--report",
        default=None,
        metavar="HTML",
        help="also write the monitor report (HTML; .report.md and .report.json beside it)",
    )
    add_key_arg(p, "must have signed", "the surrogate and the calibration")
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.surrogate import Surrogate
    from ..workflows.monitoring import load_stream, load_stream_split, monitor_stream, write_monitor
    from ..workflows.report import report_paths, write_monitor_report

    key = signing_key(args)
    inputs = {os.path.realpath(p) for p in (args.surrogate, args.calibration, args.stream, args.model) if p}
    for out in filter(None, (args.out, args.report)):
        if os.path.realpath(out) in inputs:
            raise InvalidParameterError(f"--out/--report {out} is one of the inputs; choose another file")
    if args.report and not args.report.lower().endswith((".html", ".htm")):
        raise InvalidParameterError(
            f"--report {args.report} must end in .html (the .md and .json are written beside it)"
        )
    check_new_outputs(args, args.out)
    if args.report:
        check_new_outputs(args, *report_paths(args.report, beside=".report").values(), option="--report")
    if args.n_audit is not None and args.audit_rate is None:
        raise InvalidParameterError("--n-audit needs --audit-rate")
    is_split = args.stream in SPLITS and not os.path.exists(args.stream)
    if not is_split and (args.dataset or args.limit is not None):
        raise InvalidParameterError(f"--dataset and --limit choose a split to stream; --stream {args.stream} is a file")
    surrogate = Surrogate.load(args.surrogate, device=args.device, key=key)
    if is_split:
        dataset = args.dataset or surrogate.meta.get("dataset")
        if not dataset:
            raise InvalidParameterError(f"--stream {args.stream}: give --dataset (the surrogate does not record one)")
        stream: tuple = load_stream_split(
            dataset,
            args.stream,
            surrogate.input_shape,
            data_root=args.data_root,
            download=args.download,
            limit=args.limit,
        )
    else:
        stream = load_stream(args.stream, surrogate.input_shape, surrogate.num_classes)
    x, y = stream
    doc = monitor_stream(
        surrogate,
        args.calibration,
        x,
        y,
        base_model=args.model,
        audit_rate=args.audit_rate,
        n_audit=args.n_audit,
        delta=args.delta,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        key=key,
    )
    doc["provenance"] = provenance(
        args, stream=args.stream, calibration=args.calibration, surrogate=args.surrogate, model=args.model
    )
    write_monitor(doc, args.out, overwrite=args.overwrite)
    drift = (
        f"drift alarm at query {doc['drift_alarm_at']}"
        if doc["drift_alarm"]
        else f"no drift alarm (log martingale {doc['log_martingale']['final']:.2f}, "
        f"alarm at {doc['log_martingale']['threshold']:.2f})"
    )
    audit = doc["audit"]
    audited = (
        ""
        if audit is None
        else (
            f"; audit: {audit['exceedances']} of {audit['audited']} audited above the reference radius, rate bound "
            f"[{audit['lower']:.4f}, {audit['upper']:.4f}] vs threshold {audit['threshold']:.4f}"
            + (f", ALARM at query {audit['alarm_at']}" if audit["alarm"] else ", no alarm")
        )
    )
    print(f"wrote {args.out}: {doc['queries']} queries; {drift}{audited}")
    if args.report:
        paths = write_monitor_report(args.out, args.report, overwrite=args.overwrite)
        print(f"monitor report: {paths['html']}")
    return 0
