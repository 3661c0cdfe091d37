"""The evaluate stage: zero-shot sets + snapshot retrieval for one checkpoint, reports, MLflow logging."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clipline.components import storage
from clipline.components.config import Config
from clipline.components.evaluate.datasets import (
    EmptySplitError,
    EvalDataset,
    PairSet,
    load_eval_dataset,
    load_snapshot_pairs,
)
from clipline.components.evaluate.report import (
    confusion_png,
    metrics_markdown,
    retrieval_grid_png,
    worst_classes_markdown,
)
from clipline.components.evaluate.retrieval import RetrievalResult, run_retrieval
from clipline.components.evaluate.zeroshot import ZeroShotResult, run_zeroshot
from clipline.components.model.checkpoint import LoadedModel, load_checkpoint


@dataclass
class EvalResult:
    """What one evaluation produced. ``metrics`` uses the stable MLflow names:
    ``zeroshot/<dataset>/{acc1,acc5,mean_per_class_recall}`` and
    ``retrieval/val/{image_to_text,text_to_image}_R{1,5,10}``."""

    metrics: dict[str, float]
    checkpoint_dir: Path
    run_id: str | None
    snapshot_id: str | None
    report_dir: Path
    reports: dict[str, Path] = field(default_factory=dict)
    zeroshot: list[ZeroShotResult] = field(default_factory=list, repr=False)
    retrieval: RetrievalResult | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    markdown: str = ""


def default_datasets(cfg: Config) -> list[EvalDataset | PairSet]:
    """The zero-shot sets listed in ``cfg.evaluate.datasets``."""
    return [load_eval_dataset(p) for p in cfg.evaluate.datasets]


def evaluate(
    cfg: Config,
    model: str | Path | LoadedModel,
    run_id: str | None = None,
    datasets: Sequence[EvalDataset | PairSet] | None = None,
    snapshot_id: str | None = None,
    log_to_mlflow: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint directory on zero-shot sets and on the snapshot's val split.

    ``datasets`` None means ``cfg.evaluate.datasets``. ``snapshot_id``: an id in this data dir or the
    URL of a snapshot directory in object storage; None means the snapshot recorded in the
    checkpoint's clipline.json, read from where training read it when that was object storage
    (``snapshot_uri``); retrieval is skipped (with a note) when there is none, or when that snapshot
    is not in this data dir and was not read from object storage (a checkpoint trained elsewhere). ``run_id``
    None means the checkpoint's run; when there is a run and ``log_to_mlflow``, metrics and report
    files are logged into it (artifacts under ``eval/``, see ``log_result``).
    """
    loaded = model if isinstance(model, LoadedModel) else load_checkpoint(model, cfg.evaluate.device)
    run_id = run_id or loaded.run_id
    notes = []
    snapshot_ref = snapshot_id  # an id in this data dir, or the URL of a snapshot in object storage
    if snapshot_id is None and loaded.snapshot_id and not (cfg.snapshots_dir / loaded.snapshot_id).is_dir():
        if storage.protocol(loaded.snapshot_uri or "") is not None:
            snapshot_ref = loaded.snapshot_uri  # trained from object storage: its val split is there
        else:
            notes.append(
                f"the checkpoint's snapshot {loaded.snapshot_id} is not in {cfg.snapshots_dir}: retrieval "
                "skipped (give --snapshot to measure it on one of this data dir's snapshots)"
            )
    else:
        snapshot_id = snapshot_id or loaded.snapshot_id
        snapshot_ref = snapshot_id
    ds_list = list(datasets) if datasets is not None else default_datasets(cfg)
    ecfg = cfg.evaluate
    report_dir = cfg.reports_dir / "eval" / (run_id or loaded.checkpoint_dir.name)
    report_dir.mkdir(parents=True, exist_ok=True)
    result = EvalResult(
        metrics={},
        checkpoint_dir=loaded.checkpoint_dir,
        run_id=run_id,
        snapshot_id=(storage.snapshot_location(cfg.snapshots_dir, snapshot_id)[1] if snapshot_id else None)
        or loaded.snapshot_id,
        report_dir=report_dir,
        notes=notes,
    )
    md = [f"# Evaluation of `{loaded.checkpoint_dir}`", ""]

    for ds in ds_list:
        if isinstance(ds, PairSet):  # a retrieval set (CLIP_benchmark's wds_flickr30k...)
            rr = run_retrieval(
                loaded.model,
                loaded.tokenizer,
                loaded.preprocess,
                ds,
                loaded.device,
                ecfg.batch_size,
                ecfg.recall_k,
                ecfg.num_workers,
                keep_top=0,
            )
            result.metrics.update(rr.metrics(f"retrieval/{ds.name}"))
            if ds.skipped:
                result.notes.append(
                    f"{ds.name}: {len(ds.skipped)} sample(s) left out, first {ds.skipped[0][0]}: {ds.skipped[0][1]}"
                )
            continue
        zs = run_zeroshot(
            loaded.model, loaded.tokenizer, loaded.preprocess, ds, loaded.device, ecfg.batch_size, ecfg.num_workers
        )
        result.zeroshot.append(zs)
        result.metrics.update(zs.metrics(f"zeroshot/{ds.name}"))
        png = confusion_png(zs, report_dir / f"confusion_{ds.name}.png")
        if png is not None:
            result.reports[f"confusion_{ds.name}"] = png
        else:
            result.notes.append(f"{ds.name}: {zs.n_classes} classes, no confusion matrix above 50")
        md.append(worst_classes_markdown(zs, ecfg.worst_classes))
        if ds.skipped:
            result.notes.append(
                f"{ds.name}: {len(ds.skipped)} unreadable image(s) left out, first "
                f"{ds.skipped[0][0]}: {ds.skipped[0][1]}"
            )
        if ds.templates_source.startswith("default"):
            result.notes.append(f"{ds.name}: no templates file, used the default template")

    pairs = None
    if snapshot_ref:
        try:
            pairs = load_snapshot_pairs(cfg.snapshots_dir, snapshot_ref, "val", limit=ecfg.retrieval_max_pairs)
        except EmptySplitError as e:
            result.notes.append(f"retrieval on the val split skipped: {e}")
    if pairs is not None:
        rr = run_retrieval(
            loaded.model,
            loaded.tokenizer,
            loaded.preprocess,
            pairs,
            loaded.device,
            ecfg.batch_size,
            ecfg.recall_k,
            ecfg.num_workers,
            keep_top=ecfg.grid_top,
        )
        result.retrieval = rr
        result.metrics.update(rr.metrics("retrieval/val"))
        q = list(range(min(ecfg.grid_queries, len(pairs))))
        if q:
            result.reports["retrieval_grid"] = retrieval_grid_png(
                [pairs.captions[i] for i in q],
                [[pairs.images[j] for j in rr.top_images[i]] for i in q],
                report_dir / "retrieval_grid.png",
                correct=[[j == i for j in rr.top_images[i]] for i in q],
            )
    elif not snapshot_ref and not notes:
        result.notes.append("no snapshot id: retrieval on the val split skipped")

    md.insert(2, metrics_markdown(result.metrics, "Metrics"))
    md += [f"- {n}" for n in result.notes]
    result.markdown = "\n".join(md) + "\n"
    (report_dir / "report.md").write_text(result.markdown)
    (report_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    result.reports["markdown"] = report_dir / "report.md"
    result.reports["metrics"] = report_dir / "metrics.json"

    if log_to_mlflow and run_id:
        log_result(cfg, result, run_id)
    elif log_to_mlflow:
        result.notes.append("no MLflow run: metrics not logged")
    return result


def log_result(cfg: Config, result: EvalResult, run_id: str) -> None:
    """Log an evaluation's metrics and report files (under ``eval/``) into ``run_id``."""
    from clipline.components.tracking.runs import log_artifacts, log_metrics

    log_metrics(cfg, run_id, result.metrics)
    log_artifacts(cfg, run_id, result.reports, "eval")
    result.run_id = run_id
