"""Training the surrogate from counts files: ``surrogate-cert train``.

The surrogate model and its training on arrays are core (``core.surrogate``); this stage reads one
or more counts files (the ``surrogate`` split, whose images the built-in base model never saw, and
optionally the ``train`` split) and the images they name, trains, tunes the fallback prior on the
held-out rows, records where everything came from (each file, and every image by dataset index),
and saves the checkpoint.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from data_gen.datasets import dataset_key
from data_gen.models import load_model
from data_gen.query_log import is_query_log, read_query_log
from data_gen.store import CountsMismatchError, check_counts_for, index_ranges, read_counts

from ..core.architectures import CHECKPOINT_FILE_KINDS, check_finite_weights, export_program, load_checkpoint
from ..core.errors import (
    InvalidInputError,
    InvalidParameterError,
    ModelError,
    check_count,
    check_positive,
    check_seed,
)
from ..core.files import check_outputs, sniff
from ..core.hashing import IMAGE_HASH_RULE, image_hashes, pack_hashes, sha256_file
from ..core.signing import resolve_key
from ..core.smoothing import NOISE_SCHEME_V2
from ..core.surrogate import Surrogate

__all__ = ["train_surrogate", "builtin_base_arch", "check_training_options", "counts_base_model", "AUTO"]

AUTO = "auto"
"""``init_from_base`` value: the base model the counts were made with, when its file is still there
(same SHA-256); else from scratch, with the reason in the surrogate's ``meta["init_skipped"]``."""


# long: most of it is the numpydoc docstring (each option, its units, its errors); the code fits a screen
def train_surrogate(
    counts_path,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    init_from_base: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    holdout: float = 0.1,
    patience: int = 8,
    progress: bool = True,
    overwrite: bool = True,
    key: bytes | str | None = None,
) -> Surrogate:
    """Train a surrogate on one or more counts files and save it to ``out``; returns it.

    ``counts_path`` is one counts file or a list of them (e.g. the ``surrogate`` split, optionally with
    the ``train`` split; an unlabeled pool's counts; a query log of the hybrid's fallback samples,
    ``data_gen.query_log``): of one sigma, class count, image shape and base model, complete, with no
    dataset index twice within a dataset. Files may come from different sources (a pool beside a split).
    Rows may hold different sample numbers (the soft label of a row is ``counts / its sum``). The images
    are read from the dataset and split each file records (a query log holds its own).
    ``init_from_base`` (any base model spec, or ``"auto"``: the one the counts were made with) starts
    the surrogate from the base model: the measured best flow (on MNIST the surrogate's class then
    agrees with the Monte Carlo majority on 99.6% of calibration points, against 98.0% from scratch).
    Without ``arch`` the surrogate takes the base model's own architecture: a ``train-base``
    checkpoint's, or the network of a TorchScript / ``torch.export`` model (carried in the surrogate's
    checkpoint; a factory model is exported with ``torch.export`` first). With ``arch`` a user's model
    is mapped onto that built-in architecture (``core.surrogate.copy_weights``). With no base model the
    architecture follows the input shape (``default_arch``). ``kappa`` and ``w`` of the fallback prior
    are tuned on the held-out rows.

    Parameters
    ----------
    counts_path : str, os.PathLike or list of them
        Complete counts files (at least 2 rows in all); ``calibrate`` later refuses calibration images
        the surrogate was trained on (by dataset index).
    out : str or os.PathLike
        The surrogate checkpoint to write.
    arch : str, optional
        Built-in architecture name; with a built-in ``init_from_base`` it must be the base model's.
        Default: the base model's own, else ``default_arch`` of the input shape.
    init_from_base : str, optional
        A base model spec whose weights (and, without ``arch``, layout) the surrogate starts from, or
        ``"auto"`` (``AUTO``): the counts' base model when its file is found with the recorded SHA-256.
    epochs : int, optional
        Most epochs (``Surrogate.fit``).
    seed : int, optional
        Seed of the initialisation, the holdout split and the batch order.
    data_root : str, optional
        Folder of the torchvision datasets.
    device : str, torch.device or None, optional
        Where to train.
    batch_size : int, optional
        Images per optimisation step.
    lr : float, optional
        AdamW learning rate; default 1e-3 when starting from the base model (fine-tuning), else 2e-3.
    holdout : float, optional
        Share of the rows kept out for early stopping and prior tuning, in [0, 1).
    patience : int, optional
        Epochs without held-out improvement before stopping.
    progress : bool, optional
        Show a progress bar.
    overwrite : bool, optional
        Replace an existing ``out`` (default); if false, an existing ``out`` is refused before
        training (``OutputExistsError``) and kept.
    key : bytes or str, optional
        Signing key (default: the environment's, ``core.signing.resolve_key``): with one, every counts
        file must be signed under it and the surrogate is signed.

    Returns
    -------
    Surrogate
        The trained surrogate; its ``meta`` records each counts file (``counts_files``), base model,
        training and prior-tuning provenance, and the dataset indices of every image it was trained
        on (``train_index_ranges`` for the first file's dataset, ``train_index_ranges_by_dataset`` for
        each, as ``data_gen.store.index_ranges``) and their content hashes (``image_hashes``,
        ``core.hashing.pack_hashes``), which ``calibrate`` keeps out of the calibration.

    Raises
    ------
    InvalidInputError
        If a counts file is incomplete, the files disagree (dataset, sigma, classes, image shape, base
        model) or share images, or they hold fewer than 2 rows.
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    InvalidParameterError
        If ``arch`` contradicts a built-in base model's, or a training option (``lr``, ``batch_size``,
        ``epochs``, ``holdout``, ``patience``, ``seed``) is out of range.
    CountsSignatureError
        If a key is configured and a counts file is not signed under it.
    StoreError
        If a counts file is missing or unreadable.
    DatasetError
        If the images it names cannot be loaded.
    ModelError
        If the base model cannot be loaded, is not a base model, does not fit the counts' images and
        classes or the architecture, or ``out`` cannot be written.
    """
    started = time.perf_counter()
    check_training_options(lr=lr, batch_size=batch_size, epochs=epochs, holdout=holdout, patience=patience, seed=seed)
    secret = resolve_key(key)
    if not overwrite:
        check_outputs([out], overwrite=False)
    paths = [counts_path] if isinstance(counts_path, (str, os.PathLike)) else list(counts_path)
    if not paths:
        raise InvalidInputError("give at least one counts file to train on")
    files = [read_query_log(p) if is_query_log(p) else read_counts(p) for p in paths]
    attrs = files[0].attrs
    _check_training_files(paths, files, secret)
    images = torch.cat([f.images(data_root) for f in files])
    # Soft labels: each row's counts over its own sample number, so files of different n mix.
    counts = np.concatenate([f.counts for f in files])
    input_shape = tuple(attrs.get("input_shape") or images.shape[1:])
    num_classes = int(attrs["num_classes"])
    init_from_base, base, arch, network, skipped = _starting_point(
        init_from_base, arch, attrs, num_classes, input_shape, device
    )
    surrogate = Surrogate.build(
        input_shape,
        num_classes,
        float(attrs["sigma"]),
        arch=arch,
        init_from=base,
        seed=seed,
        device=device,
        network=network,
    )
    mapping = getattr(surrogate, "init_mapping_", None)
    if lr is None:
        lr = 1e-3 if init_from_base is not None else 2e-3
    surrogate.fit(
        images,
        counts,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        holdout=holdout,
        patience=patience,
        seed=seed,
        progress=progress,
    )
    tune_rows = surrogate.holdout_rows_ if len(surrogate.holdout_rows_) else surrogate.train_rows_
    surrogate.tune_prior(images[tune_rows], counts[tune_rows])
    surrogate.meta = _provenance(
        surrogate,
        paths,
        files,
        images,
        counts,
        tune_rows,
        seed=seed,
        init_from_base=init_from_base,
        mapping=mapping,
        skipped=skipped,
        training=dict(lr=lr, batch_size=batch_size, holdout=holdout, patience=patience),
        started=started,
    )
    check_finite_weights(surrogate.model.state_dict(), f"the surrogate trained for {out}")
    surrogate.save(out, overwrite=overwrite, key=secret)
    return surrogate


def _starting_point(init_from_base, arch, attrs, num_classes: int, input_shape, device):
    """What the surrogate starts from: ``(init_from_base, base model, arch, network, why skipped)``.

    ``"auto"`` takes the counts' base model when its file is found, and starts from scratch (the reason
    in ``skipped``) when it is not or does not fit; an explicit base model that does not fit is an error.
    """
    base, network, skipped = None, None, None
    if init_from_base == AUTO:
        init_from_base, skipped = counts_base_model(attrs, num_classes, input_shape)
        if init_from_base is not None:
            try:
                base, arch, network = _base_for_init(init_from_base, arch, input_shape, num_classes, device)
            except (ModelError, InvalidParameterError) as exc:  # e.g. --arch of another layout: from scratch
                init_from_base, skipped = None, str(exc)
    elif init_from_base is not None:
        base, arch, network = _base_for_init(init_from_base, arch, input_shape, num_classes, device)
    return init_from_base, base, arch, network, skipped


def _provenance(
    surrogate: Surrogate,
    paths,
    files,
    images,
    counts,
    tune_rows,
    *,
    seed: int,
    init_from_base,
    mapping,
    skipped,
    training: dict,
    started: float,
) -> dict:
    """The trained surrogate's ``meta``: each counts file, every training image (by dataset index and by
    content), the base model it started from, the training run and the prior tuning."""
    attrs = files[0].attrs
    last = surrogate.history_[surrogate.best_epoch_ - 1] if surrogate.history_ else {}
    file_records = [
        dict(
            path=os.path.abspath(p),
            sha256=sha256_file(p),
            dataset=str(f.attrs["dataset"]),
            split=str(f.attrs["split"]),
            rows=len(f),
            n=int(f.attrs["n"]),
        )
        for p, f in zip(paths, files)
    ]
    splits = "+".join(dict.fromkeys(r["split"] for r in file_records))
    return dict(
        dataset=str(attrs["dataset"]),
        split=splits,
        counts_sha256=file_records[0]["sha256"],
        counts_files=file_records,
        counts_n=int(attrs["n"]) if len(files) == 1 else max(r["n"] for r in file_records),
        counts_rows=int(len(counts)),
        **_training_images_record(files, images),
        base_model_sha256=attrs.get("model_sha256"),
        noise_scheme=attrs.get("noise_scheme"),  # calibrate and certify refuse counts of the other family
        seed=int(seed),
        epochs_run=len(surrogate.history_),
        best_epoch=int(surrogate.best_epoch_),
        train_loss=last.get("train_loss"),
        holdout_loss=last.get("holdout_loss"),
        init_from_base=os.path.abspath(init_from_base)
        if init_from_base and os.path.exists(init_from_base)
        else init_from_base,
        init_mapping=mapping,
        init_skipped=skipped,
        training=training,
        prior_tuning=dict(
            criterion="log marginal likelihood of held-out train counts",
            rows=int(len(tune_rows)),
            table=surrogate.prior_table_,
        ),
        seconds=time.perf_counter() - started,
    )


def check_training_options(
    *, lr: float | None, batch_size: int, epochs: int | None, holdout: float, patience: int, seed: int
) -> None:
    """Refuse (``InvalidParameterError``) a training option out of range, before any file is read."""
    if lr is not None:
        check_positive("lr", lr)
    check_count("batch_size", batch_size)
    if epochs is not None:
        check_count("epochs", epochs)
    check_count("patience", patience)
    check_seed(seed)
    if not 0 <= holdout < 1:
        raise InvalidParameterError(f"holdout must be a share in [0, 1), got {holdout}")


def _check_training_files(paths, files, secret: bytes | None) -> None:
    """Refuse training files that disagree (sigma, classes, image shape, base model), are incomplete, repeat a
    dataset index within one dataset, or hold fewer than 2 rows in all. Sources may differ."""
    attrs = files[0].attrs
    try:
        for path, counts_file in zip(paths, files):
            check_counts_for(
                counts_file,
                path,
                sigma=float(attrs["sigma"]),
                num_classes=int(attrs["num_classes"]),
                input_shape=attrs["input_shape"],
                model_sha256=attrs.get("model_sha256"),
                complete=True,
                key=secret,
                noise_scheme=attrs.get("noise_scheme") or NOISE_SCHEME_V2,
            )
    except CountsMismatchError as exc:
        raise InvalidInputError(f"{exc} (all training counts files must agree with {paths[0]})") from None
    for key, indices in _indices_by_dataset(files, logs=False).items():
        if len(np.unique(indices)) != len(indices):
            raise InvalidInputError(
                f"the training counts files share images of {key} (the same dataset index twice); give each split once"
            )
    total = sum(len(f) for f in files)
    if total < 2:
        raise InvalidInputError(f"{', '.join(map(str, paths))} hold {total} rows; a surrogate needs at least 2")


def _indices_by_dataset(files, logs: bool = True) -> dict[str, np.ndarray]:
    """Dataset indices per dataset (canonical key): counts files by their dataset, query logs (with ``logs``)
    by the source their known indices refer to."""
    out: dict[str, list] = {}
    for f in files:
        if f.attrs.get("split") == "queries":
            source = f.attrs.get("source_dataset")
            if logs and source:
                out.setdefault(dataset_key(source), []).append(f.indices[f.indices >= 0])
            continue
        out.setdefault(dataset_key(str(f.attrs["dataset"])), []).append(f.indices)
    return {k: np.concatenate(v) for k, v in out.items()}


def _training_images_record(files, images: torch.Tensor) -> dict:
    """What ``calibrate`` reads to keep the training images out of a calibration: index ranges (the first
    file's dataset; every dataset) and the content hash of every image."""
    by_dataset = _indices_by_dataset(files)
    first = dataset_key(str(files[0].attrs["dataset"]))
    return dict(
        train_index_ranges=index_ranges(by_dataset.get(first, np.zeros(0, np.int64))),
        train_index_ranges_by_dataset={k: index_ranges(v) for k, v in by_dataset.items()},
        image_hashes=pack_hashes(image_hashes(images)),
        image_hash_rule=IMAGE_HASH_RULE,
    )


def _base_for_init(spec: str, arch: str | None, input_shape, num_classes: int, device):
    """``(module, arch, network)``: what starts the surrogate, and the surrogate's architecture.

    A built-in checkpoint brings its architecture (``arch`` must agree). Any other model spec: with
    ``arch``, its weights are mapped onto that built-in architecture by ``core.surrogate.copy_weights``
    (which refuses a layout that does not fit); without, the surrogate is the model itself, carried as
    a serialized program (``network``): a TorchScript or ``torch.export`` file's bytes, or a factory
    model exported with ``torch.export``.
    """
    builtin = os.path.isfile(spec) and sniff(spec) in CHECKPOINT_FILE_KINDS
    if builtin:
        base_model, base_header = load_checkpoint(spec, kind="base")
        if tuple(base_header["input_shape"]) != tuple(input_shape) or int(base_header["num_classes"]) != num_classes:
            raise ModelError(
                f"--init-from-base {spec} is a model for {tuple(base_header['input_shape'])} "
                f"images and {base_header['num_classes']} classes, but the counts are for "
                f"{tuple(input_shape)} and {num_classes}; give the base model of this dataset"
            )
        if arch is not None and arch != base_header["arch"]:
            raise InvalidParameterError(
                f"--arch {arch} differs from the base model's architecture {base_header['arch']}; drop one of them"
            )
        return base_model, base_header["arch"], None
    loaded = load_model(spec, device="cpu", num_classes=num_classes, input_shape=input_shape)
    if arch is not None:
        return loaded.model, arch, None
    if not any(p.requires_grad for p in loaded.model.parameters()):
        raise ModelError(
            f"--init-from-base {spec} has no trainable parameters (fixed weights), so a surrogate of its "
            "layout cannot learn; give --arch to train a built-in architecture, or --no-init-from-base"
        )
    _check_output_width(loaded.model, input_shape, num_classes, spec)
    kind = sniff(spec) if os.path.isfile(spec) else "factory"
    if kind in ("torchscript", "torch-export"):
        with open(spec, "rb") as fh:
            return None, kind, fh.read()
    return None, "torch-export", export_program(loaded.model, input_shape)


def _check_output_width(model, input_shape, num_classes: int, spec: str) -> None:
    """One forward pass of two images: the model must return ``2 x num_classes`` scores."""
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *input_shape))
    except Exception as exc:  # user code: any failure is a model that does not fit the images
        raise ModelError(
            f"--init-from-base {spec} fails on images of shape {tuple(input_shape)} "
            f"({type(exc).__name__}); give the base model of this dataset"
        ) from None
    if tuple(getattr(out, "shape", ())) != (2, num_classes):
        raise ModelError(
            f"--init-from-base {spec} returns scores of shape {tuple(getattr(out, 'shape', ()))} for 2 "
            f"images, not 2 x {num_classes}; give the base model of this dataset"
        )


def counts_base_model(attrs, num_classes: int, input_shape) -> tuple[str | None, str | None]:
    """``(spec, None)`` of the base model a counts file was made with, or ``(None, reason)`` if it is not found.

    Found means: the file the counts record as ``model_source`` loads, fits the counts' classes and
    image shape, and has the SHA-256 they record (a base model changed since would start the surrogate
    from another model than the one its counts describe). A factory (``module:factory``) is never
    imported because a file names it: files are data, and only the user names code to run.

    Parameters
    ----------
    attrs : mapping
        The counts file's attributes (``data_gen.store.read_attrs``).
    num_classes : int
        The counts' classes.
    input_shape : sequence of int
        The counts' image shape ``(C, H, W)``.

    Returns
    -------
    spec : str or None
        The base model spec to start from.
    reason : str or None
        Why there is none (for the command's output), else None.
    """
    source, digest = attrs.get("model_source"), attrs.get("model_sha256")
    if not source:
        return None, "the counts do not record their base model"
    source = str(source)
    if not os.path.isfile(source):
        if ":" in source:  # a file names no code to run: a factory is imported only when the user names it
            return None, (
                f"the counts' base model is the factory {source}; give it with --init-from-base to start from it"
            )
        return None, f"the counts' base model {source} is not there any more"
    try:
        loaded = load_model(source, device="cpu", num_classes=num_classes, input_shape=input_shape)
    except ModelError as exc:
        return None, f"the counts' base model does not load ({exc})"
    if digest and loaded.sha256 != digest:
        return None, f"the counts' base model {source} has changed since the counts were made (SHA-256 differs)"
    return source, None


def builtin_base_arch(spec: str | os.PathLike) -> str | None:
    """The architecture of a built-in base checkpoint (``train-base``), or None for any other model spec.

    The pipeline starts the surrogate from the base model's weights when the two architectures agree.
    """
    spec = os.fspath(spec)
    if not (os.path.isfile(spec) and sniff(spec) in CHECKPOINT_FILE_KINDS):
        return None
    try:
        _, header = load_checkpoint(spec, kind="base")
    except ModelError:
        return None
    return str(header["arch"])
