"""GPU training throughput of one device: ViT-B/32 at 224 px, bf16 autocast, batch 256, first on
synthetic in-memory tensors, then fed from Parquet shards by clipline's data feed (DataLoader
workers decoding JPEGs, random resized crop, tokenisation; on a GPU the workers hand over uint8
pixels that are normalised after the copy, as the trainer does -- `--feed float` keeps the float32
CPU feed for comparison).

Needs only torch, timm and open_clip (+ pyarrow for the Parquet phase, which is skipped with a
message when pyarrow is absent): no Ray, no MLflow. Published open_clip figures for ViT-B/32 are
about 770-850 samples/s per A100-40GB; the target on one H100 is >= 1,500 samples/s from synthetic
tensors and >= 90% of that from Parquet.

    python benchmarks/train_gpu.py                      # defaults above, on cuda
    python benchmarks/train_gpu.py --parquet DIR        # a snapshot dir (manifest.json) or *.parquet dir
    python benchmarks/train_gpu.py --loop               # + clipline's own training loop on the same data
    python benchmarks/train_gpu.py --smoke              # tiny model, CPU, a few steps: checks it runs

Prints the device and both figures; the headline `parquet_samples_per_s: X` comes last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from clipline.components.model import factory  # noqa: E402  (torch + open_clip only)
from clipline.components.model.loss import ContrastiveLoss, clamp_logit_scale_  # noqa: E402


def make_step(run, model, opt, device, use_bf16: bool):
    """One optimiser step; ``run`` is the (maybe compiled) module to call, ``model`` the plain one."""
    loss_fn = ContrastiveLoss()

    def step(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = run(images, texts)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_logit_scale_(model)
        return loss.detach()

    return step


def to_device(images, device) -> torch.Tensor:
    """A float batch, or a (uint8 batch, mean, std) triple normalised after the copy."""
    if isinstance(images, tuple):
        from clipline.components.train.data import normalize_on_device

        pixels, mean, std = images
        return normalize_on_device(pixels.to(device, non_blocking=True), mean, std)
    return images.to(device, non_blocking=True)


def timed(step, batches, n_steps: int, warmup: int, device, batch_size: int) -> float:
    """samples/s over ``n_steps`` after ``warmup`` steps (synchronised on GPU)."""
    it = iter(batches)
    for _ in range(warmup):
        images, texts = next(it)
        step(to_device(images, device), texts.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        images, texts = next(it)
        step(to_device(images, device), texts.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_steps * batch_size / (time.perf_counter() - t0)


def synthetic_batches(b: int, size: int, ctx: int, device):
    images = torch.randn(b, 3, size, size, device=device)
    texts = torch.randint(1, 49000, (b, ctx), device=device)
    while True:
        yield images, texts


def snapshot_info(args, tmp: Path):
    """The snapshot to read: --parquet, or synthetic shape JPEGs written to ``tmp``."""
    from clipline.components.train.data import SnapshotInfo, resolve_snapshot

    if args.parquet:
        p = Path(args.parquet)
        if (p / "manifest.json").is_file():
            return resolve_snapshot(p.parent, None, p.name)
        return _info_from_dir(p, SnapshotInfo)
    from clipline.components.train import synthetic

    # one epoch covers warm-up and timed steps, so no loader restart falls inside the measurement
    n = max(args.images, args.batch_size * (args.steps + args.warmup + 2 * max(1, args.loader_workers)))
    sid = synthetic.write_snapshot(tmp / "snapshots", n=n, size=args.image_px, val_fraction=0.0, row_group_rows=1024)
    return resolve_snapshot(tmp / "snapshots", None, sid)


def parquet_batches(args, bundle, device, info):
    """Batches from the snapshot's Parquet files through clipline's feed."""
    from clipline.components.train.data import BatchDecoder, SnapshotStream

    uint8 = args.feed == "uint8" or (args.feed == "auto" and device.type == "cuda")
    decoder = BatchDecoder(bundle.train_transform, bundle.tokenizer, bundle.image_size, uint8=uint8)
    epoch = 0
    while True:
        stream = SnapshotStream(info, decoder, args.batch_size, epoch=epoch, num_workers=max(1, args.loader_workers))
        if epoch == 0:
            print(
                f"feed: {'uint8 pixels, normalised on the GPU' if uint8 else 'float32 normalised in the workers'}; "
                f"{stream.batches_per_epoch()} batches per epoch"
            )
            if stream.batches_per_epoch() < args.steps + args.warmup:
                print(
                    "warning: the epoch is shorter than the measured steps, so a loader restart is timed too "
                    "(give a larger --parquet snapshot or fewer --steps)"
                )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=args.loader_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=args.prefetch if args.loader_workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            yield (batch["image"], decoder.mean, decoder.std), batch["text"]
        epoch += 1


def _info_from_dir(p: Path, SnapshotInfo):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(p.glob("*.parquet"))
    rgs, n = [], 0
    for i, f in enumerate(files):
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            k = int(pc.sum(pc.equal(pf.read_row_group(rg, columns=["split"]).column("split"), "train")).as_py() or 0)
            if k:
                rgs.append((i, rg, k))
                n += k
    return SnapshotInfo("parquet-dir", {}, files, n, rgs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--parquet", default=None, help="snapshot dir or dir of Parquet files (default: generate)")
    ap.add_argument("--images", type=int, default=4096, help="images to generate when no --parquet")
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument(
        "--feed",
        choices=["auto", "uint8", "float"],
        default="auto",
        help="uint8: workers send pixels, normalised on the device; float: workers send normalised "
        "float32 (the CPU trainer's feed); auto: uint8 on a GPU, float on CPU",
    )
    ap.add_argument(
        "--loop",
        action="store_true",
        help="also time clipline's own training loop (run_loop) on the same snapshot (needs pydantic)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: only checks it runs")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch_size, args.steps, args.warmup = "clipline-nano", 8, 2, 1
        args.images, args.image_px, args.loader_workers = 64, 64, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: this benchmark measures a GPU (use --smoke to check it runs on CPU)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    bundle = factory.create(args.model, device=device)
    model = bundle.model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=device.type == "cuda"
    )
    run = torch.compile(model) if args.compile else model
    step = make_step(run, model, opt, device, use_bf16)
    print(
        f"device: {name}; model {args.model} at {bundle.image_size} px, batch {args.batch_size}, "
        f"{'bf16 autocast' if use_bf16 else 'fp32'}, torch {torch.__version__}"
    )

    syn = timed(
        step,
        synthetic_batches(args.batch_size, bundle.image_size, bundle.context_length, device),
        args.steps,
        args.warmup,
        device,
        args.batch_size,
    )
    print(f"synthetic_samples_per_s: {syn:.1f}")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("pyarrow is not installed: the Parquet phase needs it (pip install pyarrow)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        info = snapshot_info(args, Path(tmp))
        pq_sps = timed(
            step, parquet_batches(args, bundle, device, info), args.steps, args.warmup, device, args.batch_size
        )
        if args.loop:
            del opt, step, run, model, bundle
            loop_sps = clipline_loop(args, info, device, Path(tmp))
            print(
                f"clipline_loop_samples_per_s: {loop_sps:.1f} (clipline's own training loop, the code each Ray "
                f"Train worker runs; /synthetic: {loop_sps / syn:.2f})"
            )
    print(f"loader workers: {args.loader_workers}; parquet/synthetic: {pq_sps / syn:.2f}")
    print(f"parquet_samples_per_s: {pq_sps:.1f}")


def clipline_loop(args, info, device, tmp: Path) -> float:
    """samples/s of ``run_loop`` (what `clipline train` runs in each worker: feed, bf16 step, clipping,
    schedule, metrics) over ``args.steps`` steps after ``args.warmup``; no MLflow, one checkpoint at the end."""
    from clipline.components.config import TrainConfig  # needs pydantic
    from clipline.components.train.loop import LoopSpec, WorkerContext, run_loop

    total = args.warmup + args.steps
    cfg = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        steps=total,
        loader_workers=args.loader_workers,
        grad_checkpointing=args.grad_checkpointing,
        checkpoint_every=10 * total,
        warmup_steps=10,
    ).model_dump()
    marks: dict[int, float] = {}

    def progress(step: int, _total: int, _metrics: dict) -> None:
        if step in (args.warmup, total):
            marks[step] = time.perf_counter()  # the loop reads the loss every step, so the GPU is in step

    spec = LoopSpec(train=cfg, snapshot=info, run_dir=tmp / "run", run_name="gpu-benchmark", total_steps=total)
    run_loop(spec, WorkerContext(device=str(device), progress=progress))
    return args.steps * args.batch_size / (marks[total] - marks[args.warmup])


if __name__ == "__main__":
    main()
