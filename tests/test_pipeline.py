"""The pipeline flow end to end at a small scale: toy web -> ingest -> curate -> train -> evaluate
-> registry, then a rerun with no new data that does no new work. Its local state (catalog, MLflow's
default SQLite store) lives in a state dir apart from the data dir."""

from __future__ import annotations

import pytest

from clipline.components.catalog import Catalog
from clipline.components.config import load_config
from clipline.components.demo import serve_toy_web, write_heldout_set


@pytest.mark.slow
def test_pipeline_registers_a_champion_and_a_rerun_does_no_new_work(prefect_harness, tmp_path, monkeypatch):
    from clipline.components.tracking.runs import client
    from clipline.flows.pipeline import pipeline_flow, summary_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: SQLite in the state dir
    heldout = write_heldout_set(tmp_path / "eval", n_per_class=3)
    cfg = load_config(
        None,
        {
            "data_dir": tmp_path / "data",
            "state_dir": tmp_path / "state",
            "demo": {"n_images": 240, "seed": 1},
            "ingest": {"read_timeout": 3.0, "total_timeout": 5.0, "processes": 1},
            "curate": {"min_image_side": 64},
            "train": {
                "model": "clipline-nano",
                "steps": 8,
                "batch_size": 16,
                "warmup_steps": 1,
                "system_metrics": False,
            },
        },
    )
    with serve_toy_web(cfg.demo, tmp_path / "web") as web:
        cfg.ingest.allow_hosts = [web.allow_host]
        first = pipeline_flow([str(web.url_list)], cfg, eval_sets=[str(heldout.data)])
        again = pipeline_flow([str(web.url_list)], cfg, eval_sets=[str(heldout.data)])

    assert first.ingest.n_fetched == 240 and first.curate.new and first.train.steps == 8
    m = first.evaluation.eval.metrics
    assert "zeroshot/heldout/acc1" in m and "retrieval/val/image_to_text_R5" in m
    reg = first.evaluation.registry
    assert reg.alias == "champion"
    v = client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert str(v.version) == reg.version and v.tags["snapshot_id"] == first.curate.snapshot_id
    assert v.tags["promotion.metric"] == "zeroshot/heldout/acc1"  # the default primary metric: the first eval set
    assert "training recipe: clipline-nano, 8 steps, batch 16" in v.description
    with Catalog(cfg.catalog_path, read_only=True) as cat:
        assert cat.get_snapshot(first.curate.snapshot_id)["n_rows"] == first.curate.n_rows

    # bulk data in the data dir, local state in the state dir, nothing of either in the other
    data, state = tmp_path / "data", tmp_path / "state"
    assert cfg.catalog_path == state / "catalog.duckdb" and cfg.mlflow_uri.endswith(str(state / "mlflow.db"))
    assert {p.name for p in state.iterdir()} <= {"catalog.duckdb", "catalog.duckdb.wal", "mlflow.db", "tmp"}
    assert {"catalog.duckdb", "mlflow.db"} <= {p.name for p in state.iterdir()}
    assert {"raw", "snapshots", "checkpoints", "mlartifacts"} <= {p.name for p in data.iterdir()}
    assert not {"catalog.duckdb", "mlflow.db", "tmp"} & {p.name for p in data.iterdir()}

    assert again.ingest.n_fetched == 0 and not again.curate.new
    assert again.train is None and again.skipped and "nothing new" in again.skipped
    assert any(label == "training" and "nothing new" in value for label, value in summary_rows(again))
