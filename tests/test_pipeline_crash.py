"""kill -9 of `clipline run` during ingestion, then a rerun: it completes, and every URL is
recorded exactly once in the catalog, stored exactly once in the raw shards, and trained on at most
once (once per kept key in the snapshot)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import duckdb
import pytest
import pyarrow.parquet as pq

from clipline.components.config import DEMO_FAULTS, DemoConfig
from tests.pipelinekit import SMALL, base_env, clipline, deep_merge, write_toml

N_URLS = 160
SHARD = 20


@pytest.mark.slow
def test_kill_9_during_ingestion_then_a_rerun_completes_with_every_url_once(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from clipline.components.demo import serve_toy_web

    # slow answers (one in two URLs waits 1 s) and few connections: ingestion takes a while
    demo = DemoConfig(
        n_images=N_URLS,
        seed=4,
        fault_rate=0.5,
        slow_seconds=1.0,
        fault_weights={f: (1.0 if f == "slow" else 0.0) for f in DEMO_FAULTS},
    )
    with serve_toy_web(demo, tmp_path / "web") as web:
        config = write_toml(
            tmp_path / "clipline.toml",
            deep_merge(
                SMALL,
                {
                    "ingest": {
                        "allow_hosts": [web.allow_host],
                        "concurrency": 4,
                        "per_host_concurrency": 4,
                        "shard_size": SHARD,
                    },
                },
            ),
        )
        data = tmp_path / "data"
        env = base_env(
            PREFECT_API_URL=PREFECT_API_URL.value(), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"
        )
        args = ["--config", str(config), "--data-dir", str(data), "run", str(web.url_list)]
        raw = data / "raw"

        victim = subprocess.Popen(
            [sys.executable, "-m", "clipline.flows.cli", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and len(list(raw.glob("*.parquet"))) < 2:
                assert victim.poll() is None, "the run ended before it could be killed"
                time.sleep(0.05)
            written = len(list(raw.glob("*.parquet")))
            os.kill(victim.pid, signal.SIGKILL)  # kill -9, mid-ingestion
            victim.wait(30)
        finally:
            try:  # its worker processes die with it; make sure of it
                os.killpg(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert 2 <= written < N_URLS // SHARD, f"killed after {written} shards: not during ingestion"

        rerun = clipline(args, env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "champion" in rerun.stdout
    fetched = re.search(r"URLs fetched\W+([\d,]+)", rerun.stdout)
    assert fetched and 0 < int(fetched[1].replace(",", "")) < N_URLS  # the rerun fetched only what was left

    urls = set(pq.read_table(web.url_list).column("url").to_pylist())
    assert len(urls) == N_URLS
    con = duckdb.connect(str(data / "catalog.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT url, count(*) FROM urls GROUP BY url").fetchall()
        assert {u for u, _ in rows} == urls and all(n == 1 for _, n in rows)
        assert con.execute("SELECT count(*) FROM urls WHERE status = 'success'").fetchone()[0] == N_URLS
        assert con.execute("SELECT count(*) FROM locks").fetchone()[0] == 0
        snap_path, manifest = con.execute(
            "SELECT path, manifest FROM snapshots ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    finally:
        con.close()

    stored = [
        u for p in sorted(raw.glob("*.parquet")) for u in pq.read_table(p, columns=["url"]).column("url").to_pylist()
    ]
    assert sorted(stored) == sorted(urls)  # every URL in exactly one shard row
    assert not list(raw.glob("*.tmp"))

    files = json.loads(manifest)["files"]
    keys = [k for f in files for k in pq.read_table(data / "snapshots" / f, columns=["key"]).column("key").to_pylist()]
    assert keys and len(keys) == len(set(keys))
