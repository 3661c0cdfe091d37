"""One pipeline or refresh run per data dir at a time: a named lock in the catalog.

The lock row is written when the run starts and deleted when it ends; the catalog file is not
kept open in between (the stages open it themselves). A lock whose holder process on this host
has died (kill -9, power loss) is stale and is taken over by the next run
(:meth:`Catalog.acquire_lock`). A second run while one is going waits up to ``wait_s``
(``refresh.lock_wait_s``, default 0) for it, then fails with :class:`RunBusy` naming the holder.
Prefect deployments add their own concurrency limit of 1, so runs of one deployment queue instead;
a `pipeline` and a `refresh` run overlapping are serialised by this lock.
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
                raise RunBusy(
                    f"{e} (another pipeline or refresh run is probably working in {cfg.data_dir}; "
                    "wait for it to finish)"
                ) from e
            time.sleep(0.5)


def _acquire(cfg: Config, holder: str, wait_s: float, open_wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        cat = _open(cfg, max(open_wait_s, deadline - time.monotonic()))
        try:
            cat.acquire_lock(RUN_LOCK, holder)
            return
        except LockHeld as e:
            if time.monotonic() >= deadline:
                waited = f"after waiting {wait_s:g} s" if wait_s else "(refresh.lock_wait_s = 0: no waiting)"
                raise RunBusy(f"{e} (data dir {cfg.data_dir}) {waited}; try again later") from e
        finally:
            cat.close()
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


@contextmanager
def exclusive_run(cfg: Config, holder: str, wait_s: float | None = None, open_wait_s: float = 10.0) -> Iterator[None]:
    """Hold the data dir's run lock for the body. Waits up to ``wait_s`` (default
    ``refresh.lock_wait_s``) while another live run holds it, then raises RunBusy.

    ``open_wait_s``: how long to retry opening the catalog while another process briefly has it open.
    """
    _acquire(cfg, holder, cfg.refresh.lock_wait_s if wait_s is None else wait_s, open_wait_s)
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
