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
from clipline.components.evaluate.stage import EvalResult, evaluate
from clipline.components.tracking.registry import (
    RegistryResult, model_uri_for_run, register_and_promote, resolve_model,
)


@dataclass
class EvaluateFlowResult:
    eval: EvalResult
    registry: RegistryResult | None


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_task(cfg: Config, checkpoint_dir: Path, run_id: str | None, dataset_paths: list[str],
                  snapshot_id: str | None, classnames: str | None = None, templates: str | None = None) -> EvalResult:
    datasets = [load_eval_dataset(p, classnames, templates) for p in dataset_paths] if dataset_paths else None
    return evaluate(cfg, checkpoint_dir, run_id=run_id, datasets=datasets, snapshot_id=snapshot_id)


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_task(cfg: Config, run_id: str, model_uri: str, metrics: dict[str, float], snapshot_id: str | None,
                  parent_version: str | None) -> RegistryResult:
    return register_and_promote(cfg, run_id, model_uri, metrics, snapshot_id, parent_version)


def results_markdown(res: EvalResult, reg: RegistryResult | None) -> str:
    md = res.markdown
    if reg is not None:
        d = reg.decision
        cand = "-" if d.candidate_value is None else f"{d.candidate_value:.4f}"
        champ = "-" if d.champion_value is None else f"{d.champion_value:.4f}"
        md += (f"\n## Registry\n\n| version | alias | `{d.metric}` | champion (v{d.champion_version or '-'}) | reason |\n"
               f"|---|---|---:|---:|---|\n| {reg.version} | **{reg.alias}** | {cand} | {champ} | {d.reason} |\n")
    return md


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: str | None = None, datasets: list[str] | None = None, classnames: str | None = None,
                  templates: str | None = None, snapshot_id: str | None = None,
                  run_id: str | None = None, register_model: bool = False, model_uri: str | None = None,
                  parent_version: str | None = None, cfg: Config | None = None,
                  config_file: str | None = None) -> EvaluateFlowResult:
    """Evaluate ``model`` (checkpoint path, version, alias or models:/ URI; None = champion or the newest
    checkpoint) on ``datasets`` (default ``evaluate.datasets``; ``classnames``/``templates`` files apply to
    each of them) and the snapshot's val split.
    With ``register_model``, the model is registered as a new version and promoted by the documented rule."""
    cfg = cfg or load_config(Path(config_file) if config_file else None)
    resolved = resolve_model(cfg, model)
    run_id = run_id or resolved.run_id
    res = evaluate_task(cfg, resolved.checkpoint_dir, run_id, list(datasets or []),
                        snapshot_id or resolved.snapshot_id, classnames, templates)
    reg = None
    if register_model:
        if not run_id:
            raise ValueError(f"cannot register {resolved.checkpoint_dir}: it has no MLflow run (train it with `clipline train`)")
        uri = model_uri or model_uri_for_run(cfg, run_id)
        reg = register_task(cfg, run_id, uri, res.metrics, res.snapshot_id, parent_version)
    create_markdown_artifact(key="evaluation", markdown=results_markdown(res, reg),
                             description=f"evaluation of {resolved.ref}")
    return EvaluateFlowResult(eval=res, registry=reg)

