import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipline.components.catalog import Catalog, LockHeld


def _rows(urls, status="success"):
    n = len(urls)
    return pa.table(
        {
            "url": urls,
            "key": [f"k{i}" for i in range(n)],
            "status": [status] * n,
            "error_message": [None if status == "success" else "boom"] * n,
            "error_kind": [None if status == "success" else "http_500"] * n,
        }
    )


def test_unseen_urls_and_retry_failed(data_dir):
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.record_raw_shard("s0", data_dir / "s0.parquet", _rows(["a", "b"]), {})
        cat.record_raw_shard("s1", data_dir / "s1.parquet", _rows(["c"], status="failed_to_download"), {})
        assert cat.unseen_urls(["a", "b", "c", "d", "d"]) == ["d"]
        assert cat.unseen_urls(["a", "c", "d"], retry_failed=True) == ["c", "d"]
        assert cat.url_counts() == {"success": 2, "failed_to_download": 1}
        assert cat.failure_counts() == {"http_500": 1}
        # a retry that succeeds replaces the outcome and counts the attempt
        cat.record_raw_shard("s2", data_dir / "s2.parquet", _rows(["c"]), {})
        assert cat.url_counts() == {"success": 3}
        assert cat.con.execute("SELECT attempts FROM urls WHERE url='c'").fetchone()[0] == 2
        assert [s.shard_id for s in cat.shards()] == ["s0", "s1", "s2"]


def test_reconcile_registers_orphan_shard_and_removes_tmp(data_dir):
    raw = data_dir / "raw"
    raw.mkdir()
    pq.write_table(_rows(["x", "y"]), raw / "shard-a.parquet")
    (raw / "shard-b.parquet.tmp").write_bytes(b"partial")
    with Catalog(data_dir / "catalog.duckdb") as cat:
        out = cat.reconcile_raw_shards(raw)
        assert out == {"tmp_removed": 1, "registered": 1}
        assert cat.unseen_urls(["x", "y", "z"]) == ["z"]
        assert cat.reconcile_raw_shards(raw) == {"tmp_removed": 0, "registered": 0}
    assert not (raw / "shard-b.parquet.tmp").exists()


def test_external_shard_without_status_counts_as_success(data_dir):
    p = data_dir / "ext.parquet"
    pq.write_table(pa.table({"url": ["u1", "u2"], "key": ["000000000", "000000001"], "caption": ["a", "b"]}), p)
    with Catalog(data_dir / "catalog.duckdb") as cat:
        assert cat.register_external_shard(p) == 2
        assert cat.url_counts() == {"success": 2}
    bad = data_dir / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"]}), bad)
    with Catalog(data_dir / "catalog.duckdb") as cat, pytest.raises(ValueError, match="lacks column"):
        cat.register_external_shard(bad)


def test_lock_refuses_second_holder_and_takes_over_stale(data_dir):
    with Catalog(data_dir / "catalog.duckdb") as cat:
        with cat.lock("refresh", "test"):
            with pytest.raises(LockHeld, match="refresh"):
                cat.acquire_lock("refresh", "other")
        # a lock left by a process that died is stale
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        cat.con.execute("INSERT INTO locks VALUES ('refresh', 'ghost', ?, ?, now())", [dead.pid, os.uname().nodename])
        cat.acquire_lock("refresh", "me")
        assert cat.con.execute("SELECT holder FROM locks").fetchone()[0] == "me"


def test_snapshot_lookup_errors_name_the_id(data_dir):
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.record_snapshot("snap1", None, data_dir / "s", 10, {"a": 1}, ["s0"])
        assert cat.get_snapshot("snap1")["manifest"] == {"a": 1}
        assert cat.latest_snapshot()["snapshot_id"] == "snap1"
        assert cat.snapshot_source_shards("snap1") == ["s0"]
        with pytest.raises(KeyError, match="nope"):
            cat.get_snapshot("nope")
