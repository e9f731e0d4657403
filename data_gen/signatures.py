"""Keyed signatures of counts files: what is signed, and the check every consumer applies.

With a signing key configured (``--key-file``, ``SURROGATE_CERT_KEY_FILE`` or ``SURROGATE_CERT_KEY``;
``surrogate_cert.core.signing``), ``datagen`` signs a counts file when it is complete (and again
after a top-up): the HDF5 attributes ``signature_key_id`` and ``signature_hmac_sha256`` hold the
key's id and the HMAC-SHA256 of ``counts_message``, which covers every attribute (the key id
included) and every row of every dataset. ``store.check_counts_for``, the one consumer-side check,
then refuses a file that is unsigned, signed with another key, or edited after signing.

What the signature does not cover: anything done by someone holding the key, and rows committed to an
unfinished file before the job that completed it (a file is signed when it is complete; a resumed job
signs what it finds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from surrogate_cert.core.errors import CountsSignatureError
from surrogate_cert.core.signing import KEY_ID_FIELD, SIGNATURE_FIELD, check_signature, key_id, sign

__all__ = ["SIGNATURE_ATTRS", "counts_message", "signature_attrs", "check_counts_signature"]

SIGNATURE_ATTRS = (KEY_ID_FIELD, SIGNATURE_FIELD)
"""The attributes a signed counts file adds (an edit of the file drops them: see ``store.write_topup``)."""


def counts_message(counts) -> bytes:
    """The canonical content of a counts file: every attribute but the signature, then every array.

    Parameters
    ----------
    counts : data_gen.store.CountsFile
        As ``read_counts`` returned it: attributes as plain values, arrays of the committed rows.
        Every array field of the dataclass is covered, so a dataset added later is signed too.

    Returns
    -------
    bytes
        ``b"surrogate-cert counts\\0"`` and a SHA-256 hex digest.
    """
    attrs = {k: v for k, v in counts.attrs.items() if k != SIGNATURE_FIELD}
    digest = hashlib.sha256(
        json.dumps(attrs, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str).encode("utf-8")
    )
    for spec in dataclasses.fields(counts):
        value = getattr(counts, spec.name)
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value, dtype="<i8" if np.issubdtype(value.dtype, np.integer) else "<f8")
            digest.update(f"\0{spec.name}\0{list(arr.shape)}\0".encode())
            digest.update(arr.tobytes())
    return b"surrogate-cert counts\0" + digest.hexdigest().encode()


def signature_attrs(counts, key: bytes) -> dict:
    """The two attributes that sign ``counts`` under ``key`` (the key id is part of what is signed)."""
    signed = dataclasses.replace(counts, attrs={**counts.attrs, KEY_ID_FIELD: key_id(key)})
    return {KEY_ID_FIELD: key_id(key), SIGNATURE_FIELD: sign(counts_message(signed), key)}


def check_counts_signature(counts, path: str | os.PathLike, key: bytes) -> None:
    """Refuse (``CountsSignatureError``) a counts file not signed under ``key``, or edited after signing.

    Raises
    ------
    CountsSignatureError
        If the file is unsigned (an unfinished file is never signed), signed with another key, or altered.
    """
    fix = (
        "finish it with `surrogate-cert datagen ... --resume` and the key"
        if not counts.attrs.get("complete")
        else "regenerate it with `surrogate-cert datagen` and the key (--key-file), or use the right key"
    )
    check_signature(
        counts_message(counts),
        counts.attrs.get(SIGNATURE_FIELD),
        counts.attrs.get(KEY_ID_FIELD),
        key,
        what=f"counts file {os.fspath(path)}",
        fix=fix,
        error=CountsSignatureError,
    )
