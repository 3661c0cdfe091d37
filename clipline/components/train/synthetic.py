"""Synthetic coloured-shape snapshots, for tests and benchmarks of the train stage when no curated
snapshot is at hand. The images follow the toy web's idea (colour x shape, varied size, position,
rotation and background); some colour x shape pairs can be held out of training for zero-shot checks.

The files follow the snapshot contract exactly (Parquet with ``key, url, caption, image, width,
height, original_width, original_height, sha256, phash, split`` + ``manifest.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
TEMPLATES = [
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {c} {s} on a background",
    "an image of a {c} {s}",
    "a drawing of a {c} {s}",
    "the {c} {s}",
]


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "diamond":
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    elif shape == "star":
        pts = [
            ((1 if i % 2 == 0 else 0.45) * math.cos(a), (1 if i % 2 == 0 else 0.45) * math.sin(a))
            for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
        ]
    elif shape == "cross":
        w = 0.33
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw(color: str, shape: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One image: a ``color`` ``shape`` of random size/position/rotation on a random muted background."""
    bg = tuple(int(v) for v in rng.integers(90, 170, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    return img


def pairs(heldout: int = 12, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(seen, held-out) colour x shape pairs: every colour and every shape stays in ``seen``."""
    rng = np.random.default_rng(seed)
    allp = [(c, s) for c in COLORS for s in SHAPES]
    while True:
        idx = rng.permutation(len(allp))
        held = [allp[i] for i in idx[:heldout]]
        seen = [allp[i] for i in idx[heldout:]]
        if {c for c, _ in seen} == set(COLORS) and {s for _, s in seen} == set(SHAPES):
            return seen, held


def write_snapshot(
    snapshots_dir: Path,
    n: int = 512,
    *,
    seed: int = 0,
    size: int = 128,
    heldout: int = 12,
    val_fraction: float = 0.05,
    row_group_rows: int = 256,
    corrupt: int = 0,
    snapshot_id: str | None = None,
) -> str:
    """Write a snapshot of ``n`` shape images over the seen pairs; returns its id. ``corrupt`` rows get
    undecodable image bytes (the train feed must count and skip them)."""
    rng = np.random.default_rng(seed)
    seen, _ = pairs(heldout, seed)
    rows: dict[str, list] = {
        k: []
        for k in (
            "key",
            "url",
            "caption",
            "image",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
            "phash",
            "split",
            "color",
            "shape",
        )
    }
    for i in range(n):
        c, s = seen[int(rng.integers(len(seen)))]
        buf = io.BytesIO()
        draw(c, s, rng, size).save(buf, format="JPEG", quality=90)
        data = buf.getvalue() if i >= corrupt else b"not a jpeg" + bytes(20)
        rows["key"].append(f"{i:08d}")
        rows["url"].append(f"http://toy.invalid/{i}.jpg")
        rows["caption"].append(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(c=c, s=s))
        rows["image"].append(data)
        for k in ("width", "height", "original_width", "original_height"):
            rows[k].append(size)
        rows["sha256"].append(hashlib.sha256(data).hexdigest())
        rows["phash"].append(int(rng.integers(0, 2**62)))
        rows["split"].append("val" if rng.random() < val_fraction else "train")
        rows["color"].append(c)
        rows["shape"].append(s)
    table = pa.table(rows)
    sid = snapshot_id or hashlib.sha256(f"synthetic-{n}-{seed}-{size}-{heldout}-{corrupt}".encode()).hexdigest()[:16]
    d = Path(snapshots_dir) / sid
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / "part-00000.parquet", row_group_size=row_group_rows)
    n_val = rows["split"].count("val")
    manifest = {
        "snapshot_id": sid,
        "parent_id": None,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": {"synthetic": True, "seed": seed},
        "source_shards": [],
        "counts": {"input": n, "kept": n, "dropped": {}},
        "n_train": n - n_val,
        "n_val": n_val,
        "files": [f"{sid}/part-00000.parquet"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return sid
