"""Typed errors. Every message is one line that says what was wrong and what to do.

The command line turns any ``SurrogateCertError`` into that line on stderr and exit code 2;
Python callers catch the specific subclass.
"""

from __future__ import annotations


class SurrogateCertError(Exception):
    """Base class of every error this package raises on bad input or bad files."""


class InvalidParameterError(SurrogateCertError, ValueError):
    """A parameter (alpha, sigma, n, a prior, a radius, ...) is outside its valid range."""


class InvalidInputError(SurrogateCertError, ValueError):
    """Input images have the wrong shape or dtype, are not finite, or lie outside [0, 1]."""


class DatasetError(SurrogateCertError):
    """A dataset is unknown, or its files are missing or malformed."""


class ModelError(SurrogateCertError):
    """A model file cannot be loaded, or its output does not match the number of classes."""


class StoreError(SurrogateCertError):
    """An HDF5 counts file is unwritable, locked by another writer, or does not match a resume."""


class CalibrationError(SurrogateCertError):
    """A calibration is impossible (too few points) or a calibration file is tampered or mismatched."""


class ArtifactSignatureError(SurrogateCertError):
    """A signing key is configured and an artifact is unsigned, signed with another key, or altered after signing.

    The base of the three artifact-specific errors below: catch it to catch any signature failure.
    """


class SignatureError(CalibrationError, ArtifactSignatureError):
    """A key is configured and a calibration file is unsigned, or signed with another key, or altered."""


class CountsSignatureError(StoreError, ArtifactSignatureError):
    """A key is configured and a complete counts file is unsigned, or signed with another key, or altered."""


class CheckpointSignatureError(ModelError, ArtifactSignatureError):
    """A key is configured and a surrogate checkpoint is unsigned, or a checkpoint's signature does not verify."""


class OutputExistsError(SurrogateCertError):
    """An output file already exists and replacing it was not asked for (``--overwrite``)."""


def check_probability(name: str, value: float) -> float:
    """Return ``value`` as float if it lies strictly inside (0, 1); else raise InvalidParameterError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise InvalidParameterError(f"{name} must lie strictly between 0 and 1, got {value}; e.g. {name}=0.001")
    return value


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as float if it is finite and > 0; else raise InvalidParameterError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a positive number, got {value!r}") from None
    if not (value > 0.0 and value < float("inf")):
        raise InvalidParameterError(f"{name} must be a finite number > 0, got {value}")
    return value


SIGMA_MIN = 1e-4
SIGMA_MAX = 1e3
"""The noise levels accepted for inputs in [0, 1], set by float32 arithmetic, in which every sample is computed:
below ``SIGMA_MIN`` the noise added to a pixel near 1 is rounded to a few of float32's steps there (6e-8), so
the samples are no longer Gaussian; above ``SIGMA_MAX`` noise values (up to ~6 sigma) are so large that
float32 no longer resolves an 8-bit pixel step (1/255) beside them, so the image is lost in rounding (and
far above, the noise overflows to infinity)."""

SEED_MAX = 2**63 - 1
"""Largest seed: seeds are stored as int64 in counts files and feed 64-bit generators."""


def check_sigma(value: float, name: str = "sigma") -> float:
    """Return ``value`` as float if it is a noise level in [``SIGMA_MIN``, ``SIGMA_MAX``]; else InvalidParameterError.

    The message says why the range is what it is: pixels lie in [0, 1] and every sample is float32.
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a noise level (a number), got {value!r}") from None
    if not SIGMA_MIN <= value <= SIGMA_MAX:
        raise InvalidParameterError(
            f"{name} must lie in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] for pixels in [0, 1], got {value:g}: with float32 "
            f"samples, noise below {SIGMA_MIN:g} is lost in the rounding of the pixels and noise above "
            f"{SIGMA_MAX:g} loses the image in rounding (or overflows), so no certificate would mean anything; "
            "typical values are 0.12 to 1"
        )
    return value


def check_seed(value: int, name: str = "seed") -> int:
    """Return ``value`` as int if it is a whole number in [0, ``SEED_MAX``]; else InvalidParameterError."""
    try:
        whole = not isinstance(value, (bool, str, bytes, float)) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or not 0 <= int(value) <= SEED_MAX:
        raise InvalidParameterError(
            f"{name} must be a whole number in [0, 2**63 - 1] (it is stored as int64), got {value!r}"
        )
    return int(value)


def check_radius(value: float, name: str = "radius") -> float:
    """Return ``value`` as float if it is a finite radius >= 0 (input l2 units); else InvalidParameterError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a radius (a number >= 0, input l2 units), got {value!r}") from None
    if not (value >= 0.0 and value < float("inf")):
        raise InvalidParameterError(f"{name} must be a finite radius >= 0 (input l2 units), got {value}")
    return value


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``; else raise InvalidParameterError."""
    try:
        whole = not isinstance(value, (bool, str, bytes)) and int(value) == value and int(value) >= minimum
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
