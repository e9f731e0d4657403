"""The documented step-by-step flow, command for command, on MNIST with a user's own exported model.

What a newcomer does after reading ``docs/step-by-step.md``: bring a model as a ``torch.export``
archive (``.pt2``), then ``datagen`` (surrogate split x 100, cal split x 10^4), ``train``,
``calibrate``, ``certify`` (one pass, and the hybrid), and ``cohen`` on the same test images, each as
the command line runs it. Prints JSON: every command with its seconds, certified accuracy at
r = sigma, 2 sigma, 3 sigma of each, and the one-pass benchmark's figures
(``benchmarks/results/onepass_mnist.json``, the workflow's own run) beside them.

Without ``--model`` the "user's model" is the benchmark's MLP (``train-base --arch mlp`` on the train
split) exported with ``torch.export`` as a user would export theirs; its checkpoint is then discarded.

    python benchmarks/step_by_step_mnist.py --data-root ../shared/data --workdir step-mnist \
        --out benchmarks/results/step_by_step_mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], log: list[dict]) -> None:
    """Run one documented command as the shell would, timing it; stop on the first failure."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    log.append(dict(command=" ".join(shlex.quote(c) for c in cmd[1:]), seconds=round(time.perf_counter() - started, 1)))


def export_user_model(checkpoint: Path, out: Path) -> None:
    """What a user does with their own network: ``torch.export.save(torch.export.export(model, ...))``."""
    import torch

    from data_gen.models import load_model

    loaded = load_model(str(checkpoint), device="cpu")
    module = loaded.model.eval()
    example = torch.zeros(2, *loaded.input_shape)
    batch = {0: torch.export.Dim("batch", min=1)}  # the engine evaluates batches of any size
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=(batch,)), str(out))


def accuracy(path: Path, sigma: float) -> dict:
    from surrogate_cert.core.certificate import certified_accuracy, read_tsv

    rows = read_tsv(path)
    radii = [0.0, sigma, 2 * sigma, 3 * sigma]
    acc = certified_accuracy(rows, radii)
    evals = [r["n_samples"] for r in rows if r.get("n_samples", -1) >= 0]
    return dict(
        images=len(rows),
        certified_accuracy={f"{m}sigma": round(100 * a, 1) for m, a in zip(range(4), acc)},
        mean_evaluations=round(sum(evals) / len(evals), 1) if evals else None,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding MNIST")
    p.add_argument("--workdir", default="step-by-step-mnist")
    p.add_argument("--model", default=None, help="your exported model (.pt2); default: the benchmark's MLP, exported")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--limit", type=int, default=500, help="test images (the one-pass benchmark's 500)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "surrogate_cert"]
    data = ["--dataset", "mnist", "--data-root", args.data_root]
    sigma = str(args.sigma)
    log: list[dict] = []
    model = Path(args.model) if args.model else work / "base.pt2"
    if not args.model and not model.exists():
        checkpoint = work / "base-checkpoint.pt"
        if not checkpoint.exists():
            run(cli + ["train-base", *data, "--arch", "mlp", "--sigma", sigma, "--out", str(checkpoint)], log)
        export_user_model(checkpoint, model)
    w = {
        name: str(work / name)
        for name in (
            "surrogate.h5",
            "cal.h5",
            "surrogate.pt",
            "calibration.json",
            "onepass.tsv",
            "hybrid.tsv",
            "cohen.tsv",
        )
    }
    steps = [
        [
            "datagen",
            *data,
            "--split",
            "surrogate",
            "--model",
            str(model),
            "--sigma",
            sigma,
            "--samples",
            "100",
            "--out",
            w["surrogate.h5"],
        ],
        [
            "datagen",
            *data,
            "--split",
            "cal",
            "--model",
            str(model),
            "--sigma",
            sigma,
            "--samples",
            "10000",
            "--out",
            w["cal.h5"],
        ],
        ["train", "--counts", w["surrogate.h5"], "--data-root", args.data_root, "--out", w["surrogate.pt"]],
        [
            "calibrate",
            "--surrogate",
            w["surrogate.pt"],
            "--counts",
            w["cal.h5"],
            "--data-root",
            args.data_root,
            "--epsilon",
            "0.01",
            "--alpha-mc",
            "0.001",
            "--out",
            w["calibration.json"],
        ],
        [
            "certify",
            "--surrogate",
            w["surrogate.pt"],
            "--calibration",
            w["calibration.json"],
            *data,
            "--split",
            "test",
            "--limit",
            str(args.limit),
            "--fallback",
            "none",
            "--out",
            w["onepass.tsv"],
        ],
        [
            "certify",
            "--surrogate",
            w["surrogate.pt"],
            "--calibration",
            w["calibration.json"],
            "--model",
            str(model),
            *data,
            "--split",
            "test",
            "--limit",
            str(args.limit),
            "--out",
            w["hybrid.tsv"],
        ],
        [
            "cohen",
            "--model",
            str(model),
            *data,
            "--split",
            "test",
            "--limit",
            str(args.limit),
            "--sigma",
            sigma,
            "--samples",
            "10000",
            "--out",
            w["cohen.tsv"],
        ],
    ]
    for step in steps:
        out = Path(step[step.index("--out") + 1])
        if out.exists():  # a re-run continues where the last one stopped
            continue
        run(cli + step, log)

    rows = {name: accuracy(work / f"{name}.tsv", args.sigma) for name in ("cohen", "onepass", "hybrid")}
    reference = json.loads((ROOT / "benchmarks/results/onepass_mnist.json").read_text())
    pooled = reference["one_pass"]["0.01"]["pooled"]["certified_accuracy"]
    ref_cohen = reference["cohen_10k"]["certified_accuracy"]
    keys = [f"{m * args.sigma:g}" for m in range(4)]
    benchmark = dict(
        cohen={f"{m}sigma": round(100 * ref_cohen[k], 1) for m, k in enumerate(keys) if k in ref_cohen},
        onepass_pooled={f"{m}sigma": round(100 * pooled[k], 1) for m, k in enumerate(keys) if k in pooled},
    )
    gap_here = {
        k: round(rows["cohen"]["certified_accuracy"][k] - rows["onepass"]["certified_accuracy"][k], 1)
        for k in rows["cohen"]["certified_accuracy"]
    }
    gap_benchmark = {
        k: round(benchmark["cohen"][k] - benchmark["onepass_pooled"][k], 1)
        for k in benchmark["cohen"]
        if k in benchmark["onepass_pooled"]
    }
    result = dict(
        setup=dict(
            dataset="mnist",
            sigma=args.sigma,
            test_images=args.limit,
            epsilon=0.01,
            alpha_mc=0.001,
            model="user's torch.export archive"
            if args.model
            else "the benchmark's MLP (train-base --arch mlp, train split) exported with torch.export",
        ),
        commands=log,
        results=rows,
        benchmark_onepass_mnist=benchmark,
        one_pass_drop_vs_cohen_pp=dict(step_by_step=gap_here, benchmark=gap_benchmark),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
