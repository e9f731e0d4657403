"""The surrogate: a network on the clean image that predicts the base model's class frequencies under noise.

Trained on the ``train`` split's counts with soft-label cross-entropy against ``q = counts / n``
(``loss = -sum_c q_c log softmax(s(x))_c``), early-stopped on a held-out part of that split. It
certifies nothing by itself: ``calibration`` turns its radius into a certified one, and the
sequential fallback uses its ``p~`` only as a prior (validity never depends on it).

The fallback prior ``w * KT + (1 - w) * Beta(kappa p~, kappa (1 - p~))`` (``stats.surrogate_prior``)
is tuned here, on the train split only: ``(kappa, w)`` from a small grid maximise the log marginal
likelihood (Beta-binomial evidence) of the held-out train counts of the surrogate's class. The
sequential test's e-value is exactly that mixture likelihood divided by the likelihood at the
threshold, so the prior that best predicts fresh counts is the one that stops soonest.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from typing import Sequence

import numpy as np
import torch
from scipy import stats as _st
from scipy.special import logsumexp
from torch import nn

from . import __version__
from .architectures import build, default_arch, load_checkpoint, save_checkpoint
from .errors import InvalidInputError, InvalidParameterError, ModelError, check_count, check_positive, check_probability
from .smoothing import check_images, resolve_device

__all__ = ["Surrogate", "train_surrogate", "prior_log_evidence", "tune_prior", "KAPPA_GRID", "W_GRID"]

KAPPA_GRID = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
"""Candidate prior concentrations ``kappa`` (pseudo-samples the surrogate's ``p~`` is worth)."""

W_GRID = (0.05, 0.1, 0.2, 0.5)
"""Candidate KT weights ``w``: at most ``log(1/w)`` of evidence lost against KT."""

DEFAULT_KAPPA = 50.0
DEFAULT_W = 0.2


# --------------------------------------------------------------------------- prior tuning (numbers only)

def prior_log_evidence(counts_top, n, p_tilde, kappa: float, w: float) -> float:
    """Sum over inputs of ``log P(k | n)`` under the mixture prior ``w * KT + (1 - w) * Beta(kappa p~, ...)``.

    ``counts_top[i]`` successes of the surrogate's class out of ``n`` (Beta-binomial marginal).
    Uses the same clipped ``p~`` as ``stats.surrogate_prior``.
    """
    from .stats import surrogate_prior

    a, b, weights = surrogate_prior(p_tilde, kappa, w)
    k = np.asarray(counts_top, dtype=float)[:, None]
    logpmf = _st.betabinom.logpmf(k, n, a, b)
    return float(np.sum(logsumexp(logpmf + np.log(weights), axis=1)))


def tune_prior(counts_top, n, p_tilde, kappas: Sequence[float] = KAPPA_GRID,
               weights: Sequence[float] = W_GRID) -> tuple[float, float, list[dict]]:
    """``(kappa, w, table)`` maximising ``prior_log_evidence`` over the grid (train-split counts only)."""
    table = [dict(kappa=float(kappa), w=float(w), log_evidence=prior_log_evidence(counts_top, n, p_tilde, kappa, w))
             for kappa in kappas for w in weights]
    best = max(table, key=lambda row: row["log_evidence"])
    return best["kappa"], best["w"], table


# --------------------------------------------------------------------------- the model wrapper

class Surrogate:
    """A trained surrogate network with what it was trained for (sigma, classes, input shape).

    ``predict_proba(x)`` gives ``N x K`` class probabilities (float64); ``predict(x)`` the class
    ``A = argmax`` and ``p~ = P(A)``. ``kappa`` and ``w`` parametrise the sequential fallback's
    prior. ``fingerprint()`` is a SHA-256 of the weights and metadata, which calibrations bind to.
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
    ):
        self.arch = str(arch)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.sigma = check_positive("sigma", sigma)
        self.kappa = check_positive("kappa", kappa)
        self.w = check_probability("w", w)
        self.meta = dict(meta or {})
        self.device = resolve_device(device)
        self.batch_size = check_count("batch_size", batch_size)
        self.model = model.to(self.device).eval()
        self.file_sha256: str | None = None

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
    ) -> "Surrogate":
        """An untrained surrogate (``arch`` defaults to ``default_arch(input_shape)``), seeded.

        ``init_from`` copies the weights of a module of the same architecture (the base model).
        """
        arch = arch or default_arch(input_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = build(arch, input_shape, num_classes)
        if init_from is not None:
            try:
                model.load_state_dict(init_from.state_dict())
            except RuntimeError:
                raise ModelError(
                    f"--init-from-base: the base model's weights do not fit architecture {arch} for "
                    f"{tuple(input_shape)} / {num_classes} classes; drop --arch or --init-from-base"
                ) from None
        return cls(model, arch=arch, input_shape=input_shape, num_classes=num_classes, sigma=sigma, device=device)

    # ------------------------------------------------------------------ prediction
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return check_images(x, self.input_shape)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw scores ``s(x)`` (``N x K``, float64, on the CPU), in batches of ``batch_size``."""
        x = self._check(x)
        self.model.eval()
        out = [self.model(x[lo:lo + self.batch_size].to(self.device, dtype=torch.float32)).double().cpu()
               for lo in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.empty((0, self.num_classes), dtype=torch.float64)

    def predict_proba(self, x: torch.Tensor) -> np.ndarray:
        """``softmax(s(x))``: ``N x K`` float64 (computed in float64, so ``p~`` near 1 is resolved)."""
        return torch.softmax(self.logits(x), dim=1).numpy()

    def predict(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(A, p~)``: the surrogate's class and its probability, per input."""
        proba = self.predict_proba(x)
        classes = proba.argmax(axis=1)
        return classes.astype(np.int64), proba[np.arange(len(classes)), classes]

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
    ) -> "Surrogate":
        """Train on images ``x`` and their class ``counts`` (``N x K``): soft-label cross-entropy.

        A seeded ``holdout`` share of the rows (at least one when ``N >= 10``) is kept out for early
        stopping: the weights with the lowest held-out loss are kept, and training stops after
        ``patience`` epochs without improvement. Sets ``history_`` (loss per epoch),
        ``best_epoch_``, ``train_rows_`` and ``holdout_rows_``.
        """
        from tqdm.auto import tqdm

        x = self._check(x)
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape != (x.shape[0], self.num_classes):
            raise InvalidInputError(
                f"counts must be N x K = {x.shape[0]} x {self.num_classes}, got shape {counts.shape}"
            )
        totals = counts.sum(axis=1, keepdims=True)
        if np.any(counts < 0) or np.any(totals <= 0):
            raise InvalidInputError("counts must be >= 0 with at least one sample per row")
        if not 0 <= holdout < 1:
            raise InvalidParameterError(f"holdout must be a share in [0, 1), got {holdout}")
        num = x.shape[0]
        epochs = (40 if num <= 5_000 else 15) if epochs is None else check_count("epochs", epochs)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        order = torch.randperm(num, generator=gen).numpy()
        n_hold = int(round(holdout * num)) if num >= 10 else 0
        n_hold = min(max(n_hold, 1 if holdout > 0 and num >= 10 else 0), num - 1)
        self.holdout_rows_ = np.sort(order[:n_hold])
        self.train_rows_ = np.sort(order[n_hold:])
        target = torch.from_numpy(counts / totals).float()

        model = self.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        train_rows = torch.as_tensor(self.train_rows_)
        self.history_: list[dict] = []
        best_loss, best_state, self.best_epoch_, stale = math.inf, None, 0, 0
        bar = tqdm(range(epochs), desc="train surrogate", unit="epoch", disable=not progress)
        for epoch in bar:
            model.train()
            total = 0.0
            perm = train_rows[torch.randperm(len(train_rows), generator=gen)]
            for lo in range(0, len(perm), batch_size):
                rows = perm[lo:lo + batch_size]
                logits = model(x[rows].to(self.device))
                # Soft-label cross-entropy: torch's cross_entropy with class-probability targets.
                loss = nn.functional.cross_entropy(logits, target[rows].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            record = dict(epoch=epoch + 1, train_loss=total / max(len(perm), 1))
            if n_hold:
                record["holdout_loss"] = self._soft_ce(x[self.holdout_rows_], target[self.holdout_rows_])
                if record["holdout_loss"] < best_loss - 1e-6:
                    best_loss, best_state, self.best_epoch_, stale = (
                        record["holdout_loss"], copy.deepcopy(model.state_dict()), epoch + 1, 0)
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
        model.eval()
        return self

    @torch.inference_mode()
    def _soft_ce(self, x: torch.Tensor, target: torch.Tensor) -> float:
        self.model.eval()
        logits = self.logits(x).float()
        return float(nn.functional.cross_entropy(logits, target))

    def tune_prior(self, x: torch.Tensor, counts: np.ndarray, **grid) -> tuple[float, float]:
        """Set ``kappa`` and ``w`` from train-split counts (``tune_prior``); returns them.

        Pass the held-out rows (``holdout_rows_``): the surrogate was fitted on the others, and its
        ``p~`` on them is what a deployment input's would be.
        """
        counts = np.asarray(counts)
        classes, p_tilde = self.predict(x)
        n = counts.sum(axis=1)
        if np.any(n != n[0]):
            raise InvalidInputError("tune_prior needs the same number of samples in every row")
        self.kappa, self.w, table = tune_prior(counts[np.arange(len(classes)), classes], int(n[0]), p_tilde, **grid)
        self.prior_table_ = table
        return self.kappa, self.w

    # ------------------------------------------------------------------ identity and files
    def header(self) -> dict:
        """The metadata a calibration depends on (plain values)."""
        return dict(arch=self.arch, input_shape=list(self.input_shape), num_classes=self.num_classes,
                    sigma=self.sigma, kappa=self.kappa, w=self.w)

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names and bytes, in order) and ``header()``."""
        digest = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike) -> str:
        """Write a weights-only checkpoint (kind ``surrogate``) with ``meta`` plus sigma, kappa, w."""
        from .hashing import sha256_file

        meta = {**self.meta, "sigma": self.sigma, "kappa": self.kappa, "w": self.w,
                "package_version": __version__, "fingerprint": self.fingerprint()}
        save_checkpoint(path, self.model, arch=self.arch, input_shape=self.input_shape,
                        num_classes=self.num_classes, kind="surrogate", meta=meta)
        self.file_sha256 = sha256_file(path)
        return os.fspath(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Surrogate":
        """Load a surrogate checkpoint (``weights_only=True``); ModelError if it is not a surrogate."""
        from .hashing import sha256_file

        model, header = load_checkpoint(path)
        if header.get("kind") != "surrogate":
            raise ModelError(f"{path} is a {header.get('kind')} model, not a surrogate; "
                             "train one with `surrogate-cert train --counts train.h5 --out surrogate.pt`")
        meta = dict(header["meta"])
        for key in ("sigma", "kappa", "w"):
            if key not in meta:
                raise ModelError(f"{path} lacks {key} in its metadata; retrain it with `surrogate-cert train`")
        surrogate = cls(model, arch=header["arch"], input_shape=header["input_shape"],
                        num_classes=header["num_classes"], sigma=meta["sigma"], kappa=meta["kappa"],
                        w=meta["w"], meta=meta, device=device)
        surrogate.file_sha256 = sha256_file(path)
        return surrogate


# --------------------------------------------------------------------------- from a counts file

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
) -> Surrogate:
    """Train a surrogate on a ``train`` counts file and save it to ``out``; returns it.

    The images are read from the dataset and split the counts file records (``load_split(...)
    .take(indices)``). The default architecture follows the recorded input shape; ``init_from_base``
    (a checkpoint from ``train-base``) starts from the base model's weights and architecture.
    ``kappa`` and ``w`` of the fallback prior are tuned on the held-out part of this split.
    """
    from data_gen.datasets import load_split
    from data_gen.store import read_counts

    from .hashing import sha256_file

    started = time.perf_counter()
    counts_file = read_counts(counts_path)
    attrs = counts_file.attrs
    if not attrs.get("complete", True):
        raise InvalidInputError(
            f"{counts_path} is incomplete ({len(counts_file)} rows committed); finish it with "
            "`surrogate-cert datagen ... --resume` first"
        )
    if len(counts_file) < 2:
        raise InvalidInputError(f"{counts_path} holds {len(counts_file)} rows; a surrogate needs at least 2")
    split = load_split(str(attrs["dataset"]), str(attrs["split"]), data_root=data_root)
    images = split.take(counts_file.indices).x
    input_shape = tuple(attrs.get("input_shape") or images.shape[1:])
    num_classes = int(attrs["num_classes"])
    base = None
    if init_from_base is not None:
        base_model, base_header = load_checkpoint(init_from_base)
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
    surrogate.save(out)
    return surrogate
