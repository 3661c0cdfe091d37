"""The train stage end to end on CPU: learning, checkpoints loadable by plain open_clip, resume,
failure recovery under Ray Train, divergence, MLflow records and clear errors."""

from __future__ import annotations

import json
import math

import mlflow
import open_clip
import pytest
import torch
from mlflow.tracking import MlflowClient

from clipline.components.model import checkpoint, factory
from clipline.components.train import synthetic
from clipline.components.train.data import SnapshotError
from clipline.components.train.loop import InjectedFailure, TrainingDiverged
from clipline.components.train.run import train

from trainkit import _cfg, _history, snapshot  # noqa: F401 - snapshot is a fixture


@pytest.mark.slow
def test_tiny_model_learns_and_its_checkpoint_loads_with_plain_open_clip(data_dir, snapshot, mlflow_uri):
    steps, b = 120, 32
    cfg = _cfg(data_dir, steps=steps, batch_size=b, checkpoint_every=50)
    seen = []
    res = train(cfg, snapshot, progress=lambda s, t, m: seen.append((s, t, m["train/loss"])))

    assert res.steps == steps and res.snapshot_id == snapshot and res.samples_per_s > 0
    assert [s for s, _, _ in seen] == list(range(1, steps + 1))
    losses = _history(res.run_id, "train/loss")
    assert len(losses) == steps  # one value per step in MLflow
    first = sum(v for _, v in losses[:5]) / 5
    last = sum(v for _, v in losses[-10:]) / 10
    assert first > 0.85 * math.log(b)  # starts near chance
    assert last < 0.6 * math.log(b), (first, last)  # clearly below chance after training

    run = MlflowClient().get_run(res.run_id)
    assert run.data.params["train.model"] == "clipline-nano"
    assert run.data.tags["snapshot_id"] == snapshot and run.data.tags["clipline.data_feed"] == "torch"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/bad_images"] >= 1  # the corrupt rows were counted, not fatal
    for key in ("train/lr", "train/temperature", "train/samples_per_s"):
        assert len(_history(res.run_id, key)) == steps
    arts = {a.path for a in MlflowClient().list_artifacts(res.run_id, "checkpoint")}
    assert {
        "checkpoint/open_clip_config.json",
        "checkpoint/open_clip_model.safetensors",
        "checkpoint/clipline.json",
    } <= arts
    logged = mlflow.pytorch.load_model(res.model_uri)
    assert isinstance(logged, open_clip.CLIP)

    # the checkpoint directory follows the contract and loads with open_clip alone
    ck = res.checkpoint_dir
    meta = json.loads((ck / "clipline.json").read_text())
    assert meta["model_name"] == "clipline-nano" and meta["snapshot_id"] == snapshot and meta["step"] == steps
    assert meta["run_id"] == res.run_id
    m1, _, pre1 = open_clip.create_model_and_transforms(
        "clipline-nano", pretrained=str(ck / "open_clip_model.safetensors")
    )
    m2, _, pre2 = open_clip.create_model_and_transforms(f"local-dir:{ck}")
    tok = open_clip.get_tokenizer(f"local-dir:{ck}")
    img = pre2(synthetic.draw("red", "circle", __import__("numpy").random.default_rng(0), 64)).unsqueeze(0)
    with torch.no_grad():
        for m in (m1, m2, logged):
            m.eval()
        a = m1.encode_image(img)
        assert torch.allclose(a, m2.encode_image(img), atol=1e-6)
        assert torch.allclose(a, logged.encode_image(img), atol=1e-6)
        # the trained model tells colours apart on a fresh image (it learned something real)
        t = m2.encode_text(tok([f"a {c} circle" for c in synthetic.COLORS]), normalize=True)
        assert list(synthetic.COLORS)[int((m2.encode_image(img, normalize=True) @ t.T).argmax())] == "red"


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_last_checkpoint(data_dir, snapshot, mlflow_uri):
    cfg = _cfg(data_dir, steps=10, checkpoint_every=4, fail_at_step=6, max_failures=0, run_name="resumable")
    with pytest.raises(InjectedFailure):
        train(cfg, snapshot)
    run_dir = cfg.checkpoints_dir / "resumable"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000004"]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert MlflowClient().get_run(run_id).info.status == "FAILED"

    res = train(cfg, snapshot)  # same run name: continues (the injected failure fires only once)
    assert res.run_id == run_id and res.steps == 10
    resumed = _history(run_id, "train/resumed_from_step")
    assert [v for _, v in resumed] == [4.0]
    steps_logged = [s for s, _ in _history(run_id, "train/loss")]
    assert sorted(set(steps_logged)) == list(range(1, 11)) and steps_logged.count(10) == 1
    state = torch.load(res.checkpoint_dir / "train_state.pt", weights_only=False)
    assert state["step"] == 10 and state["optimizer"]["state"]  # optimiser state travels with it


@pytest.mark.slow
def test_resume_is_exact(data_dir, snapshot, mlflow_uri):
    """Resuming (weights, optimiser, scheduler, data position, RNG) gives the same weights as an
    uninterrupted run."""
    straight = train(_cfg(data_dir, steps=8, checkpoint_every=100, run_name="straight", loader_workers=0), snapshot)
    cfg = _cfg(
        data_dir, steps=8, checkpoint_every=3, fail_at_step=5, max_failures=0, run_name="broken", loader_workers=0
    )
    with pytest.raises(InjectedFailure):
        train(cfg, snapshot)
    resumed = train(cfg, snapshot)
    from safetensors.torch import load_file

    a = load_file(str(straight.checkpoint_dir / checkpoint.WEIGHTS_FILE))
    b = load_file(str(resumed.checkpoint_dir / checkpoint.WEIGHTS_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nan_loss_stops_with_a_clear_message_after_saving(data_dir, snapshot, mlflow_uri):
    cfg = _cfg(data_dir, steps=30, lr=1e9, grad_clip=0, warmup_steps=0, run_name="diverges", checkpoint_every=100)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*saved to"):
        train(cfg, snapshot)
    saved = list((cfg.checkpoints_dir / "diverges").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / checkpoint.WEIGHTS_FILE).is_file()


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_checkpoint(data_dir, snapshot, mlflow_uri):
    first = train(_cfg(data_dir, steps=3, run_name="base"), snapshot)
    # train.model says something else: the checkpoint's own architecture is used
    cfg = _cfg(data_dir, steps=0, epochs=0.001, lr=1e-12, warmup_steps=0, run_name="ft", model="clipline-tiny")
    res = train(cfg, snapshot, from_model=first.checkpoint_dir)
    assert res.model_name == "clipline-nano" and res.steps == 1
    from safetensors.torch import load_file

    a, b = (load_file(str(r.checkpoint_dir / checkpoint.WEIGHTS_FILE)) for r in (first, res))
    assert torch.allclose(a["text_projection"], b["text_projection"], atol=1e-6)


def test_unusable_inputs_fail_with_clear_errors(data_dir, snapshot, mlflow_uri):
    cfg = _cfg(data_dir, steps=1)
    with pytest.raises(SnapshotError, match="no-such-snapshot"):
        train(cfg, "no-such-snapshot")
    with pytest.raises(SnapshotError, match="clipline curate"):
        train(cfg, None)  # nothing in the catalog
    with pytest.raises(factory.ModelError, match="does not exist"):
        train(cfg, snapshot, from_model=data_dir / "missing.safetensors")
    with pytest.raises(factory.ModelError, match="unknown model 'nope'"):
        train(_cfg(data_dir, steps=1, model="nope"), snapshot)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        train(_cfg(data_dir, steps=1, batch_size=1024), snapshot)
