"""The train stage's entry point: snapshot -> checkpoint directory + MLflow run.

``train(cfg, snapshot_id=None, from_model=None, progress=None) -> TrainResult``. In one process by
default; on Ray Train when ``train.workers > 1``, ``train.backend = "ray"`` or ``RAY_ADDRESS`` is set.
A run is named (``train.run_name``, default derived from model, snapshot and time); starting a run
with the name of an unfinished one continues it from its last checkpoint in the same MLflow run.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from clipline.components.cluster import ray_address
from clipline.components.config import Config

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class WiseFt:
    """The WiSE-FT blend of a run (``train.wise_ft_alpha``): its checkpoint, run and logged model."""

    alpha: float
    checkpoint_dir: Path
    run_id: str
    model_uri: str


@dataclass
class TrainResult:
    run_id: str | None
    model_uri: str | None
    checkpoint_dir: Path
    snapshot_id: str
    model_name: str
    steps: int
    samples_per_s: float
    train_seconds: float
    final_loss: float
    run_name: str = ""
    wise_ft: WiseFt | None = None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def use_ray(cfg: Config) -> bool:
    t = cfg.train
    return t.backend == "ray" or (t.backend == "auto" and (t.workers > 1 or ray_address() is not None))


def train(
    cfg: Config,
    snapshot_id: str | None = None,
    from_model: Path | str | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``cfg.train.model`` on a snapshot's train split (latest snapshot when None).

    ``from_model`` (overrides ``train.pretrained``, which may also be a registered version or
    alias): where to start, as :mod:`clipline.components.model.start` reads it (a local
    checkpoint directory or weights file, ``hf-hub:org/repo``, an open_clip pretrained tag of
    ``train.model`` or ``MODEL:TAG``); the start's own architecture and preprocessing win over
    ``train.model``'s so that its weights fit. Writes ``<checkpoints_dir>/<run_name>/final`` (open_clip-loadable), logs
    the MLflow run (params, per-step metrics, checkpoint artifacts, a pytorch model tagged with the
    snapshot id) and returns where everything is. Raises ``TrainingDiverged`` on NaN/inf loss
    (after saving), ``SnapshotError``/``ModelError`` on unusable input.
    """
    import mlflow
    import torch

    from clipline.components.model import factory
    from clipline.components.model.start import resolve as resolve_start
    from clipline.components.train import recipes, resume as run_state
    from clipline.components.train.data import resolve_snapshot
    from clipline.components.train.loop import LoopSpec, TrainingDiverged, WorkerContext, run_loop

    tc = cfg.train.model_copy()
    info = resolve_snapshot(cfg.snapshots_dir, cfg.catalog_path, snapshot_id)
    ref = from_model
    if ref is None and tc.pretrained:
        ref = resolve_from_model(cfg, str(tc.pretrained))  # it may name a registered version or alias too
    start = resolve_start(ref, tc.model) if ref else None  # fails early, with a clear message
    model_name = start.model if start else tc.model
    if tc.wise_ft_alpha is not None and start is None:
        raise ValueError(
            "train.wise_ft_alpha blends the fine-tuned model with the weights it started from: give a start "
            "(train.pretrained or --from-model), or unset train.wise_ft_alpha"
        )
    factory.model_config(model_name)  # unknown names fail here, before any work
    tc.model = model_name
    tc, recipe, _ = recipes.apply(tc, model_name)  # the preset for this model's scale, where unset
    total_steps = tc.steps or max(1, math.ceil(tc.epochs * info.n_train / tc.batch_size))
    if info.n_train < tc.batch_size:
        raise ValueError(
            f"snapshot {info.snapshot_id} has {info.n_train} train rows, fewer than one batch "
            f"(train.batch_size {tc.batch_size}): lower train.batch_size"
        )
    if tc.batch_size % tc.workers:
        raise ValueError(f"train.batch_size {tc.batch_size} is not divisible by train.workers {tc.workers}")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe_name = re.sub(r"[^\w.-]+", "-", model_name)  # a directory name: hf-hub:org/repo -> hf-hub-org-repo
    run_name = tc.run_name or f"{safe_name}-{info.snapshot_id[:12]}-{stamp}"
    run_dir = cfg.checkpoints_dir / run_name
    previous = run_state.read_run(run_dir)
    if previous and previous.get("snapshot_id") != info.snapshot_id:
        raise ValueError(
            f"run {run_name!r} was trained on snapshot {previous.get('snapshot_id')}, not "
            f"{info.snapshot_id}: choose another train.run_name"
        )

    mlflow.set_tracking_uri(cfg.mlflow_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    sysmetrics = tc.system_metrics and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() != "false"
    run_id = previous.get("run_id")
    if run_id:
        try:
            mlflow.tracking.MlflowClient().get_run(run_id)
        except Exception:  # noqa: BLE001 - a different tracking store: start afresh in this one
            run_id = None
    active = mlflow.start_run(
        run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=sysmetrics or None
    )
    run_id = active.info.run_id
    run_state.write_run(
        run_dir,
        {
            "run_id": run_id,
            "snapshot_id": info.snapshot_id,
            "model_name": model_name,
            "total_steps": total_steps,
            "mlflow_uri": cfg.mlflow_uri,
        },
    )
    status = "FAILED"
    try:
        if not previous:
            mlflow.log_params(_flat({"train": tc.model_dump(mode="json")}))
            mlflow.log_params(
                {
                    "snapshot_id": info.snapshot_id,
                    "snapshot_uri": info.location,
                    "n_train": info.n_train,
                    "total_steps": total_steps,
                    "pretrained": start.ref if start else "",
                    "recipe": recipe.name if recipe else "none",
                    "torch": torch.__version__,
                }
            )
            mlflow.set_tags(
                {
                    "snapshot_id": info.snapshot_id,
                    "snapshot_uri": info.location,
                    "stage": "train",
                    "model_name": model_name,
                }
            )
        spec = LoopSpec(
            train=tc.model_dump(mode="json"),
            snapshot=info,
            run_dir=run_dir,
            run_name=run_name,
            total_steps=total_steps,
            mlflow_uri=cfg.mlflow_uri,
            mlflow_run_id=run_id,
            pretrained=str(start.weights) if start and start.weights else None,
            pretrained_tag=start.tag if start else None,
            preprocess=start.preprocess if start else None,
        )
        use_gpu = tc.use_gpu == "yes" or (tc.use_gpu == "auto" and torch.cuda.is_available())
        threads = tc.threads or max(1, (os.cpu_count() or 1) // tc.workers)
        if use_ray(cfg):
            from clipline.components.train.ray import resolve_data_feed, resolve_use_gpu, run_with_ray

            use_gpu = resolve_use_gpu(tc.use_gpu, tc.workers)  # the cluster's GPUs, not the driver's
            ray_data = resolve_data_feed(tc.data_feed)
            summary = run_with_ray(
                spec,
                tc.workers,
                use_gpu,
                tc.max_failures,
                cfg.checkpoints_dir / "_ray",
                threads=threads,
                ray_data=ray_data,
            )
        else:
            torch.set_num_threads(threads)
            device = "cuda" if use_gpu else "cpu"
            attempt = 0
            while True:
                try:
                    summary = run_loop(spec, WorkerContext(device=device, progress=progress))
                    break
                except (TrainingDiverged, ValueError):  # retrying cannot fix these
                    raise
                except Exception as e:  # noqa: BLE001 - same contract as Ray's FailureConfig
                    attempt += 1
                    if attempt > tc.max_failures:
                        raise
                    mlflow.set_tag(f"restart_{attempt}", f"{type(e).__name__}: {e}"[:500])
        assert summary is not None
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
    blend = None
    if tc.wise_ft_alpha is not None and start is not None:
        blend = _write_wise_ft(cfg, start, Path(summary.final_dir), tc.wise_ft_alpha, run_id, run_name)
    return TrainResult(
        run_id=run_id,
        model_uri=summary.model_uri,
        checkpoint_dir=Path(summary.final_dir),
        snapshot_id=info.snapshot_id,
        model_name=model_name,
        steps=summary.steps,
        samples_per_s=summary.samples_per_s,
        train_seconds=summary.train_seconds,
        final_loss=summary.final_loss,
        run_name=run_name,
        wise_ft=blend,
    )


def _write_wise_ft(cfg: Config, start: Any, final_dir: Path, alpha: float, run_id: str, run_name: str) -> WiseFt:
    """The run's WiSE-FT blend (``model/wise_ft.py``) as the checkpoint ``<run>/wise-ft-<alpha>``,
    logged into its own MLflow run: a child of the training run, with its parameters plus
    ``wise_ft_alpha``, so that it is evaluated and registered as a version of its own."""
    import mlflow

    from clipline.components.model import checkpoint, wise_ft
    from clipline.components.tracking.runs import client, log_checkpoint

    trained = client(cfg).get_run(run_id)
    snapshot_id = trained.data.tags.get("snapshot_id", "")
    tags = {
        "mlflow.parentRunId": run_id,
        "stage": "train",
        "snapshot_id": snapshot_id,
        "model_name": trained.data.tags.get("model_name", ""),
        "clipline.wise_ft_of": run_id,
    }
    out = final_dir.parent / f"wise-ft-{alpha:g}"
    with mlflow.start_run(
        experiment_id=trained.info.experiment_id, run_name=f"{run_name} wise-ft {alpha:g}", tags=tags
    ) as run:
        mlflow.log_params({**trained.data.params, "wise_ft_alpha": alpha})
        meta = {**checkpoint.read_meta(final_dir), "run_id": run.info.run_id}
        wise_ft.write_blend(start, final_dir, alpha, out, meta)
        uri = log_checkpoint(out, checkpoint.load_checkpoint(out, "cpu").model, snapshot_id)
    return WiseFt(alpha=alpha, checkpoint_dir=out, run_id=run.info.run_id, model_uri=uri)


def resolve_from_model(cfg: Config, value: str) -> Path | str:
    """``--from-model``: a local checkpoint directory/file, or a registered model version or alias
    (``3``, ``champion``, ``models:/<name>/3``, ``models:/<name>@champion``) of
    ``cfg.tracking.registered_model``, whose source run's ``checkpoint/`` artifacts are downloaded.
    Hub starts (``hf-hub:org/repo``, an open_clip tag of ``train.model``, ``MODEL:TAG``) are
    returned as given, to be fetched by :func:`train`."""
    from clipline.components.model.start import is_hub_reference, resolve as resolve_start

    p = Path(value).expanduser()
    if p.exists():
        return p
    if is_hub_reference(value, cfg.train.model):
        resolve_start(value, cfg.train.model)  # in the cache now: one that cannot be had fails before any work
        return value
    from mlflow.tracking import MlflowClient

    name, ref = cfg.tracking.registered_model, value
    if value.startswith("models:/"):
        rest = value[len("models:/") :]
        name, ref = (
            (rest.split("@", 1) if "@" in rest else rest.rsplit("/", 1))
            if ("@" in rest or "/" in rest)
            else (rest, "champion")
        )
    client = MlflowClient(cfg.mlflow_uri)
    try:
        mv = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    except Exception as e:  # noqa: BLE001 - say what was looked for
        raise FileNotFoundError(
            f"--from-model {value!r} is neither an existing path nor a version/alias of the "
            f"registered model {name!r} in {cfg.mlflow_uri}: {str(e).splitlines()[0]}"
        ) from e
    if not mv.run_id:
        raise FileNotFoundError(f"model version {name}/{mv.version} has no source run to take a checkpoint from")
    dest = cfg.checkpoints_dir / "_registry" / f"{name}-v{mv.version}"
    if not (dest / "checkpoint").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(mv.run_id, "checkpoint", str(dest))
    return dest / "checkpoint"
