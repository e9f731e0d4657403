"""Datagen throughput of the sound noise scheme against the float one, side by side (goal: >= 0.9 x).

For each model of ``SCHEME_CONFIGS`` (the digits CNN, ResNet-18 on CIFAR-sized images, the MNIST MLP
where noise weighs most), the counting engine under ``torch-generator-block256-v2`` (float Gaussian) and
``rounded-gaussian-grid255-v1`` (``sound``), rounds interleaved; see
``surrogate_cert.workflows.throughput.measure_schemes``. Prints JSON.

    python benchmarks/sound_noise_throughput.py [--device cpu|cuda] [--threads 1] [--rounds 5] [--quick]

Run it with ``nice`` on a shared machine; on a CPU with one thread the rates are per second of this
process's CPU time.
"""

from __future__ import annotations

import argparse
import json

import torch

from surrogate_cert.core import __version__
from surrogate_cert.core.smoothing import NOISE_BLOCK, NOISE_SCHEME, NOISE_SCHEME_SOUND, resolve_device
from surrogate_cert.workflows.throughput import SCHEME_CONFIGS, machine_load, measure_schemes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per scheme (median reported)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the images (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    load = machine_load()
    results = [
        measure_schemes(config, device=device, rounds=args.rounds, scale=0.25 if args.quick else 1.0)
        for config in SCHEME_CONFIGS
    ]
    print(
        json.dumps(
            {
                "benchmark": "sound_noise_throughput",
                "package_version": __version__,
                "torch": torch.__version__,
                "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""),
                "threads": torch.get_num_threads(),
                "noise_block": NOISE_BLOCK,
                "schemes": [NOISE_SCHEME, NOISE_SCHEME_SOUND],
                "machine": {"before": load, "after": machine_load()},
                "results": results,
                "not_measured": [] if gpu else ["every model on a GPU: not measured (no device lent)"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
