"""Hybrid (calibrated surrogate + sequential fallback) vs Cohen-10k on the digits test split, one run.

A configuration of the bench harness (``surrogate_cert.workflows.bench``): Cohen-10k, the surrogate
alone and the hybrid on the same test images and noise, the surrogate prior against KT on the
hybrid's fallback inputs, and (``--triage``) the hybrid asked for radius r = 0.25, 0.5, 0.75.
The offline stage lives in ``--workdir`` and is reused when present. Prints the JSON on stdout.

    python benchmarks/hybrid_vs_cohen.py --quick
    python benchmarks/hybrid_vs_cohen.py --workdir surrogate-cert-quickstart --triage
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from surrogate_cert.workflows.bench import BENCH_FULL, BENCH_QUICK, run_bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small offline stage and 10 test images")
    p.add_argument("--workdir", default=None, help="offline stage folder (default: the quickstart's)")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 397; quick: 10)")
    p.add_argument("--triage", action="store_true", help="also the hybrid asked for r = 0.25, 0.5, 0.75")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    base = BENCH_QUICK if args.quick else BENCH_FULL
    config = dataclasses.replace(
        base,
        methods=("cohen_10k", "surrogate", "hybrid"),
        prior_comparison=True,
        test_limit=args.limit if args.limit else (base.test_limit if args.quick else None),
        triage_radii=(0.25, 0.5, 0.75) if args.triage else (),
        linear_points=base.linear_points,
    )
    content = run_bench(
        args.out,
        config,
        workdir=args.workdir,
        quiet=True,
        progress=False,
        command="benchmarks/hybrid_vs_cohen.py " + " ".join(argv or sys.argv[1:]),
    )
    json.dump(content, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
