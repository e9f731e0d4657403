"""Keyed signatures (HMAC-SHA256, standard library ``hmac``) of artifacts, and where the key comes from.

Signed, with a key configured: counts files (``data_gen.signatures``), model checkpoints
(``core.architectures.save_checkpoint``; verification is required of surrogates, and of a base
checkpoint only when it carries a signature) and calibration files (``calibration.artifact``).
``check_signature`` words every refusal the same way (docs/security.md).

Two digests, for two threats:

- the **checksum** (unkeyed SHA-256 of the content) detects accidental change (a truncated copy, a
  stray edit) and binds a file to what it names; anyone can recompute it after editing the file, so
  it proves nothing about who wrote it;
- the **signature** (HMAC-SHA256 with a secret key) can only be made by someone holding the key: with
  a key configured, an unsigned file, a file signed with another key, or a signed file edited
  afterwards is refused. It does not protect against someone who holds the key, nor does it make a
  wrong calibration right (a calibration computed on bad data and then signed verifies).

The key is taken, in order, from an explicit ``key`` (bytes) or ``key_file``, else from the
environment: ``SURROGATE_CERT_KEY_FILE`` (a file holding the key) or ``SURROGATE_CERT_KEY`` (the key
itself). No key configured means no signing and no verification (the checksum still applies).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from .errors import InvalidParameterError

__all__ = [
    "ENV_KEY",
    "ENV_KEY_FILE",
    "MIN_KEY_BYTES",
    "resolve_key",
    "sign",
    "key_id",
    "verify",
    "check_signature",
    "SIGNATURE_FIELD",
    "KEY_ID_FIELD",
]

ENV_KEY = "SURROGATE_CERT_KEY"
"""Environment variable holding the signing key itself (at least ``MIN_KEY_BYTES`` bytes)."""

ENV_KEY_FILE = "SURROGATE_CERT_KEY_FILE"
"""Environment variable naming a file that holds the signing key."""

MIN_KEY_BYTES = 16
"""Shortest key accepted: a 128-bit secret, e.g. ``python -c "import secrets; print(secrets.token_hex(32))"``."""

_MAKE_KEY = 'make one with: python -c "import secrets; print(secrets.token_hex(32))" > key.txt'


def _checked(key: bytes, source: str) -> bytes:
    key = key.strip()
    if len(key) < MIN_KEY_BYTES:
        raise InvalidParameterError(
            f"the signing key from {source} has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed; {_MAKE_KEY}"
        )
    return key


def _read_key_file(path: str | os.PathLike, source: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return _checked(fh.read(), f"{source} {os.fspath(path)}")
    except OSError as exc:
        raise InvalidParameterError(
            f"cannot read the key file {os.fspath(path)} given by {source} ({exc.strerror}); {_MAKE_KEY}"
        ) from None


def resolve_key(
    key: bytes | str | None = None, key_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """The signing key: ``key``, else the file ``key_file``, else the environment, else ``None``.

    Leading and trailing whitespace (a final newline) is stripped.

    Parameters
    ----------
    key : bytes or str, optional
        The key itself.
    key_file : str or os.PathLike, optional
        A file holding the key (``--key-file``).
    environ : mapping, optional
        Where ``SURROGATE_CERT_KEY_FILE`` / ``SURROGATE_CERT_KEY`` are looked up; default ``os.environ``.

    Returns
    -------
    bytes or None
        The key, or ``None`` when none is configured.

    Raises
    ------
    InvalidParameterError
        If both ``key`` and ``key_file`` are given, both environment variables are set, the key file
        cannot be read, or the key is shorter than ``MIN_KEY_BYTES``.
    """
    if key is not None and key_file is not None:
        raise InvalidParameterError("give the signing key or a key file, not both")
    if key is not None:
        return _checked(key.encode() if isinstance(key, str) else bytes(key), "the key argument")
    if key_file is not None:
        return _read_key_file(key_file, "--key-file")
    environ = os.environ if environ is None else environ
    from_file, inline = environ.get(ENV_KEY_FILE), environ.get(ENV_KEY)
    if from_file and inline:
        raise InvalidParameterError(f"both {ENV_KEY_FILE} and {ENV_KEY} are set; unset one of them")
    if from_file:
        return _read_key_file(from_file, ENV_KEY_FILE)
    if inline:
        return _checked(inline.encode(), ENV_KEY)
    return None


def sign(message: bytes, key: bytes) -> str:
    """Hex HMAC-SHA256 of ``message`` under ``key``."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short public name of a key (first 16 hex digits of a SHA-256 of it), to tell keys apart in messages."""
    return hashlib.sha256(b"surrogate-cert key id\0" + key).hexdigest()[:16]


def verify(message: bytes, signature: str, key: bytes) -> bool:
    """Whether ``signature`` is the HMAC-SHA256 of ``message`` under ``key`` (constant-time comparison)."""
    return isinstance(signature, str) and hmac.compare_digest(sign(message, key), signature)


SIGNATURE_FIELD = "signature_hmac_sha256"
"""Where an artifact keeps its HMAC-SHA256 signature (a JSON key, a checkpoint field, an HDF5 attribute)."""

KEY_ID_FIELD = "signature_key_id"
"""Where an artifact names the key that signed it (``key_id``; part of the signed content)."""


def check_signature(
    message: bytes,
    signature,
    signed_key_id,
    key: bytes,
    *,
    what: str,
    fix: str,
    error: type[Exception],
    required: bool = True,
) -> None:
    """Refuse an artifact whose signature does not verify under ``key`` (one wording for every artifact).

    Parameters
    ----------
    message : bytes
        The artifact's signed content (canonical bytes, without the signature itself).
    signature : str or None
        The stored signature.
    signed_key_id : str or None
        The stored ``KEY_ID_FIELD``, to say "another key" rather than "altered" where it differs.
    key : bytes
        The configured key.
    what : str
        The artifact, for the message (e.g. ``"surrogate.pt"``).
    fix : str
        What to do, for the message (e.g. ``"re-run `surrogate-cert train` with the key"``).
    error : type
        The exception to raise (an ``ArtifactSignatureError`` subclass).
    required : bool, optional
        Refuse an unsigned artifact (default); if false, only a present signature is checked.

    Raises
    ------
    error
        If the artifact is unsigned (and ``required``), signed with another key, or altered after signing.
    """
    if signature is None:
        if required:
            raise error(f"{what} is not signed but a signing key is configured; {fix}")
        return
    if not verify(message, signature, key):
        why = (
            f"it was signed with another key (key id {signed_key_id}, yours is {key_id(key)})"
            if signed_key_id and signed_key_id != key_id(key)
            else "it was altered after signing"
        )
        raise error(f"{what}: the signature does not verify under the configured key: {why}; {fix}")
