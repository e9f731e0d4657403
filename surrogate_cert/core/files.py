"""Files in and out, once for every command: what a file is, whether an output may be written, and
writing it atomically.

- ``sniff(path)`` names what a file is from its first bytes (an HDF5 counts file, a JSON file, a
  NumPy archive, a PyTorch checkpoint, text, ...), so each loader can say what it was given, what
  it expected and which command makes that (``wrong_kind``), instead of failing deep inside h5py,
  ``json`` or ``torch.load``.
- ``check_outputs(paths, overwrite=...)`` refuses, before any work is done, an output whose folder
  is missing or not writable, that is a folder, or that exists (unless ``overwrite``).
- ``atomic_output(path, overwrite=...)`` yields a temporary name in the same folder; when the block
  ends the file is renamed onto ``path``; on any failure (an exception, KeyboardInterrupt) the
  temporary file is removed. So an interrupted command never leaves a half-written file under the
  final name. Without ``overwrite`` the rename is a ``link``, which refuses a file that appeared in
  the meantime (a concurrent writer), so nothing is replaced unasked even then.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator

from .errors import InvalidInputError, InvalidParameterError, OutputExistsError

__all__ = [
    "sniff",
    "describe",
    "wrong_kind",
    "unreadable",
    "file_problem",
    "read_npz",
    "check_outputs",
    "atomic_output",
    "write_text_atomic",
    "commit_outputs",
    "MAKERS",
]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP = b"PK\x05\x06"

MAKERS = {
    "counts": "an HDF5 counts file (made by `surrogate-cert datagen`)",
    "calibration": "a calibration JSON (made by `surrogate-cert calibrate`)",
    "model": "a model checkpoint (made by `surrogate-cert train-base`), a TorchScript file or a torch.export program",
    "surrogate": "a surrogate checkpoint (made by `surrogate-cert train`)",
    "results": "a results TSV (made by `surrogate-cert cohen` / `sequential` / `certify`)",
    "npz": "an .npz with arrays x (N x C x H x W in [0, 1]) and y",
}
"""What each kind of input is and which command makes it: the second half of every wrong-kind message."""

_DESCRIPTIONS = {
    "missing": "missing",
    "unreadable": "unreadable",
    "folder": "a folder",
    "empty": "an empty file",
    "hdf5": "an HDF5 file",
    "json": "a JSON file",
    "npz": "a NumPy .npz archive",
    "npy": "a NumPy .npy array (one unnamed array, not an .npz of named arrays)",
    "torchscript": "a TorchScript archive",
    "torch-export": "a torch.export program",
    "torch-zip": "a PyTorch checkpoint",
    "zip": "a zip archive",
    "pickle": "a pickle (legacy PyTorch) file",
    "text": "a text file",
    "binary": "a binary file of unknown format",
}


def sniff(path: str | os.PathLike) -> str:
    """What the file at ``path`` is, from its first bytes (and a zip's member names).

    Parameters
    ----------
    path : str or os.PathLike
        Any path.

    Returns
    -------
    str
        One of ``missing``, ``unreadable`` (the operating system refused to open it: permissions, a
        symbolic-link loop, ...; ``unreadable`` says why), ``folder``, ``empty``, ``hdf5``, ``json``,
        ``npz``, ``npy``, ``torchscript``, ``torch-export``, ``torch-zip`` (a ``torch.save`` file),
        ``zip``, ``pickle``, ``text`` or ``binary``. ``json`` means the file starts like a JSON object
        or array, not that it parses.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "folder"
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    if not head:
        return "empty"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith((_ZIP_MAGIC, _EMPTY_ZIP)):
        return _zip_kind(path)
    if head.startswith(b"\x93NUMPY"):  # np.save: one array, not an archive of named arrays
        return "npy"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy (non-zip) format
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the 512-byte boundary
            return "binary"
    return "binary" if b"\0" in head else "text"


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "binary"
    if any("/code/" in n or n.startswith("code/") for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "torch-export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if not names or all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


def file_problem(path: str | os.PathLike) -> str | None:
    """What keeps ``path`` from being read as a file, in the operating system's words; None if nothing does.

    Parameters
    ----------
    path : str or os.PathLike
        Any path.

    Returns
    -------
    str or None
        E.g. ``"does not exist"``, ``"is a symbolic link to x.pt, which does not exist"``, ``"is a
        folder"``, ``"cannot be read (Permission denied)"``, ``"cannot be read (Too many levels of
        symbolic links)"``; None for a readable file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "is a folder"
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def unreadable(path: str | os.PathLike, expected: str) -> str:
    """The one-line message for a file the operating system refused to open: its own reason, and what to do."""
    problem = file_problem(path) or "cannot be read"
    return f"{os.fspath(path)} {problem}; fix its permissions or give another file ({MAKERS.get(expected, expected)})"


def read_npz(path: str | os.PathLike, what: str = "npz", error: type[Exception] = InvalidInputError) -> dict:
    """Every array of an ``.npz`` archive (``np.load(allow_pickle=False)``), after ``sniff`` says it is one.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str, optional
        What it should be (a key of ``MAKERS`` or words), for the messages.
    error : type, optional
        The exception to raise (a ``SurrogateCertError`` subclass).

    Returns
    -------
    dict of str to numpy.ndarray

    Raises
    ------
    error
        If the file is missing, unreadable, of another kind (a plain ``.npy`` array, text, ...), or not a
        readable archive.
    """
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "missing":
        problem = file_problem(path) if os.path.islink(path) else "no such file"
        raise error(f"{path}: {problem}; give {MAKERS.get(what, what)}")
    if kind != "npz":
        raise error(wrong_kind(path, kind, what))
    try:
        import numpy as np  # here, not at the top: the command line's --help must not load NumPy

        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise error(f"{path} is not a readable .npz archive ({first}); give {MAKERS.get(what, what)}") from None


def describe(kind: str) -> str:
    """Words for a ``sniff`` result, e.g. ``"an HDF5 file"``."""
    return _DESCRIPTIONS.get(kind, kind)


def wrong_kind(path: str | os.PathLike, kind: str, expected: str) -> str:
    """The one-line message for a file of the wrong kind: what it is, what was expected, who makes it.

    Parameters
    ----------
    path : str or os.PathLike
        The file given.
    kind : str
        Its ``sniff`` result.
    expected : str
        A key of ``MAKERS`` (or a free description).

    Returns
    -------
    str
        E.g. ``"cal.json is a JSON file (a calibration JSON is made by ...), not a model checkpoint (made by ...)"``.
    """
    if kind == "unreadable":
        return unreadable(path, expected)
    hint = {
        "hdf5": " (an HDF5 counts file is made by `surrogate-cert datagen`)",
        "json": " (a calibration JSON is made by `surrogate-cert calibrate`)",
    }.get(kind, "")
    return f"{os.fspath(path)} is {describe(kind)}{hint}, not {MAKERS.get(expected, expected)}"


# --------------------------------------------------------------------------- outputs


def check_outputs(
    paths: Iterable[str | os.PathLike | None],
    *,
    overwrite: bool = False,
    option: str = "--out",
    resumable: bool = False,
) -> list[str]:
    """Refuse outputs that cannot or must not be written, before any work is done.

    Parameters
    ----------
    paths : iterable of str, os.PathLike or None
        Every file the command will write (``None`` entries are skipped), e.g. a results TSV and its
        ``.meta.json``, or a report's ``.html``, ``.md`` and ``.json``: one output, checked together.
    overwrite : bool, optional
        Allow replacing existing files (``--overwrite``).
    option : str, optional
        The option that named the output, for the message.
    resumable : bool, optional
        The command can also continue the output (``--resume``): the message says so.

    Returns
    -------
    list of str
        The paths checked.

    Raises
    ------
    OutputExistsError
        If one exists and ``overwrite`` is false (nothing is written).
    InvalidParameterError
        If one is a folder, or its folder is missing or not writable.
    """
    checked = [os.fspath(p) for p in paths if p is not None]
    for path in checked:
        if os.path.isdir(path):
            raise InvalidParameterError(f"{option} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path)) or "."
        if not os.path.isdir(folder):
            raise InvalidParameterError(
                f"output folder {folder} does not exist; create it first or choose another {option}"
            )
        if not os.access(folder, os.W_OK):
            raise InvalidParameterError(f"output folder {folder} is not writable; choose another {option}")
    if not overwrite:
        existing = [p for p in checked if os.path.lexists(p)]
        if existing:
            also = f" (with {len(existing) - 1} more of its files)" if len(existing) > 1 else ""
            how = "--resume to continue it, --overwrite to start it again" if resumable else "--overwrite to replace it"
            raise OutputExistsError(f"{existing[0]} already exists{also}; pass {how}, or choose another {option}")
    return checked


def _temporary(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def _commit(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # refuses an existing target: a file that appeared meanwhile is kept
    except FileExistsError:
        raise OutputExistsError(
            f"{path} appeared while it was being written; nothing was replaced, pass --overwrite to replace it"
        ) from None
    except OSError:
        # A file system without hard links: check, then rename (a narrow race, never a half file).
        if os.path.lexists(path):
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Write ``path`` through a temporary file in its folder, renamed into place only on success.

    Parameters
    ----------
    path : str or os.PathLike
        The final file.
    overwrite : bool, optional
        Replace an existing ``path`` (default). If false, an existing file (even one created while the
        block ran) is kept and ``OutputExistsError`` raised.

    Yields
    ------
    str
        The temporary path to write to (same folder, so the rename is atomic).

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    path = os.fspath(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _commit(tmp, path, overwrite)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_output``); returns the path."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return os.fspath(path)


def commit_outputs(contents: dict[str, str], *, overwrite: bool = True) -> list[str]:
    """Write several text files that form one output (e.g. a TSV and its ``.meta.json``).

    Every file is written to its temporary name first; only when all are complete are they renamed
    into place, in the order given (so put the file whose presence means "done" last). An
    interruption before the renames leaves none of them; each rename is atomic.

    Parameters
    ----------
    contents : dict of str to str
        Path to text, in commit order.
    overwrite : bool, optional
        Replace existing files.

    Returns
    -------
    list of str
        The paths written.

    Raises
    ------
    OutputExistsError
        If a path exists and ``overwrite`` is false (checked before anything is renamed).
    """
    paths = [os.fspath(p) for p in contents]
    if not overwrite:
        check_outputs(paths, overwrite=False)
    temps = {path: _temporary(path) for path in paths}
    try:
        for path, text in zip(paths, contents.values()):
            with open(temps[path], "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        for path in paths:
            _commit(temps[path], path, overwrite)
    finally:
        for tmp in temps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
    return paths
