"""Compare registered model versions side by side: a table and a PNG chart on disk.

A comparison is read-only by default: it adds nothing to the tracking store, so calling it often
does not fill the experiment's run list. Asked to (``log_to_mlflow``, ``clipline compare
--log-run``), it logs the chart and table as artifacts of one new run (tag
``clipline.kind=compare``) in ``cfg.tracking.experiment``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipline.components.config import Config
from clipline.components.tracking.registry import RegistryError
from clipline.components.tracking.runs import client, ensure_experiment

TRAIN_TIME_METRICS = ("train/duration_s", "train/seconds", "train_time_s", "duration_s")
DATA_SIZE_KEYS = ("n_train", "data/n_train", "snapshot/n_train", "train/n_samples")


@dataclass
class VersionRow:
    version: str
    aliases: list[str]
    run_id: str | None
    snapshot_id: str | None
    n_train: int | None
    train_seconds: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    promotion_metric: str | None = None  # the primary metric its registration compared


@dataclass
class Comparison:
    name: str
    rows: list[VersionRow]
    metric_names: list[str]
    chart: Path | None
    table_json: Path | None
    mlflow_run_id: str | None


def _n_train(cfg: Config, run: Any, snapshot_id: str | None) -> int | None:
    for source in (run.data.params, run.data.metrics):
        for k in DATA_SIZE_KEYS:
            if k in source:
                try:
                    return int(float(source[k]))
                except ValueError:
                    pass
    if snapshot_id:
        manifest = cfg.snapshots_dir / snapshot_id / "manifest.json"
        if manifest.is_file():
            n = json.loads(manifest.read_text()).get("n_train")
            return int(n) if n is not None else None
    return None


def _train_seconds(run: Any) -> float | None:
    for k in TRAIN_TIME_METRICS:
        if k in run.data.metrics:
            return float(run.data.metrics[k])
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def collect_versions(cfg: Config, versions: Sequence[str] | None = None) -> list[VersionRow]:
    """Rows for the given versions (all versions of the registered model when None), oldest first."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = cfg.tracking.registered_model
    try:
        all_mv = c.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        raise RegistryError(f"cannot list versions of '{name}' in {cfg.mlflow_uri}: {e}") from e
    by_version = {str(mv.version): mv for mv in all_mv}
    if not by_version:
        raise RegistryError(f"registered model '{name}' has no versions in {cfg.mlflow_uri}: run `clipline run` first")
    if versions:
        wanted = []
        for v in versions:
            v = str(v).removeprefix("v")
            if not v.isdigit():
                try:
                    v = str(c.get_model_version_by_alias(name, v).version)
                except MlflowException as e:
                    raise RegistryError(f"'{v}' is neither a version number nor an alias of '{name}'") from e
            if v not in by_version:
                raise RegistryError(f"'{name}' has no version {v}; versions: {sorted(by_version, key=int)}")
            wanted.append(v)
    else:
        wanted = sorted(by_version, key=int)
    aliases: dict[str, list[str]] = {}
    for alias, v in (c.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for v in wanted:
        mv = by_version[v]
        run = c.get_run(mv.run_id) if mv.run_id else None
        snap = (mv.tags or {}).get("snapshot_id") or None
        rows.append(
            VersionRow(
                version=v,
                aliases=sorted(aliases.get(v, [])),
                run_id=mv.run_id,
                snapshot_id=snap,
                n_train=_n_train(cfg, run, snap) if run else None,
                train_seconds=_train_seconds(run) if run else None,
                metrics={
                    k: float(val)
                    for k, val in (run.data.metrics.items() if run else [])
                    if k.startswith(("zeroshot/", "retrieval/"))
                },
                promotion_metric=(mv.tags or {}).get("promotion.metric") or None,
            )
        )
    return rows


def default_metrics(cfg: Config, rows: Sequence[VersionRow]) -> list[str]:
    """The primary metric first (``evaluate.primary_metric``, or with ``auto`` the one the newest
    version's registration compared), then every zero-shot top-1 and retrieval R@5 any row has."""
    present = sorted({k for r in rows for k in r.metrics})
    primary = cfg.evaluate.primary_metric
    if primary == "auto":
        primary = next(
            (r.promotion_metric for r in sorted(rows, key=lambda r: -int(r.version)) if r.promotion_metric), None
        )
    chosen = [primary] if primary and any(primary in r.metrics for r in rows) else []
    chosen += [k for k in present if (k.endswith("/acc1") or k.endswith("_R5")) and k not in chosen]
    return chosen or present[:6]


def compare_versions(
    cfg: Config,
    versions: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    out_dir: Path | None = None,
    log_to_mlflow: bool = False,
) -> Comparison:
    """Collect the versions and draw the chart of ``metrics`` (PNG) beside the table (JSON) in
    ``out_dir`` (default ``<reports>/compare``). With ``log_to_mlflow``, also log both to a new
    MLflow run tagged ``clipline.kind=compare`` in ``cfg.tracking.experiment``; by default nothing
    is written to the tracking store."""
    rows = collect_versions(cfg, versions)
    names = list(metrics) if metrics else default_metrics(cfg, rows)
    out = Path(out_dir) if out_dir else cfg.reports_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    label = "-".join(f"v{r.version}" for r in rows)
    chart = compare_chart_png(
        [f"v{r.version}" for r in rows],
        {m: [r.metrics.get(m) for r in rows] for m in names},
        out / f"compare_{label}.png",
        title=f"{cfg.tracking.registered_model}: {len(rows)} version(s) compared",
    )
    table = out / f"compare_{label}.json"
    table.write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    run_id = None
    if log_to_mlflow:
        c = client(cfg)
        exp_id = ensure_experiment(cfg)
        run = c.create_run(
            exp_id,
            run_name=f"compare {label}",
            tags={"clipline.kind": "compare", "versions": ",".join(r.version for r in rows)},
        )
        run_id = run.info.run_id
        c.log_artifact(run_id, str(chart), "compare")
        c.log_artifact(run_id, str(table), "compare")
        c.set_terminated(run_id)
    return Comparison(
        name=cfg.tracking.registered_model,
        rows=rows,
        metric_names=names,
        chart=chart,
        table_json=table,
        mlflow_run_id=run_id,
    )


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _fit_suptitle(fig: Any, title: str, fontsize: float = 12) -> Any:
    """A figure title wrapped onto as many lines as it needs to stay inside the figure's width."""
    import textwrap

    t = fig.suptitle(title, fontsize=fontsize)
    avail = fig.bbox.width * 0.94
    renderer = fig.canvas.get_renderer()
    width = t.get_window_extent(renderer).width
    if width > avail:
        chars = max(8, int(len(title) * avail / width))
        t.set_text("\n".join(textwrap.wrap(title, chars, break_long_words=True, break_on_hyphens=False)))
        while t.get_window_extent(renderer).width > avail and chars > 8:
            chars -= 2
            t.set_text("\n".join(textwrap.wrap(title, chars, break_long_words=True, break_on_hyphens=False)))
    return t


def compare_chart_png(
    versions: Sequence[str], series: Mapping[str, Sequence[float | None]], path: str | Path, title: str = ""
) -> Path:
    """Grouped bars: one group per version, one bar per metric (missing values left out); the
    metric names are in the legend, the title is wrapped to fit the image."""
    import numpy as np

    plt = _plt()
    n_v, n_m = len(versions), max(1, len(series))
    width = 0.8 / n_m
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * n_v * max(1, n_m) * 0.6 + 2), 4))
    x = np.arange(n_v)
    for j, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (j - (n_m - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, versions)
    ax.set_xlabel("model version")
    ax.set_ylim(0, 1.1)
    _fit_suptitle(fig, title or "metrics by model version")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_table(comp: Comparison) -> Any:
    """A rich Table: one column per version; rows: aliases, snapshot, data size, training time, metrics."""
    from rich.table import Table

    t = Table(title=f"{comp.name}: {len(comp.rows)} version(s)")
    t.add_column("", style="bold")
    for r in comp.rows:
        t.add_column(f"v{r.version}", justify="right")
    t.add_row("aliases", *[",".join(r.aliases) or "-" for r in comp.rows])
    t.add_row("snapshot", *[(r.snapshot_id or "-")[:12] for r in comp.rows])
    t.add_row("train images", *["-" if r.n_train is None else f"{r.n_train:,}" for r in comp.rows])
    t.add_row("train time", *["-" if r.train_seconds is None else f"{r.train_seconds:.0f} s" for r in comp.rows])
    all_metrics = comp.metric_names + sorted({k for r in comp.rows for k in r.metrics} - set(comp.metric_names))
    for m in all_metrics:
        vals = [r.metrics.get(m) for r in comp.rows]
        best = max((v for v in vals if v is not None), default=None)
        cells = [
            "-" if v is None else (f"[green]{v:.4f}[/]" if v == best and len(comp.rows) > 1 else f"{v:.4f}")
            for v in vals
        ]
        t.add_row(m, *cells)
    return t
