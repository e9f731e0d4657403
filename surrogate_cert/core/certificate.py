"""Certificate records and the results TSV (Cohen et al.'s six columns first, then ours).

A results file is two files: ``out.tsv``, whose first line is the header
``idx label predict radius correct time method n_samples stop_time p_lower route`` so that Cohen et al.'s analysis
code (``pd.read_csv(path, delimiter="\\t")``) reads it unchanged, and ``out.tsv.meta.json``, the
provenance (command, versions, sigma, seed, device, ...). Both are written atomically.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidInputError, InvalidParameterError
from .files import MAKERS, commit_outputs, sniff, wrong_kind

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
"""The columns of Cohen et al.'s ``certify.py`` output, in their order: always first."""

TSV_COLUMNS = COHEN_COLUMNS + ("method", "n_samples", "stop_time", "p_lower", "route")

ROUTES = ("direct", "surrogate", "fallback", "required_radius", "drift_alarm", "audit_alarm", "refined")
"""Why a certificate took its path (``Certificate.route``): ``direct`` (a certifier called by itself),
or the hybrid's reason: ``surrogate`` (the one-pass radius sufficed, or no fallback), ``fallback`` (the
one-pass radius was not positive), ``required_radius`` (it was below the required radius),
``refined`` (a positive one-pass best radius that sampling was expected to raise at the price),
``drift_alarm`` / ``audit_alarm`` (a deployment watcher had raised its alarm: the one-pass
certificate was not trusted)."""

META_SUFFIX = ".meta.json"
"""Provenance sidecar of a results file: ``<out>.meta.json``."""


@dataclass(frozen=True)
class Certificate:
    """One certifier's answer for one input.

    Attributes
    ----------
    prediction : int
        The certified class; -1 means abstain.
    radius : float
        Certified l2 radius in input units (pixels in [0, 1]); 0 when abstaining.
    method : str
        The path that made it: ``surrogate``, ``eprocess``, ``cohen`` or ``abstain``.
    n_samples : int
        Base-model evaluations spent on this input.
    p_lower : float
        The lower bound on ``p_A(x)`` the radius stands for (``Phi(radius / sigma)`` for the
        surrogate).
    seconds : float
        Wall time attributed to this input.
    route : str
        Why it took its path (``ROUTES``); ``direct`` unless the hybrid routed it.
    stop_time : int, optional
        Base-model evaluations spent when the stopping rule fired (pilot samples included); at most
        ``n_samples``, the difference being samples drawn in the same batch after the decision.
        Default (None): ``n_samples``, the stop of a fixed-sample procedure.
    """

    prediction: int
    radius: float
    method: str
    n_samples: int
    p_lower: float
    seconds: float
    route: str = "direct"
    stop_time: int | None = None  # after route: route was the seventh positional field first

    def __post_init__(self):
        if self.stop_time is None:
            object.__setattr__(self, "stop_time", int(self.n_samples))

    @property
    def abstained(self) -> bool:
        return self.prediction < 0

    def as_dict(self) -> dict:
        return asdict(self)


def abstention(
    n_samples: int = 0, p_lower: float = 0.0, seconds: float = 0.0, stop_time: int | None = None
) -> Certificate:
    """The abstain certificate: class -1, radius 0.

    Parameters
    ----------
    n_samples : int, optional
        Base-model evaluations spent on the input.
    p_lower : float, optional
        The lower bound on ``p_A(x)`` reached, for the record.
    seconds : float, optional
        Wall time attributed to the input.
    stop_time : int, optional
        Evaluations spent when the stopping rule fired; default ``n_samples``.

    Returns
    -------
    Certificate
        ``prediction = -1``, ``radius = 0.0``, method ``abstain``.
    """
    return Certificate(
        -1,
        0.0,
        "abstain",
        int(n_samples),
        float(p_lower),
        float(seconds),
        stop_time=None if stop_time is None else int(stop_time),
    )


def meta_path(path: str | os.PathLike) -> str:
    """Where the provenance of results file ``path`` lives: ``path + ".meta.json"``.

    Parameters
    ----------
    path : str or os.PathLike
        The results TSV.

    Returns
    -------
    str
        The sidecar's path.
    """
    return os.fspath(path) + META_SUFFIX


def write_tsv(
    path: str | os.PathLike,
    indices: Sequence[int],
    labels: Sequence[int],
    certificates: Sequence[Certificate],
    meta: Mapping | None = None,
    *,
    header_comment: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write results as TSV plus its provenance sidecar: one output, written atomically.

    Both files are written to temporary names and renamed into place only when complete, the
    sidecar first: an interrupted call leaves no half file, and a TSV is never newer than its
    sidecar.

    Columns ``idx label predict radius correct time method n_samples stop_time p_lower route``, header
    on the first line; ``radius`` in input l2 units, ``time`` in seconds, ``correct`` is 1 iff
    ``predict`` equals the label, ``stop_time`` the evaluations spent when the stopping rule fired
    (``n_samples`` for fixed-sample methods). ``meta`` goes to ``meta_path(path)``.

    Parameters
    ----------
    path : str or os.PathLike
        The TSV to write.
    indices : sequence of int
        Dataset index of each input.
    labels : sequence of int
        True label of each input.
    certificates : sequence of Certificate
        One per input; ``indices``, ``labels`` and ``certificates`` have the same length.
    meta : mapping, optional
        Provenance, plain JSON values (command, versions, sigma, seed, device, ...).
    header_comment : str, optional
        Deprecated: its lines are stored in the sidecar under ``"comment"``, never in the TSV
        (emits a ``DeprecationWarning``).
    overwrite : bool, optional
        Replace an existing TSV and sidecar (default); if false, ``OutputExistsError`` when either
        exists and nothing is written.

    Raises
    ------
    InvalidParameterError
        If ``indices``, ``labels`` and ``certificates`` differ in length.
    OutputExistsError
        If ``overwrite`` is false and the TSV or its sidecar exists.
    """
    path = os.fspath(path)
    lengths = {len(indices), len(labels), len(certificates)}
    if len(lengths) != 1:
        raise InvalidParameterError(
            f"indices, labels and certificates must have one entry per input, got lengths "
            f"{len(indices)}, {len(labels)} and {len(certificates)}"
        )
    meta = dict(meta or {})
    if header_comment is not None:
        warnings.warn(
            "write_tsv(header_comment=...) is deprecated: pass meta={...}; provenance now goes "
            "to the .meta.json sidecar",
            DeprecationWarning,
            stacklevel=2,
        )
        meta.setdefault("comment", header_comment.splitlines())
    lines = ["\t".join(TSV_COLUMNS)]
    for idx, label, c in zip(indices, labels, certificates):
        correct = int(c.prediction == int(label))
        lines.append(
            f"{int(idx)}\t{int(label)}\t{c.prediction}\t{c.radius:.6g}\t{correct}\t{c.seconds:.6g}\t"
            f"{c.method}\t{c.n_samples}\t{c.stop_time}\t{c.p_lower:.6g}\t{c.route}"
        )
    sidecar = json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    commit_outputs({meta_path(path): sidecar, path: "\n".join(lines) + "\n"}, overwrite=overwrite)


def read_tsv(path: str | os.PathLike) -> list[dict]:
    """Read a results TSV into typed rows (ours, Cohen et al.'s, or an older one with ``#`` lines).

    Columns beyond Cohen's six are optional: ``method`` defaults to ``cohen`` / ``abstain``,
    ``n_samples`` to -1 (unknown), ``p_lower`` to NaN. Every row is checked for consistency, so a
    report never shows numbers a certifier could not have written: ``label >= 0``,
    ``predict >= -1``, a finite ``radius >= 0`` that is 0 when abstaining, ``correct`` equal to
    ``predict == label``, a finite ``time >= 0``, ``n_samples >= -1`` and ``p_lower`` in [0, 1]
    (or NaN). ``route`` defaults to ``""`` (not recorded), ``stop_time`` to ``n_samples`` (files
    written before it existed: the stop is not known to be earlier than the last sample), and
    ``stop_time`` must lie in ``[0, n_samples]`` when both are known.

    Parameters
    ----------
    path : str or os.PathLike
        The results TSV.

    Returns
    -------
    list of dict
        One per row, with keys ``idx``, ``label``, ``predict``, ``correct``, ``n_samples`` and
        ``stop_time`` (int),
        ``radius`` (input l2 units), ``time`` (seconds, from ours or from Cohen et al.'s
        ``H:MM:SS.ffffff``), ``p_lower`` (float), ``method`` and ``route`` (str).

    Raises
    ------
    InvalidInputError
        If the file cannot be read, is not a text TSV (e.g. an HDF5 or JSON file), lacks one of
        Cohen's six columns, or has a malformed or inconsistent row.
    """
    kind = sniff(path)
    if kind == "missing":
        raise InvalidInputError(
            f"cannot read results file {path}: no such file; write one with `surrogate-cert cohen` "
            "/ `sequential` / `certify`"
        )
    if kind not in ("text", "empty"):
        raise InvalidInputError(wrong_kind(path, kind, "results"))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            lines = [line for line in fh if not line.startswith("#")]  # files of version 0.1 began with '#' lines
    except OSError as exc:
        raise InvalidInputError(f"cannot read results file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(wrong_kind(path, "binary", "results")) from None
    rows: list[dict] = []
    reader = csv.DictReader(lines, delimiter="\t")
    try:
        fieldnames = reader.fieldnames or []
    except csv.Error as exc:
        raise InvalidInputError(f"{path}: the header is malformed ({exc}); regenerate the file") from None
    missing = [c for c in COHEN_COLUMNS if c not in fieldnames]
    if missing:
        raise InvalidInputError(f"{path} is not {MAKERS['results']}: missing columns {missing}")
    try:
        for r in reader:
            rows.append(_typed_row(r))
    except (TypeError, ValueError, csv.Error) as exc:
        raise InvalidInputError(
            f"{path}: row {len(rows) + 2} is malformed ({str(exc)[:160]}); regenerate the file"
        ) from None
    return rows


def _typed_row(r: dict) -> dict:
    """One TSV row as typed values, checked for what a certifier can write (ValueError if not)."""
    if None in r:
        raise ValueError(f"{len(r[None])} cells more than the header's columns")
    row: dict[str, Any] = dict(
        idx=int(r["idx"]),
        label=int(r["label"]),
        predict=int(r["predict"]),
        radius=float(r["radius"]),
        correct=int(r["correct"]),
        time=_parse_seconds(r["time"]),
        method=r.get("method") or ("abstain" if int(r["predict"]) < 0 else "cohen"),
        n_samples=int(r["n_samples"]) if r.get("n_samples") not in (None, "") else -1,
        p_lower=float(r["p_lower"]) if r.get("p_lower") not in (None, "") else math.nan,
        route=r.get("route") or "",
    )
    row["stop_time"] = int(r["stop_time"]) if r.get("stop_time") not in (None, "") else row["n_samples"]
    if row["label"] < 0 or row["predict"] < -1 or row["idx"] < 0:
        raise ValueError("idx and label must be >= 0 and predict >= -1")
    if not (math.isfinite(row["radius"]) and row["radius"] >= 0) or (row["predict"] < 0 and row["radius"] != 0):
        raise ValueError(f"radius {row['radius']} must be finite, >= 0, and 0 when abstaining (predict -1)")
    if row["correct"] != int(row["predict"] == row["label"]):
        raise ValueError(f"correct={row['correct']} but predict={row['predict']} and label={row['label']}")
    if not (math.isfinite(row["time"]) and row["time"] >= 0):
        raise ValueError(f"time {row['time']} must be a finite number of seconds >= 0")
    if row["n_samples"] < -1 or not (math.isnan(row["p_lower"]) or 0.0 <= row["p_lower"] <= 1.0):
        raise ValueError("n_samples must be >= -1 and p_lower in [0, 1]")
    if row["n_samples"] >= 0 and not 0 <= row["stop_time"] <= row["n_samples"]:
        raise ValueError(f"stop_time {row['stop_time']} must lie in [0, n_samples={row['n_samples']}]")
    return row


def read_meta(path: str | os.PathLike) -> dict:
    """The provenance of results file ``path``: its ``.meta.json`` sidecar, or ``{}``.

    Files of version 0.1 carried provenance as ``#`` lines at the top of the TSV; those lines are
    returned as ``{"comment": [...]}``.

    Parameters
    ----------
    path : str or os.PathLike
        The results TSV (not the sidecar).

    Returns
    -------
    dict
        The sidecar's object; else the old comment lines; else ``{}`` (also when neither file can
        be read).

    Raises
    ------
    InvalidInputError
        If the sidecar exists but is not readable JSON holding an object.
    """
    sidecar = meta_path(path)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{sidecar} is not readable JSON ({exc}); regenerate the results") from None
        if not isinstance(meta, dict):
            raise InvalidInputError(f"{sidecar} must hold a JSON object; regenerate the results")
        return meta
    try:
        with open(path, encoding="utf-8") as fh:
            comments = [line[2:].rstrip("\n") for line in fh if line.startswith("#")]
    except (OSError, UnicodeDecodeError):
        return {}
    return {"comment": comments} if comments else {}


def _parse_seconds(text: str) -> float:
    """Seconds from ``12.5`` (ours) or ``0:00:01.234567`` (Cohen et al.'s ``str(timedelta)``)."""
    if ":" not in text:
        return float(text)
    seconds = 0.0
    for part in text.split(":"):
        seconds = 60 * seconds + float(part)
    return seconds


def certified_accuracy(rows: Iterable[dict], radii: Sequence[float]) -> list[float]:
    """Share of rows whose prediction is correct with certified radius >= r, for each r in ``radii``.

    Parameters
    ----------
    rows : iterable of dict
        Rows as ``read_tsv`` returns them (keys ``correct`` and ``radius``).
    radii : sequence of float
        Radii ``r``, input l2 units.

    Returns
    -------
    list of float
        One share per radius, over all rows (abstentions count as not certified); zeros when there
        are no rows.
    """
    rows = list(rows)
    if not rows:
        return [0.0 for _ in radii]
    return [sum(1 for r in rows if r["correct"] and r["radius"] >= rad) / len(rows) for rad in radii]
