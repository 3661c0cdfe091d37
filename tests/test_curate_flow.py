"""The curate Prefect flow (real ephemeral Prefect test server) and the `clipline curate` command."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipline.components.curate.steps import STEPS
from clipline.flows.cli import app
from test_curate_helpers import config, jpeg, pattern_image, read_snapshot, row, write_shard


@pytest.mark.slow
def test_curate_flow_builds_snapshot_and_publishes_artifacts(data_dir, mlflow_uri, prefect_harness):
    from prefect.artifacts import Artifact

    from clipline.flows.curate import curate_flow, progress_to

    write_shard(
        data_dir,
        "s0",
        [row(f"k{i}", f"a photo of object number {i} here", seed=i) for i in range(6)]
        + [row("short", "tiny", seed=99)],
    )
    cfg = config(data_dir)
    seen = []
    with progress_to(lambda step, done, total: seen.append((step, done, total))):
        res = curate_flow(cfg=cfg)
    assert res.new and res.n_rows == 6 and res.counts["dropped"]["too_few_words"] == 1
    assert seen[-1] == ("done", len(STEPS), len(STEPS)) and len(seen) == len(STEPS) + 1
    art = Artifact.get("curate-report")
    assert art is not None and res.snapshot_id in art.data and "too_few_words" in art.data
    table = Artifact.get("curate-counts")
    assert table is not None and "too_few_words" in str(table.data)
    again = curate_flow(cfg=cfg)
    assert again.new is False and again.snapshot_id == res.snapshot_id


@pytest.mark.slow
def test_cli_curate_with_eval_set(data_dir, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaked = pattern_image(777, size=160)
    eval_file = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"image": [jpeg(leaked)], "label": [0]}), eval_file)
    write_shard(
        data_dir,
        "s0",
        [row(f"k{i}", f"a photo of object number {i} here", seed=i) for i in range(4)]
        + [row("leak", "a photo copied from the test set", image=jpeg(leaked, quality=50))],
    )
    runner = CliRunner()
    out = runner.invoke(app, ["--data-dir", str(data_dir), "curate", "--eval-set", str(eval_file)])
    assert out.exit_code == 0, out.output
    assert "eval_contamination" in out.output and "kept" in out.output
    m = json.loads(next((data_dir / "snapshots").glob("*/manifest.json")).read_text())
    assert m["counts"]["dropped"]["eval_contamination"] == 1
    assert "leak" not in read_snapshot(config(data_dir), m).column("key").to_pylist()
    bad = runner.invoke(app, ["--data-dir", str(data_dir), "curate", "--eval-set", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and "does not exist" in bad.output
    empty = tmp_path / "empty-data"
    empty.mkdir()
    none = runner.invoke(app, ["--data-dir", str(empty), "curate"])
    assert none.exit_code != 0 and "clipline ingest" in none.output
