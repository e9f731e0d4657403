"""SHA-256 digests that tie results to the exact model weights and files they came from."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_BLOCK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


IMAGE_HASH_RULE = "sha256(C,H,W as uint16 | round(255 x) as uint8), first 8 bytes little-endian"
"""How ``image_hashes`` names an image: by its content at 8 bits per pixel, so a copy read another way (a
torchvision split, an npz of it, a PNG of it) gets the same name."""


def image_hashes(x) -> np.ndarray:
    """A 64-bit content hash per image of ``x`` (``N x C x H x W``, pixels in [0, 1]): ``IMAGE_HASH_RULE``.

    Identifies images across sources (a calibration image in an unlabeled pool, a deployment query
    already trained on) without their dataset index. Quantising to 8 bits makes two copies of an image
    that differ by float rounding one image (conservative: a refusal, never a miss).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Images, ``N x C x H x W``, pixels in [0, 1].

    Returns
    -------
    numpy.ndarray
        ``N`` unsigned 64-bit hashes.
    """
    import numpy as np

    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    arr = np.ascontiguousarray(np.clip(np.rint(np.asarray(arr, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8))
    shape = np.asarray(arr.shape[1:], dtype=np.uint16).tobytes()
    out = np.empty(len(arr), dtype=np.uint64)
    for i in range(len(arr)):
        out[i] = int.from_bytes(hashlib.sha256(shape + arr[i].tobytes()).digest()[:8], "little")
    return out


def pack_hashes(hashes) -> str:
    """Sorted unique 64-bit hashes as one base64 string (little-endian uint64s): a compact record for metadata."""
    import base64

    import numpy as np

    values = np.unique(np.asarray(hashes, dtype=np.uint64))
    return base64.b64encode(values.astype("<u8").tobytes()).decode("ascii")


def unpack_hashes(text: str) -> np.ndarray:
    """The hashes ``pack_hashes`` recorded (sorted uint64); ValueError if ``text`` is not such a record."""
    import base64
    import binascii

    import numpy as np

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise ValueError("not a base64 record of 64-bit hashes") from None
    if len(raw) % 8:
        raise ValueError("not a whole number of 64-bit hashes")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
