"""``surrogate-cert train-base`` and ``surrogate-cert datagen``: the base model and its Monte Carlo counts."""

from __future__ import annotations

import argparse
import os

from ..core.errors import InvalidParameterError
from .choices import ARCHITECTURES, DATASET_HELP, TOPUP_RULES
from .common import (
    add_data_root_args,
    add_dataset_args,
    add_device_arg,
    add_device_args,
    add_engine_args,
    add_key_arg,
    add_model_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    add_samples_arg,
    check_new_outputs,
    command_line,
    seed_arg,
    signing_key,
)


# long: argparse builder of train-base and datagen: each one's options in a flat list, read in order
def register(sub) -> None:
    p = add_parser(
        sub,
        "train-base",
        "train the built-in base model (small CNN) with Gaussian-noise augmentation at --sigma",
        "surrogate-cert train-base --dataset digits --sigma 0.25 --out base.pt",
    )
    p.add_argument("--dataset", default="digits", help=DATASET_HELP)
    p.add_argument(
        "--sigma", type=float, default=0.25, help="noise level of the augmentation (l2, pixel units in [0, 1])"
    )
    p.add_argument("--out", required=True, help="checkpoint to write (.pt); refused if it exists, unless --overwrite")
    add_overwrite_arg(p)
    p.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="architecture: small_cnn (default up to 28x28 pixels), mlp (784-512-256-10 on MNIST: the "
        "cheapest on a CPU), resnet18 (default above 28x28)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="passes over the train split (default: 25 for small sets, else 15)"
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of initialisation, shuffling and noise")
    p.add_argument(
        "--splits",
        default="train",
        help="comma-separated splits to train on: train (default) or train,surrogate (every training "
        "image, as most users' own models are; then train the surrogate on an unlabeled pool)",
    )
    add_device_arg(p)
    add_data_root_args(p)
    add_progress_arg(p)
    add_key_arg(p, "signs", "the checkpoint")
    p.set_defaults(func=run_train_base)

    p = add_parser(
        sub,
        "datagen",
        "store Monte Carlo class counts of a base model under Gaussian noise for one split, in HDF5",
        "surrogate-cert datagen --dataset digits --split train --model base.pt --sigma 0.25 --samples 1000 "
        "--out train.h5\n  torchrun --nproc-per-node=4 --no-python surrogate-cert datagen ... --resume "
        "(one shard per process, merged into --out)",
    )
    add_dataset_args(p, split_default=None)
    add_model_arg(p)
    p.add_argument(
        "--sigma",
        type=float,
        required=True,
        help="noise level (l2, pixel units in [0, 1]); refused if the model declares another one",
    )
    p.add_argument(
        "--allow-sigma-mismatch",
        action="store_true",
        help="accept a --sigma other than the one the model declares it was trained at",
    )
    add_samples_arg(p, 1000, "noisy evaluations per image (dataset 'counts'; --n is an alias)")
    p.add_argument(
        "--n0",
        type=int,
        default=0,
        help="extra selection-stream evaluations per image (dataset 'counts_select'; 0 = none)",
    )
    add_device_args(p)
    add_engine_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --out (or its torchrun shards) from the last committed rows, same "
        "settings required; starts the job when there is nothing to continue",
    )
    p.add_argument(
        "--top-up",
        type=int,
        default=None,
        metavar="N",
        help="then draw N more samples of the same noise stream for every row whose samples so far all "
        "agree (references past the radius cap n samples allow; only the calibration's anytime-valid "
        "reference uses them). On an existing complete --out, give the command that made it plus "
        "--top-up: the file is continued, no --resume needed",
    )
    p.add_argument(
        "--top-up-max",
        type=int,
        default=None,
        metavar="M",
        help="the most samples any row may reach over all top-ups (fixed by the first top-up; default "
        "n + N); the calibration's radius cap is computed from it",
    )
    p.add_argument("--top-up-rule", choices=TOPUP_RULES, default="all-agree", help=argparse.SUPPRESS)
    p.add_argument(
        "--commit-every",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="commit finished rows to the file at least this often (default 2)",
    )
    add_progress_arg(p)
    p.add_argument(
        "--out", required=True, help="HDF5 file to write (refused if it exists, unless --resume or --overwrite)"
    )
    add_overwrite_arg(p, resumable=True)
    add_key_arg(p, "signs", "the complete counts file")
    p.set_defaults(func=run_datagen, torchrun=True)


def run_train_base(args: argparse.Namespace) -> int:
    key = signing_key(args)
    from data_gen.models import train_base

    check_new_outputs(args, args.out)
    metrics = train_base(
        dataset=args.dataset,
        sigma=args.sigma,
        out=args.out,
        epochs=args.epochs,
        seed=args.seed,
        arch=args.arch,
        data_root=args.data_root,
        device=args.device,
        progress=not args.no_progress,
        download=args.download,
        overwrite=args.overwrite,
        key=key,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
    )
    print(
        f"saved {args.out}: {metrics['arch']} on {metrics['dataset']}, noisy test accuracy "
        f"{metrics['noisy_test_accuracy']:.3f} at sigma {metrics['sigma']} "
        f"(clean {metrics['clean_test_accuracy']:.3f}), "
        f"{metrics['epochs']} epochs in {metrics['seconds']:.1f} s, sha256 {metrics['sha256'][:12]}"
    )
    return 0


def run_datagen(args: argparse.Namespace) -> int:
    from data_gen.generate import generate_counts, top_up_counts
    from data_gen.models import check_sigma_agrees, declared_sigma
    from data_gen.store import read_attrs

    if args.resume and args.overwrite:
        raise InvalidParameterError("--resume continues the file and --overwrite starts it again: give one of them")
    if args.top_up is not None and args.top_up < 1:
        raise InvalidParameterError(f"--top-up must be a number of samples >= 1, got {args.top_up}")
    if args.top_up_max is not None and args.top_up is None:
        raise InvalidParameterError("--top-up-max bounds a top-up: give --top-up N too")
    if args.top_up_max is not None and args.top_up_max < args.n:
        raise InvalidParameterError(
            f"--top-up-max {args.top_up_max} is below --samples {args.n}: it is the most "
            "samples a row may reach over all top-ups, counting the first n; give at least n"
        )
    key = signing_key(args)
    if args.top_up is not None and args.shard.world_size > 1:
        raise InvalidParameterError(
            "--top-up runs in one process: make the file with torchrun, then top it up "
            "without torchrun (same command plus --top-up)"
        )
    check_sigma_agrees(declared_sigma(args.model), args.sigma, args.model, args.allow_sigma_mismatch)
    # A top-up continues an existing file (its rows are checked against this command's settings).
    resume = args.resume or (args.top_up is not None and not args.overwrite and os.path.exists(args.out))
    if not resume:
        check_new_outputs(args, args.out, resumable=True)
    generate_counts(
        args.dataset,
        args.split,
        args.model,
        args.sigma,
        args.n,
        args.out,
        n0=args.n0,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        device=args.device,
        amp=args.amp,
        resume=resume,
        overwrite=args.overwrite,
        data_root=args.data_root,
        download=args.download,
        progress=not args.no_progress,
        commit_seconds=args.commit_every,
        command=command_line(args),
        noise_scheme=args.noise_scheme,
        channels_last=args.channels_last,
        compile=args.compile,
        shard=args.shard,
        key=key,
    )
    if not args.shard.is_main:
        return 0  # rank 0 merges the shards and reports
    attrs = read_attrs(args.out)
    print(
        f"wrote {args.out}: {attrs['rows']} rows ({attrs['dataset']} {attrs['split']}) x {attrs['num_classes']} "
        f"classes, n={attrs['n']}, n0={attrs['n0']}, sigma={attrs['sigma']}, complete={attrs['complete']}"
    )
    if args.top_up is not None:
        done = top_up_counts(
            args.out,
            args.model,
            args.top_up,
            planned_max=args.top_up_max,
            rule=args.top_up_rule,
            batch_size=args.batch_size,
            device=args.device,
            data_root=args.data_root,
            progress=not args.no_progress,
            command=command_line(args),
            key=key,
        )
        print(
            f"topped up {args.out}: {done['rows']} rows whose samples all agreed got {done['samples']:,} more samples "
            f"(at most {done['planned_max']:,} per row)"
        )
    return 0
