"""64-bit perceptual hash used by decontamination (eval images) and by the tests.

If the ingest stage's ``clipline.components.ingest.imaging.phash64`` is importable it is used, so
the eval set is hashed exactly as the raw shards were. Otherwise this module's own implementation
is used: the classic DCT pHash (as in the ``imagehash`` library): greyscale, resize to 32x32 with
Lanczos, 2-D DCT-II, keep the top-left 8x8 low frequencies, bit = coefficient > their median;
bits packed row-major, most significant first, and reinterpreted as a signed int64 (the raw-shard
contract), so DuckDB's ``bit_count(xor(a, b))`` is the Hamming distance.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def to_signed64(value: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _own_phash64(image: Image.Image) -> int:
    img = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.float64)
    d = _dct_matrix()
    low = (d @ pixels @ d.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return to_signed64(value)


def _ingest_phash64():
    try:
        from clipline.components.ingest.imaging import phash64  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not there yet: use our own
        return None
    return phash64


def phash64(image: Image.Image | bytes) -> int:
    """The image's 64-bit pHash as a signed int64 (see the module docstring)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    ingest = _ingest_phash64()
    if ingest is not None:
        value = int(ingest(image))
        return to_signed64(value) if value >= (1 << 63) else value
    return _own_phash64(image)
