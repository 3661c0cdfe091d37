"""Shared fixtures. Heavy services (Prefect's test server, Ray) start once per session, lazily."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Never reach the network for models or telemetry during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# Each pytest-xdist worker gets its own Prefect home: two test servers on one SQLite database lock each other.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="clipline-tests-prefect-")


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
    training workers on a 2-core machine. One per session: an idle local Ray takes ~8% of a core,
    but one per module (tried at 17d4a0c) made the Ray tests slower by more than that saved."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster another worker or test started
            num_cpus=6,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): pytest-xdist then starts the long ones while there are short
    ones left to balance the workers, instead of ending on one long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
