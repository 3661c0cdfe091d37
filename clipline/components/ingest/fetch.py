"""The asynchronous downloader: one aiohttp session, many concurrent downloads, each one bounded.

Usage (one shard of URLs)::

    async with Fetcher(FetchSettings.from_config(cfg.ingest)) as f:
        results = await asyncio.gather(*(f.fetch(u) for u in urls))

Guarantees of :meth:`Fetcher.fetch`:

* it never raises for a problem with one URL; it returns a :class:`FetchResult` whose
  ``error_kind`` is one of :data:`ERROR_KINDS` (``http_<code>`` for an HTTP status) and whose
  ``error_message`` says what happened to which URL;
* at most ``concurrency`` downloads are in flight, and at most ``per_host_concurrency`` per
  host:port; connections are kept alive and reused, DNS answers cached;
* transient failures (connection errors, timeouts, truncated bodies, HTTP 429/500/502/503/504) are
  retried up to ``retries`` times with exponential backoff and jitter; ``Retry-After`` (seconds
  or HTTP date) on 429/503 is honoured: the retry is never sent sooner than the server asked, and
  the download gives up if the server asks for more than ``max_retry_after``; other 4xx (404, 403,
  410, ...) are never retried; no retry is started that would pass the total deadline;
* every request has a connect timeout and a read timeout (between bytes), and the whole download
  (all attempts, redirects and waits) has a total deadline, ``total_timeout``, counted from the
  moment its first request gets a slot (time queued behind the concurrency limits is not counted);
* a body larger than ``max_bytes`` is refused from its Content-Length before reading, or cut as
  soon as the bytes read pass the limit; a body shorter than its Content-Length is ``truncated``;
* ``X-Robots-Tag: noai`` / ``noimageai`` (also addressed to any bot, ``somebot: noai``) refuses
  the image (``opted_out``) when ``respect_optout`` is on;
* redirects are followed here, not by aiohttp, up to ``max_redirects``; every hop is checked by
  the SSRF guard (:mod:`clipline.components.ingest.ssrf`), which also checks each resolved address
  before the connector may connect to it.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDictProxy
from yarl import URL

from clipline.components.ingest.ssrf import AllowList, GuardedResolver, SsrfBlocked, check_ip_literal

ERROR_KINDS = (
    "invalid_url",
    "ssrf_blocked",
    "dns_error",
    "connect_error",
    "timeout",
    "http_<code>",
    "bad_response",
    "too_large",
    "truncated",
    "opted_out",
    "too_many_redirects",
    "deadline_exceeded",
    "unexpected_error",
)
"""Every ``FetchResult.error_kind`` value (``http_<code>`` stands for ``http_404`` etc.)."""

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai"})
_SPLIT_DIRECTIVES = re.compile(r"[,;\s]+")
_UNCHECKED = object()
_SMALL_BODY = 64 * 1024  # error/redirect bodies up to this size are drained to keep the connection


@dataclass(frozen=True)
class FetchSettings:
    """Every download knob. Defaults equal :class:`clipline.components.config.IngestConfig`'s."""

    concurrency: int = 128
    per_host_concurrency: int = 64
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    retries: int = 2
    backoff_base: float = 0.5
    max_retry_after: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    user_agent: str = "clipline/0.1 (+https://github.com/clipline/clipline; image-text dataset research)"
    respect_optout: bool = True
    allow_hosts: tuple[str, ...] = ()
    ssrf_guard: bool = True
    dns_cache_ttl: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        AllowList.parse(self.allow_hosts)  # fail early, naming a malformed entry

    @classmethod
    def from_config(cls, ingest: Any, **overrides: Any) -> FetchSettings:
        """Build from an ``IngestConfig`` (``cfg.ingest``); keyword overrides win."""
        names = cls.__dataclass_fields__.keys()
        values = {n: getattr(ingest, n) for n in names if hasattr(ingest, n)}
        values.update(overrides)
        return cls(**values)


@dataclass(slots=True)
class FetchResult:
    """The outcome of one download. ``ok`` implies ``body`` is the complete response body.

    ``http_status``/``content_type`` are those of the last response received (also on failure);
    ``final_url`` is the last URL requested (after redirects); ``attempts`` counts requests sent
    (retries and redirect hops); ``elapsed_s`` runs from the first request slot to the result.
    """

    url: str
    ok: bool
    body: bytes | None
    http_status: int | None
    content_type: str | None
    final_url: str | None
    error_kind: str | None
    error_message: str | None
    attempts: int
    elapsed_s: float


@dataclass(slots=True)
class _Failure:
    """One failed attempt. ``transient`` failures may be retried; ``retry_after`` in seconds."""

    kind: str
    message: str
    transient: bool = False
    retry_after: float | None = None


@dataclass(slots=True)
class _Progress:
    attempts: int = 0
    retries_used: int = 0
    redirects: int = 0
    started: float | None = None
    current: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    last_failure: _Failure | None = field(default=None)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date); None if absent
    or unreadable. A date in the past gives 0."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def optout_directive(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> str | None:
    """The first ``noai``/``noimageai`` directive found in the ``X-Robots-Tag`` header(s), whether
    bare or addressed to a bot (``otherbot: noai``), else None."""
    getall = getattr(headers, "getall", None)
    values = getall("X-Robots-Tag", ()) if getall else [v for k, v in headers.items() if k.lower() == "x-robots-tag"]
    for value in values:
        for token in _SPLIT_DIRECTIVES.split(value.lower()):
            token = token.rsplit(":", 1)[-1]
            if token in OPTOUT_DIRECTIVES:
                return token
    return None


def _parse_url(url: str) -> URL | str:
    """A yarl URL for an absolute http(s) URL, else the reason (a string) it is invalid."""
    try:
        u = URL(url.strip())
        host = u.host
        u.port  # noqa: B018 - raises ValueError for an invalid port
    except (ValueError, TypeError) as exc:
        return f"malformed URL ({exc})"
    if u.scheme not in ("http", "https"):
        return f"scheme {u.scheme!r} is not http or https" if u.scheme else "not an absolute URL"
    if not host:
        return "no host in URL"
    return u


class Fetcher:
    """Owns one aiohttp ``ClientSession``; use as ``async with Fetcher(settings) as f``.

    ``resolver`` replaces the system DNS resolver (tests map names to addresses with it); the SSRF
    guard wraps it unless ``settings.ssrf_guard`` is off.
    """

    def __init__(self, settings: FetchSettings, resolver: AbstractResolver | None = None) -> None:
        self.settings = settings
        self._allow = AllowList.parse(settings.allow_hosts)
        self._inner_resolver = resolver
        self._own_resolver: AbstractResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._global: asyncio.Semaphore | None = None
        self._per_host: dict[tuple[str, int | None], asyncio.Semaphore] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._literal_checked: dict[tuple[str, int | None], object] = {}  # (host, port) -> refusal

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        inner = self._inner_resolver
        if inner is None:
            inner = self._own_resolver = DefaultResolver()
        resolver = GuardedResolver(self._allow, inner) if s.ssrf_guard else inner
        connector = aiohttp.TCPConnector(
            limit=s.concurrency,
            limit_per_host=s.per_host_concurrency,
            resolver=resolver,
            use_dns_cache=True,
            ttl_dns_cache=max(1, int(s.dns_cache_ttl)),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout),
            headers={
                "User-Agent": s.user_agent,
                "Accept": "image/avif,image/webp,image/*,*/*;q=0.8",
                "Accept-Encoding": "identity",
            },
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._global = asyncio.Semaphore(s.concurrency)
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_resolver is not None:
            await self._own_resolver.close()
            self._own_resolver = None

    def _host_semaphore(self, u: URL) -> asyncio.Semaphore:
        key = (u.host or "", u.port)
        sem = self._per_host.get(key)
        if sem is None:
            sem = self._per_host[key] = asyncio.Semaphore(self.settings.per_host_concurrency)
        return sem

    async def fetch(self, url: str) -> FetchResult:
        """Download ``url``; see the module docstring for what is guaranteed. Never raises for a
        per-URL problem (only ``asyncio.CancelledError`` passes through)."""
        if self._session is None:
            raise RuntimeError("use Fetcher as 'async with Fetcher(settings) as f'")
        loop = self._loop
        assert loop is not None
        p = _Progress()
        cm = asyncio.timeout(None)  # armed by _download once the first request slot is held
        try:
            async with cm:
                res = await self._download(url, p, cm)
        except TimeoutError as exc:
            if cm.expired():
                where = f" (at redirect {p.current})" if p.redirects else ""
                last = f"; last failure: {p.last_failure.message}" if p.last_failure else ""
                res = self._fail(
                    url,
                    p,
                    "deadline_exceeded",
                    f"{url}: gave up after the total deadline of {self.settings.total_timeout:g} s "
                    f"({p.attempts} attempt(s)){where}{last}",
                )
            else:
                res = self._fail(url, p, "unexpected_error", f"{url}: unexpected timeout: {exc!r}")
        except Exception as exc:  # a bug or an aiohttp surprise must not sink the shard
            res = self._fail(url, p, "unexpected_error", f"{url}: unexpected {type(exc).__name__}: {exc}")
        res.elapsed_s = loop.time() - p.started if p.started is not None else 0.0
        return res

    @staticmethod
    def _fail(url: str, p: _Progress, kind: str, message: str) -> FetchResult:
        """A failed result; ``http_status``/``content_type`` are those of the last response."""
        return FetchResult(
            url=url,
            ok=False,
            body=None,
            http_status=p.http_status,
            content_type=p.content_type,
            final_url=p.current,
            error_kind=kind,
            error_message=message,
            attempts=p.attempts,
            elapsed_s=0.0,
        )

    async def _download(self, url: str, p: _Progress, cm: asyncio.Timeout) -> FetchResult:
        s = self.settings
        loop = self._loop
        assert loop is not None and self._global is not None
        parsed = _parse_url(url)
        if isinstance(parsed, str):
            return self._fail(url, p, "invalid_url", f"{url!r}: {parsed}")
        current = parsed
        while True:
            p.current = str(current)
            if s.ssrf_guard:
                key = (current.host or "", current.port)
                refusal = self._literal_checked.get(key, _UNCHECKED)
                if refusal is _UNCHECKED:
                    try:
                        check_ip_literal(key[0], key[1], self._allow)
                        refusal = None
                    except SsrfBlocked as exc:
                        refusal = str(exc)
                    if len(self._literal_checked) < 65536:
                        self._literal_checked[key] = refusal
                if refusal is not None:
                    return self._fail(url, p, "ssrf_blocked", f"{p.current}: {refusal}")
            async with self._host_semaphore(current):
                async with self._global:
                    if p.started is None:  # the clock starts when the download does, not in the queue
                        p.started = loop.time()
                        cm.reschedule(p.started + s.total_timeout)
                    p.attempts += 1
                    outcome = await self._attempt(url, current, p)
            if isinstance(outcome, FetchResult):
                return outcome
            if isinstance(outcome, URL):  # a redirect
                p.redirects += 1
                if p.redirects > s.max_redirects:
                    return self._fail(
                        url,
                        p,
                        "too_many_redirects",
                        f"{url}: more than {s.max_redirects} redirects (next: {outcome})",
                    )
                current = outcome
                continue
            # a failed attempt
            f = outcome
            p.last_failure = f
            if not f.transient or p.retries_used >= s.retries:
                tries = f" ({p.attempts} attempts)" if p.attempts > 1 and f.transient else ""
                return self._fail(url, p, f.kind, f.message + tries)
            if f.retry_after is not None:
                if f.retry_after > s.max_retry_after:
                    return self._fail(
                        url,
                        p,
                        f.kind,
                        f"{f.message}; the server asked to retry after {f.retry_after:g} s, more "
                        f"than max_retry_after={s.max_retry_after:g} s, so gave up",
                    )
                delay = f.retry_after
            else:
                step = s.backoff_base * (2**p.retries_used)
                delay = step / 2 + random.random() * step / 2  # "equal jitter"
            if loop.time() + delay >= p.started + s.total_timeout:
                return self._fail(
                    url,
                    p,
                    f.kind,
                    f"{f.message}; no retry: waiting {delay:.2g} s would pass the total deadline "
                    f"of {s.total_timeout:g} s",
                )
            p.retries_used += 1
            if delay > 0:
                await asyncio.sleep(delay)

    async def _attempt(self, url: str, current: URL, p: _Progress) -> FetchResult | URL | _Failure:
        """One request (no retry): a final result, a redirect target, or a failure."""
        s = self.settings
        session = self._session
        assert session is not None
        here = str(current)
        try:
            resp = await session.request("GET", current, allow_redirects=False)
        except aiohttp.ClientConnectorDNSError as exc:
            os_err = exc.os_error
            if isinstance(os_err, SsrfBlocked):
                return _Failure("ssrf_blocked", f"{here}: {os_err}")
            again = isinstance(os_err, socket.gaierror) and os_err.errno == socket.EAI_AGAIN
            return _Failure("dns_error", f"{here}: cannot resolve {current.host} ({os_err})", again)
        except aiohttp.ClientSSLError as exc:
            return _Failure("connect_error", f"{here}: TLS failure ({exc})")
        except aiohttp.InvalidURL as exc:
            return _Failure("invalid_url", f"{here}: invalid URL ({exc})")
        except aiohttp.ClientConnectorError as exc:
            return _Failure("connect_error", f"{here}: cannot connect ({exc.os_error})", True)
        except TimeoutError as exc:  # aiohttp's connect/read timeouts (the deadline cancels instead)
            what = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "read"
            limit = s.connect_timeout if what == "connect" else s.read_timeout
            return _Failure("timeout", f"{here}: {what} timeout after {limit:g} s", True)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as exc:
            return _Failure("connect_error", f"{here}: connection failed ({exc or type(exc).__name__})", True)
        except aiohttp.ClientResponseError as exc:
            return _Failure("bad_response", f"{here}: malformed HTTP response ({exc.message})")
        except aiohttp.ClientError as exc:
            return _Failure("connect_error", f"{here}: {type(exc).__name__}: {exc}", True)

        try:
            status = resp.status
            p.http_status = status
            ctype = resp.headers.get("Content-Type")
            p.content_type = ctype
            if status in REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                await self._drain(resp)
                if not location:
                    return _Failure(f"http_{status}", f"{here}: HTTP {status} redirect without Location")
                try:
                    target = current.join(URL(location))
                except (ValueError, TypeError) as exc:
                    return _Failure("invalid_url", f"{here}: redirect to malformed Location {location!r} ({exc})")
                if target.scheme not in ("http", "https") or not target.host:
                    return _Failure("invalid_url", f"{here}: redirect to non-http(s) URL {location!r}")
                return target
            if not 200 <= status < 300:
                retry_after = None
                if status in RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                await self._drain(resp)
                return _Failure(
                    f"http_{status}",
                    f"{here}: HTTP {status} {resp.reason or ''}".rstrip(),
                    status in TRANSIENT_STATUSES,
                    retry_after,
                )
            if s.respect_optout:
                directive = optout_directive(resp.headers)
                if directive:
                    resp.close()
                    return self._fail(
                        url, p, "opted_out", f"{here}: the site opted out of AI use (X-Robots-Tag: {directive})"
                    )
            return await self._read_body(url, here, resp, p)
        finally:
            resp.release()

    async def _read_body(
        self, url: str, here: str, resp: aiohttp.ClientResponse, p: _Progress
    ) -> FetchResult | _Failure:
        max_bytes = self.settings.max_bytes
        length = resp.content_length
        identity = resp.headers.get("Content-Encoding", "identity").lower() in ("identity", "")
        status, ctype = resp.status, p.content_type
        if length is not None and length > max_bytes:
            resp.close()
            return self._fail(
                url, p, "too_large", f"{here}: Content-Length {length} bytes exceeds max_bytes={max_bytes}"
            )
        try:
            if length is not None and identity:
                # the parser stops at Content-Length, so this read is bounded by max_bytes
                body = await resp.read()
            else:
                chunks: list[bytes] = []
                total = 0
                async for chunk in resp.content.iter_any():
                    total += len(chunk)
                    if total > max_bytes:
                        resp.close()
                        return self._fail(
                            url, p, "too_large", f"{here}: body passed max_bytes={max_bytes} while streaming; cut"
                        )
                    chunks.append(chunk)
                body = b"".join(chunks)
        except aiohttp.ClientPayloadError as exc:
            short = f"before its Content-Length of {length} bytes" if length is not None else "early"
            return _Failure("truncated", f"{here}: the body ended {short} ({exc})", True)
        except TimeoutError:
            return _Failure(
                "timeout", f"{here}: read timeout after {self.settings.read_timeout:g} s while receiving the body", True
            )
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            return _Failure("truncated", f"{here}: connection lost while receiving the body ({exc})", True)
        if length is not None and identity and len(body) < length:
            return _Failure("truncated", f"{here}: got {len(body)} of {length} bytes", True)
        return FetchResult(
            url=url,
            ok=True,
            body=body,
            http_status=status,
            content_type=ctype,
            final_url=here,
            error_kind=None,
            error_message=None,
            attempts=p.attempts,
            elapsed_s=0.0,
        )

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read a small redirect/error body so the connection can be reused; close otherwise."""
        length = resp.content_length
        if length is not None and length <= _SMALL_BODY:
            try:
                await resp.read()
                return
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                pass
        resp.close()
