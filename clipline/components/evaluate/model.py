"""Evaluate a model and, when asked, register it: what `clipline evaluate` and the `evaluate`
flow do, as one library call.

The model is named as a checkpoint path, a registered version or alias, or a models:/ URI (None: the
champion, else the newest local checkpoint). A checkpoint whose MLflow run is not in this tracking
store (trained with another store: a colleague's, a copied data dir), or that has no run, is
evaluated without touching any run; with ``register`` it is then logged into a new run of this
store, tagged with where it came from (``clipline.source_checkpoint``, ``clipline.source_run_id``),
and registered from there. Registration applies the promotion rule
(``clipline.components.tracking.registry``)."""

from __future__ import annotations

from dataclasses import dataclass

from clipline.components.config import Config
from clipline.components.evaluate.datasets import EvalDataset, PairSet, load_eval_dataset, wds_location
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
class Evaluation:
    eval: EvalResult
    registry: RegistryResult | None  # None unless registered
    model_ref: str  # the model as it was named (for reports)


def _load(
    dataset: str, classnames: str | None, templates: str | None, dataset_root: str | None
) -> EvalDataset | PairSet:
    if dataset_root is None:
        return load_eval_dataset(dataset, classnames, templates)
    path, name = wds_location(dataset, dataset_root)
    return load_eval_dataset(path, classnames, templates, name=name)


def evaluate_model(
    cfg: Config,
    model: str | None = None,
    *,
    datasets: list[str] | None = None,
    classnames: str | None = None,
    templates: str | None = None,
    dataset_root: str | None = None,
    snapshot_id: str | None = None,
    run_id: str | None = None,
    register: bool = False,
    model_uri: str | None = None,
    parent_version: str | None = None,
) -> Evaluation:
    """Evaluate ``model`` on ``datasets`` (default ``evaluate.datasets``; ``classnames``/``templates``
    files apply to each; with ``dataset_root``, each is ``wds/NAME`` in CLIP_benchmark's convention)
    and the snapshot's val split (default: the model's snapshot, when it is
    here). ``run_id``/``model_uri``: the model's run and logged model when the caller knows them
    (the pipeline, right after training). With ``register``, the model becomes a new version whose
    parent is ``parent_version`` and the promotion rule decides its alias."""
    resolved = resolve_model(cfg, model)
    run_id = run_id or resolved.run_id
    outside = run_id is None or not run_exists(cfg, run_id)
    snap = snapshot_id
    if snap is None and resolved.snapshot_id and (cfg.snapshots_dir / resolved.snapshot_id).is_dir():
        snap = resolved.snapshot_id  # else the stage notes that the checkpoint's snapshot is not here
    sets = [_load(p, classnames, templates, dataset_root) for p in datasets] if datasets else None
    res = evaluate(
        cfg,
        resolved.checkpoint_dir,
        run_id=None if outside else run_id,
        datasets=sets,
        snapshot_id=snap,
        log_to_mlflow=not outside,
    )
    where = f"its run {run_id} is not in {cfg.mlflow_uri}" if run_id else "it has no MLflow run"
    if outside and not register:
        res.notes.append(f"metrics not logged: {where} (--register evaluates it into a new run of this store)")
    reg = None
    if register:
        zeroshot_sets = [z.dataset for z in res.zeroshot]
        extra = None
        if outside:
            plan_promotion(cfg, res.metrics, None, zeroshot_sets)  # fail before logging anything
            run_id, model_uri, extra = adopt_checkpoint(cfg, res.checkpoint_dir, run_id)
            log_result(cfg, res, run_id)
            extra["config_hash"] = "unknown: outside checkpoint"
            res.notes.append(f"{where}: evaluated into the new run {run_id} of this store")
        reg = register_and_promote(
            cfg,
            run_id,
            model_uri or model_uri_for_run(cfg, run_id),
            res.metrics,
            res.snapshot_id,
            parent_version,
            zeroshot_sets=zeroshot_sets,
            extra_tags=extra,
        )
    return Evaluation(eval=res, registry=reg, model_ref=resolved.ref)
