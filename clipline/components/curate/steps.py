"""The steps of the curate stage, over one :class:`RunContext`.

Each step is a function of the context, run by the stage's driver (:func:`..stage.curate`) in the
order of :data:`PLAN` inside :func:`timed`, which records its wall and CPU seconds and reports
progress. The data lives in DuckDB tables that the steps hand on:

- ``files`` (filename, fid, shard_id): the new shards, fid = position in catalog order;
- ``rows``: one row per input row, ``rid = (fid << 32) + row in the file + 1``, the values rules
  and deduplication read, the image area, DuckDB's 64-bit hashes of URL, key and sha256, and
  ``reason`` (NULL = kept so far; set by the first rule that drops the row);
- ``parent``: the parent snapshot's rows (rid <= 0, always kept); ``kept``: the rows kept, with
  their split and key hash.

Report (:mod:`.report`) reads ``rows`` and ``files`` too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from clipline.components.catalog import Catalog
from clipline.components.config import Config, CurateConfig
from clipline.components.curate import db, dedup, hashing, language, near, rules, sources
from clipline.components.curate.normalize import MAYBE_DIRTY

ProgressFn = Callable[[str, int, int], None]
"""progress(step_description, steps_done, steps_total)"""

#: timing entry of the one-off work done before the steps (compiled kernels, imports); not a step
SETUP = "setup: imports and compiled kernels"
#: timing entries inside the deduplication step
PAIR_SEARCH = "deduplication: phash pair search"
KEEP_FIRST = "deduplication: keep-first pass"

#: rows per record batch of the passes that run in Python (language, content hash): bounds their memory
BATCH_ROWS = 65_536

#: DuckDB's 64-bit hashes of a row's URL, key and sha256 (NULL for a NULL value), computed once
#: while the rows are read; exact deduplication groups by them and then compares the values
_HASHES = (
    "CASE WHEN {p}url IS NOT NULL THEN hash({p}url) END AS h_url, "
    "CASE WHEN {p}key IS NOT NULL THEN hash({p}key) END AS h_key, "
    "CASE WHEN {p}sha256 IS NOT NULL THEN hash({p}sha256) END AS h_sha256"
)


@dataclass
class RunContext:
    """What the steps of one run share: its inputs (set by the stage), the measurements, and what
    the steps hand on to the later ones and to the result."""

    cfg: Config
    con: duckdb.DuckDBPyConnection
    cat: Catalog
    files: list[sources.ShardFile]  # the new shards, in catalog order
    parent: dict | None  # catalog record of the snapshot built upon; None: from all shards
    sql_rules: list[rules.Rule]  # rules.sql with values filled in, in order
    fingerprint: str  # of the rule configuration
    eval_hashes: np.ndarray | None
    eval_fingerprint: str | None
    rebuild_reason: str | None
    progress: ProgressFn | None = None
    # measurements (see timed)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    step: str | None = None  # the step under way, for error messages
    steps_done: int = 0
    spilled_max: int = 0  # most bytes DuckDB held in its temp dir, sampled between steps
    # handed on by the steps
    schema: dict[str, pa.DataType] = field(default_factory=dict)
    pairs: np.ndarray | None = None  # pHash values within the distance of each other
    n_visited: int = 0
    counts: dict = field(default_factory=dict)
    snapshot_id: str = ""
    n_rows: int = 0
    split_counts: dict = field(default_factory=dict)
    source_shards: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    clip: dict = field(default_factory=dict)  # what the CLIP-score rule did (manifest["clip_score"])

    @property
    def c(self) -> CurateConfig:
        return self.cfg.curate

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]

    @property
    def snapshots_dir(self) -> Path:
        return self.cfg.snapshots_dir

    def sample_spill(self) -> None:
        self.spilled_max = max(self.spilled_max, db.spilled_bytes(self.con))


@contextmanager
def timed(ctx: RunContext, name: str) -> Iterator[None]:
    """Record the block's wall seconds in ``ctx.timings[name]`` and this process's CPU seconds
    in ``ctx.cpu_timings[name]`` when it ends (not when it raises). A step of :data:`STEPS` also
    samples DuckDB's spill and reports progress as it starts, and counts as done as it ends; any
    other name (:data:`SETUP`, a part of a step) is timed only."""
    step = name in STEPS
    if step:
        ctx.sample_spill()
        ctx.step = name
        if ctx.progress:
            ctx.progress(name, ctx.steps_done, len(STEPS))
    t, c = time.perf_counter(), time.process_time()
    yield
    ctx.timings[name] = round(time.perf_counter() - t, 3)
    ctx.cpu_timings[name] = round(time.process_time() - c, 3)
    if step:
        ctx.steps_done += 1


def warm_up(ctx: RunContext) -> None:
    """The once-per-process costs, paid before the steps so that step timings measure work on
    rows: DuckDB's first Arrow registration, and loading the compiled kernels (from numba's cache;
    compiled once per machine)."""
    db.warm_up(ctx.con)
    if ctx.c.language:
        language.warm_up()
    dedup.warm_up()


# ---------------------------------------------------------------- 1. read metadata + SQL rules


def read_and_apply_rules(ctx: RunContext) -> None:
    """``files`` and ``rows`` (see the module docstring) from the new shards' metadata (no image
    bytes), captions normalised, ``reason`` = the first SQL rule that matches."""
    con, paths = ctx.con, ctx.paths
    ctx.schema = sources.union_schema(paths)
    # a file's position in this list is its rank (files are listed in catalog order), so rid orders rows by shard
    con.register(
        "_files_arrow",
        pa.table(
            {
                "filename": [str(p) for p in paths],
                "fid": list(range(len(paths))),
                "shard_id": [f.shard_id for f in ctx.files],
            }
        ),
    )
    con.execute("CREATE TEMP TABLE files AS SELECT * FROM _files_arrow")
    con.unregister("_files_arrow")
    dirty = MAYBE_DIRTY.replace("'", "''")
    # the table keeps what later steps read: rid (which holds the shard and the row in it), the values
    # deduplication compares, the image area it orders by, the rule and the hashes. Status and sizes
    # are read by the rules only; the snapshot takes its sizes from the shards when it is written.
    # Nothing here sorts the whole input: the keep-first order is applied later, to the rows
    # deduplication has to look at
    con.execute(f"""
        CREATE TEMP TABLE rows AS
        WITH raw AS (  -- file_index: the file's position in the list, which is its fid
            SELECT file_index, file_row_number, {sources.meta_select(ctx.schema)}
            FROM read_parquet({sources.sql_list(paths)}, union_by_name = true, file_row_number = true) r
        ), norm AS (  -- captions already in normal form skip the Python normaliser
            SELECT * REPLACE (CASE WHEN regexp_matches(caption, '{dirty}') THEN normalize_caption(caption)
                                   ELSE caption END AS caption) FROM raw
        )
        SELECT (f.fid << 32) + n.file_row_number + 1 AS rid,
               n.* EXCLUDE (file_index, file_row_number, status, width, height, original_width, original_height),
               coalesce(original_width, width)::BIGINT * coalesce(original_height, height)::BIGINT AS area,
               {rules.case_expression(ctx.sql_rules)} AS reason, {_HASHES.format(p="n.")}
        FROM norm n JOIN files f ON n.file_index = f.fid::UBIGINT""")
    # the join with files (rid could be computed from file_index alone) is kept on purpose: a plain
    # read_parquet -> CREATE TABLE goes through DuckDB's ordered batch insert, which writes compressed
    # row groups, and the UPDATEs of reason that follow then take about ten times longer (DuckDB 2.0)


# ---------------------------------------------------------------- 2. language


def apply_language_rule(ctx: RunContext) -> None:
    """``reason = 'language'`` for the rows no earlier rule dropped whose caption is confidently in
    another language (:func:`language.other_language_mask`), streamed in batches. Every caption is
    classified, repeats included: the compiled model costs less per caption than finding the
    distinct captions first (a hash aggregate over all of them)."""
    c, con = ctx.c, ctx.con
    if not c.language:
        return
    reader = con.sql("SELECT rid, caption FROM rows WHERE reason IS NULL AND caption IS NOT NULL").to_arrow_reader(
        BATCH_ROWS
    )
    flagged = []
    for batch in reader:
        mask = language.other_language_mask(batch.column(1), c.language, c.language_min_confidence, c.duckdb_threads)
        if mask.any():
            flagged.append(batch.column(0).filter(pa.array(mask)))
    del reader
    if flagged:
        con.register("_lang", pa.table({"rid": pa.concat_arrays(flagged)}))
        con.execute("""UPDATE rows SET reason = 'language' FROM _lang
                       WHERE rows.rid = _lang.rid AND rows.reason IS NULL""")
        con.unregister("_lang")


# ---------------------------------------------------------------- 3. decontamination


def decontaminate(ctx: RunContext) -> None:
    """``reason = 'eval_contamination'`` for the rows still kept whose pHash is within
    ``phash_max_distance`` bits (0 when that is off) of an eval-set image's."""
    con = ctx.con
    if ctx.eval_hashes is None or not len(ctx.eval_hashes):
        return
    con.execute("""CREATE TEMP TABLE _ph AS SELECT min(rid) AS gid, phash FROM rows
                   WHERE reason IS NULL AND phash IS NOT NULL GROUP BY phash""")
    con.register("_eval", pa.table({"phash": pa.array(ctx.eval_hashes, pa.int64())}))
    hit = near.near_any(con, "_ph", "_eval", max(ctx.c.phash_max_distance, 0))
    con.unregister("_eval")
    if len(hit):
        con.register("_hit", pa.table({"gid": pa.array(hit, pa.int64())}))
        con.execute("""UPDATE rows SET reason = 'eval_contamination' WHERE reason IS NULL AND phash IN
                       (SELECT phash FROM _ph WHERE gid IN (SELECT gid FROM _hit))""")
        con.unregister("_hit")
    con.execute("DROP TABLE _ph")


# ---------------------------------------------------------------- 4. deduplication


def deduplicate(ctx: RunContext) -> None:
    """The keep-first rule (:mod:`.dedup`) over the parent's rows (first, all kept) and the rows
    still kept: ``reason`` = the rule's reason for the new rows it drops.

    Only rows sharing a value with another row (or a pHash within the distance of another) can be
    dropped or make another row a duplicate, so exactly those are fetched and visited, in the
    keep-first order: (1) the near pairs among the distinct pHashes; (2) the candidates, rows whose
    URL / key / sha256 (/ caption+sha256) 64-bit hash or pHash repeats (:func:`dedup.candidates`; a
    superset of the rows with a real duplicate); (3) their exact groups, from the values themselves
    (a hash collision can add a candidate, never merge two different values), and the visit."""
    c, con = ctx.c, ctx.con
    _union_with_parent(ctx)
    with timed(ctx, PAIR_SEARCH):
        ctx.pairs = _phash_pairs(ctx)
    # the caption rule compares every row's caption: no candidate pass, every row is visited
    everything = c.caption_near_dedup
    n_u = db.count(con, "_u")
    with db.yield_memory(con, c, db.HASH_BYTES_PER_ROW * n_u if not everything else 0):
        cand = None if everything else _candidates(ctx)
    with db.yield_memory(
        con, c, db.VISIT_BYTES_PER_ROW * (n_u if cand is None else len(cand)) if not c.caption_near_dedup else 0
    ):
        tab = _fetch_in_visiting_order(ctx, cand)
        del cand
        with timed(ctx, KEEP_FIRST):
            rid = tab.column("rid").to_numpy().astype(np.int64)
            codes = dedup.keep_first_table(tab, ctx.pairs, _dedup_options(c))
            ctx.n_visited = int(len(rid))
    _mark_dropped(ctx, codes, rid)
    del tab, rid, codes
    ctx.pairs = None
    con.execute("DROP VIEW _u")


def _union_with_parent(ctx: RunContext) -> None:
    """Table ``parent`` (the parent's rows, rid <= 0 in key order) and view ``_u``: the parent's
    rows and the rows still kept, with the columns deduplication reads."""
    con = ctx.con
    parent_files = [ctx.snapshots_dir / f for f in ctx.parent["manifest"]["files"]] if ctx.parent else []
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


def _phash_pairs(ctx: RunContext) -> np.ndarray:
    """The pairs of distinct pHash values of ``_u`` within ``phash_max_distance`` bits (a pHash
    value is its own id); none when the near-duplicate rule is off."""
    con, c = ctx.con, ctx.c
    if c.phash_max_distance < 0:
        return np.zeros((0, 2), dtype=np.int64)
    con.execute("CREATE TEMP TABLE _phd AS SELECT DISTINCT phash AS gid, phash FROM _u WHERE phash IS NOT NULL")
    with db.yield_memory(con, c, db.PAIR_SEARCH_BYTES_PER_HASH * db.count(con, "_phd")):
        pairs = near.near_pairs(con, "_phd", c.phash_max_distance)
    con.execute("DROP TABLE _phd")
    return pairs


def _candidates(ctx: RunContext) -> np.ndarray:
    """The rids of ``_u`` that can take part in a duplicate (:func:`dedup.candidates`)."""
    # with dup_image on, a row sharing caption AND sha256 with a kept row always meets dup_image
    # first, so the caption+sha256 relation is only needed for exact_image_dedup = "image_and_caption"
    same_image = ctx.c.exact_image_dedup == "image"
    h = ctx.con.sql(f"""
        SELECT rid, h_url AS url, h_key AS key, h_sha256 AS sha256,
               {"NULL::UBIGINT" if same_image else "CASE WHEN caption IS NOT NULL AND sha256 IS NOT NULL THEN hash(caption, sha256) END"} AS ci,
               phash FROM _u""").to_arrow_table()
    # a pHash within the distance of another one is a candidate too
    repeats = dedup.candidates(
        h, ["url", "key", "sha256", "ci", "phash"], also={"phash": ctx.pairs.reshape(-1)}, threads=ctx.c.duckdb_threads
    )
    return h.column("rid").to_numpy()[repeats]


def _fetch_in_visiting_order(ctx: RunContext, cand: np.ndarray | None) -> pa.Table:
    """The rows of ``_u`` to visit (the candidates, or all), with what the keep-first rule reads,
    in the keep-first order: parent first, then shards in catalog order, largest original image,
    smallest key."""
    con, c = ctx.con, ctx.c
    if cand is not None:
        con.register("_cand", pa.table({"rid": pa.array(cand, pa.int64())}))
    with_caption = c.caption_near_dedup or c.exact_image_dedup != "image"
    tab = con.sql(f"""
        SELECT rid, is_parent, url, key, sha256, phash{", caption" if with_caption else ""},
               h_url, h_key, h_sha256
        FROM _u {"SEMI JOIN _cand USING (rid)" if cand is not None else ""}
        ORDER BY is_parent DESC, {sources.RID_FILE}, area DESC NULLS LAST, key, rid""").to_arrow_table()
    if cand is not None:
        con.unregister("_cand")
    return tab


def _dedup_options(c: CurateConfig) -> dedup.DedupOptions:
    return dedup.DedupOptions(
        same_image=c.exact_image_dedup == "image",
        near_image=c.phash_max_distance >= 0,
        near_caption=c.caption_near_dedup,
        minhash_threshold=c.caption_minhash_threshold,
        minhash_perm=c.caption_minhash_perm,
        shingle_chars=c.caption_shingle_chars,
    )


def _mark_dropped(ctx: RunContext, codes: np.ndarray, rid: np.ndarray) -> None:
    """Set ``reason`` of the new rows (rid > 0; parent rows are never dropped) the visit dropped."""
    drop = (codes > 0) & (rid > 0)
    if not drop.any():
        return
    ctx.con.register(
        "_mark",
        pa.table(
            {
                "rid": rid[drop],
                "reason": pa.array(np.array(dedup.REASONS, dtype=object)[codes[drop] - 1].tolist(), pa.string()),
            }
        ),
    )
    ctx.con.execute("""UPDATE rows SET reason = _mark.reason FROM _mark
                       WHERE rows.rid = _mark.rid AND rows.reason IS NULL""")
    ctx.con.unregister("_mark")


# ---------------------------------------------------------------- 5. CLIP score


def apply_clip_score(ctx: RunContext) -> None:
    """``reason = 'clip_score'`` for the rows still kept whose image-caption similarity under the
    scoring model (:mod:`.clip_score`) is below ``clip_score_threshold``, or outside the top
    ``clip_score_keep_fraction`` of them (ties with the last kept score are kept; an undecodable
    image scores NaN and is dropped). Runs last, so it scores only rows every other rule kept; the
    parent's rows are never scored again. Scores come from the cache when that model scored the
    same image and caption before; the rest are scored and added to it. Every scored row keeps its
    score in ``rows.clip_score``, and the snapshot stores it with the model's label."""
    c, con = ctx.c, ctx.con
    if c.clip_score_threshold is None and c.clip_score_keep_fraction is None:
        return
    from clipline.components.curate import clip_score

    scorer = clip_score.load_scorer(ctx.cfg)
    if scorer is None:
        ctx.clip = {"skipped": f"no '{clip_score.CHAMPION}' in the registry yet: nothing to score with"}
        return
    con.execute("""CREATE TEMP TABLE _cs AS
                   SELECT rid, sha256, md5(coalesce(caption, '')) AS caption_md5, caption FROM rows
                   WHERE reason IS NULL""")
    cache = clip_score.cache_dir(ctx.cfg, scorer)
    parts = sorted(cache.glob("part-*.parquet")) if cache.is_dir() else []
    con.execute("CREATE TEMP TABLE _scores (rid BIGINT, score FLOAT)")
    if parts:
        con.execute(f"""INSERT INTO _scores
                        SELECT _cs.rid, c.score FROM _cs JOIN (
                            SELECT sha256, caption_md5, any_value(score) AS score
                            FROM read_parquet({sources.sql_list(parts)}) GROUP BY ALL) c
                        USING (sha256, caption_md5)""")
    n_cached = db.count(con, "_scores")
    reader = con.sql(f"""
        SELECT m.rid, m.sha256, m.caption_md5, m.caption, {sources.image_expr(ctx.schema)} AS image
        FROM read_parquet({sources.sql_list(ctx.paths)}, union_by_name = true, filename = true,
                          file_row_number = true) r
        JOIN files f ON r.filename = f.filename
        JOIN (SELECT *, {sources.RID_FILE} AS fid, {sources.RID_ROW} AS file_row_number
              FROM _cs ANTI JOIN _scores USING (rid)) m
          ON f.fid = m.fid AND r.file_row_number = m.file_row_number""").to_arrow_reader(BATCH_ROWS // 16)
    new_rids, new_scores = [], []  # the connection is busy streaming: inserted after the loop
    t0 = time.perf_counter()
    for batch in reader:
        images = batch.column("image").to_pylist()
        scores = clip_score.score_pairs(
            scorer, images, batch.column("caption").to_pylist(), batch_size=c.clip_score_batch_size
        )
        clip_score.write_cache_part(
            cache, batch.column("sha256").to_pylist(), batch.column("caption_md5").to_pylist(), scores
        )
        new_rids.append(batch.column("rid"))
        new_scores.append(pa.array(scores, pa.float32()))
    del reader
    seconds = time.perf_counter() - t0
    n_scored = sum(len(r) for r in new_rids)
    if n_scored:
        con.register("_new", pa.table({"rid": pa.chunked_array(new_rids), "score": pa.chunked_array(new_scores)}))
        con.execute("INSERT INTO _scores SELECT rid, score FROM _new")
        con.unregister("_new")
    con.execute("ALTER TABLE rows ADD COLUMN clip_score FLOAT")
    con.execute("UPDATE rows SET clip_score = _scores.score FROM _scores WHERE rows.rid = _scores.rid")
    scores = con.sql("SELECT score FROM _scores").to_arrow_table().column(0).to_numpy(zero_copy_only=False)
    threshold = c.clip_score_threshold
    if threshold is None and len(scores):
        ranked = np.sort(scores[~np.isnan(scores)])[::-1]
        keep = int(np.ceil(c.clip_score_keep_fraction * len(scores)))
        threshold = float(ranked[min(keep, len(ranked)) - 1]) if keep and len(ranked) else float("inf")
    if threshold is not None:
        con.execute(
            "UPDATE rows SET reason = 'clip_score' WHERE reason IS NULL AND (clip_score < ? OR isnan(clip_score))",
            [threshold],
        )
    con.execute("DROP TABLE _cs")
    con.execute("DROP TABLE _scores")
    finite = scores[~np.isnan(scores)]
    ctx.clip = {
        "model": scorer.label,
        "model_sha256": scorer.identity,
        "threshold": threshold,
        "keep_fraction": c.clip_score_keep_fraction,
        "rows": int(len(scores)),
        "scored": n_scored,
        "from_cache": n_cached,
        "undecodable": int(np.isnan(scores).sum()),
        "score_mean": float(finite.mean()) if len(finite) else None,
        "scoring_pairs_per_s": round(n_scored / seconds, 1) if n_scored and seconds > 0 else None,
    }


# ---------------------------------------------------------------- 6. split, counts, content hash


def split_and_hash(ctx: RunContext) -> dict | None:
    """Table ``kept`` (with split and key hash), the counts, and the snapshot id: a content hash
    of every kept row (key, sha256, caption, split) in key order, parent's included, and the
    source shards. Returns the catalog record of an existing snapshot with that id (the run ends
    there), else None."""
    c, con = ctx.c, ctx.con
    con.execute(f"""
        CREATE TEMP TABLE kept AS
        SELECT * EXCLUDE (reason, h, h_url, h_key, h_sha256), {hashing.split_sql("h", c.val_fraction)} AS split, h
        FROM (SELECT *, key_hash(key) AS h FROM rows WHERE reason IS NULL)""")
    order = rules.rule_order(ctx.sql_rules)
    dropped_raw = dict(con.execute("SELECT reason, count(*) FROM rows WHERE reason IS NOT NULL GROUP BY 1").fetchall())
    ctx.counts = {
        "input": db.count(con, "rows"),
        "kept": db.count(con, "kept"),
        "dropped": {r: int(dropped_raw.get(r, 0)) for r in order},
    }
    # the sorted rows stay in DuckDB and are hashed in streamed batches
    con.execute("""
        CREATE TEMP TABLE _content AS
        SELECT concat_ws(chr(31), key, coalesce(sha256, ''), coalesce(caption, ''), split) AS s FROM (
            SELECT key, sha256, caption, split FROM kept UNION ALL SELECT key, sha256, caption, split FROM parent)
        ORDER BY key, s""")
    cnt, content_digest = hashing.digest_table_column(con, "_content", "s", BATCH_ROWS)
    con.execute("DROP TABLE _content")
    ctx.n_rows = int(cnt)
    ctx.source_shards = sorted(
        set(ctx.parent["manifest"]["source_shards"] if ctx.parent else []) | {f.shard_id for f in ctx.files}
    )
    ctx.snapshot_id = hashlib.sha256(json.dumps([cnt, content_digest, ctx.source_shards]).encode()).hexdigest()[:16]
    try:
        existing = ctx.cat.get_snapshot(ctx.snapshot_id)
    except KeyError:
        existing = None
    if existing is not None and (ctx.snapshots_dir / ctx.snapshot_id / "manifest.json").exists():
        return existing
    ctx.split_counts = dict(
        con.execute(
            "SELECT split, count(*) FROM (SELECT split FROM kept UNION ALL SELECT split FROM parent) GROUP BY 1"
        ).fetchall()
    )
    return None


# ---------------------------------------------------------------- 7. write the snapshot


def _tmp_dir(ctx: RunContext) -> Path:
    return ctx.snapshots_dir / f".{ctx.snapshot_id}.tmp"


def write_snapshot(ctx: RunContext) -> None:
    """The kept new rows with their image bytes (the only read of image bytes), shuffled by a hash
    of (key, snapshot id), as Parquet files in a temporary directory; the manifest."""
    c, con, schema = ctx.c, ctx.con, ctx.schema
    tmp_dir = _tmp_dir(ctx)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    new_files: list[str] = []
    if ctx.counts["kept"]:
        con.create_function(
            "shuffle_key",
            hashing.shuffle_udf(ctx.snapshot_id),
            [duckdb.sqltype("UBIGINT")],
            duckdb.sqltype("BIGINT"),
            type="arrow",
        )
        carried = sources.carried_columns(schema)
        carried_sql = "".join(f", r.{sources.quote_ident(col)}" for col in carried)
        label = str(ctx.clip.get("model", "")).replace("'", "''")
        scored_sql = f", k.clip_score, '{label}' AS clip_score_model" if "model" in ctx.clip else ""
        con.execute(f"""
            COPY (
                SELECT k.key, k.url, k.caption, {sources.image_expr(schema)} AS image,
                       {sources.meta_select(schema, names=sources.SIZE_COLUMNS)}, k.sha256, k.phash, k.split{carried_sql}{scored_sql}
                FROM read_parquet({sources.sql_list(ctx.paths)}, union_by_name = true, filename = true,
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
        new_files = [f"{ctx.snapshot_id}/{p.name}" for p in written]
    parent = ctx.parent
    ctx.manifest = {
        "snapshot_id": ctx.snapshot_id,
        "parent_id": parent["snapshot_id"] if parent else None,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": c.model_dump(mode="json"),
        "config_fingerprint": ctx.fingerprint,
        "eval_fingerprint": ctx.eval_fingerprint,
        "rebuild_reason": ctx.rebuild_reason,
        "source_shards": ctx.source_shards,
        "new_shards": [f.shard_id for f in ctx.files],
        "rule_order": rules.rule_order(ctx.sql_rules),
        "counts": ctx.counts,
        "cumulative_counts": _cumulative(parent["manifest"].get("cumulative_counts") if parent else None, ctx.counts),
        "n_rows": ctx.n_rows,
        "n_train": int(ctx.split_counts.get("train", 0)),
        "n_val": int(ctx.split_counts.get("val", 0)),
        "files": (list(parent["manifest"]["files"]) if parent else []) + new_files,
        "new_files": new_files,
        "dedup_rows_visited": ctx.n_visited,
        "clip_score": ctx.clip or None,
    }


def _cumulative(prev: dict | None, counts: dict) -> dict:
    if not prev:
        return json.loads(json.dumps(counts))
    out = {
        "input": prev.get("input", 0) + counts["input"],
        "kept": prev.get("kept", 0) + counts["kept"],
        "dropped": dict(prev.get("dropped", {})),
    }
    for r, n in counts["dropped"].items():
        out["dropped"][r] = out["dropped"].get(r, 0) + n
    return out


# ---------------------------------------------------------------- 8. report, then publish


def report_and_publish(ctx: RunContext) -> None:
    """The report (table, contact sheet, dropped rows), then the snapshot published atomically:
    manifest written, temporary directory renamed, catalog record."""
    from clipline.components.curate import report

    final_dir = ctx.snapshots_dir / ctx.snapshot_id
    ctx.report = report.write_report(
        ctx.con,
        ctx.cfg.reports_dir / "curate" / ctx.snapshot_id,
        ctx.manifest,
        ctx.schema,
        ctx.paths,
        ctx.c.contact_sheet_examples,
    )
    ctx.sample_spill()
    ctx.manifest["duckdb_spilled_bytes_max"] = ctx.spilled_max  # at step boundaries; 0: it all fit in memory
    ctx.manifest["report"] = {k: str(v) for k, v in ctx.report.items()}
    tmp_dir = _tmp_dir(ctx)
    (tmp_dir / "manifest.json").write_text(json.dumps(ctx.manifest, indent=2, default=str))
    if final_dir.exists():
        shutil.rmtree(final_dir)  # a leftover of a run that crashed before recording it
    tmp_dir.rename(final_dir)
    ctx.cat.record_snapshot(
        ctx.snapshot_id, ctx.manifest["parent_id"], final_dir, ctx.n_rows, ctx.manifest, ctx.source_shards
    )


#: the steps in order: (name in timings and progress, function). A step that returns a catalog
#: record ends the run with that existing snapshot.
PLAN: list[tuple[str, Callable[[RunContext], dict | None]]] = [
    ("read metadata and apply rules", read_and_apply_rules),
    ("language", apply_language_rule),
    ("decontamination", decontaminate),
    ("deduplication", deduplicate),
    ("clip score", apply_clip_score),
    ("split and content hash", split_and_hash),
    ("write snapshot", write_snapshot),
    ("report", report_and_publish),
]
STEPS = [name for name, _ in PLAN]
