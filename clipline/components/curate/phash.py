"""The 64-bit perceptual hash on the curate side: the ingest stage's, so that the eval set is
hashed exactly as the raw shards were.

There is one pHash, :func:`clipline.components.ingest.imaging.phash64` (DCT pHash, area-averaged
to 32x32, bits packed row-major, most significant first, reinterpreted as a signed int64 so that
DuckDB's ``bit_count(xor(a, b))`` is the Hamming distance). This module only adds what the curate
side needs around it: hashing encoded bytes (eval images, and the tests' shards), the int64 view of
a 64-bit mask, and the Hamming distance.
"""

from __future__ import annotations

import io

from PIL import Image

from clipline.components.ingest.imaging import hamming
from clipline.components.ingest.imaging import phash64 as _image_phash64

__all__ = ["phash64", "hamming", "to_signed64"]


def to_signed64(value: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


def phash64(image: Image.Image | bytes) -> int:
    """The pHash (signed int64) of an image, or of encoded image bytes (decoded as they are,
    without applying EXIF orientation, as the bytes of a raw shard are stored upright): the value
    :func:`clipline.components.ingest.imaging.phash64` gives."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    return int(_image_phash64(image))
