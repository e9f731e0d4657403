"""Throughput of the counting engine (goal: >= 0.9 x the raw forward pass of the same model) with each
noise scheme side by side (v3's counter-based noise against v2's generator per block: goal v3 at
least as fast), and, with --world-size N > 1, scaling over N processes (goal: 2 CPU processes x 1
thread >= 1.7 x one). Prints JSON.

    python benchmarks/datagen_throughput.py [--device cpu|cuda] [--world-size N] [--threads T]
        [--amp bf16] [--channels-last] [--compile] [--quick]

The measuring code is ``surrogate_cert.workflows.throughput``; run it with ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json

import torch

from surrogate_cert.core import __version__
from surrogate_cert.core.smoothing import NOISE_BLOCK, NOISE_SCHEME, resolve_device
from surrogate_cert.workflows.throughput import (
    COMPARED_SCHEMES,
    CONFIGS,
    GPU_CONFIGS,
    machine_load,
    measure,
    measure_scaling,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--world-size", type=int, default=1, help="also measure scaling over this many CPU processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="also measure under bfloat16 autocast")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory (default: on with CUDA)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per side (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of the scaling measurement")
    parser.add_argument("--scaling-model", default=CONFIGS[0].name, choices=[c.name for c in CONFIGS])
    parser.add_argument("--scaling-only", action="store_true", help="only the --world-size measurement (to repeat it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    scale = 0.25 if args.quick else 1.0
    load = machine_load()
    settings = dict(
        device=device, rounds=args.rounds, scale=scale, channels_last=args.channels_last, compile=args.compile
    )
    results = []
    for config in () if args.scaling_only else CONFIGS + (GPU_CONFIGS if gpu else ()):
        for amp in (None, "bf16") if args.amp else (None,):
            results.append(measure(config, amp=amp, **settings))
    not_measured = (
        []
        if gpu
        else [f"{c.name} on a GPU (fp32 and bf16): not measured, no CUDA device" for c in CONFIGS + GPU_CONFIGS]
        + ["time to make the MNIST one-pass benchmark's counts on a GPU, v3 against v2: not measured, no CUDA device"]
    )
    scaling = None
    if args.world_size > 1:
        config = next(c for c in CONFIGS if c.name == args.scaling_model)
        scaling = measure_scaling(config, args.world_size, threads=args.threads, repeats=args.repeats, scale=scale)
    print(
        json.dumps(
            {
                "benchmark": "datagen_throughput",
                "package_version": __version__,
                "torch": torch.__version__,
                "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""),
                "threads": torch.get_num_threads(),
                "noise_block": NOISE_BLOCK,
                "noise_scheme": NOISE_SCHEME,
                "compared_schemes": list(COMPARED_SCHEMES),
                "cpu_bf16": _cpu_bf16() if not gpu else None,
                "machine": {"before": load, "after": machine_load()},
                "results": results,
                "not_measured": not_measured,
                "scaling": scaling,
            },
            indent=2,
        )
    )


def _cpu_bf16() -> str:
    """Whether this CPU has native bfloat16 arithmetic (the bf16 rows mean little without it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return "unknown"
    return "avx512_bf16" if "avx512_bf16" in flags else ("amx_bf16" if "amx_bf16" in flags else "none (emulated)")


if __name__ == "__main__":
    main()
