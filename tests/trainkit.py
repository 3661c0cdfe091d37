"""Shared helpers for the train tests: a fast tiny-model config and a synthetic snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clipline.components.config import load_config
from clipline.components.train import synthetic

FAST = {
    "model": "clipline-nano",
    "batch_size": 16,
    "lr": 2e-3,
    "warmup_steps": 5,
    "log_every": 5,
    "threads": 1,
    "loader_workers": 1,
    "system_metrics": False,
}


def _cfg(data_dir: Path, **train_overrides):
    return load_config(None, {"data_dir": data_dir, "train": {**FAST, **train_overrides}})


@pytest.fixture
def snapshot(data_dir: Path) -> str:
    return synthetic.write_snapshot(data_dir / "snapshots", n=400, size=64, corrupt=2)


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))
