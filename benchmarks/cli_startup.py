"""Start-up time of the command line: ``--help`` and one-line argument errors (goal: under 1 s).

Each case runs in a fresh interpreter (``python -m surrogate_cert ...``, what the console script
does), ``--repeats`` times interleaved with the others; medians and ranges of the wall time are
reported beside two references measured in the same run: a bare interpreter (``python -c pass``)
and one that only imports torch, the cost a command pays once it runs. Also records whether
building the parser imported torch, SciPy, MAPIE or matplotlib (it must not). Prints JSON.

    python benchmarks/cli_startup.py [--repeats 7] [--out benchmarks/results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    "help": ["-m", "surrogate_cert", "--help"],
    "datagen --help": ["-m", "surrogate_cert", "datagen", "--help"],
    "calibrate --help": ["-m", "surrogate_cert", "calibrate", "--help"],
    "argument error (datagen --sigma x)": ["-m", "surrogate_cert", "datagen", "--sigma", "x"],
    "argument error (unknown command)": ["-m", "surrogate_cert", "frobnicate"],
    "reference: python -c pass": ["-c", "pass"],
    "reference: python -c 'import torch'": ["-c", "import torch"],
}
HEAVY = ("torch", "scipy", "mapie", "matplotlib", "sklearn", "h5py", "numpy")


def run_once(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def heavy_modules_after_parser() -> list[str]:
    code = (
        "import sys, json; import surrogate_cert.cli as cli; cli.build_parser(); "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    load_before = os.getloadavg()
    for _ in range(args.repeats):  # interleaved, so a burst of load hits every case alike
        for name, case in CASES.items():
            times[name].append(run_once(case))
    load_after = os.getloadavg()
    result = {
        "goal": "--help and one-line argument errors under 1 s (wall clock, fresh interpreter)",
        "cases": {
            name: dict(median_s=round(statistics.median(t), 3), min_s=round(min(t), 3), max_s=round(max(t), 3))
            for name, t in times.items()
        },
        "heavy_modules_imported_by_the_parser": heavy_modules_after_parser(),
        "repeats": args.repeats,
        "load_average_1min": dict(before=round(load_before[0], 2), after=round(load_after[0], 2)),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    cli_cases = [name for name in CASES if not name.startswith("reference")]
    result["goal_met"] = all(result["cases"][name]["median_s"] < 1.0 for name in cli_cases)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
