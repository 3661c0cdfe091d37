"""The curate stage: raw shards in the catalog -> the next versioned snapshot.

Steps (each timed and reported; :mod:`.steps`): read metadata of the new shards (no image bytes),
normalise captions and apply the SQL rules (rules.sql) -> language -> decontamination ->
keep-first deduplication against the parent snapshot and within the new rows -> split and content
hash -> write the accepted rows with their image bytes (the only read of image bytes) -> report,
manifest, catalog record.

Incremental rule: the next snapshot is the latest snapshot plus the newly accepted rows from shards
it has not consumed, deduplicated against it. It is rebuilt from all shards instead when the rule
configuration, the rules file, the blocklist or the eval set changed since the latest snapshot
(or with ``from_scratch``), because its rows were chosen under other rules.

This module chooses what to build on, holds the catalog lock and the DuckDB connection for the run,
and drives the steps over one :class:`~.steps.RunContext`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from clipline.components.catalog import Catalog
from clipline.components.config import Config, CurateConfig
from clipline.components.curate import db, rules, sources
from clipline.components.curate.evalset import eval_hashes, fingerprint
from clipline.components.curate.steps import PLAN, SETUP, STEPS, ProgressFn, RunContext, timed, warm_up

__all__ = ["curate", "CurateResult", "CurateError", "ProgressFn", "STEPS", "SETUP", "config_fingerprint"]

#: config fields that do not change which rows are kept (so they never force a rebuild)
NON_RULE_FIELDS = {
    "row_group_rows",
    "file_size_mb",
    "duckdb_memory_limit",
    "duckdb_temp_dir",
    "duckdb_threads",
    "contact_sheet_examples",
    "clip_score_batch_size",
    "clip_score_device",
    "eval_set",
    "blocklist_file",
    "rules_file",
}


class CurateError(RuntimeError):
    """The stage cannot run; the message says why and what to do."""


@dataclass
class CurateResult:
    snapshot_id: str
    parent_id: str | None
    path: Path  # the snapshot directory
    n_rows: int  # rows in the whole snapshot (parent's included)
    n_train: int
    n_val: int
    counts: dict  # this run: {"input", "kept", "dropped": {rule: n}}
    report_path: Path | None
    contact_sheet_path: Path | None
    new: bool  # False: nothing new, the existing snapshot is returned
    manifest: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)  # CPU seconds of this process per step
    mlflow_run_id: str | None = None


def curate(
    cfg: Config,
    eval_set: Path | None = None,
    progress: ProgressFn | None = None,
    *,
    from_scratch: bool = False,
    track: bool = True,
    rules_file: Path | None = None,
) -> CurateResult:
    """Build the next snapshot from the raw shards registered in the catalog (see module doc).

    Returns the existing latest snapshot (``new=False``) when no shard is new and the rules are
    unchanged, or when the rows it would write equal an existing snapshot's. Raises CurateError
    when there is nothing to curate, EvalSetError for an unreadable eval set, ValueError for a bad
    rules or blocklist file.
    """
    from clipline.components.curate import report

    c = cfg.curate
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
            raise CurateError(
                f"no complete raw shards are registered in {cfg.catalog_path}: run `clipline ingest URL_LIST` first"
            )
        latest = cat.latest_snapshot()
        if from_scratch:
            parent, rebuild_reason = None, ("from scratch, as asked" if latest else None)
        else:
            parent, rebuild_reason = _parent_usable(latest, fp, efp, snapshots_dir)
        consumed = set(parent["manifest"].get("source_shards", [])) if parent else set()
        new_shards = [s for s in shards if s.shard_id not in consumed]
        if parent is not None and not new_shards:
            _done(progress)
            return _result_from_record(parent, snapshots_dir, new=False)
        ctx = RunContext(
            cfg=cfg,
            con=db.connect(cfg),
            cat=cat,
            files=[sources.ShardFile(s.shard_id, Path(s.path), i) for i, s in enumerate(new_shards)],
            parent=parent,
            sql_rules=sql_rules,
            fingerprint=fp,
            eval_hashes=ehashes,
            eval_fingerprint=efp,
            rebuild_reason=rebuild_reason,
            progress=progress,
        )
        try:
            with timed(ctx, SETUP):
                warm_up(ctx)
            res = _run_steps(ctx)
        except duckdb.OutOfMemoryException as e:
            raise CurateError(
                f"DuckDB ran out of memory in step '{ctx.step}' with [curate] duckdb_memory_limit = "
                f"{c.duckdb_memory_limit} and duckdb_threads = {c.duckdb_threads} (what did not fit was spilled to "
                f"{db.con_temp_dir(cfg)} first): raise duckdb_memory_limit or lower duckdb_threads. DuckDB said: "
                f"{str(e).splitlines()[0]}"
            ) from e
        finally:
            ctx.con.close()
    _done(progress)
    res.timings = ctx.timings
    res.cpu_timings = ctx.cpu_timings
    if res.new:
        _finalise_manifest_timings(res, snapshots_dir)
        if track:
            res.mlflow_run_id = report.log_to_mlflow(cfg, res)
    return res


def _run_steps(ctx: RunContext) -> CurateResult:
    """The steps of :data:`~.steps.PLAN` in order, each timed and reported. A step that returns a
    catalog record (an existing snapshot holds exactly the rows this run would write) ends the run
    with that snapshot."""
    for name, step in PLAN:
        with timed(ctx, name):
            existing = step(ctx)
        if existing is not None:
            return _result_from_record(existing, ctx.snapshots_dir, new=False)
    m = ctx.manifest
    return CurateResult(
        snapshot_id=ctx.snapshot_id,
        parent_id=m["parent_id"],
        path=ctx.snapshots_dir / ctx.snapshot_id,
        n_rows=ctx.n_rows,
        n_train=m["n_train"],
        n_val=m["n_val"],
        counts=ctx.counts,
        report_path=ctx.report.get("markdown"),
        contact_sheet_path=ctx.report.get("contact_sheet"),
        new=True,
        manifest=m,
    )


def _done(progress: ProgressFn | None) -> None:
    if progress:
        progress("done", len(STEPS), len(STEPS))


def config_fingerprint(c: CurateConfig, sql: list[rules.Rule]) -> str:
    """Hash of everything that decides which rows are kept (rules text with values filled in)."""
    data = {k: v for k, v in c.model_dump(mode="json").items() if k not in NON_RULE_FIELDS}
    data["rules"] = [(r.name, r.sql) for r in sql]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _parent_usable(
    parent: dict | None, fp: str, efp: str | None, snapshots_dir: Path
) -> tuple[dict | None, str | None]:
    """(the latest snapshot if the next one can build on it, else None; why not)."""
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


def _result_from_record(rec: dict, snapshots_dir: Path, new: bool) -> CurateResult:
    m = rec["manifest"]
    rep = m.get("report", {})
    return CurateResult(
        snapshot_id=rec["snapshot_id"],
        parent_id=rec["parent_id"],
        path=snapshots_dir / rec["snapshot_id"],
        n_rows=int(rec["n_rows"]),
        n_train=int(m.get("n_train", 0)),
        n_val=int(m.get("n_val", 0)),
        counts=m.get("counts", {}),
        report_path=Path(rep["markdown"]) if rep.get("markdown") else None,
        contact_sheet_path=Path(rep["contact_sheet"]) if rep.get("contact_sheet") else None,
        new=new,
        manifest=m,
        timings=m.get("timings", {}),
    )


def _finalise_manifest_timings(res: CurateResult, snapshots_dir: Path) -> None:
    res.manifest["timings"] = res.timings
    res.manifest["cpu_timings"] = res.cpu_timings
    (snapshots_dir / res.snapshot_id / "manifest.json").write_text(json.dumps(res.manifest, indent=2, default=str))
