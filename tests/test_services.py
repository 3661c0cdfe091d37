"""The pipeline against real services: an `mlflow server` process and a `prefect server` process,
started here on free loopback ports. `clipline run` (a subprocess) shows up in both; `clipline
serve` serves the deployments, Prefect runs the scheduled refresh on its own, `clipline run
--deployment` runs the pipeline through the served deployment, a run whose parameters would loosen
the worker's security is refused, and SIGTERM stops `serve` within 10 s, cancelling its run."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from tests.pipelinekit import (
    SMALL,
    base_env,
    clipline,
    deep_merge,
    mlflow_get,
    mlflow_post,
    prefect_call,
    servers,
    stop,
    write_toml,
)
from tests.sigkit import GRACE_S, HangingServer, hanging_url_list, kill_all, run_lock_holders, sigterm_and_wait


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    work = tmp_path_factory.mktemp("services")
    with servers(work) as up:
        yield work, up["mlflow"], up["prefect"]


@pytest.fixture(scope="module")
def first_run(services):
    """`clipline run` once over a toy-web list, in a subprocess pointed at both servers."""
    from clipline.components.config import DemoConfig
    from clipline.components.demo import serve_toy_web, write_heldout_set

    work, mlflow_url, prefect_api = services
    heldout = write_heldout_set(work / "eval", n_per_class=3)
    demo = DemoConfig(n_images=120, seed=3, fault_rate=0.03)
    with serve_toy_web(demo, work / "web") as web:
        config = write_toml(
            work / "clipline.toml",
            deep_merge(
                SMALL,
                {
                    "ingest": {"allow_hosts": [web.allow_host]},
                    # the split hashes each URL (with the server's random port): at 0.05, about 1 run in
                    # 200 of ~100 rows has no val rows, and the test reads the val retrieval metric
                    "curate": {"val_fraction": 0.2},
                    "evaluate": {"datasets": [str(heldout.data)]},
                    "refresh": {"lock_wait_s": 300.0},
                },
            ),
        )
        env = base_env(MLFLOW_TRACKING_URI=mlflow_url, PREFECT_API_URL=prefect_api, PREFECT_RUNNER_POLL_FREQUENCY="2")
        data = work / "data"
        proc = clipline(["--config", str(config), "--data-dir", str(data), "run", str(web.url_list)], env, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {
            "work": work,
            "config": config,
            "data": data,
            "env": env,
            "proc": proc,
            "web": web,
            "mlflow": mlflow_url,
            "prefect": prefect_api,
        }


def _flow_runs(api: str) -> list[tuple[str, object]]:
    """(flow name, flow run) for every flow run on the server, newest first."""

    async def read(c):
        flows = {f.id: f.name for f in await c.read_flows()}
        return [(flows[r.flow_id], r) for r in await c.read_flow_runs(limit=200)]

    return sorted(prefect_call(api, read), key=lambda fr: fr[1].created, reverse=True)


def _start_run(api: str, deployment: str, parameters: dict):
    """A flow run of ``deployment`` (FLOW/NAME) with ``parameters``, created through the Prefect API
    as any user of the server may."""

    async def create(c):
        dep = await c.read_deployment_by_name(deployment)
        return await c.create_flow_run_from_deployment(dep.id, parameters=parameters)

    return prefect_call(api, create)


def _wait_final(api: str, flow_run_id, timeout: float, log) -> object:
    async def read(c):
        return await c.read_flow_run(flow_run_id)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = prefect_call(api, read)
        if fr.state is not None and fr.state.is_final():
            return fr
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s:\n{log.read_text()[-3000:]}")


def _artifact(api: str, flow_run_id, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read(c):
        return await c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )

    arts = prefect_call(api, read)
    return arts[0].data if arts else None


@pytest.mark.slow
def test_clipline_run_appears_in_the_mlflow_server_and_the_prefect_server(first_run):
    url, api = first_run["mlflow"], first_run["prefect"]
    assert "model version" in first_run["proc"].stdout and "champion" in first_run["proc"].stdout

    # MLflow server: the train run, finished, with eval metrics and its checkpoint stored on the server
    exp = mlflow_get(url, "experiments/get-by-name", experiment_name="clipline")["experiment"]
    runs = mlflow_post(
        url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": "tags.stage = 'train'"}
    )["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "zeroshot/heldout/acc1" in metrics and "retrieval/val/image_to_text_R5" in metrics
    files = {
        f["path"]
        for f in mlflow_get(url, "artifacts/list", run_id=run["info"]["run_id"], path="checkpoint").get("files", [])
    }
    assert "checkpoint/open_clip_config.json" in files
    champion = mlflow_get(url, "registered-models/alias", name="clipline", alias="champion")["model_version"]
    assert champion["run_id"] == run["info"]["run_id"]

    # Prefect server: the pipeline flow run and its stage subflows, all Completed, with their artifacts
    runs_by_flow = {}
    for name, fr in _flow_runs(api):
        runs_by_flow.setdefault(name, fr)
    assert {"pipeline", "ingest", "curate", "train", "evaluate"} <= set(runs_by_flow)
    for name in ("pipeline", "ingest", "curate", "train", "evaluate"):
        assert runs_by_flow[name].state.is_completed(), (name, runs_by_flow[name].state)
    summary = _artifact(api, runs_by_flow["pipeline"].id, "pipeline-summary")
    assert summary and "champion" in summary
    assert _artifact(api, runs_by_flow["train"].id, "train-report")


@pytest.mark.slow
def test_served_deployments_run_on_schedule_and_on_demand(first_run):
    work, api, env = first_run["work"], first_run["prefect"], first_run["env"]
    log = work / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipline.flows.cli",
                "--config",
                str(first_run["config"]),
                "--data-dir",
                str(first_run["data"]),
                "serve",
                "--interval",
                "15",
                "--input-root",
                str(first_run["web"].url_list.parent),
            ],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Prefect schedules and runs the refresh by itself
        deadline, done = time.monotonic() + 240, None
        while time.monotonic() < deadline and done is None:
            assert server.poll() is None, log.read_text()[-3000:]
            for name, fr in _flow_runs(api):
                if name == "refresh" and fr.state.is_final():
                    done = fr
                    break
            time.sleep(2)
        assert done is not None, f"no refresh run finished within 240 s:\n{log.read_text()[-3000:]}"
        assert done.state.is_completed(), (done.state, log.read_text()[-3000:])
        assert done.auto_scheduled and done.deployment_id is not None
        summary = _artifact(api, done.id, "refresh-summary")
        assert summary and "nothing new" in summary  # inbox empty, snapshot already trained on

        async def deployment(c):
            return await c.read_deployment_by_name("refresh/refresh")

        dep = prefect_call(api, deployment)
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == 15

        # the pipeline deployment, on demand, through `clipline run --deployment`
        proc = clipline(
            [
                "--config",
                str(first_run["config"]),
                "--data-dir",
                str(first_run["data"]),
                "run",
                "--deployment",
                "--timeout",
                "300",
                str(first_run["web"].url_list),
            ],
            env,
            cwd=work,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Completed" in proc.stdout and "nothing new" in proc.stdout
        pipes = [fr for name, fr in _flow_runs(api) if name == "pipeline" and fr.deployment_id is not None]
        assert len(pipes) == 1 and pipes[0].state.is_completed()

        # a user of the Prefect server starts a run whose parameters would loosen the worker's
        # security: switch the SSRF guard off, exempt the cloud metadata service, move the data dir and
        # the config file, read a file outside the worker's input root. Refused, each one named.
        elsewhere = work / "elsewhere"
        bad = {
            "config_file": str(work / "attacker.toml"),
            "url_lists": ["/etc/hostname"],
            "overrides": {
                "data_dir": str(elsewhere),
                "ingest": {"ssrf_guard": False, "allow_hosts": ["169.254.169.254:80"]},
            },
        }
        fr = _wait_final(api, _start_run(api, "pipeline/pipeline", bad).id, 300, log)
        assert fr.state.is_failed(), fr.state
        msg = fr.state.message or ""
        assert "RunRefused: this served run was refused" in msg, msg
        for named in (
            "overrides.ingest.ssrf_guard = false",
            'overrides.ingest.allow_hosts = ["169.254.169.254:80"]',
            f'overrides.data_dir = "{elsewhere}"',
            f'config_file = "{work / "attacker.toml"}"',
            'url_lists[0] = "/etc/hostname"',
            "only the worker sets",
            "clipline serve --input-root",
        ):
            assert named in msg, (named, msg)
        assert not elsewhere.exists()  # refused before anything was written

        # through the command line: the refusal is the command's one-line reason
        proc = clipline(
            [
                "--config",
                str(first_run["config"]),
                "run",
                "--deployment",
                "--timeout",
                "300",
                "--allow-host",
                "10.0.0.1:80",
                str(first_run["web"].url_list),
            ],
            env,
            cwd=work,
        )
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: flow run ") and "ended Failed" in last, proc.stderr[-3000:]
        assert 'overrides.ingest.allow_hosts = ["10.0.0.1:80"]' in last and "only the worker sets" in last, last
    finally:
        stop(server, grace=20)


@pytest.mark.slow
def test_sigterm_stops_serve_within_10_s_and_its_run_is_cancelled_at_a_safe_point(services, tmp_path):
    """`clipline serve` with a run in progress (downloading from a server that never answers) gets
    SIGTERM, as from a service manager (to the main process only): within 10 s it and every process
    it started are gone, the run is Cancelled, and it released the data dir's run lock."""
    _, mlflow_url, api = services
    hang = HangingServer()
    # deployment names of its own, so that it and the other test's `serve` never take each other's runs
    config = write_toml(
        tmp_path / "clipline.toml",
        deep_merge(
            SMALL,
            {
                "ingest": hang.ingest_settings(),
                "refresh": {"pipeline_deployment": "pipeline-sigterm", "refresh_deployment": "refresh-sigterm"},
            },
        ),
    )
    data = tmp_path / "data"
    lists = tmp_path / "lists"
    lists.mkdir()
    urls = hanging_url_list(lists / "hang.csv", hang.port)
    env = base_env(MLFLOW_TRACKING_URI=mlflow_url, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipline.flows.cli",
                "--config",
                str(config),
                "--data-dir",
                str(data),
                "serve",
                "--cron",
                "0 0 1 1 *",
                "--input-root",
                str(lists),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no deployment served after 240 s:\n{log.read_text()[-3000:]}"
            try:
                run = _start_run(api, "pipeline/pipeline-sigterm", {"url_lists": [str(urls)]})
                break
            except Exception:  # noqa: BLE001 - not registered yet
                time.sleep(2)
        while not hang.connected.wait(1):  # the served run is downloading
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline + 300, f"the run never started:\n{log.read_text()[-3000:]}"
        took, tree, left = sigterm_and_wait(server, log)
        out = log.read_text()
        assert tree, "the run's process (and what it started) are the server's descendants"
        assert took <= GRACE_S, f"`clipline serve` took {took:.1f} s to exit after SIGTERM:\n{out[-3000:]}"
        assert server.returncode == 0, out[-3000:]
        assert not left, f"still running {GRACE_S:g} s after SIGTERM: {[p.cmdline() for p in left]}"

        async def read(c):
            return await c.read_flow_run(run.id)

        fr = prefect_call(api, read)
        assert fr.state.is_cancelled(), (fr.state, out[-3000:])
        assert run_lock_holders(data) == [], out[-3000:]  # the run unwound through its lock's release
    finally:
        kill_all(server, tree)
        hang.close()
