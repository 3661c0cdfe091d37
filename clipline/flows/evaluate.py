"""Prefect flow ``evaluate``: evaluate a model, optionally register it and apply the promotion
rule, and publish a markdown artifact with the results table. Logic lives in components."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from clipline.components.config import Config, load_config
from clipline.components.evaluate.datasets import load_eval_dataset
from clipline.components.evaluate.stage import EvalResult, evaluate, log_result
from clipline.components.tracking.registry import (
    RegistryResult,
    adopt_checkpoint,
    model_uri_for_run,
    plan_promotion,
    register_and_promote,
    resolve_model,
    run_exists,
)


@dataclass
class EvaluateFlowResult:
    eval: EvalResult
    registry: RegistryResult | None


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: Config,
    checkpoint_dir: Path,
    run_id: str | None,
    dataset_paths: list[str],
    snapshot_id: str | None,
    classnames: str | None = None,
    templates: str | None = None,
    log_to_mlflow: bool = True,
) -> EvalResult:
    datasets = [load_eval_dataset(p, classnames, templates) for p in dataset_paths] if dataset_paths else None
    return evaluate(
        cfg, checkpoint_dir, run_id=run_id, datasets=datasets, snapshot_id=snapshot_id, log_to_mlflow=log_to_mlflow
    )


@task(name="adopt-checkpoint", cache_policy=NO_CACHE)
def adopt_task(cfg: Config, res: EvalResult, source_run_id: str | None) -> tuple[str, str, dict[str, str]]:
    """A new run of this store for a checkpoint trained elsewhere, holding the checkpoint, its model
    and this evaluation."""
    run_id, uri, source = adopt_checkpoint(cfg, res.checkpoint_dir, source_run_id)
    log_result(cfg, res, run_id)
    return run_id, uri, source


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_task(
    cfg: Config,
    run_id: str,
    model_uri: str,
    res: EvalResult,
    parent_version: str | None,
    extra_tags: dict[str, str] | None = None,
) -> RegistryResult:
    return register_and_promote(
        cfg,
        run_id,
        model_uri,
        res.metrics,
        res.snapshot_id,
        parent_version,
        zeroshot_sets=[z.dataset for z in res.zeroshot],
        extra_tags=extra_tags,
    )


def results_markdown(res: EvalResult, reg: RegistryResult | None) -> str:
    md = res.markdown
    if reg is not None:
        d = reg.decision
        cand = "-" if d.candidate_value is None else f"{d.candidate_value:.4f}"
        champ = "-" if d.champion_value is None else f"{d.champion_value:.4f}"
        md += (
            f"\n## Registry\n\n| version | alias | `{d.metric}` | champion (v{d.champion_version or '-'}) | reason |\n"
            f"|---|---|---:|---:|---|\n| {reg.version} | **{reg.alias}** | {cand} | {champ} | {d.reason} |\n"
        )
    return md


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model: str | None = None,
    datasets: list[str] | None = None,
    classnames: str | None = None,
    templates: str | None = None,
    snapshot_id: str | None = None,
    run_id: str | None = None,
    register_model: bool = False,
    model_uri: str | None = None,
    parent_version: str | None = None,
    cfg: Config | None = None,
    config_file: str | None = None,
) -> EvaluateFlowResult:
    """Evaluate ``model`` (checkpoint path, version, alias or models:/ URI; None = champion or the newest
    checkpoint) on ``datasets`` (default ``evaluate.datasets``; ``classnames``/``templates`` files apply to
    each of them) and the snapshot's val split.
    With ``register_model``, the model is registered as a new version and promoted by the documented rule.

    A checkpoint whose MLflow run is not in this tracking store (trained with another store: a
    colleague's, a copied data dir), or that has no run, is evaluated without touching any run;
    with ``register_model`` it is then logged into a new run of this store, tagged with where it
    came from (``clipline.source_checkpoint``, ``clipline.source_run_id``), and registered from there."""
    cfg = cfg or load_config(Path(config_file) if config_file else None)
    resolved = resolve_model(cfg, model)
    run_id = run_id or resolved.run_id
    outside = run_id is None or not run_exists(cfg, run_id)
    snap = snapshot_id
    if snap is None and resolved.snapshot_id and (cfg.snapshots_dir / resolved.snapshot_id).is_dir():
        snap = resolved.snapshot_id  # else the stage notes that the checkpoint's snapshot is not here
    res = evaluate_task(
        cfg,
        resolved.checkpoint_dir,
        None if outside else run_id,
        list(datasets or []),
        snap,
        classnames,
        templates,
        log_to_mlflow=not outside,
    )
    where = f"its run {run_id} is not in {cfg.mlflow_uri}" if run_id else "it has no MLflow run"
    reg = None
    if outside and not register_model:
        res.notes.append(f"metrics not logged: {where} (--register evaluates it into a new run of this store)")
    if register_model:
        extra = None
        if outside:
            plan_promotion(cfg, res.metrics, None, [z.dataset for z in res.zeroshot])  # fail before logging anything
            source_run = run_id
            run_id, model_uri, extra = adopt_task(cfg, res, source_run)
            extra["config_hash"] = "unknown: outside checkpoint"
            res.notes.append(f"{where}: evaluated into the new run {run_id} of this store")
        uri = model_uri or model_uri_for_run(cfg, run_id)
        reg = register_task(cfg, run_id, uri, res, parent_version, extra)
    create_markdown_artifact(
        key="evaluation", markdown=results_markdown(res, reg), description=f"evaluation of {resolved.ref}"
    )
    return EvaluateFlowResult(eval=res, registry=reg)
