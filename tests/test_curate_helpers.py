"""Helpers for the curate tests: tiny real JPEGs and raw shards written to the RAW_SCHEMA contract
and registered in the catalog (as the ingest stage does). Holds no tests itself."""

from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clipline.components.catalog import Catalog
from clipline.components.config import load_config
from clipline.components.curate.phash import phash64
from clipline.components.ingest.schema import RAW_SCHEMA


def pattern_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct image per seed: random 8x8 blocks of colour, smoothed (a natural-ish image)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")


def row(
    key: str,
    caption: str | None = "a photo of a red square on a table",
    *,
    seed: int | None = None,
    image: bytes | None = None,
    url: str | None = None,
    status: str = "success",
    ow: int = 400,
    oh: int = 300,
) -> dict:
    """One raw-shard row; ``seed`` makes a distinct image, ``image`` gives the bytes directly."""
    if image is None and seed is not None and status == "success":
        image = jpeg(pattern_image(seed))
    ok = status == "success" and image is not None
    return {
        "key": key,
        "url": url or f"http://example.test/{key}.jpg",
        "caption": caption,
        "image": image if ok else None,
        "width": 96 if ok else None,
        "height": 96 if ok else None,
        "original_width": ow if ok else None,
        "original_height": oh if ok else None,
        "sha256": hashlib.sha256(image).hexdigest() if ok else None,
        "phash": phash64(image) if ok else None,
        "status": status,
        "error_kind": None if status == "success" else "http_404",
        "error_message": None if status == "success" else "404 Not Found",
        "source": "test",
        "ingested_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
    }


def write_shard(data_dir: Path, shard_id: str, rows: list[dict]) -> Path:
    """Write rows as <data_dir>/raw/<shard_id>.parquet and record it in the catalog."""
    raw = data_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    path = raw / f"{shard_id}.parquet"
    pq.write_table(table, path)
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.record_raw_shard(shard_id, path, table, {"test": True})
    return path


def config(data_dir: Path, **curate):
    base = {"language": "en", "duckdb_memory_limit": "512MB"}
    base.update(curate)
    return load_config(None, {"data_dir": data_dir, "curate": base})


def read_snapshot(cfg, manifest: dict) -> pa.Table:
    """The snapshot's rows exactly as a reader sees them: manifest['files'] in order."""
    tables = [pq.read_table(cfg.snapshots_dir / f) for f in manifest["files"]]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
