"""Prefect flow `refresh`: new URL lists in the inbox -> only the new URLs ingested -> the next
snapshot built incrementally -> the champion fine-tuned on it (or a model trained from scratch when
there is no champion, or with ``refresh.from_scratch``) -> evaluated -> registered as a new version
whose ``parent_version`` is the champion it started from -> promoted by the registry's rule.

What a user can rely on:
- Sources: every URL list directly in ``refresh.inbox`` (a folder under the data dir by default, or
  any fsspec URL). Lists are moved to ``<inbox>/done/`` once ingested; a list that cannot be read
  is moved to ``<inbox>/failed/`` with the reason beside it, and the others go on (see
  ``clipline.components.refresh.inbox``).
- Nothing new (inbox empty, the snapshot unchanged, and a registered version already trained on
  it) -> no training; the run says so in its log and its ``refresh-summary`` artifact.
- A snapshot left without a model by an interrupted refresh is trained on by the next one.
- One run at a time per data dir: the run holds the catalog lock ``pipeline-run`` for its whole
  length (a second refresh, or a `clipline run`, fails at once naming the holder); the served
  deployment also has a concurrency limit of 1, so scheduled runs queue instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from clipline.components.catalog import Catalog
from clipline.components.config import Config
from clipline.components.curate import CurateResult
from clipline.components.evaluate.model import Evaluation
from clipline.components.ingest.runner import IngestResult
from clipline.components.orchestration import exclusive_run, holder_name
from clipline.components.orchestration.params import served_run
from clipline.components.refresh import Inbox, unreadable_lists
from clipline.components.train.run import TrainResult
from clipline.flows.curate import curate_flow
from clipline.flows.evaluate import evaluate_trained
from clipline.flows.ingest import ingest_flow
from clipline.flows.pipeline import evaluation_rows, markdown_table, wise_ft_rows
from clipline.flows.train import train_flow


@dataclass
class RefreshResult:
    """What one refresh did. ``skipped`` says why no model was trained (None when one was)."""

    inbox: str
    lists: list[str] = field(default_factory=list)  # URL lists read this run
    archived: list[str] = field(default_factory=list)  # where they were moved
    failed_lists: dict[str, str] = field(default_factory=dict)  # unreadable list -> why (moved to failed/)
    ingest: IngestResult | None = None
    curate: CurateResult | None = None
    parent_version: str | None = None  # the champion fine-tuned from (None: from scratch)
    train: TrainResult | None = None
    evaluation: Evaluation | None = None
    skipped: str | None = None
    wise_ft_evaluation: Evaluation | None = None  # the WiSE-FT blend's, when train.wise_ft_alpha is set


def _has_raw_shards(cfg: Config) -> bool:
    if not cfg.catalog_path.exists():
        return False
    with Catalog(cfg.catalog_path, read_only=True) as cat:
        return bool(cat.shards(kind=None))


def _versions_trained_on(cfg: Config, snapshot_id: str) -> list[str]:
    """Registered versions of the model tagged with ``snapshot_id``."""
    from mlflow.exceptions import MlflowException

    from clipline.components.tracking.runs import client

    try:
        found = client(cfg).search_model_versions(f"name = '{cfg.tracking.registered_model}'")
    except MlflowException:
        return []
    return sorted(str(v.version) for v in found if (v.tags or {}).get("snapshot_id") == snapshot_id)


def _starting_point(cfg: Config, from_scratch: bool) -> tuple[Path | None, Any | None, str]:
    """(checkpoint to fine-tune from, the champion's model version, a sentence saying which)."""
    from clipline.components.tracking.registry import CHAMPION, current_alias, download_checkpoint

    if from_scratch:
        return None, None, "from scratch (refresh.from_scratch)"
    champ = current_alias(cfg, CHAMPION)
    if champ is None:
        return None, None, "from scratch (no champion registered yet)"
    name = cfg.tracking.registered_model
    ckpt = download_checkpoint(cfg, champ.run_id, f"{name}-v{champ.version}")
    return ckpt, champ, f"fine-tuned from champion {name} v{champ.version}"


def _mark_lineage(cfg: Config, run_id: str | None, champ: Any | None, how: str) -> None:
    """Tags on the train run saying what it started from (visible in the MLflow UI)."""
    if not run_id:
        return
    from clipline.components.tracking.runs import client

    c = client(cfg)
    c.set_tag(run_id, "clipline.trigger", "refresh")
    c.set_tag(run_id, "clipline.start", how)
    if champ is not None:
        c.set_tag(run_id, "clipline.parent_version", str(champ.version))
        c.set_tag(run_id, "clipline.parent_run_id", champ.run_id)


@flow(name="refresh", log_prints=True)
def refresh_flow(
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    eval_sets: list[str] | None = None,
    decontaminate: str | None = None,
    from_scratch: bool | None = None,
    cfg: Config | None = None,
) -> RefreshResult:
    """One incremental refresh (see the module docstring).

    ``config_file``/``overrides``: the configuration, as a served deployment passes it (JSON);
    ``cfg``: a ready config (in-process calls; wins over both). ``eval_sets`` default to
    ``refresh.eval_sets``, then ``evaluate.datasets``; ``decontaminate`` to ``refresh.decontaminate``
    (then ``curate.eval_set``); ``from_scratch`` to ``refresh.from_scratch``. Under `clipline serve`,
    the worker's own configuration bounds the parameters (``clipline.components.orchestration.params``).
    """
    logger = get_run_logger()
    cfg, inputs = served_run(cfg, config_file, overrides, eval_sets=eval_sets, decontaminate=decontaminate)
    eval_sets, decontaminate = inputs["eval_sets"], inputs["decontaminate"]
    rc = cfg.refresh
    eval_sets = list(eval_sets or [str(p) for p in rc.eval_sets] or []) or None
    decontaminate = decontaminate or (str(rc.decontaminate) if rc.decontaminate else None)
    from_scratch = rc.from_scratch if from_scratch is None else from_scratch

    with exclusive_run(cfg, holder_name("refresh")):
        inbox = Inbox.from_config(cfg)
        result = RefreshResult(inbox=inbox.location, lists=inbox.pending())
        logger.info("inbox %s: %d new URL list(s)", inbox.location, len(result.lists))
        if result.lists:
            result.ingest = _ingest_readable(cfg, inbox, result, logger)
            if rc.archive == "move":
                result.archived = inbox.archive([x for x in result.lists if x not in result.failed_lists])
        if result.ingest is None and not _has_raw_shards(cfg):
            result.skipped = (
                f"nothing to do: the inbox {inbox.location} has no readable URL list and nothing "
                "was ingested before; drop URL lists there"
            )
        else:
            result.curate = cur = curate_flow(eval_set=decontaminate, cfg=cfg)
            trained = _versions_trained_on(cfg, cur.snapshot_id)
            if not cur.new and trained:
                fetched = result.ingest.n_fetched if result.ingest is not None else 0
                result.skipped = (
                    f"nothing new: {len(result.lists)} list(s) in the inbox, {fetched} URLs fetched, "
                    f"snapshot {cur.snapshot_id[:12]} unchanged and already trained on (version "
                    f"{', '.join(trained)}); no training"
                )
        if result.skipped:
            logger.info(result.skipped)
        else:
            _train_and_register(cfg, result, from_scratch, eval_sets, logger)
        create_markdown_artifact(
            key="refresh-summary", markdown=summary_markdown(result), description="clipline refresh run"
        )
    return result


def _ingest_readable(cfg: Config, inbox: Inbox, result: RefreshResult, logger) -> IngestResult | None:
    """Ingest the inbox's lists. Lists are read before anything is fetched, so when one cannot be
    read, each is tried alone: the unreadable ones go to ``failed/`` with their reason (always,
    even with ``refresh.archive = "keep"``: they would fail every refresh) and the rest are ingested."""
    try:
        return ingest_flow(result.lists, cfg)
    except (ValueError, OSError):
        bad = unreadable_lists(cfg, result.lists)
        if not bad:
            raise
    for loc, why in bad.items():
        moved = inbox.quarantine(loc, why)
        logger.warning("URL list %s cannot be read (%s): moved to %s", loc, why, moved)
    result.failed_lists = bad
    good = [x for x in result.lists if x not in bad]
    return ingest_flow(good, cfg) if good else None


def _train_and_register(
    cfg: Config, result: RefreshResult, from_scratch: bool, eval_sets: list[str] | None, logger
) -> None:
    cur = result.curate
    start, champ, how = _starting_point(cfg, from_scratch)
    result.parent_version = str(champ.version) if champ is not None else None
    tcfg = cfg
    if start is not None and cfg.refresh.train_steps:
        tcfg = cfg.model_copy(deep=True)
        tcfg.train.steps = cfg.refresh.train_steps
    logger.info("training on snapshot %s, %s", cur.snapshot_id[:12], how)
    tr = train_flow(tcfg, snapshot_id=cur.snapshot_id, from_model=start)
    _mark_lineage(cfg, tr.run_id, champ, how)
    result.train = tr
    result.evaluation, result.wise_ft_evaluation = evaluate_trained(tr, cfg, eval_sets, result.parent_version)


def summary_rows(r: RefreshResult) -> list[tuple[str, str]]:
    """The refresh's headline figures as (label, value) rows, for the terminal and the artifact."""
    rows = [("inbox", f"{r.inbox}: {len(r.lists)} new URL list(s)" + (", moved to done/" if r.archived else ""))]
    for loc, why in r.failed_lists.items():
        rows.append(("unreadable list", f"{loc} -> failed/: {why}"))
    if r.ingest is not None:
        i = r.ingest
        rows.append(
            (
                "URLs",
                f"{i.n_listed:,} listed, {i.n_already_seen:,} already ingested, {i.n_fetched:,} fetched "
                f"({i.n_success:,} ok, {i.n_failed:,} failed)",
            )
        )
    if r.curate is not None:
        c = r.curate
        rows.append(
            (
                "snapshot",
                f"{c.snapshot_id[:12]} ({'new, parent ' + (c.parent_id or 'none')[:12] if c.new else 'unchanged'}): "
                f"{c.n_rows:,} rows (train {c.n_train:,}, val {c.n_val:,})",
            )
        )
    if r.skipped:
        rows.append(("training", r.skipped))
        return rows
    t = r.train
    start = f"fine-tuned from v{r.parent_version}" if r.parent_version else "from scratch"
    rows.append(("training", f"{t.model_name} {start}: {t.steps} steps, final loss {t.final_loss:.3f}"))
    return rows + evaluation_rows(r.evaluation) + wise_ft_rows(r.train, r.wise_ft_evaluation)


def summary_markdown(r: RefreshResult) -> str:
    return markdown_table("clipline refresh", summary_rows(r))
