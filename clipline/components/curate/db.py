"""The curate stage's DuckDB: the connection, its memory limit and how Python passes share it.

``[curate] duckdb_memory_limit`` bounds the whole process beyond its Python baseline: DuckDB's
buffer manager gets :data:`DUCKDB_SHARE` of it, the rest is headroom for what DuckDB allocates
outside it. While a Python pass holds arrays of its own (the pair search, the candidate pass, the
keep-first visit), :func:`yield_memory` lowers DuckDB's limit by what that pass needs (its
``*_BYTES_PER_*`` constant times its rows), so that DuckDB spills its tables to
``duckdb_temp_dir`` instead of the process growing.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from clipline.components.config import Config, CurateConfig
from clipline.components.curate import hashing
from clipline.components.curate.normalize import normalize_captions

#: share of [curate] duckdb_memory_limit given to DuckDB's buffer manager. The rest is headroom for
#: what DuckDB allocates outside it (Arrow export of streamed results and UDF chunks, Parquet writer
#: and reader buffers), measured at 10-25% of the limit, so that the process stays within the
#: configured limit plus its Python baseline
DUCKDB_SHARE = 0.75

#: Python bytes per distinct pHash in the NumPy pair search, and per row visited by keep-first
#: (measured peaks, rounded up): DuckDB's limit is lowered by this much during those passes
PAIR_SEARCH_BYTES_PER_HASH = 96
VISIT_BYTES_PER_ROW = 400
#: Python bytes per row of the candidate pass (fetched 64-bit hashes and masks, one hash table)
HASH_BYTES_PER_ROW = 96

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def con_temp_dir(cfg: Config) -> Path:
    """DuckDB's spill directory: [curate] duckdb_temp_dir, default <state-dir>/tmp/duckdb."""
    return Path(cfg.curate.duckdb_temp_dir) if cfg.curate.duckdb_temp_dir else cfg.state_root / "tmp" / "duckdb"


def connect(cfg: Config) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the configured memory limit (its buffer manager gets
    :data:`DUCKDB_SHARE` of it), spill directory and threads, and the stage's two UDFs
    (``normalize_caption``, ``key_hash``)."""
    c = cfg.curate
    temp = con_temp_dir(cfg)
    temp.mkdir(parents=True, exist_ok=True)
    limit = duckdb_limit_bytes(c)
    con = duckdb.connect(
        config={
            "memory_limit": f"{limit}B" if limit else c.duckdb_memory_limit,
            "temp_directory": str(temp),
            "threads": int(c.duckdb_threads),
            "preserve_insertion_order": True,
        }
    )
    con.create_function(
        "normalize_caption", normalize_captions, [duckdb.sqltype("VARCHAR")], duckdb.sqltype("VARCHAR"), type="arrow"
    )
    con.create_function(
        "key_hash", hashing.key_hash_udf, [duckdb.sqltype("VARCHAR")], duckdb.sqltype("UBIGINT"), type="arrow"
    )
    return con


def warm_up(con: duckdb.DuckDBPyConnection) -> None:
    """DuckDB's first registration of an Arrow table imports pandas and pyarrow.dataset: pay it
    here, before the steps are timed."""
    con.register("_warm", pa.table({"x": pa.array([0], pa.int64())}))
    con.unregister("_warm")


def limit_bytes(limit: str) -> int | None:
    """Bytes of a DuckDB memory limit such as ``1GB`` or ``512MiB`` (DuckDB's units: KB = 1000,
    KiB = 1024); None for a form this does not read (e.g. a percentage)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(limit).lower())
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])


def duckdb_limit_bytes(c: CurateConfig) -> int | None:
    """The memory limit DuckDB's buffer manager gets: DUCKDB_SHARE of [curate] duckdb_memory_limit."""
    full = limit_bytes(c.duckdb_memory_limit)
    return int(full * DUCKDB_SHARE) if full is not None else None


@contextmanager
def yield_memory(con: duckdb.DuckDBPyConnection, c: CurateConfig, python_bytes: int):
    """Lower DuckDB's memory limit by ``python_bytes`` (at most to a quarter of it) while a Python
    pass needs that much, so that DuckDB evicts (spills) its tables and the process as a whole stays
    within the configured limit plus the Python baseline; restores the limit afterwards."""
    full = duckdb_limit_bytes(c)
    if full is None or python_bytes <= 0:
        yield
        return
    con.execute(f"SET memory_limit = '{max(full - int(python_bytes), full // 4)}B'")
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{full}B'")


def spilled_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes DuckDB holds in its temp directory right now (data that did not fit the memory limit)."""
    return int(con.execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchall()[0][0])


def count(con: duckdb.DuckDBPyConnection, relation: str) -> int:
    """Rows of a table or view."""
    return int(con.execute(f"SELECT count(*) FROM {relation}").fetchall()[0][0])
