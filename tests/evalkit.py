"""Test helpers for the evaluate/tracking tests: a tiny random open_clip model saved in the
checkpoint layout, a small zero-shot set, a small snapshot, and a simulated training run in MLflow.

Nothing here downloads anything: the model is built from a config dict and seeded random weights.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

# A tiny ViT/transformer CLIP (about 3.5 M parameters, most of them the token embedding).
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 160),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def tiny_model(seed: int = 0) -> Any:
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_MODEL_CFG)
    return model.eval()


def make_checkpoint(
    out_dir: Path,
    seed: int = 0,
    run_id: str | None = None,
    snapshot_id: str | None = None,
    weights: str = "safetensors",
) -> Path:
    """A random tiny model written in the checkpoint layout of the common contract."""
    import torch

    from clipline.components.model.checkpoint import CONFIG_FILE, save_checkpoint

    model = tiny_model(seed)
    meta = {"model_name": "tiny-test", "snapshot_id": snapshot_id, "step": 0, "run_id": run_id, "train": {}}
    out = save_checkpoint(model, TINY_MODEL_CFG, out_dir, preprocess_cfg={}, meta=meta)
    if weights == "bin":  # the .bin variant of the contract
        (out / "open_clip_model.safetensors").unlink()
        torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    assert (out / CONFIG_FILE).is_file()
    return out


def draw(color: str, shape: str, size: int = 40, seed: int = 0) -> bytes:
    """A PNG of a coloured shape on a grey background, slightly jittered by ``seed``."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (128 + rng.randint(-20, 20),) * 3)
    d = ImageDraw.Draw(img)
    m = rng.randint(4, 9)
    box = (m, m, size - m, size - m)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_zeroshot_set(
    out_dir: Path, classes: list[tuple[str, str]], per_class: int = 3, int_labels: bool = False, name: str = "heldout"
) -> Path:
    """Parquet (image, label) + classnames/templates JSON in CLIP_benchmark's format; returns the dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    classnames = [f"{c} {s}" for c, s in classes]
    images, labels = [], []
    for ci, (c, s) in enumerate(classes):
        for k in range(per_class):
            images.append(draw(c, s, seed=ci * 100 + k))
            labels.append(ci if int_labels else classnames[ci])
    pq.write_table(pa.table({"image": images, "label": labels}), out_dir / f"{name}.parquet")
    (out_dir / "classnames.json").write_text(json.dumps({name: classnames}))
    (out_dir / "templates.json").write_text(json.dumps({name: ["a photo of a {c}.", "a {c}.", "an image of a {c}"]}))
    return out_dir


def make_snapshot(snapshots_dir: Path, snapshot_id: str = "snap0001", n_val: int = 16, n_train: int = 8) -> str:
    """A snapshot (Parquet + manifest.json) with ``n_val`` val rows and ``n_train`` train rows."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = snapshots_dir / snapshot_id
    d.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[Any]] = {
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
        )
    }
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(n_val + n_train):
        c, s = combos[i % len(combos)]
        img = draw(c, s, seed=i)
        rows["key"].append(f"{i:06d}")
        rows["url"].append(f"http://example.invalid/{i}.png")
        rows["caption"].append(f"a {c} {s} number {i}")
        rows["image"].append(img)
        for k in ("width", "height", "original_width", "original_height"):
            rows[k].append(40)
        rows["sha256"].append(hashlib.sha256(img).hexdigest())
        rows["phash"].append(i)
        rows["split"].append("val" if i < n_val else "train")
    pq.write_table(pa.table(rows), d / "part-0.parquet")
    manifest = {
        "snapshot_id": snapshot_id,
        "parent_id": None,
        "created_at": "2026-01-01T00:00:00Z",
        "config": {},
        "source_shards": [],
        "counts": {"input": n_val + n_train, "kept": n_val + n_train, "dropped": {}},
        "n_train": n_train,
        "n_val": n_val,
        "files": [f"{snapshot_id}/part-0.parquet"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return snapshot_id


def simulate_training_run(
    cfg: Any, checkpoint_dir: Path, snapshot_id: str | None, seed: int = 0, n_train: int | None = None
) -> tuple[str, str]:
    """What the train stage does per the common contract: a run in the experiment, the checkpoint
    logged under ``checkpoint/``, the model logged with ``mlflow.pytorch.log_model(name="model")``.
    Returns (run_id, model_uri)."""
    import mlflow

    from clipline.components.model.checkpoint import load_checkpoint
    from clipline.components.tracking.runs import client, ensure_experiment

    client(cfg)
    exp_id = ensure_experiment(cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{seed}") as run:
        if n_train is not None:
            mlflow.log_param("n_train", n_train)
        mlflow.log_metric("train/duration_s", 10.0 + seed)
        meta_path = checkpoint_dir / "clipline.json"
        meta = json.loads(meta_path.read_text())
        meta["run_id"] = run.info.run_id
        meta["snapshot_id"] = snapshot_id
        meta_path.write_text(json.dumps(meta))
        mlflow.log_artifacts(str(checkpoint_dir), "checkpoint")
        model = load_checkpoint(checkpoint_dir, "cpu").model
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            tags={"snapshot_id": snapshot_id or ""},
            pip_requirements=["torch", "open_clip_torch"],
            serialization_format="pickle",
        )
        return run.info.run_id, info.model_uri


def write_wds_set(out: Path, ds: Any, shards: int = 2, with_text_files: bool = True) -> Path:
    """A zero-shot set in CLIP_benchmark's webdataset layout (test/N.tar of <key>.jpg + <key>.cls)."""
    import io
    import tarfile

    (out / "test").mkdir(parents=True)
    (out / "test" / "nshards.txt").write_text(f"{shards}\n")
    for s in range(shards):
        with tarfile.open(out / "test" / f"{s}.tar", "w") as tf:
            for i in range(s, len(ds.labels), shards):
                for ext, data in (("jpg", ds.images[i]), ("cls", str(ds.labels[i]).encode())):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    if with_text_files:
        (out / "classnames.txt").write_text("\n".join(ds.classnames) + "\n")
        (out / "zeroshot_classification_templates.txt").write_text("\n".join(ds.templates) + "\n")
    return out


def write_wds_retrieval_set(out: Path, images: list[bytes], captions: list[list[str]], shards: int = 2) -> Path:
    """A retrieval set in CLIP_benchmark's webdataset layout (test/N.tar of <key>.jpg + <key>.txt,
    captions one per line; dataset_type.txt says retrieval)."""
    import io
    import tarfile

    (out / "test").mkdir(parents=True)
    (out / "test" / "nshards.txt").write_text(f"{shards}\n")
    (out / "dataset_type.txt").write_text("retrieval\n")
    for s in range(shards):
        with tarfile.open(out / "test" / f"{s}.tar", "w") as tf:
            for i in range(s, len(images), shards):
                for ext, data in (("jpg", images[i]), ("txt", "\n".join(captions[i]).encode())):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return out
