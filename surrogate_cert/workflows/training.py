"""Training the surrogate from a counts file: ``surrogate-cert train``.

The surrogate model and its training on arrays are core (``core.surrogate``); this stage reads a
``train`` counts file and the images it names, trains, tunes the fallback prior on the held-out
part of the same split, records where everything came from, and saves the checkpoint.
"""
from __future__ import annotations

import os
import time

import torch

from data_gen.store import CountsMismatchError, check_counts_for, index_ranges, read_counts

from ..core.architectures import load_checkpoint
from ..core.errors import InvalidInputError, InvalidParameterError, ModelError
from ..core.files import check_outputs
from ..core.hashing import sha256_file
from ..core.surrogate import Surrogate

__all__ = ["train_surrogate"]


def train_surrogate(
    counts_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    init_from_base: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    holdout: float = 0.1,
    progress: bool = True,
    overwrite: bool = True,
) -> Surrogate:
    """Train a surrogate on a ``train`` counts file and save it to ``out``; returns it.

    The images are read from the dataset and split the counts file records (``load_split(...)
    .take(indices)``). The default architecture follows the recorded input shape; ``init_from_base``
    (a checkpoint from ``train-base``) starts from the base model's weights and architecture.
    ``kappa`` and ``w`` of the fallback prior are tuned on the held-out part of this split.

    Parameters
    ----------
    counts_path : str or os.PathLike
        A complete counts file of the ``train`` split (at least 2 rows).
    out : str or os.PathLike
        The surrogate checkpoint to write.
    arch : str, optional
        Architecture name; must match the base model's with ``init_from_base``.
    init_from_base : str, optional
        A base-model checkpoint whose weights and architecture the surrogate starts from.
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
        AdamW learning rate.
    holdout : float, optional
        Share of the rows kept out for early stopping and prior tuning, in [0, 1).
    progress : bool, optional
        Show a progress bar.
    overwrite : bool, optional
        Replace an existing ``out`` (default); if false, an existing ``out`` is refused before
        training (``OutputExistsError``) and kept.

    Returns
    -------
    Surrogate
        The trained surrogate; its ``meta`` records the counts file, base model, training and
        prior-tuning provenance, and the dataset indices of every image it was trained on
        (``train_index_ranges``, as ``data_gen.store.index_ranges``), which ``calibrate`` keeps out
        of the calibration.

    Raises
    ------
    InvalidInputError
        If the counts file is incomplete or has fewer than 2 rows.
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    InvalidParameterError
        If ``arch`` contradicts the base model's, or a training option is out of range.
    StoreError
        If the counts file is missing or unreadable.
    DatasetError
        If the images it names cannot be loaded.
    ModelError
        If the base checkpoint cannot be loaded, is not a base model, does not fit the counts' images
        and classes, or ``out`` cannot be written.
    """
    started = time.perf_counter()
    if not overwrite:
        check_outputs([out], overwrite=False)
    counts_file = read_counts(counts_path)
    attrs = counts_file.attrs
    try:
        check_counts_for(counts_file, counts_path, complete=True)
    except CountsMismatchError as exc:
        raise InvalidInputError(str(exc)) from None
    if len(counts_file) < 2:
        raise InvalidInputError(f"{counts_path} holds {len(counts_file)} rows; a surrogate needs at least 2")
    images = counts_file.images(data_root)
    input_shape = tuple(attrs.get("input_shape") or images.shape[1:])
    num_classes = int(attrs["num_classes"])
    base = None
    if init_from_base is not None:
        base_model, base_header = load_checkpoint(init_from_base, kind="base")
        if (tuple(base_header["input_shape"]) != input_shape or int(base_header["num_classes"]) != num_classes):
            raise ModelError(f"--init-from-base {init_from_base} is a model for {tuple(base_header['input_shape'])} "
                             f"images and {base_header['num_classes']} classes, but the counts are for {input_shape} and "
                             f"{num_classes}; give the base model of this dataset")
        if arch is not None and arch != base_header["arch"]:
            raise InvalidParameterError(
                f"--arch {arch} differs from the base model's architecture {base_header['arch']}; drop one of them"
            )
        arch, base = base_header["arch"], base_model
    surrogate = Surrogate.build(input_shape, num_classes, float(attrs["sigma"]), arch=arch, init_from=base,
                                seed=seed, device=device)
    surrogate.fit(images, counts_file.counts, epochs=epochs, batch_size=batch_size, lr=lr, holdout=holdout,
                  seed=seed, progress=progress)
    tune_rows = surrogate.holdout_rows_ if len(surrogate.holdout_rows_) else surrogate.train_rows_
    surrogate.tune_prior(images[tune_rows], counts_file.counts[tune_rows])
    last = surrogate.history_[surrogate.best_epoch_ - 1] if surrogate.history_ else {}
    surrogate.meta = dict(
        dataset=str(attrs["dataset"]),
        split=str(attrs["split"]),
        counts_sha256=sha256_file(counts_path),
        counts_n=int(attrs["n"]),
        counts_rows=len(counts_file),
        train_index_ranges=index_ranges(counts_file.indices),
        base_model_sha256=attrs.get("model_sha256"),
        seed=int(seed),
        epochs_run=len(surrogate.history_),
        best_epoch=int(surrogate.best_epoch_),
        train_loss=last.get("train_loss"),
        holdout_loss=last.get("holdout_loss"),
        init_from_base=os.path.abspath(init_from_base) if init_from_base else None,
        prior_tuning=dict(criterion="log marginal likelihood of held-out train counts",
                          rows=int(len(tune_rows)), table=surrogate.prior_table_),
        seconds=time.perf_counter() - started,
    )
    surrogate.save(out, overwrite=overwrite)
    return surrogate
