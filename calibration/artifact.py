"""The calibration artifact, ``calibration.json``: the offsets ``q^`` and everything they depend on.

A calibration is only valid for the surrogate, noise level and class count it was computed for,
so the file binds them, and ``load_calibration`` refuses another surrogate, sigma or class count,
and a file whose content no longer matches its integrity hash (edited by hand or truncated).

Keys (stable; the HTML report reads them):

======================== =========================================================================
``format``               ``"surrogate-cert-calibration"``
``format_version``       1
``surrogate_sha256``     SHA-256 of the surrogate's weights and metadata (``Surrogate.fingerprint``)
``surrogate_file_sha256``SHA-256 of the surrogate checkpoint file, when calibrated from a file
``counts_sha256``        SHA-256 of the calibration counts file
``base_model_sha256``    the base model's SHA-256 recorded in the counts file
``dataset``, ``split``   where the calibration images came from
``sigma``                noise level (l2, input units)
``num_classes``          number of classes
``epsilon``              target rate of ``R^ > reference``
``alpha_mc``             Clopper-Pearson level of the reference radius
``delta``                PAC / LTT confidence parameter (``null`` for marginal conformal)
``guarantee``            ``"marginal"`` or ``"pac"``
``method``               ``"conformal"`` or ``"ltt"``
``groups``               ``"none"``, ``"class"`` or ``"confidence"``
``offsets``              ``{group: q^}``; ``null`` = infinite (that group never certifies)
``pooled_offset``        ``q^`` of the whole calibration set (``null`` = infinite)
``group_sizes``          ``{group: calibration points in it}``
``fallback_groups``      groups too small for their own ``q^`` (they use ``pooled_offset``)
``min_group_size``       points a group needs for its own ``q^``
``radius_cap``           ``r_max``: surrogate radii are clipped here before the offset (the largest
                         reference radius ``n_cal`` samples can express)
``bin_edges``            confidence-bin edges on ``Phi^{-1}(p~)`` (``groups="confidence"``), else null
``calibration_size``     number of calibration points ``m``
``n_cal``                noisy samples per calibration point
``bound``                the guarantee in numbers: ``epsilon + alpha_mc`` (surrogate certificates)
``package_version``      surrogate-cert version that wrote the file
``created``              UTC time of writing (ISO 8601)
``diagnostics``          in-sample summary numbers: ``certified_share``, ``violation_rate`` (share
                         with ``R^ > reference``), ``violation_rate_among_certified``,
                         ``mean_certified_radius``, ``mean_surrogate_radius``,
                         ``mean_reference_radius``, ``reference_positive_share``,
                         ``mapie_interval_coverage`` / ``mapie_interval_nominal`` (MAPIE's coverage
                         of its two-sided intervals, pooled), ``surrogate_agrees_with_counts``
``monitor_reference``    optional: the surrogate's class ``predicted`` and probability ``p_tilde`` of
                         every calibration image, in calibration order (``statistic`` names them):
                         the reference sample of the drift monitor (``deploy.monitor``). Files
                         written before it existed lack it; the monitor then asks to recalibrate.
``integrity_sha256``     SHA-256 of the canonical JSON of every other key (sorted, compact)
======================== =========================================================================
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from surrogate_cert.core.errors import CalibrationError
from surrogate_cert.core.surrogate import Surrogate

FORMAT = "surrogate-cert-calibration"
FORMAT_VERSION = 1


def _encode_offset(q: float) -> float | None:
    return None if q is None or math.isinf(q) else float(q)


def _decode_offset(q) -> float:
    return float("inf") if q is None else float(q)


def _content_hash(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class Calibration:
    """A calibrated surrogate's offsets ``q^`` with their provenance (see the module docstring)."""

    surrogate_sha256: str
    sigma: float
    num_classes: int
    epsilon: float
    alpha_mc: float
    guarantee: str
    method: str
    groups: str
    offsets: dict
    pooled_offset: float
    calibration_size: int
    n_cal: int
    radius_cap: float  # required: offsets are only valid for radii clipped where they were calibrated
    delta: float | None = None
    group_sizes: dict = field(default_factory=dict)
    fallback_groups: list = field(default_factory=list)
    min_group_size: int = 0
    bin_edges: list | None = None
    surrogate_file_sha256: str | None = None
    counts_sha256: str | None = None
    base_model_sha256: str | None = None
    dataset: str | None = None
    split: str | None = None
    package_version: str | None = None
    created: str | None = None
    diagnostics: dict = field(default_factory=dict)
    monitor_reference: dict | None = None

    # ------------------------------------------------------------------ use
    @property
    def bound(self) -> float:
        """Probability that a surrogate certificate is wrong: at most ``epsilon + alpha_mc``."""
        return self.epsilon + self.alpha_mc

    def offset(self, group: str) -> float:
        """``q^`` of a group (the pooled one for a group never seen in calibration)."""
        return float(self.offsets.get(group, self.pooled_offset))

    def check_matches(self, surrogate) -> None:
        """Refuse (``CalibrationError``) a surrogate this calibration was not made for.

        Parameters
        ----------
        surrogate : Surrogate
            Checked for the same fingerprint (weights and metadata), sigma and class count.

        Raises
        ------
        CalibrationError
            If any of the three differs.
        """
        if surrogate.fingerprint() != self.surrogate_sha256:
            raise CalibrationError(
                "the calibration was made for another surrogate (SHA-256 mismatch); "
                "re-run `surrogate-cert calibrate` with this surrogate"
            )
        if not math.isclose(float(surrogate.sigma), self.sigma, rel_tol=1e-9):
            raise CalibrationError(
                f"the calibration is for sigma={self.sigma} but the surrogate has sigma={surrogate.sigma}; "
                "re-calibrate"
            )
        if int(surrogate.num_classes) != self.num_classes:
            raise CalibrationError(
                f"the calibration is for {self.num_classes} classes but the surrogate has {surrogate.num_classes}; "
                "re-calibrate"
            )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """The JSON content, with the integrity hash over everything else.

        Infinite offsets and non-finite diagnostics become ``null``; ``created`` is filled with the
        current UTC time if unset; ``bound`` is added.

        Returns
        -------
        dict
            The keys of the module docstring, ``integrity_sha256`` last.
        """
        content = asdict(self)
        content["offsets"] = {k: _encode_offset(v) for k, v in self.offsets.items()}
        content["pooled_offset"] = _encode_offset(self.pooled_offset)
        content["radius_cap"] = _encode_offset(self.radius_cap)
        content["created"] = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        content["bound"] = self.bound
        content["diagnostics"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                  for k, v in self.diagnostics.items()}
        content = {"format": FORMAT, "format_version": FORMAT_VERSION, **content}
        content["integrity_sha256"] = _content_hash(content)
        return content

    def save(self, path: str | os.PathLike) -> str:
        """Write calibration.json atomically; returns the path.

        Sets ``created`` to the time written into the file if it was unset.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write (replaced if it exists).

        Returns
        -------
        str
            ``path``.
        """
        path = os.fspath(path)
        content = self.to_dict()
        self.created = content["created"]
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(content, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, content: dict) -> "Calibration":
        """Rebuild from JSON content after checking its format and integrity hash.

        Parameters
        ----------
        content : dict
            The parsed calibration.json (as ``to_dict`` made it).

        Returns
        -------
        Calibration

        Raises
        ------
        CalibrationError
            If ``content`` is not a calibration of this format version, or its integrity hash does not
            match. Missing required fields raise ``KeyError`` or ``TypeError`` here;
            ``load_calibration`` turns them into ``CalibrationError``.
        """
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            raise CalibrationError("not a surrogate-cert calibration file; create one with `surrogate-cert calibrate`")
        if content.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(
                f"calibration format version {content.get('format_version')} is not supported "
                f"(this version reads {FORMAT_VERSION}); re-run `surrogate-cert calibrate`"
            )
        stored = content.get("integrity_sha256")
        rest = {k: v for k, v in content.items() if k != "integrity_sha256"}
        if stored != _content_hash(rest):
            raise CalibrationError(
                "the calibration file was modified after it was written (integrity hash mismatch); "
                "re-run `surrogate-cert calibrate`"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in rest.items() if k in names}
        kwargs["offsets"] = {k: _decode_offset(v) for k, v in content["offsets"].items()}
        kwargs["pooled_offset"] = _decode_offset(content["pooled_offset"])
        kwargs["radius_cap"] = _decode_offset(content["radius_cap"])
        kwargs["diagnostics"] = {k: (float("nan") if v is None else v) for k, v in content.get("diagnostics", {}).items()}
        return cls(**kwargs)


def load_calibration(path: str | os.PathLike, surrogate=None) -> Calibration:
    """Read calibration.json, refusing a tampered file or one made for another surrogate.

    ``surrogate`` (a ``Surrogate`` or a checkpoint path) is checked when given: same weights and
    metadata fingerprint, sigma and class count, else ``CalibrationError``.

    Parameters
    ----------
    path : str or os.PathLike
        The calibration file.
    surrogate : Surrogate or path, optional
        The surrogate it must belong to.

    Returns
    -------
    Calibration

    Raises
    ------
    CalibrationError
        If the file cannot be read, is not valid JSON, lacks fields, is of another format version,
        was modified after it was written, or belongs to another surrogate.
    ModelError
        If ``surrogate`` is a path that cannot be loaded as a surrogate.
    """
    try:
        with open(path) as fh:
            content = json.load(fh)
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path} is not valid JSON ({exc.msg}); re-run `surrogate-cert calibrate`") from None
    try:
        calibration = Calibration.from_dict(content)
    except (KeyError, TypeError) as exc:
        raise CalibrationError(f"{path} lacks calibration fields ({exc}); re-run `surrogate-cert calibrate`") from None
    if surrogate is not None:
        if not isinstance(surrogate, Surrogate):
            surrogate = Surrogate.load(surrogate)
        calibration.check_matches(surrogate)
    return calibration


__all__ = ["Calibration", "load_calibration", "FORMAT", "FORMAT_VERSION"]
