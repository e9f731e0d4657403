"""The quickstart's counting processes with glibc's default allocator settings and with
``workflows.pipeline.MALLOC_SETTINGS``, side by side in one run (interleaved, twice each).

Each round counts the first ``--limit`` cal images of digits x 10^4 samples with ``--workers``
processes (one thread each), the quickstart's base model from ``--workdir``; reported: wall time,
the workers' user and system CPU seconds and their minor page faults. Prints JSON.

    python benchmarks/worker_allocator.py --workdir surrogate-cert-quickstart [--limit 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time

from surrogate_cert.workflows import pipeline
from surrogate_cert.workflows.pipeline import FULL


def one_round(settings: dict, base: str, out: str, limit: int, workers: int) -> dict:
    pipeline.MALLOC_SETTINGS = settings
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    job = dict(split="cal", n=10_000, n0=0, limit=limit, out=out, resume=False)
    pipeline._spawn_counts(dataclasses.replace(FULL, device="cpu"), [job], base, workers, False, "benchmark")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(out)
    return dict(
        wall_s=round(wall, 1),
        user_s=round(after.ru_utime - before.ru_utime, 1),
        sys_s=round(after.ru_stime - before.ru_stime, 1),
        minor_faults=after.ru_minflt - before.ru_minflt,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="surrogate-cert-quickstart")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tuned = dict(pipeline.MALLOC_SETTINGS)
    base, out = os.path.join(args.workdir, "base.pt"), os.path.join(args.workdir, "allocator-benchmark.h5")
    rounds = []
    for label, settings in (("default", {}), ("tuned", tuned), ("default", {}), ("tuned", tuned)):
        rounds.append(dict(allocator=label, **one_round(settings, base, out, args.limit, args.workers)))
    print(
        json.dumps(
            dict(
                settings=tuned,
                images=args.limit,
                samples_per_image=10_000,
                workers=args.workers,
                rounds=rounds,
                load_average=os.getloadavg(),
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
