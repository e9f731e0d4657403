"""Learning from the fallback on a stream of MNIST queries (a configuration of ``workflows.learning_case``).

The pretrained case's base model (every training image seen, cached by content) at sigma 0.5, its
calibration counts, an initial surrogate trained on pools that hold no stream image; a stream of the
test split's 5,000 images (disjoint from the calibration images) through the hybrid with a drift monitor
and an audit of a tenth of the queries, retraining every 1,000 queries on what the fallback sampled and
recalibrating on the stored calibration counts; and a control stream without learning. Prints the JSON.

    python benchmarks/fallback_learning_mnist.py --data-root ../shared/data --workdir pretrained-s050 \\
        --out benchmarks/results/fallback_learning_mnist.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

from surrogate_cert.workflows.learning_case import LEARNING_MNIST, LEARNING_TINY, run_learning_case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder holding MNIST")
    p.add_argument("--workdir", default="surrogate-cert-learning", help="surrogates, pools, query logs")
    p.add_argument("--cache", default=None, help="counts cache folder (default WORKDIR/cache)")
    p.add_argument("--size", choices=("mnist", "tiny"), default="mnist")
    p.add_argument("--stream", type=int, default=None, help="queries in the stream (default 5,000)")
    p.add_argument("--no-control", action="store_true", help="skip the stream without learning")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    lc = LEARNING_TINY if args.size == "tiny" else LEARNING_MNIST
    case = lc.pretrained.case
    if args.data_root:
        case = dataclasses.replace(case, data_root=args.data_root)
    lc = dataclasses.replace(
        lc,
        pretrained=dataclasses.replace(lc.pretrained, case=case),
        **({"stream": args.stream} if args.stream else {}),
        **({"control": False} if args.no_control else {}),
    )
    with contextlib.redirect_stdout(sys.stderr):
        content = run_learning_case(lc, args.workdir, out=args.out, cache_dir=args.cache)
    json.dump(content, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
