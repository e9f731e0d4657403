"""Pareto benchmark: samples per input against certified accuracy, sequential certifier vs Cohen-n.

A configuration of ``surrogate_cert.workflows.pareto.run_pareto``: on the exact
linear ground truth, on digits (the quickstart's base model and surrogate, made in ``--workdir`` if
absent) and on MNIST (``--mnist-model``, ``--data-root``; ``--mnist-surrogate`` adds the surrogate
rows), certified accuracy at r = sigma, 2 sigma, 3 sigma and ACR against base-model evaluations per
input, for Cohen-n (n = 100 ... 10^5, prefixes of one recorded stream), the sequential certifier in
target mode (KT, truncated prior, class from a pilot / the clean prediction / per class / the
surrogate) and in best-radius mode (tolerance, priced rule at several prices). Writes the JSON
(``--out``) and one PNG per dataset beside it; prints the Markdown tables.

    nice -n 10 python benchmarks/sequential_vs_cohen.py --datasets linear,digits --out pareto.json
    nice -n 10 python benchmarks/sequential_vs_cohen.py --datasets mnist --data-root ../shared/data \\
        --mnist-model BASE_MLP.ts --mnist-limit 500 --out pareto_mnist.json
"""

from __future__ import annotations

import argparse
import sys

from surrogate_cert.workflows.pareto import PARETO_COHEN_N, PARETO_PRICES, ParetoConfig, run_pareto


def _numbers(text: str, kind=float) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="linear,digits", help="comma-separated: linear, digits, mnist")
    p.add_argument("--out", default="pareto.json", help="JSON to write; PNGs go beside it")
    p.add_argument("--workdir", default="surrogate-cert-pareto", help="recordings and the digits offline stage")
    p.add_argument("--cohen-n", default=",".join(map(str, PARETO_COHEN_N)), help="Cohen sample sizes")
    p.add_argument("--prices", default=",".join(map(str, PARETO_PRICES)), help="priced-rule prices (radius / 1000)")
    p.add_argument("--max-samples", type=int, default=10_000, help="sequential budget per input")
    p.add_argument("--linear-points", type=int, default=500)
    p.add_argument("--digits-limit", type=int, default=100)
    p.add_argument("--mnist-limit", type=int, default=500)
    p.add_argument("--mnist-model", default=None, help="MNIST base model (e.g. an MLP, TorchScript)")
    p.add_argument("--mnist-surrogate", default=None, help="surrogate checkpoint for the MNIST surrogate rows")
    p.add_argument(
        "--mnist-counts",
        default=None,
        help="stored MNIST test counts of the same model and seed: checked against the recorded streams",
    )
    p.add_argument("--mnist-cohen-n", default=None, help="Cohen sample sizes on MNIST (default: --cohen-n)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw")
    args = p.parse_args(argv)
    common = dict(cohen_n=_numbers(args.cohen_n, int), prices=_numbers(args.prices), max_samples=args.max_samples)
    configs = []
    for name in args.datasets.split(","):
        if name == "linear":
            configs.append(ParetoConfig(dataset="linear", linear_points=args.linear_points, **common))
        elif name == "digits":
            configs.append(ParetoConfig(dataset="digits", limit=args.digits_limit, **common))
        elif name == "mnist":
            mnist = dict(common, cohen_n=_numbers(args.mnist_cohen_n, int)) if args.mnist_cohen_n else common
            configs.append(
                ParetoConfig(
                    dataset="mnist",
                    limit=args.mnist_limit,
                    model=args.mnist_model,
                    surrogate=args.mnist_surrogate,
                    data_root=args.data_root,
                    reference_counts=args.mnist_counts,
                    **mnist,
                )
            )
        else:
            p.error(f"unknown dataset {name!r}: choose linear, digits, mnist")
    run_pareto(
        args.out,
        configs,
        workdir=args.workdir,
        say=lambda line: print(line, file=sys.stderr, flush=True),
        command="benchmarks/sequential_vs_cohen.py " + " ".join(argv or sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
