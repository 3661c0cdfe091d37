"""The curate stage: raw shards in the catalog -> the next versioned snapshot.

Steps (each timed and reported): read metadata of the new shards (no image bytes) -> normalise
captions -> SQL rules (rules.sql) -> language -> decontamination -> keep-first deduplication
against the parent snapshot and within the new rows -> split and content hash -> write the accepted
rows with their image bytes (the only read of image bytes) -> manifest, catalog record, report.

Incremental rule: the next snapshot is the latest snapshot plus the newly accepted rows from shards
it has not consumed, deduplicated against it. It is rebuilt from all shards instead when the rule
configuration, the rules file, the blocklist or the eval set changed since the latest snapshot
(or with ``from_scratch``), because its rows were chosen under other rules.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipline.components.catalog import Catalog
from clipline.components.config import Config, CurateConfig
from clipline.components.curate import dedup, hashing, language, rules, sources
from clipline.components.curate.evalset import eval_hashes, fingerprint
from clipline.components.curate.normalize import MAYBE_DIRTY, normalize_captions

ProgressFn = Callable[[str, int, int], None]
"""progress(step_description, steps_done, steps_total)"""

#: timing entry of the one-off work done before the steps (see :func:`_warm_up`); not a progress step
SETUP = "setup: imports and compiled kernels"

STEPS = ["read metadata and apply rules", "language", "decontamination", "deduplication",
         "split and content hash", "write snapshot", "report"]

#: rows per record batch of the passes that run in Python (language, content hash): bounds their memory
BATCH_ROWS = 65_536

#: share of [curate] duckdb_memory_limit given to DuckDB's buffer manager. The rest is headroom for
#: what DuckDB allocates outside it (Arrow export of streamed results and UDF chunks, Parquet writer
#: and reader buffers), measured at 10-25% of the limit, so that the process stays within the
#: configured limit plus its Python baseline
DUCKDB_SHARE = 0.75

#: Python bytes per distinct pHash in the numpy pair search, and per row visited by keep-first
#: (measured peaks, rounded up): DuckDB's limit is lowered by this much during those passes
PAIR_SEARCH_BYTES_PER_HASH = 96
VISIT_BYTES_PER_ROW = 400
#: Python bytes per row of the candidate pass (fetched 64-bit hashes and masks, one hash table)
HASH_BYTES_PER_ROW = 96

#: config fields that do not change which rows are kept (so they never force a rebuild)
NON_RULE_FIELDS = {"row_group_rows", "file_size_mb", "duckdb_memory_limit", "duckdb_temp_dir", "duckdb_threads",
                   "contact_sheet_examples", "eval_set", "language_backend", "blocklist_file", "near_dup_engine", "rules_file"}


#: DuckDB's 64-bit hashes of a row's URL, key and sha256 (NULL for a NULL value), computed once
#: while the rows are read; exact deduplication groups by them and then compares the values
_HASHES = ("CASE WHEN {p}url IS NOT NULL THEN hash({p}url) END AS h_url, "
           "CASE WHEN {p}key IS NOT NULL THEN hash({p}key) END AS h_key, "
           "CASE WHEN {p}sha256 IS NOT NULL THEN hash({p}sha256) END AS h_sha256")


class CurateError(RuntimeError):
    """The stage cannot run; the message says why and what to do."""


@dataclass
class CurateResult:
    snapshot_id: str
    parent_id: str | None
    path: Path                      # the snapshot directory
    n_rows: int                     # rows in the whole snapshot (parent's included)
    n_train: int
    n_val: int
    counts: dict                    # this run: {"input", "kept", "dropped": {rule: n}}
    report_path: Path | None
    contact_sheet_path: Path | None
    new: bool                       # False: nothing new, the existing snapshot is returned
    manifest: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)  # CPU seconds of this process per step
    mlflow_run_id: str | None = None


def con_temp_dir(cfg: Config) -> Path:
    """DuckDB's spill directory: [curate] duckdb_temp_dir, default <data-dir>/tmp/duckdb."""
    return Path(cfg.curate.duckdb_temp_dir) if cfg.curate.duckdb_temp_dir else cfg.data_dir / "tmp" / "duckdb"


def connect(cfg: Config) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the configured memory limit (its buffer manager gets
    :data:`DUCKDB_SHARE` of it), spill directory and threads."""
    c = cfg.curate
    temp = con_temp_dir(cfg)
    temp.mkdir(parents=True, exist_ok=True)
    limit = duckdb_limit_bytes(c)
    con = duckdb.connect(config={"memory_limit": f"{limit}B" if limit else c.duckdb_memory_limit, "temp_directory": str(temp),
                                 "threads": int(c.duckdb_threads), "preserve_insertion_order": True})
    con.create_function("normalize_caption", normalize_captions, [duckdb.sqltype("VARCHAR")],
                        duckdb.sqltype("VARCHAR"), type="arrow")
    con.create_function("key_hash", hashing.key_hash_udf, [duckdb.sqltype("VARCHAR")],
                        duckdb.sqltype("UBIGINT"), type="arrow")
    return con


def _warm_up(con: duckdb.DuckDBPyConnection, c: CurateConfig) -> None:
    """Pay the once-per-process costs before the steps, so that step timings measure work on rows:
    DuckDB's first registration of an Arrow table imports pandas and pyarrow.dataset (about 0.4 s),
    and the compiled language and keep-first kernels load from numba's cache on their first call
    (about 1 s; compiled once per machine). Timed on its own as :data:`SETUP`."""
    con.register("_warm", pa.table({"x": pa.array([0], pa.int64())}))
    con.unregister("_warm")
    if c.language and c.language_backend == "compiled":
        language.other_language_mask_arrow(pa.array(["a photo of a cat", "un chat noir"]), c.language,
                                           c.language_min_confidence, "compiled", 1)
    dedup.keep_first_codes(dedup.DedupInput(*(np.zeros(3, bool), *[np.arange(3)] * 5,
                                              np.zeros((0, 2), np.int64))), dedup.DedupOptions())
    dedup.repeated(np.array([1, 1, 2], np.int64))  # a value that repeats: the compiled pass runs only then
    dedup.string_group_ids(pa.array(["a", "a"]), np.zeros(2, np.uint64))  # loads first_ids' loop too


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def limit_bytes(limit: str) -> int | None:
    """Bytes of a DuckDB memory limit such as ``1GB`` or ``512MiB`` (DuckDB's units: KB = 1000,
    KiB = 1024); None for a form this does not read (e.g. a percentage)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(limit).lower())
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])


def duckdb_limit_bytes(c: CurateConfig) -> int | None:
    """The memory limit DuckDB's buffer manager gets: DUCKDB_SHARE of [curate] duckdb_memory_limit."""
    full = limit_bytes(c.duckdb_memory_limit)
    return int(full * DUCKDB_SHARE) if full is not None else None


@contextmanager
def yield_memory(con: duckdb.DuckDBPyConnection, c: CurateConfig, python_bytes: int):
    """Lower DuckDB's memory limit by ``python_bytes`` (at most to a quarter of it) while a Python
    pass needs that much, so that DuckDB evicts (spills) its tables and the process as a whole stays
    within the configured limit plus the Python baseline; restores the limit afterwards."""
    full = duckdb_limit_bytes(c)
    if full is None or python_bytes <= 0:
        yield
        return
    con.execute(f"SET memory_limit = '{max(full - int(python_bytes), full // 4)}B'")
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{full}B'")


def spilled_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes DuckDB holds in its temp directory right now (data that did not fit the memory limit)."""
    return int(con.execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchall()[0][0])


def config_fingerprint(c: CurateConfig, sql: list[rules.Rule]) -> str:
    """Hash of everything that decides which rows are kept (rules text with values filled in)."""
    data = {k: v for k, v in c.model_dump(mode="json").items() if k not in NON_RULE_FIELDS}
    data["rules"] = [(r.name, r.sql) for r in sql]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class _Steps:
    """Wall seconds (``timings``) and CPU seconds of this process (``cpu_timings``) per step."""

    def __init__(self, progress: ProgressFn | None):
        self.progress, self.done, self.timings, self.cpu_timings = progress, 0, {}, {}
        self._t, self._c = time.perf_counter(), time.process_time()
        self._name = None

    sampler: Callable[[], int] | None = None  # DuckDB's spill bytes now (set once connected)
    spilled_max = 0

    def sample(self) -> None:
        if self.sampler is not None:
            self.spilled_max = max(self.spilled_max, int(self.sampler()))

    def start(self, name: str) -> None:
        self.sample()
        self._close()
        self._name, self._t, self._c = name, time.perf_counter(), time.process_time()
        if self.progress:
            self.progress(name, self.done, len(STEPS))

    def _close(self) -> None:
        if self._name is not None:
            self.timings[self._name] = round(time.perf_counter() - self._t, 3)
            self.cpu_timings[self._name] = round(time.process_time() - self._c, 3)
            self.done += 1
            self._name = None

    def finish(self) -> None:
        self._close()
        if self.progress:
            self.progress("done", len(STEPS), len(STEPS))


def _result_from_record(rec: dict, snapshots_dir: Path, new: bool) -> CurateResult:
    m = rec["manifest"]
    rep = m.get("report", {})
    return CurateResult(
        snapshot_id=rec["snapshot_id"], parent_id=rec["parent_id"], path=snapshots_dir / rec["snapshot_id"],
        n_rows=int(rec["n_rows"]), n_train=int(m.get("n_train", 0)), n_val=int(m.get("n_val", 0)),
        counts=m.get("counts", {}), report_path=Path(rep["markdown"]) if rep.get("markdown") else None,
        contact_sheet_path=Path(rep["contact_sheet"]) if rep.get("contact_sheet") else None,
        new=new, manifest=m, timings=m.get("timings", {}))


def _parent_usable(parent: dict | None, fp: str, efp: str | None, snapshots_dir: Path) -> tuple[dict | None, str | None]:
    if parent is None:
        return None, None
    m = parent["manifest"]
    if m.get("config_fingerprint") != fp:
        return None, f"the curate rules changed since snapshot {parent['snapshot_id']}"
    if m.get("eval_fingerprint") != efp:
        return None, f"the eval set changed since snapshot {parent['snapshot_id']}"
    missing = [f for f in m.get("files", []) if not (snapshots_dir / f).exists()]
    if missing:
        return None, f"snapshot {parent['snapshot_id']} misses file(s) {missing[:3]}"
    return parent, None


def curate(cfg: Config, eval_set: Path | None = None, progress: ProgressFn | None = None, *,
           from_scratch: bool = False, track: bool = True, rules_file: Path | None = None) -> CurateResult:
    """Build the next snapshot from the raw shards registered in the catalog (see module doc).

    Returns the existing latest snapshot (``new=False``) when no shard is new and the rules are
    unchanged, or when the rows it would write equal an existing snapshot's. Raises CurateError
    when there is nothing to curate, EvalSetError for an unreadable eval set, ValueError for a bad
    rules or blocklist file.
    """
    from clipline.components.curate import report as report_mod

    c = cfg.curate
    steps = _Steps(progress)
    eval_path = Path(eval_set) if eval_set else (Path(c.eval_set) if c.eval_set else None)
    sql_rules = rules.sql_rules(c, rules_file or c.rules_file)
    fp = config_fingerprint(c, sql_rules)
    ehashes = eval_hashes(eval_path) if eval_path else None
    efp = fingerprint(ehashes)
    snapshots_dir = cfg.snapshots_dir
    snapshots_dir.mkdir(parents=True, exist_ok=True)

    with Catalog(cfg.catalog_path) as cat, cat.lock("curate", f"clipline curate (pid {os.getpid()})"):
        shards = cat.shards(kind=None)
        if not shards:
            raise CurateError(f"no complete raw shards are registered in {cfg.catalog_path}: "
                              "run `clipline ingest URL_LIST` first")
        latest = cat.latest_snapshot()
        if from_scratch:
            parent, rebuild_reason = None, ("from scratch, as asked" if latest else None)
        else:
            parent, rebuild_reason = _parent_usable(latest, fp, efp, snapshots_dir)
        consumed = set(parent["manifest"].get("source_shards", [])) if parent else set()
        new_shards = [s for s in shards if s.shard_id not in consumed]
        if parent is not None and not new_shards:
            steps.finish()
            return _result_from_record(parent, snapshots_dir, new=False)
        files = [sources.ShardFile(s.shard_id, Path(s.path), i) for i, s in enumerate(new_shards)]
        con = connect(cfg)
        t_setup, c_setup = time.perf_counter(), time.process_time()
        _warm_up(con, c)
        steps.timings[SETUP] = round(time.perf_counter() - t_setup, 3)
        steps.cpu_timings[SETUP] = round(time.process_time() - c_setup, 3)
        try:
            res = _build(cfg, con, cat, files, parent, sql_rules, fp, ehashes, efp, rebuild_reason, steps,
                         report_mod, all_shards=[s.shard_id for s in shards])
        except duckdb.OutOfMemoryException as e:
            raise CurateError(
                f"DuckDB ran out of memory in step '{steps._name}' with [curate] duckdb_memory_limit = "
                f"{c.duckdb_memory_limit} and duckdb_threads = {c.duckdb_threads} (what did not fit was spilled to "
                f"{con_temp_dir(cfg)} first): raise duckdb_memory_limit or lower duckdb_threads. DuckDB said: "
                f"{str(e).splitlines()[0]}") from e
        finally:
            con.close()
    steps.finish()
    res.timings = steps.timings
    res.cpu_timings = steps.cpu_timings
    if res.new:
        _finalise_manifest_timings(res, snapshots_dir)
        if track:
            res.mlflow_run_id = report_mod.log_to_mlflow(cfg, res)
    return res


def _finalise_manifest_timings(res: CurateResult, snapshots_dir: Path) -> None:
    res.manifest["timings"] = res.timings
    res.manifest["cpu_timings"] = res.cpu_timings
    (snapshots_dir / res.snapshot_id / "manifest.json").write_text(json.dumps(res.manifest, indent=2, default=str))


def _build(cfg: Config, con: duckdb.DuckDBPyConnection, cat: Catalog, files: list[sources.ShardFile],
           parent: dict | None, sql_rules: list[rules.Rule], fp: str, ehashes: np.ndarray | None,
           efp: str | None, rebuild_reason: str | None, steps: _Steps, report_mod, all_shards: list[str]) -> CurateResult:
    c = cfg.curate
    snapshots_dir = cfg.snapshots_dir
    d = c.phash_max_distance
    steps.sampler = lambda: spilled_bytes(con)

    # ---- 1. metadata of the new shards + SQL rules (first matching rule wins) ----
    # rid identifies a row (shard file, row in it); the keep-first visiting order is applied later,
    # to the rows deduplication has to look at, so nothing here sorts the whole input
    steps.start(STEPS[0])
    paths = [f.path for f in files]
    schema = sources.union_schema(paths)
    # a file's position in this list is its rank (files are listed in catalog order), so rid orders rows by shard
    con.register("_files_arrow", pa.table({
        "filename": [str(f.path) for f in files], "fid": list(range(len(files))), "shard_id": [f.shard_id for f in files]}))
    con.execute("CREATE TEMP TABLE files AS SELECT * FROM _files_arrow")
    con.unregister("_files_arrow")
    dirty = MAYBE_DIRTY.replace("'", "''")
    # the table keeps what later steps read: rid (which holds the shard and the row in it), the values
    # deduplication compares, the image area it orders by, the rule and the hashes. Status and sizes
    # are read by the rules only; the snapshot takes its sizes from the shards when it is written
    con.execute(f"""
        CREATE TEMP TABLE rows AS
        WITH raw AS (  -- file_index: the file's position in the list, which is its fid
            SELECT file_index, file_row_number, {sources.meta_select(schema)}
            FROM read_parquet({sources.sql_list(paths)}, union_by_name = true, file_row_number = true) r
        ), norm AS (  -- captions already in normal form skip the Python normaliser
            SELECT * REPLACE (CASE WHEN regexp_matches(caption, '{dirty}') THEN normalize_caption(caption)
                                   ELSE caption END AS caption) FROM raw
        )
        SELECT (f.fid << 32) + n.file_row_number + 1 AS rid,
               n.* EXCLUDE (file_index, file_row_number, status, width, height, original_width, original_height),
               coalesce(original_width, width)::BIGINT * coalesce(original_height, height)::BIGINT AS area,
               {rules.case_expression(sql_rules)} AS reason, {_HASHES.format(p="n.")}
        FROM norm n JOIN files f ON n.file_index = f.fid::UBIGINT""")
    # the join with files (rid could be computed from file_index alone) is kept on purpose: a plain
    # read_parquet -> CREATE TABLE goes through DuckDB's ordered batch insert, which writes compressed
    # row groups, and the UPDATEs of reason that follow then take 10x longer (0.25 s against 0.025 s
    # for 10k rows; measured with DuckDB 2.0)

    # ---- 2. language (only rows no earlier rule dropped, streamed) ----
    # every row's caption is classified, repeats included: the compiled model costs about 1 us a
    # caption, less than finding the distinct captions first (a hash aggregate over all of them)
    steps.start(STEPS[1])
    if c.language:
        reader = con.sql("SELECT rid, caption FROM rows WHERE reason IS NULL AND caption IS NOT NULL") \
            .to_arrow_reader(BATCH_ROWS)
        flagged = []
        for batch in reader:
            mask = language.other_language_mask_arrow(batch.column(1), c.language, c.language_min_confidence,
                                                      c.language_backend, c.duckdb_threads)
            if mask.any():
                flagged.append(batch.column(0).filter(pa.array(mask)))
        del reader
        if flagged:
            con.register("_lang", pa.table({"rid": pa.concat_arrays(flagged)}))
            con.execute("""UPDATE rows SET reason = 'language' FROM _lang
                           WHERE rows.rid = _lang.rid AND rows.reason IS NULL""")
            con.unregister("_lang")

    # ---- 3. decontamination against the eval set ----
    steps.start(STEPS[2])
    if ehashes is not None and len(ehashes):
        con.execute("""CREATE TEMP TABLE _ph AS SELECT min(rid) AS gid, phash FROM rows
                       WHERE reason IS NULL AND phash IS NOT NULL GROUP BY phash""")
        con.register("_eval", pa.table({"phash": pa.array(ehashes, pa.int64())}))
        hit = dedup.near_any(con, "_ph", "_eval", max(d, 0))
        con.unregister("_eval")
        if len(hit):
            con.register("_hit", pa.table({"gid": pa.array(hit, pa.int64())}))
            con.execute("""UPDATE rows SET reason = 'eval_contamination' WHERE reason IS NULL AND phash IN
                           (SELECT phash FROM _ph WHERE gid IN (SELECT gid FROM _hit))""")
            con.unregister("_hit")
        con.execute("DROP TABLE _ph")

    # ---- 4. keep-first deduplication (parent rows first, all kept) ----
    steps.start(STEPS[3])
    parent_files = [snapshots_dir / f for f in parent["manifest"]["files"]] if parent else []
    if parent_files:
        con.execute(f"""
            CREATE TEMP TABLE parent AS
            SELECT row_number() OVER (ORDER BY key) - (SELECT count(*) FROM read_parquet({sources.sql_list(parent_files)})) - 1 AS rid,
                   key, url, caption, sha256, phash, split
            FROM read_parquet({sources.sql_list(parent_files)}, union_by_name = true)""")
    else:
        con.execute("""CREATE TEMP TABLE parent (rid BIGINT, key VARCHAR, url VARCHAR, caption VARCHAR,
                       sha256 VARCHAR, phash BIGINT, split VARCHAR)""")
    con.execute(f"""
        CREATE TEMP VIEW _u AS
        SELECT rid, TRUE AS is_parent, key, url, caption, sha256, phash, NULL::BIGINT AS area,
               {_HASHES.format(p="")} FROM parent
        UNION ALL
        SELECT rid, FALSE, key, url, caption, sha256, phash, area, h_url, h_key, h_sha256
        FROM rows WHERE reason IS NULL""")
    pairs = np.zeros((0, 2), dtype=np.int64)
    t_lsh, c_lsh = time.perf_counter(), time.process_time()
    if d >= 0:  # near pairs among the distinct pHash values (a pHash value is its own id)
        con.execute("CREATE TEMP TABLE _phd AS SELECT DISTINCT phash AS gid, phash FROM _u WHERE phash IS NOT NULL")
        n_ph = con.execute("SELECT count(*) FROM _phd").fetchall()[0][0]
        with yield_memory(con, c, PAIR_SEARCH_BYTES_PER_HASH * n_ph if c.near_dup_engine == "numpy" else 0):
            pairs = dedup.near_pairs(con, "_phd", d, engine=c.near_dup_engine)
        con.execute("DROP TABLE _phd")
    steps.timings["deduplication: phash pair search"] = round(time.perf_counter() - t_lsh, 3)
    steps.cpu_timings["deduplication: phash pair search"] = round(time.process_time() - c_lsh, 3)
    # only rows sharing a value with another row (or a pHash within d of another) can be dropped
    # or make another row a duplicate: exactly those are visited, in the keep-first order.
    # 1) candidates: rows whose URL / key / sha256 (/ caption+sha256) 64-bit hash or pHash repeats,
    #    found per relation by sorting the fetched hashes and one compiled pass marking the rows
    #    whose hash repeats (a superset of the rows with a real duplicate: equal values have equal
    #    hashes);
    # 2) the exact groups among the candidates, from their values themselves (grouped by hash,
    #    then each value compared with its group's first; see _hashed_ids): a hash collision can
    #    add a candidate, never merge two different values
    everything = c.caption_near_dedup  # the caption rule compares every row's caption
    # with dup_image on, a row sharing caption AND sha256 with a kept row always meets dup_image
    # first, so the caption+sha256 relation is only needed for exact_image_dedup = "image_and_caption"
    same_image = c.exact_image_dedup == "image"
    n_u = con.execute("SELECT count(*) FROM _u").fetchall()[0][0]
    with yield_memory(con, c, HASH_BYTES_PER_ROW * n_u if not everything else 0):
        if everything:
            cand = None
        else:
            h = con.sql(f"""
                SELECT rid, h_url AS url, h_key AS key, h_sha256 AS sha256,
                       {"NULL::UBIGINT" if same_image else "CASE WHEN caption IS NOT NULL AND sha256 IS NOT NULL THEN hash(caption, sha256) END"} AS ci,
                       phash FROM _u""").to_arrow_table()
            near = pairs.reshape(-1)  # pHash values within d of another one

            def rel(col: str) -> np.ndarray:  # candidates of one relation (numba releases the GIL)
                v = h.column(col).combine_chunks()
                if v.null_count == len(v):
                    return np.zeros(len(v), np.bool_)
                valid = np.asarray(v.is_valid().to_numpy(zero_copy_only=False), np.bool_) if v.null_count else None
                values = np.frombuffer(v.buffers()[1], np.uint64 if pa.types.is_unsigned_integer(v.type) else np.int64,
                                       len(v), v.offset * 8)  # the value under a null is never read
                # a pHash within d of another is a candidate too
                return dedup.repeated(values, valid, also=near if col == "phash" else None)

            with ThreadPoolExecutor(max(1, min(2, int(c.duckdb_threads)))) as pool:
                repeats = functools.reduce(np.logical_or, pool.map(rel, ["url", "key", "sha256", "ci", "phash"]))
            cand = h.column("rid").to_numpy()[repeats]
            del h, repeats
    with yield_memory(con, c, VISIT_BYTES_PER_ROW * (n_u if cand is None else len(cand))
                      if not c.caption_near_dedup else 0):
        if cand is not None:
            con.register("_cand", pa.table({"rid": pa.array(cand, pa.int64())}))
        with_caption = c.caption_near_dedup or not same_image
        tab = con.sql(f"""
            SELECT rid, is_parent, url, key, sha256, phash{", caption" if with_caption else ""},
                   h_url, h_key, h_sha256
            FROM _u {"SEMI JOIN _cand USING (rid)" if cand is not None else ""}
            ORDER BY is_parent DESC, {sources.RID_FILE}, area DESC NULLS LAST, key, rid""").to_arrow_table()
        if cand is not None:
            con.unregister("_cand")
        del cand
        codes, rid_arr, n_visited = _visit(tab, pairs, c, d, steps)
    drop = (codes > 0) & (rid_arr > 0)  # parent rows (rid <= 0) are never dropped
    if drop.any():
        con.register("_mark", pa.table({"rid": rid_arr[drop], "reason": pa.array(
            np.array(dedup.REASONS, dtype=object)[codes[drop] - 1].tolist(), pa.string())}))
        con.execute("""UPDATE rows SET reason = _mark.reason FROM _mark
                       WHERE rows.rid = _mark.rid AND rows.reason IS NULL""")
        con.unregister("_mark")
    del tab, rid_arr, codes, pairs
    con.execute("DROP VIEW _u")

    # ---- 5. split, counts, content hash ----
    steps.start(STEPS[4])
    con.execute(f"""
        CREATE TEMP TABLE kept AS
        SELECT * EXCLUDE (reason, h, h_url, h_key, h_sha256), {hashing.split_sql("h", c.val_fraction)} AS split, h
        FROM (SELECT *, key_hash(key) AS h FROM rows WHERE reason IS NULL)""")
    order = rules.rule_order(sql_rules)
    dropped_raw = dict(con.execute("SELECT reason, count(*) FROM rows WHERE reason IS NOT NULL GROUP BY 1").fetchall())
    n_input = con.execute("SELECT count(*) FROM rows").fetchall()[0][0]
    n_kept_new = con.execute("SELECT count(*) FROM kept").fetchall()[0][0]
    counts = {"input": int(n_input), "kept": int(n_kept_new),
              "dropped": {r: int(dropped_raw.get(r, 0)) for r in order}}
    # content hash: every kept row (key, sha256, caption, split) in key order, plus the source
    # shards; the sorted rows stay in DuckDB and are hashed in streamed batches
    con.execute("""
        CREATE TEMP TABLE _content AS
        SELECT concat_ws(chr(31), key, coalesce(sha256, ''), coalesce(caption, ''), split) AS s FROM (
            SELECT key, sha256, caption, split FROM kept UNION ALL SELECT key, sha256, caption, split FROM parent)
        ORDER BY key, s""")
    cnt, content_digest = hashing.digest_table_column(con, "_content", "s", BATCH_ROWS)
    con.execute("DROP TABLE _content")
    source_shards = sorted(set(parent["manifest"]["source_shards"] if parent else []) | {f.shard_id for f in files})
    snapshot_id = hashlib.sha256(json.dumps([cnt, content_digest, source_shards]).encode()).hexdigest()[:16]
    try:
        existing = cat.get_snapshot(snapshot_id)
    except KeyError:
        existing = None
    if existing is not None and (snapshots_dir / snapshot_id / "manifest.json").exists():
        return _result_from_record(existing, snapshots_dir, new=False)
    split_counts = dict(con.execute("SELECT split, count(*) FROM (SELECT split FROM kept UNION ALL SELECT split FROM parent) GROUP BY 1").fetchall())

    # ---- 6. write the accepted rows (the only read of image bytes) ----
    steps.start(STEPS[5])
    tmp_dir = snapshots_dir / f".{snapshot_id}.tmp"
    final_dir = snapshots_dir / snapshot_id
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    new_files: list[str] = []
    if n_kept_new:
        con.create_function("shuffle_key", hashing.shuffle_udf(snapshot_id), [duckdb.sqltype("UBIGINT")],
                            duckdb.sqltype("BIGINT"), type="arrow")
        carried = sources.carried_columns(schema)
        carried_sql = "".join(f", r.{sources.quote_ident(col)}" for col in carried)
        con.execute(f"""
            COPY (
                SELECT k.key, k.url, k.caption, {sources.image_expr(schema)} AS image,
                       {sources.meta_select(schema, names=sources.SIZE_COLUMNS)}, k.sha256, k.phash, k.split{carried_sql}
                FROM read_parquet({sources.sql_list(paths)}, union_by_name = true, filename = true,
                                  file_row_number = true) r
                JOIN files f ON r.filename = f.filename
                JOIN (SELECT *, {sources.RID_FILE} AS fid, {sources.RID_ROW} AS file_row_number,
                             shuffle_key(h) AS shuffle FROM kept) k
                  ON f.fid = k.fid AND r.file_row_number = k.file_row_number
                ORDER BY k.shuffle
            ) TO '{tmp_dir}' (FORMAT parquet, ROW_GROUP_SIZE {int(c.row_group_rows)},
                              FILE_SIZE_BYTES '{int(c.file_size_mb)}MB', FILENAME_PATTERN 'part-{{i}}',
                              OVERWRITE_OR_IGNORE true)""")
        written = sorted(tmp_dir.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
        new_files = [f"{snapshot_id}/{p.name}" for p in written]
    files_all = (list(parent["manifest"]["files"]) if parent else []) + new_files
    parent_id = parent["snapshot_id"] if parent else None
    cumulative = _cumulative(parent["manifest"].get("cumulative_counts") if parent else None, counts)
    manifest = {
        "snapshot_id": snapshot_id,
        "parent_id": parent_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": c.model_dump(mode="json"),
        "config_fingerprint": fp,
        "eval_fingerprint": efp,
        "rebuild_reason": rebuild_reason,
        "source_shards": source_shards,
        "new_shards": [f.shard_id for f in files],
        "rule_order": order,
        "counts": counts,
        "cumulative_counts": cumulative,
        "n_rows": int(cnt),
        "n_train": int(split_counts.get("train", 0)),
        "n_val": int(split_counts.get("val", 0)),
        "files": files_all,
        "new_files": new_files,
        "dedup_rows_visited": n_visited,
    }

    # ---- 7. report (table + contact sheet), then publish atomically ----
    steps.start(STEPS[6])
    report_dir = cfg.reports_dir / "curate" / snapshot_id
    rep = report_mod.write_report(con, report_dir, manifest, schema, paths, c.contact_sheet_examples)
    steps.sample()
    manifest["duckdb_spilled_bytes_max"] = steps.spilled_max  # at step boundaries; 0: it all fit in memory
    manifest["report"] = {k: str(v) for k, v in rep.items()}
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if final_dir.exists():
        shutil.rmtree(final_dir)  # a leftover of a run that crashed before recording it
    tmp_dir.rename(final_dir)
    cat.record_snapshot(snapshot_id, parent_id, final_dir, int(cnt), manifest, source_shards)
    return CurateResult(snapshot_id=snapshot_id, parent_id=parent_id, path=final_dir, n_rows=int(cnt),
                        n_train=manifest["n_train"], n_val=manifest["n_val"], counts=counts,
                        report_path=rep.get("markdown"), contact_sheet_path=rep.get("contact_sheet"),
                        new=True, manifest=manifest)


def _exact_ids(*cols: pa.ChunkedArray) -> np.ndarray:
    """A group id per row: equal where all ``cols`` are equal and non-null; a row with a null
    gets an id of its own. Exact (Arrow's dictionary encoding compares the values)."""
    n = len(cols[0])
    ids = np.zeros(n, np.int64)
    null = np.zeros(n, np.bool_)
    for col in cols:
        enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        idx = enc.indices
        if idx.null_count:
            null |= np.asarray(idx.is_null().to_numpy(zero_copy_only=False), np.bool_)
            idx = pc.fill_null(idx, 0)
        k = idx.to_numpy().astype(np.int64)
        ids = k if len(cols) == 1 else np.unique(ids * (len(enc.dictionary) + 1) + k, return_inverse=True)[1].reshape(-1)
    base = int(ids.max()) + 1 if n else 0
    return np.where(null, base + np.arange(n, dtype=np.int64), ids)


def _hashed_ids(values: pa.ChunkedArray, hashes: pa.ChunkedArray) -> np.ndarray:
    """:func:`_exact_ids` of one string column, given each value's 64-bit hash: one compiled pass
    groups rows by hash and compares every row's value with its group's first
    (:func:`dedup.string_group_ids`); only if a hash collision put two different values together
    (never seen, but possible) does it fall back to :func:`_exact_ids`. Ids are row positions,
    so within [0, 2n)."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    vals = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    h = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
    hv = np.asarray(pc.fill_null(h, 0).to_numpy() if h.null_count else h.to_numpy(), np.uint64)
    ids = dedup.string_group_ids(vals, hv)
    return _exact_ids(values) if ids is None else ids


def _visit(tab: pa.Table, pairs: np.ndarray, c: CurateConfig, d: int, steps: _Steps) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep-first over the fetched rows (in visiting order): (reason codes, rids, rows visited)."""
    t_keep, c_keep = time.perf_counter(), time.process_time()
    rid_arr = tab.column("rid").to_numpy().astype(np.int64)
    same_image = c.exact_image_dedup == "image"
    n = len(rid_arr)
    ph_col = tab.column("phash")
    ph_valid = np.asarray(ph_col.is_valid().to_numpy(zero_copy_only=False), np.bool_) if n else np.zeros(0, np.bool_)
    ph_vals = np.asarray(pc.fill_null(ph_col, 0).to_numpy(), np.int64) if n else np.zeros(0, np.int64)
    # one id per distinct pHash value, rows' and pairs' alike: the position of its first occurrence
    ph_ids = dedup.first_ids(np.concatenate([ph_vals, pairs.reshape(-1)]),
                             np.concatenate([ph_valid, np.ones(pairs.size, np.bool_)]))
    ph_g = ph_ids[:n]
    alone = np.arange(n, dtype=np.int64)
    codes = dedup.keep_first_codes(
        dedup.DedupInput(
            is_parent=np.asarray(tab.column("is_parent").to_numpy(zero_copy_only=False), bool),
            url_g=_hashed_ids(tab.column("url"), tab.column("h_url")),
            key_g=_hashed_ids(tab.column("key"), tab.column("h_key")),
            sha_g=_hashed_ids(tab.column("sha256"), tab.column("h_sha256")),
            capimg_g=alone if same_image else _exact_ids(tab.column("caption"), tab.column("sha256")),
            ph_g=ph_g, ph_pairs=ph_ids[n:].reshape(-1, 2),
            captions=tab.column("caption").to_pylist() if c.caption_near_dedup else None),
        dedup.DedupOptions(same_image=same_image, near_image=d >= 0,
                           near_caption=c.caption_near_dedup, minhash_threshold=c.caption_minhash_threshold,
                           minhash_perm=c.caption_minhash_perm, shingle_chars=c.caption_shingle_chars))
    steps.timings["deduplication: keep-first pass"] = round(time.perf_counter() - t_keep, 3)
    steps.cpu_timings["deduplication: keep-first pass"] = round(time.process_time() - c_keep, 3)
    return codes, rid_arr, int(n)


def _cumulative(prev: dict | None, counts: dict) -> dict:
    if not prev:
        return json.loads(json.dumps(counts))
    out = {"input": prev.get("input", 0) + counts["input"], "kept": prev.get("kept", 0) + counts["kept"],
           "dropped": dict(prev.get("dropped", {}))}
    for r, n in counts["dropped"].items():
        out["dropped"][r] = out["dropped"].get(r, 0) + n
    return out
