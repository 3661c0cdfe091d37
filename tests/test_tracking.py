"""The registry on a real MLflow (SQLite in tmp): versions, tags, the promotion rule, loading by
alias, and `compare` (library and command)."""

from __future__ import annotations

import pytest
import torch

from evalkit import make_checkpoint, make_snapshot, simulate_training_run

from clipline.components.config import load_config
from clipline.components.tracking.registry import decide_promotion, register_and_promote, resolve_model
from clipline.components.tracking.runs import client, log_metrics

PRIMARY = "zeroshot/heldout/acc1"


def test_promotion_rule_is_strict_and_needs_the_metric():
    assert decide_promotion(0.4, None, 0.0, PRIMARY, None).promote  # first version
    assert not decide_promotion(0.50, 0.50, 0.0, PRIMARY, "1").promote  # a tie does not promote
    assert not decide_promotion(0.505, 0.50, 0.01, PRIMARY, "1").promote  # inside the margin
    assert decide_promotion(0.52, 0.50, 0.01, PRIMARY, "1").promote
    d = decide_promotion(None, 0.5, 0.0, PRIMARY, "1")
    assert not d.promote and "no 'zeroshot/heldout/acc1'" in d.reason


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three trained models registered in a temporary MLflow, with known primary metrics."""
    tmp = tmp_path_factory.mktemp("reg")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    cfg = load_config(None, {"data_dir": tmp / "data", "evaluate": {"primary_metric": PRIMARY, "promotion_margin": 0.01}})
    sid = make_snapshot(cfg.snapshots_dir, "snapA", n_val=4, n_train=6)
    results, runs = [], []
    for seed, acc in [(0, 0.50), (1, 0.505), (2, 0.60)]:
        ckpt = make_checkpoint(tmp / f"ckpt{seed}", seed=seed)
        run_id, uri = simulate_training_run(cfg, ckpt, sid, seed=seed)
        log_metrics(cfg, run_id, {PRIMARY: acc, "retrieval/val/image_to_text_R5": acc / 2})
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


def test_model_loads_back_by_alias(registry, tmp_path):
    import mlflow

    from clipline.components.evaluate.checkpoint import load_checkpoint
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
    comp = compare_versions(cfg, out_dir=tmp_path)
    assert [r.version for r in comp.rows] == ["1", "2", "3"]
    assert comp.rows[2].aliases == ["champion"] and comp.rows[1].aliases == ["challenger"]
    assert all(r.snapshot_id == "snapA" and r.n_train == 6 for r in comp.rows)
    assert comp.rows[1].train_seconds == pytest.approx(11.0)
    assert comp.rows[2].metrics[PRIMARY] == pytest.approx(0.60)
    assert comp.metric_names[0] == PRIMARY
    assert comp.chart.stat().st_size > 1000 and comp.chart.read_bytes()[:4] == b"\x89PNG"
    arts = [a.path for a in client(cfg).list_artifacts(comp.mlflow_run_id, "compare")]
    assert any(a.endswith(".png") for a in arts) and any(a.endswith(".json") for a in arts)
    sub = compare_versions(cfg, ["champion", "1"], log_to_mlflow=False, out_dir=tmp_path)
    assert [r.version for r in sub.rows] == ["3", "1"]


def test_compare_command(registry, tmp_path):
    from typer.testing import CliRunner

    from clipline.flows.cli import app

    cfg, _, _ = registry
    runner = CliRunner()
    res = runner.invoke(app, ["--data-dir", str(cfg.data_dir), "compare", "--out", str(tmp_path), "--no-log"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "v1" in res.output and "v2" in res.output and "v3" in res.output
    assert "champion" in res.output and "0.6000" in res.output
    bad = runner.invoke(app, ["--data-dir", str(cfg.data_dir), "compare", "9"])
    assert bad.exit_code == 1 and "has no version 9" in bad.output
