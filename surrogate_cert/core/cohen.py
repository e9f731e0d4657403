"""The fixed-sample certifier of Cohen, Rosenfeld and Kolter (2019): the baseline of every figure.

``n0`` selection samples pick the class ``A``; ``n`` fresh samples from an independent noise stream
count how often the base classifier returns ``A``; the one-sided Clopper-Pearson bound on that count
gives ``pA`` and the radius ``sigma * Phi^{-1}(pA)``. All bounds come from ``stats``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import check_count, check_probability
from .smoothing import STREAM_ESTIMATE, STREAM_SELECT, SmoothedClassifier, check_images, noise_indices

__all__ = ["CohenCertifier", "certificates_from_counts"]


def certificates_from_counts(
    counts_select, counts, alpha: float, sigma: float, seconds: float = 0.0, *, slack: float = 0.0
) -> list[Certificate]:
    """Cohen et al.'s CERTIFY on stored counts (``stats.cohen_certify``), as ``Certificate`` records.

    With probability at least ``1 - alpha`` per input, over the noise, a non-abstaining certificate
    is correct: the smoothed classifier ``g`` returns its ``prediction`` everywhere in the open l2
    ball of its ``radius`` (input units). This rests on the selection and estimation counts being
    independent draws, which this function cannot check.

    Identical to ``CohenCertifier.certify`` when the counts come from the same noise streams
    (``STREAM_SELECT`` and ``STREAM_ESTIMATE``, same seed and indices), as ``datagen --n0`` draws
    them.

    Parameters
    ----------
    counts_select : array_like of int
        ``N x K`` class counts of the ``n0`` selection samples; their argmax is the class ``A``.
    counts : array_like of int
        ``N x K`` class counts of the ``n`` estimation samples, drawn independently of
        ``counts_select``.
    alpha : float
        Error probability per input, in (0, 1).
    sigma : float
        Noise level the counts were drawn at (l2, input units).
    seconds : float, optional
        Wall time attributed to every input (its ``seconds`` field); default 0.
    slack : float, optional
        The noise scheme's radius slack (``SmoothedClassifier.radius_slack``, ``smoothing.noise_slack``):
        0 for the float schemes; for the sound scheme the radius is ``stats.grid_radius``.

    Returns
    -------
    list of Certificate
        One per row: method ``cohen`` with ``p_lower = pA`` (one-sided Clopper-Pearson bound) and
        ``radius = sigma * Phi^{-1}(pA)`` in input l2 units, or an abstention (carrying its
        ``p_lower``) where that radius is 0. ``n_samples`` is ``n0 + n`` of each row.

    Raises
    ------
    InvalidParameterError
        If ``alpha`` is outside (0, 1), the two count arrays differ in shape, or a count is not a
        whole number between 0 and its row's total.
    """
    counts_select = np.asarray(counts_select)
    counts = np.asarray(counts)
    prediction, p_lower, radius = stats.cohen_certify(counts_select, counts, alpha, sigma, slack=slack)
    spent = counts_select.sum(axis=1) + counts.sum(axis=1)
    return [
        Certificate(int(c), float(r), "cohen", int(m), float(p), seconds)
        if c >= 0
        else abstention(int(m), float(p), seconds)
        for c, p, r, m in zip(prediction, p_lower, radius, spent)
    ]


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

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        n0 : int, optional
            Selection samples per input (>= 1); default 100.
        n : int, optional
            Estimation samples per input (>= 1); default 10,000.
        alpha : float, optional
            Error probability per input, in (0, 1); default 0.001.
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (dataset indices); default ``0..N-1``.

        Returns
        -------
        list of Certificate
            One per input, as ``certificates_from_counts`` makes them: method ``cohen`` with its radius
            in input l2 units, or an abstention. ``n_samples = n0 + n``; ``seconds`` is the call's wall
            time shared equally.

        Raises
        ------
        InvalidParameterError
            If ``n0``, ``n`` or ``alpha`` is out of range.
        InvalidInputError
            If ``x`` is not a valid image batch, or ``indices`` does not hold one entry per input.
        ModelError
            If the base model's output width is not ``num_classes``.
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
        return certificates_from_counts(
            counts_select, counts, alpha, self.smooth.sigma, seconds, slack=self.smooth.radius_slack(x.shape[1:])
        )

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
        No radius is certified.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images, pixels in [0, 1].
        n : int
            Samples per input (>= 1), drawn from stream ``STREAM_ESTIMATE``.
        alpha : float
            Error probability per input, in (0, 1).
        indices : sequence of int or numpy.ndarray, optional
            Each input's noise name (dataset indices); default ``0..N-1``.

        Returns
        -------
        numpy.ndarray
            Shape ``(N,)``, int64: the predicted class, or -1 where the test abstains.

        Raises
        ------
        InvalidParameterError
            If ``n`` or ``alpha`` is out of range.
        InvalidInputError
            If ``x`` is not a valid image batch, or ``indices`` does not hold one entry per input.
        ModelError
            If the base model's output width is not ``num_classes``.
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
