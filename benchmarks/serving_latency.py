"""Serving latency of one-pass certification through the Python API (digits small CNN surrogate, CPU).

For each thread setting of ``SurrogateCertifier`` (``threads="auto"``, the default: one intra-op
thread below ``SMALL_BATCH`` images; ``threads=1``; ``threads=None`` with torch's default thread
count), measured side by side in one run on the same certifier and images:

- p50 / p99 / mean wall time of a single-image ``certify`` call (and of ``HybridCertifier.certify``
  with ``fallback="none"``, the deployment entry point);
- throughput (images/s) of ``certify`` at batch sizes 1, 8, 64, 512;
- resident memory (RSS) before and after ``--calls`` single-image calls (default 10^5) with the
  default setting, and their mean latency.

The surrogate and calibration come from the quickstart's reduced offline stage (``--quick`` sizes,
under a minute on 2 cores), made in ``--workdir`` (default: a temporary folder) or reused from it.
Base-model evaluations per call are 0 on this path (one surrogate forward pass). Prints JSON.

    python benchmarks/serving_latency.py [--workdir DIR] [--calls 100000] [--latency-calls 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

DEFAULT_THREADS = torch.get_num_threads()  # before anything in this process changes it

from data_gen.datasets import load_split  # noqa: E402
from surrogate_cert.core import __version__  # noqa: E402
from surrogate_cert.core.one_pass import SMALL_BATCH, SurrogateCertifier  # noqa: E402
from surrogate_cert.deploy.hybrid import HybridCertifier  # noqa: E402
from surrogate_cert.workflows.pipeline import QUICK, Pipeline  # noqa: E402

BATCHES = (1, 8, 64, 512)


def rss_mib() -> float:
    """Resident set size of this process now, MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def latency(call, x: torch.Tensor, calls: int) -> dict:
    """Wall time of ``calls`` calls of ``call`` on one image each (cycling through ``x``), in ms."""
    for i in range(min(200, calls)):
        call(x[i % len(x)].unsqueeze(0))
    times = np.empty(calls)
    for i in range(calls):
        image = x[i % len(x)].unsqueeze(0)
        started = time.perf_counter()
        call(image)
        times[i] = time.perf_counter() - started
    ms = times * 1e3
    return dict(
        calls=calls,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        calls_per_second=float(calls / times.sum()),
    )


def throughput(certifier, x: torch.Tensor, batch: int, min_seconds: float) -> dict:
    """Images per second of ``certifier.certify`` on batches of ``batch`` images (at least ``min_seconds``)."""
    reps = -(-batch // len(x))
    pool = torch.cat([x] * reps)[:batch] if batch > len(x) else None
    certifier.certify(pool if pool is not None else x[:batch])  # warm-up
    done, calls, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or calls < 3:
        lo = (calls * batch) % len(x)
        xb = pool if pool is not None else (x[lo : lo + batch] if lo + batch <= len(x) else x[:batch])
        certifier.certify(xb)
        done += batch
        calls += 1
    seconds = time.perf_counter() - started
    return dict(batch=batch, calls=calls, images_per_second=done / seconds, ms_per_call=1e3 * seconds / calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="offline stage folder, made or reused (default: a temporary one)")
    p.add_argument("--calls", type=int, default=100_000, help="single-image calls of the memory test (default 10^5)")
    p.add_argument("--latency-calls", type=int, default=3000, help="single-image calls per latency measurement")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time per throughput measurement")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or os.path.join(tmp, "offline")
        started = time.perf_counter()
        pipeline = Pipeline(
            workdir,
            QUICK,
            progress=False,
            quiet=True,
            command="benchmarks/serving_latency.py",
            total_stages=5,
            resume=True,
        )
        pipeline.offline()
        offline_seconds = time.perf_counter() - started
        paths = pipeline.paths
        hybrid = HybridCertifier.load(paths["surrogate.pt"], paths["calibration.json"], fallback="none", device="cpu")
        x = load_split("digits", "test").x

    surrogate, calibration = hybrid.surrogate, hybrid.calibration
    settings = {"auto (default)": "auto", "1 thread": 1, f"torch default ({DEFAULT_THREADS} threads)": None}
    results = {}
    for label, threads in settings.items():
        torch.set_num_threads(DEFAULT_THREADS)
        certifier = SurrogateCertifier(surrogate, calibration, threads=threads)
        deploy = HybridCertifier(certifier, None)
        results[label] = dict(
            threads=threads,
            single_image=latency(certifier.certify, x, args.latency_calls),
            single_image_hybrid_entry=latency(deploy.certify, x, args.latency_calls),
            throughput={str(b): throughput(certifier, x, b, args.min_seconds) for b in BATCHES},
        )

    torch.set_num_threads(DEFAULT_THREADS)
    certifier = SurrogateCertifier(surrogate, calibration)
    certifier.certify(x[:1])
    rss_before = rss_mib()
    started = time.perf_counter()
    for i in range(args.calls):
        certifier.certify(x[i % len(x)].unsqueeze(0))
    seconds = time.perf_counter() - started
    rss_after = rss_mib()

    default = results["auto (default)"]
    torch_default = results[f"torch default ({DEFAULT_THREADS} threads)"]
    content = dict(
        setup=dict(
            model=f"{surrogate.arch} surrogate, digits {tuple(surrogate.input_shape)}, "
            f"{sum(t.numel() for t in surrogate.model.parameters()):,} parameters",
            device="cpu",
            cpu_count=os.cpu_count(),
            torch_default_threads=DEFAULT_THREADS,
            small_batch=SMALL_BATCH,
            offline_stage_seconds=offline_seconds,
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
            versions=dict(
                surrogate_cert=__version__,
                torch=torch.__version__,
                numpy=np.__version__,
                python=platform.python_version(),
            ),
            base_model_evaluations_per_call=0,
        ),
        settings=results,
        memory=dict(
            calls=args.calls,
            rss_before_mib=rss_before,
            rss_after_mib=rss_after,
            growth_mib=rss_after - rss_before,
            mean_ms_per_call=1e3 * seconds / args.calls,
        ),
        targets=dict(
            p50_single_image_ms_at_most=1.0,
            met_p50=default["single_image"]["p50_ms"] <= 1.0,
            no_rss_growth=rss_after - rss_before < 5.0,
        ),
        ratios=dict(
            single_image_p50_torch_default_over_auto=torch_default["single_image"]["p50_ms"]
            / default["single_image"]["p50_ms"],
            **{
                f"throughput_auto_over_torch_default_batch_{b}": default["throughput"][str(b)]["images_per_second"]
                / torch_default["throughput"][str(b)]["images_per_second"]
                for b in BATCHES
            },
        ),
    )
    json.dump(content, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
