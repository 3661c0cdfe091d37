"""The evaluate stage end to end: a real checkpoint logged in MLflow, the Prefect flow with its
markdown artifact, registration, and the `clipline evaluate` command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evalkit import (
    COLORS,
    SHAPES,
    make_checkpoint,
    make_snapshot,
    make_zeroshot_set,
    simulate_training_run,
    write_wds_retrieval_set,
    write_wds_set,
)
from flowkit import run_flow_with_artifact

from clipline.components.config import load_config
from clipline.components.evaluate.datasets import load_eval_dataset
from clipline.components.evaluate.stage import evaluate
from clipline.components.tracking.runs import client


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One MLflow store and one trained-and-logged checkpoint for the module (creating the store is slow)."""
    tmp_path = tmp_path_factory.mktemp("evalflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, {"data_dir": tmp_path / "data", "evaluate": {"batch_size": 16}})
    sid = make_snapshot(cfg.snapshots_dir, "snapE", n_val=12, n_train=4)
    heldout = make_zeroshot_set(tmp_path / "heldout", [(c, s) for c in list(COLORS)[:2] for s in SHAPES], per_class=2)
    ckpt = make_checkpoint(cfg.checkpoints_dir / "run1", seed=1)
    run_id, uri = simulate_training_run(cfg, ckpt, sid, seed=1)
    yield cfg, sid, heldout, ckpt, run_id, uri
    mp.undo()


@pytest.mark.slow
def test_stage_logs_stable_metric_names_and_reports(setup):
    cfg, sid, heldout, ckpt, run_id, _ = setup
    res = evaluate(cfg, ckpt, datasets=[load_eval_dataset(heldout)])  # run and snapshot from clipline.json
    assert res.run_id == run_id and res.snapshot_id == sid
    expected = {"zeroshot/heldout/acc1", "zeroshot/heldout/acc5", "zeroshot/heldout/mean_per_class_recall"}
    expected |= {f"retrieval/val/{d}_R{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert set(res.metrics) == expected
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    logged = client(cfg).get_run(run_id).data.metrics
    assert {k: logged[k] for k in expected} == pytest.approx(res.metrics)
    arts = {a.path for a in client(cfg).list_artifacts(run_id, "eval")}
    assert {"eval/confusion_heldout.png", "eval/retrieval_grid.png", "eval/report.md", "eval/metrics.json"} <= arts
    assert json.loads(res.reports["metrics"].read_text()) == pytest.approx(res.metrics)
    assert "Worst classes on `heldout`" in res.markdown and "| `zeroshot/heldout/acc1` |" in res.markdown


def test_a_snapshot_whose_val_split_is_empty_skips_retrieval_with_a_note(setup):
    """A small snapshot's hash split can leave 'val' empty: the zero-shot sets are still measured and
    the report says why there is no retrieval, instead of the run failing after training."""
    cfg, _, heldout, ckpt, _, _ = setup
    sid = make_snapshot(cfg.snapshots_dir, "snapNoVal", n_val=0, n_train=6)
    res = evaluate(cfg, ckpt, datasets=[load_eval_dataset(heldout)], snapshot_id=sid, log_to_mlflow=False)
    assert "zeroshot/heldout/acc1" in res.metrics
    assert not any(k.startswith("retrieval/") for k in res.metrics)
    assert any("retrieval on the val split skipped" in n and "snapNoVal has no 'val' rows" in n for n in res.notes)
    assert "snapNoVal has no 'val' rows" in res.markdown


@pytest.mark.slow
def test_flow_registers_and_publishes_markdown(setup, prefect_harness):

    from clipline.flows.evaluate import evaluate_flow

    cfg, sid, heldout, ckpt, run_id, uri = setup
    out, md = run_flow_with_artifact(
        evaluate_flow, "evaluation", model=str(ckpt), datasets=[str(heldout)], register_model=True, cfg=cfg
    )
    assert out.registry is not None and out.registry.version == "1" and out.registry.alias == "champion"
    assert out.registry.model_uri == uri  # the model the train stage logged, found from the run
    mv = client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert mv.run_id == run_id and mv.tags["snapshot_id"] == sid

    assert "zeroshot/heldout/acc1" in md and "**champion**" in md

    # the flow takes CLIP_benchmark's naming too: wds/NAME with the set's root
    write_wds_set(cfg.data_dir.parent / "flow_wds_shapes", load_eval_dataset(heldout / "heldout.parquet"))
    out, md = run_flow_with_artifact(
        evaluate_flow,
        "evaluation",
        model=str(ckpt),
        datasets=["wds/shapes"],
        dataset_root=str(cfg.data_dir.parent / "flow_wds_{dataset}"),
        cfg=cfg,
    )
    assert "zeroshot/shapes/acc1" in out.eval.metrics and "zeroshot/shapes/acc1" in md


def test_evaluate_command(setup):
    cfg, sid, heldout, ckpt, run_id, _ = setup
    runner = CliRunner()
    res = runner.invoke(
        app_(),
        [
            "--data-dir",
            str(cfg.data_dir),
            "evaluate",
            "--model",
            str(ckpt),
            "--dataset",
            str(heldout / "heldout.parquet"),
            "--classnames",
            str(heldout / "classnames.json"),
        ],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    assert "zeroshot/heldout/acc1" in res.output and "retrieval/val/text_to_image_R5" in res.output
    assert "worst classes on heldout" in res.output
    bad = runner.invoke(
        app_(),
        [
            "--data-dir",
            str(cfg.data_dir),
            "evaluate",
            "--model",
            str(ckpt),
            "--dataset",
            str(cfg.data_dir / "missing.parquet"),
        ],
    )
    assert bad.exit_code == 1 and "missing.parquet does not exist" in bad.output

    # a CLIP_benchmark webdataset set, named as CLIP_benchmark names it
    write_wds_set(cfg.data_dir.parent / "wds_shapes", load_eval_dataset(heldout / "heldout.parquet"))
    args = ["--data-dir", str(cfg.data_dir), "evaluate", "--model", str(ckpt), "--dataset", "wds/shapes"]
    res = runner.invoke(
        app_(), [*args, "--dataset-root", str(cfg.data_dir.parent / "wds_{dataset}")], terminal_width=200
    )
    assert res.exit_code == 0 and "zeroshot/shapes/acc1" in res.output, res.output
    bad = runner.invoke(app_(), args[:-1] + ["shapes", "--dataset-root", str(cfg.data_dir.parent)])
    assert bad.exit_code == 1 and "wds/NAME" in bad.output
    # a CLIP_benchmark retrieval set (wds_flickr30k's layout) gives recall both ways under its name
    zs = load_eval_dataset(heldout / "heldout.parquet")
    write_wds_retrieval_set(
        cfg.data_dir.parent / "wds_captions", zs.images, [[f"a photo of a {zs.classnames[i]}"] for i in zs.labels]
    )
    res = runner.invoke(
        app_(), [*args[:-1], "wds/captions", "--dataset-root", str(cfg.data_dir.parent / "wds_{dataset}")]
    )
    assert res.exit_code == 0, res.output
    assert "retrieval/captions/text_to_image_R5" in res.output and "retrieval/captions/image_to_text_R1" in res.output


def app_():
    from clipline.flows.cli import app

    return app


@pytest.mark.slow
def test_a_checkpoint_from_another_tracking_store_is_evaluated_into_a_new_run_and_registered(
    setup, prefect_harness, tmp_path, monkeypatch
):
    """A colleague's checkpoint (its run and snapshot live in their store and data dir), on an eval
    set not named 'heldout', with the default configuration."""
    import shutil

    from clipline.components.model.checkpoint import load_checkpoint
    from clipline.components.tracking.registry import resolve_model, run_exists

    cfg, _, _, _, _, _ = setup
    colleague = load_config(
        None,
        {"data_dir": tmp_path / "colleague", "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'colleague.db'}"}},
    )
    their_ckpt = make_checkpoint(tmp_path / "colleague" / "ckpt", seed=3)
    my_uri = cfg.mlflow_uri
    their_run, _ = simulate_training_run(colleague, their_ckpt, "snapTheirs", seed=3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", my_uri)  # mlflow.set_tracking_uri(theirs) also set the variable
    copied = tmp_path / "from-colleague"
    shutil.copytree(their_ckpt, copied)
    pets = make_zeroshot_set(
        tmp_path / "pets", [(c, s) for c in list(COLORS)[2:4] for s in SHAPES], per_class=2, name="pets"
    )
    monkeypatch.setenv("CLIPLINE_TRACKING__REGISTERED_MODEL", "outside")
    mine = load_config(None, {"data_dir": cfg.data_dir})
    assert mine.tracking.registered_model == "outside" and not run_exists(mine, their_run)
    c = client(mine)
    exp_id = c.get_experiment_by_name(mine.tracking.experiment).experiment_id
    n_runs = len(c.search_runs([exp_id]))
    from clipline.flows.evaluate import evaluate_flow

    plain = evaluate_flow(model=str(copied), datasets=[str(pets)], cfg=mine)  # not registered: nothing logged
    assert "zeroshot/pets/acc1" in plain.eval.metrics and plain.registry is None
    assert any("metrics not logged" in n and their_run in n for n in plain.eval.notes)
    assert any("snapshot snapTheirs is not in" in n for n in plain.eval.notes)  # retrieval skipped, said so
    assert len(c.search_runs([exp_id])) == n_runs

    res = CliRunner().invoke(
        app_(),
        [
            "--data-dir",
            str(cfg.data_dir),
            "evaluate",
            "--model",
            str(copied),
            "--dataset",
            str(pets / "pets.parquet"),
            "--classnames",
            str(pets / "classnames.json"),
            "--register",
        ],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    assert "registered outside version 1 as champion" in res.output
    mv = c.get_model_version("outside", "1")
    assert mv.run_id != their_run and len(c.search_runs([exp_id])) == n_runs + 1
    run = c.get_run(mv.run_id)
    assert run.data.tags["clipline.source_checkpoint"] == str(copied.resolve())
    assert run.data.tags["clipline.source_run_id"] == their_run and run.data.tags["snapshot_id"] == "snapTheirs"
    assert 0.0 <= run.data.metrics["zeroshot/pets/acc1"] <= 1.0
    assert {a.path for a in c.list_artifacts(mv.run_id, "eval")} >= {"eval/report.md", "eval/metrics.json"}
    assert mv.tags["promotion.metric"] == "zeroshot/pets/acc1" and mv.tags["source_run_id"] == their_run
    assert f"trained in run {their_run} of another tracking store" in mv.description
    # registered like any version: it resolves to its checkpoint in this store, with the same weights
    resolved = resolve_model(mine, "1")
    assert resolved.run_id == mv.run_id and resolved.checkpoint_dir != copied.resolve()
    import torch

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            load_checkpoint(resolved.checkpoint_dir, "cpu").model.encode_image(x),
            load_checkpoint(copied, "cpu").model.encode_image(x),
        )
    assert "zeroshot/pets/acc1" not in client(colleague).get_run(their_run).data.metrics  # their store untouched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", my_uri)
