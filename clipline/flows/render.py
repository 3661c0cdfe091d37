"""Everything the command line prints: progress bars and result tables (rich), one function per
result. Commands in ``cli.py`` parse, call one function, and hand its result to one of these."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """A plain line (no markup guessing, no hard wrapping)."""
    console.print(text, highlight=False, soft_wrap=True)


def note(text: str, err: bool = False) -> None:
    (err_console if err else console).print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True)


def error_line(text: str, to: Console | None = None) -> None:
    """The one-line reason a failed command ends with (on stderr)."""
    (to or err_console).print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)


def rows_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    t = Table(title=title, show_header=False)
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


# ---- progress ----
class RateColumn(ProgressColumn):
    """Items per second since the task started."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} {self.unit}", style="progress.data.speed")


@contextmanager
def ingest_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar for URLs; yields a ``progress(done, total)`` callback."""
    with Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn("images/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("ingest", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def curate_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar over curate's steps; yields a ``progress(step, done, total)`` callback."""
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]curate[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tid = bar.add_task("starting", total=7)

        def update(step: str, done: int, total: int) -> None:
            bar.update(tid, description=step, completed=done, total=total)

        yield update


@contextmanager
def train_progress(starting: str) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """A progress bar over optimiser steps; yields a ``progress(step, total, metrics)`` callback."""
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, info=starting)

        def update(step: int, total: int, m: dict[str, float]) -> None:
            bar.update(
                task,
                completed=step,
                total=total,
                info=f"{m['train/samples_per_s']:.0f} samples/s  loss {m['train/loss']:.3f}",
            )

        yield update


# ---- one function per command's result ----
def ingest_result(r: Any) -> None:
    t = Table(title="ingest", show_header=False)
    t.add_row("URLs listed (unique)", f"{r.n_listed:,}")
    if r.n_duplicate_rows:
        t.add_row("rows repeating a listed URL", f"{r.n_duplicate_rows:,}")
    t.add_row("already in the catalog (skipped)", f"{r.n_already_seen:,}")
    t.add_row("fetched this run", f"{r.n_fetched:,}")
    t.add_row("success", f"{r.n_success:,}")
    t.add_row("failed", f"{r.n_failed:,}")
    t.add_row("downloaded", f"{r.bytes_downloaded / 1e6:,.1f} MB")
    t.add_row("time", f"{r.duration_s:.1f} s ({r.images_per_s:,.0f} images/s)")
    t.add_row("shards written", f"{len(r.shards)}")
    console.print(t)
    if r.failures:
        f = Table(title="failures by reason")
        f.add_column("reason")
        f.add_column("count", justify="right")
        for k, v in r.failures.items():
            f.add_row(str(k), f"{v:,}")
        console.print(f)
    if not r.new_work:
        console.print(
            "nothing new: every listed URL is already in the catalog (use --retry-failed to fetch past failures again)"
        )


def curate_result(res: Any) -> None:
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


def train_result(result: Any) -> None:
    rows_table(
        "train",
        [
            ("model", result.model_name),
            ("snapshot", result.snapshot_id),
            ("steps", f"{result.steps:,}"),
            ("final loss", f"{result.final_loss:.4f}"),
            ("throughput", f"{result.samples_per_s:,.1f} samples/s"),
            ("training time", f"{result.train_seconds:.1f} s"),
            ("checkpoint", str(result.checkpoint_dir)),
            ("MLflow run", str(result.run_id)),
            ("logged model", str(result.model_uri)),
        ]
        + (
            [(f"WiSE-FT {w.alpha:g} blend", f"{w.checkpoint_dir} (MLflow run {w.run_id})")]
            if (w := getattr(result, "wise_ft", None))
            else []
        ),
    )


def evaluation(out: Any, worst_classes: int) -> None:
    res = out.eval
    table = Table(title=f"evaluation of {res.checkpoint_dir.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(res.metrics.items()):
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    for zs in res.zeroshot:
        worst = ", ".join(f"{n} ({r:.2f})" for n, r, _ in zs.worst_classes(worst_classes))
        console.print(f"worst classes on {zs.dataset}: {worst}")
    for text in res.notes:
        console.print(f"[yellow]note:[/] {text}")
    console.print(f"reports: {res.report_dir}")
    if out.registry is not None:
        r = out.registry
        console.print(f"registered {r.name} version {r.version} as [bold]{r.alias}[/] ({r.decision.reason})")


def rebuilt(res: Any) -> None:
    rows = [
        ("catalog", str(res.path) + (f" (the old one kept as {res.backup.name})" if res.backup else "")),
        ("raw shards", str(res.raw_shards) + (f" (+ {res.external_shards} external)" if res.external_shards else "")),
        ("URLs", f"{res.urls} ({res.urls - res.failed_urls} ok, {res.failed_urls} failed)"),
        ("snapshots", str(res.snapshots)),
    ]
    rows_table("catalog rebuilt", rows)
    for what, why in res.left_out.items():
        note(f"left out {what}: {why}", err=True)


def export_result(model: str, res: Any) -> None:
    console.print(f"exported {model} to {res.out_dir} ({res.n_tensors} tensors); load it with")
    say(f"  {res.open_clip_command}")
    say(f"  {res.clip_benchmark_command}")


def comparison(comp: Any) -> None:
    from clipline.components.tracking.compare import comparison_table

    console.print(comparison_table(comp))
    console.print(f"chart: {comp.chart}")
    if comp.mlflow_run_id:
        console.print(f"logged to MLflow run {comp.mlflow_run_id}")


def demo_summary(rows: Sequence[tuple[str, str]], dir_flags: str, mlflow_uri: str, skipped: str | None) -> None:
    rows_table("clipline summary", rows)
    say(f"MLflow UI:  clipline {dir_flags} ui    (tracking URI {mlflow_uri})")
    say("Prefect UI: prefect server start   (then open http://127.0.0.1:4200)")
    if skipped:
        console.print(f"[bold]{skipped}[/]", highlight=False, soft_wrap=True)


def toy_web(toy: Any, seed: int, data_flag: str, eval_sets: Sequence[Any]) -> None:
    """What `clipline demo-web` serves, and how to point the pipeline at it."""
    from collections import Counter

    from clipline.components.demo.faults import INGEST_OUTCOME

    counts = Counter(it.fault for it in toy.items)
    table = Table(title=f"toy web: {len(toy.items)} URLs at {toy.base_url} (seed {seed})")
    table.add_column("fault")
    table.add_column("URLs", justify="right")
    table.add_column("a correct ingest")
    for fault, k in sorted(counts.items(), key=lambda kv: (kv[0] != "none", kv[0])):
        stores, what = INGEST_OUTCOME[fault]
        table.add_row(fault, str(k), ("stores it" if stores else "records a failure") + (f": {what}" if what else ""))
    console.print(table)
    say(f"URL list: {toy.url_list}  (columns url, caption, fault, color, shape)")
    say("ingest it with:")
    say(f"  clipline{data_flag} ingest {toy.url_list} --allow-host {toy.allow_host}")
    for es in eval_sets:
        say(
            f"eval set '{es.name}': {es.n_images} images of {len(es.labels)} combinations, classified among "
            f"{len(es.classnames)} names (chance {es.chance_acc1:.1%}):\n"
            f"  --dataset {es.data} --classnames {es.classnames_file} --templates {es.templates_file}"
        )
    say(f"the internal stand-in at {toy.internal_base_url} must stay unreachable; Ctrl-C to stop")


def triggered(t: Any) -> None:
    """A served deployment's run (``deploy.Triggered``): its state, then its summary artifact."""
    state = t.flow_run.state
    say(f"flow run {t.flow_run.name} ({t.flow_run.id}) of {t.deployment}: {state.name if state else 'unknown'}")
    if t.summary:
        say(t.summary)
