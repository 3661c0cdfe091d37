"""Stable, fast hashes for the split, the shuffle order and the snapshot id.

DuckDB's ``hash()`` may change between DuckDB versions and its ``md5`` functions are slow, so the
per-key hash is FNV-1a 64 over the UTF-8 bytes followed by the splitmix64 finaliser, computed for
all keys at once with numpy (one vector step per byte position). Its value for a key never changes,
so a key's split never changes between snapshots or versions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stable_hash64(values: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """uint64 hash of each string (null hashes like the empty string)."""
    arr = pa.array(values, pa.string()) if isinstance(values, list) else values
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lens = offsets[:-1], offsets[1:] - offsets[:-1]
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for p in range(int(lens.max()) if n else 0):
            live = np.flatnonzero(lens > p)
            h[live] = (h[live] ^ data[starts[live] + p].astype(np.uint64)) * _FNV_PRIME
        return _mix(h)


def split_of(keys, val_fraction: float) -> np.ndarray:
    """'val' for a deterministic ``val_fraction`` of keys (by key alone), else 'train'."""
    h = stable_hash64(keys)
    return np.where(h % np.uint64(1_000_000) < np.uint64(int(round(val_fraction * 1_000_000))), "val", "train")


def shuffle_order(keys, seed: str) -> np.ndarray:
    """An int64 sort key per row giving a deterministic shuffle that depends on ``seed``."""
    s = np.uint64(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    with np.errstate(over="ignore"):
        return _mix(stable_hash64(keys) ^ s).view(np.int64)


def digest_strings(values: pa.Array | pa.ChunkedArray) -> str:
    """sha256 over a string column (lengths and bytes, in order)."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    d = hashlib.sha256()
    if n:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
        d.update((offsets - offsets[0]).astype("<i8").tobytes())
        if arr.buffers()[2] is not None:
            d.update(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    return d.hexdigest()


def digest_table_column(con, table: str, column: str, batch_rows: int = 65_536) -> tuple[int, str]:
    """(row count, :func:`digest_strings` of the column) for a string column of a DuckDB table read
    in its stored order, streamed in record batches in two passes (the byte lengths, then the
    bytes) so that no whole column is held in Python; equal to digest_strings of the whole column."""
    d = hashlib.sha256()
    total, count = 0, 0
    for batch in con.sql(f"SELECT strlen(coalesce({column}, '')) AS n FROM {table}").to_arrow_reader(batch_rows):
        lens = np.asarray(batch.column(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        if not len(lens):
            continue
        if count == 0:
            d.update(np.zeros(1, "<i8").tobytes())  # offsets[0] - offsets[0]
        ends = total + np.cumsum(lens)
        d.update(ends.astype("<i8").tobytes())
        total, count = int(ends[-1]), count + len(lens)
    for batch in con.sql(f"SELECT coalesce({column}, '') AS s FROM {table}").to_arrow_reader(batch_rows):
        arr = batch.column(0).cast(pa.large_string())
        n = len(arr)
        if n and arr.buffers()[2] is not None:
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
            d.update(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    return count, d.hexdigest()


def key_hash_udf(keys: pa.Array) -> pa.Array:
    """DuckDB (arrow) UDF: :func:`stable_hash64` of each key as UBIGINT."""
    return pa.array(stable_hash64(keys), pa.uint64())


def split_sql(hash_col: str, val_fraction: float) -> str:
    """SQL giving :func:`split_of`'s answer from the key's :func:`stable_hash64` column."""
    return f"CASE WHEN {hash_col} % 1000000 < {int(round(val_fraction * 1_000_000))} THEN 'val' ELSE 'train' END"


def shuffle_udf(seed: str):
    """DuckDB (arrow) UDF: :func:`shuffle_order` from the key's stable_hash64 (UBIGINT)."""
    s = np.uint64(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))

    def f(h: pa.Array) -> pa.Array:
        with np.errstate(over="ignore"):
            return pa.array(
                _mix(np.asarray(h.to_numpy(zero_copy_only=False), np.uint64) ^ s).view(np.int64), pa.int64()
            )

    return f
