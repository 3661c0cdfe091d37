"""Serve the toy web over real HTTP on loopback (aiohttp), with its faults.

Two servers run on one background event loop: the toy web itself, and a second one on another
port that stands in for an internal service (the target of ``redirect_internal``; an ingest's SSRF
guard must never reach it, and it counts every request it gets so tests can check that).

    with serve_toy_web(cfg.demo, out_dir) as web:
        web.url_list      # Parquet: url, caption, fault, color, shape
        web.allow_host    # "127.0.0.1:PORT", for `clipline ingest --allow-host`
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web

from clipline.components.config import DemoConfig
from clipline.components.demo.store import ToyItem, ToyStore

URL_LIST_NAME = "toyweb_urls.parquet"
INFO_NAME = "toyweb.json"
_CHUNK = 256 * 1024


@dataclass
class ToyWeb:
    """A running toy web. URLs in :attr:`url_list` are valid while the context is open."""

    base_url: str
    internal_base_url: str
    allow_host: str
    url_list: Path
    items: list[ToyItem]
    store: ToyStore
    _hits: Counter = field(default_factory=Counter, repr=False)
    _internal_hits: Counter = field(default_factory=Counter, repr=False)

    def url(self, item: ToyItem | int) -> str:
        item = self.items[item] if isinstance(item, int) else item
        return self.base_url + item.path

    def request_count(self, url_or_path: str) -> int:
        """How many requests the toy web has received for this URL (or path)."""
        path = url_or_path[len(self.base_url) :] if url_or_path.startswith(self.base_url) else url_or_path
        return self._hits[path]

    @property
    def internal_hits(self) -> int:
        """Requests that reached the stand-in internal service (an SSRF guard keeps this at 0)."""
        return sum(self._internal_hits.values())

    def by_fault(self, fault: str) -> list[ToyItem]:
        return [it for it in self.items if it.fault == fault]


class _Handlers:
    def __init__(self, store: ToyStore, cfg: DemoConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.hits: Counter = Counter()
        self.internal_hits: Counter = Counter()
        self.base_url = ""
        self.internal_base_url = ""

    # ---- main server
    async def index(self, request: web.Request) -> web.Response:
        counts = Counter(it.fault for it in self.store.items)
        return web.json_response({"items": len(self.store.items), "seed": self.store.seed, "faults": dict(counts)})

    async def image(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        item = self.store.by_path(path)
        if item is None:
            return web.Response(status=404, text="no such item")
        f = item.fault
        if f == "http_404":
            return web.Response(status=404, text="Not Found")
        if f == "http_500":
            return web.Response(status=500, text="Internal Server Error")
        if f in ("http_429", "http_503_retry_after") and self.hits[path] == 1:
            status = 429 if f == "http_429" else 503
            return web.Response(status=status, text="slow down", headers={"Retry-After": "1"})
        if f == "slow":
            await asyncio.sleep(self.cfg.slow_seconds)
        if f == "timeout":
            await asyncio.sleep(self.cfg.hang_seconds)
        if f == "redirect":
            raise web.HTTPFound(self.base_url + "/moved" + path)
        if f == "redirect_internal":
            raise web.HTTPFound(self.internal_base_url + "/internal" + path)
        data, ctype = await self._body(item)
        if f == "truncated":
            return await self._truncated(request, data, ctype)
        if f == "oversized":
            return await self._oversized(request, data, ctype)
        headers = {"X-Robots-Tag": "noai"} if f == "optout" else None
        return web.Response(body=data, content_type=ctype.split(";")[0], headers=headers)

    async def moved(self, request: web.Request) -> web.Response:
        """Target of ``redirect``: the item's picture."""
        path = request.path[len("/moved") :]
        self.hits[request.path] += 1
        item = self.store.by_path(path)
        if item is None:
            return web.Response(status=404, text="no such item")
        data, ctype = await self._body(item)
        return web.Response(body=data, content_type=ctype)

    async def _body(self, item: ToyItem) -> tuple[bytes, str]:
        hit = self.store.cached(item.item_id)
        if hit is not None:
            return hit
        # first request for this item: draw it off the event loop so other requests keep flowing
        return await asyncio.get_running_loop().run_in_executor(None, self.store.body, item.item_id)

    async def _truncated(self, request: web.Request, data: bytes, ctype: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.content_type = ctype
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        await asyncio.sleep(0.05)  # let the half body leave before the connection drops
        if request.transport is not None:
            request.transport.close()
        return resp

    async def _oversized(self, request: web.Request, prefix: bytes, ctype: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.content_type = ctype
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        pad = bytes(_CHUNK)
        sent = 0
        try:
            await resp.write(prefix)
            sent = len(prefix)
            while sent < self.cfg.oversized_bytes:
                k = min(_CHUNK, self.cfg.oversized_bytes - sent)
                await resp.write(pad if k == _CHUNK else pad[:k])
                sent += k
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass  # the client stopped reading: what a size cap does
        return resp

    # ---- internal server
    async def internal(self, request: web.Request) -> web.Response:
        self.internal_hits[request.path] += 1
        item = self.store.by_path(request.path[len("/internal") :])
        if item is None:
            return web.Response(status=404, text="no such item")
        data, ctype = await self._body(item)
        return web.Response(body=data, content_type=ctype, headers={"X-Internal-Service": "secret"})


class _ServerThread:
    """Both servers on their own event loop in a daemon thread."""

    def __init__(self, store: ToyStore, cfg: DemoConfig) -> None:
        self.h = _Handlers(store, cfg)
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="toy-web", daemon=True)
        self.runners: list[web.AppRunner] = []

    async def _start(self) -> tuple[int, int]:
        main = web.Application()
        main.router.add_get("/", self.h.index)
        main.router.add_get("/images/{name}", self.h.image)
        main.router.add_get("/moved/images/{name}", self.h.moved)
        internal = web.Application()
        internal.router.add_get("/internal/images/{name}", self.h.internal)
        ports = []
        for app, port in ((main, self.cfg.port), (internal, self.cfg.internal_port)):
            # handler_cancellation: a hanging ('timeout') handler ends when its client gives up
            runner = web.AppRunner(
                app, access_log=None, shutdown_timeout=0.5, handle_signals=False, handler_cancellation=True
            )
            await runner.setup()
            site = web.TCPSite(runner, self.cfg.host, port, reuse_address=True)
            await site.start()
            self.runners.append(runner)
            ports.append(runner.addresses[0][1])
        return ports[0], ports[1]

    async def _stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        # whatever still runs (a hanging response whose client is still connected) ends now
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def start(self) -> tuple[int, int]:
        self.thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def write_url_list(web_: ToyWeb, path: Path) -> Path:
    """Write the URL list (Parquet: url, caption, fault, color, shape, mismatched) atomically; the
    columns after the caption are carried into the shards, so what each picture shows is known."""
    table = pa.table(
        {
            "url": [web_.url(it) for it in web_.items],
            "caption": [it.caption for it in web_.items],
            "fault": [it.fault for it in web_.items],
            "color": [it.color for it in web_.items],
            "shape": [it.shape for it in web_.items],
            "mismatched": [it.mismatched for it in web_.items],
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


@contextlib.contextmanager
def serve_toy_web(cfg: DemoConfig, out_dir: Path | str, n: int | None = None) -> Iterator[ToyWeb]:
    """Serve the toy web described by ``cfg`` (``n`` items, default ``cfg.n_images``) until the
    block ends, and write its URL list to ``out_dir/toyweb_urls.parquet`` (plus ``toyweb.json``
    with the addresses). Images are drawn on first request; with ``cfg.warm_cache`` a background
    thread draws them all ahead of time. Raises OSError naming the port when it is taken."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = ToyStore(cfg, n)
    srv = _ServerThread(store, cfg)
    try:
        port, internal_port = srv.start()
    except OSError as e:
        raise OSError(
            f"cannot serve the toy web on {cfg.host}:{cfg.port} / {cfg.internal_port}: {e}; "
            "choose a free port (0 = any)"
        ) from e
    host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
    web_ = ToyWeb(
        base_url=f"http://{host}:{port}",
        internal_base_url=f"http://{host}:{internal_port}",
        allow_host=f"{host}:{port}",
        url_list=out / URL_LIST_NAME,
        items=store.items,
        store=store,
        _hits=srv.h.hits,
        _internal_hits=srv.h.internal_hits,
    )
    srv.h.base_url = web_.base_url
    srv.h.internal_base_url = web_.internal_base_url
    stop = threading.Event()
    warmer = None
    try:
        write_url_list(web_, web_.url_list)
        (out / INFO_NAME).write_text(
            json.dumps(
                {
                    "base_url": web_.base_url,
                    "allow_host": web_.allow_host,
                    "internal_base_url": web_.internal_base_url,
                    "url_list": str(web_.url_list),
                    "seed": cfg.seed,
                    "n": len(store.items),
                    "faults": dict(Counter(it.fault for it in store.items)),
                },
                indent=2,
            )
        )
        if cfg.warm_cache:
            warmer = threading.Thread(target=store.warm, args=(stop,), name="toy-web-warm", daemon=True)
            warmer.start()
        yield web_
    finally:
        stop.set()
        if warmer is not None:
            warmer.join(timeout=30)
        srv.stop()


def recorded_ports(out_dir: Path | str) -> tuple[int, int] | None:
    """The (toy web, internal stand-in) ports that the last toy web served from ``out_dir`` recorded
    in its ``toyweb.json``, or None when there is no readable record. Serving on the same ports
    again gives the same URLs, so a rerun's ingest finds them all already seen."""
    from urllib.parse import urlsplit

    try:
        info = json.loads((Path(out_dir) / INFO_NAME).read_text())
        main = urlsplit(info["base_url"]).port
        internal = urlsplit(info["internal_base_url"]).port
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not main or not internal:
        return None
    return int(main), int(internal)


__all__ = ["ToyWeb", "recorded_ports", "serve_toy_web", "write_url_list", "URL_LIST_NAME"]
