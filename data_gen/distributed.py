"""Running one job as several processes under ``torchrun`` (one node or many, or under Slurm).

torchrun starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each; ``launch`` reads them, initialises the process group (gloo for CPU
devices, NCCL for CUDA ones, with a gloo group beside it for the small control messages), and gives
the command a ``Shard``: which rows of the split this process takes, which device it uses, and the
few collective steps a job needs (agreeing on errors, a barrier, gathering results on rank 0).
Without torchrun (or with one process) ``launch`` gives the whole job to one ``Shard`` and starts
nothing.

Rows are dealt out strided, row ``r`` of the split to process ``r % world_size``: every image costs
about the same, and a split in random order spreads the expensive ones evenly, so shards are
balanced whether or not the world size divides the rows (they differ by at most one row). Because
every image's noise is named by its dataset index, the merged result does not depend on the
world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from surrogate_cert.core.errors import InvalidParameterError, SurrogateCertError
from surrogate_cert.core.smoothing import resolve_device

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables torchrun sets in every process it starts."""

TIMEOUT_ENV = "SURROGATE_CERT_DIST_TIMEOUT"
"""Seconds a process waits in a collective step (e.g. for the slowest shard) before giving up."""

DEFAULT_TIMEOUT_SECONDS = 7 * 24 * 3600
"""A week: a finished rank may wait for a slow one as long as the job takes (after a relaunch with
--resume, one rank may have nearly all of its rows left while the others are done)."""

__all__ = ["Shard", "PeerError", "launch", "torchrun_world_size", "shard_positions", "SINGLE"]


class PeerError(SurrogateCertError):
    """Another process of the job failed; rank 0 reports its error, so this one says nothing more."""

    silent = True


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` when this process was started by torchrun (all of ``TORCHRUN_ENV`` set), else 1."""
    if not all(os.environ.get(name) for name in TORCHRUN_ENV):
        return 1
    try:
        return max(int(os.environ["WORLD_SIZE"]), 1)
    except ValueError:
        return 1


def shard_positions(num_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Row positions (in split order) that process ``rank`` of ``world_size`` takes: ``rank, rank + W, ...``.

    Parameters
    ----------
    num_rows : int
        Rows of the whole job.
    rank : int
        This process, ``0 <= rank < world_size``.
    world_size : int
        Processes of the job.

    Returns
    -------
    numpy.ndarray
        int64 positions; shards differ in length by at most one.
    """
    return np.arange(rank, num_rows, world_size, dtype=np.int64)


@dataclass
class Shard:
    """This process's part of a job: ``rank`` of ``world_size`` processes, ``local_rank`` on its node.

    ``world_size == 1`` is the ordinary one-process run: every collective step is then a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """``rank 1/4`` for messages."""
        return f"rank {self.rank}/{self.world_size}"

    def positions(self, num_rows: int) -> np.ndarray:
        """Row positions this process takes (``shard_positions``); refuses more processes than rows."""
        if self.world_size > num_rows:
            raise InvalidParameterError(
                f"{self.world_size} processes for {num_rows} images: every process needs at least one; "
                f"launch at most {num_rows} (--nproc-per-node x --nnodes)"
            )
        return shard_positions(num_rows, self.rank, self.world_size)

    def device(self, requested: str | torch.device | None) -> torch.device:
        """The device of this process: ``cuda:LOCAL_RANK`` for ``auto`` (with CUDA) or a bare ``cuda``."""
        if self.distributed and (requested is None or str(requested) in ("auto", "cuda")):
            if requested is None or str(requested) == "auto":
                if not torch.cuda.is_available():
                    return torch.device("cpu")
            return resolve_device(f"cuda:{self.local_rank}")
        return resolve_device(requested)

    # ---------------------------------------------------------------- collective steps
    def agree(self, error: BaseException | None) -> None:
        """Every process passes its error (or None); if any failed, every process raises.

        Rank 0 raises the first error (its own, or another rank's prefixed with that rank), so one
        line reports it; the others raise the silent ``PeerError``. Also a barrier.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        errors: list = [None] * self.world_size
        dist.all_gather_object(errors, _portable(error), group=self._group)
        failed = [(rank, err) for rank, err in enumerate(errors) if err is not None]
        if not failed:
            return
        if not self.is_main:
            raise PeerError(f"stopped: another process failed ({self.label})")
        rank, err = failed[0]
        if rank == self.rank and error is not None:
            raise error
        raise _with_prefix(err, f"rank {rank}/{self.world_size}: ")

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        self.agree(None)

    def gather(self, value: Any) -> list | None:
        """Rank 0 receives every process's ``value`` (a list in rank order); the others get None."""
        if not self.distributed:
            return [value]
        received = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, received, dst=0, group=self._group)
        return received

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]


SINGLE = Shard()
"""The one-process job."""


def _portable(error: BaseException | None):
    """An error that survives pickling to another process (typed errors do; others become their text)."""
    if error is None or isinstance(error, SurrogateCertError):
        return error
    return SurrogateCertError(f"{type(error).__name__}: {error}")


def _with_prefix(error: BaseException, prefix: str) -> BaseException:
    try:
        return type(error)(prefix + str(error))
    except Exception:  # noqa: BLE001 - an error type with another constructor
        return SurrogateCertError(prefix + str(error))


def _timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS))
    except ValueError:
        raise InvalidParameterError(
            f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}"
        ) from None
    return datetime.timedelta(seconds=seconds)


def _terminate_as_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    # torchrun (and Slurm's scancel) stop a job's processes with SIGTERM when one of them dies: raise
    # KeyboardInterrupt so the datagen loop commits the rows it finished, as on Ctrl-C.
    raise KeyboardInterrupt


@contextlib.contextmanager
def launch(device: str | torch.device | None = None) -> Iterator[Shard]:
    """The ``Shard`` of this process; under torchrun, with the process group set up and torn down.

    Parameters
    ----------
    device : str, torch.device or None
        The device asked for (``--device``): CUDA (``auto`` with a GPU, or ``cuda``) means NCCL and
        ``cuda:LOCAL_RANK``; the CPU means gloo.

    Yields
    ------
    Shard
        ``SINGLE`` without torchrun or with one process.
    """
    world_size = torchrun_world_size()
    if world_size == 1:
        yield SINGLE
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    shard = Shard(rank=rank, world_size=world_size, local_rank=local_rank)
    on_cuda = shard.device(device).type == "cuda"
    timeout = _timeout()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timeout)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        # Control messages (errors, barriers, results) are small Python objects: gloo on the CPU.
        shard._group = dist.new_group(backend="gloo", timeout=timeout) if on_cuda else None
        yield shard
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()
