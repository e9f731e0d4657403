"""The fixed-sample certifier of Cohen, Rosenfeld and Kolter (2019): the baseline of every figure.

``n0`` selection samples pick the class ``A``; ``n`` fresh samples from an independent noise stream
count how often the base classifier returns ``A``; the one-sided Clopper-Pearson bound on that count
gives ``pA`` and the radius ``sigma * Phi^{-1}(pA)``. All bounds come from ``stats``.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import InvalidInputError, check_count, check_probability
from .smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier, check_images

__all__ = ["CohenCertifier"]


def _noise_indices(indices, num: int) -> np.ndarray:
    if indices is None:
        return np.arange(num)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.shape != (num,):
        raise InvalidInputError(f"indices must have one entry per input ({num}), got shape {idx.shape}")
    return idx


class CohenCertifier:
    """CERTIFY and PREDICT of Cohen et al. (2019) for a batch of inputs.

    Parameters
    ----------
    smooth : SmoothedClassifier
        The base classifier and noise level ``sigma`` (l2, input units); it draws the samples.
    """

    def __init__(self, smooth: SmoothedClassifier):
        self.smooth = smooth

    def certify(
        self,
        x: torch.Tensor,
        n0: int = 100,
        n: int = 10_000,
        alpha: float = 1e-3,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> list[Certificate]:
        """Certify each input of ``x`` (``N x C x H x W``, pixels in [0, 1]).

        For each input, with probability at least ``1 - alpha`` over the noise: if the certificate
        is not an abstention, the smoothed classifier ``g`` returns its ``prediction`` everywhere in
        the open l2 ball of its ``radius`` around the input. The selection samples (``n0``, stream
        ``STREAM_SELECT``) and the estimation samples (``n``, stream ``STREAM_ESTIMATE``) are
        independent, which is what makes the Clopper-Pearson bound valid for the selected class.
        ``indices`` name each input's noise (dataset indices; default ``0..N-1``).
        ``n_samples = n0 + n``; ``seconds`` is the call's wall time shared equally.
        """
        started = time.perf_counter()
        n0 = check_count("n0", n0)
        n = check_count("n", n)
        alpha = check_probability("alpha", alpha)
        x = check_images(x)
        idx = _noise_indices(indices, x.shape[0])
        if x.shape[0] == 0:
            return []

        counts_select = self.smooth.counts(x, n0, indices=idx, stream=STREAM_SELECT)
        top = counts_select.argmax(axis=1)
        counts_estimate = self.smooth.counts(x, n, indices=idx, stream=STREAM_ESTIMATE)
        count_top = counts_estimate[np.arange(len(top)), top]
        p_lower = np.atleast_1d(stats.lower_confidence_bound(count_top, n, alpha))
        radii = np.atleast_1d(stats.radius(p_lower, self.smooth.sigma))

        seconds = (time.perf_counter() - started) / len(top)
        out = []
        for cls, pl, r in zip(top, p_lower, radii):
            if r > 0:
                out.append(Certificate(int(cls), float(r), "cohen", n0 + n, float(pl), seconds))
            else:
                out.append(abstention(n0 + n, float(pl), seconds))
        return out

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Cohen et al.'s PREDICT: the smoothed class of each input, or -1 (abstain).

        For each input, the returned class differs from ``g(x)`` with probability at most
        ``alpha`` (two-sided binomial test of the top two counts of ``n`` samples against 1/2).
        """
        n = check_count("n", n)
        alpha = check_probability("alpha", alpha)
        x = check_images(x)
        idx = _noise_indices(indices, x.shape[0])
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        counts = self.smooth.counts(x, n, indices=idx, stream=STREAM_ESTIMATE)
        order = np.argsort(-counts, axis=1, kind="stable")
        rows = np.arange(len(counts))
        top, second = order[:, 0], order[:, 1]
        keep = [stats.predict_test(counts[i, top[i]], counts[i, second[i]], alpha) for i in rows]
        return np.where(keep, top, -1).astype(np.int64)
