"""Target mode's decision "is p >= Phi(r*/sigma)?" against the published sequential test (Voracek, NeurIPS 2024).

A configuration of ``surrogate_cert.workflows.give_up.run_give_up``: on the same Bernoulli streams, the
samples each test needs to decide, on the certify side (p >= p0) and on the reject side (p < p0), at
alpha = 0.001 and a common cap of 10^5 samples; for a grid of p around r* = 1, 2, 3 sigma and for the p of
real inputs (``--counts NAME=FILE``: each row's majority-class frequency, e.g. MNIST test counts at 10^4
samples). Ours: ``EProcessCertifier`` in target mode with the dedicated give-up test (default) and with
version 0.3's mixture rule. The published test is implemented from its description; ``--published-code DIR``
takes its thresholds from the authors' repository instead (``thresholds.get_thresholds``; read from DIR,
never copied), as a cross-check. Prints the JSON (``--out`` also writes it).

    python benchmarks/give_up_vs_voracek.py --out benchmarks/results/give_up_vs_voracek.json \\
        --counts mnist_s050=test-s050.h5 --counts mnist_s025=test-s025.h5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

import numpy as np

from data_gen.store import read_counts
from surrogate_cert.core.files import check_outputs, write_text_atomic
from surrogate_cert.workflows.bench import json_safe
from surrogate_cert.workflows.give_up import GiveUpConfig, run_give_up


def published_from_code(folder: str):
    """Thresholds from the authors' ``thresholds.get_thresholds(p, alpha, n)``, as ``(reject, certify)`` arrays."""
    spec = importlib.util.spec_from_file_location("published_thresholds", f"{folder}/thresholds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def thresholds(p0: float, alpha: float, cap: int):
        reject, certify = module.get_thresholds(p=p0, alpha=alpha, n=cap + 1)
        return np.asarray(reject, dtype=np.int64), np.asarray(certify, dtype=np.int64)

    return thresholds


def real_inputs(specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        counts = read_counts(path)
        out[name] = counts.counts.max(axis=1) / counts.n
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--counts",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="real inputs: a counts file whose rows' majority-class frequencies are the p of the streams",
    )
    p.add_argument("--published-code", default=None, metavar="DIR", help="the authors' repository (a cross-check)")
    p.add_argument("--runs", type=int, default=None, help="streams per grid point (default 200)")
    p.add_argument("--cap", type=int, default=None, help="common sample cap (default 100,000)")
    args = p.parse_args(argv)
    if args.out:
        check_outputs([args.out], overwrite=True)
    changes = {k: v for k, v in dict(runs=args.runs, cap=args.cap).items() if v is not None}
    cfg = dataclasses.replace(GiveUpConfig(), **changes)
    published = published_from_code(args.published_code) if args.published_code else None
    content = run_give_up(cfg, real_inputs(args.counts), published, say=lambda m: print(m, file=sys.stderr, flush=True))
    content["published_thresholds"] = "the authors' code" if published else "implemented from the paper's description"
    content["command"] = "python benchmarks/give_up_vs_voracek.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = json.dumps(json_safe(content), indent=2, allow_nan=False)
    if args.out:
        write_text_atomic(args.out, text, overwrite=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
