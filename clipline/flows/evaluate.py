"""Prefect flow ``evaluate``: evaluate a model, optionally register it and apply the promotion
rule (``clipline.components.evaluate.model``), and publish a markdown artifact with the results."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from clipline.components.config import Config, load_config
from clipline.components.evaluate.model import Evaluation, evaluate_model
from clipline.components.evaluate.stage import EvalResult
from clipline.components.tracking.registry import RegistryResult
from clipline.components.train.run import TrainResult

evaluate_task = task(name="evaluate-model", cache_policy=NO_CACHE)(evaluate_model)


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
    dataset_root: str | None = None,
    snapshot_id: str | None = None,
    run_id: str | None = None,
    register_model: bool = False,
    model_uri: str | None = None,
    parent_version: str | None = None,
    cfg: Config | None = None,
    config_file: str | None = None,
) -> Evaluation:
    """Evaluate ``model`` (checkpoint path, version, alias or models:/ URI; None = champion or the
    newest checkpoint) on ``datasets`` and the snapshot's val split; with ``register_model``,
    register it and apply the promotion rule. See ``clipline.components.evaluate.model``."""
    cfg = cfg or load_config(Path(config_file) if config_file else None)
    out = evaluate_task(
        cfg,
        model,
        datasets=list(datasets or []),
        classnames=classnames,
        templates=templates,
        dataset_root=dataset_root,
        snapshot_id=snapshot_id,
        run_id=run_id,
        register=register_model,
        model_uri=model_uri,
        parent_version=parent_version,
    )
    create_markdown_artifact(
        key="evaluation",
        markdown=results_markdown(out.eval, out.registry),
        description=f"evaluation of {out.model_ref}",
    )
    return out


def evaluate_trained(
    tr: TrainResult, cfg: Config, datasets: list[str] | None, parent_version: str | None = None
) -> tuple[Evaluation, Evaluation | None]:
    """Evaluate and register what a training run produced: its model, then its WiSE-FT blend when
    it wrote one (``train.wise_ft_alpha``), each a version of its own with ``parent_version``, so
    the promotion rule weighs the blend against the fine-tuned model and the champion."""
    runs = [(tr.checkpoint_dir, tr.run_id, tr.model_uri)]
    if tr.wise_ft is not None:
        runs.append((tr.wise_ft.checkpoint_dir, tr.wise_ft.run_id, tr.wise_ft.model_uri))
    out = [
        evaluate_flow(
            model=str(ckpt),
            datasets=datasets,
            snapshot_id=tr.snapshot_id,
            run_id=run_id,
            register_model=True,
            model_uri=uri,
            parent_version=parent_version,
            cfg=cfg,
        )
        for ckpt, run_id, uri in runs
    ]
    return out[0], (out[1] if len(out) > 1 else None)
