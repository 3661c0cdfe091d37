"""The ingest stage end to end: real HTTP on loopback, real Parquet, the real catalog."""

from __future__ import annotations

import http.server
import json
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from flowkit import run_flow_with_artifact

from clipline.components.catalog import Catalog
from clipline.components.config import load_config
from clipline.components.ingest.runner import RECORD_COLUMNS, ingest, plan
from clipline.components.ingest.schema import RAW_SCHEMA


class _Server:
    """A static image server on 127.0.0.1 that counts requests per path and can be slowed down."""

    def __init__(self, n_images: int, delay_s: float = 0.0):
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.delay_s = delay_s
        self.images = {}
        for i in range(n_images):
            img = Image.new("RGB", (300 + i % 50, 240), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            self.images[f"/img/{i}.jpg"] = buf.getvalue()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                with outer.lock:  # handler threads run at once; Counter += is not atomic
                    outer.hits[self.path] += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                body = outer.images.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 1024  # the default backlog of 5 drops connections under concurrency

        self.httpd = Server(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, i: int) -> str:
        return f"http://{self.host}/img/{i}.jpg"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(300)
    yield s
    s.close()


def _photo_like_jpeg(i: int) -> bytes:
    """Noise under a tint and discs, 400x300: about 20 KB once stored at 256 px (the server's solid
    colours store in about 3 KB, too little for image bytes to stand out from the rest)."""
    import random

    from PIL import ImageDraw

    rnd = random.Random(i)
    img = Image.blend(
        Image.effect_noise((400, 300), 40).convert("RGB"),
        Image.new("RGB", (400, 300), tuple(rnd.randrange(256) for _ in range(3))),
        0.6,
    )
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rnd.randrange(400), rnd.randrange(300), rnd.randrange(15, 90)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _use_photo_like_images(server: _Server, distinct: int = 8) -> None:
    bodies = [_photo_like_jpeg(i) for i in range(distinct)]
    for i, name in enumerate(sorted(server.images)):
        server.images[name] = bodies[i % distinct]


def _write_list(path: Path, urls: list[str], extra: dict | None = None) -> Path:
    cols = {"url": urls, "caption": [f"a photo number {i}" for i in range(len(urls))]}
    cols.update(extra or {})
    pq.write_table(pa.table(cols), path)
    return path


def _cfg(data_dir: Path, server: _Server, **ingest):
    ingest = {"allow_hosts": [server.host], "shard_size": 40, "processes": 1, "retries": 0, **ingest}
    return load_config(None, {"data_dir": data_dir, "ingest": ingest})


def _all_rows(raw_dir: Path) -> pa.Table:
    files = sorted(raw_dir.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files else None


def test_ingest_writes_shards_with_contract_and_keeps_failures(data_dir, server, tmp_path):
    urls = [server.url(i) for i in range(100)] + [f"http://{server.host}/img/missing-{i}.jpg" for i in range(5)]
    lst = _write_list(tmp_path / "list.parquet", urls, {"license": ["cc-by"] * len(urls)})
    cfg = _cfg(data_dir, server)
    r = ingest(cfg, [str(lst)])
    assert (r.n_listed, r.n_fetched, r.n_success, r.n_failed) == (105, 105, 100, 5)
    assert r.failures == {"http_404": 5}
    rows = _all_rows(cfg.raw_dir)
    for field in RAW_SCHEMA:
        assert field.name in rows.column_names, field.name
    assert "license" in rows.column_names  # carried column
    assert rows.num_rows == 105 and len(set(rows.column("key").to_pylist())) == 105
    ok = rows.filter(pa.compute.equal(rows["status"], "success"))
    assert all(b[:2] == b"\xff\xd8" for b in ok.column("image").to_pylist())  # stored as JPEG
    assert set(ok.column("width").to_pylist()) == {256} and set(ok.column("height").to_pylist()) == {256}
    bad = rows.filter(pa.compute.equal(rows["status"], "failed_to_download"))
    assert bad.num_rows == 5 and all("404" in m for m in bad.column("error_message").to_pylist())
    assert bad.column("image").null_count == 5
    assert len(r.shards) == 3 and all(p.with_suffix(".stats.json").exists() for p in r.shards)
    with Catalog(cfg.catalog_path) as cat:
        assert cat.url_counts() == {"success": 100, "failed_to_download": 5}


def test_arrow_memory_held_during_ingest_does_not_grow_with_the_shards_written(data_dir, server, tmp_path):
    """A shard's images are released once its file is written: the Arrow memory this process holds
    while URLs complete stays at a couple of shards' worth, however many shards the run writes
    (it used to keep every shard's table, images included, until the run ended)."""
    _use_photo_like_images(server)
    cfg = _cfg(data_dir, server, shard_size=20)
    lst = _write_list(tmp_path / "l.parquet", [server.url(i) for i in range(240)])
    held: list[int] = []
    r = ingest(cfg, [str(lst)], progress=lambda done, total: held.append(pa.total_allocated_bytes()))
    assert (r.n_success, len(r.shards)) == (240, 12)
    stored = sum(json.loads(p.with_suffix(".stats.json").read_text())["bytes_stored"] for p in r.shards)
    assert stored > 240 * 8_000  # the images are big enough to show
    # 12 shards of about the same size: two shards in flight are 1/6 of the images; all of them
    # were held at the end before
    assert len(held) >= 12 and max(held) < stored / 3, (max(held), stored)


def test_planning_a_long_list_makes_no_python_object_per_url(data_dir, tmp_path):
    """Reading a list, dropping repeats and asking the catalog what is new stays columnar: the
    Python memory it needs is a few integers per URL, about 60 bytes (it was about 600: a str, a
    list entry and a dict entry after another, per URL)."""
    import tracemalloc

    n = 60_000
    urls = [f"http://example.com/img/{i}.jpg" for i in range(n)]
    urls[5], urls[7], urls[9] = None, "  ", urls[3]  # two rows without a URL, one repeat
    lst = _write_list(tmp_path / "l.parquet", urls)
    cfg = load_config(None, {"data_dir": data_dir})
    with Catalog(cfg.catalog_path) as cat:
        seen = pa.table(
            {
                "url": urls[:1000:2],
                "key": [str(i) for i in range(500)],
                "status": ["success"] * 500,
                "error_message": pa.nulls(500, pa.string()),
            }
        )
        cat.record_raw_shard("s0", data_dir / "s0.parquet", seen, {})
        plan(cfg, cat, [str(_write_list(tmp_path / "warm.parquet", [None, urls[0], "x"]))])  # imports done
        tracemalloc.start()
        try:
            todo, listed, n_dup = plan(cfg, cat, [str(lst)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert (listed, n_dup, todo.num_rows) == (n - 1, 1, n - 1 - 500)
    got = todo.column("url").to_pylist()
    assert got[:4] == [urls[1], urls[3], f"missing-url:{lst}#row5", f"missing-url:{lst}#row7"]
    assert urls[9] not in got[4:] and got[-1] == urls[-1]
    assert peak < 100 * n, peak


def test_incremental_rerun_fetches_only_new_urls(data_dir, server, tmp_path):
    cfg = _cfg(data_dir, server)
    first = [server.url(i) for i in range(100)]
    ingest(cfg, [str(_write_list(tmp_path / "a.csv.parquet", first))])
    assert sum(server.hits.values()) == 100
    server.hits.clear()
    grown = first + [server.url(i) for i in range(100, 120)]  # 20% new
    r = ingest(cfg, [str(_write_list(tmp_path / "b.parquet", grown))])
    assert (r.n_listed, r.n_already_seen, r.n_fetched) == (120, 100, 20)
    assert set(server.hits) == {f"/img/{i}.jpg" for i in range(100, 120)}
    assert _all_rows(cfg.raw_dir).num_rows == 120
    # nothing new: no request, no shard
    server.hits.clear()
    r = ingest(cfg, [str(tmp_path / "b.parquet")])
    assert r.n_fetched == 0 and not r.shards and not server.hits and not r.new_work


def test_retry_failed_fetches_only_past_failures(data_dir, server, tmp_path):
    cfg = _cfg(data_dir, server)
    urls = [server.url(i) for i in range(10)] + [f"http://{server.host}/img/gone.jpg"]
    lst = _write_list(tmp_path / "l.parquet", urls)
    ingest(cfg, [str(lst)])
    server.hits.clear()
    r = ingest(_cfg(data_dir, server, retry_failed=True), [str(lst)])
    assert r.n_fetched == 1 and set(server.hits) == {"/img/gone.jpg"}
    with Catalog(cfg.catalog_path) as cat:
        assert cat.con.execute("SELECT attempts FROM urls WHERE url LIKE '%gone.jpg'").fetchone()[0] == 2


def test_rows_without_url_are_recorded_not_dropped(data_dir, server, tmp_path):
    cfg = _cfg(data_dir, server)
    lst = _write_list(tmp_path / "l.parquet", [server.url(1), None, "", "ftp://example.com/x.jpg"])
    r = ingest(cfg, [str(lst)])
    assert r.n_fetched == 4 and r.n_success == 1 and r.failures == {"invalid_url": 3}
    r2 = ingest(cfg, [str(lst)])  # recorded once: a rerun does not record them again
    assert r2.n_fetched == 0


def test_ssrf_guard_refuses_loopback_unless_allowed(data_dir, server, tmp_path):
    cfg = load_config(None, {"data_dir": data_dir, "ingest": {"retries": 0, "processes": 1}})
    r = ingest(cfg, [str(_write_list(tmp_path / "l.parquet", [server.url(1)]))])
    assert r.failures == {"ssrf_blocked": 1} and not server.hits


def _descendants(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids + [d for k in kids for d in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ingest_cmd(data_dir: Path, lst: Path, host: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipline.flows.cli",
        "--data-dir",
        str(data_dir),
        "ingest",
        str(lst),
        "--allow-host",
        host,
    ]


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_gives_every_url_exactly_once(data_dir, tmp_path):
    srv = _Server(300, delay_s=0.01)
    try:
        n = 300
        lst = _write_list(tmp_path / "l.parquet", [srv.url(i) for i in range(n)])
        env = dict(
            os.environ,
            CLIPLINE_INGEST__SHARD_SIZE="25",
            CLIPLINE_INGEST__CONCURRENCY="8",
            CLIPLINE_INGEST__PROCESSES="1",
            PYTHONUNBUFFERED="1",
        )
        raw = data_dir / "raw"
        kills = 0
        orphans: list[int] = []
        for wait_shards in (1, 4, 7):
            p = subprocess.Popen(
                _ingest_cmd(data_dir, lst, srv.host), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.time() + 60
            while time.time() < deadline and p.poll() is None:
                if len(list(raw.glob("*.parquet"))) >= wait_shards:
                    break
                time.sleep(0.005)
            if p.poll() is None:
                orphans.extend(_descendants(p.pid))
                os.kill(p.pid, signal.SIGKILL)
                kills += 1
            p.wait()
            # whatever is visible is whole: every *.parquet reads
            for f in raw.glob("*.parquet"):
                pq.read_metadata(f)
        assert kills >= 1
        # no process of a killed run lives on (its image workers die with it)
        assert orphans, "the killed runs had image worker processes"
        time.sleep(2.5)
        assert [pid for pid in orphans if _alive(pid)] == []
        done = subprocess.run(_ingest_cmd(data_dir, lst, srv.host), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows = _all_rows(raw)
        urls = rows.column("url").to_pylist()
        assert len(urls) == n and len(set(urls)) == n
        assert len(set(rows.column("key").to_pylist())) == n
        assert not list(raw.glob("*.tmp"))
        with Catalog(data_dir / "catalog.duckdb") as cat:
            assert cat.url_counts() == {"success": n}
            assert sum(s.n_rows for s in cat.shards()) == n
    finally:
        srv.close()


@pytest.mark.slow
def test_cli_ingest_prints_table_and_fails_clearly_on_bad_list(data_dir, server, tmp_path):
    lst = _write_list(tmp_path / "l.parquet", [server.url(i) for i in range(5)])
    ok = subprocess.run(_ingest_cmd(data_dir, lst, server.host), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "fetched this run" in ok.stdout and "images/s" in ok.stdout
    missing = subprocess.run(_ingest_cmd(data_dir, tmp_path / "nope.csv", server.host), capture_output=True, text=True)
    assert missing.returncode != 0 and "nope.csv" in missing.stderr
    assert "Traceback" not in missing.stderr
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("link,text\nhttp://x/1.jpg,hi\n")
    bad = subprocess.run(_ingest_cmd(data_dir, nocol, server.host), capture_output=True, text=True)
    assert bad.returncode != 0 and "url" in bad.stderr and "nocol.csv" in bad.stderr


@pytest.mark.slow
def test_ingest_flow_makes_artifact(prefect_harness, data_dir, server, tmp_path):

    from clipline.flows.ingest import ingest_flow

    cfg = _cfg(data_dir, server)
    lst = _write_list(tmp_path / "l.parquet", [server.url(i) for i in range(10)])
    result, md = run_flow_with_artifact(ingest_flow, "ingest-report", [str(lst)], cfg)
    assert result.n_success == 10
    assert "| success | 10 |" in md


@pytest.mark.slow
def test_shards_run_as_ray_tasks_when_ray_address_is_set(ray_local, data_dir, server, tmp_path, monkeypatch):
    """With RAY_ADDRESS set, each shard is downloaded and written by a Ray task; the driver records
    them. (The session's local Ray stands in for the cluster: ingest joins the running one.)"""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    # what the tasks send back to the driver: the real ray.get, observed
    received = []
    real_get = ray.get

    def get(refs, *a, **k):
        out = real_get(refs, *a, **k)
        received.append(out)
        return out

    monkeypatch.setattr(ray, "get", get)
    _use_photo_like_images(server)
    cfg = _cfg(data_dir, server)
    urls = [server.url(i) for i in range(90)] + [f"http://{server.host}/img/none.jpg"]
    r = ingest(cfg, [str(_write_list(tmp_path / "l.parquet", urls))])
    assert (r.n_fetched, r.n_success, r.failures) == (91, 90, {"http_404": 1})
    assert len(r.shards) == 3
    # each shard's catalog record came back, never its images: memory on the driver stays flat
    shards = [out for out in received if isinstance(out, tuple) and len(out) == 3]
    assert len(shards) == 3
    for path, stats, record in shards:
        assert tuple(record.column_names) == RECORD_COLUMNS and record.num_rows == stats["n_rows"]
        assert record.nbytes * 10 < stats["bytes_stored"]
    rows = _all_rows(cfg.raw_dir)
    assert sorted(rows.column("url").to_pylist()) == sorted(urls)
    with Catalog(cfg.catalog_path) as cat:
        assert cat.url_counts() == {"success": 90, "failed_to_download": 1}
    # the work really ran in Ray worker processes, not in this one
    writers = {json.loads(p.with_suffix(".stats.json").read_text())["written_by"] for p in r.shards}
    assert writers and all(not w.endswith(f":{os.getpid()}") for w in writers)
