"""Peak memory of `clipline ingest` at two URL-list sizes: it must not grow with the list.

Serves DISTINCT (default 64) different 400x300 JPEGs of about 10 KB (about 12 KB each once
resized to 256 px and re-encoded, as stored) from a separate aiohttp process on 127.0.0.1, each
under many URLs (`/img/<i>.jpg` is image i mod DISTINCT), and runs the real `clipline ingest` as
a subprocess with a fresh data dir on a list of N URLs, for each of the two sizes. Memory is the
ingest process's own peak RSS (the kernel's high-water mark, VmHWM, read from /proc while it runs);
the peak of the summed RSS of its process tree (image workers included, polled) is printed beside
it. Every URL must be recorded as a success, or the run counts as failed. The last line is the
ratio of the two peaks of the ingest process, larger list over smaller:
`ingest_peak_rss_ratio_10x: N` (1.0 is flat; the target is <= 1.1 for 10x the URLs).

The smaller list has five shards by default: a run reaches its working set (two shards in flight
while the catalog, whose first write allocates about 70 MB of DuckDB memory, records the ones
before) only after its first few shards, so a two-shard run understates it.

    python benchmarks/ingest_memory.py [--sizes 5000 50000] [--distinct 64] [--shard-size 1000]

Measured with the command above, defaults, on a shared 2-core VM (Python 3.11): 5,000 URLs 341 MB,
50,000 URLs 364 MB, `ingest_peak_rss_ratio_10x: 1.07`.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


# ----------------------------------------------------------------------------- images
def make_jpeg(i: int) -> bytes:
    """A deterministic photo-like JPEG: noise, a tint and blurred discs; about 10 KB."""
    from PIL import Image, ImageDraw, ImageFilter

    rnd = random.Random(i)
    img = Image.effect_noise((400, 300), rnd.uniform(20, 60)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (400, 300), tuple(rnd.randrange(256) for _ in range(3))), 0.6)
    d = ImageDraw.Draw(img)
    for _ in range(10):
        x, y, r = rnd.randrange(400), rnd.randrange(300), rnd.randrange(15, 100)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rnd.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return buf.getvalue()


# ----------------------------------------------------------------------------- server
def _serve(sock: socket.socket, distinct: int) -> None:
    from aiohttp import web

    bodies = [make_jpeg(i) for i in range(distinct)]

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not (name.endswith(".jpg") and name[:-4].isdigit()):
            raise web.HTTPNotFound()
        return web.Response(body=bodies[int(name[:-4]) % distinct], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}", handler)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


def start_server(distinct: int) -> tuple[str, mp.Process]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    proc = mp.get_context("fork").Process(target=_serve, args=(sock, distinct), daemon=True)
    proc.start()
    sock.close()
    deadline = time.time() + 30
    while True:  # until it serves an image (it builds its images first)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/img/0.jpg", timeout=5) as r:
                r.read()
            break
        except OSError:
            if time.time() > deadline or not proc.is_alive():
                raise
            time.sleep(0.1)
    return f"127.0.0.1:{port}", proc


# ----------------------------------------------------------------------------- measure
def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_rss_kb(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total // 1024


def run_ingest(n: int, host: str, work: Path, shard_size: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lst = work / f"urls-{n}.parquet"
    pq.write_table(
        pa.table(
            {
                "url": [f"http://{host}/img/{i}.jpg" for i in range(n)],
                "caption": [f"a synthetic photo, number {i}" for i in range(n)],
            }
        ),
        lst,
    )
    data_dir = work / f"data-{n}"
    cmd = [
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
    env = dict(os.environ, CLIPLINE_INGEST__SHARD_SIZE=str(shard_size), CLIPLINE_INGEST__RETRIES="0")
    env.pop("RAY_ADDRESS", None)  # the local path: this process's own memory is the point
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    hwm = tree = 0
    while proc.poll() is None:
        hwm = max(hwm, _status_kb(proc.pid, "VmHWM"))  # the kernel's peak so far: no spike is missed
        tree = max(tree, _tree_rss_kb(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join()
    text = b"".join(out).decode(errors="replace")
    if proc.returncode != 0:
        sys.stdout.write(text[-3000:])
        raise SystemExit(f"clipline ingest failed on {n} URLs (exit {proc.returncode})")

    from clipline.components.catalog import Catalog

    with Catalog(data_dir / "catalog.duckdb", read_only=True) as cat:
        counts = cat.url_counts()
    if counts != {"success": n}:
        raise SystemExit(f"clipline ingest of {n} URLs recorded {counts}, expected every one a success")
    stored = sum(f.stat().st_size for f in (data_dir / "raw").glob("*.parquet"))
    shutil.rmtree(data_dir)
    return {"n": n, "peak_kb": hwm, "tree_kb": tree, "wall_s": wall, "stored_mb": stored / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[5000, 50000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--distinct", type=int, default=64, help="different images served (each under many URLs)")
    ap.add_argument("--shard-size", type=int, default=1000, help="URLs per shard (clipline's default: 1000)")
    args = ap.parse_args()
    small, large = sorted(args.sizes)

    host, server = start_server(args.distinct)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-mem-") as tmp:
            res = []
            for n in (small, large):
                r = run_ingest(n, host, Path(tmp), args.shard_size)
                res.append(r)
                print(
                    f"{n:>9,} URLs: ingest process peak RSS {r['peak_kb'] / 1024:7.1f} MB, "
                    f"process tree peak {r['tree_kb'] / 1024:7.1f} MB, {r['stored_mb']:6.1f} MB of shards, "
                    f"{n / r['wall_s']:5.0f} URLs/s",
                    flush=True,
                )
    finally:
        server.terminate()
        server.join(5)
    a, b = res
    print(f"process tree peak ratio: {b['tree_kb'] / a['tree_kb']:.2f}")
    print(f"ingest_peak_rss_ratio_{round(large / small)}x: {b['peak_kb'] / a['peak_kb']:.2f}")


if __name__ == "__main__":
    main()
