"""The path to a cluster: a Ray cluster started with `ray start --head` (its own processes, token
authentication on, the token given to every node in RAY_AUTH_TOKEN), and clipline pointed at it with RAY_ADDRESS, as on the head
node of a real cluster. Ingestion runs its shards as Ray tasks there and training runs as a Ray Train
job there. The driver runs in a child process so it does not meet the session's in-process Ray."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = r"""
import json, os, sys
from pathlib import Path
import ray
from clipline.components.config import DemoConfig, load_config
from clipline.components.demo import serve_toy_web
from clipline.components.ingest.runner import ingest
from clipline.components.train import synthetic
from clipline.components.train.run import train

d = Path(sys.argv[1])
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
with serve_toy_web(DemoConfig(n_images=30, fault_rate=0.0, small_image_share=0.0, wide_image_share=0.0),
                   d / "web") as web:
    cfg = load_config(None, {"data_dir": d, "ingest": {"allow_hosts": [web.allow_host], "shard_size": 10},
                             "train": {"model": "clipline-nano", "batch_size": 16, "steps": 3, "workers": 2,
                                       "threads": 1, "loader_workers": 0, "data_feed": "torch",
                                       "system_metrics": False, "run_name": "on-cluster"}})
    r = ingest(cfg, [str(web.url_list)])
writers = sorted({json.loads(p.with_suffix(".stats.json").read_text())["written_by"] for p in r.shards})
sid = synthetic.write_snapshot(d / "snapshots", n=200, size=48)
res = train(cfg, sid)
print(json.dumps({"fetched": r.n_fetched, "ok": r.n_success, "writers": writers, "driver_pid": os.getpid(),
                  "session_dir": ray._private.worker._global_node.get_session_dir_path(),
                  "steps": res.steps, "checkpoint": str(res.checkpoint_dir)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Kill the processes of this cluster only (`ray stop` would stop every Ray on the machine,
    the test session's own included)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.slow
def test_ingest_and_training_run_on_a_ray_cluster_given_by_ray_address(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
    # the cluster's token comes from the environment on every node, as a real cluster's secret would
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": __import__("secrets").token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        start = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--port",
                str(_free_port()),
                "--num-cpus",
                "6",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                temp_dir,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert start.returncode == 0, start.stderr[-2000:]
        address = re.search(r"ray start --address='([^']+)'", start.stdout + start.stderr).group(1)
        drv = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path)],
            capture_output=True,
            text=True,
            env={**env, "RAY_ADDRESS": address},
            timeout=600,
        )
        assert drv.returncode == 0, drv.stderr[-3000:]
        out = __import__("json").loads(drv.stdout.strip().splitlines()[-1])
    finally:
        _kill_cluster(temp_dir)
    assert out["session_dir"].startswith(temp_dir)  # the driver joined that cluster, not a local Ray
    assert out["fetched"] == out["ok"] == 30
    assert out["writers"] and all(not w.endswith(f":{out['driver_pid']}") for w in out["writers"])
    assert out["steps"] == 3 and (Path(out["checkpoint"]) / "open_clip_model.safetensors").is_file()


def test_a_ray_client_address_is_refused_with_what_to_do_instead(monkeypatch):
    from clipline.components.cluster import connect_ray

    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    with pytest.raises(
        ValueError,
        match=r"RAY_ADDRESS=ray://head.example:10001 is a Ray Client address.*"
        r"RAY_ADDRESS=auto",
    ):
        connect_ray()
