"""The curate stage, whole, on metadata-only raw shards: rows/s at 100k and 1M rows (issues 3, 18).

Generates raw shards (RAW_SCHEMA; captions, sizes, sha256, pHash; no image bytes) at each size with
planted problems (`clipline.components.curate.synthetic`): 3% failed downloads, 4% too-short
captions, 3% small images, 1% non-English captions, 4% repeated URLs, 4% repeated sha256, 5%
near-duplicate pHashes (1-6 bits flipped), in two caption mixes (--captions):

- web: captions like a web crawl's (62% printable ASCII; English with typographic quotes, accents,
  HTML entities, mojibake and emoji; 23% other languages in Latin, Cyrillic, CJK, Arabic, Hebrew,
  Greek, Devanagari and Thai script; shares and their reasons in the generator's docstring). About
  a third of the captions go through the caption normaliser (ftfy, NFC, whitespace), and the
  language rule scores many captions in full.
- ascii: English template captions, all printable ASCII: the normaliser never runs and the
  language rule settles nearly every caption on its fast path. Kept for comparison with earlier
  figures; it flatters the stage.

Each run is one `curate(cfg)` call, as `clipline curate` makes it, in a fresh process with DuckDB on
2 threads and --memory-limit, on a fresh copy of the shards. The MLflow store (SQLite) exists
before the runs, as it does for a user after the first command; every run logs into it.

What the figures cover:
- "whole stage" (the headline): the wall time of the `curate()` call: open the catalog, setup
  (DuckDB's first Arrow registration, the compiled kernels loaded from numba's cache), read the
  shards, normalise captions, SQL rules, language, decontamination, exact and near-duplicate
  deduplication, split and content hash, write the snapshot, report, manifest and catalog
  record, and the MLflow run. Not in it: starting Python and importing clipline, DuckDB and MLflow
  (printed as "outside"; a fixed cost of any `clipline` command, not of the rows).
- sub-windows, each printed with what it leaves out: the whole stage without the MLflow run;
  "rules + exact dedup" (read, normalisation, SQL rules, language, the exact groups and the
  keep-first pass: the headline of issue 3, which left out setup, the near-duplicate pair
  search, split and content hash, writing, report and MLflow); the same without the language
  step; the near-duplicate pair search alone.
- per step: wall and CPU seconds of this process for every step `curate()` times.
- peak RSS: the whole curate process (VmHWM). The baseline is the peak of a separate process that
  curates 200 rows (the interpreter, libraries, compiled kernels, langid's tables, DuckDB: what a
  run holds whatever its size); "above baseline" = peak - baseline, to compare with the limit.
- load: the 1-minute load average of the machine (cores are shared) at the start and end of a run.

    python benchmarks/curate_scaling.py                          # 100k and 1M rows, both mixes, 3 runs each
    python benchmarks/curate_scaling.py --sizes 100000 --repeat 1   # quick
    python benchmarks/curate_scaling.py --full                   # adds 4M rows (several minutes)

Each size up to 1M rows runs --repeat times (default 3) per mix; the run with the median whole-stage
time is the one reported (its steps, sub-windows and memory), and every run's whole-stage figure is
printed beside it: a single run is a poor figure on shared cores, whose speed drifts by up to half
from one minute to the next. 4M rows runs once.

The last line is the headline: `curate_rows_per_s_1M: N`, the whole stage at 1M rows (or the
largest size run, named by its row count) on the web mix (or the only mix run), median run. The
line above it gives the same figure for the other mix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READ = "read metadata and apply rules"
LANG = "language"
DEDUP = "deduplication"
PAIRS = "deduplication: phash pair search"
MIXES = ("web", "ascii")


def rules_exact(tm: dict, language: bool = True) -> float:
    """Seconds of rules + exact dedup (see the module docstring) from a timings dict."""
    return tm.get(READ, 0) + (tm.get(LANG, 0) if language else 0) + tm.get(DEDUP, 0) - tm.get(PAIRS, 0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM). Not ru_maxrss: Linux carries the parent's
    high-water mark across the vfork + exec that starts this child, and the parent held the
    generated shards."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline() -> None:
    """Child process: peak RSS of a curate() of 200 rows, i.e. what a run holds whatever its size:
    the interpreter, clipline's libraries, the compiled kernels (compiled here once per machine, so
    that no timed run pays for it), langid's tables and DuckDB."""
    from clipline.components.config import load_config
    from clipline.components.curate import curate, synthetic

    with tempfile.TemporaryDirectory(prefix="curate-bench-baseline-") as tmp:
        (Path(tmp) / "raw").mkdir()
        synthetic.register(Path(tmp) / "catalog.duckdb", Path(tmp) / "raw", 200, 200, captions="web")
        curate(load_config(None, {"data_dir": Path(tmp), "curate": {"duckdb_threads": 2}}), track=False)
    print(json.dumps({"baseline_mb": peak_rss_mb()}))


def _cfg(data_dir: str, memory_limit: str, language: bool, store: str):
    from clipline.components.config import load_config

    return load_config(
        None,
        {
            "data_dir": Path(data_dir),
            "tracking": {"tracking_uri": f"sqlite:///{store}/mlflow.db"},
            "curate": {
                "duckdb_memory_limit": memory_limit,
                "duckdb_threads": 2,
                "language": "en" if language else None,
                "contact_sheet_examples": 4,
            },
        },
    )


def make_store(store: str) -> None:
    """Child process: create the MLflow store and experiment the runs log into (artifacts under
    ``store``), as a user's first command does; its one-off cost is not part of any run."""
    from clipline.components.tracking.runs import ensure_experiment

    ensure_experiment(_cfg(store, "1GB", True, store))
    print(json.dumps({"store": store}))


def run_one(data_dir: str, memory_limit: str, language: bool, store: str) -> None:
    """Child process: run the stage once, print a JSON line with timings and peak memory."""
    t_imp = time.perf_counter()
    import resource

    import mlflow  # noqa: F401 - imported before the window, as `clipline curate` has by then

    from clipline.components.curate import curate
    from clipline.components.curate import report as report_mod

    imports_s = time.perf_counter() - t_imp
    cfg = _cfg(data_dir, memory_limit, language, store)
    tracked = {}
    log_to_mlflow = report_mod.log_to_mlflow

    def timed_log(*a, **k):  # how long the MLflow run takes, inside the curate() call
        t, c = time.perf_counter(), time.process_time()
        try:
            return log_to_mlflow(*a, **k)
        finally:
            tracked.update(wall=time.perf_counter() - t, cpu=time.process_time() - c)

    report_mod.log_to_mlflow = timed_log
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = curate(cfg)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    if not res.new or not res.mlflow_run_id:
        sys.exit(f"curate made no new snapshot or no MLflow run (new={res.new}, run={res.mlflow_run_id})")
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime,
                "track": tracked.get("wall", 0.0),
                "track_cpu": tracked.get("cpu", 0.0),
                "imports": imports_s,
                "load0": load0,
                "load": os.getloadavg()[0],
                "peak_mb": peak_rss_mb(),
                "timings": res.timings,
                "cpu_timings": res.cpu_timings,
                "counts": res.counts,
                "n_rows": res.n_rows,
                "spilled_mb": res.manifest.get("duckdb_spilled_bytes_max", 0) / 2**20,
                "visited": res.manifest.get("dedup_rows_visited"),
            }
        )
    )


def _child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def caption_shares(raw: Path) -> tuple[float, float]:
    """Shares of the generated captions that are not printable ASCII, and that the normaliser
    rewrites or has to look at (not already in normal form, see normalize.MAYBE_DIRTY)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from clipline.components.curate.normalize import MAYBE_DIRTY

    n = non_ascii = dirty = 0
    for path in sorted(raw.glob("*.parquet")):
        cap = pq.read_table(path, columns=["caption"]).column("caption")
        n += len(cap)
        non_ascii += len(cap) - (pc.sum(pc.string_is_ascii(cap)).as_py() or 0)
        dirty += pc.sum(pc.match_substring_regex(cap, MAYBE_DIRTY)).as_py() or 0
    return non_ascii / max(n, 1), dirty / max(n, 1)


def rate(n: int, s: float) -> str:
    return f"{n / max(s, 1e-9):,.0f} rows/s"


def report(r: dict, baseline: float, memory_limit: str) -> None:
    n, tm, cp = r["n"], r["timings"], r["cpu_timings"]
    runs = r["all_wall"]
    print(
        f"\n== {n:,} rows, {r['mix']} captions ({r['non_ascii']:.0%} not printable ASCII, {r['dirty']:.0%} through "
        f"the normaliser; generated in {r['gen_s']:.1f} s; {len(runs)} run(s), the median whole stage shown; "
        f"load {r['load0']:.1f} -> {r['load']:.1f} on {os.cpu_count()} cores) =="
    )

    def part_of(k: str) -> str | None:  # "deduplication: phash pair search" is a part of step "deduplication"
        head = k.split(":")[0]
        return head if head != k and head in tm else None

    print(f"  {'step':<44s} {'wall s':>8s} {'CPU s':>8s} {'rows/s (wall)':>14s}")
    for k in [k for k in tm if part_of(k) is None]:  # a step, then the parts of it timed on their own
        for part in [k] + [p for p in tm if part_of(p) == k]:
            name = part if part == k else "  " + part
            per_s = f"{n / tm[part]:14,.0f}" if tm[part] >= 0.01 else f"{'-':>14s}"  # timings are rounded to ms
            print(f"  {name:<44s} {tm[part]:8.2f} {cp.get(part, 0):8.2f} {per_s}")
    print(f"  {'MLflow run (after the steps)':<44s} {r['track']:8.2f} {r['track_cpu']:8.2f}")
    print(
        f"  whole stage, curate() (catalog, setup, read, normalise, SQL rules, language, decontamination, exact and "
        f"near dedup, split and hash, write snapshot, report, manifest, catalog record, MLflow run): "
        f"{r['wall']:.2f} s wall, {r['cpu']:.2f} CPU-s -> {rate(n, r['wall'])}"
    )
    if len(runs) > 1:
        print("  whole stage in each run: " + ", ".join(rate(n, x) for x in runs) + f" (median {rate(n, r['wall'])})")
    setup = next((k for k in tm if k.startswith("setup")), None)
    print("  sub-windows (each leaves out what it names):")
    print(f"    without the MLflow run: {r['wall'] - r['track']:.2f} s -> {rate(n, r['wall'] - r['track'])}")
    if setup:
        print(
            f"    without the MLflow run and setup ({tm[setup]:.2f} s): {r['wall'] - r['track'] - tm[setup]:.2f} s -> "
            f"{rate(n, r['wall'] - r['track'] - tm[setup])}"
        )
    re_w, re_c = rules_exact(tm), rules_exact(cp)
    print(
        f"    rules + exact dedup (read, normalise, SQL rules, language, exact groups, keep-first; without setup, "
        f"near-duplicate pair search, decontamination, split and hash, writing, report, MLflow run): "
        f"{re_w:.2f} s wall, {re_c:.2f} CPU-s -> {rate(n, re_w)}"
    )
    print(
        f"    the same without the language step: {rules_exact(tm, False):.2f} s -> {rate(n, rules_exact(tm, False))}"
    )
    print(
        f"    near-duplicate pair search alone: {tm.get(PAIRS, 0):.2f} s; rows visited by keep-first: {r['visited']:,}"
    )
    print(
        f"  outside every figure: starting Python and importing clipline, DuckDB and MLflow, {r['imports']:.2f} s "
        f"of imports (fixed per command)"
    )
    print(
        f"  peak RSS of the curate process: {r['peak_mb']:.0f} MB = baseline {baseline:.0f} MB + "
        f"{r['peak_mb'] - baseline:.0f} MB (DuckDB limit {memory_limit}; highest of the runs: "
        f"+{r['peak_all_mb'] - baseline:.0f} MB); DuckDB spilled up to {r['spilled_mb']:.0f} MB"
    )
    print(
        f"  kept {r['counts']['kept']:,} of {r['counts']['input']:,}; dropped "
        + ", ".join(f"{k}={v:,}" for k, v in r["counts"]["dropped"].items() if v)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--full", action="store_true", help="add 4,000,000 rows")
    ap.add_argument(
        "--captions",
        nargs="+",
        choices=MIXES,
        default=list(MIXES),
        help="caption mixes to run (default both; the headline is the web mix's)",
    )
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--no-language", action="store_true", help="switch the language rule off")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per size and mix up to 1M rows (4M runs once); the run with the median whole-stage "
        "time is reported (default 3: this machine's speed drifts by up to half between runs)",
    )
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_store", help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._baseline:
        run_baseline()
        return
    if args._child:
        run_one(args._child, args.memory_limit, not args.no_language, args._store)
        return
    if args._store:
        make_store(args._store)
        return
    sizes = sorted(set(args.sizes + ([4_000_000] if args.full else [])))
    mixes = [m for m in MIXES if m in args.captions]
    from clipline.components.curate import synthetic

    baseline = _child(["--_baseline"])["baseline_mb"]  # also compiles the kernels once, if not cached
    print(
        f"baseline: peak RSS of a curate() of 200 rows (libraries, compiled kernels, langid tables, DuckDB): "
        f"{baseline:.0f} MB"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as top:
        store = str(Path(top) / "mlflow")
        _child(["--_store", store])
        for n in sizes:
            for mix in mixes:
                repeat = max(1, args.repeat if n <= 1_000_000 else 1)
                tmp = Path(top) / f"{n}-{mix}"
                data = tmp / "data"
                (data / "raw").mkdir(parents=True)
                t = time.perf_counter()
                synthetic.register(data / "catalog.duckdb", data / "raw", n, args.shard_rows, captions=mix)
                gen_s = time.perf_counter() - t
                non_ascii, dirty = caption_shares(data / "raw")
                runs = []
                for _ in range(repeat):  # each run on a fresh copy: a second curate of the same shards has nothing new
                    run_dir = tmp / f"run{len(runs)}"
                    shutil.copytree(data, run_dir)
                    cmd = ["--_child", str(run_dir), "--_store", store, "--memory-limit", args.memory_limit]
                    runs.append(_child(cmd + (["--no-language"] if args.no_language else [])))
                    shutil.rmtree(run_dir)
                shutil.rmtree(tmp)
                # the run with the median whole-stage time stands for this size; every run's figure is printed
                runs_sorted = sorted(runs, key=lambda x: x["wall"])
                r = runs_sorted[len(runs) // 2]  # an even count takes the slower of the middle two
                r.update(
                    n=n,
                    mix=mix,
                    gen_s=gen_s,
                    non_ascii=non_ascii,
                    dirty=dirty,
                    all_wall=[x["wall"] for x in runs],
                    peak_all_mb=max(x["peak_mb"] for x in runs),
                )
                results.append(r)
                report(r, baseline, args.memory_limit)
    print()
    for mix in mixes:
        rs = [r for r in results if r["mix"] == mix]
        if len(rs) >= 2:
            x = np.log([r["n"] for r in rs])
            n0, n1 = rs[0]["n"], rs[-1]["n"]
            nlogn = math.log(n1 * math.log(n1) / (n0 * math.log(n0))) / math.log(n1 / n0)
            slope = float(np.polyfit(x, np.log([r["wall"] for r in rs]), 1)[0])
            print(
                f"growth exponent of the whole stage's wall time with rows, {mix} captions: {slope:.2f} "
                f"(n log n over this range: {nlogn:.2f})"
            )
    top_n = 1_000_000 if any(r["n"] == 1_000_000 for r in results) else max(r["n"] for r in results)
    name = "1M" if top_n == 1_000_000 else str(top_n)
    at_top = {r["mix"]: r for r in results if r["n"] == top_n}
    head = at_top.get("web") or at_top[mixes[0]]
    print(
        f"whole stage at {top_n:,} rows, median run: "
        + "; ".join(
            f"{mix} captions {rate(top_n, r['wall'])}" + (" (the headline)" if r is head else "")
            for mix, r in at_top.items()
        )
    )
    for mix, r in at_top.items():
        if r is not head:
            print(f"curate_rows_per_s_{name}_{mix}: {top_n / r['wall']:.0f}")
    print(f"curate_rows_per_s_{name}: {top_n / head['wall']:.0f}")


if __name__ == "__main__":
    main()
