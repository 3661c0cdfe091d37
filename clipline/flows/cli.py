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


state = _State()


def fail(message: str, code: int = 1) -> None:
    """Print a one-line reason and exit non-zero."""
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
        None, "--data-dir", help="Where shards, snapshots, checkpoints and the catalog live (default ./clipline-data).",
        metavar="DIR",
    ),
) -> None:
    """clipline: URL lists -> Parquet shards -> curated snapshot -> CLIP model -> evaluated, registered model."""
    state.config_file = config
    state.data_dir = data_dir


# Commands are defined in the blocks below, one block per stage.


# ---- train ----
@app.command()
def train(
    snapshot: Optional[str] = typer.Option(None, "--snapshot", metavar="ID", help="Snapshot to train on (default: the latest)."),
    from_model: Optional[str] = typer.Option(
        None, "--from-model", metavar="VERSION|PATH",
        help="Fine-tune from a checkpoint directory/file, or a registered version or alias (e.g. 3, champion)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model config (default: train.model, clipline-tiny)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: from train.epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (more than 1 uses Ray)."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Name of the run; an unfinished run of that name is resumed."),
) -> None:
    """Train a CLIP model on a snapshot; shows samples/s and loss, ends with the checkpoint and MLflow run."""
    flags = {"model": model, "steps": steps, "batch_size": batch_size, "workers": workers, "run_name": run_name}
    cfg = get_config(train={k: v for k, v in flags.items() if v is not None})
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from clipline.components.model.factory import ModelError
    from clipline.components.train.data import SnapshotError
    from clipline.components.train.loop import TrainingDiverged
    from clipline.components.train.run import resolve_from_model, train as run_train, use_ray

    try:
        start = resolve_from_model(cfg, from_model) if from_model else None
    except FileNotFoundError as e:
        fail(str(e))
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("train", total=None, info="starting" + (" Ray Train" if use_ray(cfg) else ""))

            def progress(step: int, total: int, m: dict[str, float]) -> None:
                bar.update(task, completed=step, total=total,
                           info=f"{m['train/samples_per_s']:.0f} samples/s  loss {m['train/loss']:.3f}")

            result = run_train(cfg, snapshot_id=snapshot, from_model=start, progress=progress)
    except (SnapshotError, ModelError, TrainingDiverged, ValueError) as e:
        fail(str(e))
        return
    t = Table(title="train", show_header=False)
    for k, v in [("model", result.model_name), ("snapshot", result.snapshot_id), ("steps", f"{result.steps:,}"),
                 ("final loss", f"{result.final_loss:.4f}"), ("throughput", f"{result.samples_per_s:,.1f} samples/s"),
                 ("training time", f"{result.train_seconds:.1f} s"), ("checkpoint", str(result.checkpoint_dir)),
                 ("MLflow run", str(result.run_id)), ("logged model", str(result.model_uri))]:
        t.add_row(k, v)
    console.print(t)


def main() -> None:
    """Entry point: any uncaught error becomes a one-line reason and exit code 1
    (set CLIPLINE_DEBUG=1 for the traceback)."""
    import os

    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line, not a traceback
        if os.environ.get("CLIPLINE_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
