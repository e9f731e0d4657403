"""Throughput of the counting engine against the raw forward pass of the same model: the same batch
size, device and run, so the ratio measures what noise generation, packing and counting cost.

``measure`` interleaves engine and forward rounds and takes the median round, so a noisy shared
machine affects both alike. ``benchmarks/datagen_throughput.py`` is its command line.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch

from ..core.architectures import build
from ..core.smoothing import SmoothedClassifier

__all__ = ["measure", "CONFIGS"]

CONFIGS = (
    # (name, arch, input shape, classes, batch size on cpu / gpu, n per image, images on cpu / gpu)
    ("digits_small_cnn", "small_cnn", (1, 8, 8), 10, (1000, 1000), 1000, (40, 400)),
    ("resnet18_cifar", "resnet18", (3, 32, 32), 10, (64, 1000), (256, 1000), (2, 100)),
)
"""The models the benchmark measures; sizes keep one CPU round to a few seconds."""


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
        smooth.counts(x, n, indices=np.arange(images))
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
