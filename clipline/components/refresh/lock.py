"""One pipeline or refresh run per data dir at a time: a named lock in the catalog.

The lock row is written when the run starts and deleted when it ends; the catalog file is not
kept open in between (the stages open it themselves). A lock whose holder process on this host
has died (kill -9, power loss) is stale and is taken over by the next run
(:meth:`Catalog.acquire_lock`). A second run while one is going fails at once with
:class:`RunBusy`, naming the holder: it does not wait. Prefect deployments add their own
concurrency limit of 1, so runs triggered through Prefect queue instead of failing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from clipline.components.catalog import Catalog, LockHeld
from clipline.components.config import Config

#: shared by `pipeline` and `refresh`: both write the same catalog, raw shards and snapshots
RUN_LOCK = "pipeline-run"


class RunBusy(RuntimeError):
    """Another pipeline/refresh run holds the data dir."""


def _open(cfg: Config, wait_s: float) -> Catalog:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Catalog(cfg.catalog_path)
        except RuntimeError as e:  # another process has the DuckDB file open right now
            if time.monotonic() >= deadline:
                raise RunBusy(f"{e} (another pipeline or refresh run is probably working in {cfg.data_dir}; "
                              "wait for it to finish)") from e
            time.sleep(0.5)


@contextmanager
def exclusive_run(cfg: Config, holder: str, open_wait_s: float = 10.0) -> Iterator[None]:
    """Hold the data dir's run lock for the body; raises RunBusy at once when another live run holds it.

    ``open_wait_s``: how long to retry opening the catalog while another process briefly has it open.
    """
    cat = _open(cfg, open_wait_s)
    try:
        cat.acquire_lock(RUN_LOCK, holder)
    except LockHeld as e:
        raise RunBusy(f"{e} (data dir {cfg.data_dir}); a second run does not wait, try again later") from e
    finally:
        cat.close()
    try:
        yield
    finally:
        # release even when the body failed; the pid check keeps us from dropping someone else's lock
        cat = _open(cfg, max(open_wait_s, 60.0))
        try:
            cat.release_lock(RUN_LOCK)
        finally:
            cat.close()


def holder_name(what: str) -> str:
    return f"clipline {what} (pid {os.getpid()})"
