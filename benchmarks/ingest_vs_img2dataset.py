"""Ingest throughput: clipline vs img2dataset 1.47 on the same URL list and settings.

Generates N (default 10,000) 640x480 JPEGs of about 40 KB, serves them from one fast local static
server (nginx when installed, otherwise a multi-process Python server) on 127.0.0.1, then runs

  * img2dataset 1.47, in its own venv (created on first use: installing it into clipline's venv
    would break Prefect), and
  * `clipline ingest`,

each as a whole process, with the same settings: 256 px, border resize, JPEG quality 95, both
cores. Prints images/s and peak memory (summed RSS of the process tree) of each, and the ratio
last, as `ratio: X.XX`.

    python benchmarks/ingest_vs_img2dataset.py [--n 10000] [--skip-img2dataset]

Images and img2dataset's venv are cached in ~/.cache/clipline-bench (or $CLIPLINE_BENCH_CACHE):
images40kb-N/ and i2d-venv/, which imaging_vs_cv2.py uses too. With --skip-img2dataset only clipline
runs and the headline is `clipline_images_per_s: X` (tiny, to check it runs: --n 12).
"""

from __future__ import annotations

import argparse
import csv
import http.server
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
from pathlib import Path

CACHE = Path(os.environ.get("CLIPLINE_BENCH_CACHE", Path.home() / ".cache" / "clipline-bench"))
I2D_VERSION = "1.47.0"
IMAGES_VERSION = "images40kb"  # change when make_image changes, so a stale cache is not reused


# ----------------------------------------------------------------------------- data
def make_image(i: int) -> bytes:
    from PIL import Image, ImageDraw, ImageFilter

    rnd = random.Random(i)
    img = Image.effect_noise((640, 480), rnd.uniform(20, 60)).convert("RGB")
    tint = Image.new("RGB", (640, 480), tuple(rnd.randrange(256) for _ in range(3)))
    img = Image.blend(img, tint, 0.6)
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rnd.randrange(640), rnd.randrange(480)
        r = rnd.randrange(20, 160)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rnd.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=86)  # about 40 KB, as the issue specifies
    return buf.getvalue()


def _write_one(args: tuple[int, str]) -> int:
    i, d = args
    data = make_image(i)
    Path(d, f"{i:06d}.jpg").write_bytes(data)
    return len(data)


def ensure_images(n: int) -> Path:
    """A cached folder with at least ``n`` of these images (``{i:06d}.jpg``), generated on first use."""
    for have in sorted(CACHE.glob(f"{IMAGES_VERSION}-*")):  # a larger generated set serves too
        if (have / ".complete").exists() and int(have.name.rsplit("-", 1)[1]) >= n:
            return have
    d = CACHE / f"{IMAGES_VERSION}-{n}"
    done = d / ".complete"
    if done.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with mp.Pool(os.cpu_count()) as pool:
        sizes = pool.map(_write_one, [(i, str(d)) for i in range(n)], chunksize=64)
    done.write_text(str(n))
    print(f"generated {n} images, mean {sum(sizes) / n / 1000:.1f} KB, in {time.time() - t0:.0f} s", flush=True)
    return d


# --------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass


def _py_server_proc(directory: str, sock_fd: int) -> None:
    sock = socket.socket(fileno=sock_fd)

    class Srv(http.server.ThreadingHTTPServer):
        def server_bind(self):
            pass

        def server_activate(self):
            pass

    srv = Srv(("127.0.0.1", 0), lambda *a, **k: _Handler(*a, directory=directory, **k), bind_and_activate=False)
    srv.socket = sock
    srv.serve_forever()


def start_server(directory: Path) -> tuple[str, callable]:
    port = _free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        conf = tmp / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""  # workers must read the images under ~
        conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:{port}; root {directory}; }}
}}""")
        proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        kind = "nginx"
        stop = proc.terminate
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        procs = [
            mp.Process(target=_py_server_proc, args=(str(directory), sock.fileno()), daemon=True) for _ in range(2)
        ]
        for p in procs:
            p.start()
        kind = "python (2 processes)"

        def stop():
            for p in procs:
                p.terminate()

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    print(f"server: {kind} on 127.0.0.1:{port}", flush=True)
    return f"http://127.0.0.1:{port}", stop


# --------------------------------------------------------------------------- measure
_CLK = os.sysconf("SC_CLK_TCK")


def _tree_sample(pid: int) -> tuple[int, dict[int, float]]:
    """Summed RSS (bytes) of pid and all its descendants, and each one's CPU seconds, from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    total, cpu, stack = 0, {}, [pid]
    while stack:
        q = stack.pop()
        try:
            fields = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()
            cpu[q] = (int(fields[11]) + int(fields[12])) / _CLK  # utime + stime
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(q, []))
    return total, cpu


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, float]:
    """Run cmd; return (wall seconds, peak summed RSS, exit code, CPU seconds of the process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    cpu: dict[int, float] = {}
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, c = _tree_sample(proc.pid)
        peak = max(peak, rss)
        cpu.update(c)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join()
    if proc.returncode != 0:
        sys.stdout.write(b"".join(out).decode(errors="replace")[-3000:])
    return wall, peak, proc.returncode, sum(cpu.values())


def ensure_img2dataset() -> Path:
    venv = CACHE / "i2d-venv"
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating a venv with img2dataset {I2D_VERSION} in {venv} (once)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        subprocess.check_call([str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"])
    return exe


def count_success_parquet(folder: Path) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in folder.rglob("*.parquet"):
        t = pq.read_table(f, columns=["status"])
        n += sum(1 for s in t.column("status").to_pylist() if s == "success")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--clipline-first", action="store_true", help="run clipline before img2dataset")
    args = ap.parse_args()

    images = ensure_images(args.n)
    base, stop = start_server(images)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        url_list = work / "urls.csv"
        with url_list.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for i in range(args.n):
                w.writerow([f"{base}/{i:06d}.jpg", f"synthetic image number {i}"])
        host = base.removeprefix("http://")
        ncpu = os.cpu_count() or 2

        results = {}
        if not args.skip_img2dataset:
            exe = ensure_img2dataset()
            out = work / "i2d"
            cmd = [
                str(exe),
                "--url_list",
                str(url_list),
                "--input_format",
                "csv",
                "--url_col",
                "url",
                "--caption_col",
                "caption",
                "--output_format",
                "parquet",
                "--output_folder",
                str(out),
                "--image_size",
                "256",
                "--resize_mode",
                "border",
                "--encode_format",
                "jpg",
                "--encode_quality",
                "95",
                "--processes_count",
                str(ncpu),
                "--thread_count",
                "64",
                "--number_sample_per_shard",
                "1000",
                "--distributor",
                "multiprocessing",
                "--enable_wandb",
                "False",
                "--timeout",
                "10",
                "--retries",
                "0",
            ]
            wall, peak, rc, cpu = run_measured(cmd)
            ok = count_success_parquet(out)
            results["img2dataset"] = (wall, peak, ok)
            print(
                f"img2dataset {I2D_VERSION}: {ok}/{args.n} ok in {wall:.1f} s = {args.n / wall:.0f} images/s, "
                f"peak memory {peak / 2**20:.0f} MiB, CPU {cpu:.1f} s = {1000 * cpu / args.n:.2f} ms/image "
                f"(rc={rc})",
                flush=True,
            )

        data_dir = work / "clipline-data"
        env = dict(
            os.environ,
            CLIPLINE_INGEST__IMAGE_SIZE="256",
            CLIPLINE_INGEST__RESIZE_MODE="border",
            CLIPLINE_INGEST__ENCODE_FORMAT="jpg",
            CLIPLINE_INGEST__ENCODE_QUALITY="95",
            CLIPLINE_INGEST__PROCESSES=str(ncpu),
            CLIPLINE_INGEST__SHARD_SIZE="1000",
            CLIPLINE_INGEST__RETRIES="0",
            TERM="dumb",
        )
        clipline = Path(sys.executable).with_name("clipline")
        cmd = [str(clipline), "--data-dir", str(data_dir), "ingest", str(url_list), "--allow-host", host]
        wall, peak, rc, cpu = run_measured(cmd, env)
        ok = count_success_parquet(data_dir / "raw")
        results["clipline"] = (wall, peak, ok)
        if ok < args.n * 0.99 or ("img2dataset" in results and results["img2dataset"][2] < args.n * 0.99):
            sys.exit(
                f"too few images succeeded (clipline {ok}, img2dataset "
                f"{results.get('img2dataset', (0, 0, 'n/a'))[2]} of {args.n}): the comparison would be meaningless"
            )
        print(
            f"clipline: {ok}/{args.n} ok in {wall:.1f} s = {args.n / wall:.0f} images/s, "
            f"peak memory {peak / 2**20:.0f} MiB, CPU {cpu:.1f} s = {1000 * cpu / args.n:.2f} ms/image "
            f"(rc={rc})",
            flush=True,
        )
        if "img2dataset" in results:
            ratio = results["img2dataset"][0] / results["clipline"][0]
            print(f"ratio: {ratio:.2f}")
        else:
            print(f"clipline_images_per_s: {args.n / wall:.1f}")
    finally:
        stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
