"""Scaling of the curate stage on metadata-only raw shards (issue 3).

Generates raw shards (RAW_SCHEMA; captions, sizes, sha256, pHash; no image bytes) at each size with
planted problems (`clipline.components.curate.synthetic`): 3% failed downloads, 4% too-short
captions, 3% small images, 1% non-English captions, 4% repeated URLs, 4% repeated sha256, 5%
near-duplicate pHashes (1-6 bits flipped). Each size runs the whole stage (`curate(cfg)`, default
rules, language rule on) in a fresh subprocess with DuckDB on 2 threads and --memory-limit, and
reports per step wall and CPU seconds, rows/s, the peak resident memory of the process, and the
growth exponent of time with rows (least squares on log t vs log n).

What the figures cover:
- "rules + exact dedup" (the headline) = step "read metadata and apply rules" (Parquet read,
  caption normalisation, every SQL rule of rules.sql) + step "language" (langid on every caption
  that survived the SQL rules; the rule is on by default, so it is counted) + step
  "deduplication" minus its "phash pair search" part (the exact groups on URL, key, sha256,
  caption+sha256 and pHash: hashes, repeat pass, candidate fetch, and the keep-first pass). The same figure without the language step is
  printed too, for comparison with earlier measurements; it is not the headline.
  Not in it: the "setup" entry, the once-per-process work done before the steps (DuckDB's first
  Arrow registration imports pandas; the compiled kernels load from numba's cache), printed on
  its own line; it does not grow with rows.
- "near-duplicate pair search": the banded pHash pair search alone.
- peak RSS: the whole curate process (VmHWM). The Python baseline is measured in a separate
  process that imports clipline, loads the compiled kernels (numba) and langid's tables and opens
  DuckDB, and does nothing else; "above baseline" = peak - baseline, to compare with the limit.
- load: the 1-minute load average of the machine (cores are shared) at the start and end of a run.

    python benchmarks/curate_scaling.py                 # 100k and 1M rows
    python benchmarks/curate_scaling.py --sizes 100000 --repeat 1  # quick
    python benchmarks/curate_scaling.py --full          # adds 4M rows (several minutes)

Each size up to 1M rows runs --repeat times (default 3), every run in a fresh process on a fresh copy
of the same generated shards; the run with the median rules + exact dedup time is the one reported
(its steps, memory and rows/s), and every run's rules + exact dedup figure is printed beside it. A
single run is a poor figure on shared cores: this machine's speed drifts by up to half from one
minute to the next. 4M rows runs once.

The headline (last line) is rules + exact dedup throughput at 1M rows (or the largest size run), of
the median run.
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
    """Child process: RSS after imports and warming the compiled kernels, with DuckDB open."""
    import duckdb
    import pyarrow as pa

    from clipline.components.curate import curate  # noqa: F401 - the imports curate makes
    from clipline.components.curate import dedup, language

    language.other_language_mask_arrow(pa.array(["a photo of a cat", "un chat noir"]), "en", 0.9)
    dedup.keep_first_codes(dedup.DedupInput(*(np.zeros(3, bool), *[np.arange(3)] * 5, np.zeros((0, 2), np.int64))),
                           dedup.DedupOptions())
    con = duckdb.connect()
    con.execute("SELECT 1").fetchall()
    print(json.dumps({"baseline_mb": peak_rss_mb()}))


def run_one(data_dir: str, memory_limit: str, language: bool) -> None:
    """Child process: run the stage once, print a JSON line with timings and peak memory."""
    import resource

    from clipline.components.config import load_config
    from clipline.components.curate import curate

    cfg = load_config(None, {"data_dir": Path(data_dir), "curate": {
        "duckdb_memory_limit": memory_limit, "duckdb_threads": 2, "language": "en" if language else None,
        "contact_sheet_examples": 4}})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = curate(cfg, track=False)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "load0": load0, "load": os.getloadavg()[0],
                      "peak_mb": peak_rss_mb(), "timings": res.timings, "cpu_timings": res.cpu_timings,
                      "counts": res.counts, "n_rows": res.n_rows,
                      "spilled_mb": res.manifest.get("duckdb_spilled_bytes_max", 0) / 2**20,
                      "visited": res.manifest.get("dedup_rows_visited")}))


def _child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--full", action="store_true", help="add 4,000,000 rows")
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--no-language", action="store_true", help="switch the language rule off")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per size up to 1M rows (4M runs once); the run with the median rules + exact "
                         "dedup time is reported (default 3: this machine's speed drifts by up to half between runs)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._baseline:
        run_baseline()
        return
    if args._child:
        run_one(args._child, args.memory_limit, not args.no_language)
        return
    sizes = sorted(set(args.sizes + ([4_000_000] if args.full else [])))
    from clipline.components.curate import synthetic

    baseline = _child(["--_baseline"])["baseline_mb"]  # also compiles the kernels once, if not cached
    print(f"Python baseline (imports, compiled kernels, langid tables, DuckDB open): {baseline:.0f} MB RSS")
    results = []
    for n in sizes:
        repeat = max(1, args.repeat if n <= 1_000_000 else 1)
        with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
            data = Path(tmp) / "data"
            (data / "raw").mkdir(parents=True)
            t = time.perf_counter()
            synthetic.register(data / "catalog.duckdb", data / "raw", n, args.shard_rows)
            gen_s = time.perf_counter() - t
            runs = []
            for _ in range(repeat):  # each run on a fresh copy: a second curate of the same shards has nothing new
                run_dir = Path(tmp) / f"run{len(runs)}"
                shutil.copytree(data, run_dir)
                cmd = ["--_child", str(run_dir), "--memory-limit", args.memory_limit]
                runs.append(_child(cmd + (["--no-language"] if args.no_language else [])))
                shutil.rmtree(run_dir)
        # the run with the median rules + exact time stands for this size; every run's figure is printed
        runs_sorted = sorted(runs, key=lambda r: rules_exact(r["timings"]))
        r = runs_sorted[len(runs) // 2]  # an even count takes the slower of the middle two
        r["n"], r["gen_s"], r["all_rules_exact"] = n, gen_s, [rules_exact(x["timings"]) for x in runs]
        r["peak_all_mb"] = max(x["peak_mb"] for x in runs)
        results.append(r)
        tm, cp = r["timings"], r["cpu_timings"]
        print(f"\n== {n:,} rows (generated in {gen_s:.1f} s; {len(runs)} run(s), the median one shown; load "
              f"{r['load0']:.1f} -> {r['load']:.1f} on {os.cpu_count()} cores) ==")
        print(f"  {'step':<40s} {'wall s':>8s} {'CPU s':>8s} {'rows/s (wall)':>14s}")
        for k, v in tm.items():
            print(f"  {k:<40s} {v:8.2f} {cp.get(k, 0):8.2f} {n / max(v, 1e-9):14,.0f}")
        print(f"  {'whole stage':<40s} {r['wall']:8.2f} {r['cpu']:8.2f} {n / r['wall']:14,.0f}")
        re_w, re_c = rules_exact(tm), rules_exact(cp)
        print(f"  rules + exact dedup (read, normalise, SQL rules, language, exact groups, keep-first): "
              f"{re_w:.2f} s wall, {re_c:.2f} CPU-s -> {n / re_w:,.0f} rows/s")
        if len(runs) > 1:
            print(f"  rules + exact dedup in each run (rows/s): "
                  + ", ".join(f"{n / x:,.0f}" for x in r["all_rules_exact"]) + f" (median {n / re_w:,.0f})")
        setup = next((k for k in tm if k.startswith("setup")), None)
        if setup:
            print(f"  not in it: {setup}: {tm[setup]:.2f} s wall, {cp.get(setup, 0):.2f} CPU-s")
        print(f"  the same without the language step: {rules_exact(tm, False):.2f} s -> "
              f"{n / rules_exact(tm, False):,.0f} rows/s (not the headline)")
        print(f"  near-duplicate pair search: {tm.get(PAIRS, 0):.2f} s; rows visited by keep-first: {r['visited']:,}")
        print(f"  peak RSS of the curate process: {r['peak_mb']:.0f} MB = baseline {baseline:.0f} MB + "
              f"{r['peak_mb'] - baseline:.0f} MB (DuckDB limit {args.memory_limit}; highest of the runs: "
              f"+{r['peak_all_mb'] - baseline:.0f} MB); DuckDB spilled up to {r['spilled_mb']:.0f} MB")
        print(f"  kept {r['counts']['kept']:,} of {r['counts']['input']:,}; dropped "
              + ", ".join(f"{k}={v:,}" for k, v in r["counts"]["dropped"].items() if v))
    if len(results) >= 2:
        x = np.log([r["n"] for r in results])
        nlogn = math.log(results[-1]["n"] * math.log(results[-1]["n"]) / (results[0]["n"] * math.log(results[0]["n"]))) / \
            math.log(results[-1]["n"] / results[0]["n"])
        for name, ys in (("whole stage", [r["wall"] for r in results]),
                         ("rules + exact dedup", [rules_exact(r["timings"]) for r in results])):
            slope = float(np.polyfit(x, np.log(ys), 1)[0])
            print(f"growth exponent of {name} wall time with rows: {slope:.2f} (n log n over this range: {nlogn:.2f})")
    pick = next((r for r in results if r["n"] == 1_000_000), results[-1])
    name = "1M" if pick["n"] == 1_000_000 else str(pick["n"])
    print(f"rules_exact_rows_per_s_{name}: {pick['n'] / rules_exact(pick['timings']):.0f}")

if __name__ == "__main__":
    main()
