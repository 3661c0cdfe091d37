"""Prefect's exit work, done before a failing `clipline` process prints its one-line reason.

At interpreter exit Prefect sends what its background services still hold (events, API logs) and
stops the temporary server it started, and both log ("Still processing items...", "Stopping
temporary server..."). Left to exit, those lines come after the error line, which must stay the last
line a user sees. Prefect has no public call for either, so this module is the one place that uses
its private API, pinned by ``tests/test_prefect_private.py``, which fails when Prefect renames or
reshapes these:

- ``prefect._internal.concurrency.services._QueueServiceBase.drain_all(timeout, at_exit)``: what the
  exit hook calls to flush every queue service;
- ``prefect.server.api.server.SubprocessASGIServer._instances``: the temporary servers this process
  started, each with ``stop()``, which the exit hook also calls.
"""

from __future__ import annotations

import sys


def flush_prefect(timeout: float = 30.0) -> None:
    """Send what Prefect's background workers still hold (waiting up to ``timeout`` s) and stop the
    temporary server this process started, if any. Does nothing if no flow ran; exit does the same
    work again, idempotently. Only for a process about to exit: the temporary server is gone after."""
    if "prefect.events.worker" in sys.modules:
        from prefect._internal.concurrency.services import _QueueServiceBase

        try:
            _QueueServiceBase.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # noqa: BLE001 - best effort on the way out; exit drains again anyway
            pass
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - best effort on the way out; exit stops it again anyway
                pass
