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


# ------------------------------------------------------------------------------- rebuild
def _tables(path):
    with Catalog(path, read_only=True) as cat:
        q = cat.con.execute
        return {
            "urls": q(
                "SELECT url, key, status, error_kind, error_message, shard_id, attempts FROM urls ORDER BY url"
            ).fetchall(),
            "shards": q("SELECT shard_id, kind, path, n_rows, n_success, complete FROM shards ORDER BY 1").fetchall(),
            "snapshots": q("SELECT snapshot_id, parent_id, path, n_rows FROM snapshots ORDER BY 1").fetchall(),
            "sources": q("SELECT * FROM snapshot_sources ORDER BY 1, 2").fetchall(),
            "latest": cat.latest_snapshot()["snapshot_id"],
        }


def test_rebuild_recovers_urls_shards_and_snapshot_lineage_from_the_data_dir(data_dir):
    from clipline.components.catalog import CatalogExists, rebuild_catalog
    from clipline.components.curate import curate
    from test_curate_helpers import config, jpeg, pattern_image, row, write_shard

    cfg = config(data_dir)
    # shard ids as ingest names them (UTC time first); k2 fails, then succeeds in a later shard
    a, b = "20260101T000000-aaaaaaaa-00000", "20260102T000000-bbbbbbbb-00000"
    write_shard(data_dir, a, [row("k1", seed=1), row("k2", status="failed")])
    first = curate(cfg, track=False)
    write_shard(data_dir, b, [row("k2", seed=2), row("k3", seed=3)])
    ext = data_dir.parent / "ext.parquet"  # an img2dataset shard, registered from outside the data dir
    pq.write_table(
        pa.table(
            {
                "key": ["e0"],
                "url": ["http://e.test/0"],
                "caption": ["a photo from an external tool"],
                "jpg": [jpeg(pattern_image(9))],
                "width": [96],
                "height": [96],
            }
        ),
        ext,
    )
    with Catalog(cfg.catalog_path) as cat:
        cat.register_external_shard(ext)
    second = curate(cfg, track=False)
    assert second.parent_id == first.snapshot_id
    # what a crash leaves: a snapshot being written, a snapshot dir without its manifest, a damaged shard
    (cfg.snapshots_dir / ".0123456789abcdef.tmp").mkdir()
    (cfg.snapshots_dir / "deadbeefdeadbeef").mkdir()
    (cfg.raw_dir / "20260103T000000-cccccccc-00000.parquet").write_bytes(b"not parquet")
    before = _tables(cfg.catalog_path)

    cfg.catalog_path.unlink()  # the driver's disk is lost; the data dir is not
    res = rebuild_catalog(cfg.catalog_path, cfg.raw_dir, cfg.snapshots_dir)
    after = _tables(cfg.catalog_path)
    assert after == before
    assert ("http://example.test/k2.jpg", "k2", "success", None, None, b, 2) in after["urls"]
    assert after["latest"] == second.snapshot_id and after["snapshots"][0][1] in (None, first.snapshot_id)
    assert (res.raw_shards, res.external_shards, res.urls, res.failed_urls, res.snapshots) == (2, 1, 4, 0, 2)
    assert set(res.left_out) == {
        str(cfg.raw_dir / "20260103T000000-cccccccc-00000.parquet"),
        str(cfg.snapshots_dir / "deadbeefdeadbeef"),
    }
    assert "manifest" in res.left_out[str(cfg.snapshots_dir / "deadbeefdeadbeef")]

    # the rebuilt catalog serves incremental work: nothing seen is new, the snapshot is current
    with Catalog(cfg.catalog_path, read_only=True) as cat:
        assert cat.unseen_urls([u for u, *_ in after["urls"]]) == []
    again = curate(cfg, track=False)
    assert not again.new and again.snapshot_id == second.snapshot_id

    with pytest.raises(CatalogExists, match="--force"):
        rebuild_catalog(cfg.catalog_path, cfg.raw_dir, cfg.snapshots_dir)
    res = rebuild_catalog(cfg.catalog_path, cfg.raw_dir, cfg.snapshots_dir, replace=True)
    assert res.backup is not None and res.backup.exists() and _tables(cfg.catalog_path) == before


def test_catalog_rebuild_command_refuses_in_one_line_to_replace_a_catalog_or_take_a_busy_data_dir(data_dir):
    from typer.testing import CliRunner

    from clipline.components.orchestration import RUN_LOCK
    from clipline.flows.cli import app

    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.record_raw_shard(
            "20260101T000000-aaaaaaaa-00000", data_dir / "raw" / "x.parquet", _rows(["http://a/1"]), {}
        )
    runner = CliRunner()
    res = runner.invoke(app, ["--data-dir", str(data_dir), "catalog", "rebuild"])
    assert res.exit_code == 1 and "exists" in res.output and "--force" in res.output
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live run holds the data dir
        with Catalog(data_dir / "catalog.duckdb") as cat:
            cat.con.execute(
                "INSERT INTO locks VALUES (?, ?, ?, ?, now())",
                [RUN_LOCK, "clipline refresh (other)", holder.pid, __import__("socket").gethostname()],
            )
        res = runner.invoke(app, ["--data-dir", str(data_dir), "catalog", "rebuild", "--force"])
        assert res.exit_code == 1 and "held by clipline refresh (other)" in res.output
    finally:
        holder.kill()
        holder.wait()
    assert not list(data_dir.glob("catalog.duckdb.bak-*"))  # nothing was replaced
    res = runner.invoke(app, ["--data-dir", str(data_dir), "catalog", "rebuild", "--force"])
    assert res.exit_code == 0 and list(data_dir.glob("catalog.duckdb.bak-*")), res.output
    with Catalog(data_dir / "catalog.duckdb", read_only=True) as cat:  # its shard file never existed
        assert cat.con.execute("SELECT count(*) FROM urls").fetchone()[0] == 0


def test_catalog_rebuild_with_a_state_dir_writes_the_catalog_there_from_the_data_dir(tmp_path):
    """The driver's local disk (the state dir) is lost; the data dir is not: `catalog rebuild` with
    both flags puts the catalog back where the other commands look for it."""
    from typer.testing import CliRunner

    from clipline.flows.cli import app

    data, state = tmp_path / "data", tmp_path / "state"
    shard = "20260101T000000-aaaaaaaa-00000"
    (data / "raw").mkdir(parents=True)
    table = _rows(["http://a/1", "http://a/2"])
    pq.write_table(table.append_column("shard_id", pa.array([shard] * 2)), data / "raw" / f"{shard}.parquet")
    res = CliRunner().invoke(app, ["--data-dir", str(data), "--state-dir", str(state), "catalog", "rebuild"])
    assert res.exit_code == 0, res.output
    assert (state / "catalog.duckdb").exists() and not (data / "catalog.duckdb").exists()
    with Catalog(state / "catalog.duckdb", read_only=True) as cat:
        assert cat.unseen_urls(["http://a/1", "http://a/2", "http://a/3"]) == ["http://a/3"]
