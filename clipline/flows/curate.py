"""Prefect flow ``curate``: build the next snapshot from the raw shards in the catalog and publish
the report (rule table + contact sheet path) as artifacts. Logic lives in
``clipline.components.curate``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from clipline.components.config import Config, load_config
from clipline.components.curate import CurateResult, curate
from clipline.components.curate.stage import ProgressFn

_progress: ProgressFn | None = None


@contextmanager
def progress_to(fn: ProgressFn | None) -> Iterator[None]:
    """Send the stage's progress (step, done, total) to ``fn`` while flows run in this process
    (a callable is not a flow parameter Prefect can record)."""
    global _progress
    old, _progress = _progress, fn
    try:
        yield
    finally:
        _progress = old


@task(name="build-snapshot", cache_policy=NO_CACHE)
def build_snapshot(cfg: Config, eval_set: str | None, from_scratch: bool) -> CurateResult:
    return curate(cfg, Path(eval_set) if eval_set else None, progress=_progress, from_scratch=from_scratch)


def result_markdown(res: CurateResult) -> str:
    if res.report_path and Path(res.report_path).exists():
        md = Path(res.report_path).read_text()
    else:
        md = f"# Curate: snapshot `{res.snapshot_id}`\n"
    if not res.new:
        md = f"**Nothing new**: snapshot `{res.snapshot_id}` is unchanged.\n\n" + md
    if res.contact_sheet_path:
        md += f"\nContact sheet of dropped examples: `{res.contact_sheet_path}`\n"
    if res.timings:
        md += "\n| step | seconds |\n|---|---:|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in res.timings.items())
    return md


@flow(name="curate", log_prints=True)
def curate_flow(
    eval_set: str | None = None, from_scratch: bool = False, cfg: Config | None = None, config_file: str | None = None
) -> CurateResult:
    """Curate the raw shards into the next snapshot (see clipline.components.curate.stage)."""
    cfg = cfg or load_config(Path(config_file) if config_file else None)
    res = build_snapshot(cfg, eval_set, from_scratch)
    create_markdown_artifact(
        key="curate-report", markdown=result_markdown(res), description=f"curate report for snapshot {res.snapshot_id}"
    )
    rows = [{"rule": r, "dropped": n} for r, n in res.counts.get("dropped", {}).items()]
    rows.append({"rule": "kept", "dropped": res.counts.get("kept", 0)})
    create_table_artifact(key="curate-counts", table=rows, description=f"rows per rule, snapshot {res.snapshot_id}")
    print(f"snapshot {res.snapshot_id}: {res.n_rows} rows (train {res.n_train}, val {res.n_val}), new={res.new}")
    return res
