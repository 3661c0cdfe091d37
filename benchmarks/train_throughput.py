"""CPU training throughput: clipline's trainer vs open_clip's own `open_clip_train`, same model config,
batch size, images, DataLoader workers and torch threads, end to end including data loading.

Both read the same JPEGs: clipline from a snapshot (Parquet, the contract), open_clip_train from the
same images written as files plus a CSV (its `--dataset-type csv`). Throughput = samples / wall time
over the steps after a warm-up, from per-step timestamps (ours: the progress callback; theirs: the
per-step `Batch (t)` it logs with `--log-every-n-steps 1`, which includes waiting for data).

    pip install -e '.[bench]'     # open_clip_train's own imports: webdataset, braceexpand, pandas
    python benchmarks/train_throughput.py [--model clipline-tiny] [--batch-size 128]
        [--steps 40] [--warmup-steps 5] [--images 2048] [--image-px 256] [--loader-workers 1]

Prints both figures, then the headline `ratio: X.XX` (ours / open_clip's) last. Tiny, to check it runs:
`--model clipline-nano --batch-size 8 --steps 3 --warmup-steps 1 --images 32 --image-px 64 --loader-workers 0`.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ours(args, data_dir: Path, sid: str) -> float:
    from clipline.components.config import load_config
    from clipline.components.train.run import train

    cfg = load_config(
        None,
        {
            "data_dir": data_dir,
            "train": {
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "lr": 5e-4,
                "warmup_steps": 10,
                "loader_workers": args.loader_workers,
                "threads": args.threads,
                "checkpoint_every": 10**6,
                "log_every": 10,
                "system_metrics": False,
            },
        },
    )
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{data_dir / 'mlflow.db'}"
    stamps: dict[int, float] = {}
    res = train(cfg, sid, progress=lambda s, t, m: stamps.__setitem__(s, time.perf_counter()))
    k = args.warmup_steps
    sps = args.batch_size * (res.steps - k) / (stamps[res.steps] - stamps[k])
    print(
        f"clipline: {res.steps} steps, samples/s after warm-up {sps:.1f} "
        f"(whole loop incl. start-up {res.samples_per_s:.1f}), final loss {res.final_loss:.3f}"
    )
    return sps


def loader_alone(args, data_dir: Path, sid: str) -> float:
    """clipline's feed with no training: samples/s the DataLoader delivers (same workers/threads)."""
    import torch

    from clipline.components.model import factory
    from clipline.components.train.data import BatchDecoder, SnapshotStream, resolve_snapshot

    torch.set_num_threads(args.threads)
    info = resolve_snapshot(data_dir / "snapshots", None, sid)
    b = factory.create(args.model, aug={"scale": (0.5, 1.0)})
    stream = SnapshotStream(
        info,
        BatchDecoder(b.train_transform, b.tokenizer, b.image_size),
        args.batch_size,
        num_workers=max(1, args.loader_workers),
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.loader_workers, prefetch_factor=4 if args.loader_workers else None
    )
    it = iter(loader)
    next(it)  # worker start-up
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += batch["image"].shape[0]
    sps = n / (time.perf_counter() - t0)
    print(f"clipline loader alone: {sps:.1f} samples/s ({n} samples)")
    return sps


def write_csv(data_dir: Path, sid: str) -> Path:
    import pyarrow.parquet as pq

    img_dir = data_dir / "csv_images"
    img_dir.mkdir()
    table = pq.read_table(
        next((data_dir / "snapshots" / sid).glob("*.parquet")), columns=["key", "image", "caption", "split"]
    )
    out = data_dir / "train.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for key, img, cap, split in zip(*(table.column(c).to_pylist() for c in ("key", "image", "caption", "split"))):
            if split != "train":
                continue
            p = img_dir / f"{key}.jpg"
            p.write_bytes(img)
            w.writerow([str(p), cap])
    return out


def theirs(args, data_dir: Path, csv_path: Path) -> float:
    from clipline.components.model import factory

    n_rows = sum(1 for _ in csv_path.open()) - 1
    code = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "from open_clip_train.main import main; main(sys.argv[2:])"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        str(factory.CONFIG_DIR),
        "--train-data",
        str(csv_path),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.steps * args.batch_size // max(1, n_rows) + 2),
        "--train-num-samples",
        str(n_rows),
        "--workers",
        str(args.loader_workers),
        "--precision",
        "fp32",
        "--lr",
        "5e-4",
        "--warmup",
        "10",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--logs",
        str(data_dir / "oc_logs"),
        "--name",
        "bench",
        "--report-to",
        "",
        "--seed",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or os.cpu_count())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    times: list[float] = []
    tail: list[str] = []  # its last lines, to show when it stops early
    for line in proc.stdout:
        tail = [*tail[-29:], line]
        m = re.search(r"Batch \(t\): ([0-9.]+)", line)
        if m:
            times.append(float(m.group(1)))
            if len(times) >= args.steps:
                proc.terminate()
                break
    rc = proc.wait()
    if len(times) <= args.warmup_steps:
        raise SystemExit(
            f"open_clip_train logged only {len(times)} steps (exit code {rc}); its last output:\n" + "".join(tail)
        )
    t = times[args.warmup_steps :]
    sps = args.batch_size * len(t) / sum(t)
    print(f"open_clip_train: {len(times)} steps, samples/s after warm-up {sps:.1f}")
    return sps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="clipline-tiny")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = all cores)")
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    if args.steps <= args.warmup_steps:
        ap.error("--steps must exceed --warmup-steps")
    try:  # before anything is timed: open_clip_train needs packages open_clip itself does not
        import open_clip_train.main  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"open_clip_train cannot start here ({e}); install the benchmarks' dependencies: pip install -e '.[bench]'"
        ) from None

    from clipline.components.train import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        sid = synthetic.write_snapshot(
            data_dir / "snapshots", n=args.images, size=args.image_px, val_fraction=0.0, row_group_rows=512
        )
        csv_path = write_csv(data_dir, sid)
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; model {args.model}, "
            f"batch {args.batch_size}, {args.images} JPEGs of {args.image_px} px, {args.loader_workers} loader "
            f"worker(s), {args.threads} torch threads"
        )
        feed = loader_alone(args, data_dir, sid)
        a = ours(args, data_dir, sid)
        print(f"loader alone / trainer: {feed / a:.2f}x")
        b = theirs(args, data_dir, csv_path)
        print(f"clipline_samples_per_s: {a:.1f}")
        print(f"open_clip_train_samples_per_s: {b:.1f}")
        print(f"ratio: {a / b:.2f}")


if __name__ == "__main__":
    main()
