"""The ingest stage: URL lists -> raw Parquet shards, incremental and crash-safe.

reader (sources) -> catalog (only unseen URLs) -> per shard: downloader (fetch) -> image
processing (imaging, in a process pool) -> atomic shard writer (shards) -> catalog record.

Crash safety: see catalog.py. A shard's file is renamed into place before its URLs are recorded;
``Catalog.reconcile_raw_shards`` at the start of every run registers a file left unrecorded, and
URLs whose shard never reached its rename are simply fetched again. So a run killed at any moment
and restarted ends with every URL recorded exactly once, in exactly one shard.

The per-shard work (:func:`ingest_shard`) is a plain function of its rows and settings, so it can
run on a Ray cluster (``RAY_ADDRESS``) as well as in this process.

Memory is flat in the number of URLs: a shard's image bytes live only until its file is written.
What comes back to the driver, locally or from a Ray task, is the shard's path, its stats and its
catalog record (url, key, status, error columns: :data:`RECORD_COLUMNS`), which is recorded at once
and dropped; the run keeps only counts and paths. At most two shards are in flight locally.
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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

# The columns of a written shard that the catalog records (Catalog.record_raw_shard): all the
# driver receives of a shard besides its path and stats. Never the image bytes.
RECORD_COLUMNS = ("url", "key", "status", "error_kind", "error_message")

# Called by the runners as each shard is in place: (path, stats, record table).
ShardFn = Callable[[Path, dict, pa.Table], None]


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
    n_listed: int = 0  # unique URLs in the given lists
    n_duplicate_rows: int = 0  # rows repeating a URL listed earlier (the first one is used)
    n_already_seen: int = 0  # skipped: the catalog had them (and retry_failed was off or they succeeded)
    n_fetched: int = 0  # attempted in this run
    n_success: int = 0
    n_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # error_kind -> count, this run
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
                    fut.set_result(
                        ProcessedImage(
                            ok=False,
                            image=None,
                            width=None,
                            height=None,
                            original_width=None,
                            original_height=None,
                            sha256=None,
                            phash=None,
                            error_kind="processing_crashed",
                            error_message=f"image worker failed: {exc!r}",
                        )
                    )
                else:
                    fut.set_result(f.result()[i])

        cf.add_done_callback(done)


async def _fetch_and_process(
    url: str, fetcher: Fetcher, processor: _PoolProcessor
) -> tuple[FetchResult, ProcessedImage | None, int]:
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
        rec = {
            "key": url_key(url or ""),
            "url": url,
            "caption": caption,
            "source": source,
            "ingested_at": now,
            "image": None,
            "width": None,
            "height": None,
            "original_width": None,
            "original_height": None,
            "sha256": None,
            "phash": None,
        }
        if not fr.ok:
            rec.update(status=STATUS_FAILED_DOWNLOAD, error_kind=fr.error_kind, error_message=fr.error_message)
        elif img is None or not img.ok:
            rec.update(
                status=STATUS_FAILED_RESIZE,
                error_kind=img.error_kind if img else "no_body",
                error_message=img.error_message if img else "empty response body",
            )
        else:
            rec.update(
                status=STATUS_SUCCESS,
                error_kind=None,
                error_message=None,
                image=img.image,
                width=img.width,
                height=img.height,
                original_width=img.original_width,
                original_height=img.original_height,
                sha256=img.sha256,
                phash=img.phash,
            )
        out.append(rec)
    return out


def shard_record(table: pa.Table) -> pa.Table:
    """The catalog's columns of a shard table (:data:`RECORD_COLUMNS`): no image bytes."""
    return table.select([c for c in RECORD_COLUMNS if c in table.column_names])


async def _ingest_shard_async(
    rows: pa.Table,
    fetcher: Fetcher,
    processor: _PoolProcessor,
    out_dir: Path,
    shard_id: str,
    on_done: Callable[[], None] | None = None,
) -> tuple[Path, dict, pa.Table]:
    """Fetch, process and write one shard. Returns its path, stats and catalog record
    (:func:`shard_record`); the image bytes are released when this returns."""
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
    del results  # the table holds the images now; one copy of them, not two, during the write
    stats = shard_stats(table, time.perf_counter() - t0, bytes_dl)
    stats["shard_id"] = shard_id
    stats["written_by"] = f"{socket.gethostname()}:{os.getpid()}"  # which node/process (a cluster has many)
    path = await asyncio.to_thread(write_shard, table, out_dir, shard_id, stats)
    return path, stats, shard_record(table)


def ingest_shard(
    rows: pa.Table,
    fetch_settings: FetchSettings,
    image_settings: ImageSettings,
    out_dir: str | os.PathLike,
    shard_id: str,
) -> tuple[Path, dict, pa.Table]:
    """Download, process and write one shard; a plain function of its inputs (runs on Ray too).

    Returns the shard path, its stats and the shard's catalog record (:func:`shard_record`: url,
    key, status and error columns, no image bytes), which the caller records in the catalog.
    """

    async def run():
        async with Fetcher(fetch_settings) as fetcher:
            return await _ingest_shard_async(
                rows, fetcher, _PoolProcessor(None, image_settings), Path(out_dir), shard_id
            )

    return asyncio.run(run())


def _partition(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def _fill_missing_urls(table: pa.Table) -> pa.ChunkedArray:
    """The ``url`` column, where a row without a URL (null or blank) gets a stable placeholder
    naming its list and its row there, ``missing-url:<list>#row<n>``, which the downloader records
    as invalid_url: such a row cannot be fetched but must be recorded, once."""
    url = table.column("url")
    if url.type != pa.string():
        url = url.cast(pa.string())
    missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(url), ""), True)
    if not pc.any(missing).as_py():
        return url
    is_missing = missing.to_numpy(zero_copy_only=False)
    pos = np.flatnonzero(is_missing)
    # each missing row's index among the rows of its own list
    source = pc.fill_null(table.column("source"), "")
    codes = pc.index_in(source, value_set=pc.unique(source)).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(codes, kind="stable")
    rank = np.empty(len(codes), np.int64)
    rank[order] = np.arange(len(codes)) - np.searchsorted(codes[order], codes[order])
    names = source.take(pa.array(pos)).to_pylist()
    fill = [f"missing-url:{src}#row{rank[p]}" for src, p in zip(names, pos)]
    chunks, at, k = [], 0, 0
    for chunk in url.chunks:
        m = is_missing[at : at + len(chunk)]
        n = int(m.sum())
        chunks.append(pc.replace_with_mask(chunk, pa.array(m), pa.array(fill[k : k + n], pa.string())) if n else chunk)
        at, k = at + len(chunk), k + n
    return pa.chunked_array(chunks, pa.string())


def plan(cfg: Config, catalog: Catalog, url_lists: Sequence[str]) -> tuple[pa.Table, int, int]:
    """Read the lists and keep the rows whose URL still needs fetching (first occurrence of each URL).

    Returns (rows to fetch, number of unique URLs listed, number of rows repeating a URL). Columnar
    throughout: no Python object per URL, so a list of millions costs little more than its table.
    """
    ic = cfg.ingest
    table = read_url_lists(
        list(url_lists),
        url_col=ic.url_col,
        caption_col=ic.caption_col,
        input_format=ic.input_format,
        save_additional_columns=ic.save_additional_columns,
    )
    table = table.set_column(table.schema.get_field_index("url"), "url", _fill_missing_urls(table))
    n_rows = table.num_rows
    # the first row of each URL, in list order
    index = pa.array(np.arange(n_rows, dtype=np.int64))
    firsts = (
        pa.table({"url": table.column("url"), "i": index})
        .group_by("url", use_threads=False)
        .aggregate([("i", "min")])
        .column("i_min")
        .to_numpy()
    )
    if len(firsts) < n_rows:
        table = table.take(pa.array(np.sort(firsts)))
    listed = table.num_rows
    keep = catalog.unseen_rows(table.column("url"), retry_failed=ic.retry_failed)
    if len(keep) < listed:
        table = table.take(pa.array(keep))
    return table, listed, n_rows - listed


def ingest(cfg: Config, url_lists: Sequence[str], progress: ProgressFn | None = None, resolver=None) -> IngestResult:
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

        def on_shard(path: Path, stats: dict, record: pa.Table) -> None:
            # record as soon as the file is in place (a crash later loses nothing), then keep
            # only the path and the counts
            catalog.record_raw_shard(path.stem, path, record, stats)
            result.shards.append(path)
            _accumulate(result, stats)

        if todo.num_rows:
            fs = FetchSettings.from_config(cfg.ingest)
            if resolver is None and not os.environ.get("CLIPLINE_INGEST_LOCAL") and ray_address():
                _run_on_ray(cfg, todo, fs, progress, on_shard)
            else:
                asyncio.run(_run_local(cfg, todo, fs, progress, resolver, on_shard))
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


async def _run_local(
    cfg: Config, todo: pa.Table, fs: FetchSettings, progress: ProgressFn | None, resolver, on_shard: ShardFn
) -> None:
    ic = cfg.ingest
    n_proc = ic.processes or (os.cpu_count() or 1)
    total = todo.num_rows
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress and (done % 16 == 0 or done == total):
            progress(done, total)

    # shards are taken in order by two loops: two shards in flight, so the next one's downloads
    # overlap the current one's tail and write. Slices share todo's buffers: nothing is copied.
    parts = iter(enumerate(_partition(todo, ic.shard_size)))
    # spawn, not fork: a forked worker would inherit this process's sockets (an open HTTP
    # connection would then never close) and DuckDB's threads. Workers die with this process.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx, initializer=die_with_parent) as pool:
        processor = _PoolProcessor(pool, ImageSettings.from_config(ic))
        async with Fetcher(fs, resolver=resolver) as fetcher:

            async def shard_loop() -> None:
                for i, rows in parts:
                    path, stats, record = await _ingest_shard_async(
                        rows, fetcher, processor, cfg.raw_dir, new_shard_id(i), tick
                    )
                    on_shard(path, stats, record)

            await asyncio.gather(shard_loop(), shard_loop())


def _run_on_ray(cfg: Config, todo: pa.Table, fs: FetchSettings, progress: ProgressFn | None, on_shard: ShardFn) -> None:
    import ray

    connect_ray()
    remote = ray.remote(ingest_shard)
    isets = ImageSettings.from_config(cfg.ingest)
    # All tasks are submitted at once (an autoscaling cluster sizes itself on the pending ones);
    # each holds only its rows (Ray serialises a slice compactly). A task returns its path, stats
    # and catalog record, never image bytes; the driver records each as it arrives and keeps no
    # reference to it, so the object store frees it.
    pending = [
        remote.remote(p, fs, isets, str(cfg.raw_dir), new_shard_id(i))
        for i, p in enumerate(_partition(todo, cfg.ingest.shard_size))
    ]
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        path, stats, record = ray.get(ready[0])
        on_shard(path, stats, record)
        done += record.num_rows
        if progress:
            progress(done, todo.num_rows)
