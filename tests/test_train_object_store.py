"""Training on a snapshot in object storage (issue 14, its first step): `train` given the URL of a
snapshot directory in an S3-compatible store on loopback (moto's server mode, a process of its own)
reads the manifest and the Parquet files from there, also from DataLoader worker processes, and
trains exactly the model it trains from the same snapshot on local disk; Ray Data tasks stream it
from there in the batches the local copy plans; the MLflow run records the snapshot's URL; a
missing bucket or snapshot stops with one line that says what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from clipline.components.model import checkpoint
from clipline.components.storage import StorageError
from clipline.components.train.data import SnapshotError, resolve_snapshot
from clipline.components.train.run import train
from tests.pipelinekit import moto_server
from trainkit import _cfg, snapshot  # noqa: F401 - snapshot is a fixture

CREDS = {
    "AWS_ACCESS_KEY_ID": "clipline-test",
    "AWS_SECRET_ACCESS_KEY": "clipline-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """An S3 filesystem on the loopback store, with the environment every reader takes it from."""
    import s3fs

    for k, v in {**CREDS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists("snaps"):
        fs.mkdir("snaps")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def _upload(fs, local_snapshots, snapshot_id: str, prefix: str) -> str:
    fs.put(str(local_snapshots / snapshot_id), f"snaps/{prefix}/snapshots/{snapshot_id}", recursive=True)
    return f"s3://snaps/{prefix}/snapshots/{snapshot_id}"


@pytest.mark.slow
def test_training_on_a_snapshot_in_object_storage_equals_training_on_the_local_copy(
    data_dir, snapshot, mlflow_uri, s3, tmp_path
):
    url = _upload(s3, data_dir / "snapshots", snapshot, "equal")
    info = resolve_snapshot(data_dir / "snapshots", None, url)
    local = resolve_snapshot(data_dir / "snapshots", None, snapshot)
    assert info.location == url and info.snapshot_id == snapshot
    assert (info.n_train, info.row_groups) == (local.n_train, local.row_groups)
    assert all(str(f).startswith(url + "/") for f in info.files)

    # one DataLoader worker: the files are opened in a forked process too
    on_disk = train(_cfg(data_dir, steps=6, run_name="on-disk", loader_workers=1), snapshot)
    in_store = train(_cfg(data_dir, steps=6, run_name="in-store", loader_workers=1), url)
    assert in_store.steps == 6
    from safetensors.torch import load_file

    a = load_file(str(on_disk.checkpoint_dir / checkpoint.WEIGHTS_FILE))
    b = load_file(str(in_store.checkpoint_dir / checkpoint.WEIGHTS_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    run = MlflowClient().get_run(in_store.run_id)
    assert run.data.tags["snapshot_uri"] == url and run.data.params["snapshot_uri"] == url
    assert run.data.tags["snapshot_id"] == snapshot
    assert MlflowClient().get_run(on_disk.run_id).data.tags["snapshot_uri"] == str(data_dir / "snapshots" / snapshot)

    # evaluated where the snapshot is not on disk: its val split is read from the store training read
    from clipline.components.config import load_config
    from clipline.components.evaluate.stage import evaluate

    assert json.loads((in_store.checkpoint_dir / "clipline.json").read_text())["snapshot_uri"] == url
    elsewhere = load_config(None, {"data_dir": tmp_path / "elsewhere"})
    from_store = evaluate(elsewhere, in_store.checkpoint_dir, datasets=[], log_to_mlflow=False)
    from_disk = evaluate(
        _cfg(data_dir), in_store.checkpoint_dir, datasets=[], snapshot_id=snapshot, log_to_mlflow=False
    )
    assert from_store.snapshot_id == snapshot and "retrieval/val/image_to_text_R5" in from_store.metrics
    assert from_store.metrics == pytest.approx(from_disk.metrics) and not from_store.notes
    named = evaluate(elsewhere, in_store.checkpoint_dir, datasets=[], snapshot_id=url, log_to_mlflow=False)
    assert named.snapshot_id == snapshot and named.metrics == pytest.approx(from_disk.metrics)  # --snapshot URL


def test_a_snapshot_url_that_is_not_there_stops_with_one_line_saying_what_to_fix(data_dir, snapshot, s3):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+"):
        resolve_snapshot(data_dir / "snapshots", None, "s3://no-such-bucket/snapshots/abc")
    with pytest.raises(SnapshotError, match=r"s3://snaps/nothing/snapshots/abc has no manifest.*manifest\.json"):
        resolve_snapshot(data_dir / "snapshots", None, "s3://snaps/nothing/snapshots/abc")
    # a snapshot whose files were not all copied
    url = _upload(s3, data_dir / "snapshots", snapshot, "partial")
    data_files = [p for p in s3.find(url.removeprefix("s3://")) if p.endswith(".parquet")]
    s3.rm(data_files[0])
    with pytest.raises(
        SnapshotError, match=r"data files listed in .*manifest\.json are missing: \['s3://snaps/partial"
    ):
        resolve_snapshot(data_dir / "snapshots", None, url)


@pytest.mark.slow
def test_the_train_command_stops_in_one_line_when_storage_refuses_the_snapshot_url(data_dir, s3, tmp_path):
    """`clipline train --snapshot URL` whose bucket is not there: one line naming the URL, the store and
    what to fix (an unreachable store and a refused key go through the same messages: tests/test_storage.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "clipline.flows.cli", "--data-dir", str(data_dir), "train"]
        + ["--snapshot", "s3://no-such-bucket/x/snapshots/abc", "--steps", "1"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: snapshot s3://no-such-bucket/x/snapshots/abc: bucket 'no-such-bucket' does not exist"
    )
    assert "AWS_ENDPOINT_URL" in last, last


RAY_FEED_FROM_STORE = """
import json, sys
import ray
from clipline.components.model import factory
from clipline.components.train.data import BatchDecoder, PlannedBatchReader, epoch_batch_plan, ray_epoch_batches
from clipline.components.train.data import resolve_snapshot

local_dir, url = sys.argv[1], sys.argv[2]
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
stored, local = resolve_snapshot(None, None, url), resolve_snapshot(local_dir, None, url.rsplit("/", 1)[1])
b = factory.create("clipline-nano")
decoder = BatchDecoder(b.train_transform, b.tokenizer, b.image_size)
args = dict(seed=3, epoch=1, rank=1, world_size=2, num_workers=2, skip_batches=2)
got = [g["key"] for g in ray_epoch_batches(stored, decoder, 8, **args, with_keys=True)]
reader = PlannedBatchReader([str(f) for f in local.files], decoder, with_keys=True)
want = [reader.rows(p).column("key").to_pylist() for p in epoch_batch_plan(local, 8, **args)]
print(json.dumps({"got": got, "want": want}))
"""


@pytest.mark.slow
def test_the_ray_data_feed_streams_a_snapshot_from_object_storage(data_dir, snapshot, s3, tmp_path):
    """Ray Data tasks (their own processes, with the store's settings from the environment, as on a
    cluster's nodes) read the snapshot from the store and yield the batches the local copy plans. In a
    process of its own: its Ray starts after the environment names the store."""
    url = _upload(s3, data_dir / "snapshots", snapshot, "ray")
    proc = subprocess.run(
        [sys.executable, "-c", RAY_FEED_FROM_STORE, str(data_dir / "snapshots"), url],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["got"] == out["want"] and len(out["want"]) > 3
