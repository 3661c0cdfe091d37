"""Test helpers for whole-pipeline tests: a tiny-scale config, URL-list slices of the toy web,
real `mlflow server` / `prefect server` processes on free loopback ports, and `clipline`
subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

#: the settings test_pipeline.py uses: a nano model, a few steps, brisk ingest deadlines
SMALL: dict[str, Any] = {
    "ingest": {"read_timeout": 3.0, "total_timeout": 5.0, "processes": 1},
    "curate": {"min_image_side": 64},
    "train": {"model": "clipline-nano", "steps": 8, "batch_size": 16, "warmup_steps": 1, "system_metrics": False},
}


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def small_overrides(data_dir: Path, **extra: Any) -> dict[str, Any]:
    return deep_merge({"data_dir": data_dir, **SMALL}, extra)


def write_toml(path: Path, sections: dict[str, Any]) -> Path:
    """A clipline.toml from nested dicts (scalars, lists and paths only)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, fields in sections.items():
        if not isinstance(fields, dict):
            lines.insert(0, f"{section} = {val(fields)}")
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def slice_url_list(url_list: Path, out: Path, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of a toy-web URL list, written to ``out``; returns their URLs."""
    t = pq.read_table(url_list).slice(start, stop - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out)
    return t.column("url").to_pylist()


# ------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """moto's S3-compatible server in a process of its own on a free loopback port (``env`` added to
    its environment); yields its endpoint URL and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    else:  # the leader is gone; its children may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CLIPLINE_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        }
    )
    env.update(extra)
    return env


def _start_mlflow(work: Path) -> tuple[subprocess.Popen, str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = work / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{work / 'mlflow.db'}",
                "--artifacts-destination",
                str(work / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=work,
            env=base_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}", log


def _start_prefect(work: Path) -> tuple[subprocess.Popen, str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = work / "prefect-server.log"
    env = base_env(
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{work / 'prefect.db'}",
        PREFECT_UI_ENABLED="false",
        # schedule runs of new deployments promptly
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}/api", log


@contextmanager
def servers(work: Path, mlflow: bool = True, prefect: bool = True) -> Iterator[dict[str, str]]:
    """``mlflow server`` (SQLite + a local artifact store) and ``prefect server start`` (its own
    home and SQLite database), started together on free loopback ports and stopped with all their
    children at the end; yields {"mlflow": URL, "prefect": API URL}."""
    started: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        if mlflow:
            started["mlflow"] = _start_mlflow(work / "mlflow")
        if prefect:
            started["prefect"] = _start_prefect(work / "prefect")
        health = {"mlflow": "/health", "prefect": "/health"}
        for name, (proc, url, log) in started.items():
            wait_http(url + health[name], proc, 180, log)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            stop(proc)


def clipline(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600, **popen: Any
) -> subprocess.CompletedProcess:
    """Run the clipline CLI from this checkout; returns the completed process (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "clipline.flows.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def prefect_call(api: str, fn, auth_string: str | None = None):
    """Run ``await fn(client)`` with a Prefect client on ``api`` (not the session's test harness),
    logging in with ``auth_string`` (user:password) where the server asks for one."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api=api, auth_string=auth_string) as c:
            return await fn(c)

    return asyncio.run(go())


def mlflow_get(url: str, endpoint: str, **params: Any) -> dict:
    """GET an MLflow REST endpoint (``/api/2.0/mlflow/...``) and return its JSON."""
    import urllib.parse

    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{q}" if q else ""), timeout=30) as r:
        return json.loads(r.read())


def mlflow_post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())
