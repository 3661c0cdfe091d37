"""Per-image CPU cost: clipline's process_image vs img2dataset's resizer steps (OpenCV), same files.

img2dataset's resizer does: cv2.imdecode (full size), INTER_AREA shrink of the longest side,
white border to a square, cv2.imencode JPEG. This script times exactly those OpenCV calls in an
interpreter that has cv2 (img2dataset's own venv, as the ingest benchmark creates it), and
clipline's process_image (which also computes sha256 and the perceptual hash) in this one, on
the same JPEG files, alternating, with CPU time (time.process_time), best of --repeats.

    python benchmarks/imaging_vs_cv2.py [--n 200] [--images 'DIR/*.jpg'] [--cv2-python PYTHON]

The files: --images, or by default the first --n of the ingest benchmark's generated pictures, in its
cache (~/.cache/clipline-bench/images40kb-N, or $CLIPLINE_BENCH_CACHE), generated there if missing.
The interpreter with OpenCV: --cv2-python, or by default img2dataset's venv in that cache
(i2d-venv/bin/python, created by `python benchmarks/ingest_vs_img2dataset.py`).

Prints ms/image of each and, last, ``ratio: X.XX`` (OpenCV pipeline time / clipline time). Without an
OpenCV interpreter (none given, none in the cache) it says so, times clipline alone and ends with
``clipline_ms_per_image: X``; one given that cannot import cv2 is an error.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _files(pattern: str, n: int) -> list[bytes]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))[:n]
    if not files:
        raise SystemExit(f"no file matches {pattern}")
    return [Path(f).read_bytes() for f in files]


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
        img = cv2.copyMakeBorder(
            img, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, cv2.BORDER_CONSTANT, value=[255, 255, 255]
        )
        return cv2.imencode(".jpg", img, params=[int(cv2.IMWRITE_JPEG_QUALITY), quality])[1].tobytes()

    return _best_ms(resizer, imgs, repeats)


def time_clipline(imgs: list[bytes], repeats: int) -> float:
    from clipline.components.ingest.imaging import ImageSettings, process_image

    s = ImageSettings(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)
    return _best_ms(lambda b: process_image(b, s), imgs, repeats)


def cv2_interpreter(given: str | None, cache: Path) -> str | None:
    """The interpreter to time OpenCV in: ``given`` (an error if it cannot import cv2), else img2dataset's
    venv in the ingest benchmark's cache when it has cv2, else None (said why)."""
    exe = os.path.expanduser(given) if given else str(cache / "i2d-venv" / "bin" / "python")
    if not given and not Path(exe).exists():
        print(
            f"OpenCV side skipped: no interpreter with cv2 (none at {exe}; give --cv2-python, or run "
            "benchmarks/ingest_vs_img2dataset.py once, which creates that venv)"
        )
        return None
    try:
        probe = subprocess.run([exe, "-c", "import cv2"], capture_output=True, text=True, timeout=120, check=False)
        why = probe.stderr.strip().splitlines()[-1] if probe.returncode else ""
    except OSError as e:
        why = str(e)
    if not why:
        return exe
    if given:
        raise SystemExit(f"--cv2-python: {exe} cannot import cv2 ({why})")
    print(f"OpenCV side skipped: {exe} cannot import cv2 ({why}); give --cv2-python")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="glob of JPEG files (default: the ingest benchmark's pictures, see above)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two measurements")
    ap.add_argument("--cv2-python", help="an interpreter with cv2 (default: img2dataset's venv in the cache)")
    ap.add_argument("--cv2-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cv2_only:  # in the OpenCV interpreter: standard library, cv2 and numpy only
        print(f"{time_cv2(_files(args.images, args.n), args.repeats):.4f}")
        return
    sys.path.insert(0, str(HERE))
    from ingest_vs_img2dataset import CACHE, ensure_images  # the ingest benchmark's pictures and cache

    cv2_python = cv2_interpreter(args.cv2_python, CACHE)
    pattern = args.images or str(ensure_images(args.n) / "*.jpg")
    imgs = _files(pattern, args.n)
    ours, theirs = [], []
    for _ in range(args.rounds):
        if cv2_python:
            out = subprocess.run(
                [
                    cv2_python,
                    __file__,
                    "--cv2-only",
                    "--images",
                    pattern,
                    "--n",
                    str(args.n),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                raise SystemExit(f"timing OpenCV in {cv2_python} failed:\n{out.stderr[-2000:]}")
            theirs.append(float(out.stdout.strip().splitlines()[-1]))
        ours.append(time_clipline(imgs, args.repeats))
    print(f"images: {len(imgs)}, mean {sum(map(len, imgs)) / len(imgs) / 1024:.1f} KB ({pattern})")
    if theirs:
        print(f"img2dataset resizer steps (OpenCV), CPU per image: {min(theirs):.3f} ms")
    print(f"clipline process_image (+ sha256 + phash), CPU per image: {min(ours):.3f} ms")
    if theirs:
        print(f"ratio: {min(theirs) / min(ours):.2f}")
    else:
        print(f"clipline_ms_per_image: {min(ours):.3f}")


if __name__ == "__main__":
    sys.exit(main())
