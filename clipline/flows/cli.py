"""The `clipline` command line (typer). Each command parses its flags into the config, calls one
function and hands the result to ``render``: the stage commands (ingest, curate, train, evaluate)
call their component directly, with progress bars; `run` and `refresh` their Prefect flow; `demo`
``demo.run_demo``; `serve` and `run --deployment` ``deploy``. See DESIGN.md, "Command line".

Every command exits non-zero with a one-line reason on failure. Heavy imports (torch, ray,
prefect, mlflow) happen inside the commands so that ``clipline --help`` is fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipline.components.config import Config, ConfigError, load_config
from clipline.flows import render

app = typer.Typer(
    name="clipline",
    help="Web image-text pairs to CLIP models: ingest, curate, train, evaluate, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Prefect's console handler, less the failure reports that would print a traceback before
#: clipline's one-line reason (clipline/flows/console.py); set through Prefect's documented
#: `PREFECT_LOGGING_[PATH]_[TO]_[KEY]` override of its logging config
ONE_LINE_CONSOLE = ("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "clipline.flows.console.OneLineConsoleHandler")


class _State:
    config_file: Optional[Path] = None
    data_dir: Optional[Path] = None
    state_dir: Optional[Path] = None
    in_main = False  # run as the `clipline` process (main()), not in-process (tests' CliRunner)


state = _State()


def fail(message: str, code: int = 1) -> None:
    """Print a one-line reason and exit non-zero."""
    if state.in_main:  # the process ends next: finish Prefect's exit work before the reason
        from clipline.flows.prefect_exit import flush_prefect

        flush_prefect()
    render.error_line(message)
    raise typer.Exit(code)


def get_config(**section_overrides: Any) -> Config:
    """The config for a command: file + environment + global flags + the command's own flags.

    ``section_overrides`` are nested dicts such as ``ingest={"allow_hosts": [...]}``; empty ones
    are left out.
    """
    overrides: dict[str, Any] = {k: v for k, v in section_overrides.items() if v}
    if state.data_dir is not None:
        overrides["data_dir"] = state.data_dir
    if state.state_dir is not None:
        overrides["state_dir"] = state.state_dir
    try:
        return load_config(state.config_file, overrides)
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable


def _dir_flags(cfg: Config) -> str:
    """``--data-dir D [--state-dir S]``: how a later command finds this one's data and state."""
    flags = f"--data-dir {cfg.data_dir}"
    return flags + (f" --state-dir {cfg.state_dir}" if cfg.state_dir is not None else "")


def _set(**flags: Any) -> dict[str, Any]:
    """The flags that were given (not None), as config overrides."""
    return {k: v for k, v in flags.items() if v is not None}


def _allow(allow_host: list[str]) -> dict[str, Any]:
    return {"allow_hosts": list(allow_host)} if allow_host else {}


def _existing_eval_sets(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            fail(f"evaluation set {p} does not exist: give a Parquet file (image,label) or an ImageFolder directory")


# ---- options that several commands take, declared once ----
AllowHost = Annotated[
    list[str],
    typer.Option(
        "--allow-host",
        metavar="HOST:PORT",
        help="Exempt HOST:PORT from the SSRF guard, which refuses loopback and private addresses "
        "(repeatable; given, it replaces ingest.allow_hosts).",
    ),
]
EvalSets = Annotated[
    list[Path],
    typer.Option(
        "--eval-set",
        metavar="PATH",
        help="Zero-shot set to evaluate on (repeatable; default: evaluate.datasets, for refresh refresh.eval_sets).",
    ),
]
Decontaminate = Annotated[
    Optional[Path],
    typer.Option(
        "--decontaminate",
        metavar="PATH",
        help="Eval set whose near-duplicates are dropped from the training data (refresh: default refresh.decontaminate).",
    ),
]
FromModel = Annotated[
    Optional[str],
    typer.Option(
        "--from-model",
        metavar="VERSION|PATH|HUB",
        help="Fine-tune from a checkpoint directory/file, a registered version or alias (e.g. 3, champion), "
        "hf-hub:org/repo, or an open_clip pretrained tag of the model (laion2b_s34b_b79k, or "
        "ViT-B-32:laion2b_s34b_b79k).",
    ),
]
UrlLists = Annotated[
    list[str],
    typer.Argument(
        metavar="URL_LIST...", help="URL lists: csv, tsv, parquet, jsonl or txt; local paths or fsspec URIs."
    ),
]


@app.callback()
def _global(
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML config file (default: ./clipline.toml if present).", metavar="FILE"
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Where shards, snapshots, checkpoints, reports and exports live (default ./clipline-data).",
        metavar="DIR",
    ),
    state_dir: Optional[Path] = typer.Option(
        None,
        "--state-dir",
        help="Where what must stay on this machine's disk lives: the catalog and its run lock, the default "
        "SQLite MLflow store, DuckDB's spill directory (default: the data dir).",
        metavar="DIR",
    ),
) -> None:
    """clipline: URL lists -> Parquet shards -> curated snapshot -> CLIP model -> evaluated, registered model."""
    state.config_file = config
    state.data_dir = data_dir
    state.state_dir = state_dir


# ---- the demo ----
@app.command()
def demo(
    n: Optional[int] = typer.Option(None, "--n", help="Toy-web size (default: demo.n_images)."),
) -> None:
    """The main job: serve the toy web, run the whole pipeline on it, print a summary.

    Trains with the demo's recipe (config demo.train) unless [train] settings say otherwise. A rerun
    on the same data dir serves the same URLs (the port recorded there) and does no new work."""
    cfg = get_config(demo={"n_images": n} if n else {})
    from clipline.flows.demo import run_demo

    try:
        run = run_demo(cfg, status=render.console.status, say=render.say, note=render.note)
    except OSError as e:
        fail(str(e))
        return
    render.demo_summary(run.rows, _dir_flags(cfg), cfg.mlflow_uri, run.skipped)


@app.command("demo-web")
def demo_web(
    port: Optional[int] = typer.Option(
        None, "--port", help="Port to serve on (default: config demo.port, 0 = any free)."
    ),
    n: Optional[int] = typer.Option(None, "--n", help="Number of URLs (default: config demo.n_images)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where to write the URL list and eval sets (default: DATA_DIR/toyweb).", metavar="DIR"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Corpus seed (default: config demo.seed)."),
    fault_rate: Optional[float] = typer.Option(None, "--fault-rate", help="Share of URLs with a web fault (0..1)."),
    eval_sets: bool = typer.Option(
        True, "--eval-sets/--no-eval-sets", help="Also write the held-out and seen evaluation sets."
    ),
) -> None:
    """Serve the toy web on 127.0.0.1 and write its URL list, for pointing the pipeline at it by hand.
    Serves until Ctrl-C."""
    cfg = get_config(demo=_set(port=port, n_images=n, seed=seed, fault_rate=fault_rate))
    from clipline.flows.demo import toy_web_by_hand

    import time

    try:
        with toy_web_by_hand(cfg, out or cfg.data_dir / "toyweb", eval_sets) as (toy, sets):
            data_flag = f" --data-dir {state.data_dir}" if state.data_dir is not None else ""
            data_flag += f" --state-dir {state.state_dir}" if state.state_dir is not None else ""
            render.toy_web(toy, cfg.demo.seed, data_flag, sets)
            while True:
                time.sleep(3600)
    except OSError as e:
        fail(str(e))
    except KeyboardInterrupt:
        render.say("toy web stopped")


# ---- the stages, one command each: the components directly, with progress bars ----
@app.command()
def ingest(
    url_lists: UrlLists,
    allow_host: AllowHost = [],
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Fetch again the URLs whose last attempt failed."),
    url_col: Optional[str] = typer.Option(None, "--url-col", help="Column holding the URL (default: url)."),
    caption_col: Optional[str] = typer.Option(
        None, "--caption-col", help="Column holding the caption (default: caption)."
    ),
) -> None:
    """Download the images of URL lists into raw Parquet shards (only URLs never seen before)."""
    flags = _set(retry_failed=retry_failed or None, url_col=url_col or None, caption_col=caption_col or None)
    cfg = get_config(ingest={**_allow(allow_host), **flags})
    from clipline.components.ingest.runner import ingest as run_ingest
    from clipline.components.ingest.sources import UrlListError
    from clipline.components.storage import StorageError

    try:
        with render.ingest_progress() as progress:
            result = run_ingest(cfg, url_lists, progress=progress)
    except (FileNotFoundError, UrlListError, StorageError) as e:
        fail(str(e))
        return
    render.ingest_result(result)


@app.command("curate")
def curate_cmd(
    eval_set: Optional[Path] = typer.Option(
        None,
        "--eval-set",
        metavar="PATH",
        help="Evaluation images to decontaminate against: Parquet with an 'image' column or a directory of images.",
    ),
    from_scratch: bool = typer.Option(
        False, "--from-scratch", help="Rebuild from all shards instead of adding to the latest snapshot."
    ),
    language: Optional[str] = typer.Option(
        None, "--language", help="ISO 639-1 code to keep ('none' switches the rule off)."
    ),
    phash_max_distance: Optional[int] = typer.Option(
        None, "--phash-max-distance", min=-1, max=32, help="Near-duplicate distance in bits (-1: off)."
    ),
) -> None:
    """Build the next snapshot from the raw shards: rules, dedup, decontamination, split."""
    overrides = _set(phash_max_distance=phash_max_distance)
    if language is not None:
        overrides["language"] = None if language.lower() in ("none", "off", "") else language
    cfg = get_config(curate=overrides)
    if eval_set is not None and not eval_set.exists():
        fail(
            f"--eval-set {eval_set} does not exist: give a Parquet file with an 'image' column or a directory of images"
        )
    from clipline.components.curate import CurateError, curate
    from clipline.components.curate.evalset import EvalSetError

    try:
        with render.curate_progress() as progress:
            res = curate(cfg, eval_set, progress=progress, from_scratch=from_scratch)
    except (CurateError, EvalSetError, FileNotFoundError, ValueError) as e:
        fail(str(e))
        return
    render.curate_result(res)


@app.command()
def train(
    snapshot: Optional[str] = typer.Option(
        None,
        "--snapshot",
        metavar="ID|URL",
        help="Snapshot to train on: an id (default: the latest), or the URL of a snapshot directory in object "
        "storage (s3://bucket/prefix/snapshots/ID, credentials and AWS_ENDPOINT_URL from the environment).",
    ),
    from_model: FromModel = None,
    model: Optional[str] = typer.Option(None, "--model", help="Model config (default: train.model, clipline-tiny)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: from train.epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (more than 1 uses Ray)."),
    run_name: Optional[str] = typer.Option(
        None, "--run-name", help="Name of the run; an unfinished run of that name is resumed."
    ),
) -> None:
    """Train a CLIP model on a snapshot; shows samples/s and loss, ends with the checkpoint and MLflow run."""
    cfg = get_config(train=_set(model=model, steps=steps, batch_size=batch_size, workers=workers, run_name=run_name))
    from clipline.components.model.factory import ModelError
    from clipline.components.storage import StorageError
    from clipline.components.train.data import SnapshotError
    from clipline.components.train.loop import TrainingDiverged
    from clipline.components.train.run import resolve_from_model, train as run_train, use_ray

    try:
        start = resolve_from_model(cfg, from_model) if from_model else None
        with render.train_progress("starting" + (" Ray Train" if use_ray(cfg) else "")) as progress:
            result = run_train(cfg, snapshot_id=snapshot, from_model=start, progress=progress)
    except (FileNotFoundError, SnapshotError, ModelError, TrainingDiverged, ValueError, StorageError) as e:
        fail(str(e))
        return
    render.train_result(result)


@app.command("evaluate")
def evaluate_cmd(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        metavar="VERSION|ALIAS|PATH|HUB",
        help="Model version, alias (champion, challenger), models:/ URI, checkpoint directory, or hub weights "
        "(hf-hub:org/repo, MODEL:TAG) (default: the champion, else the newest local checkpoint).",
    ),
    dataset: Optional[list[str]] = typer.Option(
        None,
        "--dataset",
        metavar="PATH|wds/NAME",
        help="Zero-shot set: Parquet (image,label), a directory of them, an ImageFolder, or a CLIP_benchmark "
        "webdataset directory (wds/NAME with --dataset-root). Repeatable.",
    ),
    dataset_root: Optional[str] = typer.Option(
        None,
        "--dataset-root",
        metavar="DIR",
        help="With --dataset wds/NAME: the set's directory, CLIP_benchmark's convention ({dataset} and "
        "{dataset_cleaned} are replaced by NAME).",
    ),
    classnames: Optional[Path] = typer.Option(
        None, "--classnames", metavar="FILE", help="Class names JSON (CLIP_benchmark format)."
    ),
    templates: Optional[Path] = typer.Option(
        None, "--templates", metavar="FILE", help="Templates JSON (CLIP_benchmark format, '{c}' placeholders)."
    ),
    snapshot: Optional[str] = typer.Option(
        None,
        "--snapshot",
        metavar="ID|URL",
        help="Snapshot whose val split is used for retrieval: an id, or the URL of a snapshot directory in object "
        "storage (default: the model's, from the store when training read it there).",
    ),
    register: bool = typer.Option(
        False,
        "--register/--no-register",
        help="Register as a new model version and apply the promotion rule, which compares "
        "evaluate.primary_metric (default auto: top-1 on the first zero-shot set, "
        "else text-to-image R@5 on the snapshot's val split). A checkpoint trained "
        "with another tracking store is logged into a new run of this one first.",
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
) -> None:
    """Zero-shot accuracy and retrieval recall of a model; metrics go to its MLflow run (a checkpoint
    whose run is in another tracking store: to a new run of this one, with --register)."""
    cfg = get_config(evaluate=_set(batch_size=batch_size, device=device))
    from clipline.components.evaluate.datasets import DatasetError
    from clipline.components.evaluate.model import evaluate_model
    from clipline.components.model.errors import ModelError
    from clipline.components.tracking.registry import RegistryError

    try:
        out = evaluate_model(
            cfg,
            model,
            datasets=[str(d) for d in dataset or []],
            classnames=str(classnames) if classnames else None,
            templates=str(templates) if templates else None,
            dataset_root=dataset_root,
            snapshot_id=snapshot,
            register=register,
        )
    except (ModelError, DatasetError, RegistryError) as e:
        fail(str(e))
        return
    render.evaluation(out, cfg.evaluate.worst_classes)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="Version, alias, models:/ URI or checkpoint directory."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Directory to write (must be empty or absent)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty OUT_DIR."),
) -> None:
    """Write an open_clip-loadable checkpoint + config that needs no clipline code."""
    cfg = get_config()
    from clipline.components.model.export import CheckpointError, export_checkpoint
    from clipline.components.tracking.registry import RegistryError, resolve_model

    try:
        res = export_checkpoint(resolve_model(cfg, model).checkpoint_dir, out_dir, overwrite=overwrite)
    except (CheckpointError, RegistryError) as e:
        fail(str(e))
        return
    render.export_result(model, res)


@app.command("compare")
def compare_cmd(
    versions: Optional[list[str]] = typer.Argument(
        None, metavar="[VERSION...]", help="Versions or aliases (default: all versions)."
    ),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric to chart (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Where to write the PNG and JSON."),
    log_run: bool = typer.Option(
        False,
        "--log-run",
        help="Also log the chart and table to MLflow, as artifacts of a new run tagged "
        "clipline.kind=compare (default: nothing is written to MLflow).",
    ),
) -> None:
    """Registered model versions side by side: a table here, a PNG chart and a JSON table on disk
    (default <data-dir>/reports/compare). Read-only for MLflow unless --log-run."""
    cfg = get_config()
    from clipline.components.tracking.compare import compare_versions
    from clipline.components.tracking.registry import RegistryError

    try:
        comp = compare_versions(cfg, versions or None, metric or cfg.evaluate.compare_metrics or None, out, log_run)
    except RegistryError as e:
        fail(str(e))
        return
    render.comparison(comp)


# ---- orchestration: the pipeline and refresh flows, in process or served ----
@app.command("run")
def run_cmd(
    url_lists: UrlLists,
    allow_host: AllowHost = [],
    eval_set: EvalSets = [],
    decontaminate: Decontaminate = None,
    from_model: FromModel = None,
    force: bool = typer.Option(False, "--force", help="Train even when the snapshot did not change."),
    deployment: bool = typer.Option(
        False,
        "--deployment",
        help="Run it as the served `pipeline` deployment (PREFECT_API_URL, `clipline serve`) "
        "instead of in this process, and wait for it. The worker's configuration "
        "applies; files must lie inside its input roots (see `clipline serve --help`).",
    ),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0, help="With --deployment: seconds to wait (default: until it ends)."
    ),
) -> None:
    """Run the whole pipeline once: ingest -> curate -> train -> evaluate -> register."""
    cfg = get_config(ingest=_allow(allow_host))
    _existing_eval_sets([*eval_set, *([decontaminate] if decontaminate else [])])
    evals = [str(p.resolve()) for p in eval_set] or None
    decon = str(decontaminate.resolve()) if decontaminate else None
    if deployment:
        from clipline.flows import deploy

        params = deploy.pipeline_parameters(
            state.config_file, state.data_dir, state.state_dir, allow_host, url_lists, evals, decon, from_model, force
        )
        try:
            t = deploy.trigger(f"pipeline/{cfg.refresh.pipeline_deployment}", params, timeout, "pipeline-summary")
        except deploy.DeploymentError as e:
            fail(str(e))
            return
        render.triggered(t)
        if t.failure:
            fail(t.failure)
        return
    from clipline.components.model.errors import ModelError
    from clipline.components.orchestration import RunBusy
    from clipline.components.storage import StorageError
    from clipline.components.train.run import resolve_from_model
    from clipline.flows.pipeline import pipeline_flow, summary_rows

    try:
        start = str(resolve_from_model(cfg, from_model)) if from_model else None
        result = pipeline_flow(
            list(url_lists), cfg, eval_sets=evals, decontaminate=decon, from_model=start, force=force
        )
    except (FileNotFoundError, ModelError, RunBusy, StorageError) as e:
        fail(str(e))
        return
    render.rows_table("clipline run", summary_rows(result))


@app.command("refresh")
def refresh_cmd(
    inbox: Optional[str] = typer.Option(
        None,
        "--inbox",
        metavar="DIR|URL",
        help="Folder or fsspec URL of new URL lists (default: refresh.inbox, DATA_DIR/inbox).",
    ),
    allow_host: AllowHost = [],
    eval_set: EvalSets = [],
    decontaminate: Decontaminate = None,
    from_scratch: bool = typer.Option(
        False, "--from-scratch", help="Train from scratch instead of fine-tuning the champion."
    ),
) -> None:
    """Incremental refresh once: inbox -> new URLs -> child snapshot -> fine-tuned champion.

    The new version is evaluated, registered with the champion as its parent, and promoted by the
    registry's rule. Nothing new in the inbox: no training, and it says so."""
    cfg = get_config(refresh={"inbox": inbox} if inbox else {}, ingest=_allow(allow_host))
    _existing_eval_sets([*eval_set, *([decontaminate] if decontaminate else [])])
    from clipline.components.orchestration import RunBusy
    from clipline.components.refresh import InboxError
    from clipline.components.storage import StorageError
    from clipline.flows.refresh import refresh_flow, summary_rows

    try:
        result = refresh_flow(
            cfg=cfg,
            eval_sets=[str(p) for p in eval_set] or None,
            decontaminate=str(decontaminate) if decontaminate else None,
            from_scratch=True if from_scratch else None,
        )
    except (RunBusy, InboxError, StorageError) as e:
        fail(str(e))
        return
    render.rows_table("clipline refresh", summary_rows(result))


_SERVE_EPILOG = (
    "What a run may change: a run of these deployments starts from this process's own configuration, captured "
    "when `serve` starts, not from its parameters (anyone who may start a run, any user of a shared Prefect "
    "server, could otherwise switch the SSRF guard off or point the data dir anywhere). Only this process sets "
    "ingest.ssrf_guard and ingest.allow_hosts (a run may only narrow them), tracking.tracking_uri, the data dir, "
    "refresh.inbox, refresh.input_roots, curate.rules_file, curate.duckdb_temp_dir and the config file; a run may "
    "restate them, not change them. Files a run names (url_lists, eval_sets, decontaminate, a from_model "
    "checkpoint, path settings in its overrides) must lie inside an --input-root; with none, a run names no files "
    "(the refresh deployment still reads the inbox). A refused run fails at its start, naming each parameter."
    "\n\n"
    "Stopping: SIGTERM or SIGINT cancels the runs in progress (each unwinds to a safe point and is marked "
    "Cancelled), pauses the schedules and ends every process this one started, within 10 s."
)


@app.command(epilog=_SERVE_EPILOG)
def serve(
    cron: Optional[str] = typer.Option(None, "--cron", help="Refresh schedule (default: refresh.cron)."),
    interval: Optional[float] = typer.Option(
        None,
        "--interval",
        min=1,
        metavar="SECONDS",
        help="Refresh every N seconds instead of on cron (refresh.interval_s).",
    ),
    allow_host: AllowHost = [],
    input_root: list[str] = typer.Option(
        [],
        "--input-root",
        metavar="DIR|URL",
        help="A folder (or fsspec URL prefix) inside which runs may name files to "
        "read: URL lists, eval sets, checkpoints (repeatable; adds to "
        "refresh.input_roots).",
    ),
) -> None:
    """Deployments: `pipeline` on demand, `refresh` on schedule (until Ctrl-C or SIGTERM).

    Needs a Prefect server (PREFECT_API_URL). Each deployment runs one flow run at a time; more
    are queued. Trigger the pipeline with `clipline run URL_LIST... --deployment`. Runs take their
    configuration from this process, and may name files only inside an --input-root (below)."""
    import os

    if os.environ.get(ONE_LINE_CONSOLE[0]) == ONE_LINE_CONSOLE[1]:
        del os.environ[ONE_LINE_CONSOLE[0]]  # served runs' failures: tracebacks in this log, for the operator
    refresh = _set(cron=cron, interval_s=interval)
    if input_root:
        refresh["input_roots"] = [*get_config().refresh.input_roots, *input_root]
    cfg = get_config(refresh=refresh, ingest=_allow(allow_host))
    from clipline.flows import deploy

    try:
        deploy.serve(state.config_file, cfg)
    except deploy.DeploymentError as e:
        fail(str(e))


# ---- services ----
@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(5000, "--port", help="Port of the MLflow UI."),
) -> None:
    """Start the MLflow UI on this data dir's tracking store (until Ctrl-C or SIGTERM).

    One server worker (MLflow's own default is 4: a UI for a team's browsers needs no more). SIGTERM
    or SIGINT stops the MLflow server and every process it started (its worker and job consumers)
    within 10 s, then exits 0."""
    import subprocess

    from clipline.flows import shutdown

    cfg = get_config()
    uri = cfg.mlflow_uri
    render.say(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C to stop)")
    shutdown.on_signal(lambda signum: None)  # the loop below watches shutdown.stop_requested
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
    )
    while server.poll() is None and not shutdown.stop_requested.is_set():
        shutdown.stop_requested.wait(0.5)
    # MLflow's own launcher leaves its job consumers running when it is stopped, and takes seconds
    # to exit after its server did: stop the whole tree, killing what has not exited after 4 s
    shutdown.stop_tree(timeout=4.0)
    if shutdown.received() is not None:
        render.say("MLflow UI stopped")
        shutdown.hard_stop(0)
    if server.returncode:
        fail(f"the MLflow UI exited with status {server.returncode} (see its output above)")


catalog_app = typer.Typer(help="The catalog (URLs seen, shards, snapshots and their lineage).", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("rebuild")
def catalog_rebuild(
    force: bool = typer.Option(False, "--force", help="Replace a catalog that exists (it is kept as .bak-<time>)."),
) -> None:
    """Rebuild a lost or damaged catalog from the raw shards and snapshot manifests in the data dir."""
    cfg = get_config()
    import duckdb

    from clipline.components.catalog import CatalogExists, rebuild_catalog
    from clipline.components.orchestration import RunBusy, exclusive_run
    from clipline.components.orchestration.lock import holder_name

    def rebuild() -> Any:
        return rebuild_catalog(cfg.catalog_path, cfg.raw_dir, cfg.snapshots_dir, replace=force)

    try:
        if cfg.catalog_path.exists() and force:
            try:  # no pipeline or refresh may write the data dir meanwhile
                with exclusive_run(cfg, holder_name("catalog rebuild"), wait_s=0):
                    res = rebuild()
            except duckdb.Error:  # the catalog is damaged past opening: no run can be using it
                res = rebuild()
        else:
            res = rebuild()
    except (CatalogExists, RunBusy) as e:
        fail(str(e))
        return
    render.rebuilt(res)


def _stopped(e: BaseException | None) -> None:
    """The end of a command stopped by SIGTERM or SIGINT: Prefect's exit work (briefly), every
    process this one started stopped, and exit without the interpreter's teardown (seconds, with
    torch and MLflow loaded), inside the 10 s a service manager gives. ``e``: what interrupted the
    command (one line, exit 128+signal), or None when the command ended by itself (exit 0; a
    command that runs until stopped, such as `demo-web`)."""
    import signal

    from clipline.flows import shutdown

    from clipline.flows.prefect_exit import flush_prefect

    signum = shutdown.received() or getattr(e, "signum", signal.SIGINT)
    flush_prefect(timeout=3.0)
    shutdown.stop_tree(timeout=3.0)
    if e is None:
        shutdown.hard_stop(0)
    why = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    render.error_line(why)
    shutdown.hard_stop(shutdown.exit_code(signum))


def main() -> None:
    """Entry point: any uncaught error becomes a one-line reason and exit code 1
    (set CLIPLINE_DEBUG=1 for the traceback); SIGTERM and SIGINT stop the command and every
    process it started (clipline/flows/shutdown.py)."""
    import os

    from clipline.flows import shutdown

    # nothing leaves the machine unasked: no Prefect/Ray usage telemetry
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Prefect's embedded server gets 20 s to start by default; a busy 2-core laptop needs more
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault(*ONE_LINE_CONSOLE)
    state.in_main = True
    shutdown.install()
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (shutdown.Terminated)
        _stopped(e)
    except SystemExit as e:
        if shutdown.received() is not None:
            # typer turns an uncaught KeyboardInterrupt (shutdown.Terminated included) into exit 130
            _stopped(None if e.code in (0, None) else KeyboardInterrupt())
        raise
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line, not a traceback
        if os.environ.get("CLIPLINE_DEBUG"):
            raise
        from clipline.flows.prefect_exit import flush_prefect

        flush_prefect()
        render.error_line(f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
