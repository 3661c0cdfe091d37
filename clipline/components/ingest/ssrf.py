"""SSRF guard: which network addresses a download may connect to.

The guard refuses, by default, every destination that is not a public unicast address:
loopback, private (RFC 1918), link-local (169.254.0.0/16 with the cloud metadata address
169.254.169.254, fe80::/10), carrier-grade NAT (100.64.0.0/10), multicast, unspecified, reserved
and other special-purpose ranges, unique-local IPv6 (fc00::/7), and IPv6 addresses that embed an
IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo)
when the embedded IPv4 address is itself refused.

It is applied where it cannot be bypassed:

* :class:`GuardedResolver` wraps the DNS resolver that aiohttp's connector uses, so every address
  a hostname resolves to is checked *before* any connection is made, and the connector only ever
  sees (and connects to, and caches) addresses that passed. A DNS-rebinding name that answers a
  public address first and a private one later is checked on each answer.
* :func:`check_ip_literal` covers URLs whose host is an IP literal (aiohttp connects to those
  without asking the resolver).

The fetcher calls both on the first URL and again on every redirect hop.

``HOST:PORT`` entries in an :class:`AllowList` are exempt (exact host, exact port); the demo
allows only its own server this way.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class SsrfBlocked(OSError):
    """A destination refused by the SSRF guard. ``str()`` names the address and its class.

    Subclasses :class:`OSError` so that, raised inside the resolver, aiohttp wraps it in a
    ``ClientConnectorDNSError`` (available as ``.os_error``) instead of losing it.
    """

    def __init__(self, host: str, address: str, address_class: str) -> None:
        self.host = host
        self.address = address
        self.address_class = address_class
        via = f", which {host} resolves to" if host.strip("[]") != address else ""
        super().__init__(
            f"the SSRF guard refused {address} ({address_class} address){via}; "
            "allow a trusted server explicitly with --allow-host HOST:PORT"
        )

    def __str__(self) -> str:  # OSError's str() would prepend errno noise
        return self.args[0]

    def __reduce__(self):  # keep it picklable across process pools
        return (SsrfBlocked, (self.host, self.address, self.address_class))


def forbidden_class(address: str | IPAddress) -> str | None:
    """The class name of a forbidden address (for example ``"loopback"``), or None if the address
    is public unicast and may be connected to. Raises ValueError for a string that is not an IP
    address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (zone-indexed) IPv6"
        mapped = ip.ipv4_mapped
        if mapped is not None:
            inner = forbidden_class(mapped)
            return f"IPv4-mapped IPv6 ({inner})" if inner else None
        if ip in _NAT64:
            inner = forbidden_class(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64-embedded IPv4 ({inner})" if inner else None
        if ip in _NAT64_LOCAL:
            return "local-use NAT64 (RFC 8215)"
        if ip.sixtofour is not None:
            inner = forbidden_class(ip.sixtofour)
            return f"6to4-embedded IPv4 ({inner})" if inner else None
        if ip.teredo is not None:
            server, client = ip.teredo
            inner = forbidden_class(client) or forbidden_class(server)
            return f"Teredo-embedded IPv4 ({inner})" if inner else None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata range)" if ip.version == 4 else "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4:
        if ip in _CGNAT:
            return "carrier-grade NAT (RFC 6598)"
        if any(ip in n for n in _RFC1918):
            return "private (RFC 1918)"
    elif ip in _UNIQUE_LOCAL:
        return "unique-local IPv6 (fc00::/7)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "special-purpose (non-global)"
    return None


def _norm_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class AllowList:
    """Exact ``(host, port)`` pairs exempt from the guard, parsed from ``"HOST:PORT"`` strings
    (IPv6 as ``"[::1]:8080"``). A pair matches the URL's host as written or, for a hostname, the
    address it resolved to."""

    entries: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def parse(cls, items: Iterable[str]) -> AllowList:
        """Parse ``HOST:PORT`` strings; raises ValueError naming a malformed entry."""
        out: set[tuple[str, int]] = set()
        for raw in items:
            item = raw.strip()
            host, sep, port = item.rpartition(":")
            if (
                not sep
                or not host
                or not port.isdigit()
                or not 0 < int(port) < 65536
                or (":" in host and not (host.startswith("[") and host.endswith("]")))
            ):
                raise ValueError(
                    f"allow_hosts entry {raw!r} is not HOST:PORT (for example 127.0.0.1:8123 or [::1]:8123)"
                )
            out.add((_norm_host(host), int(port)))
        return cls(frozenset(out))

    def allows(self, host: str, port: int | None) -> bool:
        return bool(self.entries) and port is not None and (_norm_host(host), port) in self.entries


def check_ip_literal(host: str, port: int | None, allow: AllowList) -> None:
    """Raise :class:`SsrfBlocked` if ``host`` is an IP literal of a forbidden class and
    ``(host, port)`` is not allowed. Hostnames pass (the resolver checks what they resolve to)."""
    h = _norm_host(host)
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return
    cls = forbidden_class(ip)
    if cls and not allow.allows(h, port):
        raise SsrfBlocked(host, str(ip), cls)


class GuardedResolver(AbstractResolver):
    """Wraps another resolver; returns only the resolved addresses the guard permits.

    Addresses of a forbidden class are removed from the answer unless ``(host, port)`` or
    ``(address, port)`` is in the allow list; when none is left, :class:`SsrfBlocked` is raised,
    naming the first refused address and its class. The connector therefore never connects to,
    or caches, a refused address.
    """

    def __init__(self, allow: AllowList, inner: AbstractResolver | None = None) -> None:
        self._allow = allow
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow.allows(host, port):
            return results
        kept: list[ResolveResult] = []
        first_refusal: SsrfBlocked | None = None
        for r in results:
            addr = r["host"]
            try:
                cls = forbidden_class(addr)
            except ValueError:
                cls = "unparseable"
            if cls is None or self._allow.allows(addr, port):
                kept.append(r)
            elif first_refusal is None:
                first_refusal = SsrfBlocked(host, addr, cls)
        if not kept:
            if first_refusal is None:
                raise OSError(f"{host} resolved to no address")
            raise first_refusal
        return kept

    async def close(self) -> None:
        await self._inner.close()
