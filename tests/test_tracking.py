"""The registry on a real MLflow (SQLite in tmp): versions, tags, the promotion rule, loading by
alias, and `compare` (library and command)."""

from __future__ import annotations

import re

import pytest
import torch

from evalkit import make_checkpoint, make_snapshot, simulate_training_run

from clipline.components.config import load_config
from clipline.components.tracking.registry import (
    RegistryError,
    decide_promotion,
    primary_metric_for,
    register_and_promote,
    resolve_model,
)
from clipline.components.tracking.runs import client, log_metrics

PRIMARY = "zeroshot/heldout/acc1"


def test_promotion_rule_is_strict_and_needs_the_metric():
    assert decide_promotion(0.4, None, 0.0, PRIMARY, None).promote  # first version
    assert not decide_promotion(0.50, 0.50, 0.0, PRIMARY, "1").promote  # a tie does not promote
    assert not decide_promotion(0.505, 0.50, 0.01, PRIMARY, "1").promote  # inside the margin
    assert decide_promotion(0.52, 0.50, 0.01, PRIMARY, "1").promote
    assert decide_promotion(0.3, None, 0.0, PRIMARY, "1").promote  # a champion without the metric is replaced
    with pytest.raises(RegistryError, match="no 'zeroshot/heldout/acc1' metric"):
        decide_promotion(None, 0.5, 0.0, PRIMARY, "1")  # no silent demotion


def test_the_default_primary_metric_follows_the_evaluation(tmp_path):
    cfg = load_config(None, {"data_dir": tmp_path})
    assert cfg.evaluate.primary_metric == "auto"
    demo = {"zeroshot/heldout/acc1": 0.7, "zeroshot/seen/acc1": 0.9, "retrieval/val/text_to_image_R5": 0.8}
    assert primary_metric_for(cfg, demo, ["heldout", "seen"]) == "zeroshot/heldout/acc1"  # the demo's held-out set
    assert primary_metric_for(cfg, demo, ["seen", "heldout"]) == "zeroshot/seen/acc1"  # the first set evaluated
    flowers = {"zeroshot/flowers102/acc5": 0.9, "zeroshot/flowers102/acc1": 0.4}
    assert primary_metric_for(cfg, flowers) == "zeroshot/flowers102/acc1"
    retrieval = {f"retrieval/val/{d}_R{k}": 0.5 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert primary_metric_for(cfg, retrieval, []) == "retrieval/val/text_to_image_R5"  # no zero-shot set
    with pytest.raises(RegistryError, match="no zero-shot top-1 and no retrieval recall"):
        primary_metric_for(cfg, {}, [])
    explicit = load_config(None, {"data_dir": tmp_path, "evaluate": {"primary_metric": "zeroshot/seen/acc5"}})
    assert primary_metric_for(explicit, demo, ["heldout"]) == "zeroshot/seen/acc5"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three trained models registered in a temporary MLflow, with known primary metrics."""
    tmp = tmp_path_factory.mktemp("reg")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    cfg = load_config(
        None, {"data_dir": tmp / "data", "evaluate": {"primary_metric": PRIMARY, "promotion_margin": 0.01}}
    )
    sid = make_snapshot(cfg.snapshots_dir, "snapA", n_val=4, n_train=6)
    results, runs = [], []
    for seed, acc in [(0, 0.50), (1, 0.505), (2, 0.60)]:
        ckpt = make_checkpoint(tmp / f"ckpt{seed}", seed=seed)
        run_id, uri = simulate_training_run(cfg, ckpt, sid, seed=seed)
        log_metrics(cfg, run_id, {PRIMARY: acc, "retrieval/val/image_to_text_R5": acc / 2})
        if seed == 2:  # what the train stage logs as parameters
            for k, v in {
                "train.model": "tiny-test",
                "total_steps": "300",
                "train.batch_size": "64",
                "train.lr": "0.002",
                "pretrained": "/ckpt/v1",
            }.items():
                client(cfg).log_param(run_id, k, v)
        parent = "1" if seed == 2 else None
        results.append(register_and_promote(cfg, run_id, uri, {PRIMARY: acc}, sid, parent_version=parent))
        runs.append(run_id)
    yield cfg, results, runs
    mp.undo()


def test_versions_aliases_and_tags(registry):
    cfg, results, runs = registry
    assert [r.version for r in results] == ["1", "2", "3"]
    assert [r.alias for r in results] == ["champion", "challenger", "champion"]
    c = client(cfg)
    name = cfg.tracking.registered_model
    assert str(c.get_model_version_by_alias(name, "champion").version) == "3"
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "2"
    v3 = c.get_model_version(name, "3")
    assert v3.tags["snapshot_id"] == "snapA" and v3.tags["parent_version"] == "1"
    assert len(v3.tags["config_hash"]) == 12 and v3.tags["code_version"]
    assert "parent_version" not in c.get_model_version(name, "1").tags
    # the decision and both numbers are logged in the challenger's run
    run2 = c.get_run(runs[1]).data
    assert run2.tags["promotion.decision"] == "challenger"
    assert run2.metrics["promotion/candidate"] == pytest.approx(0.505)
    assert run2.metrics["promotion/champion"] == pytest.approx(0.50)
    assert results[2].decision.champion_version == "1" and results[2].decision.champion_value == pytest.approx(0.5)


def test_version_page_has_a_description_and_a_signature(registry):
    from mlflow.models import get_model_info

    cfg, _, _ = registry
    c = client(cfg)
    name = cfg.tracking.registered_model
    v3 = c.get_model_version(name, "3").description
    assert f"**{PRIMARY}**: 0.6000 (champion v1: 0.5000) -> **champion**" in v3
    assert "snapshot: snapA" in v3 and "parent version: v1" in v3
    assert "training recipe: tiny-test, 300 steps, batch 64, lr 0.002, from /ckpt/v1" in v3
    v1 = c.get_model_version(name, "1").description
    assert "parent version: none (trained from scratch)" in v1 and "no champion yet" in v1
    assert "training recipe: not recorded in its run" in v1
    # the model was logged without a signature; its version has one: what model(image, text) takes and returns
    sig = get_model_info(f"models:/{name}/3").signature
    assert sig is not None
    inputs = {s.name: (str(s.type), s.shape) for s in sig.inputs.inputs}
    outputs = {s.name: (str(s.type), s.shape) for s in sig.outputs.inputs}
    assert inputs == {"image": ("float32", (-1, 3, 32, 32)), "text": ("int64", (-1, 16))}
    assert outputs["image_features"] == ("float32", (-1, 32)) and outputs["text_features"] == ("float32", (-1, 32))


def test_default_primary_metric_promotes_on_any_eval_set_and_a_missing_one_stops(tmp_path, monkeypatch):
    """The default configuration with an eval set not named 'heldout': later versions are still
    promoted; a primary metric nobody measured stops registration with the reason."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, {"data_dir": tmp_path / "data"})
    sid = make_snapshot(cfg.snapshots_dir, "snapP", n_val=4, n_train=4)
    runs = []
    for seed in range(3):
        run_id, uri = simulate_training_run(cfg, make_checkpoint(tmp_path / f"ckpt{seed}", seed=seed), sid, seed=seed)
        runs.append((run_id, uri))
    got = []
    for (run_id, uri), acc in zip(runs, (0.30, 0.20, 0.50)):
        metrics = {"zeroshot/pets/acc1": acc, "zeroshot/pets/acc5": 0.9, "retrieval/val/text_to_image_R5": 0.95}
        log_metrics(cfg, run_id, metrics)  # as the evaluate stage does
        got.append(register_and_promote(cfg, run_id, uri, metrics, sid, zeroshot_sets=["pets"]))
    assert [r.alias for r in got] == ["champion", "challenger", "champion"]
    assert {r.decision.metric for r in got} == {"zeroshot/pets/acc1"}
    assert got[2].decision.reason == "0.5000 > champion 0.3000 + margin 0"
    name = cfg.tracking.registered_model
    assert str(client(cfg).get_model_version_by_alias(name, "champion").version) == "3"
    from clipline.components.tracking.compare import compare_versions

    assert compare_versions(cfg, out_dir=tmp_path / "cmp").metric_names[0] == "zeroshot/pets/acc1"  # charted first

    strict = load_config(None, {"data_dir": tmp_path / "data", "evaluate": {"primary_metric": "zeroshot/heldout/acc1"}})
    with pytest.raises(RegistryError) as e:
        register_and_promote(strict, runs[0][0], runs[0][1], {"zeroshot/pets/acc1": 0.9}, sid)
    msg = str(e.value)
    assert (
        "neither this model (it has zeroshot/pets/acc1) nor champion v3 has the metric 'zeroshot/heldout/acc1'" in msg
    )
    assert "set evaluate.primary_metric" in msg and "\n" not in msg
    assert len(client(cfg).search_model_versions(f"name = '{name}'")) == 3  # nothing registered


def test_model_loads_back_by_alias(registry, tmp_path):
    import mlflow

    from clipline.components.model.checkpoint import load_checkpoint
    from evalkit import tiny_model

    cfg, _, runs = registry
    expected = tiny_model(seed=2)  # version 3 was trained "with seed 2"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = expected.encode_image(x)
        logged = mlflow.pytorch.load_model(f"models:/{cfg.tracking.registered_model}@champion")
        assert torch.allclose(logged.encode_image(x), want, atol=1e-5)
        resolved = resolve_model(cfg, "champion")
        assert resolved.version == "3" and resolved.run_id == runs[2] and resolved.snapshot_id == "snapA"
        assert torch.allclose(load_checkpoint(resolved.checkpoint_dir, "cpu").model.encode_image(x), want, atol=1e-5)
        assert resolve_model(cfg, "2").run_id == runs[1]
        assert resolve_model(cfg, f"models:/{cfg.tracking.registered_model}/1").run_id == runs[0]


def test_compare_lists_the_registered_versions(registry, tmp_path):
    from clipline.components.tracking.compare import compare_versions

    cfg, _, runs = registry
    c = client(cfg)
    exp_id = c.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    n_runs = len(c.search_runs([exp_id]))
    comp = compare_versions(cfg, out_dir=tmp_path)
    assert [r.version for r in comp.rows] == ["1", "2", "3"]
    assert comp.rows[2].aliases == ["champion"] and comp.rows[1].aliases == ["challenger"]
    assert all(r.snapshot_id == "snapA" and r.n_train == 6 for r in comp.rows)
    assert comp.rows[1].train_seconds == pytest.approx(11.0)
    assert comp.rows[2].metrics[PRIMARY] == pytest.approx(0.60)
    assert comp.metric_names[0] == PRIMARY
    assert comp.chart.stat().st_size > 1000 and comp.chart.read_bytes()[:4] == b"\x89PNG"
    assert comp.mlflow_run_id is None and len(c.search_runs([exp_id])) == n_runs  # nothing added to MLflow
    logged = compare_versions(cfg, log_to_mlflow=True, out_dir=tmp_path)  # only when asked
    arts = [a.path for a in c.list_artifacts(logged.mlflow_run_id, "compare")]
    assert any(a.endswith(".png") for a in arts) and any(a.endswith(".json") for a in arts)
    assert c.get_run(logged.mlflow_run_id).data.tags["clipline.kind"] == "compare"
    sub = compare_versions(cfg, ["champion", "1"], out_dir=tmp_path)
    assert [r.version for r in sub.rows] == ["3", "1"]


def test_compare_chart_title_stays_inside_the_image(tmp_path):
    import numpy as np
    from PIL import Image

    from clipline.components.tracking.compare import compare_chart_png

    metrics = [
        "zeroshot/imagenet-1k-validation/acc1",
        "zeroshot/flowers102/acc1",
        "retrieval/val/image_to_text_R5",
        "retrieval/val/text_to_image_R5",
    ]
    title = "team-vision-clip-base-patch32-laion-subset-experiments: " + ", ".join(metrics)
    png = compare_chart_png(["v1", "v2"], {m: [0.4, 0.6] for m in metrics}, tmp_path / "c.png", title=title)
    img = np.asarray(Image.open(png).convert("L"))
    band = img[: img.shape[0] // 6]  # the title band, above the plot
    assert (band < 200).any()  # the title is drawn there
    assert (band[:, :3] > 250).all() and (band[:, -3:] > 250).all()  # and touches neither edge
    assert (img[:3] > 250).all()  # nor the top


def test_compare_command(registry, tmp_path):
    from typer.testing import CliRunner

    from clipline.flows.cli import app

    cfg, _, _ = registry
    c = client(cfg)
    exp_id = c.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    n_runs = len(c.search_runs([exp_id]))
    runner = CliRunner()
    res = runner.invoke(app, ["--data-dir", str(cfg.data_dir), "compare", "--out", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "v1" in res.output and "v2" in res.output and "v3" in res.output
    assert "champion" in res.output and "0.6000" in res.output
    assert "logged to MLflow run" not in res.output and len(c.search_runs([exp_id])) == n_runs
    res = runner.invoke(
        app,
        ["--data-dir", str(cfg.data_dir), "compare", "1", "3", "--out", str(tmp_path), "--log-run"],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    assert "logged to MLflow run" in res.output and len(c.search_runs([exp_id])) == n_runs + 1
    bad = runner.invoke(app, ["--data-dir", str(cfg.data_dir), "compare", "9"])
    assert bad.exit_code == 1 and "has no version 9" in bad.output
    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", runner.invoke(app, ["compare", "--help"]).output).split())
    assert "--log-run" in help_text and "nothing is written to MLflow" in help_text
