"""Throughput of the counting engine against the raw forward pass of the same model (same batch
size, device and run): ``ratio`` = engine samples/s / forward samples/s (goal: >= 0.9). Prints JSON.

    python benchmarks/datagen_throughput.py [--device auto|cpu|cuda] [--amp bf16] [--quick]
"""
from __future__ import annotations

import argparse
import json

import torch

from surrogate_cert.core import __version__
from surrogate_cert.core.smoothing import NOISE_BLOCK, resolve_device
from surrogate_cert.workflows.throughput import CONFIGS, measure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per side (median reported)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    quick = 0.25 if args.quick else 1.0
    pick = int(gpu)
    results = [measure(name, arch, shape, k, device=device, amp=args.amp, batch_size=bs[pick],
                       n=n if isinstance(n, int) else n[pick], images=int(m[pick] * quick) or 1, rounds=args.rounds)
               for name, arch, shape, k, bs, n, m in CONFIGS]
    print(json.dumps({
        "benchmark": "datagen_throughput",
        "package_version": __version__,
        "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""),
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "noise_block": NOISE_BLOCK,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
