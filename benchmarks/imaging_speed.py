"""Time clipline's per-image work: decode + resize + encode + sha256 + phash, on one core.

Generates N 640x480 JPEGs of about 40 KB (smooth gradients, shapes, sensor-like noise: the
benchmark's kind of picture), then runs :func:`process_image` over them with the ingest
benchmark's settings (256 px, border, JPEG q95). Prints ms/image per stage and, last, the whole
per-image cost.  Times are CPU seconds of this process (``time.process_time``), best of ``--repeats``, so a busy
shared machine inflates them less than wall time would.

Usage: python benchmarks/imaging_speed.py [--n 300] [--mode border] [--images 'DIR/*.jpg']
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time

import numpy as np
from PIL import Image, ImageDraw

from clipline.components.ingest.imaging import ImageSettings, phash64, process_image


def make_jpegs(n: int, seed: int = 0, size=(640, 480), quality: int = 85) -> list[bytes]:
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.3, 1.0, 2)
        base = np.stack(np.broadcast_arrays(x * 255 * a, y * 255 * b, (1 - x) * 200 + y * 55), axis=2)
        base = (base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(base)
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse(
                [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
            )
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def best_ms(fn, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()  # CPU time of this process: fair on a shared, busy machine
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t) / len(items) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", default="border", choices=["no", "center_crop", "keep_ratio", "border"])
    ap.add_argument("--format", default="jpg", choices=["jpg", "webp"])
    ap.add_argument("--images", help="time these files instead (a glob, e.g. the ingest benchmark's cache)")
    args = ap.parse_args()
    if args.images:
        import glob
        from pathlib import Path

        imgs = [Path(f).read_bytes() for f in sorted(glob.glob(args.images))[: args.n]]
        if not imgs:
            raise SystemExit(f"no file matches {args.images}")
    else:
        imgs = make_jpegs(args.n)
    s = ImageSettings(image_size=256, resize_mode=args.mode, encode_format=args.format, encode_quality=95)
    print(f"images: {len(imgs)}, mean {np.mean([len(b) for b in imgs]) / 1024:.1f} KB")
    assert all(process_image(b, s).ok for b in imgs[:5])

    def full_decode(b):
        Image.open(io.BytesIO(b)).load()

    def draft_decode(b):
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (256, 192))
        im.load()

    print(f"full decode only (reference): {best_ms(full_decode, imgs, args.repeats):.3f} ms/image")
    print(f"draft decode only: {best_ms(draft_decode, imgs, args.repeats):.3f} ms/image")
    small = process_image(imgs[0], s)
    print(f"sha256 only: {best_ms(lambda _: hashlib.sha256(small.image).digest(), imgs, args.repeats):.3f} ms/image")
    content = Image.open(io.BytesIO(small.image)).convert("RGB")
    print(f"phash only (256 px input): {best_ms(lambda _: phash64(content), imgs, args.repeats):.3f} ms/image")
    ms = best_ms(lambda b: process_image(b, s), imgs, args.repeats)
    print(f"process_image ({args.mode}, {args.format} q95), CPU per image: {ms:.3f} ms = 1/{1000 / ms:.0f} s")
    print(f"ms_per_image: {ms:.3f}")


if __name__ == "__main__":
    main()
