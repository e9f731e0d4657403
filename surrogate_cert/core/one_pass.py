"""The one-pass certifier: a calibrated surrogate certifies a batch in one forward pass.

For each input the surrogate gives a class ``A``, ``p~`` and ``z~ = Phi^{-1}(p~)`` (tail-accurate,
``Surrogate.predict_z``); the calibration gives the offset ``q^`` of the input's Mondrian group
(and, for the ``shifted`` score, the offset ``t_b`` of its confidence bin); the certificate is
``(A, R^)`` with ``R^ = R~ - t_b - q^`` when ``R^ > 0``, else an abstention. No base-model evaluation.

Asked for a required radius ``r*`` (and holding required-radius thresholds), the certificate is
``(A, r*)`` iff ``z~ > tau(r+)``, ``r+`` the first calibrated grid radius ``>= r*``
(``required_thresholds``); otherwise an abstention (the hybrid then runs its sequential fallback in
target mode). The best-radius ``R^`` is not used in that mode: one rule per certificate keeps its
bound at ``epsilon + alpha_mc``. ``r*`` is one number per call (``check_required_radius``): the
thresholds hold for an ``r*`` fixed before the input is seen, not for one chosen from its output.

What a one-pass certificate guarantees (calibration and test inputs exchangeable; docs/guarantees.md):
with the ``marginal`` guarantee, ``P(wrong) <= epsilon + alpha_mc`` over the calibration draw and a
random test input, *including the inputs it does not certify*; among the inputs the surrogate does
certify, the rate of wrong certificates can be larger (about ``epsilon / P(certified)`` at worst).
The ``issued`` guarantee (``calibration.conformal.ltt_offset``) bounds that rate itself: with
probability at least ``1 - delta`` over the calibration draw, ``P(wrong | certified) <= epsilon + alpha_mc``.

The rules that say which offset, bin or threshold an input gets live here, once: calibration fits
with them and deployment looks up with them, using the edges, offsets and grid stored in the
calibration (never a constant). A calibration is any object with the attributes of
``calibration.artifact.Calibration`` that this module reads: ``sigma``, ``groups``, ``bin_edges``,
``offsets``, ``pooled_offset``, ``radius_cap``, ``epsilon``, ``alpha_mc``, ``check_matches(surrogate)``
and, where present, ``fallback_groups``, ``score``, ``score_params`` and ``radius_thresholds``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import stats
from .certificate import Certificate, abstention
from .errors import InvalidParameterError
from .smoothing import check_images, noise_indices

__all__ = [
    "SurrogateCertifier",
    "GROUPINGS",
    "SCORES",
    "POOLED",
    "DEFAULT_CONFIDENCE_EDGES",
    "group_keys",
    "all_group_keys",
    "group_offsets",
    "bin_shifts",
    "deployed_radius",
    "required_thresholds",
    "certified_at_required",
    "required_radii",
    "check_required_radius",
    "never_certifying_groups",
    "SMALL_BATCH",
    "intra_op_threads",
    "shaped_radius",
]

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


def check_required_radius(required_radius) -> float | None:
    """One required radius ``r*`` for a whole batch (input l2 units), validated; None where none is asked.

    The required-radius thresholds hold for an ``r*`` fixed before the input is seen: certifying
    ``(A, r*)`` iff ``z~ > tau(r+)`` is wrong with probability at most ``epsilon + alpha_mc`` for each
    such ``r*``. An ``r*`` chosen per input from the surrogate's own output (say, the largest radius its
    threshold passes) is not covered, and is wrong far more often (``tests/test_required_radius_is_fixed.py``
    measures 0.6 on the linear ground truth). So the one-pass and hybrid certifiers take one number per
    call (a setting of the batch), never one per input; to ask different radii, make one call per radius
    with radii chosen without looking at the inputs. A required radius of 0 (or NaN, or None) asks for the
    class only: the best-radius rule answers it.

    Parameters
    ----------
    required_radius : None or float
        ``r* >= 0`` for every input of the call.

    Returns
    -------
    float or None
        ``r*``, or None where none is required (None, NaN).

    Raises
    ------
    InvalidParameterError
        If it is not one number (an array of radii per input is refused), or is negative or infinite.
    """
    if required_radius is None:
        return None
    try:
        arr = np.asarray(required_radius, dtype=float)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"required_radius must be a radius (a number), got {required_radius!r}") from None
    if arr.ndim != 0:
        raise InvalidParameterError(
            "required_radius must be one radius for the whole batch (a setting fixed before the inputs are seen), "
            f"got an array of shape {arr.shape}; the thresholds do not hold for a radius chosen per input"
        )
    value = float(arr)
    if np.isnan(value):
        return None
    if np.isinf(value) or value < 0:
        raise InvalidParameterError(f"required_radius must be a finite radius >= 0 (input l2 units), got {value}")
    return value


def required_radii(required_radius, num: int) -> np.ndarray:
    """``check_required_radius`` broadcast to the ``num`` inputs of a call: shape ``(num,)``, NaN where none.

    Raises
    ------
    InvalidParameterError
        As ``check_required_radius`` (one radius per input is refused).
    """
    value = check_required_radius(required_radius)
    return np.full(num, np.nan if value is None else value)


def _check_threads(threads) -> int | str | None:
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InvalidParameterError(f"threads must be 'auto', None or an integer >= 1, got {threads!r}")
    return int(threads)


GROUPINGS = ("none", "class", "confidence")
"""Mondrian groupings: one pooled group, one group per predicted class, or confidence bins."""

SCORES = ("residual", "shifted", "shaped")
"""Conformity scores of the best-radius calibration: ``residual`` ``R~ - y`` (one offset per group),
``shifted`` ``R~ - t_b - y`` with per-bin offsets ``t_b`` fitted on a tuning part of the calibration split
(bins of ``z~``, edges and offsets stored in ``score_params``) and one conformal shift ``q^``, or ``shaped``
``z~ - g(r+(y))``: required-radius thresholds ``g`` fitted on a tuning part, one conformal shift ``c`` in
``z~`` units (``score_params``: ``grid``, ``shape``, ``shift``; ``calibration.shaped``)."""

POOLED = "all"
"""Group key of the pooled (whole calibration set) offset."""

DEFAULT_CONFIDENCE_EDGES = (1.0, 2.0, 3.0)
"""Default bin edges of ``groups="confidence"`` on ``Phi^{-1}(p~)`` (the surrogate radius in sigma
units), fixed in advance from the surrogate alone: ``p~`` below 0.841, up to 0.977, up to 0.9987,
above. A calibration stores the edges it used in ``bin_edges``."""


def group_keys(predicted, p_tilde, groups: str, edges: Sequence[float] | None = None, z=None) -> np.ndarray:
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
    z : array_like of float, optional
        ``z~`` per input (``Surrogate.predict_z``). This function is the one rule that bins inputs, for
        calibration, deployment and the audit alike; each passes the surrogate's tail-accurate ``z~``.
        Without it, ``stats.probit_of_probability(p~)`` (the same wherever ``p~`` is representable).

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
        bins = stats.confidence_bin(p_tilde, DEFAULT_CONFIDENCE_EDGES if edges is None else edges, z=z)
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


def never_certifying_groups(calibration) -> set[str]:
    """Groups of a Mondrian calibration whose inputs the surrogate never certifies (``offset = +inf``).

    A group without a valid offset of its own (fewer calibration points than ``min_group_size``, listed
    in ``fallback_groups``) never certifies by the surrogate: its inputs go to the sequential fallback,
    or abstain. The pooled offset is not a valid offset for such a group (an audit of the statistics
    measured a hard low-confidence bin on the pooled offset wrong 12% of the time at epsilon = 0.01),
    and it also voids the pooled bound (0.0137 overall against 0.011). Files of format version 3 and
    older stored the pooled offset for those groups; they are read with this rule too.
    """
    if calibration.groups == "none":
        return set()
    return {str(g) for g in (getattr(calibration, "fallback_groups", None) or [])}


def group_offsets(calibration, predicted, p_tilde, z=None) -> np.ndarray:
    """``q^`` of each input's group, under the calibration's grouping and stored bin edges.

    A group without its own valid offset (``never_certifying_groups``), or one the calibration does not
    list, gets ``+inf``: the surrogate never certifies it (the hybrid's fallback does).

    Parameters
    ----------
    calibration : Calibration
        Read for ``groups``, ``bin_edges``, ``offsets`` and ``pooled_offset``.
    predicted : array_like of int
        The surrogate's class of each input.
    p_tilde : array_like of float
        The surrogate's probability of that class, per input.
    z : array_like of float, optional
        ``z~`` per input (``Surrogate.predict_z``), binned for ``groups="confidence"`` (see ``group_keys``).

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
        ids = stats.confidence_bin(p_tilde, edges, z=z)
        size = len(edges) + 1
    else:
        raise InvalidParameterError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    never = never_certifying_groups(calibration)
    table = np.array(
        [np.inf if str(g) in never else calibration.offsets.get(str(g), np.inf) for g in range(size)], dtype=float
    )
    return table[ids] if num else np.zeros(0)


def bin_shifts(calibration, z) -> np.ndarray:
    """``t_b`` of each input under a ``shifted``-score calibration (0 under ``residual``), l2 input units.

    The bin is ``digitize(z~, bin_edges)`` with the edges stored in ``score_params`` (chosen on the
    tuning part of the calibration split); ``+inf`` (stored as null) never certifies.

    Parameters
    ----------
    calibration : Calibration
        Read for ``score`` and ``score_params`` (``bin_edges``, ``bin_offsets``).
    z : array_like of float
        ``z~`` per input (``Surrogate.predict_z``).

    Returns
    -------
    numpy.ndarray
        One shift per input.

    Raises
    ------
    InvalidParameterError
        If the score is unknown, or a ``shifted`` calibration lacks its edges or offsets.
    """
    z = np.atleast_1d(np.asarray(z, dtype=float))
    score = getattr(calibration, "score", "residual") or "residual"
    if score == "residual":
        return np.zeros(len(z))
    if score != "shifted":
        raise InvalidParameterError(f"score must be one of {SCORES}, got {score!r}")
    params = getattr(calibration, "score_params", None) or {}
    edges, offsets = params.get("bin_edges"), params.get("bin_offsets")
    if edges is None or offsets is None or len(offsets) != len(edges) + 1:
        raise InvalidParameterError(
            "a shifted-score calibration must store bin_edges and one bin_offset per bin; re-run calibrate"
        )
    table = np.array([np.inf if t is None else float(t) for t in offsets])
    return table[np.digitize(z, np.asarray(edges, dtype=float))]


def deployed_radius(calibration, predicted, p_tilde, z=None) -> np.ndarray:
    """``R^ = R~ - t_b - q^(group)`` for each input: the calibrated radius (certify iff > 0), l2 input units.

    ``R~ = min(sigma * Phi^{-1}(clip(p~)), radius_cap)`` with the calibration's ``sigma`` and
    ``radius_cap`` (``stats.calibrated_radius``); ``q^`` comes from ``group_offsets`` and ``t_b`` from
    ``bin_shifts`` (0 for the ``residual`` score).

    Parameters
    ----------
    calibration : Calibration
        Read for ``sigma`` and ``radius_cap``, and as ``group_offsets`` and ``bin_shifts`` read it.
    predicted : array_like of int
        The surrogate's class of each input.
    p_tilde : array_like of float
        The surrogate's probability of that class, per input.
    z : array_like of float, optional
        ``z~`` per input (``Surrogate.predict_z``); needed by a ``shifted`` score and used by confidence
        groups. Default: ``stats.probit_of_probability(p~)`` (equal wherever ``p~`` is representable).

    Returns
    -------
    numpy.ndarray
        ``R^`` per input, in input l2 units; ``<= 0`` (possibly ``-inf``) means no certificate.

    Raises
    ------
    InvalidParameterError
        As ``group_offsets``.
    """
    if z is None:
        z = stats.probit_of_probability(p_tilde)
    if (getattr(calibration, "score", "residual") or "residual") == "shaped":
        return shaped_radius(calibration, z)
    offsets = group_offsets(calibration, predicted, p_tilde, z=z) + bin_shifts(calibration, z)
    return np.atleast_1d(stats.calibrated_radius(p_tilde, calibration.sigma, calibration.radius_cap, offsets))


def shaped_radius(calibration, z) -> np.ndarray:
    """``R^`` of a ``shaped``-score calibration: the largest grid radius ``r`` with ``z~ > g(r) + c``, else 0.

    ``stats.shaped_radius`` with the ``grid``, ``shape`` and ``shift`` stored in ``score_params``
    (``calibration.shaped``); l2 input units, 0 = no certificate.

    Raises
    ------
    InvalidParameterError
        If the calibration lacks them.
    """
    params = getattr(calibration, "score_params", None) or {}
    if not all(k in params for k in ("grid", "shape", "shift")):
        raise InvalidParameterError("a shaped-score calibration must store grid, shape and shift; re-run calibrate")
    return np.atleast_1d(stats.shaped_radius(z, params["grid"], params["shape"], params["shift"]))


def required_thresholds(calibration, required_radius) -> np.ndarray:
    """``tau(r+)`` for each required radius ``r*``: the ``z~`` an input must exceed to be certified at ``r*``.

    ``r+`` is the first radius of the calibration's grid at least ``r*`` (``stats.grid_point_at_least``):
    the certificate claims ``r* <= r+`` while ``tau(r+)`` bounds the rate of references below ``r+``, so
    rounding up is conservative (whether or not ``tau`` is monotone in ``r``). Beyond the grid (``r*`` above the
    radius cap) the threshold is ``+inf``: the one-pass certifier never claims a radius no calibration
    point could confirm.

    Parameters
    ----------
    calibration : Calibration
        Read for ``radius_thresholds`` (``grid``, ``tau``; null = ``+inf``).
    required_radius : float or array_like of float
        ``r* > 0`` per input (or one for all), input l2 units.

    Returns
    -------
    numpy.ndarray
        One threshold per required radius.

    Raises
    ------
    InvalidParameterError
        If the calibration holds no required-radius thresholds.
    """
    table = getattr(calibration, "radius_thresholds", None)
    if not table:
        raise InvalidParameterError(
            "this calibration holds no required-radius thresholds; re-run calibrate with "
            "this version (they are fitted by default)"
        )
    grid = np.asarray(table["grid"], dtype=float)
    tau = np.array([np.inf if t is None else float(t) for t in table["tau"]] + [np.inf])
    return tau[stats.grid_point_at_least(grid, np.atleast_1d(np.asarray(required_radius, dtype=float)))]


def certified_at_required(calibration, z, required_radius) -> np.ndarray:
    """Whether the one-pass rule certifies ``(A, r*)``: ``z~ > tau(r+)`` (``required_thresholds``), per input.

    With calibration and test inputs exchangeable, for each ``r*`` fixed before the input is seen, a
    certificate is wrong with probability at most ``epsilon + alpha_mc`` (``stats.threshold_scores``;
    over the inputs it certifies, with probability ``1 - delta``, for thresholds fitted with the
    ``issued`` guarantee). Not for an ``r*`` derived from the input's own surrogate output.

    Parameters
    ----------
    calibration : Calibration
        With ``radius_thresholds``.
    z : array_like of float
        ``z~`` per input.
    required_radius : float
        ``r* > 0``, one radius for every input (``check_required_radius``), input l2 units.

    Returns
    -------
    numpy.ndarray
        Boolean, one per input.

    Raises
    ------
    InvalidParameterError
        If ``required_radius`` is not one radius, or the calibration holds no thresholds.
    """
    z = np.atleast_1d(np.asarray(z, dtype=float))
    radius = check_required_radius(required_radius)
    if radius is None:
        raise InvalidParameterError("certified_at_required needs a required radius r* > 0")
    return z > required_thresholds(calibration, radius)[0]


class SurrogateCertifier:
    """Certify a batch in one surrogate forward pass (``n_samples = 0``).

    With the calibration and test inputs exchangeable, a certificate is wrong (``R > 0`` and the class
    or radius not true) with probability at most ``calibration.epsilon + calibration.alpha_mc``. What
    that probability is over depends on ``calibration.guarantee``: ``marginal``, over the calibration
    draw and a random test input whether or not it gets a certificate (conditional on a certificate
    being issued the rate can be larger); ``pac``, over a random test input, for all but a share
    ``delta`` of calibration draws; ``issued``, over a random test input *that gets a certificate*, for
    all but a share ``delta`` of calibration draws. Mondrian calibrations hold their statement within
    each group with an offset of its own; the other groups are never certified by the surrogate.
    Required-radius certificates hold for each ``r*`` fixed before the input is seen.

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
        if isinstance(self.threads, str):  # "auto", the only text _check_threads lets through
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
        classes, p_tilde, _, radius = self.evaluate(x, validate=validate)
        return classes, p_tilde, radius

    def evaluate(self, x: torch.Tensor, *, validate: bool = True):
        """``(A, p~, z~, R^)`` per input: ``radii`` plus the tail-accurate ``z~`` the thresholds use.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        validate : bool, optional
            Check ``x`` (``check_images``).

        Returns
        -------
        tuple of numpy.ndarray
            Classes (int64), ``p~`` (float64), ``z~`` (float64), ``R^`` (input l2 units).

        Raises
        ------
        InvalidInputError
            If ``x`` is not a valid image batch of the surrogate's input shape.
        """
        if validate:
            x = check_images(x, self.surrogate.input_shape)
        with intra_op_threads(self._threads_for(x.shape[0])):
            classes, p_tilde, z = self.surrogate.predict_z(x, validate=False)
        return classes, p_tilde, z, deployed_radius(self.calibration, classes, p_tilde, z)

    def certify(
        self, x: torch.Tensor, indices: Sequence[int] | np.ndarray | None = None, required_radius=None
    ) -> list[Certificate]:
        """One ``Certificate`` per input: ``(A, R^)`` with method ``surrogate`` if ``R^ > 0``, else abstain.

        With ``required_radius`` (``r* > 0``, scalar or per input; NaN or None = none) and a
        calibration holding required-radius thresholds, an input gets ``(A, r*)`` iff
        ``z~ > tau(r+)`` (``certified_at_required``), else an abstention; calibrations without
        thresholds (made before they existed) certify ``(A, R^)`` where ``R^ >= r*``.

        Each non-abstaining certificate carries the class's guarantee (wrong with probability at most
        ``calibration.epsilon + calibration.alpha_mc``, in the sense of ``calibration.guarantee``; see the
        class docstring).
        ``indices`` is accepted so every certifier has the same call, and checked (one per input),
        but no noise is drawn: the one-pass certificate depends on the image alone.

        Parameters
        ----------
        x : torch.Tensor
            ``N x C x H x W`` images of the surrogate's input shape, pixels in [0, 1].
        indices : sequence of int or numpy.ndarray, optional
            Noise names, checked for length only.
        required_radius : float, optional
            ``r*``: the radius every input of the call must be certified to (input l2 units), fixed
            before the inputs are seen (``check_required_radius``; one radius per input is refused).

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
            As ``group_offsets``; or ``required_radius`` is not one radius >= 0.
        """
        started = time.perf_counter()
        classes, _, z, radius = self.evaluate(x)
        noise_indices(indices, len(classes))
        required = required_radii(required_radius, len(classes))
        radius = self.radius_for(z, radius, required)
        p_lower = self.p_lower(radius)
        seconds = (time.perf_counter() - started) / max(len(classes), 1)
        return [
            self.certificate(c, r, seconds, p_lower=p)
            for c, r, p in zip(classes.tolist(), radius.tolist(), p_lower.tolist())
        ]

    @property
    def has_thresholds(self) -> bool:
        """Whether the calibration holds required-radius thresholds."""
        return bool(getattr(self.calibration, "radius_thresholds", None))

    def radius_for(self, z, radius, required) -> np.ndarray:
        """The one-pass radius of each input given its required radius: ``R^`` where none (NaN) or 0 is
        required; where ``r* > 0`` is, ``r*`` if certified at it (thresholds) and 0 otherwise, or (a
        calibration without thresholds) ``R^`` if ``R^ >= r*`` and 0 otherwise."""
        radius = np.asarray(radius, dtype=float).copy()
        with np.errstate(invalid="ignore"):
            asked = required > 0  # NaN (none) and 0 (the class only) keep the best-radius rule
        if not asked.any():
            return radius
        if self.has_thresholds:
            radii = np.unique(required[asked])  # one radius per call (required_radii): an array is refused below
            ok = certified_at_required(self.calibration, np.asarray(z)[asked], radii[0] if radii.size == 1 else radii)
            radius[asked] = np.where(ok, required[asked], 0.0)
        else:
            radius[asked] = np.where(radius[asked] >= required[asked], radius[asked], 0.0)
        return radius

    def p_lower(self, radius) -> np.ndarray:
        """``Phi(R^ / sigma)`` where ``R^ > 0`` (the bound on ``p_A`` each radius stands for), else 0; under the sound
        noise scheme the inverse of its radius (``stats.grid_p_threshold`` with the calibration's slack)."""
        radius = np.asarray(radius, dtype=float)
        slack = float(getattr(self.calibration, "noise_slack", 0.0) or 0.0)
        return np.where(
            radius > 0, np.atleast_1d(stats.p_threshold(np.maximum(radius, 0.0), self.sigma, slack=slack)), 0.0
        )

    def certificate(
        self, cls: int, radius: float, seconds: float, n_samples: int = 0, p_lower: float | None = None
    ) -> Certificate:
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
                p_lower = float(np.ravel(self.p_lower(radius))[0])  # the p_A bound this radius stands for
            return Certificate(int(cls), float(radius), "surrogate", int(n_samples), float(p_lower), float(seconds))
        return abstention(n_samples, 0.0, seconds)
