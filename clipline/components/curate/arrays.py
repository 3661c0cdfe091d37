"""NumPy views of Arrow arrays, for the compiled kernels, and small array helpers.

The kernels read Arrow's buffers in place: a string array as (UTF-8 bytes, start, end) per
string, an integer array as its 64-bit values and a validity mask. Nothing here copies a buffer
unless the array's layout asks for it (nulls in a string array, another string type).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array (a chunked array's chunks concatenated)."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def string_buffers(texts: pa.Array, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(UTF-8 bytes, start, end) of each string of an Arrow string array, read in place (no copy
    unless there are nulls, which become empty strings, or another string type); ends are cut at
    ``max_bytes`` after the start (not at all for None). The bytes are read-only, whoever made the
    buffer, so that a kernel is compiled for one signature (DuckDB's buffers are read-only)."""
    n = len(texts)
    arr = (
        texts
        if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
        else texts.cast(pa.large_string())
    )
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    width = np.int32 if pa.types.is_string(arr.type) else np.int64
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    data.flags.writeable = False
    starts = offsets[:-1]
    return data, starts, offsets[1:] if max_bytes is None else np.minimum(offsets[1:], starts + int(max_bytes))


def valid_mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where a value is not null."""
    if values.null_count == 0:
        return np.ones(len(values), np.bool_)
    return np.asarray(values.is_valid().to_numpy(zero_copy_only=False), np.bool_)


def int64_values(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the 64-bit values as uint64, validity or None when there is no null) of an int64 or
    uint64 Arrow array, read from its value buffer in place; the value under a null is whatever
    the buffer holds there (callers never read it)."""
    v = combined(values)
    valid = valid_mask(v) if v.null_count else None
    dtype = np.uint64 if pa.types.is_unsigned_integer(v.type) else np.int64
    return np.frombuffer(v.buffers()[1], dtype, len(v), v.offset * 8).view(np.uint64), valid


def filled_int64(values: pa.Array | pa.ChunkedArray, fill: int = 0) -> np.ndarray:
    """An integer Arrow array as int64 with nulls replaced by ``fill``."""
    return np.asarray(pc.fill_null(values, fill).to_numpy() if values.null_count else values.to_numpy(), np.int64)


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d integer array, as ``np.unique(x)``, by one sort: NumPy
    2.4's ``np.unique`` without ``return_inverse`` takes a hash-table path that is 10-30x slower
    than sorting for int64 arrays of this stage's sizes."""
    s = np.sort(np.asarray(x).reshape(-1))
    if len(s) < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def as_uint64(values: np.ndarray) -> np.ndarray:
    """A 1-d integer array's values as uint64 bits (a view for 8-byte integers)."""
    values = np.asarray(values)
    if values.dtype.itemsize == 8:
        return np.ascontiguousarray(values).view(np.uint64)
    return np.asarray(values, np.int64).view(np.uint64)
