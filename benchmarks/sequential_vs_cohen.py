"""Sequential E-process certifier vs Cohen et al.'s fixed-sample certifier, side by side, one run.

A configuration of the bench harness (``surrogate_cert.workflows.bench``): Cohen-10k, Cohen-1k,
the sequential certifier with the KT prior (best-radius policy, budget 10,000, and extra
tolerances) and in target-radius mode at r* = sigma, on the same digits test images and noise, plus
each method's wrong certificates on the exact linear problem. Prints the JSON on stdout.

    python benchmarks/sequential_vs_cohen.py --limit 100
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
    p.add_argument("--limit", type=int, default=None, help="test images (default 100; 0 = all 397)")
    p.add_argument("--extra-tolerances", default="0.25",
                   help="comma-separated best-radius tolerances for extra KT rows (the cost / radius trade-off)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    base = BENCH_QUICK if args.quick else BENCH_FULL
    limit = base.test_limit if args.limit is None else (args.limit or None)
    config = dataclasses.replace(
        base, methods=("cohen_10k", "cohen_1k", "sequential_kt", "sequential_target"), test_limit=limit,
        extra_tolerances=tuple(float(t) for t in args.extra_tolerances.split(",") if t))
    content = run_bench(args.out, config, workdir=args.workdir, quiet=True, progress=False,
                        command="benchmarks/sequential_vs_cohen.py " + " ".join(argv or sys.argv[1:]))
    json.dump(content, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
