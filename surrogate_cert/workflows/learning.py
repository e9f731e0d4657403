"""Learning from the fallback: a certifier that gets cheaper as it serves.

Every query the one-pass certificate does not settle is sampled by the sequential fallback anyway.
``FallbackLearner`` keeps those samples: a ``RecordingSmoothed`` wrapped around the hybrid's base model
tallies the class of every noisy sample it serves, per query, and the learner appends each sampled
query with its counts to a query log (``data_gen.query_log``). Every ``retrain_every`` queries it
retrains the surrogate on its original training counts plus the log (``workflows.training``), calibrates
the new surrogate on the stored calibration counts (``calibration.conformal.calibrate``: no new sampling;
it refuses calibration images the surrogate was trained on, by index and by content) and hands both to
the hybrid (``HybridCertifier.replace_surrogate``), whose drift monitor and audit restart on them.

Why the guarantee survives. A surrogate trained on queries ``1..t`` is calibrated on the calibration
split, which it never saw. Given queries ``1..t``, the calibration images and the queries after ``t``
are still i.i.d. from one distribution (the exchangeability the one-pass bound needs), so the new
calibration's marginal bound ``epsilon + alpha_mc`` holds for every later query, exactly as the first
calibration's did; each query is certified by a surrogate fixed before it arrived (retraining happens
between calls), which never trained on it. Sequential certificates keep their per-input ``alpha``
whatever the surrogate (it only sets their prior and class, fixed before sampling). Reusing the
calibration split after each retraining is what the split is for: every new surrogate gets a fresh
calibration on it, and the old one is dropped (the watchers restart, each with its own false-alarm
probability). What would break it: training on calibration images (refused), or a calibration fitted
on queries the surrogate trained on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibration.conformal import calibrate
from data_gen.query_log import QueryLog

from ..core.errors import InvalidParameterError
from ..core.surrogate import Surrogate
from ..deploy.hybrid import HybridCertifier
from .training import train_surrogate

__all__ = ["RecordingSmoothed", "LearningConfig", "FallbackLearner"]


class RecordingSmoothed:
    """A ``SmoothedClassifier`` wrapper that tallies, per noise name, the classes of every sample it serves.

    Every call passes through unchanged (same noise, same answers); ``take(indices)`` hands over and
    forgets the tallies of those queries (``N x K`` counts, zeros for a query never sampled).
    """

    def __init__(self, smooth):
        self.inner = smooth
        self.tally: dict[int, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _add(self, indices, counts: np.ndarray) -> None:
        for i, row in zip(np.asarray(indices, dtype=np.int64).tolist(), counts):
            if row.any():
                self.tally[i] = self.tally.get(i, 0) + row

    def sample_predictions(self, x, n, *, indices=None, **kwargs) -> np.ndarray:
        preds = self.inner.sample_predictions(x, n, indices=indices, **kwargs)
        names = np.arange(x.shape[0]) if indices is None else indices
        k = self.inner.num_classes
        counts = np.stack([(preds == c).sum(axis=1) for c in range(k)], axis=1) if preds.size else np.zeros((0, k))
        self._add(names, counts.astype(np.int64))
        return preds

    def counts(self, x, n, *, indices=None, **kwargs) -> np.ndarray:
        out = self.inner.counts(x, n, indices=indices, **kwargs)
        self._add(np.arange(x.shape[0]) if indices is None else indices, np.asarray(out, dtype=np.int64))
        return out

    def take(self, indices) -> np.ndarray:
        k = self.inner.num_classes
        return np.stack([self.tally.pop(int(i), np.zeros(k, dtype=np.int64)) for i in indices]).astype(np.int64)


@dataclass(frozen=True)
class LearningConfig:
    """When and how the learner retrains (``FallbackLearner``).

    ``retrain_every`` queries between retrainings; the training options are ``train_surrogate``'s
    (``init_from_base`` restarts every retraining from the base model's weights); the calibration's are
    ``calibrate``'s (``epsilon``, ``alpha_mc`` and ``options`` such as ``score``).
    """

    retrain_every: int = 1000
    log_weight: int = 10
    """Times each logged query counts in training (its rows repeated): the log holds a few hundred
    deployment images among tens of thousands of pool images, and it is the deployment distribution."""
    epsilon: float = 0.01
    alpha_mc: float = 1e-3
    calibrate_options: dict = field(default_factory=dict)
    epochs: int | None = 20
    batch_size: int = 128
    patience: int = 5
    seed: int = 0
    data_root: str | None = None
    device: str | None = "cpu"


class FallbackLearner:
    """A hybrid that logs what its fallback samples and retrains its surrogate on it at intervals.

    Parameters
    ----------
    hybrid : HybridCertifier
        With a sequential fallback; its base model is wrapped by a ``RecordingSmoothed`` (the audit's too,
        when it shares the base model).
    query_log : str or os.PathLike
        The query log to append to (created if absent).
    train_counts : list of path
        The counts files the current surrogate was trained on (kept in every retraining).
    cal_counts : str or os.PathLike
        The calibration split's counts (never trained on; every new surrogate is calibrated on them).
    workdir : str or os.PathLike
        Where retrained surrogates are written (``surrogate-<k>.pt``).
    init_from_base : str, optional
        Base model spec whose weights every retraining starts from.
    config : LearningConfig, optional
    source_dataset : str, optional
        The dataset the queries' indices refer to (recorded in the log).
    """

    def __init__(
        self,
        hybrid: HybridCertifier,
        query_log,
        train_counts,
        cal_counts,
        workdir,
        *,
        init_from_base: str | None = None,
        config: LearningConfig = LearningConfig(),
        source_dataset: str | None = None,
    ):
        if hybrid.sequential is None:
            raise InvalidParameterError("learning from the fallback needs a hybrid with a sequential fallback")
        if config.retrain_every < 1:
            raise InvalidParameterError(f"retrain_every must be >= 1 query, got {config.retrain_every}")
        self.hybrid = hybrid
        self.recorder = RecordingSmoothed(hybrid.sequential.smooth)
        hybrid.sequential.smooth = self.recorder
        if hybrid.audit is not None and hybrid.audit.smooth is self.recorder.inner:
            hybrid.audit.smooth = self.recorder
        sur = hybrid.surrogate
        self.log = QueryLog(
            query_log,
            sigma=sur.sigma,
            num_classes=sur.num_classes,
            input_shape=sur.input_shape,
            model_sha256=sur.meta.get("base_model_sha256"),
            dataset=source_dataset,
        )
        self.train_counts = [os.fspath(p) for p in train_counts]
        self.cal_counts = os.fspath(cal_counts)
        self.workdir = Path(workdir)
        self.init_from_base = init_from_base
        self.config = config
        self.queries = 0
        self.since_retrain = 0
        self.history: list[dict] = []

    def certify(self, x: torch.Tensor, indices=None, required_radius=None) -> list:
        """Certify a batch (``HybridCertifier.certify``), log what was sampled, retrain if it is time.

        ``indices`` name each query's noise and must not repeat over the stream (default: the running
        query number). Retraining happens after the batch is certified, so no query is certified by a
        surrogate trained on it.
        """
        num = x.shape[0]
        idx = np.arange(self.queries, self.queries + num) if indices is None else np.asarray(indices, dtype=np.int64)
        certificates = self.hybrid.certify(x, required_radius=required_radius, indices=idx)
        self.log.append(x, self.recorder.take(idx), idx)
        self.queries += num
        self.since_retrain += num
        if self.since_retrain >= self.config.retrain_every:
            self.retrain()
        return certificates

    def retrain(self) -> dict:
        """Retrain on the training counts plus the log, calibrate on the calibration counts, swap in.

        Returns the record.
        """
        cfg = self.config
        started = time.perf_counter()
        k = len(self.history) + 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = self.workdir / f"surrogate-{k}.pt"
        files = self.train_counts + [self.log.path] * max(1, int(cfg.log_weight))
        surrogate = train_surrogate(
            files,
            out,
            init_from_base=self.init_from_base,
            epochs=cfg.epochs,
            seed=cfg.seed,
            data_root=cfg.data_root,
            device=cfg.device,
            batch_size=cfg.batch_size,
            patience=cfg.patience,
            progress=False,
        )
        surrogate = Surrogate.load(out, device=cfg.device)
        calibration = calibrate(
            surrogate, self.cal_counts, cfg.epsilon, cfg.alpha_mc, data_root=cfg.data_root, **cfg.calibrate_options
        )
        self.hybrid.replace_surrogate(surrogate, calibration)
        record = dict(
            after_query=self.queries,
            surrogate=str(out),
            logged_rows=self.log.rows,
            q_hat=calibration.pooled_offset,
            seconds=time.perf_counter() - started,
        )
        self.history.append(record)
        self.since_retrain = 0
        return record
