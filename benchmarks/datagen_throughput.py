"""Throughput of the counting engine against the raw forward pass of the same model (same batch
size, same device, same run): how much the engine's noise generation, packing and counting cost.

Prints JSON. ``ratio`` = engine samples/s / forward samples/s (goal: >= 0.9). Timings interleave
engine and forward rounds and take the median round, so a noisy shared machine affects both alike.

    python benchmarks/datagen_throughput.py [--device auto|cpu|cuda] [--amp bf16] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

import surrogate_cert
from surrogate_cert.architectures import build
from surrogate_cert.smoothing import NOISE_BLOCK, SmoothedClassifier, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, arch: str, input_shape, num_classes: int, *, device, amp, batch_size: int, n: int,
            images: int, rounds: int) -> dict:
    """Median-round samples/s of (a) ``SmoothedClassifier.counts`` on ``images`` inputs x ``n`` samples,
    (b) ``argmax model(x)`` on the same number of samples in batches of ``batch_size``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(arch, input_shape, num_classes)
    smooth = SmoothedClassifier(model, num_classes, 0.25, device=device, batch_size=batch_size, amp=amp, seed=0)
    x = torch.rand(images, *input_shape)
    samples = images * n
    batch = torch.rand(batch_size, *input_shape, device=smooth.device)
    full, rest = divmod(samples, batch_size)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if smooth.amp == "bf16"
                else contextlib.nullcontext())

    def engine() -> float:
        _sync(smooth.device)
        start = time.perf_counter()
        smooth.counts(x, n, indices=torch.arange(images).numpy())
        _sync(smooth.device)
        return time.perf_counter() - start

    def forward() -> float:
        _sync(smooth.device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            for _ in range(full):
                smooth.model(batch).argmax(dim=1)
            if rest:
                smooth.model(batch[:rest]).argmax(dim=1)
        _sync(smooth.device)
        return time.perf_counter() - start

    smooth.counts(x[:1], min(n, batch_size))  # warm-up: kernels, allocator, width check
    forward()
    engine_times, forward_times = [], []
    for _ in range(rounds):
        engine_times.append(engine())
        forward_times.append(forward())
    engine_rate = samples / statistics.median(engine_times)
    forward_rate = samples / statistics.median(forward_times)
    return {
        "model": name,
        "input_shape": list(input_shape),
        "batch_size": batch_size,
        "images": images,
        "samples_per_image": n,
        "base_model_evaluations_per_image": n,
        "rounds": rounds,
        "engine_samples_per_s": round(engine_rate, 1),
        "forward_samples_per_s": round(forward_rate, 1),
        "ratio": round(engine_rate / forward_rate, 3),
        "engine_seconds_per_round": round(statistics.median(engine_times), 4),
        "goal_ratio": 0.9,
    }


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
    configs = [
        # (name, arch, input shape, classes, batch size, n per image, images)
        ("digits_small_cnn", "small_cnn", (1, 8, 8), 10, 1000, 1000, int((400 if gpu else 40) * quick) or 1),
        ("resnet18_cifar", "resnet18", (3, 32, 32), 10, 1000 if gpu else 64, 1000 if gpu else 256,
         int((100 if gpu else 2) * quick) or 1),
    ]
    results = [measure(name, arch, shape, k, device=device, amp=args.amp, batch_size=bs, n=n, images=m,
                       rounds=args.rounds)
               for name, arch, shape, k, bs, n, m in configs]
    print(json.dumps({
        "benchmark": "datagen_throughput",
        "package_version": surrogate_cert.__version__,
        "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""),
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "noise_block": NOISE_BLOCK,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
