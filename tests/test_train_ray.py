"""The train stage on Ray Train (2 CPU workers, gloo): the Ray Data feed and worker-failure recovery."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
from mlflow.tracking import MlflowClient

from clipline.components.train.run import train

from trainkit import _cfg, _history, snapshot  # noqa: F401 - snapshot is a fixture


@pytest.mark.slow
def test_ray_data_feed_trains_two_workers_and_a_worker_failure_is_recovered(data_dir, snapshot, mlflow_uri, ray_local):
    """One Ray Train run (a trainer takes ~15 s to start): two workers fed by Ray Data, one of which
    fails at step 5; Ray Train restarts the group from the step-3 checkpoint and the run ends at 8."""
    cfg = _cfg(
        data_dir,
        steps=8,
        checkpoint_every=3,
        fail_at_step=5,
        max_failures=1,
        workers=2,
        backend="ray",
        data_feed="ray",
        run_name="ray-failure",
    )
    res = train(cfg, snapshot)
    assert res.steps == 8 and res.samples_per_s > 0
    run_dir = cfg.checkpoints_dir / "ray-failure"
    assert (run_dir / ".failure-injected-5").exists()
    assert [v for _, v in _history(res.run_id, "train/resumed_from_step")] == [3.0]
    assert [int(step) for step, _ in _history(res.run_id, "train/loss")][-3:] == [6, 7, 8]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{res.checkpoint_dir}")
    assert isinstance(model, open_clip.CLIP)
    meta = json.loads((res.checkpoint_dir / "clipline.json").read_text())
    assert meta["step"] == 8 and meta["train"]["data_feed"] == "ray"
    assert MlflowClient().get_run(res.run_id).data.tags["clipline.data_feed"] == "ray"  # the loop's own feed


@pytest.mark.slow
def test_the_ray_data_feed_yields_the_planned_batches_decoded_in_ray_data_tasks(data_dir, snapshot, ray_local):
    """ray_epoch_batches reads and decodes in Ray Data tasks and yields, in order, the batches of
    epoch_batch_plan (which tests/test_train_data.py shows are the torch feed's), also after a skip."""
    from clipline.components.model import factory
    from clipline.components.train.data import (
        BatchDecoder,
        PlannedBatchReader,
        epoch_batch_plan,
        ray_epoch_batches,
        resolve_snapshot,
    )

    info = resolve_snapshot(data_dir / "snapshots", None, snapshot)
    b = factory.create("clipline-nano")
    decoder = BatchDecoder(b.train_transform, b.tokenizer, b.image_size)
    args = dict(seed=3, epoch=1, rank=1, world_size=2, num_workers=2, skip_batches=2)
    got = list(ray_epoch_batches(info, decoder, 8, **args, with_keys=True))
    reader = PlannedBatchReader([str(f) for f in info.files], decoder, with_keys=True)
    want = [reader.rows(p).column("key").to_pylist() for p in epoch_batch_plan(info, 8, **args)]
    assert [g["key"] for g in got] == want and len(want) > 3
    for g in got:  # decoded model-ready batches (the snapshot's corrupt images are dropped and counted)
        n = g["image"].shape[0]
        assert g["image"].shape[1:] == (3, b.image_size, b.image_size) and g["text"].shape[0] == n
        assert n + g["n_bad"] == 8


@pytest.mark.slow
def test_use_gpu_auto_follows_the_ray_clusters_gpus_not_the_drivers():
    """On a cluster the driver usually has no GPU: ``use_gpu = "auto"`` reads the cluster's GPUs. Ray
    resources are logical, so a local Ray declaring 2 GPUs stands in for a cluster with 2 GPU nodes."""
    import subprocess
    import sys

    code = """
import warnings, ray
ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
from clipline.components.train.ray import resolve_use_gpu
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    print(resolve_use_gpu("auto", 2), resolve_use_gpu("auto", 3), resolve_use_gpu("no", 1), resolve_use_gpu("yes", 4))
    print(str(w[0].message) if w else "")
"""
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    decisions, warning = out.stdout.strip().splitlines()[-2:]
    assert decisions == "True False False True"
    assert "2 GPU(s) for 3 train workers: training on CPUs" in warning


@pytest.mark.slow
def test_use_gpu_auto_on_a_cluster_without_gpus_trains_on_cpus(ray_local):
    from clipline.components.train.ray import resolve_use_gpu

    assert resolve_use_gpu("auto", 2) is False


@pytest.mark.slow
def test_data_feed_auto_takes_ray_data_on_a_cluster_of_several_nodes_and_torch_on_one(ray_local):
    """Ray's own multi-node harness (a head and a worker node on this machine), in a child process
    so it does not meet the session's Ray."""
    import subprocess
    import sys

    from clipline.components.train.ray import resolve_data_feed

    assert resolve_data_feed("auto") is False  # the session's Ray: one node
    assert resolve_data_feed("ray") is True and resolve_data_feed("torch") is False
    code = """
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
from clipline.components.train.ray import resolve_data_feed
print(resolve_data_feed("auto"), resolve_data_feed("torch"))
ray.shutdown()
cluster.shutdown()
"""
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True False"
