"""The ingest stage: URL lists -> raw Parquet shards, incremental and crash-safe.

reader (sources) -> catalog (only unseen URLs) -> per shard: downloader (fetch) -> image
processing (imaging, in a process pool) -> atomic shard writer (shards) -> catalog record.

Crash safety: see catalog.py. A shard's file is renamed into place before its URLs are recorded;
``Catalog.reconcile_raw_shards`` at the start of every run registers a file left unrecorded, and
URLs whose shard never reached its rename are simply fetched again. So a run killed at any moment
and restarted ends with every URL recorded exactly once, in exactly one shard.

The per-shard work (:func:`ingest_shard`) is a plain function of its rows and settings, so it can
run on a Ray cluster (``RAY_ADDRESS``) as well as in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing as mp
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from clipline.components.catalog import Catalog
from clipline.components.cluster import connect_ray, ray_address
from clipline.components.config import Config
from clipline.components.ingest.fetch import Fetcher, FetchResult, FetchSettings
from clipline.components.ingest.imaging import ImageSettings, ProcessedImage, process_batch
from clipline.components.ingest.schema import (
    STATUS_FAILED_DOWNLOAD,
    STATUS_FAILED_RESIZE,
    STATUS_SUCCESS,
)
from clipline.components.ingest.shards import build_shard_table, shard_stats, write_shard
from clipline.components.ingest.sources import read_url_lists
from clipline.components.ingest.worker import die_with_parent

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

# Images are sent to the process pool in small batches: one pickle round trip per batch.
_BATCH = 16


def url_key(url: str) -> str:
    """The sample key of a URL: stable across runs and snapshots (first 16 hex of its SHA-1)."""
    return hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def new_shard_id(index: int) -> str:
    """Time-ordered, unique shard ids: ``20261127T153000-1a2b3c4d-00003``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:8]}-{index:05d}"


@dataclass
class IngestResult:
    """What one ingest run did. ``shards`` are the raw shard files written by this run."""

    shards: list[Path] = field(default_factory=list)
    n_listed: int = 0            # unique URLs in the given lists
    n_duplicate_rows: int = 0    # rows repeating a URL listed earlier (the first one is used)
    n_already_seen: int = 0      # skipped: the catalog had them (and retry_failed was off or they succeeded)
    n_fetched: int = 0           # attempted in this run
    n_success: int = 0
    n_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)   # error_kind -> count, this run
    bytes_downloaded: int = 0
    duration_s: float = 0.0
    recovered: dict[str, int] = field(default_factory=dict)  # from reconcile after a crash

    @property
    def images_per_s(self) -> float:
        return self.n_fetched / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def new_work(self) -> bool:
        return self.n_fetched > 0


class _PoolProcessor:
    """Sends downloaded bytes to a process pool in small batches; awaits results in order."""

    def __init__(self, executor: Executor | None, settings: ImageSettings):
        self.executor = executor
        self.settings = settings
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._warned = False

    async def __call__(self, data: bytes) -> ProcessedImage:
        loop = asyncio.get_running_loop()
        if self.executor is None:
            return process_batch([data], self.settings)[0]
        fut: asyncio.Future = loop.create_future()
        self._pending.append((data, fut))
        if len(self._pending) >= _BATCH:
            self._flush()
        elif self._flush_handle is None:
            # a short wait gathers a batch; never longer than this, so the tail is not delayed
            self._flush_handle = loop.call_later(0.005, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        try:
            cf = loop.run_in_executor(self.executor, process_batch, [d for d, _ in batch], self.settings)
        except Exception as e:  # a broken pool (a worker died): process here rather than lose the rows
            if not self._warned:
                log.warning("image worker pool unusable (%s); processing images in the main process", e)
                self._warned = True
            for (data, fut), img in zip(batch, process_batch([d for d, _ in batch], self.settings)):
                if not fut.done():
                    fut.set_result(img)
            return

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            for i, (_, fut) in enumerate(batch):
                if fut.done():
                    continue
                if exc is not None:
                    fut.set_result(ProcessedImage(ok=False, image=None, width=None, height=None,
                                                  original_width=None, original_height=None, sha256=None,
                                                  phash=None, error_kind="processing_crashed",
                                                  error_message=f"image worker failed: {exc!r}"))
                else:
                    fut.set_result(f.result()[i])

        cf.add_done_callback(done)


async def _fetch_and_process(url: str, fetcher: Fetcher,
                             processor: _PoolProcessor) -> tuple[FetchResult, ProcessedImage | None, int]:
    res = await fetcher.fetch(url)
    if not res.ok or res.body is None:
        return res, None, 0
    nbytes = len(res.body)
    img = await processor(res.body)
    res.body = None  # the raw download is no longer needed; keep memory flat
    return res, img, nbytes


def _rows_from_results(rows: pa.Table, results: Sequence[tuple[FetchResult, ProcessedImage | None, int]]) -> list[dict]:
    now = datetime.now(timezone.utc)
    urls = rows.column("url").to_pylist()
    captions = rows.column("caption").to_pylist() if "caption" in rows.column_names else [None] * len(urls)
    sources = rows.column("source").to_pylist() if "source" in rows.column_names else [None] * len(urls)
    out = []
    for url, caption, source, (fr, img, _) in zip(urls, captions, sources, results):
        rec = {"key": url_key(url or ""), "url": url, "caption": caption, "source": source, "ingested_at": now,
               "image": None, "width": None, "height": None, "original_width": None, "original_height": None,
               "sha256": None, "phash": None}
        if not fr.ok:
            rec.update(status=STATUS_FAILED_DOWNLOAD, error_kind=fr.error_kind, error_message=fr.error_message)
        elif img is None or not img.ok:
            rec.update(status=STATUS_FAILED_RESIZE,
                       error_kind=img.error_kind if img else "no_body",
                       error_message=img.error_message if img else "empty response body")
        else:
            rec.update(status=STATUS_SUCCESS, error_kind=None, error_message=None, image=img.image,
                       width=img.width, height=img.height, original_width=img.original_width,
                       original_height=img.original_height, sha256=img.sha256, phash=img.phash)
        out.append(rec)
    return out


async def _ingest_shard_async(rows: pa.Table, fetcher: Fetcher, processor: _PoolProcessor,
                              out_dir: Path, shard_id: str,
                              on_done: Callable[[], None] | None = None) -> tuple[Path, dict, pa.Table]:
    t0 = time.perf_counter()

    async def one(u: str):
        r = await _fetch_and_process(u, fetcher, processor)
        if on_done:
            on_done()
        return r

    results = await asyncio.gather(*(one(u) for u in rows.column("url").to_pylist()))
    bytes_dl = sum(n for _, _, n in results)
    carried_names = [c for c in rows.column_names if c not in ("url", "caption", "source")]
    table = build_shard_table(_rows_from_results(rows, results), rows.select(carried_names) if carried_names else None)
    stats = shard_stats(table, time.perf_counter() - t0, bytes_dl)
    stats["shard_id"] = shard_id
    stats["written_by"] = f"{socket.gethostname()}:{os.getpid()}"  # which node/process (a cluster has many)
    path = await asyncio.to_thread(write_shard, table, out_dir, shard_id, stats)
    return path, stats, table


def ingest_shard(rows: pa.Table, fetch_settings: FetchSettings, image_settings: ImageSettings,
                 out_dir: str | os.PathLike, shard_id: str) -> tuple[Path, dict, pa.Table]:
    """Download, process and write one shard; a plain function of its inputs (runs on Ray too).

    Returns the shard path, its stats and the written table (the caller records it in the catalog).
    """

    async def run():
        async with Fetcher(fetch_settings) as fetcher:
            return await _ingest_shard_async(rows, fetcher, _PoolProcessor(None, image_settings), Path(out_dir), shard_id)

    return asyncio.run(run())


def _partition(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def plan(cfg: Config, catalog: Catalog, url_lists: Sequence[str]) -> tuple[pa.Table, int, int]:
    """Read the lists and keep the rows whose URL still needs fetching (first occurrence of each URL).

    Returns (rows to fetch, number of unique URLs listed, number of rows repeating a URL).
    """
    ic = cfg.ingest
    table = read_url_lists(list(url_lists), url_col=ic.url_col, caption_col=ic.caption_col,
                           input_format=ic.input_format, save_additional_columns=ic.save_additional_columns)
    # A row without a URL cannot be fetched but must be recorded, once: it gets a stable
    # placeholder naming its list and row, which the downloader records as invalid_url.
    per_source: Counter = Counter()
    urls = []
    sources = table.column("source").to_pylist()
    for u, src in zip(table.column("url").to_pylist(), sources):
        n = per_source[src]
        per_source[src] += 1
        urls.append(u if u and u.strip() else f"missing-url:{src}#row{n}")
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
    first: dict[str, int] = {}
    for i, u in enumerate(urls):
        first.setdefault(u, i)
    table = table.take(pa.array(sorted(first.values()), pa.int64()))
    n_dup = len(urls) - table.num_rows
    listed = table.num_rows
    todo = set(catalog.unseen_urls(table.column("url").to_pylist(), retry_failed=ic.retry_failed))
    keep = [i for i, u in enumerate(table.column("url").to_pylist()) if u in todo]
    table = table.take(pa.array(keep, pa.int64()))
    return table, listed, n_dup


def ingest(cfg: Config, url_lists: Sequence[str], progress: ProgressFn | None = None,
           resolver=None) -> IngestResult:
    """Run the ingest stage over ``url_lists`` into ``cfg.raw_dir``, recording all in the catalog.

    Only URLs the catalog has not seen are fetched (with ``cfg.ingest.retry_failed``, past failures
    too). ``progress(done, total)`` is called as URLs finish. ``resolver`` replaces DNS resolution
    (tests). With ``RAY_ADDRESS`` set, shards run as Ray tasks on that cluster.
    """
    t0 = time.perf_counter()
    cfg.raw_dir.mkdir(parents=True, exist_ok=True)
    result = IngestResult()
    with Catalog(cfg.catalog_path) as catalog:
        result.recovered = catalog.reconcile_raw_shards(cfg.raw_dir)
        todo, result.n_listed, result.n_duplicate_rows = plan(cfg, catalog, url_lists)
        result.n_already_seen = result.n_listed - todo.num_rows
        result.n_fetched = todo.num_rows
        if todo.num_rows:
            fs = FetchSettings.from_config(cfg.ingest)
            if resolver is None and not os.environ.get("CLIPLINE_INGEST_LOCAL") and ray_address():
                outs = _run_on_ray(cfg, todo, fs, progress)
            else:
                outs = asyncio.run(_run_local(cfg, todo, fs, progress, resolver, catalog))
            for path, stats, table in outs:
                if not catalog.has_shard(path.stem):
                    catalog.record_raw_shard(path.stem, path, table, stats)
                result.shards.append(path)
                _accumulate(result, stats)
    result.duration_s = time.perf_counter() - t0
    return result


def _accumulate(result: IngestResult, stats: dict) -> None:
    by_status = stats.get("status_counts", {})
    result.n_success += int(by_status.get(STATUS_SUCCESS, 0))
    result.n_failed += sum(int(v) for k, v in by_status.items() if k != STATUS_SUCCESS)
    result.bytes_downloaded += int(stats.get("bytes_downloaded", 0))
    c = Counter(result.failures)
    c.update({k: int(v) for k, v in stats.get("error_kind_counts", {}).items()})
    result.failures = dict(c.most_common())


async def _run_local(cfg: Config, todo: pa.Table, fs: FetchSettings, progress: ProgressFn | None,
                     resolver, catalog: Catalog) -> list[tuple[Path, dict, pa.Table]]:
    ic = cfg.ingest
    n_proc = ic.processes or (os.cpu_count() or 1)
    total = todo.num_rows
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress and (done % 16 == 0 or done == total):
            progress(done, total)

    outs: list[tuple[Path, dict, pa.Table]] = []
    parts = _partition(todo, ic.shard_size)
    # two shards in flight: the next one's downloads overlap the current one's tail and write
    gate = asyncio.Semaphore(2)
    # spawn, not fork: a forked worker would inherit this process's sockets (an open HTTP
    # connection would then never close) and DuckDB's threads. Workers die with this process.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx, initializer=die_with_parent) as pool:
        processor = _PoolProcessor(pool, ImageSettings.from_config(ic))
        async with Fetcher(fs, resolver=resolver) as fetcher:

            async def run_part(i: int, rows: pa.Table):
                async with gate:
                    out = await _ingest_shard_async(rows, fetcher, processor, cfg.raw_dir, new_shard_id(i), tick)
                # record as soon as the file is in place: a crash later loses nothing
                path, stats, table = out
                catalog.record_raw_shard(path.stem, path, table, stats)
                return out

            outs = await asyncio.gather(*(run_part(i, p) for i, p in enumerate(parts)))
    return list(outs)


def _run_on_ray(cfg: Config, todo: pa.Table, fs: FetchSettings, progress: ProgressFn | None):
    import ray

    connect_ray()
    remote = ray.remote(ingest_shard)
    isets = ImageSettings.from_config(cfg.ingest)
    parts = _partition(todo, cfg.ingest.shard_size)
    refs = [remote.remote(p, fs, isets, str(cfg.raw_dir), new_shard_id(i)) for i, p in enumerate(parts)]
    outs, done = [], 0
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out = ray.get(ready[0])
        outs.append(out)
        done += out[2].num_rows
        if progress:
            progress(done, todo.num_rows)
    return outs
