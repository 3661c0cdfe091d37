"""Deployments: `clipline serve` (the `pipeline` deployment on demand, `refresh` on a schedule,
stopping within 10 s of SIGTERM) and `clipline run --deployment` (trigger the served pipeline and
wait for it).

What a served run may change, and which files it may name, is decided by the serving process's
configuration (``clipline.components.orchestration.params``); this module builds the deployments
and runs Prefect's runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipline.components.config import Config
from clipline.flows import render

#: after SIGTERM/SIGINT, how long `serve` waits for the processes of the runs in progress to end
#: (its runner has told each run to cancel and sent it SIGTERM) before it kills them; and how long
#: it lets an idle runner finish. Both within shutdown.HARD_STOP_S, with time left to record states.
SERVE_STOP_S = 5.0
IDLE_STOP_S = 2.5
#: how long after the signal `serve` waits for its schedules to be paused, at most
PAUSE_BY_S = 7.5


class DeploymentError(RuntimeError):
    """Deployments cannot be served or run (no Prefect server, no such deployment, a bad schedule)."""


def prefect_server(what: str) -> str:
    """PREFECT_API_URL: deployments live on a Prefect server, not on the temporary in-process one
    that in-process runs use."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise DeploymentError(
            f"{what} needs a Prefect server: start one (`prefect server start`, or infra/) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


# ---- clipline run --deployment ----
def absolute_location(loc: str) -> str:
    """A local path as an absolute one (a served run may start elsewhere); URLs unchanged."""
    return loc if "://" in loc else str(Path(loc).expanduser().resolve())


def pipeline_parameters(
    config_file: Path | None,
    data_dir: Path | None,
    state_dir: Path | None,
    allow_hosts: list[str],
    url_lists: list[str],
    eval_sets: list[str] | None,
    decontaminate: str | None,
    from_model: str | None,
    force: bool,
) -> dict[str, Any]:
    """The served pipeline's parameters for a run asked for here. The served run starts from the
    worker's configuration: send only what was asked for (the worker refuses what only it may set,
    naming it), and a --from-model version or alias as it is, for the worker's registry."""
    overrides: dict[str, Any] = {"ingest": {"allow_hosts": list(allow_hosts)}} if allow_hosts else {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir.expanduser().resolve())
    if state_dir is not None:
        overrides["state_dir"] = str(state_dir.expanduser().resolve())
    return {
        "config_file": str(config_file.resolve()) if config_file else None,
        "overrides": overrides,
        "url_lists": [absolute_location(u) for u in url_lists],
        "eval_sets": eval_sets,
        "decontaminate": decontaminate,
        "force": force,
        "from_model": (
            absolute_location(from_model) if from_model and Path(from_model).expanduser().exists() else from_model
        ),
    }


@dataclass
class Triggered:
    deployment: str
    flow_run: Any  # prefect FlowRun
    summary: str | None  # the markdown of its summary artifact
    failure: str | None  # why it did not complete (None: it completed)


def summary_artifact(flow_run_id: Any, key: str) -> str | None:
    """The markdown of artifact ``key`` published by a flow run (via the Prefect API)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read() -> list:
        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    arts = asyncio.run(read())
    return arts[0].data if arts else None


def trigger(deployment: str, parameters: dict[str, Any], timeout: float | None, summary_key: str) -> Triggered:
    """Run a served deployment through the Prefect API and wait for it (``timeout`` s; None: until
    it ends)."""
    prefect_server("--deployment")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        fr = run_deployment(deployment, parameters=parameters, timeout=timeout, poll_interval=2, as_subflow=False)
    except ObjectNotFound:
        raise DeploymentError(
            f"no deployment {deployment!r} on the Prefect API: start `clipline serve` first "
            "(with the same PREFECT_API_URL)"
        ) from None
    state = fr.state
    failure = None
    if state is not None and not state.is_final():
        failure = f"flow run {fr.name} is still {state.name} after {timeout} s; follow it in the Prefect UI"
    elif state is None or not state.is_completed():
        failure = (
            f"flow run {fr.name} ended {state.name if state else 'in an unknown state'}: "
            f"{(state.message if state else '') or 'see its logs in the Prefect UI'}"
        )
    summary = summary_artifact(fr.id, summary_key) if failure is None else None
    return Triggered(deployment, fr, summary, failure)


# ---- clipline serve ----
def serve(config_file: Path | None, cfg: Config) -> None:
    """Serve the `pipeline` (on demand) and `refresh` (on schedule) deployments until SIGTERM/SIGINT.
    Served runs are bounded by this process's configuration (``ServePolicy``)."""
    api = prefect_server("clipline serve")
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.deployments.runner import EntrypointType

    from clipline.components.orchestration.params import ServePolicy, deployment_parameters
    from clipline.flows.pipeline import pipeline_flow
    from clipline.flows.refresh import refresh_flow

    rc = cfg.refresh
    try:
        if rc.interval_s:
            from datetime import timedelta

            schedule = IntervalSchedule(interval=timedelta(seconds=rc.interval_s))
            when = f"every {rc.interval_s:g} s"
        else:
            schedule = CronSchedule(cron=rc.cron, timezone=rc.timezone)
            when = f"cron '{rc.cron}' ({rc.timezone})"
    except ValueError as e:  # pydantic's ValidationError: keep its messages, one line
        why = "; ".join(err["msg"] for err in e.errors()) if hasattr(e, "errors") else str(e)
        raise DeploymentError(
            f"refresh schedule: {why} (cron {rc.cron!r}, timezone {rc.timezone!r}); set refresh.cron to a "
            "5-field cron expression and refresh.timezone to an IANA name, or use refresh.interval_s"
        ) from None
    # the bounds of every served run: this process's configuration, handed to the runs through the
    # environment (which a run's parameters cannot reach; served runs ignore job variables)
    policy = ServePolicy.capture(config_file, cfg)
    os.environ.update(policy.to_env())
    params = deployment_parameters(config_file, cfg)
    pipe = pipeline_flow.to_deployment(
        name=rc.pipeline_deployment,
        parameters=params,
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["clipline"],
        description="clipline pipeline, run on demand: `clipline run URL_LIST... --deployment`",
    )
    ref = refresh_flow.to_deployment(
        name=rc.refresh_deployment,
        parameters=params,
        schedule=schedule,
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["clipline"],
        description=f"clipline refresh of the inbox {rc.inbox}, {when}",
    )
    roots = ", ".join(policy.input_roots) or "none (runs name no files)"
    render.say(
        f"serving pipeline/{rc.pipeline_deployment} (on demand) and refresh/{rc.refresh_deployment} "
        f"({when}) on {api}; data dir {cfg.data_dir.resolve()}; input roots: {roots}"
    )
    serve_until_stopped(pipe, ref)


def serve_until_stopped(*deployments: Any) -> None:
    """Prefect's `serve`, stopping within 10 s of SIGTERM or SIGINT.

    The runner runs in a thread, so it installs no signal handler of its own. At the first signal
    the runner is told to stop: it cancels the runs in progress (each is told, then sent SIGTERM,
    unwinds to a safe point such as its released run lock, and ends). Here the runs' processes
    get until ``SERVE_STOP_S`` after the signal to end, whatever is left is killed, a run that did
    not reach a final state is marked Cancelled through the API, the schedules are paused (in the
    background, waited for until ``PAUSE_BY_S``), and the process exits at once (no interpreter
    teardown, which takes seconds with torch loaded; the runner's own slower bookkeeping is not
    waited for)."""
    import asyncio
    import threading

    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from clipline.flows import shutdown
    from clipline.flows.prefect_exit import flush_prefect

    runner = Runner(pause_on_shutdown=True)
    in_progress: dict[str, list] = {}  # flow run id -> its processes

    def on_signal(signum: int) -> None:
        in_progress.update(served_flow_runs())  # before anything is stopped
        try:
            runner.handle_sigterm()
        except SystemExit:  # not started yet: nothing to cancel
            pass

    shutdown.on_signal(on_signal)
    deployment_ids = [runner.add_deployment(d) for d in deployments]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(runner.start())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    thread = threading.Thread(target=run, name="clipline-serve", daemon=True)
    if not shutdown.stop_requested.is_set():
        thread.start()
    while thread.is_alive() and not shutdown.stop_requested.is_set():
        thread.join(0.5)
    if not shutdown.stop_requested.is_set():
        if failure:
            raise failure[0]
        return

    def api_client() -> Any:
        try:
            client = get_client(sync_client=True)
            client.__enter__()  # left open: the process exits below
            return client
        except Exception as e:  # noqa: BLE001 - the processes are stopped regardless
            render.note(f"cannot reach the Prefect API while stopping: {e}", err=True)
            return None

    # pausing the schedules (as Prefect's `serve` does on shutdown) can take seconds on a busy
    # server: in the background, waited for only while there is time
    pauser = threading.Thread(
        target=lambda: _api_quietly(
            api_client(), lambda c: [c.pause_deployment(d) for d in deployment_ids], "pause the schedules"
        ),
        name="clipline-serve-pause",
        daemon=True,
    )
    pauser.start()
    client = api_client()
    procs = [p for ps in in_progress.values() for p in ps]
    limit = SERVE_STOP_S if procs else IDLE_STOP_S
    while thread.is_alive() and shutdown.seconds_since_signal() < limit:
        if procs and not any(shutdown.running(p) for p in procs):
            break
        thread.join(0.2)
    left = [p for p in procs if shutdown.running(p)]
    shutdown.stop_tree(timeout=0.3, procs=procs)  # they were sent SIGTERM already: what is left is killed
    _api_quietly(client, lambda c: cancel_unfinished(c, list(in_progress)), "mark the unfinished runs Cancelled")
    pauser.join(max(PAUSE_BY_S - shutdown.seconds_since_signal(), 0.0))
    flush_prefect(timeout=0.5)
    runs = f"{len(in_progress)} run(s) in progress cancelled" + (f", {len(left)} process(es) killed" if left else "")
    render.say(f"stopped serving {shutdown.seconds_since_signal():.1f} s after the signal ({runs})")
    shutdown.hard_stop(0)


def _api_quietly(client: Any, fn: Any, what: str) -> Any:
    """``fn(client)``; None, and a note, when there is no client or the API fails."""
    if client is None:
        return None
    try:
        return fn(client)
    except Exception as e:  # noqa: BLE001 - best effort while stopping; the watchdog ends the process regardless
        render.note(f"could not {what}: {e}", err=True)
        return None


def served_flow_runs() -> dict[str, list]:
    """The flow runs this process's runner is executing, with their processes: the runner starts
    each in a process whose environment carries its id (PREFECT__FLOW_RUN_ID), which the
    processes it starts inherit."""
    from clipline.flows import shutdown

    runs: dict[str, list] = {}
    for p in shutdown.descendants():
        try:
            fid = p.environ().get("PREFECT__FLOW_RUN_ID")
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            continue
        if fid:
            runs.setdefault(fid, []).append(p)
    return runs


def cancel_unfinished(client: Any, flow_run_ids: list[str]) -> None:
    """Mark Cancelled those of ``flow_run_ids`` that did not reach a final state (their process
    ended, or was stopped, before the runner recorded it)."""
    from prefect.states import Cancelled

    for fid in flow_run_ids:
        fr = client.read_flow_run(fid)
        if fr.state is None or not fr.state.is_final():
            client.set_flow_run_state(
                fid, Cancelled(message="clipline serve was stopped before the run ended"), force=True
            )
