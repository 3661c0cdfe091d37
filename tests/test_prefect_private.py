"""The private Prefect API that clipline/flows/prefect_exit.py relies on: these fail when Prefect
renames or reshapes it, instead of the CLI's last line quietly stopping being its error."""

from __future__ import annotations

import inspect
import subprocess
import sys


def test_queue_services_still_drain_with_timeout_and_at_exit():
    from prefect._internal.concurrency.services import _QueueServiceBase

    params = inspect.signature(_QueueServiceBase.drain_all).parameters
    assert {"timeout", "at_exit"} <= set(params), list(params)
    # nothing queued: returns at once, without raising
    _QueueServiceBase.drain_all(timeout=1.0, at_exit=False)


def test_flush_stops_the_temporary_server_this_process_started(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    from clipline.flows.prefect_exit import flush_prefect

    assert isinstance(SubprocessASGIServer._instances, dict)
    # this test's own registry: the session's test server (also one of these) must not be stopped
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    # a temporary server as Prefect records it, whose process is a stand-in (starting a real one
    # takes ~10 s): flush_prefect must find it through _instances and stop its process
    server = SubprocessASGIServer(port=None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server.server_process, server.running = proc, True
    try:
        flush_prefect(timeout=1.0)
        assert proc.wait(timeout=10) is not None  # stopped
        assert server.server_process is None and not server.running
        assert None not in SubprocessASGIServer._instances
    finally:
        if proc.poll() is None:
            proc.kill()
