"""SSRF guard: every forbidden address class is refused on the address a name resolves to, before
any connection, on IP literals, and on every redirect hop. Only loopback ever receives packets:
names are mapped to the other classes by a test resolver, and a Python audit hook records every
socket.connect() so the tests can assert none went anywhere else."""

from __future__ import annotations

import asyncio
import socket
import sys
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from clipline.components.ingest.fetch import Fetcher, FetchSettings
from clipline.components.ingest.ssrf import AllowList, GuardedResolver, SsrfBlocked, forbidden_class

# ---- observing real connections -----------------------------------------------------------------
_connects: list | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


sys.addaudithook(_audit)


@pytest.fixture
def connects():
    """Addresses passed to socket.connect() during the test."""
    global _connects
    _connects = []
    yield _connects
    _connects = None


class MapResolver(AbstractResolver):
    """A resolver answering from a dict name -> [addresses] (no DNS traffic at all)."""

    def __init__(self, mapping: dict[str, list[str]]) -> None:
        self.mapping = mapping
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.mapping:
            raise OSError(f"test resolver has no address for {host}")
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for a in self.mapping[host]
        ]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def serve(routes):
    """A real aiohttp server on 127.0.0.1; yields (port, hits) where hits counts requests."""
    hits = {"n": 0}

    @web.middleware
    async def count(request, handler):
        hits["n"] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], hits
    finally:
        await runner.cleanup()


async def _image(request):
    return web.Response(body=b"\xff\xd8" + b"x" * 1000, content_type="image/jpeg")


def _settings(*allow: str, **kw) -> FetchSettings:
    return FetchSettings(allow_hosts=allow, connect_timeout=1.0, total_timeout=5.0, retries=1, backoff_base=0.01, **kw)


# ---- address classification ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private (RFC 1918)"),
        ("172.16.5.4", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped IPv6 (loopback)"),
        ("::ffff:169.254.169.254", "IPv4-mapped IPv6 (link-local"),
        ("::ffff:10.1.2.3", "IPv4-mapped IPv6 (private"),
        ("64:ff9b::10.0.0.1", "NAT64-embedded IPv4 (private"),
        ("2002:a9fe:a9fe::1", "6to4-embedded IPv4 (link-local"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo-embedded IPv4 (private"),
        ("192.0.2.10", "special-purpose"),
        ("198.18.0.1", "special-purpose"),
    ],
)
def test_forbidden_address_classes(address, expected):
    assert expected in (forbidden_class(address) or "public")


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]
)
def test_public_addresses_pass(address):
    assert forbidden_class(address) is None


@pytest.mark.parametrize("entry", ["127.0.0.1", "::1:80", "host:0", "host:70000", ":80", "host:http"])
def test_allow_list_rejects_malformed_entries(entry):
    with pytest.raises(ValueError, match="HOST:PORT"):
        AllowList.parse([entry])
    with pytest.raises(ValueError, match="HOST:PORT"):
        FetchSettings(allow_hosts=(entry,))


def test_guarded_resolver_filters_and_refuses():
    async def go():
        inner = MapResolver({"mixed.test": ["10.0.0.7", "93.184.216.34"], "meta.test": ["169.254.169.254"]})
        guard = GuardedResolver(AllowList(), inner)
        kept = await guard.resolve("mixed.test", 80)
        assert [r["host"] for r in kept] == ["93.184.216.34"]
        with pytest.raises(SsrfBlocked, match=r"169\.254\.169\.254 \(link-local.*which meta\.test resolves to"):
            await guard.resolve("meta.test", 80)

    asyncio.run(go())


# ---- through the real fetcher ---------------------------------------------------------------------
FORBIDDEN = {
    "metadata.test": ("169.254.169.254", "link-local"),
    "rfc1918.test": ("10.1.2.3", "private (RFC 1918)"),
    "rfc1918b.test": ("192.168.0.10", "private (RFC 1918)"),
    "cgnat.test": ("100.64.12.34", "carrier-grade NAT"),
    "multicast.test": ("239.1.2.3", "multicast"),
    "zero.test": ("0.0.0.0", "unspecified"),
    "reserved.test": ("240.1.1.1", "reserved"),
    "loop6.test": ("::1", "loopback"),
    "linklocal6.test": ("fe80::1", "link-local"),
    "ula.test": ("fd00::5", "unique-local"),
    "mapped.test": ("::ffff:127.0.0.1", "IPv4-mapped IPv6"),
    "mapped-meta.test": ("::ffff:169.254.169.254", "IPv4-mapped IPv6 (link-local"),
}


def test_each_forbidden_class_refused_on_resolved_address_before_connecting(connects):
    async def go():
        resolver = MapResolver({name: [addr] for name, (addr, _) in FORBIDDEN.items()})
        async with Fetcher(_settings(), resolver=resolver) as f:
            results = await asyncio.gather(*(f.fetch(f"http://{n}/img.jpg") for n in FORBIDDEN))
        for name, r in zip(FORBIDDEN, results):
            addr, cls = FORBIDDEN[name]
            assert r.error_kind == "ssrf_blocked", (name, r)
            assert cls in r.error_message and name in r.error_message
            assert r.attempts == 1  # refused: not retried
        assert sorted(resolver.asked) == sorted(FORBIDDEN)  # the names really were resolved

    asyncio.run(go())
    assert connects == []  # refused before any socket.connect()


def test_hostname_resolving_to_loopback_is_refused_and_server_never_contacted(connects):
    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (port, hits):
            resolver = MapResolver({"rebind.test": ["127.0.0.1"]})
            async with Fetcher(_settings(), resolver=resolver) as f:
                r = await f.fetch(f"http://rebind.test:{port}/img.jpg")
            assert r.error_kind == "ssrf_blocked" and "loopback" in r.error_message
            assert "rebind.test resolves to" in r.error_message
            assert hits["n"] == 0
            # allowing that exact name and port (or the address it resolves to) lets it through
            for allow in (f"rebind.test:{port}", f"127.0.0.1:{port}"):
                async with Fetcher(_settings(allow), resolver=resolver) as f:
                    r = await f.fetch(f"http://rebind.test:{port}/img.jpg")
                assert r.ok, r
            assert hits["n"] == 2
            return port

    port = asyncio.run(go())
    assert all(a[0] == "127.0.0.1" and a[1] == port for a in connects)
    assert len(connects) == 2


def test_ip_literals_need_an_exact_host_and_port_allowance(connects):
    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (port, hits):
            url = f"http://127.0.0.1:{port}/img.jpg"
            async with Fetcher(_settings()) as f:
                blocked = await f.fetch(url)
            async with Fetcher(_settings(f"127.0.0.1:{port + 1}", f"localhost:{port}")) as f:
                other_port = await f.fetch(url)
            async with Fetcher(_settings(f"127.0.0.1:{port}")) as f:
                allowed = await f.fetch(url)
                mapped = await f.fetch(f"http://[::ffff:127.0.0.1]:{port}/img.jpg")
            assert blocked.error_kind == other_port.error_kind == "ssrf_blocked"
            assert "127.0.0.1 (loopback address)" in blocked.error_message
            assert allowed.ok and allowed.body.startswith(b"\xff\xd8")
            # the allowance is for 127.0.0.1, not for the IPv4-mapped spelling of it
            assert mapped.error_kind == "ssrf_blocked" and "IPv4-mapped IPv6 (loopback)" in mapped.error_message
            assert hits["n"] == 1

    asyncio.run(go())
    assert len(connects) == 1


def test_ip_literal_classes_refused_without_resolving(connects):
    urls = [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://100.100.100.200/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://0.0.0.0:8080/",
        "http://224.0.0.1/",
    ]

    async def go():
        resolver = MapResolver({})
        async with Fetcher(_settings(), resolver=resolver) as f:
            results = await asyncio.gather(*(f.fetch(u) for u in urls))
        assert [r.error_kind for r in results] == ["ssrf_blocked"] * len(urls)
        assert resolver.asked == []

    asyncio.run(go())
    assert connects == []


def test_redirects_are_checked_on_every_hop(connects):
    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (internal_port, internal_hits):
            targets = {
                "internal": f"http://127.0.0.1:{internal_port}/img.jpg",
                "internal-by-name": f"http://intranet.test:{internal_port}/img.jpg",
                "metadata": "http://169.254.169.254/latest/meta-data/iam",
                "metadata-by-name": "http://metadata.test/latest",
                "mapped": f"http://[::ffff:127.0.0.1]:{internal_port}/img.jpg",
                "allowed": "/img.jpg",
            }

            async def redirect(request):
                raise web.HTTPFound(targets[request.match_info["name"]])

            routes = [web.get("/go/{name}", redirect), web.get("/img.jpg", _image)]
            async with serve(routes) as (public_port, public_hits):
                resolver = MapResolver({"intranet.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]})
                async with Fetcher(_settings(f"127.0.0.1:{public_port}"), resolver=resolver) as f:
                    results = {n: await f.fetch(f"http://127.0.0.1:{public_port}/go/{n}") for n in targets}
                for name, r in results.items():
                    if name == "allowed":
                        assert r.ok and r.final_url.endswith("/img.jpg")
                        continue
                    assert r.error_kind == "ssrf_blocked", (name, r)
                    assert r.http_status == 302 and r.final_url != r.url
                assert "loopback" in results["internal"].error_message
                assert "link-local" in results["metadata-by-name"].error_message
                assert internal_hits["n"] == 0
                assert public_hits["n"] == len(targets) + 1
                return public_port

    public_port = asyncio.run(go())
    assert {a[1] for a in connects} == {public_port}


def test_mixed_dns_answer_connects_only_to_permitted_address(connects):
    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (port, hits):
            resolver = MapResolver({"cdn.test": ["10.9.9.9", "169.254.169.254", "127.0.0.1"]})
            async with Fetcher(_settings(f"127.0.0.1:{port}"), resolver=resolver) as f:
                r = await f.fetch(f"http://cdn.test:{port}/img.jpg")
            assert r.ok, r
            assert hits["n"] == 1

    asyncio.run(go())
    assert [a[0] for a in connects] == ["127.0.0.1"]


def test_guard_can_be_switched_off_explicitly():
    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (port, _):
            async with Fetcher(_settings(ssrf_guard=False)) as f:
                r = await f.fetch(f"http://127.0.0.1:{port}/img.jpg")
            assert r.ok

    asyncio.run(go())


def test_rebinding_name_is_checked_on_every_answer(connects):
    """A name that first answers an allowed address and then a forbidden one is refused the
    second time: the check is on each answer the connector would use, not on a first lookup."""

    class Rebinding(MapResolver):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            self.mapping[host] = ["127.0.0.1"] if not self.asked else ["10.0.0.1"]
            return await super().resolve(host, port, family)

    async def go():
        async with serve([web.get("/img.jpg", _image)]) as (port, hits):
            resolver = Rebinding({})
            results = []
            for _ in range(2):  # fresh Fetchers, so the DNS cache cannot hide the second answer
                async with Fetcher(_settings(f"127.0.0.1:{port}"), resolver=resolver) as f:
                    results.append(await f.fetch(f"http://rebinding.test:{port}/img.jpg"))
            assert results[0].ok
            assert results[1].error_kind == "ssrf_blocked" and "10.0.0.1 (private" in results[1].error_message
            assert hits["n"] == 1 and len(resolver.asked) == 2

    asyncio.run(go())
    assert [a[0] for a in connects] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://0/",
        "HTTP://LOCALHOST/",
    ],
)
def test_legacy_numeric_and_odd_spellings_never_connect(url, connects):
    async def go():
        async with Fetcher(_settings()) as f:
            return await f.fetch(url)

    r = asyncio.run(go())
    assert r.error_kind in {"ssrf_blocked", "invalid_url"} and r.attempts <= 1
    assert connects == []
