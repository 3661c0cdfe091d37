"""Stopping the `clipline` process, and every process it started, promptly on SIGTERM or SIGINT.

A service manager or a container runtime sends SIGTERM and kills 10 s later (``GRACE_S``), often
only the main process: whatever it started and did not stop (an MLflow server and its job
consumers, a flow run's subprocess, Prefect's temporary server, process pools) would be left
running. So:

- the first SIGTERM or SIGINT asks the command to stop: a command doing work gets
  :class:`Terminated` (a ``KeyboardInterrupt``, so code that cleans up after Ctrl-C does the same
  after SIGTERM) and a long-running service (``serve``, ``ui``) is told through
  :data:`stop_requested`;
- a watchdog thread started at that moment kills every process still in the tree and ends this
  one at ``HARD_STOP_S`` after the signal, whatever the command is doing then (the signal is seen
  through Python's wake-up fd, so also while a Prefect flow has its own SIGTERM handler);
- a second signal does the same at once.

:func:`stop_tree` ends the descendants of this process: each is asked (SIGTERM), then killed
(SIGKILL) when it has not exited within its share of the deadline. It needs no Prefect.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import psutil

#: what a service manager or container runtime waits between SIGTERM and SIGKILL
GRACE_S = 10.0
#: when the watchdog ends the process after the first signal (inside GRACE_S, with a margin)
HARD_STOP_S = 9.0

#: set at the first SIGTERM/SIGINT; long-running commands watch it
stop_requested = threading.Event()
_first_signal: dict[str, float] = {}
_on_signal: list[Callable[[int], None]] = []


class Terminated(KeyboardInterrupt):
    """Raised in the main thread at the first SIGTERM (SIGINT raises ``KeyboardInterrupt``)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def descendants() -> list[psutil.Process]:
    """Every process this one started, directly or not, that is still running."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def running(p: psutil.Process) -> bool:
    """Whether ``p`` still runs. A process that has exited but was not reaped yet (a zombie: its
    parent is gone and the container's init may take seconds to reap it) does not."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to stop running; returns those still running. Reaps
    the ones that are this process's own children."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            try:
                if p.ppid() == os.getpid():
                    p.wait(0)
            except (psutil.Error, psutil.TimeoutExpired, ChildProcessError):
                pass
        alive = [p for p in procs if running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def stop_tree(timeout: float = 3.0, procs: list[psutil.Process] | None = None) -> None:
    """Stop ``procs`` (default: every descendant of this process) and any descendant started
    meanwhile: SIGTERM to all at once, SIGKILL to those still running after ``timeout`` s."""
    seen = {p.pid: p for p in (procs if procs is not None else [])}
    seen.update({p.pid: p for p in descendants()})
    if not seen:
        return
    for p in seen.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    alive = _wait_gone(list(seen.values()), max(timeout, 0.0))
    # children that the ones asked to stop started while stopping, then the ones that did not stop
    left = {p.pid: p for p in alive}
    left.update({p.pid: p for p in descendants() if running(p)})
    for p in left.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(list(left.values()), 2.0)


def hard_stop(code: int) -> None:
    """Kill every descendant and end this process now (no interpreter teardown, which can take
    seconds with torch and MLflow loaded on a busy machine). Output is flushed first."""
    for p in descendants():
        try:
            p.kill()
        except psutil.Error:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream cannot be flushed; exit anyway
            pass
    os._exit(code)


def _watchdog(code: int, at: float) -> None:
    time.sleep(max(at - time.monotonic(), 0.0))
    try:
        sys.stderr.write(f"error: still stopping {HARD_STOP_S:g} s after the signal; killed what was left\n")
    except Exception:  # noqa: BLE001
        pass
    hard_stop(code)


_lock = threading.Lock()
_handled = threading.Event()  # the main thread's handler ran once


def _arm(signum: int) -> None:
    """The first signal: remember it and start the watchdog (once, whoever sees it first)."""
    with _lock:
        if _first_signal:
            return
        _first_signal.update(signum=signum, at=time.monotonic())
    stop_requested.set()
    threading.Thread(
        target=_watchdog,
        args=(exit_code(signum), time.monotonic() + HARD_STOP_S),
        name="clipline-stop-watchdog",
        daemon=True,
    ).start()


def _watch_wakeups(fd: int) -> None:
    """Sees every SIGTERM/SIGINT as it arrives, whichever Python handler is installed then (a
    Prefect flow installs its own for SIGTERM, which passes the signal on to ours only once the
    flow has unwound, and an exception raised by a handler is lost when it lands in a
    garbage-collector callback): the first arms the watchdog."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for b in data:
            if b in (signal.SIGTERM, signal.SIGINT):
                _arm(b)


def _handler(signum: int, frame) -> None:
    _arm(signum)
    if _handled.is_set():  # a second signal for this handler: stop now
        hard_stop(exit_code(_first_signal["signum"]))
    _handled.set()
    for fn in list(_on_signal):
        fn(signum)
    if not _on_signal:  # a command doing work: unwind it like Ctrl-C
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)


def install() -> None:
    """Handle SIGTERM and SIGINT as the module docstring says (main thread only)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_wakeups, args=(r,), name="clipline-signal-watch", daemon=True).start()


def on_signal(fn: Callable[[int], None]) -> None:
    """Call ``fn(signum)`` at the first signal instead of raising in the main thread: for a
    long-running command that stops itself (it must end before the watchdog does)."""
    _on_signal.append(fn)


def received() -> int | None:
    """The first signal received, if any."""
    return _first_signal.get("signum")


def seconds_since_signal() -> float:
    return time.monotonic() - _first_signal["at"] if _first_signal else 0.0
