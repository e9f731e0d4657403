"""Certificate records and the results TSV (Cohen et al.'s columns first, then ours)."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

METHODS = ("surrogate", "eprocess", "cohen", "abstain")
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "method", "n_samples", "p_lower")


@dataclass(frozen=True)
class Certificate:
    """One certifier's answer for one input.

    ``prediction`` is the certified class (-1 = abstain); ``radius`` the certified l2 radius in input
    units (0 when abstaining); ``method`` which path made it (``surrogate | eprocess | cohen |
    abstain``); ``n_samples`` the base-model evaluations spent on this input; ``p_lower`` the lower
    bound on ``p_A(x)`` the radius comes from (for the surrogate: ``Phi(radius / sigma)``);
    ``seconds`` the wall time attributed to this input.
    """

    prediction: int
    radius: float
    method: str
    n_samples: int
    p_lower: float
    seconds: float

    @property
    def abstained(self) -> bool:
        return self.prediction < 0

    def as_dict(self) -> dict:
        return asdict(self)


def abstention(n_samples: int = 0, p_lower: float = 0.0, seconds: float = 0.0) -> Certificate:
    """The abstain certificate: class -1, radius 0."""
    return Certificate(-1, 0.0, "abstain", int(n_samples), float(p_lower), float(seconds))


def write_tsv(
    path: str | os.PathLike,
    indices: Sequence[int],
    labels: Sequence[int],
    certificates: Sequence[Certificate],
    header_comment: str | None = None,
) -> None:
    """Write results as TSV, atomically (a temporary file renamed over ``path``).

    Columns: ``idx label predict radius correct time method n_samples p_lower``; Cohen et al.'s
    analysis scripts read the first six unchanged. ``header_comment`` lines start with ``#``.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        if header_comment:
            for line in header_comment.splitlines():
                fh.write(f"# {line}\n")
        fh.write("\t".join(TSV_COLUMNS) + "\n")
        for idx, label, c in zip(indices, labels, certificates):
            correct = int(c.prediction == int(label))
            fh.write(
                f"{int(idx)}\t{int(label)}\t{c.prediction}\t{c.radius:.6g}\t{correct}\t{c.seconds:.6g}\t"
                f"{c.method}\t{c.n_samples}\t{c.p_lower:.6g}\n"
            )
    os.replace(tmp, path)


def read_tsv(path: str | os.PathLike) -> list[dict]:
    """Read a results TSV written by ``write_tsv`` (``#`` comment lines skipped) into typed rows."""
    from .errors import InvalidInputError

    rows: list[dict] = []
    try:
        with open(path, newline="") as fh:
            lines = [line for line in fh if not line.startswith("#")]
    except OSError as exc:
        raise InvalidInputError(f"cannot read results file {path}: {exc.strerror}") from None
    reader = csv.DictReader(lines, delimiter="\t")
    missing = [c for c in TSV_COLUMNS[:6] if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidInputError(f"{path} is not a results TSV: missing columns {missing}")
    for r in reader:
        rows.append(
            dict(
                idx=int(r["idx"]),
                label=int(r["label"]),
                predict=int(r["predict"]),
                radius=float(r["radius"]),
                correct=int(r["correct"]),
                time=_parse_seconds(r["time"]),
                method=r.get("method") or ("abstain" if int(r["predict"]) < 0 else "cohen"),
                n_samples=int(r["n_samples"]) if r.get("n_samples") not in (None, "") else -1,
                p_lower=float(r["p_lower"]) if r.get("p_lower") not in (None, "") else math.nan,
            )
        )
    return rows


def _parse_seconds(text: str) -> float:
    """Seconds from ``12.5`` (ours) or ``0:00:01.234567`` (Cohen et al.'s ``str(timedelta)``)."""
    if ":" not in text:
        return float(text)
    seconds = 0.0
    for part in text.split(":"):
        seconds = 60 * seconds + float(part)
    return seconds


def read_tsv_comments(path: str | os.PathLike) -> list[str]:
    """The ``#`` header lines of a results TSV (the command that made it, versions), without ``# ``."""
    with open(path) as fh:
        return [line[2:].rstrip("\n") for line in fh if line.startswith("#")]


def certified_accuracy(rows: Iterable[dict], radii: Sequence[float]) -> list[float]:
    """Share of rows whose prediction is correct with certified radius >= r, for each r in ``radii``."""
    rows = list(rows)
    if not rows:
        return [0.0 for _ in radii]
    return [sum(1 for r in rows if r["correct"] and r["radius"] >= rad) / len(rows) for rad in radii]
