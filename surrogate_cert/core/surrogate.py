"""The surrogate: a network on the clean image that predicts the base model's class frequencies under noise.

Trained on the ``train`` split's counts with soft-label cross-entropy against ``q = counts / n``
(``loss = -sum_c q_c log softmax(s(x))_c``), early-stopped on a held-out part of that split. It
certifies nothing by itself: ``calibration`` turns its radius into a certified one, and the
sequential fallback uses its ``p~`` only as a prior (validity never depends on it).

The fallback prior ``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` (``stats.surrogate_prior``)
is tuned here, on the train split only: ``(kappa, w)`` from a small grid maximise the log marginal
likelihood of the held-out train counts of the surrogate's class (``stats.prior_log_evidence``).

Training from a counts file (images read from the dataset the file names) is a workflow:
``surrogate_cert.workflows.training.train_surrogate``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .architectures import PROGRAM_ARCHITECTURES, build, default_arch, load_checkpoint, load_program, save_checkpoint
from .errors import InvalidInputError, InvalidParameterError, ModelError, check_count, check_positive, check_sigma
from .hashing import sha256_file
from .smoothing import check_images, resolve_device
from .stats import check_prior_weight, prior_log_evidence, probit_confidence

__all__ = ["Surrogate", "tune_prior", "copy_weights", "meta_problems", "KAPPA_GRID", "W_GRID"]

KAPPA_GRID = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
"""Candidate prior concentrations ``kappa`` (pseudo-samples the surrogate's ``p~`` is worth)."""

W_GRID = (0.05, 0.1, 0.2, 0.5)
"""Candidate KT weights ``w``: at most ``log(1/w)`` of evidence lost against KT."""

DEFAULT_KAPPA = 50.0
DEFAULT_W = 0.2


# --------------------------------------------------------------------------- prior tuning (numbers only)


def tune_prior(
    counts_top, n, p_tilde, kappas: Sequence[float] = KAPPA_GRID, weights: Sequence[float] = W_GRID
) -> tuple[float, float, list[dict]]:
    """``(kappa, w, table)`` maximising ``stats.prior_log_evidence`` over the grid (train-split counts only).

    The prior must be fixed before any sequential sample of a deployment input is drawn, so tune it
    on counts the sequential test never sees (the train split); the choice moves the fallback's
    power, never its validity.

    Parameters
    ----------
    counts_top : array_like of int
        Per input, the count of the surrogate's class out of ``n`` noisy evaluations.
    n : int or array_like of int
        Noisy evaluations per input (one number, or one per input).
    p_tilde : array_like of float
        The surrogate's probability of its class, per input.
    kappas : sequence of float, optional
        Candidate concentrations ``kappa`` (> 0); default ``KAPPA_GRID``.
    weights : sequence of float, optional
        Candidate KT weights ``w`` (in [0, 1]); default ``W_GRID``.

    Returns
    -------
    kappa : float
        The best concentration.
    w : float
        The best KT weight.
    table : list of dict
        One row per grid point: ``kappa``, ``w`` and ``log_evidence``.

    Raises
    ------
    InvalidParameterError
        If a grid value is out of range or ``p_tilde`` is not finite (counts are not checked).
    """
    table = [
        dict(kappa=float(kappa), w=float(w), log_evidence=prior_log_evidence(counts_top, n, p_tilde, kappa, w))
        for kappa in kappas
        for w in weights
    ]
    best = max(table, key=lambda row: row["log_evidence"])
    return best["kappa"], best["w"], table


def weights_digest(header_json: str, state: dict) -> str:
    """SHA-256 of a header (JSON text) and a state dict's tensors (names and bytes, in order).

    Parameters
    ----------
    header_json : str
        The header as JSON text (canonical: sorted keys).
    state : dict
        Tensor name to tensor, e.g. ``module.state_dict()``; tensors are read on the CPU.

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256(header_json.encode())
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def meta_problems(meta: dict) -> list[str]:
    """What in a surrogate's metadata contradicts the rest of it (what the unkeyed checks can catch).

    A surrogate written by ``train`` records its training files (``counts_files``: path, SHA-256,
    split, rows), their splits joined as ``split``, the number of training images ``counts_rows`` and
    the images themselves (``train_index_ranges``). Files written before those fields existed lack them
    all and are judged by ``calibrate`` on ``split`` alone; a file with ``counts_files`` but without
    training indices, or whose ``split`` / ``counts_rows`` disagree with its files, was edited. A
    consistent edit of every field is beyond these checks (a keyed signature catches it).

    Parameters
    ----------
    meta : dict
        The checkpoint's ``meta``.

    Returns
    -------
    list of str
        One phrase per contradiction (empty when none).
    """
    files = meta.get("counts_files")
    if files is None:
        return []
    if not (isinstance(files, list) and files and all(isinstance(f, dict) for f in files)):
        return ["counts_files is not a list of file records"]
    problems = []
    ranges = meta.get("train_index_ranges")
    if ranges is None:
        problems.append("it names its training files but records no training indices")
    splits = "+".join(dict.fromkeys(str(f.get("split")) for f in files))
    if meta.get("split") != splits:
        problems.append(f"split {meta.get('split')!r} but its training files are of {splits!r}")
    rows = sum(int(f.get("rows") or 0) for f in files)
    if meta.get("counts_rows") is not None and meta.get("counts_rows") != rows:
        problems.append(f"counts_rows {meta.get('counts_rows')!r} but its training files hold {rows} rows")
    by_dataset = meta.get("train_index_ranges_by_dataset")
    if isinstance(by_dataset, dict):  # several sources: every dataset's ranges together
        ranges = [r for part in by_dataset.values() if isinstance(part, list) for r in part]
    if isinstance(ranges, list) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in ranges):
        covered = sum(int(hi) - int(lo) for lo, hi in ranges)
        # A query log's rows may have no dataset index (a query from outside any dataset): fewer, never more.
        logs = any(str(f.get("split")) == "queries" for f in files)
        if covered > rows or (covered != rows and not logs):
            problems.append(f"train_index_ranges cover {covered} images but its training files hold {rows} rows")
    return problems


def copy_weights(target: nn.Module, source: nn.Module, arch: str = "the architecture") -> str:
    """Copy ``source``'s weights into ``target``: by name, or in order where only the shapes match.

    A built-in base checkpoint has the surrogate's parameter names; a TorchScript or ``torch.export``
    model of the same layout (e.g. a user's 784-512-256-10 MLP against ``--arch mlp``) may name them
    differently, and is mapped tensor by tensor in ``state_dict`` order when every shape matches. Only
    the starting point of training changes, never a guarantee (calibration measures the surrogate it
    gets).

    Parameters
    ----------
    target : torch.nn.Module
        The surrogate network (its weights are replaced).
    source : torch.nn.Module
        The base model.
    arch : str, optional
        The target's architecture name, for the message.

    Returns
    -------
    str
        ``"by name"`` or ``"in order"``.

    Raises
    ------
    ModelError
        If neither the names nor the ordered shapes match (the first difference is named).
    """
    try:
        source_state = source.state_dict()
    except Exception as exc:  # a scripted or exported module of any kind: say what failed, in one line
        raise ModelError(
            f"--init-from-base: cannot read the base model's weights ({type(exc).__name__}); drop --init-from-base"
        ) from None
    target_state = target.state_dict()
    source_shapes = [(k, tuple(v.shape)) for k, v in source_state.items()]
    target_shapes = [(k, tuple(v.shape)) for k, v in target_state.items()]
    if source_shapes == target_shapes:
        target.load_state_dict(source_state)
        return "by name"
    if [s for _, s in source_shapes] == [s for _, s in target_shapes]:
        with torch.no_grad():
            for tensor, value in zip(target_state.values(), source_state.values()):
                tensor.copy_(value.to(tensor.dtype))
        return "in order"
    for i, ((t_name, t_shape), (s_name, s_shape)) in enumerate(zip(target_shapes, source_shapes)):
        if t_shape != s_shape:
            where = f"tensor {i} is {s_name} {s_shape} in the base model but {t_name} {t_shape} in {arch}"
            break
    else:
        where = f"the base model has {len(source_shapes)} tensors, {arch} has {len(target_shapes)}"
    raise ModelError(
        f"--init-from-base: the base model's weights do not fit architecture {arch} ({where}); "
        "choose the --arch of the base model's layout (e.g. --arch mlp for a 784-512-256-10 MLP), "
        "or drop --init-from-base"
    )


# --------------------------------------------------------------------------- the model wrapper


class Surrogate:
    """A trained surrogate network with what it was trained for (sigma, classes, input shape).

    ``predict_proba(x)`` gives ``N x K`` class probabilities (float64); ``predict(x)`` the class
    ``A = argmax`` and ``p~ = P(A)``. ``kappa`` and ``w`` parametrise the sequential fallback's
    prior. ``fingerprint()`` is a SHA-256 of the weights and metadata, which calibrations bind to.
    The surrogate certifies nothing by itself.

    Parameters
    ----------
    model : torch.nn.Module
        The network: pixels in [0, 1] (``N x C x H x W``) to ``N x K`` scores. It is moved to
        ``device`` and put in eval mode.
    arch : str
        Architecture name (``core.architectures``), recorded in checkpoints.
    input_shape : sequence of int
        ``(C, H, W)`` of one image; inputs are checked against it.
    num_classes : int
        Number of classes ``K`` (>= 2).
    sigma : float
        Noise level the surrogate predicts for (l2, input units); finite and > 0.
    kappa : float, optional
        Concentration of the fallback prior's surrogate component: pseudo-samples the surrogate's
        ``p~`` is worth (finite, > 0).
    w : float, optional
        Weight of the fallback prior's KT component, in [0, 1].
    meta : dict, optional
        Provenance stored in the checkpoint (dataset, counts and base-model hashes, ...).
    device : str, torch.device or None, optional
        Where to run (``resolve_device``).
    batch_size : int, optional
        Images per forward pass when predicting (>= 1).
    network : bytes, optional
        For an ``arch`` of ``core.architectures.PROGRAM_ARCHITECTURES`` (a surrogate with the layout of
        a user's base model): the serialized program ``model`` was rebuilt from, saved with it; its
        SHA-256 is part of ``header()`` and so of the fingerprint.

    Raises
    ------
    InvalidParameterError
        If ``num_classes``, ``sigma``, ``kappa``, ``w`` or ``batch_size`` is out of range.
    InvalidInputError
        If CUDA is requested but unavailable.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        input_shape: Sequence[int],
        num_classes: int,
        sigma: float,
        kappa: float = DEFAULT_KAPPA,
        w: float = DEFAULT_W,
        meta: dict | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 1024,
        network: bytes | None = None,
    ):
        self.arch = str(arch)
        self.network = network
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.sigma = check_sigma(sigma)
        self.kappa = check_positive("kappa", kappa)
        self.w = check_prior_weight(w)
        self.meta = dict(meta or {})
        self.device = resolve_device(device)
        self.batch_size = check_count("batch_size", batch_size)
        self.model = model.to(self.device).eval()
        self.file_sha256: str | None = None
        self.init_mapping_: str | None = None  # how ``build`` set the starting weights, if it did

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        input_shape: Sequence[int],
        num_classes: int,
        sigma: float,
        *,
        arch: str | None = None,
        init_from: nn.Module | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        network: bytes | None = None,
    ) -> Surrogate:
        """An untrained surrogate (``arch`` defaults to ``default_arch(input_shape)``), seeded.

        ``init_from`` copies the weights of a module of the same architecture (the base model). With
        ``network`` (``arch`` one of ``PROGRAM_ARCHITECTURES``) the surrogate is that serialized base
        model itself: its layout and its weights are the starting point.

        Parameters
        ----------
        input_shape : sequence of int
            ``(C, H, W)`` of one image.
        num_classes : int
            Number of classes ``K`` (>= 2).
        sigma : float
            Noise level the surrogate is for (l2, input units).
        arch : str, optional
            Architecture name; default ``default_arch(input_shape)``.
        init_from : torch.nn.Module, optional
            A module whose weights are copied (``copy_weights``: by name, or in order where only the
            shapes match: a TorchScript or ``torch.export`` base model of the same layout).
        seed : int, optional
            Seed of the weight initialisation; the caller's global CPU RNG state is preserved.
        device : str, torch.device or None, optional
            Where to run (``resolve_device``).
        network : bytes, optional
            A serialized ``torch.export`` program or TorchScript module (``arch`` says which).

        Returns
        -------
        Surrogate
            With the default ``kappa`` and ``w`` (``tune_prior`` sets them).

        Raises
        ------
        ModelError
            If ``arch`` is unknown, ``input_shape`` is not ``(C, H, W)``, or the weights of
            ``init_from`` do not fit the architecture (by name or in order).
        InvalidParameterError
            If ``num_classes`` or ``sigma`` is out of range.
        """
        arch = arch or default_arch(input_shape)
        if arch in PROGRAM_ARCHITECTURES:
            if network is None:
                raise ModelError(f"architecture {arch} is a user's network: give its serialized program")
            model = load_program(arch, network)
            surrogate = cls(
                model,
                arch=arch,
                input_shape=input_shape,
                num_classes=num_classes,
                sigma=sigma,
                device=device,
                network=network,
            )
            surrogate.init_mapping_ = "the base model itself"
            return surrogate
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = build(arch, input_shape, num_classes)
        surrogate = cls(model, arch=arch, input_shape=input_shape, num_classes=num_classes, sigma=sigma, device=device)
        if init_from is not None:
            surrogate.init_mapping_ = copy_weights(model, init_from, arch)
        return surrogate

    # ------------------------------------------------------------------ prediction
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return check_images(x, self.input_shape)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Raw scores ``s(x)`` (``N x K``, float64, on the CPU), in batches of ``batch_size``.

        The network runs in float32 on ``device``; its scores are returned as float64.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of ``input_shape``, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` (``check_images``); pass False only for a batch already checked (the
            certifiers check once per call).

        Returns
        -------
        torch.Tensor
            ``N x K`` float64 scores on the CPU.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of ``input_shape``.
        """
        if validate:
            x = self._check(x)
        if self.model.training:  # fit() leaves eval mode on; someone else may not have
            self.model.eval()
        num = x.shape[0]
        if num <= self.batch_size:  # the serving case: one pass, no list, no concatenation
            if not num:
                return torch.empty((0, self.num_classes), dtype=torch.float64)
            return self.model(x.to(self.device, dtype=torch.float32)).double().cpu()
        out = [
            self.model(x[lo : lo + self.batch_size].to(self.device, dtype=torch.float32)).double().cpu()
            for lo in range(0, num, self.batch_size)
        ]
        return torch.cat(out)

    def predict_proba(self, x: torch.Tensor, *, validate: bool = True) -> np.ndarray:
        """``softmax(s(x))``: ``N x K`` float64 (computed in float64, so ``p~`` near 1 is resolved).

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of ``input_shape``, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` first (see ``logits``).

        Returns
        -------
        numpy.ndarray
            ``N x K`` float64 class probabilities; each row sums to 1.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of ``input_shape``.
        """
        return torch.softmax(self.logits(x, validate=validate), dim=1).numpy()

    def predict(self, x: torch.Tensor, *, validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(A, p~)``: the surrogate's class and its probability, per input.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of ``input_shape``, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` first (see ``logits``).

        Returns
        -------
        classes : numpy.ndarray
            Shape ``(N,)``, int64: ``A = argmax softmax(s(x))``.
        p_tilde : numpy.ndarray
            Shape ``(N,)``, float64: ``p~``, the probability of ``A``.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of ``input_shape``.
        """
        # One computation of p~ everywhere (predict_z's): the drift monitor compares deployment's p~
        # with the calibration's stored ones, so they must be the same function of the logits.
        classes, p_tilde, _ = self.predict_z(x, validate=validate)
        return classes, p_tilde

    def predict_z(self, x: torch.Tensor, *, validate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A, p~, z~)``: class, its probability and ``z~ = Phi^{-1}(p~)`` accurate in the upper tail.

        ``z~`` comes from the float64 log-softmax through ``log(1 - p~)`` (``stats.probit_confidence``),
        so it keeps ranking inputs whose ``p~`` rounds to 1 in float64: the confidence bins, the
        shifted score and the required-radius thresholds are on this scale.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of ``input_shape``, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` first (see ``logits``).

        Returns
        -------
        classes : numpy.ndarray
            Shape ``(N,)``, int64.
        p_tilde : numpy.ndarray
            Shape ``(N,)``, float64.
        z : numpy.ndarray
            Shape ``(N,)``, float64, in ``[-stats.Z_MAX, stats.Z_MAX]``.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of ``input_shape``.
        """
        log_proba = torch.log_softmax(self.logits(x, validate=validate), dim=1)
        classes = log_proba.argmax(dim=1)
        rows = torch.arange(len(classes))
        log_p = log_proba[rows, classes]
        others = log_proba.clone()
        others[rows, classes] = -math.inf
        log_1mp = torch.logsumexp(others, dim=1)
        p_tilde = torch.exp(log_p).numpy()
        z = np.atleast_1d(probit_confidence(log_p.numpy(), log_1mp.numpy()))
        return classes.numpy().astype(np.int64), p_tilde, z

    # ------------------------------------------------------------------ training
    def fit(
        self,
        x: torch.Tensor,
        counts: np.ndarray,
        *,
        epochs: int | None = None,
        batch_size: int = 64,
        lr: float = 2e-3,
        holdout: float = 0.1,
        patience: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> Surrogate:
        """Train on images ``x`` and their class ``counts`` (``N x K``): soft-label cross-entropy.

        The target of row ``i`` is ``q_i = counts_i / sum(counts_i)``. A seeded ``holdout`` share of the
        rows (at least one when ``N >= 10``) is kept out for early stopping: the weights with the lowest
        held-out loss are kept, and training stops after ``patience`` epochs without improvement. Sets
        ``history_`` (loss per epoch), ``best_epoch_``, ``train_rows_`` and ``holdout_rows_``.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` float32 images of ``input_shape``, pixels in [0, 1].
        counts : numpy.ndarray
            ``N x K`` class counts of noisy base-model evaluations (>= 0, at least one sample per row).
        epochs : int, optional
            Most epochs to run (>= 1); default 40 for ``N <= 5000``, else 15.
        batch_size : int, optional
            Images per optimisation step.
        lr : float, optional
            AdamW learning rate (weight decay 1e-4).
        holdout : float, optional
            Share of the rows kept out for early stopping, in [0, 1); no holdout when ``N < 10``.
        patience : int, optional
            Epochs without held-out improvement before stopping.
        seed : int, optional
            Seeds the holdout split and the batch order.
        progress : bool, optional
            Show a progress bar.

        Returns
        -------
        Surrogate
            ``self``, holding the best held-out weights (the last ones without a holdout), in eval mode.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of ``input_shape``, or ``counts`` is not ``N x K``,
            non-negative, with a sample in every row.
        InvalidParameterError
            If ``holdout``, ``epochs``, ``lr`` (finite > 0) or ``batch_size`` (>= 1) is out of range.
        """
        x = self._check(x).to(dtype=torch.float32)  # the network's weights are float32, whatever the images
        counts, totals = self._checked_counts(counts, x.shape[0])
        if not 0 <= holdout < 1:
            raise InvalidParameterError(f"holdout must be a share in [0, 1), got {holdout}")
        lr = check_positive("lr", lr)
        batch_size = check_count("batch_size", batch_size)
        num = x.shape[0]
        epochs = (40 if num <= 5_000 else 15) if epochs is None else check_count("epochs", epochs)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.holdout_rows_, self.train_rows_ = self._holdout_split(num, holdout, gen)
        target = torch.from_numpy(counts / totals).float()
        self._train(x, target, gen, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, progress=progress)
        self.model.eval()
        return self

    def _checked_counts(self, counts, num: int) -> tuple[np.ndarray, np.ndarray]:
        """``counts`` as an array and its row totals; InvalidInputError unless ``num x K``, >= 0, no empty row."""
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape != (num, self.num_classes):
            raise InvalidInputError(f"counts must be N x K = {num} x {self.num_classes}, got shape {counts.shape}")
        if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
            raise InvalidInputError(f"counts must be numbers, got dtype {counts.dtype}")
        totals = counts.sum(axis=1, keepdims=True)
        if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(totals <= 0):
            raise InvalidInputError("counts must be >= 0 with at least one sample per row")
        return counts, totals

    @staticmethod
    def _holdout_split(num: int, holdout: float, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Seeded ``(holdout rows, train rows)``, sorted: a ``holdout`` share, at least one row when ``num >= 10``."""
        order = torch.randperm(num, generator=gen).numpy()
        n_hold = int(round(holdout * num)) if num >= 10 else 0
        n_hold = min(max(n_hold, 1 if holdout > 0 and num >= 10 else 0), num - 1)
        return np.sort(order[:n_hold]), np.sort(order[n_hold:])

    def _train(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        gen: torch.Generator,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        patience: int,
        progress: bool,
    ) -> None:
        """AdamW epochs on ``train_rows_``, early-stopped on ``holdout_rows_``: sets ``history_`` and
        ``best_epoch_`` and leaves the best held-out weights (the last ones without a holdout) in the model."""
        model = self.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        train_rows = torch.as_tensor(self.train_rows_)
        n_hold = len(self.holdout_rows_)
        self.history_: list[dict] = []
        best_loss, best_state, self.best_epoch_, stale = math.inf, None, 0, 0
        bar = tqdm(range(epochs), desc="train surrogate", unit="epoch", disable=not progress)
        for epoch in bar:
            record = dict(
                epoch=epoch + 1, train_loss=self._train_epoch(optimizer, x, target, train_rows, gen, batch_size)
            )
            if n_hold:
                record["holdout_loss"] = self._soft_ce(x[self.holdout_rows_], target[self.holdout_rows_])
                if record["holdout_loss"] < best_loss - 1e-6:
                    best_loss, best_state, self.best_epoch_, stale = (
                        record["holdout_loss"],
                        copy.deepcopy(model.state_dict()),
                        epoch + 1,
                        0,
                    )
                else:
                    stale += 1
            self.history_.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
            if n_hold and stale >= patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            self.best_epoch_ = len(self.history_)

    def _train_epoch(
        self,
        optimizer,
        x: torch.Tensor,
        target: torch.Tensor,
        train_rows: torch.Tensor,
        gen: torch.Generator,
        batch_size: int,
    ) -> float:
        """One pass over ``train_rows`` in a seeded random order; returns the mean training loss."""
        model = self.model
        model.train()
        total = 0.0
        perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
        for lo in range(0, len(perm), batch_size):
            rows = perm[lo : lo + batch_size]
            logits = model(x[rows].to(self.device))
            # Soft-label cross-entropy: torch's cross_entropy with class-probability targets.
            loss = nn.functional.cross_entropy(logits, target[rows].to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        return total / max(len(perm), 1)

    @torch.inference_mode()
    def _soft_ce(self, x: torch.Tensor, target: torch.Tensor) -> float:
        self.model.eval()
        logits = self.logits(x).float()
        return float(nn.functional.cross_entropy(logits, target))

    def tune_prior(self, x: torch.Tensor, counts: np.ndarray, **grid) -> tuple[float, float]:
        """Set ``kappa`` and ``w`` from train-split counts (``tune_prior``); returns them.

        Pass the held-out rows (``holdout_rows_``): the surrogate was fitted on the others, and its
        ``p~`` on them is what a deployment input's would be. Also sets ``prior_table_`` (the grid with
        each point's log evidence).

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of ``input_shape``, pixels in [0, 1].
        counts : numpy.ndarray
            ``N x K`` class counts (rows may hold different numbers of samples).
        **grid
            ``kappas`` and / or ``weights``, to search instead of ``KAPPA_GRID`` / ``W_GRID``.

        Returns
        -------
        kappa : float
            The chosen concentration (now ``self.kappa``).
        w : float
            The chosen KT weight (now ``self.w``).

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch, or ``counts`` has a row without samples.
        InvalidParameterError
            If a grid value is out of range.
        """
        counts = np.asarray(counts)
        classes, p_tilde = self.predict(x)
        n = counts.sum(axis=1).astype(np.int64)
        if len(n) != len(classes) or np.any(n < 1):
            raise InvalidInputError("tune_prior needs one row of counts per image, each with at least one sample")
        # Rows of several counts files may hold different sample numbers: the evidence is per row.
        n_arg = int(n[0]) if np.all(n == n[0]) else n
        self.kappa, self.w, table = tune_prior(counts[np.arange(len(classes)), classes], n_arg, p_tilde, **grid)
        self.prior_table_ = table
        return self.kappa, self.w

    # ------------------------------------------------------------------ identity and files
    def header(self) -> dict:
        """The metadata a calibration depends on (plain values; a carried network by its SHA-256)."""
        header = dict(
            arch=self.arch,
            input_shape=list(self.input_shape),
            num_classes=self.num_classes,
            sigma=self.sigma,
            kappa=self.kappa,
            w=self.w,
        )
        if self.network is not None:
            header["network_sha256"] = hashlib.sha256(self.network).hexdigest()
        return header

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names and bytes, in order) and ``header()``.

        Cached: recomputed only when the header or a weight tensor changed (in-place updates bump a
        tensor's version counter), so checking a calibration against it costs one hash per load.

        Returns
        -------
        str
            Hex digest (``weights_digest`` of the sorted-key JSON of ``header()`` and the state dict).
        """
        state = self.model.state_dict()
        key = (
            json.dumps(self.header(), sort_keys=True),
            tuple((name, t.data_ptr(), t._version) for name, t in state.items()),
        )
        if getattr(self, "_fingerprint_key", None) != key:
            self._fingerprint, self._fingerprint_key = weights_digest(key[0], state), key
        return self._fingerprint

    def save(self, path: str | os.PathLike, *, overwrite: bool = True, key: bytes | str | None = None) -> str:
        """Write a weights-only checkpoint (kind ``surrogate``) with ``meta`` plus sigma, kappa, w.

        The metadata also records the package version and ``fingerprint()``; ``file_sha256`` is set to
        the SHA-256 of the written file. Written atomically (``save_checkpoint``), with a checksum and,
        when a signing key is configured, a keyed signature.

        Parameters
        ----------
        path : str or os.PathLike
            Checkpoint file to write.
        overwrite : bool, optional
            Replace an existing file (default); if false, ``OutputExistsError`` and the file is kept.
        key : bytes or str, optional
            Signing key (default: the environment's, ``core.signing.resolve_key``; none: unsigned).

        Returns
        -------
        str
            ``path``.

        Raises
        ------
        ModelError
            If the file cannot be written.
        """
        meta = {
            **self.meta,
            "sigma": self.sigma,
            "kappa": self.kappa,
            "w": self.w,
            "package_version": __version__,
            "fingerprint": self.fingerprint(),
        }
        save_checkpoint(
            path,
            self.model,
            arch=self.arch,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            kind="surrogate",
            meta=meta,
            overwrite=overwrite,
            key=key,
            network=self.network,
        )
        self.file_sha256 = sha256_file(path)
        return os.fspath(path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, *, key: bytes | str | None = None
    ) -> Surrogate:
        """Load a surrogate checkpoint (``weights_only=True``); ModelError if it is not a surrogate.

        Besides the checkpoint's own checks (``load_checkpoint``: checksum, finite weights, with a key its
        signature), the metadata must be one ``train`` writes (``meta_problems``): a relabelled training
        split or deleted training indices are refused where they contradict the rest of the record.

        Parameters
        ----------
        path : str or os.PathLike
            A checkpoint written by ``Surrogate.save``.
        device : str, torch.device or None, optional
            Where to run (``resolve_device``).
        key : bytes or str, optional
            Signing key (default: the environment's): with one, the checkpoint must be signed under it.

        Returns
        -------
        Surrogate
            With ``meta`` from the file and ``file_sha256`` set.

        Raises
        ------
        ModelError
            If the file is missing, not a loadable surrogate-cert checkpoint (text, JSON, HDF5, ...), is
            of another kind (a base model), was edited (checksum, or metadata that contradicts itself),
            or lacks sigma, kappa or w in its metadata.
        CheckpointSignatureError
            If a key is configured and the checkpoint is unsigned or its signature does not verify.
        InvalidParameterError
            If the stored sigma, kappa or w is out of range.
        """
        # On the device from the start: a torch.export network's constants move with it (load_program).
        model, header = load_checkpoint(path, device=resolve_device(device), kind="surrogate", key=key)
        meta = dict(header["meta"])
        for name in ("sigma", "kappa", "w"):
            if name not in meta:
                raise ModelError(f"{path} lacks {name} in its metadata; retrain it with `surrogate-cert train`")
        problems = meta_problems(meta)
        if problems:
            raise ModelError(
                f"{path}: the surrogate's record contradicts itself ({'; '.join(problems)}): it was "
                "edited; retrain it with `surrogate-cert train`"
            )
        try:
            surrogate = cls(
                model,
                arch=header["arch"],
                input_shape=header["input_shape"],
                num_classes=header["num_classes"],
                sigma=meta["sigma"],
                kappa=meta["kappa"],
                w=meta["w"],
                meta=meta,
                device=device,
                network=header.get("network"),
            )
        except InvalidParameterError as exc:
            raise ModelError(f"{path}: {exc}; the file is damaged, retrain it") from None
        surrogate.file_sha256 = sha256_file(path)
        return surrogate
