"""Scaling of the curate stage on metadata-only raw shards.

Generates raw shards (RAW_SCHEMA; captions, sizes, sha256, pHash; no image bytes) at each size with
planted problems: 3% failed downloads, 4% too-short captions, 3% small images, 1% non-English
captions, 4% repeated URLs, 4% repeated sha256, 5% near-duplicate pHashes (1-6 bits flipped).
Each size runs the whole stage (`curate(cfg)`) in a fresh subprocess with DuckDB limited to 2
threads and --memory-limit, and reports per-step seconds, rows/s, the peak resident memory of the
process, and the growth exponent of time with rows (least squares on log t vs log n).

    python benchmarks/curate_scaling.py                 # 100k and 1M rows
    python benchmarks/curate_scaling.py --sizes 100000  # quick
    python benchmarks/curate_scaling.py --full          # adds 4M rows (several minutes)

The headline (last line) is the whole stage's throughput at the largest size, in rows/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def run_one(data_dir: str, memory_limit: str, language: bool) -> None:
    """Child process: run the stage once, print a JSON line with timings and peak memory."""
    import resource

    from clipline.components.config import load_config
    from clipline.components.curate import curate

    cfg = load_config(None, {"data_dir": Path(data_dir), "curate": {
        "duckdb_memory_limit": memory_limit, "duckdb_threads": 2, "language": "en" if language else None,
        "contact_sheet_examples": 4}})
    t0 = time.perf_counter()
    res = curate(cfg, track=False)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = ru.ru_maxrss / 1024
    print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "load": os.getloadavg()[0], "peak_mb": peak_mb, "timings": res.timings, "counts": res.counts,
                      "n_rows": res.n_rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--full", action="store_true", help="add 4,000,000 rows")
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--no-language", action="store_true", help="switch the language rule off")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        run_one(args._child, args.memory_limit, not args.no_language)
        return
    sizes = sorted(set(args.sizes + ([4_000_000] if args.full else [])))
    from clipline.components.catalog import Catalog

    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
            data = Path(tmp) / "data"
            (data / "raw").mkdir(parents=True)
            t = time.perf_counter()
            shards = generate(data / "raw", n, args.shard_rows)
            with Catalog(data / "catalog.duckdb") as cat:
                for sid, path, table in shards:
                    cat.record_raw_shard(sid, path, table, {"benchmark": True})
            del shards
            gen_s = time.perf_counter() - t
            cmd = [sys.executable, __file__, "--_child", str(data), "--memory-limit", args.memory_limit]
            if args.no_language:
                cmd.append("--no-language")
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"curate failed at n={n}:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["n"], r["gen_s"] = n, gen_s
            results.append(r)
            tm = r["timings"]
            rules_exact = (tm.get("read metadata and apply rules", 0) + tm.get("deduplication", 0)
                           - tm.get("deduplication: phash pair search", 0))
            print(f"\n== {n:,} rows (generated in {gen_s:.1f} s) ==")
            for k, v in tm.items():
                print(f"  {k:<40s} {v:8.2f} s")
            print(f"  {'whole stage (wall)':<40s} {r['wall']:8.2f} s   {n / r['wall']:>12,.0f} rows/s")
            print(f"  {'whole stage (CPU user+sys, process)':<40s} {r['cpu']:8.2f} s   {n / r['cpu']:>12,.0f} rows/CPU-s"
                  f"   (1-min load average at the end: {r['load']:.1f} on {os.cpu_count()} cores)")
            print(f"  rules + exact dedup (read, rules, groups, keep-first): {n / max(rules_exact, 1e-9):,.0f} rows/s")
            print(f"  near-duplicate pair search: {tm.get('deduplication: phash pair search', 0):.2f} s")
            print(f"  language rule: {tm.get('language', 0):.2f} s")
            print(f"  peak RSS of the curate process: {r['peak_mb']:.0f} MB (DuckDB limit {args.memory_limit})")
            print(f"  kept {r['counts']['kept']:,} of {r['counts']['input']:,}; dropped "
                  + ", ".join(f"{k}={v:,}" for k, v in r["counts"]["dropped"].items() if v))
    if len(results) >= 2:
        x = np.log([r["n"] for r in results])
        y = np.log([r["wall"] for r in results])
        slope = float(np.polyfit(x, y, 1)[0])
        nlogn = math.log(results[-1]["n"] * math.log(results[-1]["n"]) / (results[0]["n"] * math.log(results[0]["n"]))) / \
            math.log(results[-1]["n"] / results[0]["n"])
        print(f"\ngrowth exponent of wall time with rows: {slope:.2f} (n log n over this range: {nlogn:.2f})")
    last = results[-1]
    print(f"curate_rows_per_s_at_{last['n']}: {last['n'] / last['wall']:.0f}")


if __name__ == "__main__":
    main()
