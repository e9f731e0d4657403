"""``surrogate-cert train``, ``calibrate`` and ``certify``: the one-pass workflow, from counts to certificates."""
from __future__ import annotations

import argparse
from collections import Counter

from calibration.conformal import GUARANTEES, METHODS, SCORES, SHIFT_BINS, TUNE_SHARE, calibrate
from data_gen.datasets import load_split, same_dataset

from ..core.architectures import ARCHITECTURES
from ..core.errors import DatasetError
from ..core.one_pass import GROUPINGS
from ..core.signing import key_id
from ..deploy.hybrid import HybridCertifier
from ..workflows.report import report_paths, write_calibration_report
from ..workflows.training import train_surrogate
from .common import (
    add_dataset_args,
    add_device_arg,
    add_device_args,
    add_key_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    certify_split,
    check_new_outputs,
    provenance,
    results_paths,
    signing_key,
    write_results,
)

HYBRID_CHUNK = 2048
"""Inputs certified together: the sequential fallback shares forward passes within a chunk."""


def register(sub) -> None:
    p = add_parser(sub, "train",
                   "train the surrogate on counts files (soft-label cross-entropy against counts/n), e.g. of the "
                   "surrogate split, whose images the built-in base model never saw",
                   "surrogate-cert train --counts surrogate.h5 train.h5 --init-from-base base.pt --out surrogate.pt")
    p.add_argument("--counts", required=True, nargs="+", metavar="H5",
                   help="one or more counts files (from datagen) of one sigma and base model: best the surrogate "
                        "split (many images x ~100 samples) and unlabeled pools of images the base model never saw "
                        "(datagen --split pool), optionally the train split or a query log of the hybrid's fallback; "
                        "calibrate refuses calibration images the surrogate was trained on (by index and content)")
    p.add_argument("--out", required=True, help="surrogate checkpoint to write (.pt); refused if it exists")
    add_overwrite_arg(p)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                   help="architecture (default: small_cnn up to 16x16 pixels, resnet18 above)")
    p.add_argument("--init-from-base", default=None, metavar="MODEL",
                   help="start from the base model's weights: a train-base checkpoint (its architecture is used), or "
                        "a TorchScript / torch.export / factory model whose weights fit --arch in order (e.g. --arch "
                        "mlp for a 784-512-256-10 MLP); refused when the shapes do not match")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum passes over the data (default 40 for small sets, else 15); early stopping on a held-out part")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 0.001 with --init-from-base, else 0.002)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of the train split held out for early stopping and prior tuning (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, hold-out split and shuffling")
    add_device_arg(p)
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    add_progress_arg(p)
    p.set_defaults(func=run_train)

    p = add_parser(
        sub, "calibrate",
        "calibrate the surrogate's radius by split conformal prediction on a cal-split counts file",
        "surrogate-cert calibrate --surrogate surrogate.pt --counts cal.h5 --epsilon 0.01 --alpha-mc 0.001 "
        "--out calibration.json",
    )
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
    p.add_argument("--score", choices=SCORES, default="residual",
                   help="residual (default): R~ - y; shifted: per-bin offsets tuned on one part of the cal split "
                        f"(--tune-share, default {TUNE_SHARE:g}), then the conformal shift on the other part")
    p.add_argument("--bins", type=int, default=None,
                   help=f"bins of the shifted score (default {SHIFT_BINS}) or of --edges-from (default 5)")
    p.add_argument("--tune-share", type=float, default=TUNE_SHARE,
                   help=f"share of the cal split that tunes the shifted score (default {TUNE_SHARE:g})")
    p.add_argument("--edges-from", default=None, metavar="H5",
                   help="--groups confidence: choose equal-mass bin edges on the images of this counts file (the "
                        "surrogate's own training split), never on the calibration points")
    p.add_argument("--no-thresholds", action="store_true",
                   help="skip the required-radius thresholds (certify --target-radius then uses the best radius)")
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="calibration.json to write; refused if it exists")
    add_overwrite_arg(p)
    add_key_arg(p, "signs")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write the calibration report (HTML; .report.md and .report.json beside it)")
    p.add_argument("--report-counts", default=None, metavar="H5",
                   help="test-split counts for the report's held-out check of calibrated radii against MC")
    p.set_defaults(func=run_calibrate)

    p = add_parser(sub, "certify",
                   "certify a split: calibrated surrogate in one pass, sequential E-process fallback for the rest",
                   "surrogate-cert certify --surrogate surrogate.pt --calibration calibration.json --model base.pt "
                   "--dataset digits --split test --out hybrid.tsv")
    p.add_argument("--surrogate", required=True, metavar="PT", help="surrogate checkpoint (from train)")
    p.add_argument("--calibration", required=True, metavar="JSON", help="calibration.json (from calibrate)")
    p.add_argument("--model", default=None,
                   help="base model for the fallback: the checkpoint / TorchScript the counts were made with")
    add_dataset_args(p)
    p.add_argument("--fallback", choices=("eprocess", "none"), default="eprocess",
                   help="eprocess (default): sequential certifier where the surrogate does not certify; none: abstain")
    p.add_argument("--alpha", type=float, default=1e-3, help="error probability of a sequential certificate (default 0.001)")
    p.add_argument("--max-samples", type=int, default=10_000, help="sequential sample budget per input (default 10000)")
    p.add_argument("--target-radius", type=float, default=None,
                   help="required l2 radius: inputs the surrogate certifies less go to the fallback in target-radius mode")
    p.add_argument("--tolerance", type=float, default=0.01, help="best-radius policy tolerance (l2 units)")
    p.add_argument("--price", type=float, default=None, metavar="P",
                   help="priced best-radius rule of the fallback: stop when the radius more samples are expected to "
                        "add is worth less than P (l2 units) per 1,000 samples")
    p.add_argument("--refine", action="store_true",
                   help="also sample one-pass best radii that sampling is expected to raise at --price (the "
                        "surrogate as prior); a refined input reports the sequential certificate (per-input alpha)")
    p.add_argument("--combine", choices=("max", "sequential"), default="max",
                   help="what a refined input reports: the larger of the two radii (default; the hybrid's marginal "
                        "bound epsilon + alpha_mc + alpha), or the sequential certificate alone (per-input alpha)")
    p.add_argument("--radius-of-interest", type=float, default=None, metavar="R",
                   help="the largest radius worth sampling for (l2 units): the fallback's best-radius rules and "
                        "--refine count no gain above it")
    add_device_args(p)
    add_progress_arg(p)
    add_key_arg(p, "must have signed")
    p.add_argument("--out", required=True, help="results TSV to write (provenance goes to OUT.meta.json); refused if "
                                                "either exists")
    add_overwrite_arg(p)
    p.set_defaults(func=run_certify, torchrun=True)


def run_train(args: argparse.Namespace) -> int:
    check_new_outputs(args, args.out)
    surrogate = train_surrogate(
        args.counts, args.out, arch=args.arch, init_from_base=args.init_from_base, epochs=args.epochs,
        seed=args.seed, data_root=args.data_root, device=args.device, batch_size=args.batch_size, lr=args.lr,
        holdout=args.holdout, progress=not args.no_progress, overwrite=args.overwrite,
    )
    meta = surrogate.meta
    holdout = meta.get("holdout_loss")
    print(f"saved {args.out}: {surrogate.arch} on {meta['dataset']} {meta['split']} ({meta['counts_rows']} images, "
          f"n={meta['counts_n']}), {meta['epochs_run']} epochs (best {meta['best_epoch']}"
          + (f", held-out loss {holdout:.4f}" if holdout is not None else "")
          + f"), prior kappa={surrogate.kappa:g} w={surrogate.w:g}, {meta['seconds']:.1f} s")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    key = signing_key(args)
    check_new_outputs(args, args.out)
    if args.report:
        check_new_outputs(args, *report_paths(args.report, beside=".report").values(), option="--report")
    calibration = calibrate(
        args.surrogate, args.counts, args.epsilon, args.alpha_mc, guarantee=args.guarantee, delta=args.delta,
        groups=args.groups, method=args.method, data_root=args.data_root, device=args.device,
        score=args.score, bins=args.bins, tune_share=args.tune_share, edges_from=args.edges_from,
        thresholds=not args.no_thresholds,
    )
    calibration.save(args.out, key=key, overwrite=args.overwrite)
    d = calibration.diagnostics
    q = calibration.pooled_offset
    print(f"wrote {args.out}: {calibration.calibration_size} points (n_cal={calibration.n_cal}), "
          f"{calibration.guarantee} {calibration.method}, groups {calibration.groups}; q^ {q:.4g} (pooled); "
          f"certifies {d['certified_share']:.1%} of the calibration set; bound epsilon + alpha_mc = {calibration.bound:g}"
          + (f"; groups on the pooled q^: {', '.join(calibration.fallback_groups)}" if calibration.fallback_groups else "")
          + (f"; signed (key id {calibration.signature_key_id})" if calibration.signed else "; unsigned"))
    if args.report:
        paths = write_calibration_report(args.out, args.report, counts=args.report_counts,
                                         surrogate=args.surrogate if args.report_counts else None,
                                         data_root=args.data_root, key=key, overwrite=args.overwrite)
        print(f"calibration report: {paths['html']}")
    return 0


def run_certify(args: argparse.Namespace) -> int:
    key = signing_key(args)
    check_new_outputs(args, *results_paths(args.out))
    device = args.shard.device(args.device)
    hybrid = HybridCertifier.load(
        args.surrogate, args.calibration, base_model=args.model, alpha=args.alpha, max_samples=args.max_samples,
        fallback=args.fallback, tolerance=args.tolerance, device=device, batch_size=args.batch_size,
        seed=args.seed, key=key, price=args.price, refine=args.refine, combine=args.combine,
        radius_of_interest=args.radius_of_interest,
    )
    data = load_split(args.dataset, args.split, data_root=args.data_root, download=args.download, limit=args.limit)
    data.require_labels("the results file (its label and correct columns: certified accuracy)")
    calibration = hybrid.calibration
    check_dataset_fits(args.dataset, data, hybrid)
    device = hybrid.sequential.smooth.device if hybrid.sequential is not None else hybrid.surrogate.device
    meta = provenance(
        args, method="hybrid" if args.fallback == "eprocess" else "surrogate", dataset=args.dataset, split=args.split,
        limit=args.limit, images=len(data), sigma=hybrid.surrogate.sigma, epsilon=calibration.epsilon,
        alpha_mc=calibration.alpha_mc, alpha=args.alpha, guarantee=calibration.guarantee,
        calibration_method=calibration.method, groups=calibration.groups, fallback=args.fallback,
        target_radius=args.target_radius, max_samples=args.max_samples, seed=args.seed, device=str(device),
        price=args.price, refine=args.refine, combine=args.combine if args.refine else None,
        radius_of_interest=args.radius_of_interest,
        surrogate_sha256=calibration.surrogate_sha256, calibration=args.calibration,
        calibration_signature=f"verified (key id {key_id(key)})" if key is not None else "not checked (no key configured)",
        noise_scheme=hybrid.sequential.smooth.noise_scheme if hybrid.sequential is not None else None,
        world_size=args.shard.world_size,
    )
    certificates = certify_split(
        data, lambda x, idx: hybrid.certify(x, required_radius=args.target_radius, indices=idx),
        HYBRID_CHUNK, not args.no_progress, "certify", args.shard,
    )
    if certificates is None:
        return 0  # rank 0 writes the merged results
    code = write_results(args.out, data, certificates, meta, overwrite=args.overwrite)
    methods = Counter(c.method for c in certificates)
    print("by method: " + ", ".join(f"{m} {methods[m]}" for m in ("surrogate", "eprocess", "abstain"))
          + (f"; refined {sum(c.route == 'refined' for c in certificates)}" if args.refine else ""))
    return code


def check_dataset_fits(dataset: str, data, hybrid: HybridCertifier) -> None:
    """Refuse to certify images the surrogate and its calibration were not made for.

    The surrogate's class count and image shape must be the dataset's, and the dataset the one the
    calibration was computed on (its guarantee holds for inputs exchangeable with those).
    """
    surrogate, calibration = hybrid.surrogate, hybrid.calibration
    if data.num_classes != surrogate.num_classes or tuple(data.input_shape) != tuple(surrogate.input_shape):
        raise DatasetError(f"{dataset} has {data.num_classes} classes of {tuple(data.input_shape)} images but the "
                           f"surrogate is for {surrogate.num_classes} classes of {tuple(surrogate.input_shape)}; "
                           "certify the dataset the surrogate was trained on")
    expected = calibration.dataset or surrogate.meta.get("dataset")
    if expected and not same_dataset(dataset, expected):
        raise DatasetError(f"the calibration was computed on {expected!r}, not {dataset!r}: its guarantee holds only for "
                           "inputs like its own; certify that dataset, or calibrate on this one")
