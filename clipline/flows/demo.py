"""`clipline demo`, the main job: serve the toy web, run the `pipeline` flow on it with the demo's
training recipe, and write the summary (``<data-dir>/reports/demo_summary.json``).

- Recipe: ``demo.train`` supplies every [train] setting the config file, the environment or a flag
  did not set (those win).
- The toy web's ``timeout`` fault hangs for a minute: the demo gives one download 4 s to answer
  and 8 s in all, so a run is brisk.
- A rerun on the same data dir serves the same URLs (the ports recorded there), so it fetches and
  trains nothing and says so; if a recorded port is taken, it serves on a new one and says that its
  URLs are new to the catalog.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipline.components.config import Config

#: the demo's download deadlines (s): one read, one download with its retries
READ_TIMEOUT_S = 4.0
TOTAL_TIMEOUT_S = 8.0


@dataclass
class DemoRun:
    rows: list[tuple[str, str]]  # the summary table: the pipeline's rows, chance level, demo time
    summary: dict[str, Any]  # what demo_summary.json holds
    skipped: str | None  # why nothing was trained (a rerun with nothing new)


def with_demo_recipe(cfg: Config) -> tuple[Config, dict[str, Any]]:
    """``cfg`` with the demo's download deadlines and training recipe, and the recipe values used
    (those the user's [train] settings did not override)."""
    recipe = {k: v for k, v in cfg.demo.train.items() if k not in cfg.train.model_fields_set}
    train = cfg.train.model_copy(update=recipe)  # each value was validated as a [train] setting (DemoConfig)
    ingest = cfg.ingest.model_copy(
        update={
            "read_timeout": min(cfg.ingest.read_timeout, READ_TIMEOUT_S),
            "total_timeout": min(cfg.ingest.total_timeout, TOTAL_TIMEOUT_S),
        }
    )
    return cfg.model_copy(update={"train": train, "ingest": ingest}), recipe


def _toy_web(cfg: Config, stack: contextlib.ExitStack, note: Callable[[str], None]) -> Any:
    """The toy web, on this data dir's recorded ports when there are some and they are free."""
    from clipline.components.demo import serve_toy_web
    from clipline.components.demo.server import recorded_ports

    web_dir = cfg.data_dir / "toyweb"
    ports = recorded_ports(web_dir) if cfg.demo.port == 0 and cfg.demo.reuse_port else None
    if ports is not None:
        try:
            # a rerun fetches few or no URLs: draw pictures on request instead of all ahead of time
            again = cfg.demo.model_copy(update={"port": ports[0], "internal_port": ports[1], "warm_cache": False})
            return stack.enter_context(serve_toy_web(again, web_dir))
        except OSError as e:
            note(
                f"the port this data dir's toy web used before ({ports[0]}) is not free ({e.__cause__ or e}); "
                "serving on a new port, so its URLs are new to the catalog and are fetched again"
            )
    return stack.enter_context(serve_toy_web(cfg.demo, web_dir))


def run_demo(
    cfg: Config,
    status: Callable[[str], Any] | None = None,
    say: Callable[[str], None] = print,
    note: Callable[[str], None] = print,
) -> DemoRun:
    """Run the demo on ``cfg`` (see the module docstring). ``status(text)``: a context manager shown
    while the eval sets are written; ``say(text)``/``note(text)``: how to tell the user what is
    served / something unexpected. Raises OSError when the toy web cannot be served."""
    from clipline.components.demo import write_heldout_set, write_seen_set
    from clipline.flows.pipeline import pipeline_flow, summary_rows

    t0 = time.perf_counter()
    cfg, recipe = with_demo_recipe(cfg)
    eval_dir = cfg.data_dir / "eval"
    with status("writing the held-out and seen-combination evaluation sets") if status else contextlib.nullcontext():
        heldout = write_heldout_set(eval_dir, seed=cfg.demo.seed)
        seen = write_seen_set(eval_dir, seed=cfg.demo.seed)
    with contextlib.ExitStack() as stack:
        web = _toy_web(cfg, stack, note)
        cfg.ingest.allow_hosts = [*cfg.ingest.allow_hosts, web.allow_host]
        say(f"toy web: {len(web.items):,} URLs at {web.base_url} (list: {web.url_list})")
        result = pipeline_flow(
            [str(web.url_list)], cfg, eval_sets=[str(heldout.data), str(seen.data)], decontaminate=str(heldout.data)
        )
    seconds = time.perf_counter() - t0
    pipeline_rows = summary_rows(result)
    rows = [
        *pipeline_rows,
        ("chance level", f"{heldout.chance_acc1:.3f} (1 of {len(heldout.classnames)} colour x shape names)"),
        ("held-out pairs", f"{', '.join(heldout.labels)} (drawn from demo.seed = {cfg.demo.seed})"),
        ("demo time", f"{seconds:.0f} s"),
    ]
    metrics = result.evaluation.eval.metrics if result.evaluation is not None else {}
    reg = result.evaluation.registry if result.evaluation is not None else None
    summary = {
        "seconds": round(seconds, 1),
        "skipped": result.skipped,
        "chance_acc1": heldout.chance_acc1,
        "seed": cfg.demo.seed,
        "heldout_pairs": list(heldout.labels),
        "heldout_acc1": metrics.get(f"zeroshot/{heldout.name}/acc1"),
        "seen_acc1": metrics.get(f"zeroshot/{seen.name}/acc1"),
        "metrics": metrics,
        "rows": pipeline_rows,
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
        "model_version": None if reg is None else {"name": reg.name, "version": reg.version, "alias": reg.alias},
    }
    cfg.reports_dir.mkdir(parents=True, exist_ok=True)
    (cfg.reports_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return DemoRun(rows=rows, summary=summary, skipped=result.skipped)


@contextlib.contextmanager
def toy_web_by_hand(cfg: Config, out_dir: Path, eval_sets: bool) -> Iterator[tuple[Any, list[Any]]]:
    """`clipline demo-web`: the toy web served from ``out_dir`` (its URL list there), with the
    held-out and seen evaluation sets under ``out_dir/eval`` when ``eval_sets``; yields (web, sets).
    Raises OSError naming what to do when ``out_dir`` cannot be written or the port is taken."""
    from clipline.components.demo import serve_toy_web, write_heldout_set, write_seen_set

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output directory {out_dir}: {e}; give a writable --out") from e
    with serve_toy_web(cfg.demo, out_dir) as web:
        sets = []
        if eval_sets:
            sets = [
                write_heldout_set(out_dir / "eval", seed=cfg.demo.seed),
                write_seen_set(out_dir / "eval", seed=cfg.demo.seed),
            ]
        yield web, sets
