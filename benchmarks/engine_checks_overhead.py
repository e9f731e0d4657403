"""What the counting engine's own checks cost: non-finite logits counted on the device per batch, and the
row sums of counts compared with n once per call (docs/security.md). Prints JSON.

    python benchmarks/engine_checks_overhead.py [--device cpu|cuda] [--rounds 7] [--samples 4000]

The same ``SmoothedClassifier`` is timed side by side, interleaved, with the checks and with them
switched off (the per-batch accumulator skipped, the result copied without the final comparison);
both must return the same counts. Run it with ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from surrogate_cert.core import __version__
from surrogate_cert.core.architectures import build
from surrogate_cert.core.smoothing import SmoothedClassifier, resolve_device


def _unchecked(model, device, batch_size: int) -> SmoothedClassifier:
    smooth = SmoothedClassifier(model, 10, 0.25, device=device, batch_size=batch_size)
    predict = SmoothedClassifier.predict_labels
    smooth.predict_labels = lambda x, nonfinite=None: predict(smooth, x, None)
    smooth._checked_result = lambda table, totals, nonfinite: table.cpu().numpy()
    return smooth


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per side (median reported)")
    parser.add_argument("--samples", type=int, default=4000, help="noisy samples per image (8 images per call)")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build("small_cnn", (1, 8, 8), 10).eval()
    x = torch.rand(8, 1, 8, 8)
    sides = {
        "checked": SmoothedClassifier(model, 10, 0.25, device=device, batch_size=args.batch_size),
        "unchecked": _unchecked(model, device, args.batch_size),
    }
    assert np.array_equal(sides["checked"].counts(x, args.samples), sides["unchecked"].counts(x, args.samples))
    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in ("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked"):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            sides[name].counts(x, args.samples)
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "engine_checks_overhead",
                "package_version": __version__,
                "torch": torch.__version__,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "model": "small_cnn, digits shape 1x8x8, 10 classes",
                "samples_per_call": 8 * args.samples,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "median_seconds": median,
                "checked_over_unchecked": median["checked"] / median["unchecked"],
                "seconds": times,
                "load_average_1min_at_end": os.getloadavg()[0],
                "note": "a ratio near 1 within the spread of the rounds: the checks cost nothing measurable here",
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
