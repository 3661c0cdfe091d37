#!/usr/bin/env python3
"""Start-up of clipline's team services (infra/compose.yaml, one role per image):

    python start.py mlflow           # MLflow tracking server, basic auth, PostgreSQL store, S3 artifacts
    python start.py prefect-server   # Prefect server on PostgreSQL
    python start.py worker           # Prefect worker (process pool) in the clipline image

Each role checks the secrets contract first (``SECRETS`` below; infra/env.example says the same
for people) and stops with one line per broken rule, naming the variable, before anything starts.
Then it prepares what a first start needs and replaces itself with the service (``os.execvp``):

- mlflow: waits for its databases; escapes the database password where it enters a URL (URL
  quoting, and ``%%`` in the auth app's ini file, which configparser reads); writes that file
  owner-only at start, so no secret is stored in the image; creates the S3 buckets named in
  MLFLOW_ARTIFACTS_DESTINATION and CLIPLINE_BUCKETS when missing; creates the user that clients
  such as the Prefect worker log in as (MLFLOW_TRACKING_USERNAME / _PASSWORD; MLflow creates
  the admin), or resets its password to the configured one; passes the host names clients use
  (MLFLOW_ALLOWED_HOSTS) to MLflow's Host-header check beside loopback and the service name.
- prefect-server: hands Prefect the database as separate settings (host, user, password, ...),
  so no password is ever parsed out of a URL; waits for the database.
- worker: waits for the Prefect API; starts a worker for pool CLIPLINE_WORK_POOL (default
  ``clipline``), which creates the pool on first start.

Only the standard library at import time; each role imports what its image installs. Tests run
this same file natively (tests/test_team_stack.py), against the same pinned requirements.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

ENV_FILE_HINT = "set it in infra/.env (infra/env.example says the rules)"
DB_WAIT_S = float(os.environ.get("CLIPLINE_START_WAIT_S", "120"))


class StartError(SystemExit):
    """One line per problem, then exit status 2 (compose shows it in `docker compose logs`)."""

    def __init__(self, role: str, problems: list[str]):
        super().__init__(2)
        self.lines = [f"start.py {role}: {p}" for p in problems]


@dataclass(frozen=True)
class Secret:
    name: str
    rule: str  # what people read, in env.example and in the error
    check: Callable[[str], bool]


def _min_len(n: int) -> Callable[[str], bool]:
    return lambda v: len(v) >= n


def _auth_string(v: str) -> bool:
    user, sep, pw = v.partition(":")
    return bool(sep and user and len(pw) >= 12)


#: the secrets contract: every secret a service reads, and its rule. infra/env.example documents
#: each under the variable compose feeds it from (AWS_* from MINIO_ROOT_*), with the same rule
#: (tests/test_infra.py checks that they agree).
SECRETS = {
    s.name: s
    for s in (
        Secret(
            "POSTGRES_USER",
            "a lower-case identifier: a letter or _, then letters, digits or _ (at most 63)",
            lambda v: re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v) is not None,
        ),
        Secret(
            "POSTGRES_PASSWORD", "at least 12 characters; any characters (escaped where they enter URLs)", _min_len(12)
        ),
        Secret("MLFLOW_AUTH_ADMIN_PASSWORD", "at least 12 characters (MLflow's rule)", _min_len(12)),
        Secret(
            "MLFLOW_FLASK_SERVER_SECRET_KEY", "at least 32 random characters (signs MLflow's CSRF tokens)", _min_len(32)
        ),
        Secret(
            "MLFLOW_TRACKING_USERNAME",
            "the user clients log in to MLflow as: letters, digits, . _ @ or -",
            lambda v: re.fullmatch(r"[A-Za-z0-9._@-]+", v) is not None,
        ),
        Secret(
            "MLFLOW_TRACKING_PASSWORD",
            "at least 12 characters (MLflow's rule); equal to MLFLOW_AUTH_ADMIN_PASSWORD when the user is the admin",
            _min_len(12),
        ),
        Secret(
            "PREFECT_SERVER_API_AUTH_STRING",
            "user:password, the password at least 12 characters; the worker's PREFECT_API_AUTH_STRING is the same",
            _auth_string,
        ),
        Secret("AWS_ACCESS_KEY_ID", "at least 3 characters (MinIO's rule)", _min_len(3)),
        Secret("AWS_SECRET_ACCESS_KEY", "at least 8 characters (MinIO's rule)", _min_len(8)),
    )
}


def check_secrets(role: str, env: dict[str, str], names: list[str], extra: list[str] | None = None) -> None:
    problems = []
    for name in names:
        s = SECRETS[name]
        value = env.get(name, "")
        if not value:
            problems.append(f"{name} is not set: {ENV_FILE_HINT}; rule: {s.rule}")
        elif not s.check(value):
            problems.append(f"{name} breaks its rule: {s.rule}; {ENV_FILE_HINT}")
    problems += extra or []
    if problems:
        raise StartError(role, problems)


def log(role: str, msg: str) -> None:
    print(f"start.py {role}: {msg}", file=sys.stderr, flush=True)


def wait_for(role: str, what: str, attempt: Callable[[], object], timeout_s: float = DB_WAIT_S) -> object:
    """``attempt()`` until it returns without raising, for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attempt()
        except Exception as e:  # noqa: BLE001 - any failure to reach it is retried, then reported
            if time.monotonic() > deadline:
                raise StartError(role, [f"{what} not reachable after {timeout_s:.0f} s: {e}"]) from None
            time.sleep(1.0)


def _db(env: dict[str, str]) -> tuple[str, str, str, str]:
    return (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env.get("POSTGRES_HOST", "postgres"),
        env.get("POSTGRES_PORT", "5432"),
    )


def database_url(env: dict[str, str], db: str, driver: str = "postgresql+psycopg") -> str:
    """A SQLAlchemy URL with user and password URL-quoted (``%``, ``@``, ``:`` and ``/`` safe)."""
    user, pw, host, port = _db(env)
    q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
    return f"{driver}://{q(user)}:{q(pw)}@{host}:{port}/{db}"


# --------------------------------------------------------------------------------------- mlflow
DEFAULT_ALLOWED_HOSTS = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "mlflow", "mlflow:*"]


def allowed_hosts(env: dict[str, str]) -> str:
    """Loopback and the compose service name, plus MLFLOW_ALLOWED_HOSTS (comma-separated names or
    addresses clients use, e.g. ``mlflow.example.com,10.0.0.5:*``)."""
    extra = [h.strip() for h in env.get("MLFLOW_ALLOWED_HOSTS", "").split(",") if h.strip()]
    return ",".join(dict.fromkeys(DEFAULT_ALLOWED_HOSTS + extra))


def _buckets(env: dict[str, str]) -> list[str]:
    out = []
    dest = env.get("MLFLOW_ARTIFACTS_DESTINATION", "s3://mlflow")
    if dest.startswith("s3://"):
        out.append(dest[len("s3://") :].split("/", 1)[0])
    out += [b.strip() for b in re.split(r"[,\s]+", env.get("CLIPLINE_BUCKETS", "")) if b.strip()]
    return list(dict.fromkeys(out))


def ensure_buckets(role: str, env: dict[str, str], buckets: list[str]) -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=env.get("MLFLOW_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    existing = set(wait_for(role, "the S3 endpoint", lambda: [b["Name"] for b in s3.list_buckets()["Buckets"]]))
    for b in buckets:
        if b in existing:
            continue
        try:
            s3.create_bucket(Bucket=b)
            log(role, f"created bucket {b}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StartError(role, [f"cannot create bucket {b}: {e}"]) from None


def ensure_client_user(role: str, auth_db_url: str, env: dict[str, str]) -> None:
    """The user clients log in as exists, with the configured password (a changed password in the
    environment is applied: the environment is the source of truth for this service account)."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    user, pw = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    store = SqlAlchemyStore()
    store.init_db(auth_db_url)
    if not store.has_user(user, use_primary=True):
        store.create_user(user, pw, is_admin=False)
        log(role, f"created MLflow user {user}")
    elif not store.authenticate_user(user, pw, use_primary=True):
        store.update_user(user, password=pw)
        log(role, f"set the password of MLflow user {user} to MLFLOW_TRACKING_PASSWORD")


def mlflow_role(env: dict[str, str]) -> list[str]:
    role = "mlflow"
    names = [
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ]
    buckets = _buckets(env)
    if buckets:
        names += ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    admin = env.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    extra = []
    if env.get("MLFLOW_TRACKING_USERNAME") == admin and env.get("MLFLOW_TRACKING_PASSWORD") != env.get(
        "MLFLOW_AUTH_ADMIN_PASSWORD"
    ):
        extra.append(
            f"MLFLOW_TRACKING_USERNAME is the admin ({admin}) but MLFLOW_TRACKING_PASSWORD differs from "
            "MLFLOW_AUTH_ADMIN_PASSWORD: make them equal, or name another user (created on start)"
        )
    check_secrets(role, env, names, extra)

    import psycopg

    user, pw, host, port = _db(env)
    for db in ("mlflow", "mlflow_auth"):
        wait_for(
            role,
            f"database {db} on {host}:{port}",
            lambda db=db: psycopg.connect(host=host, port=port, user=user, password=pw, dbname=db).close(),
        )
    auth_url = database_url(env, "mlflow_auth")
    if buckets:
        ensure_buckets(role, env, buckets)
    if env["MLFLOW_TRACKING_USERNAME"] != admin:
        ensure_client_user(role, auth_url, env)

    home = env.get("HOME", "/tmp")
    ini = os.path.join(home, "basic_auth.ini")
    old = os.umask(0o077)
    try:
        with open(ini, "w") as f:  # configparser reads '%' as interpolation: write it as '%%'
            f.write(
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = {auth_url.replace('%', '%%')}\n"
                f"admin_username = {admin}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
        os.chmod(ini, 0o600)
    finally:
        os.umask(old)
    env["MLFLOW_AUTH_CONFIG_PATH"] = ini
    argv = [
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        database_url(env, "mlflow"),
        "--serve-artifacts",
        "--artifacts-destination",
        env.get("MLFLOW_ARTIFACTS_DESTINATION", "s3://mlflow"),
        "--host",
        env.get("MLFLOW_HOST", "0.0.0.0"),
        "--port",
        env.get("MLFLOW_PORT", "5000"),
        "--allowed-hosts",
        allowed_hosts(env),
    ]
    if env.get("MLFLOW_WORKERS"):
        argv += ["--workers", env["MLFLOW_WORKERS"]]
    return argv


# ------------------------------------------------------------------------------- prefect server
def prefect_server_role(env: dict[str, str]) -> list[str]:
    role = "prefect-server"
    extra = []
    for url_var in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        if env.get(url_var):
            extra.append(f"{url_var} is set: unset it; the database comes from POSTGRES_* (no password in a URL)")
    check_secrets(role, env, ["POSTGRES_USER", "POSTGRES_PASSWORD", "PREFECT_SERVER_API_AUTH_STRING"], extra)
    user, pw, host, port = _db(env)
    name = env.get("PREFECT_DATABASE_NAME", "prefect")
    env.update(
        PREFECT_SERVER_DATABASE_DRIVER="postgresql+asyncpg",
        PREFECT_SERVER_DATABASE_HOST=host,
        PREFECT_SERVER_DATABASE_PORT=port,
        PREFECT_SERVER_DATABASE_USER=user,
        PREFECT_SERVER_DATABASE_PASSWORD=pw,
        PREFECT_SERVER_DATABASE_NAME=name,
    )
    import asyncio

    import asyncpg

    async def connect() -> None:
        c = await asyncpg.connect(host=host, port=int(port), user=user, password=pw, database=name)
        await c.close()

    wait_for(role, f"database {name} on {host}:{port}", lambda: asyncio.run(connect()))
    return [
        "prefect",
        "server",
        "start",
        "--host",
        env.get("PREFECT_HOST", "0.0.0.0"),
        "--port",
        env.get("PREFECT_PORT", "4200"),
    ]


# ------------------------------------------------------------------------------------- worker
def worker_role(env: dict[str, str]) -> list[str]:
    role = "worker"
    extra = []
    api = env.get("PREFECT_API_URL", "")
    if not api:
        extra.append("PREFECT_API_URL is not set: the Prefect server's API, e.g. http://prefect-server:4200/api")
    auth = env.get("PREFECT_API_AUTH_STRING", "")
    if not _auth_string(auth):
        extra.append(f"PREFECT_API_AUTH_STRING breaks its rule: {SECRETS['PREFECT_SERVER_API_AUTH_STRING'].rule}")
    names = []
    if env.get("MLFLOW_TRACKING_URI", "").startswith("http"):
        names += ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    check_secrets(role, env, names, extra)

    def health() -> None:
        with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5) as r:
            r.read()

    wait_for(role, f"the Prefect API at {api}", health)
    return ["prefect", "worker", "start", "--pool", env.get("CLIPLINE_WORK_POOL", "clipline"), "--type", "process"]


ROLES = {"mlflow": mlflow_role, "prefect-server": prefect_server_role, "worker": worker_role}


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: start.py {{{'|'.join(ROLES)}}}", file=sys.stderr)
        raise SystemExit(2)
    env = dict(os.environ)
    try:
        cmd = ROLES[argv[0]](env)
    except StartError as e:
        print("\n".join(e.lines), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    log(argv[0], "starting " + " ".join(cmd[:3]))
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
