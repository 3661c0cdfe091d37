"""The downloader against real HTTP servers on loopback: retries counted on the server side,
Retry-After timing, timeouts and the total deadline, the size cap, truncation, opt-out, redirects,
limits on concurrency and connection reuse."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web

from clipline.components.config import IngestConfig
from clipline.components.ingest.fetch import (
    Fetcher,
    FetchSettings,
    optout_directive,
    parse_retry_after,
)

IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 160  # 40 KB


@asynccontextmanager
async def serve(routes):
    """A real aiohttp server on 127.0.0.1; yields (base_url, allow_entry, log) where log[path]
    lists the monotonic times at which requests for that path arrived."""
    log: dict[str, list[float]] = {}

    @web.middleware
    async def record(request, handler):
        log.setdefault(request.path, []).append(time.monotonic())
        return await handler(request)

    app = web.Application(middlewares=[record])
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", log
    finally:
        await runner.cleanup()


def settings(allow: str, **kw) -> FetchSettings:
    base = dict(
        allow_hosts=(allow,), connect_timeout=2.0, read_timeout=5.0, total_timeout=10.0, retries=2, backoff_base=0.02
    )
    base.update(kw)
    return FetchSettings(**base)


def hits(log, path):
    return len(log.get(path, []))


async def image(request):
    return web.Response(body=IMAGE, content_type="image/jpeg")


def test_settings_from_config():
    cfg = IngestConfig(allow_hosts=["127.0.0.1:9"], retries=5, user_agent="ua/1")
    s = FetchSettings.from_config(cfg, max_bytes=4096)
    assert (s.allow_hosts, s.retries, s.user_agent, s.max_bytes) == (("127.0.0.1:9",), 5, "ua/1", 4096)
    assert s.concurrency == cfg.concurrency and s.total_timeout == cfg.total_timeout


def test_success_returns_body_status_type_and_sends_user_agent():
    seen = {}

    async def ua(request):
        seen["ua"] = request.headers.get("User-Agent")
        return await image(request)

    async def go():
        async with serve([web.get("/a.jpg", ua)]) as (base, allow, log):
            async with Fetcher(settings(allow, user_agent="clipline-test/9 (+mailto:x@y)")) as f:
                r = await f.fetch(base + "/a.jpg")
        assert r.ok and r.body == IMAGE and r.http_status == 200
        assert r.content_type == "image/jpeg" and r.final_url == base + "/a.jpg"
        assert r.error_kind is None and r.attempts == 1 and r.elapsed_s > 0
        assert seen["ua"] == "clipline-test/9 (+mailto:x@y)"

    asyncio.run(go())


@pytest.mark.parametrize("status", [400, 403, 404, 410, 451])
def test_permanent_http_errors_are_fetched_once(status):
    async def err(request):
        return web.Response(status=status, text="no")

    async def go():
        async with serve([web.get("/x", err)]) as (base, allow, log):
            async with Fetcher(settings(allow)) as f:
                r = await f.fetch(base + "/x")
        assert not r.ok and r.error_kind == f"http_{status}" and r.http_status == status
        assert str(status) in r.error_message and base + "/x" in r.error_message
        assert hits(log, "/x") == 1 and r.attempts == 1

    asyncio.run(go())


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_http_errors_are_retried_then_reported(status):
    async def err(request):
        return web.Response(status=status)

    async def go():
        async with serve([web.get("/x", err)]) as (base, allow, log):
            async with Fetcher(settings(allow, retries=2)) as f:
                r = await f.fetch(base + "/x")
        assert r.error_kind == f"http_{status}" and "(3 attempts)" in r.error_message
        assert hits(log, "/x") == 3 and r.attempts == 3

    asyncio.run(go())


def test_503_then_success_and_backoff_grows():
    async def flaky(request):
        return web.Response(status=503) if hits(log_ref[0], "/x") <= 2 else await image(request)

    log_ref = []

    async def go():
        async with serve([web.get("/x", flaky)]) as (base, allow, log):
            log_ref.append(log)
            async with Fetcher(settings(allow, retries=3, backoff_base=0.2)) as f:
                r = await f.fetch(base + "/x")
            t = log["/x"]
        assert r.ok and r.attempts == 3 and len(t) == 3
        # equal-jitter exponential backoff: first wait in [0.1, 0.2], second in [0.2, 0.4]; only the
        # lower ends are asserted (a busy machine stretches any wait; upper bounds are for benchmarks)
        assert t[1] - t[0] >= 0.1 and t[2] - t[1] >= 0.2

    asyncio.run(go())


def test_retry_after_seconds_is_honoured():
    async def limited(request):
        if hits(log_ref[0], "/x") == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return await image(request)

    log_ref = []

    async def go():
        async with serve([web.get("/x", limited)]) as (base, allow, log):
            log_ref.append(log)
            async with Fetcher(settings(allow, backoff_base=0.01)) as f:
                r = await f.fetch(base + "/x")
            t = log["/x"]
        assert r.ok and r.attempts == 2
        assert t[1] - t[0] >= 1.0  # no sooner than the server said

    asyncio.run(go())


def test_retry_after_beyond_max_gives_up_without_hammering():
    async def limited(request):
        return web.Response(status=503, headers={"Retry-After": "120"})

    async def go():
        async with serve([web.get("/x", limited)]) as (base, allow, log):
            async with Fetcher(settings(allow, max_retry_after=60)) as f:
                r = await f.fetch(base + "/x")
        assert r.error_kind == "http_503" and "retry after 120 s" in r.error_message
        # gave up at once: waiting even max_retry_after would take 60 s, so this bound leaves a
        # loaded machine 30 s of slack and still fails a client that waited
        assert hits(log, "/x") == 1 and r.elapsed_s < 30

    asyncio.run(go())


def test_no_retry_that_would_pass_the_deadline():
    async def limited(request):
        return web.Response(status=429, headers={"Retry-After": "120"})

    async def go():
        async with serve([web.get("/x", limited)]) as (base, allow, log):
            async with Fetcher(settings(allow, total_timeout=60.0, max_retry_after=600)) as f:
                r = await f.fetch(base + "/x")
        assert r.error_kind == "http_429" and "would pass the total deadline" in r.error_message
        # gave up at once instead of sleeping until the 60 s deadline (30 s of slack for a loaded machine)
        assert hits(log, "/x") == 1 and r.elapsed_s < 30

    asyncio.run(go())


def test_parse_retry_after_forms():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_retry_after_http_date_is_honoured():
    async def limited(request):
        if hits(log_ref[0], "/x") == 1:
            when = datetime.now(timezone.utc) + timedelta(seconds=2)
            return web.Response(status=503, headers={"Retry-After": format_datetime(when, usegmt=True)})
        return await image(request)

    log_ref = []

    async def go():
        async with serve([web.get("/x", limited)]) as (base, allow, log):
            log_ref.append(log)
            async with Fetcher(settings(allow)) as f:
                r = await f.fetch(base + "/x")
            t = log["/x"]
        assert r.ok and r.attempts == 2
        assert t[1] - t[0] >= 1.0  # the date has 1-second resolution: 2 s ahead means > 1 s

    asyncio.run(go())


def test_connection_refused_is_retried_as_connect_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def go():
        async with Fetcher(settings(f"127.0.0.1:{port}", retries=2)) as f:
            r = await f.fetch(f"http://127.0.0.1:{port}/x.jpg")
        assert r.error_kind == "connect_error" and r.attempts == 3 and r.http_status is None
        assert f"127.0.0.1:{port}" in r.error_message

    asyncio.run(go())


def test_connect_timeout_is_retried_as_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepts: once its backlog is full, new SYNs go unanswered
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)

    async def go():
        async with Fetcher(settings(f"127.0.0.1:{port}", connect_timeout=0.3, retries=1)) as f:
            return await f.fetch(f"http://127.0.0.1:{port}/x.jpg")

    try:
        r = asyncio.run(go())
    finally:
        for c in fillers + [listener]:
            c.close()
    # two 0.3 s connect timeouts, not the 10 s total deadline (that would read deadline_exceeded)
    assert r.error_kind == "timeout" and "connect timeout after 0.3 s" in r.error_message
    assert r.attempts == 2


def test_read_timeout_is_retried_as_timeout():
    async def slow(request):
        await asyncio.sleep(10)
        return await image(request)

    async def go():
        async with serve([web.get("/x", slow)]) as (base, allow, log):
            async with Fetcher(settings(allow, read_timeout=0.3, retries=1)) as f:
                r = await f.fetch(base + "/x")
        # two 0.3 s reads, not the 10 s response nor the total deadline (deadline_exceeded)
        assert r.error_kind == "timeout" and "read timeout" in r.error_message
        assert hits(log, "/x") == 2

    asyncio.run(go())


def test_total_deadline_cuts_a_drip_feeding_server():
    sent = {"bytes": 0}

    async def drip(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = 10_000
        await resp.prepare(request)
        try:
            for _ in range(10_000):  # one byte every 50 ms: each read is quick, the whole is not
                await resp.write(b"x")
                sent["bytes"] += 1
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def go():
        async with serve([web.get("/x", drip)]) as (base, allow, log):
            async with Fetcher(settings(allow, read_timeout=2.0, total_timeout=1.5)) as f:
                t0 = time.monotonic()
                r = await f.fetch(base + "/x")
                took = time.monotonic() - t0
        assert r.error_kind == "deadline_exceeded" and "1.5 s" in r.error_message
        # cut at the deadline: not before it, and long before the drip's 10,000 bytes (100 take >= 5 s)
        assert took >= 1.4 and sent["bytes"] < 100

    asyncio.run(go())


def test_time_queued_behind_the_host_limit_does_not_count_against_the_deadline():
    async def slowish(request):
        await asyncio.sleep(0.1)
        return await image(request)

    async def go():
        async with serve([web.get("/{i}", slowish)]) as (base, allow, log):
            async with Fetcher(settings(allow, per_host_concurrency=1, total_timeout=1.0)) as f:
                return await asyncio.gather(*(f.fetch(f"{base}/{i}") for i in range(15)))

    rs = asyncio.run(go())  # ~1.5 s in the queue for the last one, ~0.1 s downloading each
    # had the queue counted, the last ones would have failed with deadline_exceeded after 1.0 s
    assert [r.error_kind for r in rs] == [None] * 15


def test_declared_oversize_body_refused_from_content_length():
    async def big(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = 50_000_000
        await resp.prepare(request)
        try:
            for _ in range(50):
                await resp.write(b"x" * 1_000_000)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def go():
        async with serve([web.get("/x", big)]) as (base, allow, log):
            async with Fetcher(settings(allow, max_bytes=1_000_000)) as f:
                r = await f.fetch(base + "/x")
        assert r.error_kind == "too_large" and "Content-Length 50000000" in r.error_message
        assert hits(log, "/x") == 1

    asyncio.run(go())


def test_undeclared_oversize_body_cut_while_streaming():
    state = {"sent": 0, "finished": False}

    async def big(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})  # chunked, no length
        await resp.prepare(request)
        try:
            for _ in range(800):  # 800 x 64 KB = 50 MB offered
                await resp.write(b"x" * 65536)
                state["sent"] += 65536
                await asyncio.sleep(0)
            await resp.write_eof()
            state["finished"] = True
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def go():
        async with serve([web.get("/x", big)]) as (base, allow, log):
            async with Fetcher(settings(allow, max_bytes=1_000_000)) as f:
                r = await f.fetch(base + "/x")
            await asyncio.sleep(0.2)
        assert r.error_kind == "too_large" and "while streaming" in r.error_message
        assert r.body is None and not state["finished"] and state["sent"] < 20_000_000
        assert hits(log, "/x") == 1

    asyncio.run(go())


def test_gzip_bomb_is_cut_by_decompressed_size():
    import gzip

    bomb = gzip.compress(b"\0" * 20_000_000, compresslevel=6)  # ~20 KB on the wire

    async def gz(request):
        return web.Response(body=bomb, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})

    async def go():
        async with serve([web.get("/x", gz)]) as (base, allow, log):
            async with Fetcher(settings(allow, max_bytes=1_000_000)) as f:
                return await f.fetch(base + "/x")

    r = asyncio.run(go())
    assert len(bomb) < 1_000_000
    assert r.error_kind == "too_large" and r.body is None


async def _raw_server(payload: bytes):
    """A raw TCP server that writes ``payload`` then closes: for malformed responses."""
    count = {"n": 0}

    async def handle(reader, writer):
        count["n"] += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], count


def test_body_shorter_than_content_length_is_truncated():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 40000\r\n\r\n"

    async def go():
        server, port, count = await _raw_server(head + IMAGE[:15000])
        async with server:
            async with Fetcher(settings(f"127.0.0.1:{port}", retries=1)) as f:
                r = await f.fetch(f"http://127.0.0.1:{port}/t.jpg")
        assert r.error_kind == "truncated" and "40000" in r.error_message and r.body is None
        assert count["n"] == 2  # a connection dropped mid-body is worth one more try

    asyncio.run(go())


def test_malformed_response_is_reported_not_raised():
    async def go():
        server, port, count = await _raw_server(b"this is not HTTP at all\r\n\r\n")
        async with server:
            async with Fetcher(settings(f"127.0.0.1:{port}", retries=0)) as f:
                r = await f.fetch(f"http://127.0.0.1:{port}/t.jpg")
        assert not r.ok and r.error_kind in {"bad_response", "connect_error"} and r.error_message

    asyncio.run(go())


@pytest.mark.parametrize(
    "header, refused",
    [
        ("noai", True),
        ("noimageai", True),
        ("noindex, noimageai", True),
        ("otherbot: noai", True),
        ("googlebot: noindex, noai", True),
        ("NoAI", True),
        ("noindex, nofollow", False),
        ("unavailable_after: 25 Jun 2030 15:00:00 PST", False),
    ],
)
def test_opt_out_header(header, refused):
    async def tagged(request):
        return web.Response(body=IMAGE, content_type="image/jpeg", headers={"X-Robots-Tag": header})

    async def go():
        async with serve([web.get("/x", tagged)]) as (base, allow, log):
            async with Fetcher(settings(allow)) as f:
                r = await f.fetch(base + "/x")
            async with Fetcher(settings(allow, respect_optout=False)) as f:
                r_ignored = await f.fetch(base + "/x")
        if refused:
            assert r.error_kind == "opted_out" and r.body is None and "X-Robots-Tag" in r.error_message
        else:
            assert r.ok
        assert r_ignored.ok and r_ignored.body == IMAGE

    asyncio.run(go())


def test_optout_directive_reads_repeated_headers():
    from multidict import CIMultiDict, CIMultiDictProxy

    h = CIMultiDictProxy(CIMultiDict([("X-Robots-Tag", "noindex"), ("x-robots-tag", "bingbot: noimageai")]))
    assert optout_directive(h) == "noimageai"
    assert optout_directive({"Content-Type": "image/png"}) is None


def test_redirects_followed_and_limited():
    async def hop(request):
        n = int(request.match_info["n"])
        if n == 0:
            return await image(request)
        raise web.HTTPMovedPermanently(f"/hop/{n - 1}")

    async def loop(request):
        raise web.HTTPFound("/loop")

    async def go():
        async with serve([web.get("/hop/{n}", hop), web.get("/loop", loop)]) as (base, allow, log):
            async with Fetcher(settings(allow, max_redirects=3)) as f:
                ok = await f.fetch(base + "/hop/3")
                too_many = await f.fetch(base + "/hop/4")
                looping = await f.fetch(base + "/loop")
        assert ok.ok and ok.body == IMAGE and ok.final_url == base + "/hop/0" and ok.attempts == 4
        assert too_many.error_kind == "too_many_redirects" and "more than 3 redirects" in too_many.error_message
        assert looping.error_kind == "too_many_redirects" and hits(log, "/loop") == 4

    asyncio.run(go())


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.jpg",
        "not a url",
        "http://",
        "/relative/a.jpg",
        "http://example.com:99999/a.jpg",
        "javascript:alert(1)",
        "",
    ],
)
def test_invalid_urls(url):
    async def go():
        async with Fetcher(FetchSettings()) as f:
            return await f.fetch(url)

    r = asyncio.run(go())
    assert r.error_kind == "invalid_url" and r.attempts == 0 and r.error_message


def test_redirect_to_non_http_scheme_is_invalid():
    async def to_file(request):
        raise web.HTTPFound("file:///etc/passwd")

    async def go():
        async with serve([web.get("/x", to_file)]) as (base, allow, log):
            async with Fetcher(settings(allow)) as f:
                return await f.fetch(base + "/x")

    r = asyncio.run(go())
    assert r.error_kind == "invalid_url" and "file:///etc/passwd" in r.error_message


def test_concurrency_limits_per_host_and_global():
    state = {"now": 0, "peak": 0}

    async def slow(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return await image(request)

    async def go():
        async with serve([web.get("/{i}", slow)]) as (base_a, allow_a, _):
            async with serve([web.get("/{i}", slow)]) as (base_b, allow_b, _):
                s = FetchSettings(allow_hosts=(allow_a, allow_b), concurrency=5, per_host_concurrency=3)
                async with Fetcher(s) as f:
                    only_a = await asyncio.gather(*(f.fetch(f"{base_a}/{i}") for i in range(20)))
                    peak_a = state["peak"]
                    state["peak"] = 0
                    both = await asyncio.gather(*(f.fetch(f"{b}/{i}") for i in range(20) for b in (base_a, base_b)))
        assert all(r.ok for r in only_a + both)
        assert peak_a == 3  # per-host limit reached, never passed
        assert state["peak"] == 5  # global limit reached, never passed

    asyncio.run(go())


def test_connections_are_reused():
    peers = set()

    async def who(request):
        peers.add(request.transport.get_extra_info("peername"))
        return await image(request)

    async def go():
        async with serve([web.get("/{i}", who)]) as (base, allow, log):
            async with Fetcher(settings(allow, per_host_concurrency=4, concurrency=4)) as f:
                rs = await asyncio.gather(*(f.fetch(f"{base}/{i}") for i in range(200)))
        assert all(r.ok for r in rs)
        assert len(peers) <= 4  # 200 downloads over at most 4 kept-alive connections

    asyncio.run(go())


def test_a_mixed_batch_never_raises():
    async def err(request):
        return web.Response(status=int(request.match_info["code"]))

    async def go():
        async with serve([web.get("/ok/{i}", image), web.get("/e/{code}", err)]) as (base, allow, log):
            urls = [f"{base}/ok/{i}" for i in range(30)] + [f"{base}/e/{c}" for c in (404, 500, 410)]
            urls += ["ftp://x/y", "http://10.0.0.1/a.jpg", "%%%", f"{base.replace('127.0.0.1', '[::1]')}/ok/1"]
            async with Fetcher(settings(allow, retries=1)) as f:
                rs = await asyncio.gather(*(f.fetch(u) for u in urls))
        kinds = [r.error_kind for r in rs]
        assert kinds[:30] == [None] * 30
        assert kinds[30:] == [
            "http_404",
            "http_500",
            "http_410",
            "invalid_url",
            "ssrf_blocked",
            "invalid_url",
            "ssrf_blocked",
        ]
        assert all(r.url == u for r, u in zip(rs, urls))

    asyncio.run(go())
