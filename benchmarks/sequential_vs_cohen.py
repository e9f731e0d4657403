"""Sequential E-process certifier vs Cohen et al.'s fixed-sample certifier, side by side, in one run.

Methods on the same inputs (digits test split by default): Cohen-10k, Cohen-1k, sequential with the
KT prior (best-radius policy, budget 10_000) and sequential with target radius = sigma. For each:
certified accuracy at radii 0, 0.25, 0.5, 0.75, average certified radius (ACR), mean base-model
evaluations per input over all inputs / certified inputs / the rest ("certified" = a correct
certificate, as in the seed-001 tables), wall time, and the share of wall time spent inside the
base model's forward pass. Prints JSON on stdout and the Markdown table on stderr.

    python benchmarks/sequential_vs_cohen.py --limit 100
    python benchmarks/sequential_vs_cohen.py --model base.pt --split test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from surrogate_cert import __version__
from surrogate_cert.cohen import CohenCertifier
from surrogate_cert.sequential import EProcessCertifier
from surrogate_cert.smoothing import SmoothedClassifier

RADII = (0.0, 0.25, 0.5, 0.75)


class TimedForward(nn.Module):
    """Wraps a model and adds up the wall time spent inside its forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        tick = time.perf_counter()
        out = self.model(x)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - tick
        return out


def summarise(name: str, certs, labels: np.ndarray, wall: float, forward: float) -> dict:
    pred = np.array([c.prediction for c in certs])
    radius = np.array([c.radius for c in certs])
    samples = np.array([c.n_samples for c in certs], dtype=float)
    correct = (pred == labels) & (pred >= 0)
    certified = correct & (radius > 0)

    def mean(values):
        return float(values.mean()) if len(values) else float("nan")

    return {
        "method": name,
        "certified_accuracy": {f"{r:g}": float(np.mean(correct & (radius >= r))) for r in RADII},
        "acr": float(np.mean(np.where(correct, radius, 0.0))),
        "abstain_rate": float(np.mean(pred < 0)),
        "mean_samples": mean(samples),
        "mean_samples_certified": mean(samples[certified]),
        "mean_samples_rest": mean(samples[~certified]),
        "wall_seconds": wall,
        "seconds_per_input": wall / len(certs),
        "forward_share": forward / wall if wall > 0 else float("nan"),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| method | " + " | ".join(f"cert. acc. r={r:g}" for r in RADII)
            + " | ACR | samples (all) | samples (certified) | samples (rest) | wall s | forward share |")
    lines = [head, "|" + " --- |" * (len(RADII) + 7)]
    for r in rows:
        acc = " | ".join(f"{100 * v:.1f}%" for v in r["certified_accuracy"].values())
        lines.append(
            f"| {r['method']} | {acc} | {r['acr']:.3f} | {r['mean_samples']:.1f} | {r['mean_samples_certified']:.1f} "
            f"| {r['mean_samples_rest']:.1f} | {r['wall_seconds']:.1f} | {100 * r['forward_share']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: train the digits base model now)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sigma", type=float, default=None, help="default: the model's own sigma, else 0.25")
    parser.add_argument("--limit", type=int, default=None, help="first N inputs of the split (quick runs)")
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--tolerance", type=float, default=None, help="best-radius tolerance (default: certifier's)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="cohen-10k,cohen-1k,sequential-kt,sequential-target",
                        help="comma-separated subset to run")
    parser.add_argument("--extra-tolerances", default="0.25",
                        help="comma-separated best-radius tolerances for extra KT rows (the cost/radius trade-off)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from data_gen.datasets import load_split
    from data_gen.models import load_model, train_base

    data = load_split(args.dataset, args.split, limit=args.limit)
    model_path = args.model
    if model_path is None:
        model_path = os.path.join(tempfile.mkdtemp(prefix="bench-"), "base.pt")
        train_base(args.dataset, sigma=args.sigma or 0.25, out=model_path, device=args.device, progress=False)
    loaded = load_model(model_path, device=args.device, num_classes=data.num_classes)
    sigma = args.sigma or loaded.sigma or 0.25
    timed = TimedForward(loaded.model)
    smooth = SmoothedClassifier(timed, data.num_classes, sigma, device=args.device, batch_size=args.batch_size)
    labels = data.y.numpy()
    seq_kwargs = {} if args.tolerance is None else {"tolerance": args.tolerance}

    methods = {
        "cohen-10k": lambda: CohenCertifier(smooth).certify(data.x, n0=100, n=10_000, alpha=args.alpha,
                                                            indices=data.indices),
        "cohen-1k": lambda: CohenCertifier(smooth).certify(data.x, n0=100, n=1_000, alpha=args.alpha,
                                                           indices=data.indices),
        "sequential-kt": lambda: EProcessCertifier(smooth, args.alpha, max_samples=10_000, **seq_kwargs).certify(
            data.x, indices=data.indices),
        "sequential-target": lambda: EProcessCertifier(
            smooth, args.alpha, policy="target_radius", target_radius=sigma, max_samples=10_000).certify(
            data.x, indices=data.indices),
    }
    names = args.methods.split(",")
    for tol in filter(None, args.extra_tolerances.split(",")):
        names.append(f"sequential-kt-tol{float(tol):g}")
        methods[names[-1]] = (lambda tol: lambda: EProcessCertifier(
            smooth, args.alpha, max_samples=10_000, tolerance=tol).certify(data.x, indices=data.indices))(float(tol))
    rows = []
    for name in names:
        timed.seconds = 0.0
        started = time.perf_counter()
        certs = methods[name]()
        wall = time.perf_counter() - started
        rows.append(summarise(name, certs, labels, wall, timed.seconds))
        print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)

    by_name = {r["method"]: r for r in rows}
    comparison = {}
    if "cohen-10k" in by_name and "sequential-kt" in by_name:
        ref, kt = by_name["cohen-10k"], by_name["sequential-kt"]
        deltas = {r: kt["certified_accuracy"][r] - ref["certified_accuracy"][r] for r in ref["certified_accuracy"]}
        comparison = {
            "kt_samples_over_cohen10k": kt["mean_samples"] / ref["mean_samples"],
            "kt_minus_cohen10k_certified_accuracy_pp": {r: 100 * d for r, d in deltas.items()},
            "goal_samples_at_most_one_tenth": kt["mean_samples"] <= ref["mean_samples"] / 10,
            "goal_accuracy_within_1.5pp": all(abs(d) <= 0.015 for d in deltas.values()),
            "goal_forward_share_at_least_80pct": kt["forward_share"] >= 0.8,
        }
    table = markdown(rows)
    result = {
        "benchmark": "sequential_vs_cohen",
        "version": __version__,
        "dataset": args.dataset,
        "split": args.split,
        "inputs": len(data),
        "sigma": sigma,
        "alpha": args.alpha,
        "device": str(smooth.device),
        "torch_threads": torch.get_num_threads(),
        "methods": rows,
        "comparison": comparison,
        "markdown": table,
    }
    print(table, file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
