"""Shared fixtures. Heavy services (Prefect's test server, Ray) start once per session, lazily."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach the network for models or telemetry during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "clipline-data"
    d.mkdir()
    return d


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's ephemeral test server, started once for the whole session (~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with more logical CPUs than cores, so Ray Data tasks can run beside
    training workers on a 2-core machine."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=6,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
    yield ray
    ray.shutdown()
