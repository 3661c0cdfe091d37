"""Per-image CPU cost: clipline's process_image vs img2dataset's resizer steps (OpenCV), same files.

img2dataset's resizer does: cv2.imdecode (full size), INTER_AREA shrink of the longest side,
white border to a square, cv2.imencode JPEG. This script times exactly those OpenCV calls in an
interpreter that has cv2 (img2dataset's own venv, as the ingest benchmark creates it), and
clipline's process_image (which also computes sha256 and the perceptual hash) in this one, on
the same JPEG files, alternating, with CPU time (time.process_time), best of --repeats.

    python benchmarks/imaging_vs_cv2.py --images '~/.cache/clipline-bench/images-10000/*.jpg' \
        --cv2-python ~/.cache/clipline-bench/i2d-venv/bin/python

Prints ms/image of each and, last, ``ratio: X.XX`` (OpenCV pipeline time / clipline time).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time


def _files(pattern: str, n: int) -> list[bytes]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))[:n]
    if not files:
        raise SystemExit(f"no file matches {pattern}")
    return [open(f, "rb").read() for f in files]


def _best_ms(fn, items, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t) / len(items) * 1000)
    return best


def time_cv2(imgs: list[bytes], repeats: int, size: int = 256, quality: int = 95) -> float:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)

    def resizer(b: bytes) -> bytes:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
        r = size / max(h, w)
        img = cv2.resize(img, (round(w * r), round(h * r)), interpolation=cv2.INTER_AREA)
        dh, dw = size - img.shape[0], size - img.shape[1]
        img = cv2.copyMakeBorder(img, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, cv2.BORDER_CONSTANT,
                                 value=[255, 255, 255])
        return cv2.imencode(".jpg", img, params=[int(cv2.IMWRITE_JPEG_QUALITY), quality])[1].tobytes()

    return _best_ms(resizer, imgs, repeats)


def time_clipline(imgs: list[bytes], repeats: int) -> float:
    from clipline.components.ingest.imaging import ImageSettings, process_image

    s = ImageSettings(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)
    return _best_ms(lambda b: process_image(b, s), imgs, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="glob of JPEG files")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two measurements")
    ap.add_argument("--cv2-python", help="an interpreter with cv2 (img2dataset's venv)")
    ap.add_argument("--cv2-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    imgs = _files(args.images, args.n)
    if args.cv2_only:
        print(f"{time_cv2(imgs, args.repeats):.4f}")
        return
    if not args.cv2_python:
        raise SystemExit("give --cv2-python (an interpreter with OpenCV, e.g. img2dataset's venv)")
    ours, theirs = [], []
    for _ in range(args.rounds):
        out = subprocess.run([os.path.expanduser(args.cv2_python), __file__, "--cv2-only", "--images", args.images,
                              "--n", str(args.n), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        theirs.append(float(out.stdout.strip().splitlines()[-1]))
        ours.append(time_clipline(imgs, args.repeats))
    print(f"images: {len(imgs)}, mean {sum(map(len, imgs)) / len(imgs) / 1024:.1f} KB")
    print(f"img2dataset resizer steps (OpenCV), CPU per image: {min(theirs):.3f} ms")
    print(f"clipline process_image (+ sha256 + phash), CPU per image: {min(ours):.3f} ms")
    print(f"ratio: {min(theirs) / min(ours):.2f}")


if __name__ == "__main__":
    sys.exit(main())
