"""`clipline train` and the Prefect flow `train`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipline.components.train import synthetic
from flowkit import run_flow_with_artifact
from clipline.flows.cli import app

FAST = ["--model", "clipline-nano", "--batch-size", "16"]


def _env(monkeypatch):
    monkeypatch.setenv("CLIPLINE_TRAIN__THREADS", "1")
    monkeypatch.setenv("CLIPLINE_TRAIN__SYSTEM_METRICS", "false")


def test_cli_train_prints_the_run_and_errors_in_one_line(data_dir: Path, mlflow_uri, monkeypatch):
    _env(monkeypatch)
    sid = synthetic.write_snapshot(data_dir / "snapshots", n=120, size=64)
    r = CliRunner().invoke(app, ["--data-dir", str(data_dir), "train", "--snapshot", sid, "--steps", "3", *FAST])
    assert r.exit_code == 0, r.output
    assert "final loss" in r.output and "samples/s" in r.output and sid in r.output
    ck = next((data_dir / "checkpoints").glob("*/final"))
    assert (ck / "open_clip_model.safetensors").is_file()

    r = CliRunner().invoke(app, ["--data-dir", str(data_dir), "train", "--snapshot", "nope", *FAST])
    assert r.exit_code == 1
    assert "snapshot 'nope'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        app, ["--data-dir", str(data_dir), "train", "--snapshot", sid, "--from-model", str(data_dir / "missing"), *FAST]
    )
    assert r.exit_code == 1 and "neither an existing path nor a version/alias" in r.output


@pytest.mark.slow
def test_train_flow_returns_the_result_and_an_artifact(data_dir: Path, mlflow_uri, monkeypatch, prefect_harness):
    _env(monkeypatch)

    from clipline.components.config import load_config
    from clipline.flows.train import train_flow

    sid = synthetic.write_snapshot(data_dir / "snapshots", n=120, size=64)
    cfg = load_config(None, {"data_dir": data_dir, "train": {"model": "clipline-nano", "batch_size": 16, "steps": 2}})
    res, md = run_flow_with_artifact(train_flow, "train-report", cfg, snapshot_id=sid)
    assert res.snapshot_id == sid and res.steps == 2 and res.checkpoint_dir.is_dir()
    assert sid in md and res.run_id in md
    # the logged model says what it takes and returns (the registry page's schema)
    from mlflow.models import get_model_info

    sig = get_model_info(res.model_uri).signature
    assert [(s.name, s.shape[1:]) for s in sig.inputs.inputs] == [
        ("image", (3, 32, 32)),
        ("text", (16,)),
    ]  # clipline-nano
    assert [s.name for s in sig.outputs.inputs][:2] == ["image_features", "text_features"]
