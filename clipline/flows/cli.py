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


# ---- curate ----


@app.command("curate")
def curate_cmd(
    eval_set: Optional[Path] = typer.Option(
        None, "--eval-set", metavar="PATH",
        help="Evaluation images to decontaminate against: Parquet with an 'image' column or a directory of images."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Rebuild from all shards instead of adding to the latest snapshot."),
    language: Optional[str] = typer.Option(None, "--language", help="ISO 639-1 code to keep ('none' switches the rule off)."),
    phash_max_distance: Optional[int] = typer.Option(None, "--phash-max-distance", min=-1, max=32,
                                                     help="Near-duplicate distance in bits (-1: off)."),
) -> None:
    """Build the next snapshot from the raw shards: rules, dedup, decontamination, split."""
    overrides: dict = {}
    if language is not None:
        overrides["language"] = None if language.lower() in ("none", "off", "") else language
    if phash_max_distance is not None:
        overrides["phash_max_distance"] = phash_max_distance
    cfg = get_config(curate=overrides)
    if eval_set is not None and not eval_set.exists():
        fail(f"--eval-set {eval_set} does not exist: give a Parquet file with an 'image' column or a directory of images")
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from clipline.components.curate import CurateError
    from clipline.components.curate.evalset import EvalSetError
    from clipline.flows.curate import curate_flow, progress_to

    with Progress(SpinnerColumn(), TextColumn("[bold]curate[/] {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), console=console) as bar:
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
    console.print(f"report: {res.report_path}" + (f"  contact sheet: {res.contact_sheet_path}" if res.contact_sheet_path else ""))


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
