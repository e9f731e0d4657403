"""``surrogate-cert cohen`` and ``surrogate-cert sequential``: certify a dataset split, write the results TSV.

Thin wrappers: load the model and the split, build a ``SmoothedClassifier``, run ``CohenCertifier``
or ``EProcessCertifier`` over chunks of inputs, write the TSV and its ``.meta.json`` provenance.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..core.errors import CheckpointSignatureError, InvalidParameterError, ModelError
from ..core.files import file_problem
from .choices import DETERMINISTIC_METHODS
from .common import (
    add_dataset_args,
    add_device_arg,
    add_device_args,
    add_engine_args,
    add_key_arg,
    add_model_arg,
    add_overwrite_arg,
    add_parser,
    add_progress_arg,
    add_samples_arg,
    certify_split,
    check_new_outputs,
    noise_provenance,
    provenance,
    radius_arg,
    results_paths,
    signing_key,
    write_results,
)

if TYPE_CHECKING:
    import torch

COHEN_CHUNK = 256
"""Inputs per Cohen call (each spends n0 + n samples; the chunk only paces the progress bar)."""
DETERMINISTIC_CHUNK = 256
"""Inputs per radius search of the deterministic certifier (bounds its memory)."""
SEQUENTIAL_CHUNK = 2048
"""Inputs certified together by the sequential certifier: more inputs, fuller forward passes."""


# long: argparse builder of cohen, sequential, deterministic: each one's options in a flat list, read in order
def register(sub) -> None:
    p = add_parser(
        sub,
        "cohen",
        "certify a split with Cohen et al.'s fixed-sample randomized smoothing (the baseline)",
        "surrogate-cert cohen --model base.pt --dataset digits --split test --sigma 0.25 "
        "--n0 100 --samples 10000 --alpha 0.001 --out cohen.tsv",
    )
    _common_args(p)
    p.add_argument("--n0", type=int, default=100, help="selection samples per input (default 100)")
    add_samples_arg(p, 10_000, "estimation samples per input (default 10000; --n is an alias)")
    p.set_defaults(func=run_cohen, torchrun=True)

    p = add_parser(
        sub,
        "sequential",
        "certify a split with the anytime-valid sequential (E-process) certifier",
        "surrogate-cert sequential --model base.pt --dataset digits --split test --sigma 0.25 "
        "--alpha 0.001 --target-radius 0.25 --out seq.tsv",
    )
    _common_args(p)
    p.add_argument(
        "--target-radius",
        type=radius_arg,
        default=None,
        help="stop as soon as this l2 radius is certified or ruled out (default: best-radius policy)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="best-radius policy: stop once the radius can grow by at most this much (l2 units)",
    )
    p.add_argument("--max-samples", type=int, default=10_000, help="sequential sample budget per input (default 10000)")
    p.add_argument(
        "--price",
        type=float,
        default=None,
        metavar="R",
        help="best-radius policy: stop once the expected radius gain of more samples is worth less than "
        "R (l2 units) per 1,000 samples, e.g. 0.05 (default: the --tolerance rule alone)",
    )
    p.add_argument(
        "--prior",
        default="auto",
        help="prior of the E-process: auto (default: truncated with --target-radius, else kt), kt, "
        "truncated (mass above Phi(r*/sigma); needs --target-radius), radius (KT + log-uniform "
        "failure rate: best radius of confident inputs), surrogate (needs --class-from a surrogate "
        "checkpoint), or a,b (a Beta prior, e.g. 20,1)",
    )
    p.add_argument(
        "--class-from",
        default=None,
        metavar="MODEL_OR_SURROGATE",
        help="fix each input's class before sampling, with no pilot: a surrogate checkpoint (its argmax) "
        "or a base model (its prediction on the clean input, e.g. the --model itself)",
    )
    p.add_argument(
        "--class-choice",
        choices=("pilot", "per_class"),
        default=None,
        help="without --class-from: pilot (default, argmax of --n0 pilot samples) or per_class (no pilot: "
        "one confidence sequence per class at alpha/K, stopping when any class certifies)",
    )
    p.add_argument("--n0", type=int, default=100, help="pilot samples per input (class-choice pilot)")
    add_key_arg(p, "must have signed", "a --class-from surrogate")
    p.set_defaults(func=run_sequential, torchrun=True)

    p = add_parser(
        sub,
        "deterministic",
        "certify a split deterministically (probability 1, no sampling): IBP or CROWN l2 bounds on the "
        "base network itself (not its smoothed version)",
        "surrogate-cert deterministic --model base.pt --dataset digits --split test --method crown --out crown.tsv",
    )
    add_model_arg(p)
    add_dataset_args(p)
    p.add_argument(
        "--method",
        choices=DETERMINISTIC_METHODS,
        default="crown",
        help="crown (default: linear relaxations, tighter) or ibp (interval bounds, faster)",
    )
    p.add_argument(
        "--max-radius",
        type=float,
        default=None,
        metavar="R",
        help="largest radius the search tries, l2 input units (default: found by doubling)",
    )
    add_device_arg(p)
    add_progress_arg(p)
    p.add_argument(
        "--out", required=True, help="results TSV to write (provenance goes to OUT.meta.json); refused if either exists"
    )
    add_overwrite_arg(p)
    p.set_defaults(func=run_deterministic)


def _common_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    add_dataset_args(p)
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level (l2, pixel units in [0, 1]); default: the one recorded in the model",
    )
    p.add_argument(
        "--allow-sigma-mismatch",
        action="store_true",
        help="accept a --sigma other than the one the model declares it was trained at",
    )
    p.add_argument("--alpha", type=float, default=1e-3, help="error probability per certificate (default 0.001)")
    add_device_args(p)
    add_engine_args(p)
    add_progress_arg(p)
    p.add_argument(
        "--out", required=True, help="results TSV to write (provenance goes to OUT.meta.json); refused if either exists"
    )
    add_overwrite_arg(p)


PRIOR_NAMES = ("auto", "kt", "truncated", "radius", "surrogate")


def parse_prior(text: str):
    """A name of ``PRIOR_NAMES`` or ``a,b`` (two positive numbers) -> the certifier's ``prior`` argument."""
    name = text.strip().lower()
    if name in PRIOR_NAMES:
        return name
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise InvalidParameterError(
            f"--prior must be one of {', '.join(PRIOR_NAMES)} or a,b (two numbers > 0, e.g. 20,1), got {text!r}"
        ) from None
    return a, b


def load_class_source(spec: str, device, num_classes: int, input_shape, key: bytes | None = None):
    """``--class-from``: a surrogate checkpoint or a base model, as ``(kind, object)``.

    A surrogate gives its argmax (and, for ``--prior surrogate``, its prior); a base model its
    prediction on the clean input. Either fixes the class before any sequential sample is drawn,
    which is all the guarantee needs.
    """
    from data_gen.models import load_model

    from ..core.smoothing import SmoothedClassifier
    from ..core.surrogate import Surrogate

    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        try:
            surrogate = Surrogate.load(path, device=device, key=key)
        except CheckpointSignatureError:
            raise
        except ModelError:
            surrogate = None  # not a surrogate checkpoint: try it as a base model
        if surrogate is not None:
            if surrogate.num_classes != num_classes or tuple(surrogate.input_shape) != tuple(input_shape):
                raise InvalidParameterError(
                    f"--class-from {spec} is a surrogate for {surrogate.num_classes} classes of shape "
                    f"{tuple(surrogate.input_shape)}, but the dataset has {num_classes} of shape {tuple(input_shape)}"
                )
            return "surrogate", surrogate
    elif ":" not in spec or os.path.lexists(path):
        problem = file_problem(path) if os.path.lexists(path) else "does not exist"
        raise InvalidParameterError(f"--class-from {spec} {problem}; give a surrogate checkpoint or a base model")
    loaded = load_model(spec, device=device, num_classes=num_classes)
    return "model", SmoothedClassifier(loaded.model, num_classes, 1.0, device=device)


def classes_from(kind: str, source, x: torch.Tensor):
    """``(classes, p_tilde)`` of a batch: the surrogate's argmax and probability, or ``f(x)`` (p_tilde None)."""
    import numpy as np
    import torch

    if kind == "surrogate":
        return source.predict(x)
    with torch.inference_mode():
        classes = source.predict_labels(x.to(source.device, dtype=torch.float32)).cpu().numpy()
    return classes.astype(np.int64), None


def _load(args: argparse.Namespace):
    """The split, the smoothed classifier and the provenance of a run."""
    from data_gen.datasets import load_split
    from data_gen.models import check_model_fits, check_sigma_agrees, load_model

    from ..core.smoothing import NOISE_SCHEME, SmoothedClassifier

    check_new_outputs(args, *results_paths(args.out))
    data = load_split(args.dataset, args.split, data_root=args.data_root, download=args.download, limit=args.limit)
    data.require_labels("the results file (its label and correct columns: certified accuracy)")
    device = args.shard.device(args.device)
    loaded = load_model(args.model, device=device, num_classes=data.num_classes, input_shape=data.input_shape)
    sigma = args.sigma if args.sigma is not None else loaded.sigma
    if sigma is None:
        raise InvalidParameterError(
            f"--sigma is required: model {args.model} does not record the noise level it was trained at"
        )
    check_sigma_agrees(loaded.sigma, sigma, args.model, args.allow_sigma_mismatch)
    smooth = SmoothedClassifier(
        loaded.model,
        data.num_classes,
        sigma,
        device=device,
        batch_size=args.batch_size,
        seed=args.seed,
        amp=args.amp,
        noise_scheme=args.noise_scheme or NOISE_SCHEME,
        channels_last=args.channels_last,
        compile=args.compile,
        input_shape=data.input_shape,
        off_grid="quantise",
    )
    check_model_fits(smooth, data.x[:1], args.model)
    meta = provenance(
        args,
        method=args.command,
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        images=len(data),
        sigma=sigma,
        alpha=args.alpha,
        model_sha256=loaded.sha256,
        device=str(smooth.device),
        seed=args.seed,
        noise_scheme=smooth.noise_scheme,
        amp=smooth.amp,
        batch_size=smooth.batch_size,
        world_size=args.shard.world_size,
        **noise_provenance(smooth, data),
    )
    return data, smooth, meta


def run_cohen(args: argparse.Namespace) -> int:
    from ..core.cohen import CohenCertifier

    data, smooth, meta = _load(args)
    certifier = CohenCertifier(smooth)
    certificates = certify_split(
        data,
        lambda x, idx: certifier.certify(x, n0=args.n0, n=args.n, alpha=args.alpha, indices=idx),
        COHEN_CHUNK,
        not args.no_progress,
        "cohen",
        args.shard,
    )
    if certificates is None:
        return 0  # rank 0 writes the merged results
    return write_results(args.out, data, certificates, dict(meta, n0=args.n0, n=args.n), overwrite=args.overwrite)


def run_sequential(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core import stats
    from ..core.sequential import EProcessCertifier

    prior = parse_prior(args.prior)
    if args.class_from is not None and args.class_choice is not None:
        raise InvalidParameterError("--class-from fixes the class: drop --class-choice (or drop --class-from)")
    if prior == "surrogate" and args.class_from is None:
        raise InvalidParameterError("--prior surrogate needs --class-from SURROGATE.pt (the surrogate gives the prior)")
    if prior == "truncated" and args.target_radius is None:
        raise InvalidParameterError("--prior truncated is for a target radius: add --target-radius (or use --prior kt)")
    if args.price is not None and args.target_radius is not None:
        raise InvalidParameterError("--price is a best-radius rule: drop it or drop --target-radius")
    class_choice = args.class_choice or "pilot"
    data, smooth, meta = _load(args)
    source = None
    if args.class_from is not None:
        source = load_class_source(
            args.class_from,
            args.shard.device(args.device),
            data.num_classes,
            tuple(data.x.shape[1:]),
            key=signing_key(args),
        )
        if prior == "surrogate" and source[0] != "surrogate":
            raise InvalidParameterError(
                f"--prior surrogate needs --class-from a surrogate checkpoint; {args.class_from} is a base model"
            )
        if prior == "surrogate" and not np.isclose(source[1].sigma, smooth.sigma):
            raise InvalidParameterError(
                f"--prior surrogate: the surrogate was trained at sigma={source[1].sigma:g}, "
                f"not {smooth.sigma:g}; use --prior auto or kt"
            )
    certifier = EProcessCertifier(
        smooth,
        args.alpha,
        prior="auto" if prior == "surrogate" else prior,
        tolerance=args.tolerance,
        max_samples=args.max_samples,
        class_choice=class_choice,
        n0=args.n0,
        target_radius=args.target_radius,
        policy="best_radius" if args.target_radius is None else "target_radius",
        price=args.price,
    )

    def certify(x, idx):
        if source is None:
            return certifier.certify(x, indices=idx)
        classes, p_tilde = classes_from(*source, x)
        per_input = None
        if prior == "surrogate":
            per_input = stats.surrogate_prior(p_tilde, source[1].kappa, source[1].w)
        return certifier.certify(x, classes=classes, prior=per_input, indices=idx)

    certificates = certify_split(data, certify, SEQUENTIAL_CHUNK, not args.no_progress, "sequential", args.shard)
    if certificates is None:
        return 0  # rank 0 writes the merged results
    return write_results(
        args.out,
        data,
        certificates,
        dict(
            meta,
            prior=args.prior,
            target_radius=args.target_radius,
            tolerance=args.tolerance,
            price=args.price,
            max_samples=args.max_samples,
            class_choice=None if source else class_choice,
            class_from=args.class_from,
            class_source=source[0] if source else None,
            n0=args.n0 if source is None and class_choice == "pilot" else 0,
            mean_stop_time=float(np.mean([c.stop_time for c in certificates])) if certificates else None,
        ),
        overwrite=args.overwrite,
    )


def run_deterministic(args: argparse.Namespace) -> int:
    from data_gen.datasets import load_split
    from data_gen.models import load_model

    from ..core.deterministic import DeterministicCertifier

    check_new_outputs(args, *results_paths(args.out))
    data = load_split(args.dataset, args.split, data_root=args.data_root, download=args.download, limit=args.limit)
    data.require_labels("the results file (its label and correct columns: certified accuracy)")
    loaded = load_model(args.model, device=args.device, num_classes=data.num_classes, input_shape=data.input_shape)
    certifier = DeterministicCertifier(loaded.model, args.method, max_radius=args.max_radius)
    certificates = certify_split(
        data, lambda x, idx: certifier.certify(x, idx), DETERMINISTIC_CHUNK, not args.no_progress, args.method
    )
    meta = provenance(
        args,
        method=args.method,
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        images=len(data),
        model_sha256=loaded.sha256,
        max_radius=args.max_radius,
        guarantee="deterministic: the base network's prediction is constant on the l2 ball",
    )
    return write_results(args.out, data, certificates, meta, overwrite=args.overwrite)
