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

ADJ = "red blue green yellow black white small large old new quiet busy bright dark happy wooden".split()
NOUN = ("house car dog cat tree river mountain city street beach table chair window garden flower family "
        "child woman man road bridge lake forest field boat train station park kitchen church market").split()
PLACE = "near the | in front of the | next to a | behind the | on top of the | inside the".split(" | ")
TEMPLATE = ["a photo of a {a} {n} {p} {n2}", "the {a} {n} {p} {n2} at sunset", "{a} {n} and a {a2} {n2} in the morning",
            "a picture of the {n} {p} {n2}", "close up of a {a} {n} with a {n2} in the background"]
FOREIGN = ["un chat noir dort sur la table de la cuisine", "ein roter Kreis auf einem blauen Hintergrund",
           "una casa blanca junto al mar en verano", "uma menina brincando no parque com o cachorro"]


def generate(raw_dir: Path, n: int, shard_rows: int, seed: int = 0) -> list[tuple[str, Path, pa.Table]]:
    rng = np.random.default_rng(seed)
    out = []
    base_hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    for start in range(0, n, shard_rows):
        m = min(shard_rows, n - start)
        idx = np.arange(start, start + m)
        u = rng.random(m)
        keys = [f"{i:010d}" for i in idx]
        urls = [f"http://img.example/{i}.jpg" for i in idx]
        # captions: English templates filled with random words, plus the row number
        r = rng.integers(0, 1 << 30, size=(m, 6))
        caps = [TEMPLATE[r[j, 0] % len(TEMPLATE)].format(
                    a=ADJ[r[j, 1] % len(ADJ)], a2=ADJ[r[j, 2] % len(ADJ)], n=NOUN[r[j, 3] % len(NOUN)],
                    n2=NOUN[r[j, 4] % len(NOUN)], p=PLACE[r[j, 5] % len(PLACE)]) + f" {idx[j]}" for j in range(m)]
        sha = [f"{i:064x}" for i in idx]
        phash = base_hashes[start:start + m].copy()
        ow = np.full(m, 640, dtype=np.int32)
        oh = np.full(m, 480, dtype=np.int32)
        status = np.full(m, "success", dtype=object)
        # planted problems (disjoint bands of u)
        status[u < 0.03] = "failed_to_download"
        short = (u >= 0.03) & (u < 0.07)
        for j in np.flatnonzero(short):
            caps[j] = "nice"
        small = (u >= 0.07) & (u < 0.10)
        ow[small], oh[small] = 150, 120
        for j in np.flatnonzero((u >= 0.10) & (u < 0.11)):
            caps[j] = FOREIGN[j % len(FOREIGN)]
        earlier = lambda j: int(rng.integers(0, max(start + j, 1)))  # noqa: E731 - an earlier row
        for j in np.flatnonzero((u >= 0.11) & (u < 0.15)):
            urls[j] = f"http://img.example/{earlier(j)}.jpg"
        for j in np.flatnonzero((u >= 0.15) & (u < 0.19)):
            src = earlier(j)
            sha[j] = f"{src:064x}"
            phash[j] = base_hashes[src]
        for j in np.flatnonzero((u >= 0.19) & (u < 0.24)):
            h = int(base_hashes[earlier(j)]) & ((1 << 64) - 1)
            for bit in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
                h ^= 1 << int(bit)
            phash[j] = h - (1 << 64) if h >= (1 << 63) else h
        ok = status == "success"
        from clipline.components.ingest.schema import RAW_SCHEMA

        table = pa.table({
            "key": keys, "url": urls, "caption": caps, "image": pa.nulls(m, pa.binary()),
            "width": pa.array(np.where(ok, 256, 0), pa.int32()), "height": pa.array(np.where(ok, 256, 0), pa.int32()),
            "original_width": pa.array(ow, pa.int32()), "original_height": pa.array(oh, pa.int32()),
            "sha256": sha, "phash": pa.array(phash, pa.int64()), "status": pa.array(status.tolist(), pa.string()),
            "error_kind": pa.array([None if s == "success" else "http_404" for s in status], pa.string()),
            "error_message": pa.array([None if s == "success" else "404" for s in status], pa.string()),
            "source": pa.array(["bench"] * m, pa.string()),
            "ingested_at": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * m, pa.timestamp("us", tz="UTC")),
        }, schema=RAW_SCHEMA)
        shard_id = f"bench-{start // shard_rows:05d}"
        path = raw_dir / f"{shard_id}.parquet"
        pq.write_table(table, path)
        out.append((shard_id, path, table))
    return out


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
