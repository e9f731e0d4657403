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


class SignatureError(CalibrationError):
    """A key is configured and a calibration file is unsigned, or signed with another key, or altered."""


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


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``; else raise InvalidParameterError."""
    try:
        whole = not isinstance(value, (bool, str, bytes)) and int(value) == value and int(value) >= minimum
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
