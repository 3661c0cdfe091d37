"""Raw shards: building, atomic writing (kill -9 included), stats, and img2dataset compatibility."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipline.components.catalog import Catalog
from clipline.components.ingest.imaging import ImageSettings, process_image
from clipline.components.ingest.schema import RAW_SCHEMA
from clipline.components.ingest.shards import (
    build_shard_table,
    read_raw_shard,
    shard_stats,
    write_shard,
)

REPO = Path(__file__).resolve().parents[1]


def jpeg(color, size=(64, 48)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG")
    return b.getvalue()


def sample_rows(n_ok=3, n_failed=2):
    rows = []
    for i in range(n_ok):
        p = process_image(jpeg((40 * i, 100, 200)), ImageSettings(image_size=32))
        rows.append(
            {"key": f"k{i}", "url": f"http://x/{i}.jpg", "caption": f"caption {i}", "source": "list.csv", **p.as_row()}
        )
    for j in range(n_failed):
        rows.append(
            {
                "key": f"f{j}",
                "url": f"http://x/bad{j}",
                "caption": None,
                "status": "failed_to_download",
                "error_kind": "http_404" if j % 2 == 0 else "timeout",
                "error_message": "boom",
                "source": "list.csv",
            }
        )
    return rows


def test_failed_image_rows_from_process_image():
    bad = process_image(b"<html>not found</html>", ImageSettings())
    t = build_shard_table([{"key": "x", "url": "http://x/page", **bad.as_row()}])
    row = t.to_pylist()[0]
    assert (row["status"], row["error_kind"]) == ("failed_to_resize", "not_an_image")
    assert row["image"] is None and "not an image" in row["error_message"]


def test_build_table_schema_carried_columns_and_defaults():
    rows = sample_rows()
    carried = pa.table({"score": [0.1, 0.2, 0.3, 0.4, 0.5], "key": ["a", "b", "c", "d", "e"]})
    t = build_shard_table(rows, carried)
    assert t.schema.names == RAW_SCHEMA.names + ["score", "src_key"]
    assert t.schema.field("width").type == pa.int32() and t.schema.field("phash").type == pa.int64()
    assert t.column("ingested_at").null_count == 0
    assert t.column("image").null_count == 2  # failed rows kept, without bytes
    cols = {k: [r.get(k) for r in rows] for k in ("key", "url", "status", "image")}
    assert build_shard_table(cols).column("key").to_pylist() == ["k0", "k1", "k2", "f0", "f1"]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"status": "ok"}, "unknown status"),
        ({"image": None}, "without image bytes"),
        ({"key": "k1"}, "duplicate keys"),
    ],
)
def test_build_table_rejects_broken_rows(change, match):
    rows = sample_rows()
    rows[0].update(change)
    with pytest.raises(ValueError, match=match):
        build_shard_table(rows)


def test_stats_count_status_error_kind_and_bytes():
    t = build_shard_table(sample_rows(3, 3))
    s = shard_stats(t, duration_s=2.0, bytes_downloaded=12345)
    assert s["n_rows"] == 6 and s["n_success"] == 3 and s["n_failed"] == 3
    assert s["status_counts"] == {"failed_to_download": 3, "success": 3}
    assert s["error_kind_counts"] == {"http_404": 2, "timeout": 1}
    assert s["bytes_downloaded"] == 12345
    assert s["bytes_stored"] == sum(len(b) for b in t.column("image").to_pylist() if b)
    assert s["images_per_s"] == 1.5


def test_write_shard_atomic_files_and_round_trip(tmp_path):
    t = build_shard_table(sample_rows(), pa.table({"score": [1, 2, 3, 4, 5]}))
    path = write_shard(t, tmp_path / "raw", "shard-000", shard_stats(t, 1.0, 10))
    assert path == tmp_path / "raw" / "shard-000.parquet"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["shard-000.parquet", "shard-000.stats.json"]
    stats = json.loads((tmp_path / "raw" / "shard-000.stats.json").read_text())
    assert stats["shard_id"] == "shard-000" and stats["n_rows"] == 5
    back = read_raw_shard(path)
    assert back.equals(t)
    assert read_raw_shard(f"file://{path}").equals(t)
    meta = pq.ParquetFile(path).metadata
    img = RAW_SCHEMA.get_field_index("image")
    assert meta.row_group(0).column(img).compression == "UNCOMPRESSED"
    assert meta.row_group(0).column(0).compression == "ZSTD"
    with pytest.raises(FileExistsError):
        write_shard(t, tmp_path / "raw", "shard-000", {})
    with pytest.raises(ValueError, match="bad shard id"):
        write_shard(t, tmp_path / "raw", "../escape", {})


def test_big_shards_get_several_row_groups(tmp_path):
    n = 1200
    img = os.urandom(40_000)  # 48 MB of image bytes in all
    rows = {
        "key": [str(i) for i in range(n)],
        "url": [f"u{i}" for i in range(n)],
        "image": [img] * n,
        "status": ["success"] * n,
    }
    path = write_shard(build_shard_table(rows), tmp_path, "big", {})
    md = pq.ParquetFile(path).metadata
    assert 2 <= md.num_row_groups <= 4 and md.num_rows == n


WRITER = textwrap.dedent("""
    import os, sys
    import pyarrow as pa
    from clipline.components.ingest.shards import build_shard_table, write_shard
    out = sys.argv[1]
    print("ready", flush=True)
    n = 400
    img = os.urandom(30_000)
    i = int(sys.argv[2])
    while True:
        rows = {"key": [f"{i}-{j}" for j in range(n)], "url": [f"u{j}" for j in range(n)],
                "image": [img] * n, "status": ["success"] * n}
        write_shard(build_shard_table(rows), out, f"s{i:05d}", {"n_rows": n})
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_kill_9_never_leaves_a_partial_shard(tmp_path):
    """SIGKILL a writer at random moments: every *.parquet left is whole, with its stats; the
    catalog's reconcile removes the .tmp leftovers and registers the complete files."""
    out = tmp_path / "raw"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_mid_write = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out), str(attempt * 1000)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        if attempt % 2:  # let at least one shard finish, then kill mid-way through another
            proc.stdout.readline()
        if attempt % 3 == 0:  # kill the moment a write is under way, whatever the machine's speed
            deadline = time.time() + 20
            while not list(out.glob(f"s{attempt:02d}*.tmp")) and time.time() < deadline:
                pass
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed, not crashed
        proc.stdout.close()
        killed_mid_write += bool(list(out.glob(f"s{attempt:02d}*.tmp")))  # this attempt's own write
    assert killed_mid_write, "no kill landed during a write; the test proves nothing"
    files = sorted(out.glob("*.parquet"))
    assert files, "the writer never finished a shard; the test proves nothing"
    for f in files:
        assert pq.ParquetFile(f).metadata.num_rows == 400
        assert read_raw_shard(f, columns=["key", "image"]).column("image").null_count == 0
        assert json.loads(f.with_suffix(".stats.json").read_text())["n_rows"] == 400
    leftovers = (
        {p.name for p in out.iterdir()} - {f.name for f in files} - {f.with_suffix(".stats.json").name for f in files}
    )
    assert all(name.endswith(".tmp") or name.endswith(".stats.json") for name in leftovers), leftovers
    with Catalog(tmp_path / "catalog.duckdb") as cat:
        rec = cat.reconcile_raw_shards(out)
        assert rec["registered"] == len(files)
        assert cat.url_counts() == {"success": 400}  # the same 400 urls in every shard
        assert len(cat.shards()) == len(files)
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------ img2dataset shards
def write_like_img2dataset(path: Path, n: int = 250) -> list[dict]:
    """What img2dataset 1.4x's ParquetSampleWriter produces: its metadata schema (key, url,
    caption, carried columns, status, error_message, width, height, original_width,
    original_height, exif, sha256) with the image bytes appended as ``jpg``, written in
    buffers of 100 rows through pyarrow.parquet.ParquetWriter."""
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("similarity", pa.float64()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("original_width", pa.int64()),
            ("original_height", pa.int64()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
            ("jpg", pa.binary()),
        ]
    )
    samples = []
    for i in range(n):
        ok = i % 5 != 0
        img = jpeg((i % 255, 10, 10)) if ok else None
        samples.append(
            {
                "key": f"{i:09d}",
                "url": f"http://img2dataset.example/{i}.jpg",
                "caption": f"photo {i}",
                "similarity": i / n,
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP Error 404: Not Found",
                "width": 64 if ok else None,
                "height": 48 if ok else None,
                "original_width": 640 if ok else None,
                "original_height": 480 if ok else None,
                "exif": "{}" if ok else None,
                "sha256": "ab" * 32 if ok else None,
                "jpg": img,
            }
        )
    with open(path, "wb") as fd:
        writer = pq.ParquetWriter(fd, schema)
        for start in range(0, n, 100):
            chunk = samples[start : start + 100]
            writer.write_table(pa.Table.from_pydict({k: [s[k] for s in chunk] for k in schema.names}, schema))
        writer.close()
    return samples


def test_img2dataset_shard_reads_as_raw_schema(tmp_path):
    path = tmp_path / "00000.parquet"
    samples = write_like_img2dataset(path)
    t = read_raw_shard(path)
    assert t.schema.names[: len(RAW_SCHEMA)] == RAW_SCHEMA.names
    assert t.schema.field("width").type == pa.int32()
    assert {"exif", "similarity"} <= set(t.column_names)
    assert t.column("image").to_pylist() == [s["jpg"] for s in samples]
    assert t.column("key").to_pylist()[:2] == ["000000000", "000000001"]
    assert t.column("phash").null_count == len(samples)  # img2dataset has no perceptual hash
    import fsspec

    fsspec.filesystem("memory").pipe("/clipline-i2d/00000.parquet", path.read_bytes())
    remote = read_raw_shard("memory://clipline-i2d/00000.parquet")
    assert remote.equals(t)
    fsspec.filesystem("memory").rm("/clipline-i2d", recursive=True)
    sub = read_raw_shard(path, columns=["key", "image", "status"])
    assert sub.column_names == ["key", "image", "status"]
    assert sub.column("status").to_pylist().count("success") == 200


def test_img2dataset_shard_without_status_or_caption_column(tmp_path):
    path = tmp_path / "old.parquet"
    pq.write_table(
        pa.table({"key": [1, 2], "url": ["u1", "u2"], "txt": ["one", "two"], "webp": [b"RIFF....WEBP", None]}), path
    )
    t = read_raw_shard(path)
    assert t.column("key").to_pylist() == ["1", "2"]
    assert t.column("caption").to_pylist() == ["one", "two"]
    assert t.column("status").to_pylist() == ["success", "failed_to_download"]


def test_img2dataset_shard_registers_in_catalog_and_unions_with_ours(tmp_path):
    ext = tmp_path / "00000.parquet"
    write_like_img2dataset(ext)
    ours = write_shard(build_shard_table(sample_rows()), tmp_path / "raw", "ours", {})
    with Catalog(tmp_path / "catalog.duckdb") as cat:
        assert cat.register_external_shard(ext) == 250
        assert cat.url_counts() == {"success": 200, "failed_to_download": 50}
        assert [s.kind for s in cat.shards(kind=None)] == ["external"]
    n_ok = duckdb.sql(
        f"SELECT count(*) FROM read_parquet(['{ext}', '{ours}'], union_by_name=true) WHERE status = 'success'"
    ).fetchall()[0][0]
    assert n_ok == 203
