"""The train stage on Ray Train (2 CPU workers, gloo): worker-failure recovery and the Ray Data feed."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest

from clipline.components.train.run import train

from trainkit import _cfg, _history, snapshot  # noqa: F401 - snapshot is a fixture


@pytest.mark.slow
def test_worker_failure_is_recovered_by_ray_train(data_dir, snapshot, mlflow_uri, ray_local):
    cfg = _cfg(data_dir, steps=8, checkpoint_every=3, fail_at_step=5, max_failures=1, workers=2,
               backend="ray", run_name="ray-failure")
    res = train(cfg, snapshot)
    assert res.steps == 8
    run_dir = cfg.checkpoints_dir / "ray-failure"
    assert (run_dir / ".failure-injected-5").exists()
    assert [v for _, v in _history(res.run_id, "train/resumed_from_step")] == [3.0]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{res.checkpoint_dir}")
    assert isinstance(model, open_clip.CLIP)
    assert json.loads((res.checkpoint_dir / "clipline.json").read_text())["step"] == 8


@pytest.mark.slow
def test_ray_data_feed_trains_two_workers(data_dir, snapshot, mlflow_uri, ray_local):
    cfg = _cfg(data_dir, steps=4, workers=2, backend="ray", data_feed="ray", run_name="ray-data",
               checkpoint_every=100)
    res = train(cfg, snapshot)
    assert res.steps == 4 and res.samples_per_s > 0
    assert len(_history(res.run_id, "train/loss")) == 4
    meta = json.loads((res.checkpoint_dir / "clipline.json").read_text())
    assert meta["step"] == 4 and meta["train"]["data_feed"] == "ray"
