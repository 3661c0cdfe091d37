"""The `clipline` command line (typer + rich). Its shape is DESIGN.md's "Command line" section.

Every command exits non-zero with a one-line reason on failure. Heavy imports (torch, ray,
prefect, mlflow) happen inside the commands so that ``clipline --help`` is fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from clipline.components.config import Config, ConfigError, load_config

app = typer.Typer(
    name="clipline",
    help="Web image-text pairs to CLIP models: ingest, curate, train, evaluate, track.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


class _State:
    config_file: Optional[Path] = None
    data_dir: Optional[Path] = None
    in_main = False  # run as the `clipline` process (main()), not in-process (tests' CliRunner)


state = _State()


def _flush_prefect(timeout: float = 30.0) -> None:
    """Finish Prefect's exit work now: send what its background workers still hold (events,
    API logs; waiting up to ``timeout`` s) and stop the temporary server it started, if any.

    Otherwise both happen at interpreter exit and log ("Still processing items...",
    "Stopping temporary server...") after the error line, which must stay the last line a
    user sees. Does nothing if no flow ran; exit does the same work again, idempotently. Only for
    a process about to exit: the temporary server is gone afterwards."""
    if "prefect.events.worker" in sys.modules:
        try:
            from prefect._internal.concurrency.services import _QueueServiceBase

            _QueueServiceBase.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # noqa: BLE001 - best effort; exit drains again anyway
            pass
    if "prefect.server.api.server" in sys.modules:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            for server in list(SubprocessASGIServer._instances.values()):
                server.stop()
        except Exception:  # noqa: BLE001 - best effort; exit stops it again anyway
            pass


def fail(message: str, code: int = 1) -> None:
    """Print a one-line reason and exit non-zero."""
    if state.in_main:  # the process ends next: finish Prefect's exit work before the reason
        _flush_prefect()
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def get_config(**section_overrides: Any) -> Config:
    """The config for a command: file + environment + global flags + the command's own flags.

    ``section_overrides`` are nested dicts such as ``ingest={"allow_hosts": [...]}``.
    """
    overrides: dict[str, Any] = {k: v for k, v in section_overrides.items() if v}
    if state.data_dir is not None:
        overrides["data_dir"] = state.data_dir
    try:
        return load_config(state.config_file, overrides)
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable


@app.callback()
def _global(
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML config file (default: ./clipline.toml if present).", metavar="FILE"
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Where shards, snapshots, checkpoints and the catalog live (default ./clipline-data).",
        metavar="DIR",
    ),
) -> None:
    """clipline: URL lists -> Parquet shards -> curated snapshot -> CLIP model -> evaluated, registered model."""
    state.config_file = config
    state.data_dir = data_dir


# Commands are defined in the blocks below, one block per stage.


# ---- pipeline ----
@app.command()
def demo(
    n: Optional[int] = typer.Option(None, "--n", help="Toy-web size (default: demo.n_images)."),
) -> None:
    """The main job: serve the toy web, run the whole pipeline on it, print a summary.

    Trains with the demo's recipe (config demo.train) unless [train] settings say otherwise. A rerun
    on the same data dir serves the same URLs (the port recorded there) and does no new work."""
    import contextlib
    import json
    import time

    t0 = time.perf_counter()
    overrides: dict[str, Any] = {"demo": {"n_images": n} if n else {}}
    cfg = get_config(**overrides)
    recipe = {k: v for k, v in cfg.demo.train.items() if k not in cfg.train.model_fields_set}
    for k, v in recipe.items():
        setattr(cfg.train, k, v)
    from clipline.components.demo import serve_toy_web, write_heldout_set, write_seen_set
    from clipline.components.demo.server import recorded_ports
    from clipline.flows.pipeline import pipeline_flow, summary_rows

    eval_dir = cfg.data_dir / "eval"
    web_dir = cfg.data_dir / "toyweb"
    with console.status("writing the held-out and seen-combination evaluation sets"):
        heldout = write_heldout_set(eval_dir, seed=cfg.demo.seed)
        seen = write_seen_set(eval_dir, seed=cfg.demo.seed)
    # the toy web's `timeout` fault hangs for a minute: a short deadline keeps the demo brisk
    cfg.ingest.read_timeout = min(cfg.ingest.read_timeout, 4.0)
    cfg.ingest.total_timeout = min(cfg.ingest.total_timeout, 8.0)
    with contextlib.ExitStack() as stack:
        web = None
        ports = recorded_ports(web_dir) if cfg.demo.port == 0 and cfg.demo.reuse_port else None
        if ports is not None:
            try:
                # a rerun fetches few or no URLs: draw pictures on request instead of all ahead of time
                web = stack.enter_context(
                    serve_toy_web(
                        cfg.demo.model_copy(update={"port": ports[0], "internal_port": ports[1], "warm_cache": False}),
                        web_dir,
                    )
                )
            except OSError as e:
                console.print(
                    f"[yellow]note:[/] the port this data dir's toy web used before ({ports[0]}) is not "
                    f"free ({e.__cause__ or e}); serving on a new port, so its URLs are new to the "
                    "catalog and are fetched again",
                    highlight=False,
                    soft_wrap=True,
                )
        if web is None:
            try:
                web = stack.enter_context(serve_toy_web(cfg.demo, web_dir))
            except OSError as e:
                fail(str(e))
                return
        cfg.ingest.allow_hosts = [*cfg.ingest.allow_hosts, web.allow_host]
        console.print(f"toy web: {len(web.items):,} URLs at {web.base_url} (list: {web.url_list})", highlight=False)
        result = pipeline_flow(
            [str(web.url_list)], cfg, eval_sets=[str(heldout.data), str(seen.data)], decontaminate=str(heldout.data)
        )
    seconds = time.perf_counter() - t0
    rows = summary_rows(result)
    extra = [
        ("chance level", f"{heldout.chance_acc1:.3f} (1 of {len(heldout.classnames)} colour x shape names)"),
        ("demo time", f"{seconds:.0f} s"),
    ]
    metrics = result.evaluation.eval.metrics if result.evaluation is not None else {}
    summary = {
        "seconds": round(seconds, 1),
        "skipped": result.skipped,
        "chance_acc1": heldout.chance_acc1,
        "heldout_acc1": metrics.get(f"zeroshot/{heldout.name}/acc1"),
        "seen_acc1": metrics.get(f"zeroshot/{seen.name}/acc1"),
        "metrics": metrics,
        "rows": rows,
        "train_recipe": recipe,
        "toy_web": web.base_url,
        "n_urls": len(web.items),
        "n_fetched": result.ingest.n_fetched,
        "train": None
        if result.train is None
        else {
            "model": result.train.model_name,
            "steps": result.train.steps,
            "seconds": result.train.train_seconds,
            "samples_per_s": result.train.samples_per_s,
        },
        "model_version": None
        if result.evaluation is None or result.evaluation.registry is None
        else {
            "name": result.evaluation.registry.name,
            "version": result.evaluation.registry.version,
            "alias": result.evaluation.registry.alias,
        },
    }
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    (cfg.reports_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(cfg, rows, extra=extra)
    if result.skipped:
        console.print(f"[bold]{result.skipped}[/]", highlight=False, soft_wrap=True)


def _print_summary(cfg: Config, rows: list[tuple[str, str]], extra: list[tuple[str, str]] = ()) -> None:
    from rich.table import Table

    t = Table(title="clipline summary", show_header=False)
    for k, v in [*rows, *extra]:
        t.add_row(k, v)
    console.print(t)
    console.print(
        f"MLflow UI:  clipline --data-dir {cfg.data_dir} ui    (tracking URI {cfg.mlflow_uri})",
        highlight=False,
        soft_wrap=True,
    )
    console.print("Prefect UI: prefect server start   (then open http://127.0.0.1:4200)", highlight=False)


# ---- demo-web ----
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
    import contextlib
    import time
    from collections import Counter

    from rich.table import Table

    flags = {"port": port, "n_images": n, "seed": seed, "fault_rate": fault_rate}
    cfg = get_config(demo={k: v for k, v in flags.items() if v is not None})
    from clipline.components.demo import serve_toy_web, write_heldout_set, write_seen_set
    from clipline.components.demo.faults import INGEST_OUTCOME

    out_dir = out if out is not None else cfg.data_dir / "toyweb"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create output directory {out_dir}: {e}; give a writable --out")
    with contextlib.ExitStack() as stack:
        try:
            toy = stack.enter_context(serve_toy_web(cfg.demo, out_dir))
        except OSError as e:
            fail(str(e))
            return
        counts = Counter(it.fault for it in toy.items)
        table = Table(title=f"toy web: {len(toy.items)} URLs at {toy.base_url} (seed {cfg.demo.seed})")
        table.add_column("fault")
        table.add_column("URLs", justify="right")
        table.add_column("a correct ingest")
        for fault, k in sorted(counts.items(), key=lambda kv: (kv[0] != "none", kv[0])):
            stores, what = INGEST_OUTCOME[fault]
            table.add_row(
                fault, str(k), ("stores it" if stores else "records a failure") + (f": {what}" if what else "")
            )
        console.print(table)
        console.print(
            f"URL list: {toy.url_list}  (columns url, caption, fault, color, shape)", highlight=False, soft_wrap=True
        )
        data_flag = f" --data-dir {state.data_dir}" if state.data_dir is not None else ""
        console.print("ingest it with:", highlight=False)
        console.print(
            f"  clipline{data_flag} ingest {toy.url_list} --allow-host {toy.allow_host}",
            highlight=False,
            soft_wrap=True,
        )
        if eval_sets:
            held = write_heldout_set(out_dir / "eval", seed=cfg.demo.seed)
            seen = write_seen_set(out_dir / "eval", seed=cfg.demo.seed)
            for es in (held, seen):
                console.print(
                    f"eval set '{es.name}': {es.n_images} images of {len(es.labels)} combinations, classified among "
                    f"{len(es.classnames)} names (chance {es.chance_acc1:.1%}):\n"
                    f"  --dataset {es.data} --classnames {es.classnames_file} --templates {es.templates_file}",
                    highlight=False,
                    soft_wrap=True,
                )
        console.print(
            f"the internal stand-in at {toy.internal_base_url} must stay unreachable; Ctrl-C to stop",
            highlight=False,
            soft_wrap=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("toy web stopped")


# ---- ingest ----
@app.command()
def ingest(
    url_lists: list[str] = typer.Argument(
        ..., help="URL lists: csv, tsv, parquet, jsonl or txt; local paths or fsspec URIs.", metavar="URL_LIST..."
    ),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        metavar="HOST:PORT",
        help="Exempt HOST:PORT from the SSRF guard (loopback/private addresses are refused otherwise).",
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Fetch again the URLs whose last attempt failed."),
    url_col: Optional[str] = typer.Option(None, "--url-col", help="Column holding the URL (default: url)."),
    caption_col: Optional[str] = typer.Option(
        None, "--caption-col", help="Column holding the caption (default: caption)."
    ),
) -> None:
    """Download the images of URL lists into raw Parquet shards (only URLs never seen before)."""
    overrides: dict[str, Any] = {}
    if allow_host:
        overrides["allow_hosts"] = list(allow_host)
    if retry_failed:
        overrides["retry_failed"] = True
    if url_col:
        overrides["url_col"] = url_col
    if caption_col:
        overrides["caption_col"] = caption_col
    cfg = get_config(ingest=overrides)
    from clipline.flows.progress import ingest_progress, print_ingest_result

    with ingest_progress(console) as progress:
        from clipline.components.ingest.runner import ingest as run_ingest

        result = run_ingest(cfg, url_lists, progress=progress)
    print_ingest_result(console, result)


# ---- curate ----


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
    overrides: dict = {}
    if language is not None:
        overrides["language"] = None if language.lower() in ("none", "off", "") else language
    if phash_max_distance is not None:
        overrides["phash_max_distance"] = phash_max_distance
    cfg = get_config(curate=overrides)
    if eval_set is not None and not eval_set.exists():
        fail(
            f"--eval-set {eval_set} does not exist: give a Parquet file with an 'image' column or a directory of images"
        )
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from clipline.components.curate import CurateError
    from clipline.components.curate.evalset import EvalSetError
    from clipline.flows.curate import curate_flow, progress_to

    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]curate[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tid = bar.add_task("starting", total=7)

        def progress(step: str, done: int, total: int) -> None:
            bar.update(tid, description=step, completed=done, total=total)

        try:
            with progress_to(progress):
                res = curate_flow(eval_set=str(eval_set) if eval_set else None, from_scratch=from_scratch, cfg=cfg)
        except (CurateError, EvalSetError, FileNotFoundError, ValueError) as e:
            fail(str(e))
            return
    if not res.new:
        console.print(f"nothing new: snapshot [bold]{res.snapshot_id}[/] is unchanged ({res.n_rows} rows)")
        return
    table = Table(title=f"snapshot {res.snapshot_id}", caption=f"parent: {res.parent_id or 'none'}")
    table.add_column("rule")
    table.add_column("dropped", justify="right")
    for rule, n in res.counts["dropped"].items():
        table.add_row(rule, str(n))
    table.add_row("[bold]kept[/]", f"[bold]{res.counts['kept']}[/] of {res.counts['input']}")
    console.print(table)
    console.print(f"snapshot {res.path}: {res.n_rows} rows (train {res.n_train}, val {res.n_val})")
    console.print(
        f"report: {res.report_path}" + (f"  contact sheet: {res.contact_sheet_path}" if res.contact_sheet_path else "")
    )


# ---- train ----
@app.command()
def train(
    snapshot: Optional[str] = typer.Option(
        None, "--snapshot", metavar="ID", help="Snapshot to train on (default: the latest)."
    ),
    from_model: Optional[str] = typer.Option(
        None,
        "--from-model",
        metavar="VERSION|PATH",
        help="Fine-tune from a checkpoint directory/file, or a registered version or alias (e.g. 3, champion).",
    ),
    model: Optional[str] = typer.Option(None, "--model", help="Model config (default: train.model, clipline-tiny)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: from train.epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (more than 1 uses Ray)."),
    run_name: Optional[str] = typer.Option(
        None, "--run-name", help="Name of the run; an unfinished run of that name is resumed."
    ),
) -> None:
    """Train a CLIP model on a snapshot; shows samples/s and loss, ends with the checkpoint and MLflow run."""
    flags = {"model": model, "steps": steps, "batch_size": batch_size, "workers": workers, "run_name": run_name}
    cfg = get_config(train={k: v for k, v in flags.items() if v is not None})
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from clipline.components.model.factory import ModelError
    from clipline.components.train.data import SnapshotError
    from clipline.components.train.loop import TrainingDiverged
    from clipline.components.train.run import resolve_from_model, train as run_train, use_ray

    try:
        start = resolve_from_model(cfg, from_model) if from_model else None
    except FileNotFoundError as e:
        fail(str(e))
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("train", total=None, info="starting" + (" Ray Train" if use_ray(cfg) else ""))

            def progress(step: int, total: int, m: dict[str, float]) -> None:
                bar.update(
                    task,
                    completed=step,
                    total=total,
                    info=f"{m['train/samples_per_s']:.0f} samples/s  loss {m['train/loss']:.3f}",
                )

            result = run_train(cfg, snapshot_id=snapshot, from_model=start, progress=progress)
    except (SnapshotError, ModelError, TrainingDiverged, ValueError) as e:
        fail(str(e))
        return
    t = Table(title="train", show_header=False)
    for k, v in [
        ("model", result.model_name),
        ("snapshot", result.snapshot_id),
        ("steps", f"{result.steps:,}"),
        ("final loss", f"{result.final_loss:.4f}"),
        ("throughput", f"{result.samples_per_s:,.1f} samples/s"),
        ("training time", f"{result.train_seconds:.1f} s"),
        ("checkpoint", str(result.checkpoint_dir)),
        ("MLflow run", str(result.run_id)),
        ("logged model", str(result.model_uri)),
    ]:
        t.add_row(k, v)
    console.print(t)


# ---- evaluate ----


@app.command("evaluate")
def evaluate_cmd(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        metavar="VERSION|ALIAS|PATH",
        help="Model version, alias (champion, challenger), models:/ URI or checkpoint directory "
        "(default: the champion, else the newest local checkpoint).",
    ),
    dataset: Optional[list[Path]] = typer.Option(
        None,
        "--dataset",
        metavar="PATH",
        help="Zero-shot set: Parquet (image,label), a directory of them, or an ImageFolder. Repeatable.",
    ),
    classnames: Optional[Path] = typer.Option(
        None, "--classnames", metavar="FILE", help="Class names JSON (CLIP_benchmark format)."
    ),
    templates: Optional[Path] = typer.Option(
        None, "--templates", metavar="FILE", help="Templates JSON (CLIP_benchmark format, '{c}' placeholders)."
    ),
    snapshot: Optional[str] = typer.Option(
        None, "--snapshot", metavar="ID", help="Snapshot whose val split is used for retrieval (default: the model's)."
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
    cfg = get_config(evaluate={k: v for k, v in {"batch_size": batch_size, "device": device}.items() if v is not None})
    from clipline.components.model.checkpoint import CheckpointError
    from clipline.components.evaluate.datasets import DatasetError
    from clipline.components.tracking.registry import RegistryError
    from clipline.flows.evaluate import evaluate_flow

    try:
        out = evaluate_flow(
            model=model,
            datasets=[str(d) for d in dataset or []],
            classnames=str(classnames) if classnames else None,
            templates=str(templates) if templates else None,
            snapshot_id=snapshot,
            register_model=register,
            cfg=cfg,
        )
    except (CheckpointError, DatasetError, RegistryError) as e:
        fail(str(e))
        return
    from rich.table import Table

    res = out.eval
    table = Table(title=f"evaluation of {res.checkpoint_dir.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(res.metrics.items()):
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    for zs in res.zeroshot:
        worst = ", ".join(f"{n} ({r:.2f})" for n, r, _ in zs.worst_classes(cfg.evaluate.worst_classes))
        console.print(f"worst classes on {zs.dataset}: {worst}")
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"reports: {res.report_dir}")
    if out.registry is not None:
        r = out.registry
        console.print(f"registered {r.name} version {r.version} as [bold]{r.alias}[/] ({r.decision.reason})")


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
        resolved = resolve_model(cfg, model)
        res = export_checkpoint(resolved.checkpoint_dir, out_dir, overwrite=overwrite)
    except (CheckpointError, RegistryError) as e:
        fail(str(e))
        return
    console.print(f"exported {model} to {res.out_dir} ({res.n_tensors} tensors); load it with")
    console.print(f"  {res.open_clip_command}", highlight=False, soft_wrap=True)
    console.print(f"  {res.clip_benchmark_command}", highlight=False, soft_wrap=True)


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
    from clipline.components.tracking.compare import compare_versions, comparison_table
    from clipline.components.tracking.registry import RegistryError

    try:
        comp = compare_versions(cfg, versions or None, metric or cfg.evaluate.compare_metrics or None, out, log_run)
    except RegistryError as e:
        fail(str(e))
        return
    console.print(comparison_table(comp))
    console.print(f"chart: {comp.chart}")
    if comp.mlflow_run_id:
        console.print(f"logged to MLflow run {comp.mlflow_run_id}")


# ---- orchestration ----
def _abs_location(loc: str) -> str:
    """A local path as an absolute one (a served run may start elsewhere); URLs unchanged."""
    return loc if "://" in loc else str(Path(loc).expanduser().resolve())


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=False)
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _deployment_summary(flow_run_id: Any, key: str) -> str | None:
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


def _need_prefect_server(what: str) -> str:
    """PREFECT_API_URL, or a one-line failure: deployments live on a Prefect server, not on the
    temporary in-process one that in-process runs use."""
    import os

    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        fail(
            f"{what} needs a Prefect server: start one (`prefect server start`, or infra/) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def _trigger(deployment_name: str, parameters: dict[str, Any], timeout: Optional[float], summary_key: str) -> None:
    """Run a served deployment through the Prefect API, wait, print its summary artifact; fail unless Completed."""
    _need_prefect_server("--deployment")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        fr = run_deployment(deployment_name, parameters=parameters, timeout=timeout, poll_interval=2, as_subflow=False)
    except ObjectNotFound:
        fail(
            f"no deployment {deployment_name!r} on the Prefect API: start `clipline serve` first "
            "(with the same PREFECT_API_URL)"
        )
        return
    state = fr.state
    console.print(f"flow run {fr.name} ({fr.id}) of {deployment_name}: {state.name if state else 'unknown'}")
    if state is None or not state.is_completed():
        if state is not None and not state.is_final():
            fail(f"flow run {fr.name} is still {state.name} after {timeout} s; follow it in the Prefect UI")
        fail(
            f"flow run {fr.name} ended {state.name if state else 'in an unknown state'}: "
            f"{(state.message if state else '') or 'see its logs in the Prefect UI'}"
        )
    md = _deployment_summary(fr.id, summary_key)
    if md:
        console.print(md, highlight=False, soft_wrap=True)


@app.command("run")
def run_cmd(
    url_lists: list[str] = typer.Argument(
        ..., metavar="URL_LIST...", help="URL lists: csv, tsv, parquet, jsonl or txt; local paths or fsspec URIs."
    ),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", metavar="HOST:PORT", help="Exempt HOST:PORT from the SSRF guard."
    ),
    eval_set: list[Path] = typer.Option(
        [], "--eval-set", metavar="PATH", help="Zero-shot set to evaluate on (repeatable; default: evaluate.datasets)."
    ),
    decontaminate: Optional[Path] = typer.Option(
        None,
        "--decontaminate",
        metavar="PATH",
        help="Eval set whose near-duplicates are dropped from the training data.",
    ),
    from_model: Optional[str] = typer.Option(
        None,
        "--from-model",
        metavar="VERSION|PATH",
        help="Fine-tune from a checkpoint, or a registered version or alias.",
    ),
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
    cfg = get_config(ingest={"allow_hosts": list(allow_host)} if allow_host else {})
    from clipline.components.refresh import RunBusy

    for p in [*eval_set, *([decontaminate] if decontaminate else [])]:
        if not p.exists():
            fail(f"evaluation set {p} does not exist: give a Parquet file (image,label) or an ImageFolder directory")
    evals = [str(p.resolve()) for p in eval_set] or None
    decon = str(decontaminate.resolve()) if decontaminate else None
    if deployment:
        # the served run starts from the worker's configuration: send only what was asked for here
        # (the worker refuses what only it may set, naming it), and a --from-model version or alias
        # as it is, for the worker's registry
        overrides: dict[str, Any] = {"ingest": {"allow_hosts": list(allow_host)}} if allow_host else {}
        if state.data_dir is not None:
            overrides["data_dir"] = str(state.data_dir.expanduser().resolve())
        params = {
            "config_file": str(state.config_file.resolve()) if state.config_file else None,
            "overrides": overrides,
            "url_lists": [_abs_location(u) for u in url_lists],
            "eval_sets": evals,
            "decontaminate": decon,
            "force": force,
            "from_model": (
                _abs_location(from_model) if from_model and Path(from_model).expanduser().exists() else from_model
            ),
        }
        _trigger(f"pipeline/{cfg.refresh.pipeline_deployment}", params, timeout, "pipeline-summary")
        return
    start = None
    if from_model:
        from clipline.components.train.run import resolve_from_model

        try:
            start = str(resolve_from_model(cfg, from_model))
        except FileNotFoundError as e:
            fail(str(e))
    from clipline.flows.pipeline import pipeline_flow, summary_rows

    try:
        result = pipeline_flow(
            list(url_lists), cfg, eval_sets=evals, decontaminate=decon, from_model=start, force=force
        )
    except RunBusy as e:
        fail(str(e))
        return
    _print_rows("clipline run", summary_rows(result))


@app.command("refresh")
def refresh_cmd(
    inbox: Optional[str] = typer.Option(
        None,
        "--inbox",
        metavar="DIR|URL",
        help="Folder or fsspec URL of new URL lists (default: refresh.inbox, DATA_DIR/inbox).",
    ),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", metavar="HOST:PORT", help="Exempt HOST:PORT from the SSRF guard."
    ),
    eval_set: list[Path] = typer.Option(
        [], "--eval-set", metavar="PATH", help="Zero-shot set to evaluate on (repeatable; default: refresh.eval_sets)."
    ),
    decontaminate: Optional[Path] = typer.Option(
        None,
        "--decontaminate",
        metavar="PATH",
        help="Eval set whose near-duplicates are dropped (default: refresh.decontaminate).",
    ),
    from_scratch: bool = typer.Option(
        False, "--from-scratch", help="Train from scratch instead of fine-tuning the champion."
    ),
) -> None:
    """Incremental refresh once: inbox -> new URLs -> child snapshot -> fine-tuned champion.

    The new version is evaluated, registered with the champion as its parent, and promoted by the
    registry's rule. Nothing new in the inbox: no training, and it says so."""
    cfg = get_config(
        refresh={"inbox": inbox} if inbox else {}, ingest={"allow_hosts": list(allow_host)} if allow_host else {}
    )
    for p in [*eval_set, *([decontaminate] if decontaminate else [])]:
        if not p.exists():
            fail(f"evaluation set {p} does not exist: give a Parquet file (image,label) or an ImageFolder directory")
    from clipline.components.refresh import InboxError, RunBusy
    from clipline.flows.refresh import refresh_flow, summary_rows

    try:
        result = refresh_flow(
            cfg=cfg,
            eval_sets=[str(p) for p in eval_set] or None,
            decontaminate=str(decontaminate) if decontaminate else None,
            from_scratch=True if from_scratch else None,
        )
    except (RunBusy, InboxError) as e:
        fail(str(e))
        return
    _print_rows("clipline refresh", summary_rows(result))


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
    allow_host: list[str] = typer.Option(
        [], "--allow-host", metavar="HOST:PORT", help="Exempt HOST:PORT from the SSRF guard in served runs."
    ),
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
    flags = {"cron": cron, "interval_s": interval}
    refresh = {k: v for k, v in flags.items() if v is not None}
    if input_root:
        base = get_config()
        refresh["input_roots"] = [*base.refresh.input_roots, *input_root]
    cfg = get_config(refresh=refresh, ingest={"allow_hosts": list(allow_host)} if allow_host else {})
    api = _need_prefect_server("clipline serve")
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.deployments.runner import EntrypointType

    from clipline.components.refresh.params import ServePolicy, deployment_parameters
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
        fail(
            f"refresh schedule: {why} (cron {rc.cron!r}, timezone {rc.timezone!r}); set refresh.cron to a "
            "5-field cron expression and refresh.timezone to an IANA name, or use refresh.interval_s"
        )
        return
    # the bounds of every served run: this process's configuration, handed to the runs through the
    # environment (which a run's parameters cannot reach; served runs ignore job variables)
    policy = ServePolicy.capture(state.config_file, cfg)
    os.environ.update(policy.to_env())
    params = deployment_parameters(state.config_file, cfg)
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
    console.print(
        f"serving pipeline/{rc.pipeline_deployment} (on demand) and refresh/{rc.refresh_deployment} "
        f"({when}) on {api}; data dir {cfg.data_dir.resolve()}; input roots: {roots}",
        highlight=False,
        soft_wrap=True,
    )
    _serve_until_stopped(pipe, ref)


#: after SIGTERM/SIGINT, how long `serve` waits for the processes of the runs in progress to end
#: (its runner has told each run to cancel and sent it SIGTERM) before it kills them; and how long
#: it lets an idle runner finish. Both within shutdown.HARD_STOP_S, with time left to record states.
SERVE_STOP_S = 5.0
IDLE_STOP_S = 2.5
#: how long after the signal `serve` waits for its schedules to be paused, at most
PAUSE_BY_S = 7.5


def _serve_until_stopped(*deployments: Any) -> None:
    """Prefect's `serve`, stopping within 10 s of SIGTERM or SIGINT.

    The runner runs in a thread, so it installs no signal handler of its own. At the first signal
    the runner is told to stop: it cancels the runs in progress (each is told, then sent SIGTERM,
    unwinds to a safe point such as its released run lock, and ends). Here the runs' processes
    get until ``SERVE_STOP_S`` after the signal to end, whatever is left is killed, a run that did
    not reach a final state is marked Cancelled through the API, the schedules are paused (in the
    background, waited for until ``PAUSE_BY_S``), and the process exits at once (no interpreter teardown, which takes
    seconds with torch loaded; the runner's own slower bookkeeping is not waited for)."""
    import asyncio
    import threading

    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from clipline.flows import shutdown

    runner = Runner(pause_on_shutdown=True)
    in_progress: dict[str, list] = {}  # flow run id -> its processes

    def on_signal(signum: int) -> None:
        in_progress.update(_served_flow_runs())  # before anything is stopped
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
            err_console.print(f"[yellow]note:[/] cannot reach the Prefect API while stopping: {e}", highlight=False)
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
    _api_quietly(client, lambda c: _cancel_unfinished(c, list(in_progress)), "mark the unfinished runs Cancelled")
    pauser.join(max(PAUSE_BY_S - shutdown.seconds_since_signal(), 0.0))
    _flush_prefect(timeout=0.5)
    runs = f"{len(in_progress)} run(s) in progress cancelled" + (f", {len(left)} process(es) killed" if left else "")
    console.print(f"stopped serving {shutdown.seconds_since_signal():.1f} s after the signal ({runs})", highlight=False)
    shutdown.hard_stop(0)


def _api_quietly(client: Any, fn: Any, what: str) -> Any:
    """``fn(client)``; None, and a note, when there is no client or the API fails."""
    if client is None:
        return None
    try:
        return fn(client)
    except Exception as e:  # noqa: BLE001 - best effort while stopping; the watchdog ends the process regardless
        err_console.print(f"[yellow]note:[/] could not {what}: {e}", highlight=False, soft_wrap=True)
        return None


def _served_flow_runs() -> dict[str, list]:
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


def _cancel_unfinished(client: Any, flow_run_ids: list[str]) -> None:
    """Mark Cancelled those of ``flow_run_ids`` that did not reach a final state (their process
    ended, or was stopped, before the runner recorded it)."""
    from prefect.states import Cancelled

    for fid in flow_run_ids:
        fr = client.read_flow_run(fid)
        if fr.state is None or not fr.state.is_final():
            client.set_flow_run_state(
                fid, Cancelled(message="clipline serve was stopped before the run ended"), force=True
            )


# ---- ui ----
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
    console.print(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
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
        console.print("MLflow UI stopped")
        shutdown.hard_stop(0)
    if server.returncode:
        fail(f"the MLflow UI exited with status {server.returncode} (see its output above)")


#: Prefect's console handler, less the failure reports that would print a traceback before
#: clipline's one-line reason (clipline/flows/console.py); set through Prefect's documented
#: `PREFECT_LOGGING_[PATH]_[TO]_[KEY]` override of its logging config
ONE_LINE_CONSOLE = ("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "clipline.flows.console.OneLineConsoleHandler")


def _stopped(e: BaseException | None) -> None:
    """The end of a command stopped by SIGTERM or SIGINT: Prefect's exit work (briefly), every
    process this one started stopped, and exit without the interpreter's teardown (seconds, with
    torch and MLflow loaded), inside the 10 s a service manager gives. ``e``: what interrupted the
    command (one line, exit 128+signal), or None when the command ended by itself (exit 0; a
    command that runs until stopped, such as `demo-web`)."""
    import signal

    from clipline.flows import shutdown

    signum = shutdown.received() or getattr(e, "signum", signal.SIGINT)
    _flush_prefect(timeout=3.0)
    shutdown.stop_tree(timeout=3.0)
    if e is None:
        shutdown.hard_stop(0)
    why = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    err_console.print(f"[bold red]error:[/] {why}", highlight=False)
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
        _flush_prefect()
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
