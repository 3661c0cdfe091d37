"""The evaluation set used for decontamination: perceptual hashes of its images.

Accepted inputs: a Parquet file with an ``image`` column of encoded bytes (a ``phash`` column is
used as is when present), or a directory of image files (searched recursively).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipline.components.curate.arrays import unique_sorted
from clipline.components.curate.phash import phash64

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class EvalSetError(ValueError):
    """The eval set cannot be read; the message says which input and what to do."""


def eval_hashes(path: Path) -> np.ndarray:
    """The int64 pHashes of every image of the eval set at ``path``, sorted and unique."""
    path = Path(path)
    if not path.exists():
        raise EvalSetError(
            f"eval set {path} does not exist: give a Parquet file with an 'image' column or a directory of images"
        )
    hashes: list[int] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EvalSetError(f"eval set directory {path} holds no image files ({sorted(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                hashes.append(phash64(f.read_bytes()))
            except Exception as e:  # noqa: BLE001
                raise EvalSetError(f"eval set image {f} cannot be decoded ({e}); remove or replace it") from e
    else:
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001
            raise EvalSetError(f"eval set {path} is not a Parquet file or a directory ({e})") from e
        if "phash" in names:
            col = pq.read_table(path, columns=["phash"]).column("phash").drop_null()
            hashes = [int(x) for x in col.to_pylist()]
        elif "image" in names:
            pf = pq.ParquetFile(path)
            row = 0
            for batch in pf.iter_batches(columns=["image"], batch_size=512):
                for b in batch.column(0).to_pylist():
                    row += 1
                    if b is None:
                        continue
                    try:
                        hashes.append(phash64(b))
                    except Exception as e:  # noqa: BLE001
                        raise EvalSetError(
                            f"eval set {path}: row {row - 1} has an image that cannot be decoded ({e})"
                        ) from e
        else:
            raise EvalSetError(f"eval set {path} has no 'image' (or 'phash') column; its columns: {names}")
    if not hashes:
        raise EvalSetError(f"eval set {path} holds no images")
    return unique_sorted(np.asarray(hashes, dtype=np.int64))


def fingerprint(hashes: np.ndarray | None) -> str | None:
    """A short content hash of an eval set's hashes (None for no eval set)."""
    if hashes is None:
        return None
    return hashlib.sha256(np.sort(hashes).astype("<i8").tobytes()).hexdigest()[:16]
