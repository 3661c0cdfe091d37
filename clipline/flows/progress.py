"""Rich progress bars and result tables for the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


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
def ingest_progress(console: Console) -> Iterator[Callable[[int, int], None]]:
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


def print_ingest_result(console: Console, r) -> None:
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
