"""Certified accuracy under the sound noise scheme against the float one (goal: within 0.5 pp up to 3 sigma).

Cohen's certifier (``n0`` + ``n`` samples, from counts files cached like the one-pass case's) on the same
test images and base model, for each scheme and each noise seed: the scheme's effect is the difference
sound - float at the same seed, and the float - float difference between two seeds is the Monte Carlo
noise any such comparison carries. With ``--onepass FLOAT.json SOUND.json`` (two runs of
``benchmarks/onepass_mnist.py``, float and ``--noise-scheme sound``), the one-pass and hybrid rows are
compared too, at the radii those runs report. Prints JSON (``--out`` also writes it) and a Markdown
table on stderr.

    python benchmarks/noise_scheme_accuracy.py --data-root DATA --cache CACHE [--model BASE.pt] \\
        [--limit 500] [--seeds 0,1] [--onepass float.json sound.json] --out accuracy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from data_gen.generate import generate_counts
from data_gen.models import load_model
from data_gen.store import read_counts
from surrogate_cert.core import __version__, stats
from surrogate_cert.core.smoothing import NOISE_SCHEME, NOISE_SCHEME_SOUND
from surrogate_cert.workflows.onepass_case import ONEPASS_MNIST_CPU, OnePassBench, cached_counts, counts_key

SCHEMES = {"float": NOISE_SCHEME, "sound": NOISE_SCHEME_SOUND}
GOAL_PP = 0.5


def certified_accuracy(counts, alpha: float, radii) -> list[float]:
    """Cohen's certified accuracy at each radius, from a counts file with selection counts."""
    prediction, _, radius = stats.cohen_certify(
        counts.counts_select, counts.counts, alpha, counts.sigma, slack=counts.radius_slack
    )
    ok = (prediction == counts.labels) & (radius > 0)
    return [float(np.mean(ok & (radius >= r - 1e-12))) for r in radii]


def cohen_rows(args, radii) -> dict:
    sha = load_model(args.model, device="cpu").sha256
    rows = {}
    for seed in args.seeds:
        for name, scheme in SCHEMES.items():
            key = counts_key(args.dataset, "test", sha, args.sigma, args.n, args.n0, seed, args.limit, scheme)

            def make(path: Path, seed=seed, scheme=scheme) -> None:
                generate_counts(
                    args.dataset,
                    "test",
                    args.model,
                    args.sigma,
                    args.n,
                    str(path),
                    n0=args.n0,
                    seed=seed,
                    limit=args.limit,
                    data_root=args.data_root,
                    batch_size=4096,
                    noise_scheme=scheme,
                    progress=False,
                    command="noise_scheme_accuracy",
                )

            path = cached_counts(args.cache, key, make, say=lambda m: print(m, file=sys.stderr))
            rows[f"{name}_seed{seed}"] = certified_accuracy(read_counts(path), args.alpha, radii)
    return rows


def differences(a, b) -> list[float]:
    return [round(100 * (x - y), 2) for x, y in zip(a, b)]


def onepass_rows(
    float_json: str, sound_json: str, sigma_max: float, names: tuple[str, str] = ("float", "sound")
) -> dict:
    """Certified accuracy of every one-pass and hybrid row of both runs, at the radii they report (<= sigma_max).

    ``names`` label the two runs in the keys (``float``, ``sound``, ``sound_minus_float_pp`` by default)."""
    first, second = names
    runs = {name: json.loads(Path(p).read_text()) for name, p in ((first, float_json), (second, sound_json))}
    return _paired_rows(runs, first, second, sigma_max)


def _paired_rows(runs: dict, first: str, second: str, sigma_max: float) -> dict:
    key = f"{second}_minus_{first}_pp"
    sigma = runs[first]["setup"]["sigma"]
    out = {}
    for section in ("one_pass", "hybrid"):
        for eps, schemes in runs[first][section].items():
            for scheme, row in schemes.items():
                other = runs[second][section][eps][scheme]
                radii = [r for r in row["certified_accuracy"] if float(r) <= sigma_max * sigma + 1e-12]
                a = [row["certified_accuracy"][r] for r in radii]
                b = [other["certified_accuracy"][r] for r in radii]
                out[f"{section} {scheme} eps={eps}"] = {
                    "radii": [float(r) for r in radii],
                    first: a,
                    second: b,
                    key: differences(b, a),
                }
    cohen = {name: runs[name]["cohen_10k"]["certified_accuracy"] for name in runs}
    radii = [r for r in cohen[first] if float(r) <= sigma_max * sigma + 1e-12]
    a, b = [cohen[first][r] for r in radii], [cohen[second][r] for r in radii]
    out["cohen_10k (one-pass runs)"] = {"radii": [float(r) for r in radii], first: a, second: b, key: differences(b, a)}
    return out


def markdown(content: dict) -> str:
    radii = content["cohen"]["radii"]
    sigma = content["setup"]["sigma"]
    n = content["setup"]["n"]
    lines = [
        f"| Cohen-{n // 1000}k | " + " | ".join(f"{r / sigma:g}σ" for r in radii) + " |",
        "| --- |" + " ---: |" * len(radii),
    ]
    for name, row in content["cohen"]["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    for name, row in content["cohen"]["differences_pp"].items():
        lines.append(f"| {name} (pp) | " + " | ".join(f"{v:+.1f}" for v in row) + " |")
    for name, row in content.get("onepass", {}).items():
        lines.append(
            f"| {name}: float / sound (pp) | "
            + " | ".join(
                f"{100 * a:.1f} / {100 * b:.1f} ({d:+.1f})"
                for a, b, d in zip(row["float"], row["sound"], row["sound_minus_float_pp"])
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--model",
        default=None,
        help="the base model (default: the one-pass case's built-in MLP, trained once into --cache)",
    )
    p.add_argument("--cache", required=True, help="counts cache folder (shared with the one-pass runs)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--limit", type=int, default=500, help="test images")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument("--seeds", default="0,1", help="noise seeds (the first matches the one-pass runs)")
    p.add_argument("--sigma-max", type=float, default=3.0, help="compare up to this radius, in sigmas")
    p.add_argument("--onepass", nargs=2, default=None, metavar=("FLOAT_JSON", "SOUND_JSON"))
    p.add_argument(
        "--onepass-floor",
        default=None,
        metavar="FLOAT_SEED1_JSON",
        help="a float run differing from FLOAT_JSON by its noise seed alone (onepass_mnist.py --noise-seed 1): "
        "the one-pass pipeline's Monte Carlo noise floor",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.model is None:  # the one-pass case's base model, cached where its runs look for it
        cfg = dataclasses.replace(ONEPASS_MNIST_CPU, dataset=args.dataset, data_root=args.data_root, sigma=args.sigma)
        args.model = OnePassBench(cfg, Path(args.cache) / "work", cache_dir=args.cache).base_model()
    radii = [round(args.sigma * k / 4, 10) for k in range(int(4 * args.sigma_max) + 1)]
    rows = cohen_rows(args, radii)
    diffs = {
        f"sound - float, seed {s}": differences(rows[f"sound_seed{s}"], rows[f"float_seed{s}"]) for s in args.seeds
    }
    if len(args.seeds) > 1:
        s0, s1 = args.seeds[:2]
        diffs[f"float seed {s1} - float seed {s0} (Monte Carlo noise)"] = differences(
            rows[f"float_seed{s1}"], rows[f"float_seed{s0}"]
        )
        diffs[f"sound seed {s1} - sound seed {s0} (Monte Carlo noise)"] = differences(
            rows[f"sound_seed{s1}"], rows[f"sound_seed{s0}"]
        )
    scheme_diffs = [abs(v) for k, row in diffs.items() if k.startswith("sound - float") for v in row]
    content = dict(
        benchmark="noise_scheme_accuracy",
        package_version=__version__,
        setup=dict(
            dataset=args.dataset,
            sigma=args.sigma,
            test_images=args.limit,
            n=args.n,
            n0=args.n0,
            alpha=args.alpha,
            seeds=args.seeds,
            model=args.model,
            schemes=SCHEMES,
        ),
        cohen=dict(
            radii=radii,
            rows=rows,
            differences_pp=diffs,
            max_abs_sound_minus_float_pp=max(scheme_diffs),
            goal_pp=GOAL_PP,
            within_goal=max(scheme_diffs) <= GOAL_PP,
        ),
    )
    if args.onepass:
        content["onepass"] = onepass_rows(*args.onepass, args.sigma_max)
        worst = max(abs(v) for row in content["onepass"].values() for v in row["sound_minus_float_pp"])
        content["onepass_max_abs_sound_minus_float_pp"] = worst
        content["onepass_within_goal"] = worst <= GOAL_PP
        if args.onepass_floor:
            floor = onepass_rows(args.onepass[0], args.onepass_floor, args.sigma_max, names=("float", "float_seed1"))
            content["onepass_floor"] = floor
            content["onepass_floor_max_abs_pp"] = max(
                abs(v) for row in floor.values() for v in row["float_seed1_minus_float_pp"]
            )
    content["markdown"] = markdown(content)
    print(content["markdown"], file=sys.stderr)
    text = json.dumps(content, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
