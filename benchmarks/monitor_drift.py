"""Deployment watchers: drift detection delays, false-alarm rates, and a 10^5-query soak. Prints JSON.

For digits (a quickstart folder: ``surrogate.pt`` and ``calibration.json``) and MNIST (``--mnist-dir``:
a surrogate fine-tuned from the base MLP on the train counts and calibrated on the cal counts, made
there on the first run), with the calibration reference of the calibration file:

- false alarms: the test split in random order, ``--null-runs`` times (``delta`` 0.01 and 0.05),
  with the binomial allowance; also the broken variant that ranks each query against the fixed
  calibration reference only (no online update);
- detection delay: the first 100 queries are test images in random order, from query 100 on they
  are shifted (pixels inverted, Gaussian blur, Gaussian noise of sigma 0.25 / 0.5, one class removed);
  delay = alarm query - 100, over ``--shift-runs`` orders (``delta`` = 0.01); digits has only 297
  test images after the first 100, so its class removal is also run on 1400 draws with replacement;
- soak (digits): ``--soak`` queries through the one-pass certifier with and without the monitor,
  timed in alternating chunks, and the resident memory before and after.

    python benchmarks/monitor_drift.py --digits-dir surrogate-cert-quickstart \\
        --mnist-dir /tmp/mnist-monitor --data-root ../shared/data --counts-dir COUNTS_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF

from calibration import calibrate_arrays
from calibration.artifact import load_calibration
from data_gen.datasets import load_split
from data_gen.store import read_counts
from surrogate_cert.core import __version__, stats
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.core.surrogate import Surrogate
from surrogate_cert.deploy.monitor import MIX_EVERY, DriftMonitor, drift_jump, drift_prior

SHIFT_AT = 100


# --------------------------------------------------------------------------- shifts


def shifts(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen)
    size = 3 if x.shape[-1] <= 8 else 5
    return {
        "inverted": 1 - x,
        "gaussian_blur_sigma1px": TF.gaussian_blur(x, [size, size], [1.0, 1.0]).clamp(0, 1),
        "noise_sigma_0.25": (x + 0.25 * noise).clamp(0, 1),
        "noise_sigma_0.5": (x + 0.5 * noise).clamp(0, 1),
    }


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fixed_reference_max_log_martingale(reference, classes, p_tilde, num_classes, delta, seed) -> float:
    """BROKEN variant: every query's p-values against the calibration reference only."""
    rc, rp = (np.asarray(a) for a in reference)
    u = 1.0 - np.random.default_rng(seed).random((len(classes), 2))
    counts = np.bincount(rc, minlength=num_classes)
    greater = np.array([counts[k + 1 :].sum() for k in classes])
    q = np.asarray(stats.smoothed_p_value(greater, counts[classes], len(rc), u[:, 0]))
    r = np.empty(len(classes))
    for k in range(num_classes):
        mine = classes == k
        past = np.sort(-rp[rc == k])
        s = -p_tilde[mine]
        right = np.searchsorted(past, s, "right")
        r[mine] = stats.smoothed_p_value(
            len(past) - right, right - np.searchsorted(past, s, "left"), len(past), u[mine, 1]
        )
    bins = int(np.clip(num_classes, 2, 32))
    prior = drift_prior(bins)
    growth, _ = stats.fixed_share_update(
        stats.drift_bets(q, r, bins, log=True), np.log(prior), prior, drift_jump, mix_every=MIX_EVERY
    )
    return float(growth.max())


# --------------------------------------------------------------------------- one dataset


def evaluate(name, surrogate, calibration, test, null_runs, shift_runs, max_after, seed=0, with_replacement=0) -> dict:
    started = time.perf_counter()
    reference = (calibration.monitor_reference["predicted"], calibration.monitor_reference["p_tilde"])
    k = calibration.num_classes
    base = surrogate.predict(test.x)
    rng = np.random.default_rng(seed)
    out = dict(
        dataset=name,
        reference_size=len(reference[0]),
        test_images=len(test),
        surrogate_accuracy_on_test=float(np.mean(base[0] == test.y.numpy())),
    )

    # False alarms on exchangeable streams (the whole test split in random order).
    null = {}
    for delta in (0.01, 0.05):
        alarms = broken = 0
        for run in range(null_runs):
            order = rng.permutation(len(test))
            monitor = DriftMonitor(*reference, k, delta=delta, seed=run, keep_path=False)
            monitor.update(base[0][order], base[1][order])
            alarms += monitor.alarm
            broken += fixed_reference_max_log_martingale(
                reference, base[0][order], base[1][order], k, delta, run
            ) >= -math.log(delta)
        null[f"delta_{delta}"] = dict(
            runs=null_runs,
            alarms=int(alarms),
            rate=alarms / null_runs,
            allowance_0999=stats.binomial_allowance(null_runs, delta),
            fixed_reference_variant_alarms=int(broken),
        )
    out["false_alarms"] = null

    # Shifts from query 100 on.
    outputs = {s: surrogate.predict(xs) for s, xs in shifts(test.x, seed).items()}
    labels = test.y.numpy()

    def delays_for(make_stream, runs):
        delays, early = [], 0
        for run in range(runs):
            (c0, p0), (c1, p1) = make_stream(run)
            monitor = DriftMonitor(*reference, k, delta=0.01, seed=1000 + run, keep_path=False)
            monitor.update(c0, p0)
            early += monitor.alarm
            if not monitor.alarm:
                monitor.update(c1, p1)
            delays.append(monitor.alarm_at - SHIFT_AT if monitor.alarm and monitor.alarm_at >= SHIFT_AT else None)
        found = [d for d in delays if d is not None]
        median = float(np.median([d if d is not None else np.inf for d in delays]))
        return dict(
            runs=runs,
            detected=len(found),
            alarms_before_shift=early,
            median_delay=None if not math.isfinite(median) else median,
            delay_quartiles=[float(v) for v in np.quantile(found, [0.25, 0.75])] if found else None,
            delays=delays,
        )

    shift_out = {}
    for shift, (cs, ps) in outputs.items():

        def make(run, cs=cs, ps=ps):
            order = np.random.default_rng(run).permutation(len(test))
            before, after = order[:SHIFT_AT], order[SHIFT_AT : SHIFT_AT + max_after]
            return (base[0][before], base[1][before]), (cs[after], ps[after])

        shift_out[shift] = dict(
            queries_after_shift=min(max_after, len(test) - SHIFT_AT), **delays_for(make, shift_runs)
        )
    per_class = {}
    for c in range(k):

        def make(run, c=c):
            order = np.random.default_rng(run).permutation(len(test))
            before, after = order[:SHIFT_AT], order[SHIFT_AT:]
            after = after[labels[after] != c][:max_after]
            return (base[0][before], base[1][before]), (base[0][after], base[1][after])

        per_class[str(c)] = delays_for(make, max(2, shift_runs // 2))
    if with_replacement:
        replaced = {}
        for c in range(k):
            keep = np.flatnonzero(labels != c)

            def make(run, keep=keep):
                draw = np.random.default_rng(run)
                before, after = (
                    draw.integers(0, len(test), SHIFT_AT),
                    keep[draw.integers(0, len(keep), with_replacement)],
                )
                return (base[0][before], base[1][before]), (base[0][after], base[1][after])

            replaced[str(c)] = delays_for(make, max(2, shift_runs // 2))
        shift_out["class_removed_with_replacement"] = dict(
            per_class={
                c: {kk: v[kk] for kk in ("runs", "detected", "median_delay", "alarms_before_shift")}
                for c, v in replaced.items()
            },
            detected=sum(v["detected"] for v in replaced.values()),
            runs=sum(v["runs"] for v in replaced.values()),
            queries_after_shift=with_replacement,
            note="test images drawn with replacement (before: all classes; after: the other classes), so that the "
            "stream is longer than the split; repeated images are themselves not exchangeable with the "
            "calibration images",
        )
    runs_c = sum(v["runs"] for v in per_class.values())
    shift_out["class_removed"] = dict(
        per_class={
            c: {kk: v[kk] for kk in ("runs", "detected", "median_delay", "alarms_before_shift")}
            for c, v in per_class.items()
        },
        detected=sum(v["detected"] for v in per_class.values()),
        runs=runs_c,
        median_delay_of_detected=float(np.median([d for v in per_class.values() for d in v["delays"] if d is not None]))
        if any(v["detected"] for v in per_class.values())
        else None,
        note="without replacement: the queries after the shift are the remaining test images of the other classes",
    )
    out["shifts"] = shift_out
    out["seconds"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- MNIST surrogate


def mnist_surrogate(folder, counts_dir, data_root, device="cpu"):
    """An MLP surrogate (the base model's architecture, initialised from its weights) fine-tuned on the train
    counts and calibrated on the cal counts; cached in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    mlp = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    weights = os.path.join(folder, "surrogate_mlp_state.pt")
    notes = {}
    if os.path.exists(weights):
        mlp.load_state_dict(torch.load(weights, weights_only=True))
        surrogate = Surrogate(
            mlp, arch="mlp(base init)", input_shape=(1, 28, 28), num_classes=10, sigma=0.25, device=device
        )
    else:
        mlp.load_state_dict(torch.load(os.path.join(counts_dir, "base_mlp_state.pt"), weights_only=True))
        surrogate = Surrogate(
            mlp, arch="mlp(base init)", input_shape=(1, 28, 28), num_classes=10, sigma=0.25, device=device
        )
        train = read_counts(os.path.join(counts_dir, "train_10k_n1000.h5"))
        t0 = time.perf_counter()
        surrogate.fit(train.images(data_root), train.counts, epochs=8, seed=0)
        notes["train_seconds"] = time.perf_counter() - t0
        torch.save(mlp.state_dict(), weights)
    cal = read_counts(os.path.join(counts_dir, "cal_5000_n10000.h5"))
    calibration = calibrate_arrays(
        surrogate, cal.images(data_root), cal.counts, 0.01, 1e-3, dataset="mnist", split="cal"
    )
    notes.update(calibration_rows=int(len(cal.counts)), calibration_complete=bool(cal.attrs.get("complete", True)))
    return surrogate, calibration, notes


# --------------------------------------------------------------------------- soak


def soak(surrogate, calibration, test, queries, chunk=1000, seed=0) -> dict:
    """One-pass certifier alone vs with the monitor, on the same chunks, alternating; RSS before / after."""
    certifier = SurrogateCertifier(surrogate, calibration)
    rng = np.random.default_rng(seed)
    warm = DriftMonitor.from_calibration(calibration, delta=0.01, seed=seed + 1)
    for _ in range(5):  # warm-up: the allocator's pools for every batch shape, on a throwaway monitor
        x = test.x[torch.as_tensor(rng.integers(0, len(test), chunk))]
        certifier.certify(x)
        warm.update(*certifier.radii(x)[:2])
    del warm
    monitor = DriftMonitor.from_calibration(calibration, delta=0.01, seed=seed)
    rss_before = rss_mb()
    rss_trace = []
    plain = watched = monitor_only = 0.0
    done = 0
    while done < queries:
        n = min(chunk, queries - done)
        x = test.x[torch.as_tensor(rng.integers(0, len(test), n))]
        t0 = time.perf_counter()
        certifier.certify(x)
        t1 = time.perf_counter()
        classes, p_tilde, radius = certifier.radii(x)
        [certifier.certificate(int(c), float(r), 0.0) for c, r in zip(classes, radius)]
        t2 = time.perf_counter()
        monitor.update(classes, p_tilde)
        t3 = time.perf_counter()
        plain += t1 - t0
        watched += t3 - t1
        monitor_only += t3 - t2
        done += n
        if done % (10 * chunk) < chunk:
            rss_trace.append((done, round(rss_mb(), 1)))
    rss_after = rss_mb()
    own = sum(h.nbytes for h in monitor._history) + sum(a.nbytes for a in monitor._path)
    return dict(
        queries=queries,
        chunk=chunk,
        certifier_queries_per_second=queries / plain,
        with_monitor_queries_per_second=queries / watched,
        ratio=plain / watched,
        monitor_microseconds_per_query=1e6 * monitor_only / queries,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        rss_growth_mb=rss_after - rss_before,
        rss_trace_mb=rss_trace,
        monitor_arrays_mb=own / 2**20,
        monitor_alarm=monitor.alarm,
        monitor_alarm_at=monitor.alarm_at,
        note="queries drawn with replacement from the digits test split (repeated images are not "
        "exchangeable with the calibration images, so an alarm here is not a false alarm)",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--digits-dir",
        default="surrogate-cert-quickstart",
        help="folder with surrogate.pt and calibration.json ('' to skip digits)",
    )
    p.add_argument("--mnist-dir", default=None, help="folder for the MNIST surrogate (made on the first run)")
    p.add_argument(
        "--counts-dir",
        default=None,
        help="folder of the MNIST base_mlp_state.pt and counts files (needed with --mnist-dir)",
    )
    p.add_argument("--data-root", default=None, help="torchvision data root (MNIST)")
    p.add_argument("--null-runs", type=int, default=200)
    p.add_argument("--shift-runs", type=int, default=20)
    p.add_argument("--mnist-max-after", type=int, default=2000, help="queries after the shift on MNIST")
    p.add_argument("--soak", type=int, default=100_000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    result = dict(
        package_version=__version__,
        command="benchmarks/monitor_drift.py " + " ".join(argv or sys.argv[1:]),
        machine=dict(
            platform=platform.platform(),
            cpu_count=os.cpu_count(),
            torch_threads=1,
            device="cpu",
            load_average_start=load_start,
        ),
        shift_at=SHIFT_AT,
    )
    if args.digits_dir:
        surrogate = Surrogate.load(os.path.join(args.digits_dir, "surrogate.pt"), device="cpu")
        calibration = load_calibration(os.path.join(args.digits_dir, "calibration.json"), surrogate=surrogate)
        test = load_split("digits", "test")
        result["digits"] = evaluate(
            "digits",
            surrogate,
            calibration,
            test,
            args.null_runs,
            args.shift_runs,
            max_after=10**9,
            with_replacement=1400,
        )
        if args.soak:
            result["soak_digits"] = soak(surrogate, calibration, test, args.soak)
    if args.mnist_dir:
        if not args.counts_dir:
            p.error("--mnist-dir needs --counts-dir (the MNIST base model's state and counts files)")
        m_surrogate, m_calibration, notes = mnist_surrogate(args.mnist_dir, args.counts_dir, args.data_root)
        m_test = load_split("mnist", "test", data_root=args.data_root)
        result["mnist"] = evaluate(
            "mnist",
            m_surrogate,
            m_calibration,
            m_test,
            max(20, args.null_runs // 4),
            max(5, args.shift_runs // 2),
            max_after=args.mnist_max_after,
        )
        result["mnist"]["surrogate"] = notes
    result["machine"]["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
