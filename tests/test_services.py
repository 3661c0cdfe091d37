"""The pipeline against real services: an `mlflow server` process and a `prefect server` process,
started here on free loopback ports. `clipline run` (a subprocess) shows up in both; `clipline
serve` serves the deployments, Prefect runs the scheduled refresh on its own, and `clipline run
--deployment` runs the pipeline through the served deployment."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.pipelinekit import (
    SMALL, base_env, clipline, deep_merge, mlflow_get, mlflow_post, prefect_call, servers, stop, write_toml,
)


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
        config = write_toml(work / "clipline.toml", deep_merge(SMALL, {
            "ingest": {"allow_hosts": [web.allow_host]},
            "evaluate": {"datasets": [str(heldout.data)]},
            "refresh": {"lock_wait_s": 300.0},
        }))
        env = base_env(MLFLOW_TRACKING_URI=mlflow_url, PREFECT_API_URL=prefect_api,
                       PREFECT_RUNNER_POLL_FREQUENCY="2")
        data = work / "data"
        proc = clipline(["--config", str(config), "--data-dir", str(data), "run", str(web.url_list)], env, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"work": work, "config": config, "data": data, "env": env, "proc": proc, "web": web,
               "mlflow": mlflow_url, "prefect": prefect_api}


def _flow_runs(api: str) -> list[tuple[str, object]]:
    """(flow name, flow run) for every flow run on the server, newest first."""
    async def read(c):
        flows = {f.id: f.name for f in await c.read_flows()}
        return [(flows[r.flow_id], r) for r in await c.read_flow_runs(limit=200)]

    return sorted(prefect_call(api, read), key=lambda fr: fr[1].created, reverse=True)


def _artifact(api: str, flow_run_id, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read(c):
        return await c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    arts = prefect_call(api, read)
    return arts[0].data if arts else None


@pytest.mark.slow
def test_clipline_run_appears_in_the_mlflow_server_and_the_prefect_server(first_run):
    url, api = first_run["mlflow"], first_run["prefect"]
    assert "model version" in first_run["proc"].stdout and "champion" in first_run["proc"].stdout

    # MLflow server: the train run, finished, with eval metrics and its checkpoint stored on the server
    exp = mlflow_get(url, "experiments/get-by-name", experiment_name="clipline")["experiment"]
    runs = mlflow_post(url, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                            "filter": "tags.stage = 'train'"})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "zeroshot/heldout/acc1" in metrics and "retrieval/val/image_to_text_R5" in metrics
    files = {f["path"] for f in mlflow_get(url, "artifacts/list", run_id=run["info"]["run_id"],
                                           path="checkpoint").get("files", [])}
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
            [sys.executable, "-m", "clipline.flows.cli", "--config", str(first_run["config"]), "--data-dir",
             str(first_run["data"]), "serve", "--interval", "15"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        proc = clipline(["--config", str(first_run["config"]), "--data-dir", str(first_run["data"]), "run",
                         "--deployment", "--timeout", "300", str(first_run["web"].url_list)], env, cwd=work)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Completed" in proc.stdout and "nothing new" in proc.stdout
        pipes = [fr for name, fr in _flow_runs(api) if name == "pipeline" and fr.deployment_id is not None]
        assert len(pipes) == 1 and pipes[0].state.is_completed()
    finally:
        stop(server, grace=20)
