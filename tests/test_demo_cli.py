"""`clipline demo` end to end at a small scale, then again on the same data dir: the rerun serves
the same URLs (the port recorded in the data dir), fetches nothing, trains nothing and says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from clipline.components.demo.server import recorded_ports

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[ingest]
processes = 1
[curate]
min_image_side = 64
[train]
model = "clipline-nano"
steps = 6
batch_size = 16
warmup_steps = 1
system_metrics = false
[evaluate]
retrieval_max_pairs = 200
"""


def _demo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`clipline demo` as a user runs it: its own process (Prefect: the session's test server)."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(get_current_settings().api.url),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "clipline.flows.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_demo_prints_summary_and_a_rerun_does_nothing_new(prefect_harness, mlflow_uri, tmp_path):
    from clipline.components.config import load_config
    from clipline.components.tracking.runs import client

    cfg_file = tmp_path / "clipline.toml"
    cfg_file.write_text(CONFIG)
    data = tmp_path / "data"
    args = ["--config", str(cfg_file), "--data-dir", str(data), "demo", "--n", "72"]

    first = _demo(args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    s1 = json.loads((data / "reports" / "demo_summary.json").read_text())
    assert s1["n_fetched"] == 72 and s1["skipped"] is None
    # [train] settings of the config file win over the demo's recipe
    assert s1["train"]["model"] == "clipline-nano" and s1["train"]["steps"] == 6
    assert "steps" not in s1["train_recipe"] and "model" not in s1["train_recipe"]
    assert 0.0 <= s1["heldout_acc1"] <= 1.0 and 0.0 <= s1["seen_acc1"] <= 1.0
    assert abs(s1["chance_acc1"] - 1 / 48) < 1e-9
    assert s1["model_version"]["alias"] == "champion"
    labels = [label for label, _ in s1["rows"]]
    for label in ("URLs fetched", "rows kept", "training", "zero-shot top-1 (heldout)", "zero-shot top-1 (seen)",
                  "model version"):
        assert label in labels, label
        assert label in first.stdout, label
    for text in ("chance level", "MLflow UI", "Prefect UI"):
        assert text in first.stdout, text
    ports = recorded_ports(data / "toyweb")
    assert ports is not None

    second = _demo(args, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    s2 = json.loads((data / "reports" / "demo_summary.json").read_text())
    assert recorded_ports(data / "toyweb") == ports  # same port, so the same URLs
    assert s2["n_fetched"] == 0 and s2["train"] is None and s2["model_version"] is None
    assert "nothing new" in s2["skipped"] and "nothing new" in second.stdout
    cfg = load_config(cfg_file, {"data_dir": data})
    versions = client(cfg).search_model_versions(f"name = '{cfg.tracking.registered_model}'")
    assert len(versions) == 1


def test_recorded_ports_read_back_and_a_missing_record_is_none(tmp_path):
    from clipline.components.config import DemoConfig
    from clipline.components.demo import serve_toy_web

    assert recorded_ports(tmp_path) is None
    (tmp_path / "toyweb.json").write_text("{not json")
    assert recorded_ports(tmp_path) is None
    with serve_toy_web(DemoConfig(n_images=10, warm_cache=False), tmp_path) as web:
        ports = recorded_ports(tmp_path)
        assert ports is not None and web.base_url.endswith(f":{ports[0]}")
        # the recorded port is the one that answers
        with socket.socket() as s:
            s.settimeout(2)
            s.connect(("127.0.0.1", ports[0]))
    with serve_toy_web(DemoConfig(n_images=10, warm_cache=False, port=ports[0], internal_port=ports[1]),
                       tmp_path / "again") as web2:
        assert web2.base_url == web.base_url  # free again after the first stopped: same URLs


def test_demo_train_recipe_is_validated_and_merged():
    import pytest

    from clipline.components.config import DEMO_TRAIN, ConfigError, load_config

    cfg = load_config(None, {"demo": {"train": {"lr": 1e-3}}})
    assert cfg.demo.train == {**DEMO_TRAIN, "lr": 1e-3}  # the other recipe values stay
    with pytest.raises(ConfigError, match="unknown train setting.*nope"):
        load_config(None, {"demo": {"train": {"nope": 1}}})
    with pytest.raises(ConfigError, match="demo.train"):
        load_config(None, {"demo": {"train": {"lr": -1}}})
