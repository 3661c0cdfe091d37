"""WiSE-FT (``train.wise_ft_alpha``): the blend of a fine-tuned model and its start is written,
tracked in a run of its own, evaluated and registered as a version beside the fine-tuned one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipline.components.model import checkpoint, factory
from clipline.components.model.errors import ModelError
from clipline.components.model.wise_ft import interpolate
from clipline.components.train import synthetic
from trainkit import _cfg


def test_interpolate_is_the_weight_space_blend_and_checks_the_shapes():
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3), "h": torch.tensor([1.0], dtype=torch.float16)}
    tuned = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor(7), "h": torch.tensor([3.0], dtype=torch.float16)}
    assert torch.equal(interpolate(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(interpolate(start, tuned, 1.0)["w"], tuned["w"])
    mid = interpolate(start, tuned, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 1.0]))  # 0.75 * start + 0.25 * tuned
    assert mid["n"].item() == 7  # counters are the fine-tuned model's
    assert mid["h"].dtype == torch.float16 and mid["h"].item() == 1.5
    with pytest.raises(ModelError, match="differ in tensors"):
        interpolate({"w": start["w"]}, tuned, 0.5)
    with pytest.raises(ModelError, match="tensor w has shape"):
        interpolate({**start, "w": torch.zeros(3)}, tuned, 0.5)
    with pytest.raises(ModelError, match="outside"):
        interpolate(start, tuned, 1.5)


def _start(tmp_path: Path) -> Path:
    torch.manual_seed(11)
    model = factory.create("clipline-nano").model
    return checkpoint.save_checkpoint(
        model, factory.model_config("clipline-nano"), tmp_path / "start", {}, {"model_name": "clipline-nano"}
    )


def test_a_wise_ft_blend_is_written_tracked_evaluated_and_registered(
    data_dir: Path, mlflow_uri: str, tmp_path: Path, prefect_harness
):
    from mlflow.tracking import MlflowClient

    from clipline.components.tracking.compare import collect_versions
    from clipline.components.train.run import train
    from clipline.flows.evaluate import evaluate_trained

    sid = synthetic.write_snapshot(data_dir / "snapshots", n=96, size=48)
    start = _start(tmp_path)
    cfg = _cfg(data_dir, steps=3, wise_ft_alpha=0.25)
    tr = train(cfg, snapshot_id=sid, from_model=start)
    blend = tr.wise_ft
    assert blend is not None and blend.alpha == 0.25 and blend.checkpoint_dir.parent == tr.checkpoint_dir.parent

    s, t, b = (checkpoint.read_state_dict(d) for d in (start, tr.checkpoint_dir, blend.checkpoint_dir))
    assert not torch.equal(s["logit_scale"], t["logit_scale"])  # it did train
    for k in s:
        if s[k].is_floating_point():
            torch.testing.assert_close(b[k], 0.75 * s[k] + 0.25 * t[k], rtol=1e-5, atol=1e-6)
    assert checkpoint.read_meta(blend.checkpoint_dir)["wise_ft_alpha"] == 0.25
    assert checkpoint.read_config(blend.checkpoint_dir) == checkpoint.read_config(tr.checkpoint_dir)

    run = MlflowClient(mlflow_uri).get_run(blend.run_id)
    assert run.data.tags["mlflow.parentRunId"] == tr.run_id and run.data.tags["snapshot_id"] == sid
    assert run.data.params["wise_ft_alpha"] == "0.25" and run.data.params["pretrained"] == str(start)

    tuned_ev, blend_ev = evaluate_trained(tr, cfg, None)
    assert (tuned_ev.registry.version, blend_ev.registry.version) == ("1", "2")
    assert blend_ev.registry.run_id == blend.run_id
    desc = MlflowClient(mlflow_uri).get_model_version(cfg.tracking.registered_model, "2").description
    assert "WiSE-FT blend with the start, alpha 0.25" in desc
    rows = {r.version: r for r in collect_versions(cfg)}  # what `clipline compare` shows
    assert rows["2"].run_id == blend.run_id and rows["1"].run_id == tr.run_id
    metric = "retrieval/val/text_to_image_R5"
    assert rows["2"].metrics[metric] == blend_ev.eval.metrics[metric]
    # run's and refresh's summaries show the blend under its alpha, beside the fine-tuned model
    from clipline.flows.pipeline import wise_ft_rows

    shown = dict(wise_ft_rows(tr, blend_ev))
    assert shown["WiSE-FT 0.25: model version"].startswith(f"{cfg.tracking.registered_model} v2 -> ")
    assert shown["WiSE-FT 0.25: retrieval R@5 text_to_image"] == f"{blend_ev.eval.metrics[metric]:.3f}"


def test_wise_ft_without_a_start_is_refused_before_any_work(data_dir: Path, mlflow_uri: str):
    from clipline.components.train.run import train

    sid = synthetic.write_snapshot(data_dir / "snapshots", n=48, size=48)
    with pytest.raises(ValueError, match="train.wise_ft_alpha blends the fine-tuned model with the weights it started"):
        train(_cfg(data_dir, steps=2, wise_ft_alpha=0.5), snapshot_id=sid)
    assert not (data_dir / "checkpoints").exists()
