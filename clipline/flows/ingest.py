"""Prefect flow `ingest`: URL lists -> raw shards, with a markdown artifact of the run's stats."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from clipline.components.config import Config
from clipline.components.ingest.runner import IngestResult, ingest


def ingest_report_markdown(r: IngestResult) -> str:
    lines = [
        "## Ingest",
        "",
        "| | |",
        "|---|---|",
        f"| URLs listed (unique) | {r.n_listed} |",
        f"| already in the catalog (skipped) | {r.n_already_seen} |",
        f"| fetched this run | {r.n_fetched} |",
        f"| success | {r.n_success} |",
        f"| failed | {r.n_failed} |",
        f"| MB downloaded | {r.bytes_downloaded / 1e6:.1f} |",
        f"| duration | {r.duration_s:.1f} s ({r.images_per_s:.0f} images/s) |",
        f"| shards written | {len(r.shards)} |",
    ]
    if r.failures:
        lines += ["", "| failure | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r.failures.items()]
    if any(r.recovered.values()):
        lines += ["", f"Recovered after an interrupted run: {r.recovered}"]
    return "\n".join(lines)


@flow(name="ingest", log_prints=True)
def ingest_flow(url_lists: list[str], cfg: Config) -> IngestResult:
    """Ingest the URL lists into raw shards (only URLs the catalog has not seen)."""
    logger = get_run_logger()
    result = ingest(cfg, url_lists)
    logger.info(
        "ingest: %d fetched (%d ok, %d failed), %d skipped as seen, %d shards",
        result.n_fetched,
        result.n_success,
        result.n_failed,
        result.n_already_seen,
        len(result.shards),
    )
    create_markdown_artifact(
        markdown=ingest_report_markdown(result), key="ingest-report", description="clipline ingest run"
    )
    return result
