"""The one-pass certifier: a calibrated surrogate certifies a batch in one forward pass.

For each input the surrogate gives a class ``A`` and ``p~``; the calibration gives the offset ``q^``
of the input's Mondrian group; the certificate is ``(A, R^)`` with ``R^ = R~ - q^``
(``stats.calibrated_radius``) when ``R^ > 0``, else an abstention. No base-model evaluation.

The group rule lives here, once: calibration fits one offset per group with it, and deployment
looks the offset up with it, using the bin edges stored in the calibration (never a constant).
A calibration is any object with the attributes of ``calibration.artifact.Calibration`` that this
module reads: ``sigma``, ``groups``, ``bin_edges``, ``offsets``, ``pooled_offset``,
``radius_cap``, ``epsilon``, ``alpha_mc`` and ``check_matches(surrogate)``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import InvalidParameterError
from .smoothing import check_images, noise_indices

__all__ = ["SurrogateCertifier", "GROUPINGS", "POOLED", "DEFAULT_CONFIDENCE_EDGES", "group_keys",
           "all_group_keys", "group_offsets", "deployed_radius", "SMALL_BATCH", "intra_op_threads"]

SMALL_BATCH = 1024
"""``threads="auto"``: batches of fewer images than this run the surrogate with one intra-op thread.

Measured (``benchmarks/serving_latency.py``, digits small CNN, 2 CPU cores shared with other jobs):
one thread gave more images/s than torch's default two at every batch size measured, 13x at batch 1
and 2.8x at batch 512, where OpenMP's hand-off between threads costs more than the forward pass.
A machine with idle cores may gain from more threads on large batches; set ``threads`` there."""


@contextlib.contextmanager
def intra_op_threads(num: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num)``, restoring the previous value after.

    ``None`` changes nothing. The setting is process-wide: another Python thread running torch at
    the same moment runs with it too (a matter of speed, never of results).
    """
    previous = torch.get_num_threads()
    if num is None or num == previous:
        yield
        return
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_threads(threads) -> int | str | None:
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InvalidParameterError(f"threads must be 'auto', None or an integer >= 1, got {threads!r}")
    return int(threads)

GROUPINGS = ("none", "class", "confidence")
"""Mondrian groupings: one pooled group, one group per predicted class, or confidence bins."""

POOLED = "all"
"""Group key of the pooled (whole calibration set) offset."""

DEFAULT_CONFIDENCE_EDGES = (1.0, 2.0, 3.0)
"""Default bin edges of ``groups="confidence"`` on ``Phi^{-1}(p~)`` (the surrogate radius in sigma
units), fixed in advance from the surrogate alone: ``p~`` below 0.841, up to 0.977, up to 0.9987,
above. A calibration stores the edges it used in ``bin_edges``."""


def group_keys(predicted, p_tilde, groups: str, edges: Sequence[float] | None = None) -> np.ndarray:
    """Mondrian group of each input (as strings): ``"all"``, the predicted class, or a confidence bin.

    Depends on the surrogate's outputs only (and on ``edges`` fixed before calibration), so
    calibration and test inputs in one group stay exchangeable.

    Parameters
    ----------
    predicted : array_like of int
        The surrogate's class of each input.
    p_tilde : array_like of float
        The surrogate's probability of that class (read for ``groups="confidence"`` only).
    groups : {"none", "class", "confidence"}
        The grouping (``GROUPINGS``).
    edges : sequence of float, optional
        Strictly increasing bin edges on ``Phi^{-1}(p~)`` for ``groups="confidence"``; default
        ``DEFAULT_CONFIDENCE_EDGES``.

    Returns
    -------
    numpy.ndarray
        Object array of keys, one per input: ``POOLED`` (``"all"``), the class or the bin number as
        a string.

    Raises
    ------
    InvalidParameterError
        If ``groups`` is not one of ``GROUPINGS``, or ``edges`` are not finite and strictly
        increasing.
    """
    predicted = np.asarray(predicted)
    if groups == "none":
        return np.full(len(predicted), POOLED, dtype=object)
    if groups == "class":
        return np.array([str(int(c)) for c in predicted], dtype=object)
    if groups == "confidence":
        bins = stats.confidence_bin(p_tilde, DEFAULT_CONFIDENCE_EDGES if edges is None else edges)
        return np.array([str(int(b)) for b in bins], dtype=object)
    raise InvalidParameterError(f"groups must be one of {GROUPINGS}, got {groups!r}")


def all_group_keys(groups: str, num_classes: int, edges: Sequence[float] | None = None) -> list[str]:
    """Every group a deployment input can fall in (so an unseen one still has an offset).

    Parameters
    ----------
    groups : {"none", "class", "confidence"}
        The grouping (``GROUPINGS``).
    num_classes : int
        Number of classes: the groups of ``groups="class"``.
    edges : sequence of float, optional
        Bin edges of ``groups="confidence"`` (``len(edges) + 1`` bins); default
        ``DEFAULT_CONFIDENCE_EDGES``.

    Returns
    -------
    list of str
        The keys, in the form ``group_keys`` gives them.

    Raises
    ------
    InvalidParameterError
        If ``groups`` is not one of ``GROUPINGS``.
    """
    if groups == "none":
        return [POOLED]
    if groups == "class":
        return [str(c) for c in range(num_classes)]
    if groups == "confidence":
        return [str(b) for b in range(len(DEFAULT_CONFIDENCE_EDGES if edges is None else edges) + 1)]
    raise InvalidParameterError(f"groups must be one of {GROUPINGS}, got {groups!r}")


def group_offsets(calibration, predicted, p_tilde) -> np.ndarray:
    """``q^`` of each input's group, under the calibration's grouping and stored bin edges.

    A group the calibration never saw gets the pooled offset; ``inf`` never certifies.

    Parameters
    ----------
    calibration : Calibration
        Read for ``groups``, ``bin_edges``, ``offsets`` and ``pooled_offset``.
    predicted : array_like of int
        The surrogate's class of each input.
    p_tilde : array_like of float
        The surrogate's probability of that class, per input.

    Returns
    -------
    numpy.ndarray
        Offsets ``q^`` (input l2 units), one per input; ``+inf`` where the group never certifies.

    Raises
    ------
    InvalidParameterError
        If the calibration's grouping is unknown, or a confidence-grouped calibration stores no
        (or invalid) ``bin_edges``.
    """
    groups = calibration.groups
    num = len(np.asarray(p_tilde).reshape(-1))
    if groups == "none":
        return np.full(num, float(calibration.pooled_offset))
    if groups == "class":
        ids = np.asarray(predicted, dtype=np.int64)
        size = int(ids.max()) + 1 if ids.size else 0
    elif groups == "confidence":
        edges = calibration.bin_edges
        if edges is None:
            raise InvalidParameterError("a confidence-grouped calibration must store its bin_edges; re-run calibrate")
        ids = stats.confidence_bin(p_tilde, edges)
        size = len(edges) + 1
    else:
        raise InvalidParameterError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    table = np.array([calibration.offsets.get(str(g), calibration.pooled_offset) for g in range(size)], dtype=float)
    return table[ids] if num else np.zeros(0)


def deployed_radius(calibration, predicted, p_tilde) -> np.ndarray:
    """``R^ = R~ - q^(group)`` for each input: the calibrated radius (certify iff > 0), l2 input units.

    ``R~ = min(sigma * Phi^{-1}(clip(p~)), radius_cap)`` with the calibration's ``sigma`` and
    ``radius_cap`` (``stats.calibrated_radius``); ``q^`` comes from ``group_offsets``.

    Parameters
    ----------
    calibration : Calibration
        Read for ``sigma`` and ``radius_cap``, and as ``group_offsets`` reads it.
    predicted : array_like of int
        The surrogate's class of each input.
    p_tilde : array_like of float
        The surrogate's probability of that class, per input.

    Returns
    -------
    numpy.ndarray
        ``R^`` per input, in input l2 units; ``<= 0`` (possibly ``-inf``) means no certificate.

    Raises
    ------
    InvalidParameterError
        As ``group_offsets``.
    """
    offsets = group_offsets(calibration, predicted, p_tilde)
    return np.atleast_1d(stats.calibrated_radius(p_tilde, calibration.sigma, calibration.radius_cap, offsets))


class SurrogateCertifier:
    """Certify a batch in one surrogate forward pass (``n_samples = 0``).

    Marginally over the calibration set and an exchangeable test input, a non-abstaining
    certificate is wrong with probability at most ``calibration.epsilon + calibration.alpha_mc``
    (PAC, Mondrian and LTT calibrations state their own variant, see ``calibration.conformal``).

    Parameters
    ----------
    surrogate : Surrogate
        The trained surrogate (``core.surrogate.Surrogate``).
    calibration : Calibration
        Its calibration; refused (``CalibrationError``) if made for another surrogate.
    threads : int, "auto" or None, optional
        Intra-op threads of the surrogate's forward pass: ``"auto"`` (default) uses one thread for
        batches below ``SMALL_BATCH`` images and torch's setting above; an integer uses that many;
        ``None`` leaves torch's setting alone (``torch.set_num_threads`` is yours to call). See
        ``intra_op_threads`` for the caveat of a process-wide setting.
    """

    def __init__(self, surrogate, calibration, *, threads: int | str | None = "auto"):
        calibration.check_matches(surrogate)
        self.surrogate = surrogate
        self.calibration = calibration
        self.threads = _check_threads(threads)

    @property
    def sigma(self) -> float:
        return self.surrogate.sigma

    def _threads_for(self, num: int) -> int | None:
        if self.threads == "auto":
            return 1 if num < SMALL_BATCH else None
        return self.threads

    def radii(self, x: torch.Tensor, *, validate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(A, p~, R^)`` per input: class, its surrogate probability, calibrated radius (may be <= 0).

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` (``check_images``); False only for a batch the caller has just checked.

        Returns
        -------
        classes : numpy.ndarray
            Shape ``(N,)``, int64: the surrogate's class ``A``.
        p_tilde : numpy.ndarray
            Shape ``(N,)``, float64: the surrogate's probability ``p~`` of ``A``.
        radius : numpy.ndarray
            Shape ``(N,)``: the calibrated radius ``R^`` in input l2 units (``deployed_radius``).

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of the surrogate's input shape.
        InvalidParameterError
            As ``group_offsets``.
        """
        if validate:
            x = check_images(x, self.surrogate.input_shape)
        with intra_op_threads(self._threads_for(x.shape[0])):
            classes, p_tilde = self.surrogate.predict(x, validate=False)
        return classes, p_tilde, deployed_radius(self.calibration, classes, p_tilde)

    def certify(self, x: torch.Tensor, indices: Sequence[int] | np.ndarray | None = None) -> list[Certificate]:
        """One ``Certificate`` per input: ``(A, R^)`` with method ``surrogate`` if ``R^ > 0``, else abstain.

        Each non-abstaining certificate carries the class's guarantee (wrong with probability at most
        ``calibration.epsilon + calibration.alpha_mc``, marginally; see the class docstring).
        ``indices`` is accepted so every certifier has the same call, and checked (one per input),
        but no noise is drawn: the one-pass certificate depends on the image alone.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        indices : sequence of int or numpy.ndarray, optional
            Noise names, checked for length only.

        Returns
        -------
        list of Certificate
            One per input (``certificate``): ``radius = R^`` in input l2 units, ``n_samples = 0``,
            ``seconds`` the call's wall time shared equally.

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of the surrogate's input shape, or ``indices`` does not
            hold one entry per input.
        InvalidParameterError
            As ``group_offsets``.
        """
        started = time.perf_counter()
        classes, _, radius = self.radii(x)
        noise_indices(indices, len(classes))
        p_lower = self.p_lower(radius)
        seconds = (time.perf_counter() - started) / max(len(classes), 1)
        return [self.certificate(c, r, seconds, p_lower=p)
                for c, r, p in zip(classes.tolist(), radius.tolist(), p_lower.tolist())]

    def p_lower(self, radius) -> np.ndarray:
        """``Phi(R^ / sigma)`` where ``R^ > 0`` (the bound on ``p_A`` each radius stands for), else 0."""
        radius = np.asarray(radius, dtype=float)
        return np.where(radius > 0, np.atleast_1d(stats.p_threshold(np.maximum(radius, 0.0), self.sigma)), 0.0)

    def certificate(self, cls: int, radius: float, seconds: float, n_samples: int = 0,
                    p_lower: float | None = None) -> Certificate:
        """The record of one surrogate decision: certified iff ``radius > 0``.

        Parameters
        ----------
        cls : int
            The surrogate's class ``A``.
        radius : float
            The calibrated radius ``R^``, input l2 units.
        seconds : float
            Wall time attributed to the input.
        n_samples : int, optional
            Base-model evaluations to record: 0 on the one-pass path (the hybrid passes its fallback's).
        p_lower : float, optional
            ``Phi(radius / sigma)`` when the caller computed it for a whole batch (``p_lower``).

        Returns
        -------
        Certificate
            Method ``surrogate`` with ``p_lower = Phi(radius / sigma)`` (the bound on ``p_A`` the radius
            stands for) if ``radius > 0``; else an abstention with ``p_lower = 0``.
        """
        if radius > 0:
            if p_lower is None:
                p_lower = float(stats.p_threshold(radius, self.sigma))  # the p_A bound this radius stands for
            return Certificate(int(cls), float(radius), "surrogate", int(n_samples), float(p_lower), float(seconds))
        return abstention(n_samples, 0.0, seconds)
