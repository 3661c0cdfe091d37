"""Test helpers for stopping `clipline` processes: start one in its own session, send SIGTERM as
a service manager does (to the main process only), and see whether it and every process it
started are gone within the 10 s grace; a server whose downloads never finish, to catch a run in
the middle of its work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

GRACE_S = 10.0  # what systemd and docker give between SIGTERM and SIGKILL


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "clipline.flows.cli", *args],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def sigterm_and_wait(proc: subprocess.Popen, log: Path) -> tuple[float, list[psutil.Process], list[psutil.Process]]:
    """SIGTERM to the leader only; returns (seconds until it exited, its descendants before the
    signal, those still running at the deadline)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE_S + 30)  # generous: a hang must not hang the suite
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - t0 if proc.returncode is not None else float("inf")
    print(f"{' '.join(proc.args[3:])}: exited {took:.1f} s after SIGTERM, {len(tree)} descendants")
    while time.monotonic() < t0 + GRACE_S and any(_running(p) for p in tree):
        time.sleep(0.1)
    left = [p for p in tree if _running(p)]
    return took, tree, left


def kill_all(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    for p in [*tree, psutil.Process(proc.pid) if proc.poll() is None else None]:
        if p is not None and _running(p):
            try:
                p.kill()
            except psutil.Error:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


class HangingServer:
    """Accepts HTTP connections and never answers: a download that is in progress for as long as
    the test wants."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()

    def ingest_settings(self) -> dict:
        """[ingest] settings under which a download from this server hangs until stopped."""
        return {"allow_hosts": [f"127.0.0.1:{self.port}"], "read_timeout": 300.0, "total_timeout": 600.0, "retries": 0}


def hanging_url_list(path: Path, port: int, n: int = 4) -> Path:
    path.write_text(
        "url,caption\n" + "".join(f"http://127.0.0.1:{port}/img{i}.jpg,a red circle number {i}\n" for i in range(n))
    )
    return path


def run_lock_holders(data_dir: Path) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(data_dir / "catalog.duckdb"), read_only=True) as con:
        return con.execute("SELECT name, holder FROM locks").fetchall()
