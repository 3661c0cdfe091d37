"""Reading raw shards (ours and img2dataset's) as one metadata table, without image bytes.

Shards differ in columns (external img2dataset shards have no ``phash``/``error_kind``/``source``
and store bytes in ``jpg``/``webp``/``png``), so the union schema is read from the Parquet footers
and every expected column that no shard has is supplied as a typed NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: metadata columns the rules and dedup read, with their type when no shard has them
META_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "url": "VARCHAR",
    "caption": "VARCHAR",
    "status": "VARCHAR",
    "width": "INTEGER",
    "height": "INTEGER",
    "original_width": "INTEGER",
    "original_height": "INTEGER",
    "sha256": "VARCHAR",
    "phash": "BIGINT",
}
SIZE_COLUMNS = ["width", "height", "original_width", "original_height"]
IMAGE_COLUMNS = ["image", "jpg", "webp", "png"]
#: a row's id in the curate stage is (file << 32) + row in the file + 1, where file is the shard's
#: position in the list read (which is its rank in catalog order); these SQL expressions take it apart
RID_FILE = "(rid >> 32)"
RID_ROW = "((rid & 4294967295) - 1)"
#: raw columns not carried into a snapshot
NOT_CARRIED = set(IMAGE_COLUMNS) | {"status", "error_kind", "error_message", "split", "__index_level_0__"}
SNAPSHOT_COLUMNS = [
    "key",
    "url",
    "caption",
    "image",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "phash",
    "split",
]


@dataclass(frozen=True)
class ShardFile:
    shard_id: str
    path: Path
    rank: int  # position in catalog order (earlier shards win ties in dedup); the stage reads files in rank order


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def union_schema(files: list[Path]) -> dict[str, pa.DataType]:
    """Column name -> type over all files (first seen wins). Raises ValueError naming a file
    that is missing or not Parquet, or lacks ``key``/``url``."""
    cols: dict[str, pa.DataType] = {}
    for f in files:
        if not Path(f).exists():
            raise ValueError(
                f"shard file {f} is registered in the catalog but missing on disk; restore it or re-ingest"
            )
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"shard file {f} is not readable Parquet ({e}); remove it from the catalog or re-ingest"
            ) from e
        missing = {"key", "url"} - set(schema.names)
        if missing:
            raise ValueError(f"shard file {f} lacks column(s) {sorted(missing)}; it is not a raw shard")
        for field in schema:
            cols.setdefault(field.name, field.type)
    return cols


def meta_select(schema: dict[str, pa.DataType], alias: str = "r", names: list[str] | None = None) -> str:
    """SELECT-list items giving every META_COLUMNS column, or those in ``names`` (typed NULL when absent)."""
    items = []
    for name, typ in META_COLUMNS.items():
        if names is not None and name not in names:
            continue
        if name == "status":
            # img2dataset-style shards without status hold downloaded rows only; read beside
            # clipline's shards (union_by_name), their status is NULL
            items.append(
                f"coalesce(CAST({alias}.status AS VARCHAR), 'success') AS status"
                if name in schema
                else "'success' AS status"
            )
        elif name in schema:
            items.append(f"CAST({alias}.{quote_ident(name)} AS {typ}) AS {name}")
        else:
            items.append(f"CAST(NULL AS {typ}) AS {name}")
    return ", ".join(items)


def image_expr(schema: dict[str, pa.DataType], alias: str = "r") -> str:
    present = [c for c in IMAGE_COLUMNS if c in schema]
    if not present:
        return "CAST(NULL AS BLOB)"
    cols = [f"CAST({alias}.{quote_ident(c)} AS BLOB)" for c in present]
    return cols[0] if len(cols) == 1 else f"coalesce({', '.join(cols)})"


def carried_columns(schema: dict[str, pa.DataType]) -> list[str]:
    """Extra raw columns copied into the snapshot as they are."""
    return [c for c in schema if c not in NOT_CARRIED and c not in META_COLUMNS and c not in SNAPSHOT_COLUMNS]
