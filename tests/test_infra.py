"""infra/: every file parses with the parser of its kind (Kubernetes manifests with Kubernetes'
own schemas, strict), every entrypoint it names imports, and the setup keeps its promises: secrets
only from the environment, by the rules infra/env.example writes down and infra/start.py enforces;
ports on loopback unless configured; MLflow behind basic auth; one requirements file per image,
which this environment satisfies; GPU workers on the cluster; everything a manifest references
defined. tests/test_team_stack.py starts the services themselves."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKER_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "ACCESS_KEY")


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined; raises on an unknown instruction."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        buf += " " + line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, args = buf.strip().partition(" ")
        if word.upper() not in DOCKER_INSTRUCTIONS:
            raise ValueError(f"{path}: unknown Dockerfile instruction {word!r}")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def _parse(path: Path) -> object:
    """Parse one infra file with the parser its kind needs; unknown kinds fail the test."""
    name = path.name
    if name.endswith((".yaml", ".yml")):
        return _yaml_docs(path)
    if name == "Dockerfile" or name.endswith(".Dockerfile"):
        return _dockerfile_instructions(path)
    if name.endswith(".sh"):
        subprocess.run(["sh", "-n", str(path)], check=True)
        return True
    if name.endswith(".sql"):
        stmts = [s.strip() for s in re.sub(r"--[^\n]*", "", path.read_text()).split(";") if s.strip()]
        for s in stmts:
            assert re.fullmatch(r"CREATE DATABASE [a-z_][a-z0-9_]*", s), f"{path}: unexpected statement {s!r}"
        return stmts
    if name.endswith(".py"):
        return ast.parse(path.read_text(), str(path))
    if name == "requirements.txt":
        return _requirements(path)
    if name == ".dockerignore":
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if name.endswith(".example"):
        pairs = {}
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                k, sep, v = line.partition("=")
                assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", k), f"{path}: not KEY=VALUE: {line!r}"
                pairs[k] = v
        return pairs
    raise AssertionError(f"no parser for {path.relative_to(ROOT)}: add one to tests/test_infra.py")


def _requirements(path: Path) -> list:
    from packaging.requirements import Requirement

    reqs = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            r = Requirement(line)
            assert len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==", f"{path}: {line!r} is not pinned"
            reqs.append(r)
    return reqs


def _infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env")


def test_every_infra_file_parses():
    files = _infra_files()
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "compose.yaml",
        "prefect.yaml",
        "ray/cluster.yaml",
        "k8s/raycluster.yaml",
        "mlflow/Dockerfile",
        "mlflow/requirements.txt",
        "prefect/Dockerfile",
        "prefect/requirements.txt",
        "clipline/Dockerfile",
        "clipline/requirements.txt",
        "start.py",
        "postgres/init.sql",
        "env.example",
        ".dockerignore",
    }
    for p in files:
        _parse(p)


# ---- compose ----


def _compose() -> dict:
    (doc,) = _yaml_docs(INFRA / "compose.yaml")
    return doc


def _build(svc: dict) -> tuple[Path, Path]:
    """(context, Dockerfile) of a compose service's build."""
    b = svc["build"]
    ctx = INFRA / (b if isinstance(b, str) else b["context"])
    return ctx.resolve(), ctx.resolve() / ("Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile"))


def _copy_sources(dockerfile: Path) -> list[str]:
    out = []
    for instr, args in _dockerfile_instructions(dockerfile):
        if instr == "COPY":
            out += [s for s in shlex.split(args)[:-1] if not s.startswith("--")]
    return out


def _start_module():
    spec = importlib.util.spec_from_file_location("clipline_infra_start", INFRA / "start.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_compose_has_the_team_services_and_their_files_exist():
    c = _compose()
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(c["services"])
    for name, svc in c["services"].items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            ctx, dockerfile = _build(svc)
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for src in _copy_sources(dockerfile):
                assert (ctx / src).exists(), f"{name}: COPY source {src} missing in {ctx}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (INFRA / src).exists(), f"{name}: bind mount {src} missing"


def test_build_contexts_send_only_what_the_images_copy():
    """Each build context's .dockerignore denies everything, then lets in each COPY source: never
    .git, a virtual environment, data or infra/.env."""
    for name, svc in _compose()["services"].items():
        if "build" not in svc:
            continue
        ctx, dockerfile = _build(svc)
        patterns = _parse(ctx / ".dockerignore")
        assert patterns[0] == "*", f"{name}: {ctx}/.dockerignore must start by denying everything"
        allowed = {p[1:] for p in patterns if p.startswith("!")}
        for src in _copy_sources(dockerfile):
            assert src.rstrip("/") in allowed, f"{name}: COPY {src} is not let in by {ctx}/.dockerignore"
        assert not any(".env" in a or ".git" in a or ".venv" in a for a in allowed), (name, allowed)


def test_each_image_installs_its_one_requirements_file_and_this_environment_has_those_pins():
    """One requirements file per image is the single source of its pins: its Dockerfile installs it,
    and .ci/run installs it here, so the native start-up test runs what the image runs."""
    files = {
        "mlflow": INFRA / "mlflow" / "requirements.txt",
        "prefect-server": INFRA / "prefect" / "requirements.txt",
        "prefect-worker": INFRA / "clipline" / "requirements.txt",
    }
    services = _compose()["services"]
    ci = (ROOT / ".ci" / "run").read_text()
    for name, req in files.items():
        ctx, dockerfile = _build(services[name])
        runs = " ".join(args for instr, args in _dockerfile_instructions(dockerfile) if instr == "RUN")
        rel = req.relative_to(ctx).as_posix()
        copied = [s for s in _copy_sources(dockerfile) if s == rel]
        assert copied and re.search(r"pip install [^&]*-r \S*requirements\.txt", runs), (
            f"{dockerfile} does not install {rel}"
        )
        assert f"-r {req.relative_to(ROOT).as_posix()}" in ci, f".ci/run does not install {req.relative_to(ROOT)}"
        for r in _parse(req):
            pinned = next(iter(r.specifier)).version
            assert importlib.metadata.version(r.name) == pinned, (
                f"{r.name} here is not {req.relative_to(ROOT)}'s {pinned}"
            )
    prefect_pin = next(r for r in _parse(files["prefect-server"]) if r.name == "prefect")
    assert _yaml_docs(INFRA / "prefect.yaml")[0]["prefect-version"] == next(iter(prefect_pin.specifier)).version
    import ray

    ray_pin = next(r for r in _parse(files["prefect-worker"]) if r.name == "ray")
    assert "default" in ray_pin.extras and next(iter(ray_pin.specifier)).version == ray.__version__


def test_compose_ports_bind_to_loopback_unless_configured():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("${CLIPLINE_BIND:-127.0.0.1}:"), (name, port)


def test_compose_secrets_come_only_from_the_environment():
    c = _compose()
    text = "\n".join(ln for ln in (INFRA / "compose.yaml").read_text().splitlines() if not ln.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = _parse(INFRA / "env.example")
    assert required <= set(example), f"env.example lacks {sorted(required - set(example))}"
    assert all(not example[k] for k in example if any(w in k for w in SECRET_WORDS)), "env.example holds a secret"
    for name, svc in c["services"].items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), name
        for k, v in env.items():
            assert "postgresql" not in str(v), f"{name}.{k}: a database URL in compose cannot escape the password"
            if any(w in k for w in SECRET_WORDS):
                assert re.search(r"\$\{[A-Z_]+:\?", str(v)), f"{name}.{k} is not taken from the environment: {v!r}"


def test_the_secrets_contract_is_written_once_and_start_up_enforces_it():
    """Every secret start.py checks is documented in env.example, under the variable compose feeds
    it from, with the same rule; every secret compose requires is one start.py checks."""
    start = _start_module()
    env_text = (INFRA / "env.example").read_text()
    feeds = {}  # service variable -> the .env variable it comes from
    for svc in _compose()["services"].values():
        for k, v in svc.get("environment", {}).items():
            m = re.fullmatch(r"\$\{([A-Z_]+)(?::[-?][^}]*)?\}", str(v))
            if m:
                feeds[k] = m.group(1)
    for name, secret in start.SECRETS.items():
        source = feeds.get(name, name)
        assert f"# {source}: {secret.rule}" in env_text, f"env.example does not say {source}'s rule: {secret.rule!r}"
    for var in set(feeds.values()):
        if any(w in var for w in SECRET_WORDS):
            assert var in feeds.values() and any(feeds.get(n, n) == var for n in start.SECRETS), var


def _start(role: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """infra/start.py ROLE with ``env``; a stand-in for each service on PATH records that it was
    started (it must not be, when a secret is wrong)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for exe in ("mlflow", "prefect"):
        (bindir / exe).write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/{exe}.started"\n')
        (bindir / exe).chmod(0o755)
    full = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path), "CLIPLINE_START_WAIT_S": "1", **env}
    return subprocess.run([sys.executable, str(INFRA / "start.py"), role], env=full, capture_output=True, text=True)


GOOD = {
    "POSTGRES_USER": "clipline",
    "POSTGRES_PASSWORD": "p%w@d:/x y#1234",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
    "MLFLOW_TRACKING_USERNAME": "clipline-worker",
    "MLFLOW_TRACKING_PASSWORD": "worker-password-1",
    "PREFECT_SERVER_API_AUTH_STRING": "team:prefect-password",
    "AWS_ACCESS_KEY_ID": "clipline",
    "AWS_SECRET_ACCESS_KEY": "minio-password",
}


@pytest.mark.parametrize(
    "role, env, named",
    [
        (
            "mlflow",
            {},
            ["POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"],
        ),
        ("mlflow", {**GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"}, ["MLFLOW_AUTH_ADMIN_PASSWORD"]),
        ("mlflow", {**GOOD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "not-random"}, ["MLFLOW_FLASK_SERVER_SECRET_KEY"]),
        ("mlflow", {**GOOD, "POSTGRES_USER": "Team User"}, ["POSTGRES_USER"]),
        ("mlflow", {**GOOD, "MLFLOW_TRACKING_USERNAME": "admin"}, ["MLFLOW_TRACKING_PASSWORD"]),
        ("mlflow", {**GOOD, "AWS_SECRET_ACCESS_KEY": "short"}, ["AWS_SECRET_ACCESS_KEY"]),
        (
            "prefect-server",
            {**GOOD, "PREFECT_SERVER_API_AUTH_STRING": "only-a-password-here"},
            ["PREFECT_SERVER_API_AUTH_STRING"],
        ),
        (
            "prefect-server",
            {**GOOD, "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://x"},
            ["PREFECT_API_DATABASE_CONNECTION_URL"],
        ),
        (
            "worker",
            {"PREFECT_API_URL": "http://127.0.0.1:9/api", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
            ["PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD"],
        ),
    ],
)
def test_start_up_stops_on_a_broken_secret_naming_it_and_starts_nothing(tmp_path, role, env, named):
    r = _start(role, env, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"start.py {role}: ")]
    for name in named:
        assert any(name in ln for ln in lines), (name, r.stderr)
    assert GOOD["POSTGRES_PASSWORD"] not in r.stderr and GOOD["MLFLOW_TRACKING_PASSWORD"] not in r.stderr
    assert not list(tmp_path.glob("*.started"))


def test_start_up_reports_an_unreachable_database_by_name(tmp_path):
    r = _start("prefect-server", {**GOOD, "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "9"}, tmp_path)
    assert r.returncode == 2 and "database prefect on 127.0.0.1:9 not reachable" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.started"))


def test_database_urls_carry_any_password_and_the_auth_ini_reads_back_the_same_url(tmp_path):
    from sqlalchemy.engine import make_url

    start = _start_module()
    for pw in ["p%w@d:/x y#1234", "100%%safe?&=+", "ünïcødé-pässwörd"]:
        url = start.database_url({**GOOD, "POSTGRES_PASSWORD": pw, "POSTGRES_HOST": "db"}, "mlflow_auth")
        u = make_url(url)
        assert (u.password, u.username, u.host, u.port, u.database) == (pw, "clipline", "db", 5432, "mlflow_auth")
        ini = tmp_path / "a.ini"
        ini.write_text(f"[mlflow]\ndatabase_uri = {url.replace('%', '%%')}\n")
        cp = configparser.ConfigParser()  # as MLflow reads it (with interpolation)
        cp.read(ini)
        assert cp["mlflow"]["database_uri"] == url


def test_mlflow_accepts_the_host_names_clients_use():
    start = _start_module()
    hosts = start.allowed_hosts({"MLFLOW_ALLOWED_HOSTS": "mlflow.example.com, 10.0.0.5:*"}).split(",")
    assert {"localhost", "127.0.0.1:*", "mlflow", "mlflow:*", "mlflow.example.com", "10.0.0.5:*"} <= set(hosts)


# ---- Prefect deployments ----


def test_prefect_yaml_is_valid_and_its_entrypoints_load_as_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    doc = _yaml_docs(INFRA / "prefect.yaml")[0]
    model = PrefectYamlModel.model_validate(doc)
    deps = {d.name: d for d in model.deployments}
    assert set(deps) == {"pipeline", "refresh"}
    # module entrypoints and no pull steps: the worker imports the installed package, wherever it runs
    assert doc["pull"] == []
    for name, d in deps.items():
        assert ":" not in d.entrypoint and d.entrypoint.startswith("clipline."), d.entrypoint
        fl = load_flow_from_entrypoint(d.entrypoint)
        assert fl.name == name
        assert set(d.parameters) <= set(fl.parameters.properties), (name, d.parameters)
        assert d.work_pool.name == "clipline"
        if "overrides" in d.parameters:  # the config they pass is one clipline accepts
            from clipline.components.config import load_config

            load_config(None, d.parameters["overrides"])
    refresh = deps["refresh"]
    assert refresh.schedules and refresh.schedules[0].cron
    assert refresh.concurrency_limit.limit == 1


def test_image_entrypoints_exist():
    """The clipline image's build check and default command, and the worker's command, run here."""
    import json

    instrs = _dockerfile_instructions(INFRA / "clipline" / "Dockerfile")
    argv = json.loads(next(args for i, args in instrs if i == "CMD"))
    assert argv[0] == "clipline"
    r = subprocess.run([sys.executable, "-m", "clipline.flows.cli", *argv[1:]], capture_output=True, text=True)
    assert r.returncode == 0 and "ingest" in r.stdout
    for _, args in instrs:
        for mod in re.findall(r'python -c "import ([\w.]+)"', args):
            subprocess.run([sys.executable, "-c", f"import {mod}"], check=True)
    assert ("USER", "1000") in instrs, "the clipline image ends as root"
    services = _compose()["services"]
    worker = services["prefect-worker"]["command"]
    assert worker[:2] == ["python", "/opt/clipline/infra/start.py"] and worker[2] in _start_module().ROLES
    for name in ("mlflow", "prefect-server"):
        _, dockerfile = _build(services[name])
        entry = json.loads(next(a for i, a in _dockerfile_instructions(dockerfile) if i == "ENTRYPOINT"))
        assert entry[0] == "python" and entry[1].endswith("/start.py") and entry[2] == name
    assert services["prefect-worker"]["shm_size"]


# ---- Ray ----


def test_ray_up_config_validates_with_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _yaml_docs(INFRA / "ray" / "cluster.yaml")
    validate_config(prepare_config(cfg))
    assert any("--ray-client-server-port=10001" in c for c in cfg["head_start_ray_commands"])
    assert "-v /data:/data" in cfg["docker"]["run_options"]
    assert "-e CLIPLINE_TRAIN__USE_GPU=yes" in cfg["docker"]["run_options"]
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("worker" in n and t["max_workers"] > 0 for n, t in cfg["available_node_types"].items())
    for t in cfg["available_node_types"].values():  # AWS's current DLAMI, not a pinned 2020 image
        assert t["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/")
    assert not any("-t efs" in c for c in cfg["initialization_commands"]), "mount -t efs needs efs-utils"


def _kuberay() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in _yaml_docs(INFRA / "k8s" / "raycluster.yaml"):
        out.setdefault(d["kind"], []).append(d)
    return out


def test_kubernetes_manifests_validate_against_kubernetes_schemas_in_strict_mode():
    import kubernetes_validate

    docs = _kuberay()
    version = "1.37.0"
    for kind, items in docs.items():
        for d in items:
            if kind == "RayCluster":  # a custom resource: its pod templates are checked as Pods
                spec = d["spec"]
                for tpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
                    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": tpl["spec"]}
                    kubernetes_validate.validate(pod, version, strict=True)
            else:
                kubernetes_validate.validate(d, version, strict=True)


def test_kuberay_cluster_defines_what_it_references_and_uses_gpus():
    docs = _kuberay()
    (rc,) = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    import ray

    assert rc["spec"]["rayVersion"] == ray.__version__
    (pvc,) = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"].get("storageClassName")
    services = {s["metadata"]["name"] for s in docs.get("Service", [])}
    header = (INFRA / "k8s" / "raycluster.yaml").read_text().split("\napiVersion", 1)[0]
    created_secrets = dict(
        re.findall(r"kubectl create secret generic (\S+)((?:.|\n)*?)(?:\n#\s*\n|\n#   [a-z]|$)", header)
    )
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = rc["spec"]["workerGroupSpecs"]
    gpu = [
        g
        for g in groups
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu and gpu[0]["maxReplicas"] >= 1
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        claim = {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
        for c in pod["containers"]:
            assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
            env = {e["name"]: e for e in c["env"]}
            assert env["CLIPLINE_TRAIN__USE_GPU"]["value"] == "yes"
            host = re.match(r"https?://([^:/]+)", env["MLFLOW_TRACKING_URI"]["value"]).group(1)
            assert host in services, f"MLFLOW_TRACKING_URI names {host}, which no Service here defines"
            for e in c["env"]:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if any(w in e["name"] for w in SECRET_WORDS):
                    assert ref, e
                if ref:
                    assert ref["name"] in created_secrets, (
                        f"secret {ref['name']} is neither defined nor created in the header"
                    )
                    assert f"--from-literal={ref['key']}=" in created_secrets[ref["name"]], ref
