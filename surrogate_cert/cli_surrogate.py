"""``surrogate-cert train`` and ``surrogate-cert certify``: thin wrappers of the surrogate and hybrid API."""
from __future__ import annotations

import argparse
from collections import Counter

from .architectures import ARCHITECTURES
from .cli_common import add_dataset_args, add_device_args, add_parser, check_output_path, command_line

HYBRID_CHUNK = 2048
"""Inputs certified together: the sequential fallback shares forward passes within a chunk."""


def register(sub) -> None:
    p = add_parser(sub, "train",
                   "train the surrogate on a train-split counts file (soft-label cross-entropy against counts/n)",
                   "surrogate-cert train --counts train.h5 --out surrogate.pt")
    p.add_argument("--counts", required=True, metavar="H5", help="counts file of the train split (from datagen)")
    p.add_argument("--out", required=True, help="surrogate checkpoint to write (.pt)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                   help="architecture (default: small_cnn up to 16x16 pixels, resnet18 above)")
    p.add_argument("--init-from-base", default=None, metavar="MODEL",
                   help="start from the weights (and architecture) of a train-base checkpoint")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum passes over the data (default 40 for small sets, else 15); early stopping on a held-out part")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 0.002)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default 64)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of the train split held out for early stopping and prior tuning (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, hold-out split and shuffling")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

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
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="results TSV to write")
    p.set_defaults(func=run_certify)


def run_train(args: argparse.Namespace) -> int:
    from .surrogate import train_surrogate

    check_output_path(args.out)
    surrogate = train_surrogate(
        args.counts, args.out, arch=args.arch, init_from_base=args.init_from_base, epochs=args.epochs,
        seed=args.seed, data_root=args.data_root, device=args.device, batch_size=args.batch_size, lr=args.lr,
        holdout=args.holdout, progress=not args.no_progress,
    )
    meta = surrogate.meta
    holdout = meta.get("holdout_loss")
    print(f"saved {args.out}: {surrogate.arch} on {meta['dataset']} {meta['split']} ({meta['counts_rows']} images, "
          f"n={meta['counts_n']}), {meta['epochs_run']} epochs (best {meta['best_epoch']}"
          + (f", held-out loss {holdout:.4f}" if holdout is not None else "")
          + f"), prior kappa={surrogate.kappa:g} w={surrogate.w:g}, {meta['seconds']:.1f} s")
    return 0


def run_certify(args: argparse.Namespace) -> int:
    import numpy as np
    import scipy
    import torch

    from data_gen.datasets import load_split

    from . import __version__
    from .cli_baselines import _finish, _run_chunks
    from .hybrid import HybridCertifier
    from .smoothing import resolve_device

    check_output_path(args.out)
    hybrid = HybridCertifier.load(
        args.surrogate, args.calibration, base_model=args.model, alpha=args.alpha, max_samples=args.max_samples,
        fallback=args.fallback, tolerance=args.tolerance, device=args.device, batch_size=args.batch_size,
        seed=args.seed,
    )
    data = load_split(args.dataset, args.split, data_root=args.data_root, download=args.download, limit=args.limit)
    calibration = hybrid.calibration
    header = "\n".join([
        command_line(),
        f"surrogate-cert {__version__}; torch {torch.__version__}; numpy {np.__version__}; scipy {scipy.__version__}",
        f"dataset {args.dataset} split {args.split} images {len(data)}; sigma {hybrid.surrogate.sigma}; "
        f"epsilon {calibration.epsilon}; alpha_mc {calibration.alpha_mc}; alpha {args.alpha}; "
        f"guarantee {calibration.guarantee}; method {calibration.method}; groups {calibration.groups}; "
        f"fallback {args.fallback}; seed {args.seed}; device {resolve_device(args.device)}",
        f"surrogate sha256 {calibration.surrogate_sha256}; calibration {args.calibration}",
    ])
    certificates = _run_chunks(
        data, lambda x, idx: hybrid.certify(x, required_radius=args.target_radius, indices=idx),
        HYBRID_CHUNK, not args.no_progress, "certify",
    )
    code = _finish(args, data, certificates, header)
    methods = Counter(c.method for c in certificates)
    print("by method: " + ", ".join(f"{m} {methods[m]}" for m in ("surrogate", "eprocess", "abstain")))
    return code
