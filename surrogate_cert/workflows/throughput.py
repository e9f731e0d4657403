"""Throughput of the counting engine: against the raw forward pass of the same model, against
unseeded noise, and across processes.

- ``measure``: engine samples/s against ``argmax model(x)`` on the same number of samples at the same
  batch size, device and settings (``ratio``, goal >= 0.9), for each seeded noise scheme side by side
  (v2's generator per block, v3's counter-based Philox, v1's) and against the same engine drawing
  unseeded noise, end to end and with a model that costs nothing (so only noise, packing and
  counting are left); ``v3_vs_v2`` is the speed of v3 over v2 (goal >= 1). Rounds are interleaved
  and the median round is reported, so a noisy shared machine affects every side alike; on a CPU
  with one thread the rates are per second of this process's CPU time (the wall clock of a shared
  machine mostly measures the other jobs), and the wall-clock figures are reported beside them.
- ``measure_schemes``: the engine under the float scheme and under the sound one (``NOISE_SCHEME_SOUND``),
  same model, images (on the 1/255 grid) and batches, rounds interleaved: what exact sampling costs.
- ``measure_scaling``: ``W`` processes counting at once (``threads`` each, as ``torchrun`` shards a
  job) against one process with the same threads, from a common start: ``efficiency =
  throughput(W) / (W x throughput(1))``, repeated, one-process and W-process runs alternating; with
  each process's CPU time, to tell processes slowing each other from cores held by other jobs.

``benchmarks/datagen_throughput.py`` is the command line.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.architectures import build
from ..core.smoothing import (
    NOISE_SCHEME,
    NOISE_SCHEME_SOUND,
    NOISE_SCHEME_V1,
    NOISE_SCHEME_V2,
    NOISE_SCHEME_V3,
    NOISE_UNSEEDED,
    SmoothedClassifier,
)

__all__ = [
    "measure",
    "measure_scaling",
    "measure_schemes",
    "BenchModel",
    "CONFIGS",
    "GPU_CONFIGS",
    "SCHEME_CONFIGS",
    "COMPARED_SCHEMES",
    "machine_load",
]


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: architecture, input shape, classes, and sizes per device type."""

    name: str
    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: dict
    samples_per_image: dict
    images: dict


CONFIGS = (
    BenchModel(
        "digits_small_cnn",
        "small_cnn",
        (1, 8, 8),
        10,
        {"cpu": 1000, "cuda": 8192},
        {"cpu": 1000, "cuda": 10_000},
        {"cpu": 40, "cuda": 400},
    ),
    BenchModel(
        "resnet18_cifar",
        "resnet18",
        (3, 32, 32),
        10,
        {"cpu": 64, "cuda": 4096},
        {"cpu": 256, "cuda": 10_000},
        {"cpu": 2, "cuda": 40},
    ),
)
"""The models measured on every device; sizes keep one CPU round to a few seconds."""

GPU_CONFIGS = (
    BenchModel("resnet50_imagenet", "resnet50", (3, 224, 224), 1000, {"cuda": 512}, {"cuda": 2048}, {"cuda": 8}),
)
"""Measured on CUDA only (a CPU round would take minutes); reported as not measured elsewhere."""


SCHEME_CONFIGS = CONFIGS + (
    BenchModel(
        "mnist_mlp",
        "mlp",
        (1, 28, 28),
        10,
        {"cpu": 4096, "cuda": 65_536},
        {"cpu": 4096, "cuda": 65_536},
        {"cpu": 8, "cuda": 64},
    ),
)
"""The models of ``measure_schemes``: the MNIST MLP (784 pixels, 12 us a sample on one CPU thread) is where
drawing the noise weighs most against the forward pass."""

NOISE_ONLY_SECONDS = 0.5
"""Least duration of one noise-only round (the work is repeated up to it)."""
NOISE_ONLY_ROUNDS = 15
"""Noise-only rounds are short: more of them."""


class _NullModel(nn.Module):
    """Costs (almost) nothing: what remains of the engine's time is noise, packing and counting."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], self.num_classes))


def _model(arch: str, input_shape, num_classes: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "resnet50":
            import torchvision  # a benchmark-only architecture, not one the package trains

            return torchvision.models.resnet50(weights=None, num_classes=num_classes)
        return build(arch, input_shape, num_classes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``work()``."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    work()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def machine_load() -> dict:
    """The machine's load while measuring: 1-minute load average and CPU count."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"load_average_1min": round(load, 2), "cpu_count": os.cpu_count()}


COMPARED_SCHEMES = (NOISE_SCHEME_V2, NOISE_SCHEME_V3, NOISE_SCHEME_V1)
"""The seeded noise schemes every ``measure`` times side by side (with unseeded noise as the floor)."""


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def measure(
    config: BenchModel,
    *,
    device,
    amp: str | None = None,
    rounds: int = 3,
    scale: float = 1.0,
    channels_last: bool | None = None,
    compile: bool = False,
) -> dict:
    """Median-round samples/s of the engine (per noise scheme) and of the raw forward pass, side by side.

    Parameters
    ----------
    config : BenchModel
        The model and its sizes (the entries of ``device``'s type).
    device : str or torch.device
        Where to run.
    amp : {None, "bf16"}, optional
        bfloat16 autocast, on both sides.
    rounds : int, optional
        Interleaved timing rounds per side.
    scale : float, optional
        Multiplies the number of images (``--quick`` uses 0.25).
    channels_last, compile : optional
        Engine settings (``SmoothedClassifier``), applied to both sides.

    Returns
    -------
    dict
        ``engine_samples_per_s`` and ``ratio`` (engine / forward, goal 0.9) of ``NOISE_SCHEME``,
        ``forward_samples_per_s``; ``schemes``: per scheme of ``COMPARED_SCHEMES``, its engine samples/s,
        ratio, noise-only samples/s (a model that costs nothing: noise, packing and counting) and its
        cost over unseeded noise; ``v3_vs_v2``: speed of v3 over v2 (> 1: v3 is faster), end to end
        and noise only, medians of per-round ratios with their ranges; ``seeding_overhead`` as before.
    """
    kind = torch.device(device).type
    batch_size, n = config.batch_size[kind], config.samples_per_image[kind]
    images = max(int(config.images[kind] * scale), 1)
    model = _model(config.arch, config.input_shape, config.num_classes)

    def engine(scheme: str, net: nn.Module) -> SmoothedClassifier:
        return SmoothedClassifier(
            net,
            config.num_classes,
            0.25,
            device=device,
            batch_size=batch_size,
            amp=amp,
            seed=0,
            noise_scheme=scheme,
            channels_last=channels_last,
            compile=compile,
        )

    schemes = COMPARED_SCHEMES + (NOISE_UNSEEDED,)
    engines = {scheme: engine(scheme, model) for scheme in schemes}
    null = {scheme: engine(scheme, _NullModel(config.num_classes)) for scheme in schemes}
    smooth = engines[NOISE_SCHEME]
    x, idx = torch.rand(images, *config.input_shape), np.arange(images)
    forward = _forward_side(smooth, config, batch_size, images * n)
    for s in schemes:  # warm-up: kernels, allocator, width check, compilation
        engines[s].counts(x[:1], min(n, batch_size))
        null[s].counts(x[:1], min(n, batch_size))
    forward()
    # Without a model a round is short: repeat it to at least NOISE_ONLY_SECONDS, so timer noise stays small.
    once, _ = _timed(smooth.device, lambda: null[NOISE_SCHEME].counts(x, n, indices=idx))
    repeat = max(1, int(np.ceil(NOISE_ONLY_SECONDS / max(once, 1e-6))))

    def noise_only(scheme: str) -> None:
        for _ in range(repeat):
            null[scheme].counts(x, n, indices=idx)

    sides = {f"engine/{s}": (lambda s=s: engines[s].counts(x, n, indices=idx)) for s in schemes}
    sides.update({f"noise_only/{s}": (lambda s=s: noise_only(s)) for s in schemes})
    sides["forward"] = forward
    wall, cpu = _interleaved_rounds(smooth.device, sides, rounds)
    # On a CPU shared with other jobs the wall clock mostly measures them; with one torch thread, this
    # process's CPU time measures the work itself. On a GPU only the wall clock means anything.
    timer = "process_cpu_time" if smooth.device.type == "cpu" and torch.get_num_threads() == 1 else "wall_clock"
    times = cpu if timer == "process_cpu_time" else wall
    samples = images * n
    return {
        "model": config.name,
        "input_shape": list(config.input_shape),
        "batch_size": batch_size,
        "images": images,
        "samples_per_image": n,
        "base_model_evaluations_per_image": n,
        "rounds": rounds,
        "amp": smooth.amp,
        "channels_last": smooth.channels_last,
        "compile": bool(compile),
        "timer": timer,
        **_summary(times, samples, repeat, NOISE_SCHEME),
        "goal_ratio": 0.9,
        "wall_clock": {
            key: value
            for key, value in _summary(wall, samples, repeat, NOISE_SCHEME).items()
            if key in ("engine_samples_per_s", "forward_samples_per_s", "ratio", "v3_vs_v2")
        },
        "round_seconds_range": {name: [round(min(t), 4), round(max(t), 4)] for name, t in times.items()},
    }


def _forward_side(smooth: SmoothedClassifier, config: BenchModel, batch_size: int, samples: int):
    """The raw forward pass: ``argmax model(x)`` over ``samples`` rows at the engine's batch size and settings."""
    dev = smooth.device
    batch = torch.rand(batch_size, *config.input_shape, device=dev)
    if smooth.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    full, rest = divmod(samples, batch_size)
    autocast = (
        torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if smooth.amp == "bf16" else contextlib.nullcontext()
    )

    def forward() -> None:
        with torch.inference_mode(), autocast:
            for _ in range(full):
                smooth.model(batch).argmax(dim=1)
            if rest:
                smooth.model(batch[:rest]).argmax(dim=1)

    return forward


def _interleaved_rounds(device: torch.device, sides: dict, rounds: int) -> tuple[dict, dict]:
    """Wall and CPU seconds of every side per round, sides interleaved within each round (noise-only
    sides, being short, get ``NOISE_ONLY_ROUNDS``)."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(max(rounds, NOISE_ONLY_ROUNDS)):
        for name, work in sides.items():
            if round_ < rounds or name.startswith("noise_only/"):
                seconds, cpu_seconds = _timed(device, work)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    return wall, cpu


def _pair_ratios(times: dict, a: str, b: str) -> list[float]:
    """Per round, time of side ``a`` over time of side ``b`` (each round's pair ran close together)."""
    return [x / y for x, y in zip(times[a], times[b])]


def _summary(times: dict, samples: int, repeat: int, default: str) -> dict:
    """Rates, ratios and per-scheme figures from the per-round seconds of every side."""
    median = {name: statistics.median(t) for name, t in times.items()}
    forward_rate = samples / median["forward"]

    def cost(kind: str, scheme: str) -> float:
        return round(statistics.median(_pair_ratios(times, f"{kind}/{scheme}", f"{kind}/{NOISE_UNSEEDED}")) - 1, 3)

    schemes = {
        scheme: {
            "engine_samples_per_s": round(samples / median[f"engine/{scheme}"], 1),
            "ratio": round(median["forward"] / median[f"engine/{scheme}"], 3),
            "noise_only_samples_per_s": round(repeat * samples / median[f"noise_only/{scheme}"], 1),
            "cost_over_unseeded_engine": cost("engine", scheme),
            "cost_over_unseeded_noise_only": cost("noise_only", scheme),
        }
        for scheme in COMPARED_SCHEMES
    }

    def speed(kind: str) -> dict:
        pairs = _pair_ratios(times, f"{kind}/{NOISE_SCHEME_V2}", f"{kind}/{NOISE_SCHEME_V3}")
        return {"median": round(statistics.median(pairs), 3), "range": [round(min(pairs), 3), round(max(pairs), 3)]}

    return {
        "engine_samples_per_s": schemes[default]["engine_samples_per_s"],
        "forward_samples_per_s": round(forward_rate, 1),
        "ratio": schemes[default]["ratio"],
        "engine_seconds_per_round": round(median[f"engine/{default}"], 4),
        "schemes": schemes,
        # time of v2 over time of v3, per round: > 1 means v3 is faster
        "v3_vs_v2": {"engine_speed": speed("engine"), "noise_only_speed": speed("noise_only"), "goal": 1.0},
        "seeding_overhead": {
            "noise_scheme": default,
            "engine": cost("engine", default),
            "noise_only": cost("noise_only", default),
            "noise_only_samples_per_s": schemes[default]["noise_only_samples_per_s"],
            "noise_only_rounds": NOISE_ONLY_ROUNDS,
        },
    }


def measure_schemes(
    config: BenchModel, *, device, rounds: int = 5, scale: float = 1.0, schemes=(NOISE_SCHEME, NOISE_SCHEME_SOUND)
) -> dict:
    """Engine samples/s under each noise scheme, side by side: the cost of the sound scheme's exact sampling.

    The same model, grid images (``v / 255``, so both schemes accept them), sample numbers and batch size;
    rounds interleaved (scheme after scheme), median round reported, CPU time of this process on a CPU
    with one thread (as ``measure``), else the wall clock. ``ratio_to_first`` is the median over rounds
    of (first scheme's time / this scheme's time): throughput relative to the first scheme, goal >= 0.9.
    ``noise_only`` repeats the measurement with a model that costs nothing (noise, packing, counting).

    Parameters
    ----------
    config : BenchModel
        The model and its sizes.
    device : str or torch.device
        Where to run.
    rounds : int, optional
        Interleaved rounds per scheme.
    scale : float, optional
        Multiplies the number of images.
    schemes : sequence of str, optional
        The schemes compared; the first is the reference.

    Returns
    -------
    dict
        Per scheme ``engine_samples_per_s``, ``noise_only_samples_per_s``, ``ratio_to_first`` (with the
        model and without) and the per-round range; the sizes and the timer.
    """
    kind = torch.device(device).type
    batch_size, n = config.batch_size[kind], config.samples_per_image[kind]
    images = max(int(config.images[kind] * scale), 1)
    model = _model(config.arch, config.input_shape, config.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        x = torch.randint(0, 256, (images, *config.input_shape)).float() / 255.0
    idx = np.arange(images)
    engines = {
        (s, kind_): SmoothedClassifier(
            net, config.num_classes, 0.25, device=device, batch_size=batch_size, seed=0, noise_scheme=s
        )
        for s in schemes
        for kind_, net in (("engine", model), ("noise_only", _NullModel(config.num_classes)))
    }
    dev = next(iter(engines.values())).device
    for smooth in engines.values():
        smooth.counts(x[:1], min(n, batch_size))
    timer = "process_cpu_time" if dev.type == "cpu" and torch.get_num_threads() == 1 else "wall_clock"
    times: dict = {key: [] for key in engines}
    for _ in range(rounds):
        for key, smooth in engines.items():
            wall, cpu = _timed(dev, lambda smooth=smooth: smooth.counts(x, n, indices=idx))
            times[key].append(cpu if timer == "process_cpu_time" else wall)
    samples = images * n
    out = {
        "model": config.name,
        "input_shape": list(config.input_shape),
        "batch_size": batch_size,
        "images": images,
        "samples_per_image": n,
        "rounds": rounds,
        "timer": timer,
        "goal_ratio": 0.9,
        "schemes": {},
    }
    first = schemes[0]
    for s in schemes:
        row = {}
        for kind_ in ("engine", "noise_only"):
            ratios = [a / b for a, b in zip(times[(first, kind_)], times[(s, kind_)])]
            row[f"{kind_}_samples_per_s"] = round(samples / statistics.median(times[(s, kind_)]), 1)
            row[f"{kind_}_ratio_to_first"] = round(statistics.median(ratios), 3)
            row[f"{kind_}_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        out["schemes"][s] = row
    return out


# --------------------------------------------------------------------------- scaling over processes
def _scaling_worker(
    rank: int, world_size: int, config: BenchModel, threads: int, n: int, images: int, commands, results, barrier
) -> None:
    torch.set_num_threads(threads)
    smooth = SmoothedClassifier(
        _model(config.arch, config.input_shape, config.num_classes),
        config.num_classes,
        0.25,
        device="cpu",
        batch_size=config.batch_size["cpu"],
        seed=0,
    )
    x = torch.rand(images, *config.input_shape)
    idx = np.arange(rank, rank + images * world_size, world_size)  # a strided shard, as torchrun jobs take
    smooth.counts(x[:1], min(n, smooth.batch_size))
    results.put(("ready", rank))
    while True:
        active = commands.get()
        if active is None:
            return
        if rank >= active:
            continue
        if active > 1:
            barrier.wait()
        start, start_cpu = time.perf_counter(), time.process_time()
        smooth.counts(x, n, indices=idx)
        results.put((rank, start, time.perf_counter(), time.process_time() - start_cpu))


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def measure_scaling(
    config: BenchModel, world_size: int, *, threads: int = 1, repeats: int = 5, scale: float = 1.0
) -> dict:
    """Throughput of ``world_size`` CPU processes counting at once against one process, same threads each.

    Every process counts the same work (its own strided share of ``images`` images x ``n`` samples);
    ``efficiency = throughput(W) / (W x throughput(1)) = t(1) / t(W)``, with ``t(W)`` the wall time
    from the common start to the last process's end. One-process and ``W``-process runs alternate,
    ``repeats`` times, so background load affects both; the median and the spread are reported.

    Parameters
    ----------
    config : BenchModel
        The model and its CPU sizes.
    world_size : int
        Processes (>= 2).
    threads : int, optional
        torch threads per process.
    repeats : int, optional
        Alternating measurements of each side.
    scale : float, optional
        Multiplies the number of images.

    Returns
    -------
    dict
        ``efficiency`` (median), ``efficiency_runs`` (every repeat), ``speedup`` (``W x efficiency``,
        goal 1.7 for 2 processes), samples/s of both sides, and the machine's load before and after.
    """
    n, images = config.samples_per_image["cpu"], max(int(config.images["cpu"] * scale), 1)
    context = multiprocessing.get_context("spawn")
    commands = [context.Queue() for _ in range(world_size)]
    results = context.Queue()
    barrier = context.Barrier(world_size)
    load_before = machine_load()
    workers = [
        context.Process(
            target=_scaling_worker,
            args=(rank, world_size, config, threads, n, images, commands[rank], results, barrier),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in range(world_size):
            results.get(timeout=600)

        def run(active: int) -> tuple[float, float]:
            for queue in commands:
                queue.put(active)
            spans = [results.get(timeout=3600) for _ in range(active)]
            wall = max(end for _, _, end, _ in spans) - min(start for _, start, _, _ in spans)
            return wall, sum(cpu for *_, cpu in spans) / active

        one, many = [], []
        for _ in range(repeats):
            one.append(run(1))
            many.append(run(world_size))
    finally:
        for queue in commands:
            queue.put(None)
        for worker in workers:
            worker.join(timeout=60)
    efficiency = [a[0] / b[0] for a, b in zip(one, many)]
    samples = images * n
    one_wall, many_wall = statistics.median(w for w, _ in one), statistics.median(w for w, _ in many)
    one_cpu, many_cpu = statistics.median(c for _, c in one), statistics.median(c for _, c in many)
    return {
        "model": config.name,
        "world_size": world_size,
        "threads_per_process": threads,
        "samples_per_process": samples,
        "repeats": repeats,
        "one_process_samples_per_s": round(samples / one_wall, 1),
        "all_processes_samples_per_s": round(world_size * samples / many_wall, 1),
        "efficiency": round(statistics.median(efficiency), 3),
        "efficiency_runs": [round(e, 3) for e in efficiency],
        "speedup": round(world_size * statistics.median(efficiency), 3),
        "speedup_range": [round(world_size * min(efficiency), 3), round(world_size * max(efficiency), 3)],
        "goal_speedup": round(0.85 * world_size, 2),
        # Where the wall-clock shortfall comes from: CPU seconds a process needs for its share (alone
        # vs beside the others: > 1 means the processes slow each other, e.g. memory bandwidth), and
        # the share of a core each process got (< 1 means other jobs held the cores).
        "cpu_seconds_per_process": {"alone": round(one_cpu, 3), "beside_others": round(many_cpu, 3)},
        "cpu_time_ratio": round(many_cpu / one_cpu, 3),
        "core_share_per_process": {
            "alone": round(one_cpu / one_wall, 3),
            "beside_others": round(many_cpu / many_wall, 3),
        },
        "load_before": load_before,
        "load_after": machine_load(),
    }
