"""MLflow runs: the client for a config, the experiment, and logging evaluation results into a run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

from clipline.components.config import Config


def client(cfg: Config) -> Any:
    """An MlflowClient on ``cfg.mlflow_uri`` (also made the process default, for mlflow.* calls)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = cfg.mlflow_uri
    if uri.startswith("sqlite:///"):  # SQLite cannot create the database's folder
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    mlflow.set_registry_uri(cfg.mlflow_uri)
    return MlflowClient(tracking_uri=cfg.mlflow_uri, registry_uri=cfg.mlflow_uri)


def ensure_experiment(cfg: Config) -> str:
    """The id of ``cfg.tracking.experiment``, created when missing; with a local (sqlite/file)
    tracking store its artifacts go to ``<data_dir>/mlartifacts``, not the working directory."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if cfg.mlflow_uri.startswith(("sqlite:", "file:")) or "://" not in cfg.mlflow_uri:
        art = (cfg.data_dir / "mlartifacts").resolve()
        art.mkdir(parents=True, exist_ok=True)
        location = art.as_uri()
    return c.create_experiment(cfg.tracking.experiment, artifact_location=location)


def log_metrics(cfg: Config, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log ``metrics`` into an existing run in one batch (works on finished runs too)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    c = client(cfg)
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def log_artifacts(cfg: Config, run_id: str, paths: Mapping[str, Path], artifact_path: str = "eval") -> None:
    """Upload files into the run's artifacts under ``artifact_path``."""
    c = client(cfg)
    for p in paths.values():
        if p is not None and Path(p).is_file():
            c.log_artifact(run_id, str(p), artifact_path)


def config_hash(cfg: Config) -> str:
    """A short hash of the settings that shape a model (curate + train sections)."""
    data = {"curate": cfg.curate.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def code_version() -> str:
    """``git describe`` of the clipline source tree when it is a git checkout, else the package version."""
    import clipline

    root = Path(clipline.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("clipline")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def log_checkpoint(checkpoint_dir: Path, model: Any, snapshot_id: str | None) -> str:
    """In the active run: the checkpoint directory's files under ``checkpoint/`` and ``model`` (a
    plain CPU model in eval mode) as the MLflow pytorch model ``model``, tagged with the snapshot
    id and carrying its signature (``tracking/signature.py``). Returns the model URI."""
    import mlflow

    from clipline.components.tracking.signature import clip_signature

    mlflow.log_artifacts(str(checkpoint_dir), artifact_path="checkpoint")
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        tags={"snapshot_id": str(snapshot_id or "")},
        signature=clip_signature(model),
        serialization_format="pickle",
        pip_requirements=["torch", "open_clip_torch"],
    )
    return info.model_uri
