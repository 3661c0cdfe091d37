"""Training samples/s from a snapshot in object storage against the same snapshot on local disk
(issue 14): the same model, snapshot and settings, each feed, one run after the other.

The store is S3-compatible and on loopback: moto's server mode in a process of its own (what the
tests use; MinIO or S3 in a deployment), reached the usual way (`AWS_ENDPOINT_URL`, `AWS_*` keys).
The snapshot is synthetic (`clipline.components.train.synthetic`: shape images, JPEG, in Parquet row
groups as curate writes them), uploaded whole; training gets its URL (`train(cfg, "s3://...")`, what
`clipline train --snapshot s3://...` does).

Feeds: `torch` (the default on one machine: DataLoader workers read and decode) and `ray` (the
default on a multi-node cluster: Ray Data tasks read and decode, one Ray Train worker trains).
Samples/s is the training loop's own figure (samples over the loop's wall time, waiting for data
included); `train s` is the whole `train()` call a user waits for (snapshot resolution, model build,
MLflow, checkpoints). Each feed starts with a short run that is not counted; then each repeat runs
both sources, local first in even repeats and the store first in odd ones (`--repeats`).

    python benchmarks/object_store_feed.py [--n 2048] [--image-px 128] [--model clipline-tiny]
        [--batch-size 64] [--steps 60] [--feed torch --feed ray] [--repeats 1]

Prints one line per run, each feed's ratio (store / local, medians), then LAST `ratio: X.XX`, the
smaller of the feeds' ratios (target: >= 0.90). Tiny, to check it runs: `--n 96 --image-px 64
--model clipline-nano --batch-size 16 --steps 3 --feed torch`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_store(work: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, in its own process; the environment points at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "moto.log", "wb")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the S3 server did not start: {(work / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return proc, endpoint


def run_once(args, data_dir: Path, ref: str, feed: str, name: str) -> tuple[float, float]:
    """(loop samples/s, whole train() seconds) of one training run."""
    from clipline.components.config import load_config
    from clipline.components.train.run import train

    train_cfg = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": 5e-4,
        "warmup_steps": 5,
        "loader_workers": args.loader_workers,
        "threads": args.threads,
        "checkpoint_every": 10**6,
        "log_every": 10,
        "system_metrics": False,
        "run_name": name,
        "data_feed": feed,
        "backend": "ray" if feed == "ray" else "local",
        "workers": 1,
    }
    cfg = load_config(None, {"data_dir": data_dir, "train": train_cfg})
    t0 = time.perf_counter()
    res = train(cfg, ref)
    return res.samples_per_s, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="snapshot rows (default 2048)")
    ap.add_argument("--image-px", type=int, default=128, help="side of the stored JPEGs (default 128)")
    ap.add_argument("--model", default="clipline-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feed", action="append", choices=["torch", "ray"], help="repeatable (default: both)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per feed and source (default 1)")
    args = ap.parse_args()
    feeds = args.feed or ["torch", "ray"]

    import fsspec

    from clipline.components.train import synthetic

    work = Path(tempfile.mkdtemp(prefix="clipline-objstore-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    store, endpoint = start_store(work)
    try:
        data_dir = work / "data"
        sid = synthetic.write_snapshot(data_dir / "snapshots", n=args.n, size=args.image_px, seed=0)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(str(data_dir / "snapshots" / sid), f"bench/snapshots/{sid}", recursive=True)
        url = f"s3://bench/snapshots/{sid}"
        size_mb = sum(p.stat().st_size for p in (data_dir / "snapshots" / sid).rglob("*.parquet")) / 1e6
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; store: moto at {endpoint}; "
            f"snapshot {sid}: {args.n} rows, {args.image_px} px JPEGs, {size_mb:.1f} MB of Parquet; model "
            f"{args.model}, batch {args.batch_size}, {args.steps} steps, {args.loader_workers} loader worker(s), "
            f"{args.threads} torch thread(s)",
            flush=True,
        )
        if "ray" in feeds:  # started here, after the environment names the store: its workers inherit it
            import ray

            # more logical CPUs than cores, as the tests do: Ray Data's read tasks beside the trainer
            ray.init(num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        ratios = {}
        for feed in feeds:
            sps: dict[str, list[float]] = {"local": [], "store": []}
            # one short run first, not counted: the first run of a process pays for one-off set-up
            # (the MLflow store's tables, Ray's first workers) that would count against whichever went first
            run_once(
                argparse.Namespace(**{**vars(args), "steps": min(args.steps, 3)}), data_dir, sid, feed, f"{feed}-warmup"
            )
            for r in range(args.repeats):
                order = (("local", sid), ("store", url))
                for source, ref in order if r % 2 == 0 else order[::-1]:
                    s, secs = run_once(args, data_dir, ref, feed, f"{feed}-{source}-{r}")
                    sps[source].append(s)
                    print(
                        f"{feed} feed, {source:5s} ({ref}): {s:.1f} samples/s, train s {secs:.1f}, "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            ratios[feed] = statistics.median(sps["store"]) / statistics.median(sps["local"])
            print(f"ratio_{feed}: {ratios[feed]:.2f}", flush=True)
        if "ray" in feeds:
            import ray

            ray.shutdown()
        print(f"ratio: {min(ratios.values()):.2f}")
    finally:
        store.terminate()
        store.wait(10)


if __name__ == "__main__":
    main()
