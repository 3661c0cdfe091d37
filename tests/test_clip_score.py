"""The curate rule clip_score (DataComp's CLIP score filter) on real shards, a real checkpoint and a
real MLflow registry: scores equal the model's own cosine similarity, the rule keeps what its
threshold or kept share says, scores are cached per model, only new rows are scored."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from clipline.components.curate import curate
from clipline.components.curate.clip_score import ClipScoreError
from evalkit import make_checkpoint, simulate_training_run
from test_curate_helpers import config, read_snapshot, row, write_shard


def _rows(start: int, n: int) -> list[dict]:
    return [
        row(f"k{i:03d}", f"a photo of object number {i} on a table", seed=1000 + i) for i in range(start, start + n)
    ]


def _expected(ckpt: Path, rows: list[dict]) -> dict[str, float]:
    """Each pair's cosine similarity, computed one pair at a time with plain open_clip calls."""
    import io

    from PIL import Image

    from clipline.components.model.checkpoint import load_checkpoint

    m = load_checkpoint(ckpt, "cpu")
    out = {}
    with torch.inference_mode():
        for r in rows:
            img = m.preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")).unsqueeze(0)
            i = F.normalize(m.model.encode_image(img), dim=-1)
            t = F.normalize(m.model.encode_text(m.tokenizer([r["caption"]])), dim=-1)
            out[r["key"]] = float((i * t).sum())
    return out


def test_clip_score_filters_by_share_and_threshold_and_caches_per_model(data_dir: Path, tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "scorer", seed=3)
    rows = _rows(0, 40)
    broken = row("broken", "a photo of a broken picture file", seed=1)
    broken["image"] = b"\xff\xd8 not a jpeg"
    write_shard(data_dir, "s0", rows + [broken])
    cfg = config(data_dir, clip_score_model=str(ckpt), clip_score_keep_fraction=0.5, clip_score_batch_size=7)
    res = curate(cfg, track=False)

    want = _expected(ckpt, rows)
    clip = res.manifest["clip_score"]
    assert (clip["rows"], clip["scored"], clip["from_cache"], clip["undecodable"]) == (41, 41, 0, 1)
    assert clip["model"] == str(ckpt) and res.manifest["rule_order"][-1] == "clip_score"
    n_keep = math.ceil(0.5 * 41)  # the top half of the rows scored; the undecodable one is dropped
    top = sorted(want, key=want.get, reverse=True)[:n_keep]
    snap = read_snapshot(cfg, res.manifest)
    assert set(snap.column("key").to_pylist()) == set(top)
    assert res.counts["dropped"]["clip_score"] == 41 - n_keep
    got = dict(zip(snap.column("key").to_pylist(), snap.column("clip_score").to_pylist()))
    assert all(abs(got[k] - want[k]) < 1e-4 for k in got)
    assert set(snap.column("clip_score_model").to_pylist()) == {str(ckpt)}
    assert clip["threshold"] == pytest.approx(want[top[-1]], abs=1e-4)
    report = res.report_path.parent
    assert (report / "clip_score_histogram.png").is_file() and (report / "clip_score_lowest.png").is_file()
    assert "## CLIP score" in res.report_path.read_text()

    # a threshold instead: the rules changed, so every row is read again, and scored by the cache
    threshold = float(np.median(list(want.values())))
    cfg2 = config(data_dir, clip_score_model=str(ckpt), clip_score_threshold=threshold)
    res2 = curate(cfg2, track=False)
    assert (res2.manifest["clip_score"]["scored"], res2.manifest["clip_score"]["from_cache"]) == (0, 41)
    assert set(read_snapshot(cfg2, res2.manifest).column("key").to_pylist()) == {
        k for k, v in want.items() if v >= threshold
    }

    # new data: only the new rows are scored; the parent's rows keep theirs
    more = _rows(40, 10)
    write_shard(data_dir, "s1", more)
    res3 = curate(cfg2, track=False)
    assert res3.parent_id == res2.snapshot_id
    assert (res3.manifest["clip_score"]["rows"], res3.manifest["clip_score"]["scored"]) == (10, 10)
    want.update(_expected(ckpt, more))
    assert set(read_snapshot(cfg2, res3.manifest).column("key").to_pylist()) == {
        k for k, v in want.items() if v >= threshold
    }
    # another model scores afresh: the cache is per model
    other = make_checkpoint(tmp_path / "other", seed=4)
    res4 = curate(config(data_dir, clip_score_model=str(other), clip_score_threshold=threshold), track=False)
    assert (res4.manifest["clip_score"]["scored"], res4.manifest["clip_score"]["from_cache"]) == (51, 0)
    assert len(list((data_dir / "cache" / "clip_score").iterdir())) == 2


def test_clip_score_with_the_champion_waits_for_one_then_filters_with_it(data_dir: Path, tmp_path: Path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    write_shard(data_dir, "s0", _rows(0, 12))
    cfg = config(data_dir, clip_score_threshold=-1.0)  # the default model: the champion
    res = curate(cfg, track=False)
    assert "no 'champion'" in res.manifest["clip_score"]["skipped"] and res.counts["dropped"]["clip_score"] == 0
    assert "clip_score" not in read_snapshot(cfg, res.manifest).column_names

    ckpt = make_checkpoint(tmp_path / "champ", seed=5)
    run_id, uri = simulate_training_run(cfg, ckpt, res.snapshot_id)
    c = MlflowClient(mlflow_uri)
    c.create_registered_model(cfg.tracking.registered_model)
    mv = c.create_model_version(cfg.tracking.registered_model, uri, run_id=run_id)
    c.set_registered_model_alias(cfg.tracking.registered_model, "champion", mv.version)

    write_shard(data_dir, "s1", _rows(12, 6))
    res2 = curate(cfg, track=False)
    clip = res2.manifest["clip_score"]
    assert clip["model"] == f"{cfg.tracking.registered_model} v1 (champion)" and clip["scored"] == 6
    new_files = [cfg.snapshots_dir / f for f in res2.manifest["new_files"]]
    labels = {v for f in new_files for v in pq.read_table(f).column("clip_score_model").to_pylist()}
    assert labels == {clip["model"]}


def test_a_scoring_model_that_cannot_be_loaded_stops_curate_naming_it(data_dir: Path, tmp_path: Path):
    write_shard(data_dir, "s0", _rows(0, 4))
    with pytest.raises(ClipScoreError, match="clip_score_model '/nowhere/model' cannot be loaded"):
        curate(config(data_dir, clip_score_model="/nowhere/model", clip_score_threshold=0.2), track=False)
    if not torch.cuda.is_available():  # the device setting is read: CUDA asked for where there is none
        ckpt = make_checkpoint(tmp_path / "scorer", seed=3)
        with pytest.raises(ClipScoreError, match="clip_score_device is 'cuda' but this machine has no CUDA device"):
            curate(
                config(data_dir, clip_score_model=str(ckpt), clip_score_threshold=0.2, clip_score_device="cuda"),
                track=False,
            )
