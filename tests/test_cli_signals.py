"""SIGTERM, as a service manager or a container runtime sends it (to the main process only, then
SIGKILL 10 s later), stops a `clipline` command and every process it started within those 10 s.
The commands run as real subprocesses in their own session; every descendant is listed (psutil)
before the signal and must be gone by the deadline. `clipline serve` is tested in
test_services.py, against a real Prefect server."""

from __future__ import annotations

import signal
import time
import urllib.request

import psutil
import pytest

from tests.pipelinekit import SMALL, base_env, deep_merge, free_port, write_toml
from tests.sigkit import (
    GRACE_S,
    HangingServer,
    hanging_url_list,
    kill_all,
    port_is_free,
    run_lock_holders,
    sigterm_and_wait,
    start,
)


@pytest.mark.slow
def test_ui_stops_the_mlflow_server_and_its_job_consumers_on_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start(["--data-dir", str(tmp_path / "data"), "ui", "--port", str(port)], base_env(), tmp_path, log)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the MLflow UI never answered:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)  # MLflow starts its job consumers beside the server
        took, tree, left = sigterm_and_wait(proc, log)
        assert len(tree) >= 2  # the launcher, its server (and job consumers)
        assert took <= GRACE_S, f"`clipline ui` took {took:.1f} s to exit after SIGTERM:\n{log.read_text()[-2000:]}"
        assert proc.returncode == 0, log.read_text()[-2000:]
        assert not left, f"still running {GRACE_S:g} s after SIGTERM: {[p.cmdline() for p in left]}"
        assert port_is_free(port)
    finally:
        kill_all(proc, tree)


@pytest.mark.slow
def test_run_stopped_mid_flow_by_sigterm_releases_the_data_dir_and_stops_its_tree(tmp_path):
    """`clipline run` in this process, mid-download inside its `ingest` flow (with Prefect's
    temporary server as a child process): SIGTERM ends everything within 10 s, the run lock is
    released on the way out, and the last line says why."""
    hang = HangingServer()
    config = write_toml(
        tmp_path / "clipline.toml",
        deep_merge(
            SMALL,
            {"ingest": hang.ingest_settings()},
        ),
    )
    data = tmp_path / "data"
    urls = hanging_url_list(tmp_path / "hang.csv", hang.port)
    log = tmp_path / "run.log"
    proc = start(
        ["--config", str(config), "--data-dir", str(data), "run", str(urls)],
        base_env(PREFECT_HOME=str(tmp_path / "prefect-home")),
        tmp_path,
        log,
    )
    tree: list[psutil.Process] = []
    try:
        while not hang.connected.wait(1):
            assert proc.poll() is None, log.read_text()[-3000:]
        took, tree, left = sigterm_and_wait(proc, log)
        out = log.read_text()
        assert tree, "the temporary Prefect server is a child process"
        assert took <= GRACE_S, f"`clipline run` took {took:.1f} s to exit after SIGTERM:\n{out[-2000:]}"
        assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
        assert out.strip().splitlines()[-1] == "error: stopped by SIGTERM", out[-2000:]
        assert "Traceback" not in out, out[-3000:]
        assert not left, f"still running {GRACE_S:g} s after SIGTERM: {[p.cmdline() for p in left]}"
        assert run_lock_holders(data) == []
    finally:
        kill_all(proc, tree)
        hang.close()
