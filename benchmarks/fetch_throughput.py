"""Download throughput of clipline's Fetcher on one core against a fast loopback server.

Starts a static server in separate process(es) (aiohttp, bodies held in memory) serving N
distinct URLs of SIZE random bytes each, then downloads them all with one Fetcher on one event
loop in this process. Prints wall-clock images/s and images per CPU-second of the downloading
process (what one core sustains, independent of other load on the machine), the latter last.

    python benchmarks/fetch_throughput.py [--n 5000] [--size 40000] [--concurrency 128]
        [--compare-plain-aiohttp]

On a shared machine, wall-clock rates depend on other load; images per CPU-second of the
downloading process is the stable figure.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import time


def _serve(sock: socket.socket, size: int) -> None:
    from aiohttp import web

    body = os.urandom(size)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}", handler)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _run(urls: list[str], allow: str, concurrency: int) -> tuple[float, float, int, int]:
    from clipline.components.ingest.fetch import Fetcher, FetchSettings

    settings = FetchSettings(concurrency=concurrency, per_host_concurrency=concurrency, allow_hosts=(allow,))
    async with Fetcher(settings) as f:
        await asyncio.gather(*(f.fetch(u) for u in urls[:200]))  # warm up connections
        c0, t0 = _cpu(), time.perf_counter()
        results = await asyncio.gather(*(f.fetch(u) for u in urls))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    ok = sum(r.ok for r in results)
    nbytes = sum(len(r.body) for r in results if r.ok)
    return wall, cpu, ok, nbytes


async def _run_plain_aiohttp(urls: list[str], concurrency: int) -> tuple[float, float, int, int]:
    """The floor to compare with: bare aiohttp (one session, a semaphore, no guard/limits)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(u: str) -> bytes:
            async with sem, session.get(u) as r:
                return await r.read()

        await asyncio.gather(*(one(u) for u in urls[:200]))
        c0, t0 = _cpu(), time.perf_counter()
        bodies = await asyncio.gather(*(one(u) for u in urls))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return wall, cpu, len(bodies), sum(map(len, bodies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--server-processes", type=int, default=1)
    ap.add_argument(
        "--compare-plain-aiohttp",
        action="store_true",
        help="also time bare aiohttp on the same server (the floor for any aiohttp client)",
    )
    args = ap.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    servers = [ctx.Process(target=_serve, args=(sock, args.size), daemon=True) for _ in range(args.server_processes)]
    for p in servers:
        p.start()
    try:
        for _ in range(100):  # wait for the server
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.n)]
        if args.compare_plain_aiohttp:
            pw, pc, pok, _ = asyncio.run(_run_plain_aiohttp(urls, args.concurrency))
            print(
                f"plain aiohttp: {pok} in {pw:.2f} s wall, {pc:.2f} s CPU -> "
                f"{pok / pw:.0f} images/s wall, {pok / pc:.0f} images per CPU-second"
            )
        wall, cpu, ok, nbytes = asyncio.run(_run(urls, f"127.0.0.1:{port}", args.concurrency))
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            p.join(5)
    print(f"downloaded: {ok}/{args.n} ({nbytes / 1e6:.0f} MB) in {wall:.2f} s wall, {cpu:.2f} s CPU of the downloader")
    print(f"wall_images_per_s: {ok / wall:.0f}")
    print(f"images_per_cpu_second: {ok / cpu:.0f}")


if __name__ == "__main__":
    main()
