"""infra/: every file parses with the parser of its kind, every entrypoint it names imports, and
the setup keeps its promises (secrets only from the environment, ports on loopback unless
configured, MLflow behind basic auth, GPU workers on the cluster)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

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
    if name.endswith(".example"):
        pairs = {}
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                k, sep, v = line.partition("=")
                assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", k), f"{path}: not KEY=VALUE: {line!r}"
                pairs[k] = v
        return pairs
    raise AssertionError(f"no parser for {path.relative_to(ROOT)}: add one to tests/test_infra.py")


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
        "mlflow/entrypoint.sh",
        "clipline.Dockerfile",
        "postgres/init.sql",
        "env.example",
    }
    for p in files:
        _parse(p)


# ---- compose ----


def _compose() -> dict:
    (doc,) = _yaml_docs(INFRA / "compose.yaml")
    return doc


def test_compose_has_the_team_services_and_their_files_exist():
    c = _compose()
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(c["services"])
    for name, svc in c["services"].items():
        assert "image" in svc or "build" in svc, name
        b = svc.get("build")
        if b is not None:
            ctx = INFRA / (b if isinstance(b, str) else b["context"])
            dockerfile = ctx / ("Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile"))
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for instr, args in _dockerfile_instructions(dockerfile):
                if instr == "COPY":
                    for src in shlex.split(args)[:-1]:
                        if not src.startswith("--"):
                            assert (ctx / src).exists(), f"{name}: COPY source {src} missing in {ctx}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (INFRA / src).exists(), f"{name}: bind mount {src} missing"


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
            if any(w in k for w in SECRET_WORDS) or "postgresql" in str(v):
                assert re.search(r"\$\{[A-Z_]+:\?", str(v)), f"{name}.{k} is not taken from the environment: {v!r}"


def test_mlflow_runs_behind_basic_auth_and_its_entrypoint_refuses_missing_secrets(tmp_path):
    script = INFRA / "mlflow" / "entrypoint.sh"
    assert "--app-name basic-auth" in script.read_text()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "POSTGRES_USER" in r.stderr

    # with every secret set it writes the auth config (owner-only) and execs `mlflow server`;
    # a stand-in `mlflow` on PATH records what it was started with
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mlflow"
    fake.write_text('#!/bin/sh\necho "$@" > "$HOME/args"\ncp "$MLFLOW_AUTH_CONFIG_PATH" "$HOME/seen.ini"\n')
    fake.chmod(0o755)
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        POSTGRES_USER="u",
        POSTGRES_PASSWORD="pw-from-env",
        MLFLOW_AUTH_ADMIN_PASSWORD="admin-pw",
    )
    subprocess.run(["sh", str(script)], env=env, check=True)
    args = (tmp_path / "args").read_text()
    assert "--app-name basic-auth" in args and "postgresql://u:pw-from-env@postgres:5432/mlflow" in args
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "seen.ini")
    assert ini["mlflow"]["database_uri"].endswith("/mlflow_auth") and "admin_password" not in ini["mlflow"]
    assert stat.S_IMODE((tmp_path / "basic_auth.ini").stat().st_mode) == 0o600


# ---- Prefect deployments ----


def test_prefect_yaml_is_valid_and_its_entrypoints_load_as_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    model = PrefectYamlModel.model_validate(_yaml_docs(INFRA / "prefect.yaml")[0])
    deps = {d.name: d for d in model.deployments}
    assert set(deps) == {"pipeline", "refresh"}
    worker_cmd = _compose()["services"]["prefect-worker"]["command"]
    pool = worker_cmd[worker_cmd.index("--pool") + 1]
    cwd = os.getcwd()
    os.chdir(ROOT)  # entrypoints are relative to the project root, as on the worker
    try:
        for name, d in deps.items():
            fl = load_flow_from_entrypoint(d.entrypoint)
            assert fl.name == name
            assert set(d.parameters) <= set(fl.parameters.properties), (name, d.parameters)
            assert d.work_pool.name == pool
            if "overrides" in d.parameters:  # the config they pass is one clipline accepts
                from clipline.components.config import load_config

                load_config(None, d.parameters["overrides"])
    finally:
        os.chdir(cwd)
    refresh = deps["refresh"]
    assert refresh.schedules and refresh.schedules[0].cron
    assert refresh.concurrency_limit.limit == 1


def test_image_entrypoints_exist():
    """The clipline image's build check and default command, and the worker's command, run here."""
    instrs = _dockerfile_instructions(INFRA / "clipline.Dockerfile")
    cmd = next(args for i, args in instrs if i == "CMD")
    import json

    argv = json.loads(cmd)
    assert argv[0] == "clipline"
    r = subprocess.run([sys.executable, "-m", "clipline.flows.cli", *argv[1:]], capture_output=True, text=True)
    assert r.returncode == 0 and "ingest" in r.stdout
    for _, args in instrs:
        for mod in re.findall(r'python -c "import ([\w.]+)"', args):
            subprocess.run([sys.executable, "-c", f"import {mod}"], check=True)


# ---- Ray ----


def test_ray_up_config_validates_with_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _yaml_docs(INFRA / "ray" / "cluster.yaml")
    validate_config(prepare_config(cfg))
    assert any("--ray-client-server-port=10001" in c for c in cfg["head_start_ray_commands"])
    assert "-v /data:/data" in cfg["docker"]["run_options"]
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("worker" in n and t["max_workers"] > 0 for n, t in cfg["available_node_types"].items())


def test_kuberay_cluster_has_gpu_workers_and_shared_storage():
    docs = {d["kind"]: d for d in _yaml_docs(INFRA / "k8s" / "raycluster.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    import ray

    assert rc["spec"]["rayVersion"] == ray.__version__
    groups = rc["spec"]["workerGroupSpecs"]
    gpu = [
        g
        for g in groups
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu and gpu[0]["maxReplicas"] >= 1
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        claim = {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
        assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
        for c in pod["containers"]:
            assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
            for e in c["env"]:
                if any(w in e["name"] for w in SECRET_WORDS):
                    assert "secretKeyRef" in e["valueFrom"], e
