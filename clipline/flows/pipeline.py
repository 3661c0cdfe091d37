"""Prefect flow `pipeline`: ingest -> curate -> train -> evaluate -> register/promote.

Each stage runs as a subflow and hands its typed result to the next. A run whose curate step
finds nothing new (the snapshot is unchanged) and whose registry already has a champion does no
training and says so.

The flow takes its configuration either as a ready ``cfg`` (in-process calls) or, as a served
deployment passes it, as ``config_file`` + ``overrides`` (JSON). Under `clipline serve` the
worker's own configuration bounds both, and the files the run names
(``clipline.components.orchestration.params``): a run that would switch the SSRF guard off, widen the
allow-list, move the data dir or read outside the worker's input roots is refused. A run holds
the data dir's run lock (``clipline.components.orchestration.lock``): a second pipeline or refresh on
the same data dir fails at once, naming the holder; a lock left by a killed run is taken over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from clipline.components.config import Config
from clipline.components.curate import CurateResult
from clipline.components.evaluate.model import Evaluation
from clipline.components.ingest.runner import IngestResult
from clipline.components.orchestration.lock import exclusive_run, holder_name
from clipline.components.orchestration.params import served_run
from clipline.components.train.run import TrainResult, resolve_from_model
from clipline.flows.curate import curate_flow
from clipline.flows.evaluate import evaluate_trained
from clipline.flows.ingest import ingest_flow
from clipline.flows.train import train_flow


@dataclass
class PipelineResult:
    ingest: IngestResult
    curate: CurateResult
    train: TrainResult | None = None
    evaluation: Evaluation | None = None
    skipped: str | None = None  # why training and evaluation did not run
    wise_ft_evaluation: Evaluation | None = None  # the WiSE-FT blend's, when train.wise_ft_alpha is set


def _has_champion(cfg: Config) -> bool:
    from clipline.components.tracking.registry import current_alias

    return current_alias(cfg, "champion") is not None


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    url_lists: list[str],
    cfg: Config | None = None,
    eval_sets: list[str] | None = None,
    decontaminate: str | None = None,
    from_model: str | None = None,
    force: bool = False,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> PipelineResult:
    """Run every stage once over ``url_lists``.

    ``eval_sets``: zero-shot sets for evaluation (default ``evaluate.datasets``); ``decontaminate``:
    an evaluation set whose near-duplicates are dropped from training data; ``from_model``: a
    checkpoint, or a registered version or alias, to fine-tune from; ``force``: train even when the
    snapshot did not change. ``config_file``/``overrides``: the configuration when ``cfg`` is not
    given (served deployments, bounded by the serving process: see the module docstring).
    """
    logger = get_run_logger()
    cfg, inputs = served_run(
        cfg,
        config_file,
        overrides,
        url_lists=list(url_lists),
        eval_sets=eval_sets,
        decontaminate=decontaminate,
        from_model=from_model,
    )
    url_lists, eval_sets, decontaminate, from_model = (
        inputs["url_lists"],
        inputs["eval_sets"],
        inputs["decontaminate"],
        inputs["from_model"],
    )
    with exclusive_run(cfg, holder_name("pipeline")):
        ing = ingest_flow(url_lists, cfg)
        cur = curate_flow(eval_set=decontaminate, cfg=cfg)
        if not cur.new and not force and _has_champion(cfg):
            why = (
                f"nothing new: {ing.n_already_seen} URLs already ingested, snapshot {cur.snapshot_id} unchanged, "
                f"and a champion is registered; no training (use force to train anyway)"
            )
            logger.info(why)
            result = PipelineResult(ingest=ing, curate=cur, skipped=why)
        else:
            start = resolve_from_model(cfg, from_model) if from_model else None
            tr = train_flow(cfg, snapshot_id=cur.snapshot_id, from_model=start)
            ev, blend = evaluate_trained(tr, cfg, list(eval_sets or []) or None)
            result = PipelineResult(ingest=ing, curate=cur, train=tr, evaluation=ev, wise_ft_evaluation=blend)
    create_markdown_artifact(
        key="pipeline-summary", markdown=summary_markdown(result), description="clipline pipeline run"
    )
    return result


def summary_rows(r: PipelineResult) -> list[tuple[str, str]]:
    """The pipeline's headline figures as (label, value) rows, for the terminal and artifacts."""
    rows = [
        ("URLs fetched", f"{r.ingest.n_fetched:,} ({r.ingest.n_success:,} ok, {r.ingest.n_failed:,} failed)"),
    ]
    if r.ingest.failures:
        rows.append(("failed by reason", ", ".join(f"{k} {v}" for k, v in r.ingest.failures.items())))
    counts = r.curate.counts or {}
    rows.append(
        (
            "rows kept",
            f"{counts.get('kept', 0):,} of {counts.get('input', 0):,} this run; "
            f"snapshot {r.curate.snapshot_id[:12]} has {r.curate.n_rows:,} "
            f"(train {r.curate.n_train:,}, val {r.curate.n_val:,})",
        )
    )
    dropped = {k: v for k, v in (counts.get("dropped") or {}).items() if v}
    if dropped:
        rows.append(("dropped by rule", ", ".join(f"{k} {v}" for k, v in dropped.items())))
    if r.skipped:
        rows.append(("training", r.skipped))
        return rows
    t = r.train
    rows.append(
        (
            "training",
            f"{t.model_name}: {t.steps} steps in {t.train_seconds:.0f} s, "
            f"{t.samples_per_s:.0f} samples/s, final loss {t.final_loss:.3f}",
        )
    )
    rows += evaluation_rows(r.evaluation) + wise_ft_rows(r.train, r.wise_ft_evaluation)
    return rows


def evaluation_rows(ev: Evaluation) -> list[tuple[str, str]]:
    """Zero-shot top-1 per set, retrieval R@5, and the registry's decision, as summary rows."""
    rows = []
    m = ev.eval.metrics
    for k in sorted(m):
        if k.startswith("zeroshot/") and k.endswith("/acc1"):
            rows.append((f"zero-shot top-1 ({k.split('/')[1]})", f"{m[k]:.3f}"))
    for k in ("retrieval/val/image_to_text_R5", "retrieval/val/text_to_image_R5"):
        if k in m:
            rows.append((k.replace("retrieval/val/", "retrieval R@5 ").replace("_R5", ""), f"{m[k]:.3f}"))
    reg = ev.registry
    if reg is not None:
        rows.append(("model version", f"{reg.name} v{reg.version} -> {reg.alias} ({reg.decision.reason})"))
    return rows


def wise_ft_rows(tr: TrainResult | None, ev: Evaluation | None) -> list[tuple[str, str]]:
    """The WiSE-FT blend's rows, labelled with its alpha (none without a blend)."""
    if tr is None or tr.wise_ft is None or ev is None:
        return []
    return [(f"WiSE-FT {tr.wise_ft.alpha:g}: {k}", v) for k, v in evaluation_rows(ev)]


def markdown_table(title: str, rows: list[tuple[str, str]]) -> str:
    return f"## {title}\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def summary_markdown(r: PipelineResult) -> str:
    return markdown_table("clipline pipeline", summary_rows(r))
