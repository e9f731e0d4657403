"""Offline Monte Carlo data generation: datasets and their fixed splits, base models, and HDF5 files
of class counts under Gaussian noise (``surrogate-cert train-base`` / ``surrogate-cert datagen``)."""

from __future__ import annotations

from .datasets import SPLITS, SplitData, load_split
from .generate import generate_counts
from .models import LoadedModel, load_model, train_base
from .store import (
    CountsFile,
    CountsMismatchError,
    CountsWriter,
    ResumeMismatchError,
    StoreLockedError,
    check_counts_for,
    index_ranges,
    read_attrs,
    read_counts,
)

__all__ = [
    "SPLITS",
    "SplitData",
    "load_split",
    "LoadedModel",
    "load_model",
    "train_base",
    "CountsFile",
    "CountsWriter",
    "read_counts",
    "read_attrs",
    "generate_counts",
    "StoreLockedError",
    "ResumeMismatchError",
    "CountsMismatchError",
    "check_counts_for",
    "index_ranges",
]
