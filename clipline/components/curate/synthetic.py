"""Synthetic metadata-only raw shards with planted problems, for the curate benchmark and the
spill test (no image bytes: they measure the metadata path, rules and deduplication)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipline.components.ingest.schema import RAW_SCHEMA


def register(catalog_path: Path, raw_dir: Path, n: int, shard_rows: int, seed: int = 0) -> list[str]:
    """:func:`generate` the shards and record them in the catalog; returns their ids."""
    from clipline.components.catalog import Catalog

    shards = generate(raw_dir, n, shard_rows, seed)
    with Catalog(catalog_path) as cat:
        for sid, path, table in shards:
            cat.record_raw_shard(sid, path, table, {"synthetic": True})
    return [sid for sid, _, _ in shards]


ADJ = "red blue green yellow black white small large old new quiet busy bright dark happy wooden".split()
NOUN = ("house car dog cat tree river mountain city street beach table chair window garden flower family "
        "child woman man road bridge lake forest field boat train station park kitchen church market").split()
PLACE = "near the | in front of the | next to a | behind the | on top of the | inside the".split(" | ")
TEMPLATE = ["a photo of a {a} {n} {p} {n2}", "the {a} {n} {p} {n2} at sunset", "{a} {n} and a {a2} {n2} in the morning",
            "a picture of the {n} {p} {n2}", "close up of a {a} {n} with a {n2} in the background"]
FOREIGN = ["un chat noir dort sur la table de la cuisine", "ein roter Kreis auf einem blauen Hintergrund",
           "una casa blanca junto al mar en verano", "uma menina brincando no parque com o cachorro"]


def generate(raw_dir: Path, n: int, shard_rows: int, seed: int = 0) -> list[tuple[str, Path, pa.Table]]:
    """Write ``n`` metadata-only raw shards rows (RAW_SCHEMA, no image bytes) of ``shard_rows``
    rows each into raw_dir; returns (shard_id, path, table) per shard. Planted problems (disjoint
    bands of a uniform draw): 3% failed downloads, 4% too-short captions, 3% small images, 1%
    non-English captions, 4% repeated URLs, 4% repeated sha256 (same pHash), 5% near-duplicate
    pHashes (1-6 bits flipped). Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out = []
    base_hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    for start in range(0, n, shard_rows):
        m = min(shard_rows, n - start)
        idx = np.arange(start, start + m)
        u = rng.random(m)
        keys = [f"{i:010d}" for i in idx]
        urls = [f"http://img.example/{i}.jpg" for i in idx]
        # captions: English templates filled with random words, plus the row number
        r = rng.integers(0, 1 << 30, size=(m, 6))
        caps = [TEMPLATE[r[j, 0] % len(TEMPLATE)].format(
                    a=ADJ[r[j, 1] % len(ADJ)], a2=ADJ[r[j, 2] % len(ADJ)], n=NOUN[r[j, 3] % len(NOUN)],
                    n2=NOUN[r[j, 4] % len(NOUN)], p=PLACE[r[j, 5] % len(PLACE)]) + f" {idx[j]}" for j in range(m)]
        sha = [f"{i:064x}" for i in idx]
        phash = base_hashes[start:start + m].copy()
        ow = np.full(m, 640, dtype=np.int32)
        oh = np.full(m, 480, dtype=np.int32)
        status = np.full(m, "success", dtype=object)
        # planted problems (disjoint bands of u)
        status[u < 0.03] = "failed_to_download"
        short = (u >= 0.03) & (u < 0.07)
        for j in np.flatnonzero(short):
            caps[j] = "nice"
        small = (u >= 0.07) & (u < 0.10)
        ow[small], oh[small] = 150, 120
        for j in np.flatnonzero((u >= 0.10) & (u < 0.11)):
            caps[j] = FOREIGN[j % len(FOREIGN)]
        earlier = lambda j: int(rng.integers(0, max(start + j, 1)))  # noqa: E731 - an earlier row
        for j in np.flatnonzero((u >= 0.11) & (u < 0.15)):
            urls[j] = f"http://img.example/{earlier(j)}.jpg"
        for j in np.flatnonzero((u >= 0.15) & (u < 0.19)):
            src = earlier(j)
            sha[j] = f"{src:064x}"
            phash[j] = base_hashes[src]
        for j in np.flatnonzero((u >= 0.19) & (u < 0.24)):
            h = int(base_hashes[earlier(j)]) & ((1 << 64) - 1)
            for bit in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
                h ^= 1 << int(bit)
            phash[j] = h - (1 << 64) if h >= (1 << 63) else h
        ok = status == "success"
        table = pa.table({
            "key": keys, "url": urls, "caption": caps, "image": pa.nulls(m, pa.binary()),
            "width": pa.array(np.where(ok, 256, 0), pa.int32()), "height": pa.array(np.where(ok, 256, 0), pa.int32()),
            "original_width": pa.array(ow, pa.int32()), "original_height": pa.array(oh, pa.int32()),
            "sha256": sha, "phash": pa.array(phash, pa.int64()), "status": pa.array(status.tolist(), pa.string()),
            "error_kind": pa.array([None if s == "success" else "http_404" for s in status], pa.string()),
            "error_message": pa.array([None if s == "success" else "404" for s in status], pa.string()),
            "source": pa.array(["bench"] * m, pa.string()),
            "ingested_at": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * m, pa.timestamp("us", tz="UTC")),
        }, schema=RAW_SCHEMA)
        shard_id = f"bench-{start // shard_rows:05d}"
        path = raw_dir / f"{shard_id}.parquet"
        pq.write_table(table, path)
        out.append((shard_id, path, table))
    return out
