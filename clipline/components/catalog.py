"""The DuckDB catalog: the single source of truth for incremental work.

It records which URLs have been seen and with what outcome, which raw shards exist and are
complete, which snapshots exist and their lineage, and named locks (one refresh at a time).

Consistency rule for crash safety: a raw shard's Parquet file is written to a temporary name and
renamed into place *before* its rows are recorded here, in one transaction. A crash between the two
leaves a complete file the catalog does not know; :meth:`Catalog.reconcile_raw_shards` (called at
the start of every ingest) registers such files from their own contents, so every URL ends up
recorded exactly once. Temporary files are never registered and are removed.

Only one process opens the catalog read-write at a time (DuckDB's rule); distributed workers
return results to the driver, which records them.

**Rebuildable.** Everything in the catalog but its locks is also in the data dir, so losing the
catalog loses no data: :func:`rebuild_catalog` (`clipline catalog rebuild`) replays the raw shard
files oldest first (shard ids start with their UTC time), so each URL gets its newest outcome and
one attempt per shard that holds it, then records every complete snapshot (a snapshot directory
is complete once its ``manifest.json`` is in place and every file it lists exists) with its
parent and source shards, re-registering external shards its manifest names where they still
exist.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS urls (
    url            VARCHAR PRIMARY KEY,
    key            VARCHAR,
    status         VARCHAR NOT NULL,      -- success | failed
    error_kind     VARCHAR,
    error_message  VARCHAR,
    shard_id       VARCHAR,
    attempts       INTEGER NOT NULL DEFAULT 1,
    first_seen     TIMESTAMPTZ NOT NULL,
    last_attempt   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS shards (
    shard_id     VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,        -- raw | external
    path         VARCHAR NOT NULL,
    n_rows       BIGINT NOT NULL,
    n_success    BIGINT NOT NULL,
    complete     BOOLEAN NOT NULL,
    stats        JSON,
    created_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id  VARCHAR PRIMARY KEY,
    parent_id    VARCHAR,
    path         VARCHAR NOT NULL,
    n_rows       BIGINT NOT NULL,
    manifest     JSON NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot_sources (
    snapshot_id  VARCHAR NOT NULL,
    shard_id     VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    name         VARCHAR PRIMARY KEY,
    holder       VARCHAR NOT NULL,
    pid          INTEGER NOT NULL,
    host         VARCHAR NOT NULL,
    acquired_at  TIMESTAMPTZ NOT NULL
);
"""

TMP_SUFFIX = ".tmp"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LockHeld(RuntimeError):
    """Another process holds the named lock."""


@dataclass(frozen=True)
class ShardRecord:
    shard_id: str
    kind: str
    path: str
    n_rows: int
    n_success: int
    complete: bool
    stats: dict
    created_at: datetime


class Catalog:
    """A DuckDB file (``<state-dir>/catalog.duckdb``; the state dir defaults to the data dir) with the
    tables in SCHEMA_SQL."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            raise RuntimeError(
                f"cannot open the catalog {self.path}: {e}. Another clipline process may be using "
                "this catalog; wait for it or use another --data-dir (or --state-dir)."
            ) from e
        if not read_only:
            self.con.execute(SCHEMA_SQL)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        else:
            self.con.execute("COMMIT")

    # ------------------------------------------------------------------ URLs
    def unseen_urls(self, urls: Sequence[str], retry_failed: bool = False) -> list[str]:
        """The URLs of ``urls`` (order kept, duplicates removed) that still need fetching.

        A URL needs fetching if the catalog has never recorded it, or (with ``retry_failed``) if
        its last outcome was a failure.
        """
        if not urls:
            return []
        unique = list(dict.fromkeys(urls))
        return [unique[i] for i in self.unseen_rows(pa.array(unique, pa.string()), retry_failed)]

    def unseen_rows(self, urls: pa.Array | pa.ChunkedArray, retry_failed: bool = False) -> np.ndarray:
        """Positions in ``urls`` (ascending) of the URLs that still need fetching, as in
        :meth:`unseen_urls`. Columnar from end to end, so a list of millions of URLs costs little
        more than its strings."""
        if len(urls) == 0:
            return np.empty(0, np.int64)
        tbl = pa.table({"url": urls, "i": pa.array(np.arange(len(urls), dtype=np.int64))})
        self.con.register("_candidates", tbl)
        try:
            cond = "u.url IS NULL" + (" OR u.status <> 'success'" if retry_failed else "")
            rows = self.con.execute(
                f"""SELECT c.i FROM _candidates c LEFT JOIN urls u ON c.url = u.url
                    WHERE {cond} ORDER BY c.i"""
            ).fetchnumpy()["i"]
        finally:
            self.con.unregister("_candidates")
        return np.asarray(rows, dtype=np.int64)

    def url_counts(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT status, count(*) FROM urls GROUP BY status").fetchall())

    def failure_counts(self) -> dict[str, int]:
        return dict(
            self.con.execute(
                "SELECT coalesce(error_kind, 'unknown'), count(*) FROM urls WHERE status <> 'success' "
                "GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
        )

    # ---------------------------------------------------------------- shards
    def record_raw_shard(
        self,
        shard_id: str,
        path: str | os.PathLike,
        table: pa.Table,
        stats: dict,
        kind: str = "raw",
        at: datetime | None = None,
    ) -> None:
        """Record a complete shard file and every URL in it, in one transaction.

        ``table`` must have columns url, key, status, error_message; ``error_kind`` is read from
        the column of that name when present. A URL already recorded (a retry of a failure) is
        updated to its newest outcome. ``at``: when the shard was written (default: now).
        """
        cols = {
            "url": table.column("url"),
            "key": table.column("key"),
            "status": table.column("status"),
            "error_message": table.column("error_message"),
        }
        cols["error_kind"] = (
            table.column("error_kind") if "error_kind" in table.column_names else pa.nulls(table.num_rows, pa.string())
        )
        rows = pa.table(cols)
        n_success = int(pa.compute.sum(pa.compute.equal(rows["status"], "success")).as_py() or 0)
        now = at or _now()
        with self.transaction() as con:
            con.register("_rows", rows)
            try:
                con.execute(
                    """INSERT INTO urls AS u (url, key, status, error_kind, error_message, shard_id,
                                         attempts, first_seen, last_attempt)
                       SELECT url, key, status, error_kind, error_message, ?, 1, ?, ? FROM
                         (SELECT *, row_number() OVER (PARTITION BY url) AS rn FROM _rows) WHERE rn = 1
                       ON CONFLICT (url) DO UPDATE SET
                         key = excluded.key, status = excluded.status, error_kind = excluded.error_kind,
                         error_message = excluded.error_message, shard_id = excluded.shard_id,
                         attempts = u.attempts + 1, last_attempt = excluded.last_attempt""",
                    [shard_id, now, now],
                )
            finally:
                con.unregister("_rows")
            con.execute(
                """INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, TRUE, ?, ?)""",
                [shard_id, kind, str(path), rows.num_rows, n_success, json.dumps(stats, default=str), now],
            )

    def shards(self, kind: str | None = "raw", complete_only: bool = True) -> list[ShardRecord]:
        q = "SELECT shard_id, kind, path, n_rows, n_success, complete, stats, created_at FROM shards WHERE 1=1"
        params: list = []
        if kind:
            q += " AND kind = ?"
            params.append(kind)
        if complete_only:
            q += " AND complete"
        q += " ORDER BY created_at, shard_id"
        return [
            ShardRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])
            for r in self.con.execute(q, params).fetchall()
        ]

    def has_shard(self, shard_id: str) -> bool:
        return self.con.execute("SELECT count(*) FROM shards WHERE shard_id = ?", [shard_id]).fetchone()[0] > 0

    def register_external_shard(self, path: str | os.PathLike) -> int:
        """Register a Parquet shard written by another tool (img2dataset's Parquet writer uses the
        same column names). Returns its row count. Rows without ``status`` count as success."""
        path = Path(path)
        table = pq.read_table(path)
        n = table.num_rows
        need = {"url", "key"}
        missing = need - set(table.column_names)
        if missing:
            raise ValueError(f"{path} is not a shard clipline can read: it lacks column(s) {sorted(missing)}")
        if "status" not in table.column_names:
            table = table.append_column("status", pa.array(["success"] * n))
        if "error_message" not in table.column_names:
            table = table.append_column("error_message", pa.nulls(n, pa.string()))
        table = table.set_column(table.schema.get_field_index("key"), "key", table.column("key").cast(pa.string()))
        self.record_raw_shard(f"external:{path.resolve()}", path, table, {"source": "external"}, kind="external")
        return n

    def reconcile_raw_shards(self, raw_dir: str | os.PathLike) -> dict[str, int]:
        """Make the catalog agree with the files in ``raw_dir`` after a crash.

        Removes leftover temporary files, and registers complete shard files the catalog does not
        know yet (written, renamed, then killed before recording). Returns counts of each.
        """
        raw_dir = Path(raw_dir)
        out = {"tmp_removed": 0, "registered": 0}
        if not raw_dir.exists():
            return out
        for tmp in raw_dir.glob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            out["tmp_removed"] += 1
        known = {r.path for r in self.shards(kind="raw", complete_only=False)}
        for f in sorted(raw_dir.glob("*.parquet")):
            if str(f) in known:
                continue
            table = pq.read_table(f, columns=None)
            stats_path = f.with_suffix(".stats.json")
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"recovered": True}
            self.record_raw_shard(f.stem, f, table, stats)
            out["registered"] += 1
        return out

    # ------------------------------------------------------------- snapshots
    def record_snapshot(
        self,
        snapshot_id: str,
        parent_id: str | None,
        path: str | os.PathLike,
        n_rows: int,
        manifest: dict,
        source_shards: Iterable[str],
        created_at: datetime | None = None,
    ) -> None:
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                [snapshot_id, parent_id, str(path), n_rows, json.dumps(manifest, default=str), created_at or _now()],
            )
            con.execute("DELETE FROM snapshot_sources WHERE snapshot_id = ?", [snapshot_id])
            for s in source_shards:
                con.execute("INSERT INTO snapshot_sources VALUES (?, ?)", [snapshot_id, s])

    def latest_snapshot(self) -> dict | None:
        r = self.con.execute(
            "SELECT snapshot_id, parent_id, path, n_rows, manifest FROM snapshots ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
        return (
            None
            if r is None
            else {"snapshot_id": r[0], "parent_id": r[1], "path": r[2], "n_rows": r[3], "manifest": json.loads(r[4])}
        )

    def get_snapshot(self, snapshot_id: str) -> dict:
        r = self.con.execute(
            "SELECT snapshot_id, parent_id, path, n_rows, manifest FROM snapshots WHERE snapshot_id = ?",
            [snapshot_id],
        ).fetchone()
        if r is None:
            known = [x[0] for x in self.con.execute("SELECT snapshot_id FROM snapshots").fetchall()]
            raise KeyError(
                f"no snapshot {snapshot_id!r} in the catalog; known: {known or 'none (run clipline curate)'}"
            )
        return {"snapshot_id": r[0], "parent_id": r[1], "path": r[2], "n_rows": r[3], "manifest": json.loads(r[4])}

    def snapshot_source_shards(self, snapshot_id: str) -> list[str]:
        return [
            r[0]
            for r in self.con.execute(
                "SELECT shard_id FROM snapshot_sources WHERE snapshot_id = ? ORDER BY shard_id", [snapshot_id]
            ).fetchall()
        ]

    # ----------------------------------------------------------------- locks
    def acquire_lock(self, name: str, holder: str) -> None:
        """Take the named lock or raise LockHeld. A lock whose holder process on this host no
        longer exists is stale and is taken over."""
        with self.transaction() as con:
            r = con.execute("SELECT holder, pid, host, acquired_at FROM locks WHERE name = ?", [name]).fetchone()
            if r is not None:
                holder0, pid, host, at = r
                if not (host == socket.gethostname() and not _pid_alive(pid)):
                    raise LockHeld(
                        f"lock {name!r} is held by {holder0} (pid {pid} on {host}, since {at}); wait for it to finish"
                    )
                con.execute("DELETE FROM locks WHERE name = ?", [name])
            con.execute(
                "INSERT INTO locks VALUES (?, ?, ?, ?, ?)", [name, holder, os.getpid(), socket.gethostname(), _now()]
            )

    def release_lock(self, name: str) -> None:
        self.con.execute("DELETE FROM locks WHERE name = ? AND pid = ?", [name, os.getpid()])

    @contextmanager
    def lock(self, name: str, holder: str) -> Iterator[None]:
        self.acquire_lock(name, holder)
        try:
            yield
        finally:
            self.release_lock(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ rebuild
SHARD_COLUMNS = ("url", "key", "status", "error_message", "error_kind")


class CatalogExists(FileExistsError):
    """A rebuild would replace a catalog that exists; the caller did not ask for that."""


@dataclass
class Rebuilt:
    """What :func:`rebuild_catalog` recorded, and what it left out with why."""

    path: Path
    backup: Path | None  # the catalog it replaced, kept beside it (None: there was none)
    raw_shards: int
    external_shards: int
    urls: int
    failed_urls: int
    snapshots: int
    left_out: dict[str, str]  # file or shard -> why it is not in the rebuilt catalog


def shard_time(shard_id: str) -> datetime | None:
    """When a raw shard was written, from its id (``20261127T153000-...``); None if not such an id."""
    try:
        return datetime.strptime(shard_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _when(value: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def rebuild_catalog(
    catalog_path: str | os.PathLike, raw_dir: str | os.PathLike, snapshots_dir: str | os.PathLike, replace: bool = False
) -> Rebuilt:
    """Rebuild the catalog from the raw shard files in ``raw_dir`` and the snapshots in
    ``snapshots_dir`` (see the module docstring). It is built beside the catalog and moved into
    place when complete; an existing catalog is replaced only with ``replace``, and kept as
    ``<name>.bak-<UTC time>``. Locks are not rebuilt (no run holds the data dir meanwhile: the
    caller makes sure)."""
    catalog_path, raw_dir, snapshots_dir = Path(catalog_path), Path(raw_dir), Path(snapshots_dir)
    if catalog_path.exists() and not replace:
        raise CatalogExists(
            f"the catalog {catalog_path} exists: rebuild it only if it is lost or damaged, with --force "
            f"(the current one is kept beside it as {catalog_path.name}.bak-<time>)"
        )
    tmp = catalog_path.with_name(catalog_path.name + ".rebuild")
    for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
        leftover.unlink(missing_ok=True)
    left_out: dict[str, str] = {}
    n_raw = n_ext = 0
    with Catalog(tmp) as cat:
        # raw shards oldest first: a URL retried later ends with its newest outcome
        files = sorted(raw_dir.glob("*.parquet")) if raw_dir.is_dir() else []
        for f in sorted(files, key=lambda f: (shard_time(f.stem) is None, f.stem)):
            try:
                names = pq.read_schema(f).names
                table = pq.read_table(f, columns=[c for c in SHARD_COLUMNS if c in names])
                missing = {"url", "key", "status", "error_message"} - set(table.column_names)
                if missing:
                    raise ValueError(f"it lacks column(s) {sorted(missing)}")
            except Exception as e:  # noqa: BLE001 - a damaged file is reported, not fatal
                left_out[str(f)] = f"not a readable raw shard: {e}"
                continue
            stats_path = f.with_suffix(".stats.json")
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"recovered": True}
            at = shard_time(f.stem) or datetime.fromtimestamp(f.stat().st_mtime, timezone.utc)
            cat.record_raw_shard(f.stem, f, table, stats, at=at)
            n_raw += 1

        # complete snapshots, oldest first, with their lineage
        found = []
        for d in sorted(snapshots_dir.iterdir()) if snapshots_dir.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue  # a snapshot still being written (.ID.tmp) is not a snapshot
            mf = d / "manifest.json"
            try:
                m = json.loads(mf.read_text())
                sid, n_rows, sources = m["snapshot_id"], int(m["n_rows"]), list(m["source_shards"])
            except FileNotFoundError:
                left_out[str(d)] = "no manifest.json: a snapshot is complete only once its manifest is written"
                continue
            except (ValueError, KeyError, TypeError) as e:
                left_out[str(d)] = f"manifest.json is not a snapshot manifest: {e!r}"
                continue
            gone = [x for x in m.get("files", []) if not (snapshots_dir / x).exists()]
            if gone:
                left_out[str(d)] = f"files listed in its manifest are missing: {gone[:3]}"
                continue
            found.append(
                (
                    _when(m.get("created_at")) or datetime.fromtimestamp(mf.stat().st_mtime, timezone.utc),
                    sid,
                    d,
                    n_rows,
                    sources,
                    m,
                )
            )
        for created, sid, d, n_rows, sources, m in sorted(found, key=lambda x: (x[0], x[1])):
            for s in sources:
                if s.startswith("external:") and not cat.has_shard(s):
                    ext = Path(s[len("external:") :])
                    if ext.is_file():
                        cat.register_external_shard(ext)
                        n_ext += 1
                    else:
                        left_out[s] = (
                            f"an external shard snapshot {sid} was built from; it no longer exists (lineage kept)"
                        )
            cat.record_snapshot(sid, m.get("parent_id"), d, n_rows, m, sources, created_at=created)
        urls, failed = cat.con.execute(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'success') FROM urls"
        ).fetchone()
        n_snap = cat.con.execute("SELECT count(*) FROM snapshots").fetchone()[0]
    backup = None
    if catalog_path.exists():
        backup = catalog_path.with_name(f"{catalog_path.name}.bak-{_now().strftime('%Y%m%dT%H%M%S')}")
        os.replace(catalog_path, backup)
        wal = catalog_path.with_name(catalog_path.name + ".wal")
        if wal.exists():
            os.replace(wal, backup.with_name(backup.name + ".wal"))
    os.replace(tmp, catalog_path)
    return Rebuilt(catalog_path, backup, n_raw, n_ext, int(urls), int(failed), int(n_snap), left_out)
