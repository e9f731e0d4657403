"""``surrogate-cert train``, ``calibrate`` and ``certify``: the one-pass workflow, from counts to certificates."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING

from ..core.errors import DatasetError, InvalidParameterError
from ..core.signing import key_id
from .choices import ARCHITECTURES, GROUPINGS, GUARANTEES, SCORES, SHIFT_BINS, TUNE_SHARE
from .choices import CALIBRATION_METHODS as METHODS
from .common import (
    add_dataset_args,
    add_device_arg,
    add_device_args,
    add_key_arg,
    add_noise_scheme_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    certify_split,
    check_new_outputs,
    noise_provenance,
    provenance,
    radius_arg,
    results_paths,
    seed_arg,
    signing_key,
    write_results,
)

if TYPE_CHECKING:
    from ..deploy.hybrid import HybridCertifier

HYBRID_CHUNK = 2048
"""Inputs certified together: the sequential fallback shares forward passes within a chunk."""


# long: argparse builder of train, calibrate and certify: each one's options in a flat list, read in order
def register(sub) -> None:
    p = add_parser(
        sub,
        "train",
        "train the surrogate on counts files (soft-label cross-entropy against counts/n), starting from "
        "the base model the counts were made with",
        "surrogate-cert train --counts train.h5 --out surrogate.pt   (starts from the counts' base model)",
    )
    p.add_argument(
        "--counts",
        required=True,
        nargs="+",
        metavar="H5",
        help="one or more counts files (from datagen) of one sigma and base model: best the surrogate "
        "split (many images x ~100 samples) and unlabeled pools of images the base model never saw "
        "(datagen --split pool), optionally the train split or a query log of the hybrid's fallback; "
        "calibrate refuses calibration images the surrogate was trained on (by index and content)",
    )
    p.add_argument("--out", required=True, help="surrogate checkpoint to write (.pt); refused if it exists")
    add_overwrite_arg(p)
    p.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="built-in architecture (default: the base model's own, whatever it is; without a base "
        "model small_cnn up to 28x28 pixels, resnet18 above); a TorchScript / torch.export / "
        "factory base model's weights are then mapped onto it in order (e.g. --arch mlp for a "
        "784-512-256-10 MLP)",
    )
    init = p.add_mutually_exclusive_group()
    init.add_argument(
        "--init-from-base",
        default="auto",
        metavar="MODEL",
        help="start from this base model's weights and layout: a train-base checkpoint, a TorchScript "
        "or torch.export (.pt2) file, or package.module:factory=weights.pt (exported with "
        "torch.export). Default: the base model the counts were made with, when its file is "
        "still there unchanged (the measured best flow)",
    )
    init.add_argument(
        "--no-init-from-base",
        dest="init_from_base",
        action="store_const",
        const=None,
        help="train from random weights (default architecture: --arch, else by image size)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="maximum passes over the data (default 40 for small sets, else 15); early stopping on a held-out part",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default 0.001 with --init-from-base, else 0.002)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="share of the train split held out for early stopping and prior tuning (default 0.1)",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of initialisation, hold-out split and shuffling")
    add_device_arg(p)
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    add_progress_arg(p)
    add_key_arg(p, "must have signed the counts files and signs", "the surrogate")
    p.set_defaults(func=run_train)

    p = add_parser(
        sub,
        "calibrate",
        "calibrate the surrogate's radius by split conformal prediction on a cal-split counts file",
        "surrogate-cert calibrate --surrogate surrogate.pt --counts cal.h5 --epsilon 0.01 --alpha-mc 0.001 "
        "--out calibration.json",
    )
    p.add_argument("--surrogate", required=True, metavar="PT", help="surrogate checkpoint (from train)")
    p.add_argument(
        "--counts", required=True, metavar="H5", help="counts file of the cal split (from datagen, n=10000 recommended)"
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=0.01,
        help="target probability that a calibrated radius exceeds the reference radius (default 0.01)",
    )
    p.add_argument(
        "--alpha-mc", type=float, default=1e-3, help="Clopper-Pearson level of the reference radius (default 0.001)"
    )
    p.add_argument(
        "--guarantee",
        choices=GUARANTEES,
        default="marginal",
        help="marginal (default): P(wrong) <= epsilon + alpha_mc over calibration draws and test inputs, "
        "certified or not; pac: the same rate, with probability 1 - delta over the calibration draw; "
        "issued: P(wrong | the surrogate issued the certificate) <= epsilon + alpha_mc with "
        "probability 1 - delta (Learn-then-Test; certifies fewer inputs)",
    )
    p.add_argument("--delta", type=float, default=0.05, help="pac / issued confidence parameter (default 0.05)")
    p.add_argument(
        "--groups",
        choices=GROUPINGS,
        default="none",
        help="Mondrian calibration per predicted class or per surrogate-confidence bin (default none)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="conformal",
        help="conformal (default): score quantile; ltt: Learn-then-Test on the rate among issued "
        "certificates (the same as --guarantee issued)",
    )
    p.add_argument(
        "--score",
        choices=SCORES,
        default="residual",
        help="residual (default): R~ - y; shifted: per-bin offsets tuned on one part of the cal split "
        f"(--tune-share, default {TUNE_SHARE:g}), then the conformal shift on the other part",
    )
    p.add_argument(
        "--bins",
        type=int,
        default=None,
        help=f"bins of the shifted score (default {SHIFT_BINS}) or of --edges-from (default 5)",
    )
    p.add_argument(
        "--tune-share",
        type=float,
        default=TUNE_SHARE,
        help=f"share of the cal split that tunes the shifted score (default {TUNE_SHARE:g})",
    )
    p.add_argument(
        "--edges-from",
        default=None,
        metavar="H5",
        help="--groups confidence: choose equal-mass bin edges on the images of this counts file (the "
        "surrogate's own training split), never on the calibration points",
    )
    p.add_argument(
        "--no-thresholds",
        action="store_true",
        help="skip the required-radius thresholds (certify --target-radius then uses the best radius)",
    )
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="calibration.json to write; refused if it exists")
    add_overwrite_arg(p)
    add_key_arg(p, "signs the calibration (and must have signed the surrogate and the counts files):", "the key")
    p.add_argument(
        "--report",
        default=None,
        metavar="HTML",
        help="also write the calibration report (HTML; .report.md and .report.json beside it)",
    )
    p.add_argument(
        "--report-counts",
        default=None,
        metavar="H5",
        help="test-split counts for the report's held-out check of calibrated radii against MC",
    )
    p.set_defaults(func=run_calibrate)

    p = add_parser(
        sub,
        "certify",
        "certify a split: calibrated surrogate in one pass, sequential E-process fallback for the rest",
        "surrogate-cert certify --surrogate surrogate.pt --calibration calibration.json --model base.pt "
        "--dataset digits --split test --out hybrid.tsv",
    )
    p.add_argument("--surrogate", required=True, metavar="PT", help="surrogate checkpoint (from train)")
    p.add_argument("--calibration", required=True, metavar="JSON", help="calibration.json (from calibrate)")
    p.add_argument(
        "--model",
        default=None,
        help="base model for the fallback, the one the counts were made with: a train-base checkpoint, "
        "a torch.export program (.pt2), a TorchScript file or package.module:factory=weights.pt",
    )
    add_dataset_args(p)
    p.add_argument(
        "--fallback",
        choices=("eprocess", "none"),
        default="eprocess",
        help="eprocess (default): sequential certifier where the surrogate does not certify; none: abstain",
    )
    p.add_argument(
        "--alpha", type=float, default=1e-3, help="error probability of a sequential certificate (default 0.001)"
    )
    p.add_argument("--max-samples", type=int, default=10_000, help="sequential sample budget per input (default 10000)")
    p.add_argument(
        "--target-radius",
        type=radius_arg,
        default=None,
        help="required l2 radius for every input, fixed before seeing them: inputs the surrogate does not "
        "certify at it go to the fallback in target-radius mode",
    )
    p.add_argument("--tolerance", type=float, default=0.01, help="best-radius policy tolerance (l2 units)")
    p.add_argument(
        "--price",
        type=float,
        default=None,
        metavar="P",
        help="priced best-radius rule of the fallback: stop when the radius more samples are expected to "
        "add is worth less than P (l2 units) per 1,000 samples",
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="also sample one-pass best radii that sampling is expected to raise at --price (the "
        "surrogate as prior); a refined input reports the sequential certificate (per-input alpha)",
    )
    p.add_argument(
        "--combine",
        choices=("max", "sequential"),
        default="max",
        help="what a refined input reports: the larger of the two radii (default; the hybrid's marginal "
        "bound epsilon + alpha_mc + alpha), or the sequential certificate alone (per-input alpha)",
    )
    p.add_argument(
        "--radius-of-interest",
        type=float,
        default=None,
        metavar="R",
        help="the largest radius worth sampling for (l2 units): the fallback's best-radius rules and "
        "--refine count no gain above it",
    )
    add_device_args(p)
    add_noise_scheme_arg(p, "default: the calibration's; a scheme of the other family is refused")
    add_progress_arg(p)
    add_key_arg(p, "must have signed", "the surrogate and the calibration")
    p.add_argument(
        "--out", required=True, help="results TSV to write (provenance goes to OUT.meta.json); refused if either exists"
    )
    add_overwrite_arg(p)
    p.set_defaults(func=run_certify, torchrun=True)


def run_train(args: argparse.Namespace) -> int:
    key = signing_key(args)
    from ..workflows.training import train_surrogate

    check_new_outputs(args, args.out)
    surrogate = train_surrogate(
        args.counts,
        args.out,
        arch=args.arch,
        init_from_base=args.init_from_base,
        epochs=args.epochs,
        seed=args.seed,
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch_size,
        lr=args.lr,
        holdout=args.holdout,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        key=key,
    )
    meta = surrogate.meta
    holdout = meta.get("holdout_loss")
    if meta.get("init_from_base"):
        print(f"started from the base model {meta['init_from_base']} ({meta.get('init_mapping')})")
    elif meta.get("init_skipped"):
        print(
            f"note: trained from random weights: {meta['init_skipped']}; starting from the base model makes "
            "tighter one-pass certificates (--init-from-base MODEL)"
        )
    print(
        f"saved {args.out}: {surrogate.arch} on {meta['dataset']} {meta['split']} ({meta['counts_rows']} images, "
        f"n={meta['counts_n']}), {meta['epochs_run']} epochs (best {meta['best_epoch']}"
        + (f", held-out loss {holdout:.4f}" if holdout is not None else "")
        + f"), prior kappa={surrogate.kappa:g} w={surrogate.w:g}, {meta['seconds']:.1f} s"
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from calibration.conformal import calibrate
    from calibration.summary import held_out_counts

    from ..core.surrogate import Surrogate
    from ..workflows.report import report_paths, write_calibration_report

    key = signing_key(args)
    check_new_outputs(args, args.out)
    if args.report_counts and not args.report:
        raise InvalidParameterError(
            "--report-counts is the held-out check of the calibration report: add --report HTML"
        )
    if args.bins is not None and args.score != "shifted" and args.edges_from is None:
        raise InvalidParameterError(
            "--bins sets the bins of --score shifted or of --edges-from: add one of them, or drop --bins"
        )
    if args.report:
        check_new_outputs(args, *report_paths(args.report, beside=".report").values(), option="--report")
    calibration = calibrate(
        args.surrogate,
        args.counts,
        args.epsilon,
        args.alpha_mc,
        guarantee=args.guarantee,
        delta=args.delta,
        groups=args.groups,
        method=args.method,
        data_root=args.data_root,
        device=args.device,
        score=args.score,
        bins=args.bins,
        tune_share=args.tune_share,
        edges_from=args.edges_from,
        thresholds=not args.no_thresholds,
        key=key,
    )
    if args.report_counts:  # refused now, before the calibration file is written
        held_out_counts(args.report_counts, Surrogate.load(args.surrogate, key=key), calibration, key=key)
    calibration.save(args.out, key=key, overwrite=args.overwrite)
    d = calibration.diagnostics
    q = calibration.pooled_offset
    print(
        f"wrote {args.out}: {calibration.calibration_size} points (n_cal={calibration.n_cal}), "
        f"{calibration.guarantee} {calibration.method}, groups {calibration.groups}; q^ {q:.4g} (pooled); "
        f"certifies {d['certified_share']:.1%} of the calibration set; {calibration.statement}"
        + (
            f"; groups too small for their own q^ (never certified by the surrogate): "
            f"{', '.join(calibration.fallback_groups)}"
            if calibration.fallback_groups
            else ""
        )
        + (f"; signed (key id {calibration.signature_key_id})" if calibration.signed else "; unsigned")
    )
    cap = calibration.radius_cap
    print(
        f"radius cap {cap:.4g} ({cap / calibration.sigma:.2f} sigma): the largest reference radius the calibration "
        f"counts can show (n_cal={calibration.n_cal:,} samples per image, alpha_mc={calibration.alpha_mc:g}); no "
        "calibrated radius can exceed it (more samples per calibration image lift it: datagen --samples, or "
        "--top-up)"
    )
    if args.report:
        paths = write_calibration_report(
            args.out,
            args.report,
            counts=args.report_counts,
            surrogate=args.surrogate if args.report_counts else None,
            data_root=args.data_root,
            key=key,
            overwrite=args.overwrite,
        )
        print(f"calibration report: {paths['html']}")
    return 0


def run_certify(args: argparse.Namespace) -> int:
    from data_gen.datasets import load_split

    from ..deploy.hybrid import HybridCertifier

    key = signing_key(args)
    check_new_outputs(args, *results_paths(args.out))
    device = args.shard.device(args.device)
    hybrid = HybridCertifier.load(
        args.surrogate,
        args.calibration,
        base_model=args.model,
        alpha=args.alpha,
        max_samples=args.max_samples,
        fallback=args.fallback,
        tolerance=args.tolerance,
        device=device,
        batch_size=args.batch_size,
        seed=args.seed,
        key=key,
        noise_scheme=args.noise_scheme,
        off_grid="quantise",
        price=args.price,
        refine=args.refine,
        combine=args.combine,
        radius_of_interest=args.radius_of_interest,
    )
    data = load_split(args.dataset, args.split, data_root=args.data_root, download=args.download, limit=args.limit)
    data.require_labels("the results file (its label and correct columns: certified accuracy)")
    check_dataset_fits(args.dataset, data, hybrid, split=args.split)
    meta = _certify_provenance(args, hybrid, data, key)
    certificates = certify_split(
        data,
        lambda x, idx: hybrid.certify(x, required_radius=args.target_radius, indices=idx),
        HYBRID_CHUNK,
        not args.no_progress,
        "certify",
        args.shard,
    )
    if certificates is None:
        return 0  # rank 0 writes the merged results
    code = write_results(args.out, data, certificates, meta, overwrite=args.overwrite)
    methods = Counter(c.method for c in certificates)
    print(
        "by method: "
        + ", ".join(f"{m} {methods[m]}" for m in ("surrogate", "eprocess", "abstain"))
        + (f"; refined {sum(c.route == 'refined' for c in certificates)}" if args.refine else "")
    )
    return code


def _certify_provenance(args: argparse.Namespace, hybrid: HybridCertifier, data, key: bytes | None) -> dict:
    """The results file's provenance: the command's options, the calibration it states, the device and
    noise the fallback drew."""
    calibration = hybrid.calibration
    device = hybrid.sequential.smooth.device if hybrid.sequential is not None else hybrid.surrogate.device
    return provenance(
        args,
        method="hybrid" if args.fallback == "eprocess" else "surrogate",
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        images=len(data),
        sigma=hybrid.surrogate.sigma,
        epsilon=calibration.epsilon,
        alpha_mc=calibration.alpha_mc,
        alpha=args.alpha,
        guarantee=calibration.guarantee,
        calibration_method=calibration.method,
        groups=calibration.groups,
        fallback=args.fallback,
        target_radius=args.target_radius,
        max_samples=args.max_samples,
        seed=args.seed,
        device=str(device),
        price=args.price,
        refine=args.refine,
        combine=args.combine if args.refine else None,
        radius_of_interest=args.radius_of_interest,
        surrogate_sha256=calibration.surrogate_sha256,
        calibration=args.calibration,
        calibration_signature=f"verified (key id {key_id(key)})"
        if key is not None
        else "not checked (no key configured)",
        noise_scheme=(
            hybrid.sequential.smooth.noise_scheme if hybrid.sequential is not None else calibration.noise_scheme
        ),
        world_size=args.shard.world_size,
        **noise_provenance(hybrid.sequential.smooth if hybrid.sequential is not None else None, data),
    )


def check_dataset_fits(dataset: str, data, hybrid: HybridCertifier, split: str | None = None) -> None:
    """Refuse to certify images the surrogate and its calibration were not made for, or were made on.

    The surrogate's class count and image shape must be the dataset's, and the dataset the one the
    calibration was computed on (its guarantee holds for inputs exchangeable with those), but the
    images must be neither the calibration images (``Calibration.check_fresh``, the rule the report's
    held-out check applies) nor images the surrogate was trained on (by dataset index).
    """
    from data_gen.datasets import same_dataset
    from data_gen.store import in_ranges

    surrogate, calibration = hybrid.surrogate, hybrid.calibration
    if data.num_classes != surrogate.num_classes or tuple(data.input_shape) != tuple(surrogate.input_shape):
        raise DatasetError(
            f"{dataset} has {data.num_classes} classes of {tuple(data.input_shape)} images but the "
            f"surrogate is for {surrogate.num_classes} classes of {tuple(surrogate.input_shape)}; "
            "certify the dataset the surrogate was trained on"
        )
    expected = calibration.dataset or surrogate.meta.get("dataset")
    if expected and not same_dataset(dataset, expected):
        raise DatasetError(
            f"the calibration was computed on {expected!r}, not {dataset!r}: its guarantee holds only for "
            "inputs like its own; certify that dataset, or calibrate on this one"
        )
    calibration.check_fresh(dataset=dataset, split=split, what=f"--split {split}")
    trained = surrogate.meta.get("train_index_ranges")
    if trained is not None and same_dataset(dataset, surrogate.meta.get("dataset") or dataset):
        seen = in_ranges(data.indices, trained)
        if seen.any():
            raise DatasetError(
                f"--split {split} holds {int(seen.sum())} images the surrogate was trained on "
                f"(dataset index {int(data.indices[seen][0])} and more): the guarantee needs images it "
                "never saw; certify the test split"
            )
