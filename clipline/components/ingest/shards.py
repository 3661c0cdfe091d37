"""Raw shards: build the Arrow table, write it atomically with its stats, read any raw shard back.

File layout per shard, in ``<data_dir>/raw/``: ``<shard_id>.parquet`` (RAW_SCHEMA + carried
columns) and ``<shard_id>.stats.json``.

Crash safety (:func:`write_shard`): the Parquet file is written to ``<shard_id>.parquet.tmp`` and
fsynced; the stats go to ``<shard_id>.stats.json.tmp``, are fsynced and renamed into place; only
then is the Parquet file renamed to ``<shard_id>.parquet`` and the directory fsynced. A process
killed at any moment therefore leaves either no ``<shard_id>.parquet`` or a complete one (with its
stats beside it); leftovers end in ``.tmp``, which the catalog's ``reconcile_raw_shards`` removes.

:func:`read_raw_shard` reads our shards and img2dataset's alike (its image column is named after
the format, ``jpg``/``webp``/``png``), and returns them in RAW_SCHEMA's names and types.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipline.components.durable import fsync_path
from clipline.components.ingest.schema import (
    RAW_SCHEMA,
    STATUS_FAILED_DOWNLOAD,
    STATUS_FAILED_RESIZE,
    STATUS_SUCCESS,
)

STATUSES = (STATUS_SUCCESS, STATUS_FAILED_DOWNLOAD, STATUS_FAILED_RESIZE)
TMP_SUFFIX = ".tmp"  # the catalog removes *.tmp leftovers
IMAGE_COLUMN_ALIASES = ("jpg", "jpeg", "webp", "png")  # img2dataset names the column after the format
ROW_GROUP_BYTES = 32 * 1024 * 1024  # target bytes of image data per row group
MIN_ROW_GROUP_ROWS = 64
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# small, low-cardinality columns worth dictionary-encoding and keeping min/max statistics for
_DICT_COLUMNS = ["status", "error_kind", "source"]
_NO_STATS = {"image", "caption", "error_message", "url"}


# --------------------------------------------------------------------------------- build
def build_shard_table(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], carried: pa.Table | None = None
) -> pa.Table:
    """Assemble a raw-shard table: RAW_SCHEMA's columns, in order, then the carried columns.

    ``rows`` is either a list of dicts or a dict of equal-length columns, keyed by RAW_SCHEMA
    names; absent keys become nulls, except ``ingested_at`` which defaults to now (UTC).
    ``carried`` (the URL list's extra columns for the same rows, in the same order) is appended;
    a carried name that collides with a raw column is renamed ``src_<name>``.

    Raises ValueError on an unknown status, a success row without image bytes, a null or
    duplicated key, or a ``carried`` table of another length.
    """
    if isinstance(rows, Mapping):
        lengths = {len(v) for v in rows.values()}
        if len(lengths) > 1:
            raise ValueError(f"build_shard_table: columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        arrays = []
        for f in RAW_SCHEMA:
            arrays.append(_column(rows.get(f.name), f, n))
        table = pa.Table.from_arrays(arrays, schema=RAW_SCHEMA)
    else:
        table = pa.Table.from_pylist(list(rows), schema=RAW_SCHEMA)
    n = table.num_rows
    if n and table.column("ingested_at").null_count == n:
        now = pa.scalar(datetime.now(timezone.utc), RAW_SCHEMA.field("ingested_at").type)
        table = table.set_column(
            table.schema.get_field_index("ingested_at"),
            RAW_SCHEMA.field("ingested_at"),
            pa.array([now.as_py()] * n, now.type),
        )
    _validate(table)
    if carried is not None and carried.num_columns:
        if carried.num_rows != n:
            raise ValueError(f"build_shard_table: {n} rows but {carried.num_rows} carried rows")
        for name, col in zip(carried.column_names, carried.columns):
            new = name
            while new in table.column_names:
                new = f"src_{new}"
            table = table.append_column(new, col)
    return table


def _column(values: Any, field: pa.Field, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, field.type)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(field.type)
    return pa.array(values, field.type)


def _validate(table: pa.Table) -> None:
    status = table.column("status")
    bad = pc.unique(pc.filter(status, pc.invert(pc.fill_null(pc.is_in(status, pa.array(STATUSES)), False))))
    if len(bad):
        raise ValueError(f"raw shard rows have unknown status values {bad.to_pylist()}; expected {STATUSES}")
    ok = pc.equal(status, STATUS_SUCCESS)
    no_img = pc.sum(pc.and_(ok, pc.is_null(table.column("image")))).as_py() or 0
    if no_img:
        raise ValueError(f"{no_img} success row(s) without image bytes")
    key = table.column("key")
    if key.null_count:
        raise ValueError(f"{key.null_count} row(s) without a key")
    if len(pc.unique(key)) != table.num_rows:
        raise ValueError("duplicate keys within one shard")


# --------------------------------------------------------------------------------- stats
def shard_stats(table: pa.Table, duration_s: float, bytes_downloaded: int) -> dict:
    """Summary of one shard: rows, counts by status and by error kind, bytes, duration, rates."""
    n = table.num_rows
    status_counts = _value_counts(table.column("status"))
    kinds = _value_counts(table.column("error_kind")) if "error_kind" in table.column_names else {}
    n_success = status_counts.get(STATUS_SUCCESS, 0)
    stored = _image_bytes(table)
    duration_s = float(duration_s)
    return {
        "n_rows": n,
        "n_success": n_success,
        "n_failed": n - n_success,
        "status_counts": status_counts,
        "error_kind_counts": kinds,
        "bytes_downloaded": int(bytes_downloaded),
        "bytes_stored": int(stored),
        "duration_s": round(duration_s, 3),
        "images_per_s": round(n_success / duration_s, 2) if duration_s > 0 else None,
        "rows_per_s": round(n / duration_s, 2) if duration_s > 0 else None,
    }


def _image_bytes(table: pa.Table) -> int:
    if "image" not in table.column_names:
        return 0
    return int(pc.sum(pc.binary_length(table.column("image"))).as_py() or 0)


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in pc.value_counts(col).to_pylist():
        if item["values"] is not None:
            out[str(item["values"])] = int(item["counts"])
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------- write
def shard_paths(out_dir: str | os.PathLike, shard_id: str) -> tuple[Path, Path]:
    """(parquet path, stats path) of a shard id."""
    out_dir = Path(out_dir)
    return out_dir / f"{shard_id}.parquet", out_dir / f"{shard_id}.stats.json"


def _row_group_rows(table: pa.Table) -> int:
    n = table.num_rows
    if n == 0:
        return 1
    img_bytes = _image_bytes(table)
    per_row = max(1, (img_bytes + table.nbytes // 4) // n)
    return max(MIN_ROW_GROUP_ROWS, min(n, ROW_GROUP_BYTES // per_row))


def write_shard(
    table: pa.Table, out_dir: str | os.PathLike, shard_id: str, stats: dict, overwrite: bool = False
) -> Path:
    """Write ``table`` as ``<out_dir>/<shard_id>.parquet`` with ``<shard_id>.stats.json``, atomically.

    See the module docstring for the crash guarantee. Parquet: zstd for text columns, images
    stored as they are (already compressed), row groups of about 32 MB. Refuses to replace an
    existing shard unless ``overwrite``. Returns the Parquet path.
    """
    if not _SHARD_ID.match(shard_id) or shard_id.endswith(TMP_SUFFIX):
        raise ValueError(f"bad shard id {shard_id!r}: use letters, digits, '.', '_' or '-' (max 200)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, stats_final = shard_paths(out_dir, shard_id)
    if final.exists() and not overwrite:
        raise FileExistsError(f"raw shard {final} already exists; shard ids must be unique")
    tmp = final.with_name(final.name + TMP_SUFFIX)
    stats_tmp = stats_final.with_name(stats_final.name + TMP_SUFFIX)

    names = table.column_names
    compression = {c: ("NONE" if c == "image" else "ZSTD") for c in names}
    try:
        with open(tmp, "wb") as f:
            pq.write_table(
                table,
                f,
                row_group_size=_row_group_rows(table),
                compression=compression,
                use_dictionary=[c for c in _DICT_COLUMNS if c in names],
                write_statistics=[c for c in names if c not in _NO_STATS],
            )
            f.flush()
            os.fsync(f.fileno())
        payload = {"shard_id": shard_id, "file": final.name, **stats}
        with open(stats_tmp, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(stats_tmp, stats_final)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        stats_tmp.unlink(missing_ok=True)
        raise
    fsync_path(out_dir)
    return final


# ---------------------------------------------------------------------------------- read
def _image_source(names: Sequence[str]) -> str | None:
    if "image" in names:
        return "image"
    return next((a for a in IMAGE_COLUMN_ALIASES if a in names), None)


def read_raw_shard(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a raw shard (ours or img2dataset's; a local path or any fsspec URI) in RAW_SCHEMA's
    names and types.

    img2dataset's image column (``jpg``/``webp``/``png``) becomes ``image``, ``txt`` becomes
    ``caption`` when there is no caption column, keys are cast to strings and sizes to int32;
    RAW_SCHEMA columns a shard lacks are added as nulls (``status``, when absent, is
    ``success`` for rows with image bytes and ``failed_to_download`` otherwise). Without
    ``columns``, RAW_SCHEMA's columns come first, then any others the file has (carried
    columns, img2dataset's ``exif``/``md5``...). With ``columns``, exactly those, in that order.
    """
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        import fsspec  # remote shards (s3://, gs://, memory:// ...)

        with fsspec.open(path, "rb") as f:
            return _read_raw(pq.ParquetFile(pa.BufferReader(f.read())), path, columns)
    return _read_raw(pq.ParquetFile(path.removeprefix("file://")), path, columns)


def _read_raw(pf: pq.ParquetFile, path: str, columns: Sequence[str] | None) -> pa.Table:
    names = pf.schema_arrow.names
    img_src = _image_source(names)
    cap_src = "caption" if "caption" in names else ("txt" if "txt" in names else None)
    rename = {}
    if img_src and img_src != "image":
        rename[img_src] = "image"
    if cap_src == "txt":
        rename["txt"] = "caption"
    back = {v: k for k, v in rename.items()}

    if columns is None:
        table = pf.read()
    else:
        wanted = [back.get(c, c) for c in columns]
        need = set(wanted)
        if "status" in columns and "status" not in names and img_src:
            need.add(img_src)  # status is derived from the presence of image bytes
        table = pf.read(columns=[c for c in names if c in need])
    table = table.rename_columns([rename.get(c, c) for c in table.column_names])
    n = table.num_rows

    if "status" not in table.column_names and (columns is None or "status" in columns):
        if "image" in table.column_names:
            has = pc.is_valid(table.column("image"))
            status = pc.if_else(has, STATUS_SUCCESS, STATUS_FAILED_DOWNLOAD)
        else:
            status = pa.array([STATUS_SUCCESS] * n, pa.string())
        table = table.append_column("status", status)

    cols: dict[str, pa.ChunkedArray | pa.Array] = {}
    for f in RAW_SCHEMA:
        if columns is not None and f.name not in columns:
            continue
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ValueError(
                        f"raw shard {path}: column {f.name!r} of type {col.type} cannot be read as {f.type}: {e}"
                    ) from e
            cols[f.name] = col
        else:
            cols[f.name] = pa.nulls(n, f.type)
    for c in table.column_names:
        if c not in cols and (columns is None or c in columns):
            cols[c] = table.column(c)
    if columns is not None:
        missing = [c for c in columns if c not in cols]
        if missing:
            raise ValueError(f"raw shard {path} has no column(s) {missing}; it has {names}")
        cols = {c: cols[c] for c in columns}
    return pa.table(cols)
