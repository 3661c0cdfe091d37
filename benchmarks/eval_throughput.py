"""Zero-shot evaluation throughput on CPU: clipline's run_zeroshot vs CLIP_benchmark's functions.

Same tiny open_clip model (random weights, seeded), same images, same DataLoader settings, same
precision (fp32: CLIP_benchmark is called with amp=False so that both produce the same numbers;
its default amp=True is timed too and printed for information). Each side is timed end to end:
class-prompt encoding + image decoding/preprocessing + image encoding + scoring. Best of
``--repeats`` runs, alternating sides.

    pip install -e '.[bench]'     # clip-benchmark
    python benchmarks/eval_throughput.py [--images 512] [--classes 24] [--templates 8] [--repeats 3]

Prints images/s for each side and, last, ``ratio: X.XX`` (ours / CLIP_benchmark's, >1 = faster). Tiny, to
check it runs: ``--images 8 --classes 2 --templates 1 --batch-size 8 --repeats 1``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 160),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
TEMPLATES = [
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c}.",
    "an image of a {c}.",
    "a small {c}.",
    "a big {c}.",
    "a picture of the {c}.",
    "the {c}.",
    "a rendering of a {c}.",
    "a cropped photo of a {c}.",
]


def make_set(out: Path, n_images: int, n_classes: int) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    classes = [(c, s) for c in COLORS for s in SHAPES][:n_classes]
    rng = random.Random(0)
    images, labels = [], []
    for i in range(n_images):
        c, s = classes[i % len(classes)]
        img = Image.new("RGB", (96, 96), (128 + rng.randint(-30, 30),) * 3)
        d = ImageDraw.Draw(img)
        m = rng.randint(6, 20)
        (d.ellipse if s == "circle" else d.rectangle)((m, m, 96 - m, 96 - m), fill=RGB[c])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        labels.append(f"{c} {s}")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": labels}), out / "bench.parquet")
    return out / "bench.parquet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--classes", type=int, default=24)
    ap.add_argument("--templates", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    try:
        import clip_benchmark.metrics.zeroshot_classification  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"CLIP_benchmark cannot be imported ({e}); install the benchmarks' dependencies: pip install -e '.[bench]'"
        ) from None
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        measure(args, Path(tmp))


def measure(args, tmp: Path) -> None:
    import open_clip
    import torch
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier

    from clipline.components.model.checkpoint import load_checkpoint, save_checkpoint
    from clipline.components.evaluate.datasets import load_eval_dataset
    from clipline.components.evaluate.zeroshot import make_loader, run_zeroshot

    torch.manual_seed(0)
    save_checkpoint(open_clip.CLIP(**TINY), TINY, tmp / "ckpt", preprocess_cfg={})
    m = load_checkpoint(tmp / "ckpt", "cpu")
    ds = load_eval_dataset(make_set(tmp / "set", args.images, args.classes), name="bench")
    ds.templates = TEMPLATES[: args.templates]
    print(
        f"model: {sum(p.numel() for p in m.model.parameters()) / 1e6:.1f} M params, image {TINY['vision_cfg']['image_size']} px; "
        f"{len(ds)} images, {len(ds.classnames)} classes x {len(ds.templates)} templates; "
        f"batch {args.batch_size}; torch threads {torch.get_num_threads()}"
    )

    def ours() -> float:
        return run_zeroshot(m.model, m.tokenizer, m.preprocess, ds, "cpu", args.batch_size, 0).acc1

    def theirs(amp: bool) -> float:
        clf = zero_shot_classifier(m.model, m.tokenizer, ds.classnames, ds.templates, "cpu", amp=amp)
        logits, target = run_classification(
            m.model, clf, make_loader(ds.torch_dataset(m.preprocess), args.batch_size), "cpu", amp=amp
        )
        return (logits.argmax(1) == target).float().mean().item()

    def timed(fn, *a) -> tuple[float, float]:
        t = time.perf_counter()
        acc = fn(*a)
        return time.perf_counter() - t, acc

    import contextlib
    import os

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # CLIP_benchmark's tqdm bars
        ours(), theirs(False)  # warm-up
        best = {"ours": float("inf"), "clip_benchmark": float("inf"), "clip_benchmark_amp": float("inf")}
        accs = {}
        for _ in range(args.repeats):
            for name, fn, a in (
                ("ours", ours, ()),
                ("clip_benchmark", theirs, (False,)),
                ("clip_benchmark_amp", theirs, (True,)),
            ):
                dt, acc = timed(fn, *a)
                best[name] = min(best[name], dt)
                accs[name] = acc
    for name, dt in best.items():
        print(f"{name}: {len(ds) / dt:.1f} images/s ({dt:.2f} s, top-1 {accs[name]:.4f})")
    assert abs(accs["ours"] - accs["clip_benchmark"]) < 1e-4, "same precision must give the same top-1"
    print(
        f"ratio vs clip_benchmark amp=True (its CPU default, bf16 autocast): {best['clip_benchmark_amp'] / best['ours']:.2f}"
    )
    print(f"ratio: {best['clip_benchmark'] / best['ours']:.2f}")


if __name__ == "__main__":
    main()
