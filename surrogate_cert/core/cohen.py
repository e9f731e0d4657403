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
from .errors import check_count, check_probability
from .smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier, check_images, noise_indices

__all__ = ["CohenCertifier", "certificates_from_counts"]


def certificates_from_counts(counts_select, counts, alpha: float, sigma: float,
                             seconds: float = 0.0) -> list[Certificate]:
    """Cohen et al.'s CERTIFY on stored counts (``stats.cohen_certify``), as ``Certificate`` records.

    Identical to ``CohenCertifier.certify`` when the counts come from the same noise streams
    (``STREAM_SELECT`` and ``STREAM_ESTIMATE``, same seed and indices), as ``datagen --n0`` draws
    them. With probability at least ``1 - alpha`` per input, a non-abstaining certificate is correct.
    ``n_samples`` is ``n0 + n`` of each row; ``seconds`` is attributed to every input.
    """
    counts_select = np.asarray(counts_select)
    counts = np.asarray(counts)
    prediction, p_lower, radius = stats.cohen_certify(counts_select, counts, alpha, sigma)
    spent = counts_select.sum(axis=1) + counts.sum(axis=1)
    return [Certificate(int(c), float(r), "cohen", int(m), float(p), seconds) if c >= 0
            else abstention(int(m), float(p), seconds) for c, p, r, m in zip(prediction, p_lower, radius, spent)]


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
        idx = noise_indices(indices, x.shape[0])
        if x.shape[0] == 0:
            return []
        counts_select = self.smooth.counts(x, n0, indices=idx, stream=STREAM_SELECT)
        counts = self.smooth.counts(x, n, indices=idx, stream=STREAM_ESTIMATE)
        seconds = (time.perf_counter() - started) / x.shape[0]
        return certificates_from_counts(counts_select, counts, alpha, self.smooth.sigma, seconds)

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
        idx = noise_indices(indices, x.shape[0])
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        counts = self.smooth.counts(x, n, indices=idx, stream=STREAM_ESTIMATE)
        order = np.argsort(-counts, axis=1, kind="stable")
        rows = np.arange(len(counts))
        top, second = order[:, 0], order[:, 1]
        keep = [stats.predict_test(counts[i, top[i]], counts[i, second[i]], alpha) for i in rows]
        return np.where(keep, top, -1).astype(np.int64)
