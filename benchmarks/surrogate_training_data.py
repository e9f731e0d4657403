"""Which counts the quickstart's surrogate should learn from, measured on its own base model (digits).

For each choice of training counts (the ``train`` split's 750 images the base model was trained on,
the ``surrogate`` split's 250 images it never saw, or both; 100 noisy samples per image), started from
the base model's weights or from random weights, and for ``--seeds`` seeds: the surrogate is trained
(``train_surrogate``), calibrated on the quickstart's cal counts (400 images x 10^4 samples, epsilon
0.01, alpha_mc 0.001), and its one-pass certificates are computed on all 397 test images. Reported:
the calibrated offset q^ and one-pass certified accuracy at radii 0, 0.25 and 0.5 (l2), per seed and
as means. One pass costs no base-model evaluation, so no Monte Carlo reference is needed here.

The base model, cal counts and training counts come from the quickstart's folder (``--workdir``; the
missing ones are made there, stages reused as by ``surrogate-cert quickstart --resume``). Prints
JSON.

    python benchmarks/surrogate_training_data.py --workdir surrogate-cert-quickstart [--seeds 7] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import numpy as np
import torch

from calibration.conformal import calibrate
from data_gen.datasets import load_split
from surrogate_cert.core.one_pass import SurrogateCertifier
from surrogate_cert.workflows.pipeline import FULL, Pipeline
from surrogate_cert.workflows.training import train_surrogate

CHOICES = {
    "train (750 seen)": ("train",),
    "surrogate (250 unseen)": ("surrogate",),
    "train + surrogate (1000)": ("train", "surrogate"),
}
RADII = (0.0, 0.25, 0.5)


def one_run(pipeline: Pipeline, splits: tuple[str, ...], init: bool, seed: int, test) -> dict:
    out = pipeline.folder / "benchmark-surrogate.pt"
    files = [pipeline.paths[f"{split}.h5"] for split in splits]
    surrogate = train_surrogate(
        files,
        out,
        init_from_base=str(pipeline.paths["base.pt"]) if init else None,
        seed=seed,
        device="cpu",
        progress=False,
    )
    calibration = calibrate(str(out), str(pipeline.paths["cal.h5"]), 0.01, 0.001, device="cpu")
    certificates = SurrogateCertifier(surrogate, calibration).certify(test.x)
    correct = np.array([c.prediction == y for c, y in zip(certificates, test.y.tolist())])
    radius = np.array([c.radius for c in certificates])
    accuracy = {f"{r:g}": float(np.mean(correct & (radius > 0) & (radius >= r))) for r in RADII}
    os.unlink(out)
    return dict(seed=seed, q_hat=calibration.pooled_offset, certified_accuracy=accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="surrogate-cert-quickstart")
    parser.add_argument("--seeds", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = Pipeline(
        args.workdir,
        dataclasses.replace(FULL, device="cpu"),
        progress=False,
        quiet=True,
        command="benchmarks/surrogate_training_data.py",
    )
    pipeline.offline()
    pipeline.counts_together([("train", 100, 0, None), ("surrogate", 100, 0, None)])
    test = load_split("digits", "test")
    started = time.perf_counter()
    rows = []
    for name, splits in CHOICES.items():
        for init in (True, False):
            runs = [one_run(pipeline, splits, init, seed, test) for seed in range(args.seeds)]
            rows.append(
                dict(
                    counts=name,
                    splits=list(splits),
                    start="base model" if init else "random weights",
                    runs=runs,
                    mean_q_hat=statistics.mean(r["q_hat"] for r in runs),
                    mean_certified_accuracy={
                        f"{r:g}": statistics.mean(x["certified_accuracy"][f"{r:g}"] for x in runs) for r in RADII
                    },
                )
            )
            print(
                f"{name:26s} from {rows[-1]['start']:14s}: q^ {rows[-1]['mean_q_hat']:.3f}, one-pass "
                + ", ".join(f"{100 * v:.1f}% at {k}" for k, v in rows[-1]["mean_certified_accuracy"].items()),
                flush=True,
            )
    result = dict(
        setup=dict(
            dataset="digits",
            sigma=FULL.sigma,
            samples_per_training_image=100,
            cal_n=FULL.cal_n,
            epsilon=0.01,
            alpha_mc=0.001,
            test_images=len(test),
            seeds=args.seeds,
            base_model="base.pt of the quickstart folder (train-base, 20 epochs, seed 0)",
        ),
        rows=rows,
        seconds=time.perf_counter() - started,
        load_average=os.getloadavg(),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
