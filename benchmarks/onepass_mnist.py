"""One-pass certificates on real data (issue 10): Cohen-10k, one-pass, hybrid and required-radius mode.

A configuration of ``surrogate_cert.workflows.onepass_case.run_onepass``: the base model (built in,
``train-base --arch mlp``, or ``--model`` your own), counts of the surrogate / cal / test splits cached by
content in ``--cache`` (dataset, split, model hash, sigma, n, n0, seed, limit; ``--reuse DIR`` copies
matching files from elsewhere, never writing there), the surrogate started from the base model and
trained on the surrogate split, every calibration scheme at epsilon 0.01 and 0.05, the issued guarantee
(``calibrate --guarantee issued``: P(wrong | certified) <= epsilon + alpha_mc) beside the marginal rule
(JSON ``issued``), the frontier, the lever controls. Prints the JSON on stdout (and the tables on
stderr); ``--out`` also writes it.

    python benchmarks/onepass_mnist.py --data-root ../shared/data --workdir onepass-mnist --out mnist.json
    python benchmarks/onepass_mnist.py --dataset digits --workdir onepass-digits --out digits.json
    python benchmarks/onepass_mnist.py --size gpu --device cuda --data-root DATA ...   # the full size
    python benchmarks/onepass_mnist.py --noise-scheme sound --cache CACHE ...   # the sound scheme (same base model)

``--case pretrained`` runs the case of a model that saw every training image (``workflows.pretrained_case``):
the base model trained by the benchmark on all training images (cached by content), surrogates trained on
unlabeled pools (augmented training images, the test split beyond the evaluated images) beside the images
the base model saw, the hybrid refining best radii, required radius; ``--sigma`` sets the noise level.

    python benchmarks/onepass_mnist.py --case pretrained --sigma 0.5 --data-root ../shared/data \
        --workdir pretrained-s050 --out benchmarks/results/onepass_mnist_pretrained_s050.json

Sizes: ``cpu`` (default for MNIST: 10,000 surrogate-split images x 100, 5,000 cal x 10^4, 500 test
x (100 + 10^4); under 45 minutes end to end on 2 idle CPU cores, with torch at one thread on a busy
machine: ``OMP_NUM_THREADS=1``), ``gpu`` (every test image, the train split's counts too, calibration
counts topped up to 10^5), ``digits`` (the embedded set; default with ``--dataset digits``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

from surrogate_cert.workflows.onepass_case import (
    ONEPASS_DIGITS,
    ONEPASS_MNIST_CPU,
    ONEPASS_MNIST_GPU,
    ONEPASS_TINY,
    run_onepass,
)
from surrogate_cert.workflows.pretrained_case import PRETRAINED_MNIST, PRETRAINED_TINY, run_pretrained

SIZES = {"cpu": ONEPASS_MNIST_CPU, "gpu": ONEPASS_MNIST_GPU, "digits": ONEPASS_DIGITS, "tiny": ONEPASS_TINY}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="mnist (default) or digits")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="cpu (MNIST default), gpu, digits, tiny")
    p.add_argument("--data-root", default=None, help="folder holding MNIST (e.g. ../shared/data)")
    p.add_argument("--model", default=None, help="your own base model instead of train-base (any --model spec)")
    p.add_argument("--workdir", default="surrogate-cert-onepass", help="surrogates and calibrations go here")
    p.add_argument("--cache", default=None, help="counts cache folder (default WORKDIR/cache)")
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="DIR",
        help="also look for matching counts files here (copied into the cache, never written)",
    )
    p.add_argument("--test-limit", type=int, default=None, help="test images (0 = all)")
    p.add_argument("--epsilons", default=None, help="comma-separated, e.g. 0.01,0.05")
    p.add_argument("--frontier-images", default=None, help="comma-separated surrogate-split sizes to retrain on")
    p.add_argument("--no-controls", action="store_true", help="skip the lever controls")
    p.add_argument("--cal-topup", type=int, default=None, help="top the cal counts up by N samples (0 = none)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument(
        "--noise-scheme",
        default=None,
        help="noise of every count and fallback sample: the float default, or sound (the Gaussian rounded "
        "to the 1/255 grid, drawn exactly); share --cache between the two: the base model is reused",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--case",
        choices=("project", "pretrained"),
        default="project",
        help="project (default): the base model never saw the surrogate split; pretrained: it saw every "
        "training image, the surrogate learns from unlabeled pools",
    )
    p.add_argument("--sigma", type=float, default=None, help="noise level (default 0.25)")
    p.add_argument(
        "--noise-seed",
        type=int,
        default=None,
        help="seed of the counts' and the fallback's noise only (base model and surrogate training keep 0): "
        "two runs differing here measure the Monte Carlo noise floor",
    )
    args = p.parse_args(argv)
    if args.case == "pretrained":
        return run_pretrained_case(args)
    cfg = SIZES[args.size or ("digits" if args.dataset == "digits" else "cpu")]
    changes = dict(dataset=args.dataset if args.size != "tiny" else cfg.dataset)
    for name, value in (
        ("data_root", args.data_root),
        ("model", args.model),
        ("device", args.device),
        ("cal_topup", args.cal_topup),
        ("noise_scheme", args.noise_scheme),
        ("noise_seed", args.noise_seed),
    ):
        if value is not None:
            changes[name] = value
    if args.test_limit is not None:
        changes["test_limit"] = args.test_limit or None
    if args.epsilons:
        changes["epsilons"] = tuple(float(e) for e in args.epsilons.split(","))
    if args.frontier_images is not None:
        changes["frontier_images"] = tuple(int(v) for v in args.frontier_images.split(",") if v)
    if args.no_controls:
        changes["controls"] = False
    if args.sigma is not None:
        changes["sigma"] = args.sigma
    cfg = dataclasses.replace(cfg, **changes)
    with contextlib.redirect_stdout(sys.stderr):
        content = run_onepass(cfg, args.workdir, out=args.out, cache_dir=args.cache, extra_cache_dirs=args.reuse)
    json.dump(content, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


def run_pretrained_case(args) -> int:
    pcfg = PRETRAINED_TINY if args.size == "tiny" else PRETRAINED_MNIST
    changes = {
        k: v for k, v in dict(data_root=args.data_root, device=args.device, sigma=args.sigma).items() if v is not None
    }
    if args.test_limit is not None:
        changes["test_limit"] = args.test_limit or None
    pcfg = dataclasses.replace(pcfg, case=dataclasses.replace(pcfg.case, **changes))
    with contextlib.redirect_stdout(sys.stderr):
        content = run_pretrained(pcfg, args.workdir, out=args.out, cache_dir=args.cache, extra_cache_dirs=args.reuse)
    json.dump(content, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
