"""The data feed: snapshot resolution, decoding, sharding across ranks and workers, resume skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipline.components.model import factory
from clipline.components.train import synthetic
from clipline.components.train.data import (
    BatchDecoder,
    SnapshotError,
    SnapshotStream,
    normalize_on_device,
    resolve_snapshot,
    split_normalize,
)


class _KeyDecoder:
    """Stands in for the image decoding to see which rows a stream yields (captions are unique)."""

    def __call__(self, table):
        return {"caption": table.column("caption").to_pylist()}


@pytest.fixture
def snap(tmp_path: Path):
    sid = synthetic.write_snapshot(tmp_path, n=300, size=48, row_group_rows=64, corrupt=3)
    # make captions unique so rows can be told apart
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / sid / "part-00000.parquet"
    t = pq.read_table(f)
    t = t.set_column(
        t.schema.get_field_index("caption"),
        "caption",
        pa.array([f"{c} #{k}" for c, k in zip(t.column("caption").to_pylist(), t.column("key").to_pylist())]),
    )
    pq.write_table(t, f, row_group_size=64)
    return tmp_path, sid


def _rows(info, **kw):
    return [c for b in SnapshotStream(info, _KeyDecoder(), 10, **kw) for c in b["caption"]]


def test_ranks_get_disjoint_equal_shares_of_the_train_split(snap):
    root, sid = snap
    info = resolve_snapshot(root, None, sid)
    manifest = json.loads((root / sid / "manifest.json").read_text())
    assert info.n_train == manifest["n_train"] and len(info.files) == 1
    r0, r1 = _rows(info, rank=0, world_size=2), _rows(info, rank=1, world_size=2)
    assert len(r0) == len(r1) == (info.n_train // 2 // 10) * 10
    assert not set(r0) & set(r1)
    # another epoch visits rows in another order; the same epoch in the same order
    assert _rows(info, epoch=1) != _rows(info, epoch=0) and _rows(info, epoch=0) == _rows(info, epoch=0)


def test_skip_resumes_at_the_same_row_and_workers_interleave_exactly(snap):
    root, sid = snap
    info = resolve_snapshot(root, None, sid)
    full = _rows(info, num_workers=1)
    assert _rows(info, num_workers=1, skip_batches=4) == full[40:]
    stream = SnapshotStream(info, _KeyDecoder(), 10, num_workers=2)
    two = [c for b in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2) for c in b["caption"]]
    assert len(two) == stream.batches_per_epoch() * 10
    skipped = SnapshotStream(info, _KeyDecoder(), 10, num_workers=2, skip_batches=3)
    rest = [c for b in torch.utils.data.DataLoader(skipped, batch_size=None, num_workers=2) for c in b["caption"]]
    assert rest == two[30:]


def test_decoder_makes_model_ready_tensors_and_counts_bad_images(snap):
    root, sid = snap
    info = resolve_snapshot(root, None, sid)
    b = factory.create("clipline-nano")
    dec = BatchDecoder(b.train_transform, b.tokenizer, b.image_size)
    batches = list(SnapshotStream(info, dec, 32, seed=1))
    assert all(x["image"].shape[1:] == (3, 32, 32) and x["text"].shape[1] == 16 for x in batches)
    assert sum(x["n_bad"] for x in batches) + sum(x["image"].shape[0] for x in batches) == len(batches) * 32
    assert 1 <= sum(x["n_bad"] for x in batches) <= 3


def test_uint8_feed_normalised_on_device_equals_the_float_feed(snap):
    """The GPU feed (uint8 pixels from the workers, normalised after the copy) gives the model the same
    tensors as the float feed, and a quarter of the bytes. Compared through the deterministic
    evaluation transform: the random training transforms draw from process-wide RNGs (open_clip's
    colour jitter from ``random``) that other threads of a test session may draw from too."""
    root, sid = snap
    info = resolve_snapshot(root, None, sid)
    b = factory.create("clipline-nano")
    as_float = BatchDecoder(b.val_transform, b.tokenizer, b.image_size)
    as_uint8 = BatchDecoder(b.val_transform, b.tokenizer, b.image_size, uint8=True)
    f = list(SnapshotStream(info, as_float, 32, seed=1))
    u = list(SnapshotStream(info, as_uint8, 32, seed=1))
    assert len(f) == len(u) > 0
    for x, y in zip(f, u):
        assert y["image"].dtype == torch.uint8 and x["image"].dtype == torch.float32
        assert y["image"].element_size() * 4 == x["image"].element_size()
        torch.testing.assert_close(
            normalize_on_device(y["image"], as_uint8.mean, as_uint8.std), x["image"], rtol=0, atol=1e-6
        )
        assert torch.equal(x["text"], y["text"]) and x["n_bad"] == y["n_bad"]
    assert normalize_on_device(f[0]["image"], as_uint8.mean, as_uint8.std) is f[0]["image"]


def test_uint8_feed_runs_the_random_training_transform_before_the_split(snap):
    """With crops and colour jitter, the uint8 feed still gives model-ready batches of the right size
    and range (the random steps run on PIL images in the workers, before ToTensor)."""
    root, sid = snap
    info = resolve_snapshot(root, None, sid)
    b = factory.create(
        "clipline-nano", aug={"scale": (0.5, 1.0), "color_jitter_prob": 0.5, "color_jitter": (0.3, 0.3, 0.3, 0.0)}
    )
    dec = BatchDecoder(b.train_transform, b.tokenizer, b.image_size, uint8=True)
    assert [type(t).__name__ for t in dec.transform.transforms][-1] != "Normalize"
    batch = next(iter(SnapshotStream(info, dec, 32, seed=1)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
    x = normalize_on_device(batch["image"], dec.mean, dec.std)
    assert x.dtype == torch.float32 and -2.5 < float(x.min()) < float(x.max()) < 2.7


def test_uint8_feed_refuses_a_transform_it_cannot_split():
    with pytest.raises(ValueError, match="uint8 feed needs a transform ending in ToTensor, Normalize"):
        split_normalize(lambda img: img)


def test_bad_snapshots_are_named(tmp_path: Path):
    with pytest.raises(SnapshotError, match="'abc' has no manifest"):
        resolve_snapshot(tmp_path, None, "abc")
    sid = synthetic.write_snapshot(tmp_path, n=20, size=32)
    (tmp_path / sid / "part-00000.parquet").unlink()
    with pytest.raises(SnapshotError, match="missing"):
        resolve_snapshot(tmp_path, None, sid)
    # a snapshot in which curate kept nothing (every URL failed, say) says so and what to do
    (tmp_path / "empty").mkdir()
    manifest = {
        "files": [],
        "n_rows": 0,
        "counts": {"input": 2, "kept": 0, "dropped": {"failed_download": 2, "dup_url": 0}},
    }
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"no rows to train on \(dropped by curate: failed_download 2\); ingest"):
        resolve_snapshot(tmp_path, None, "empty")


def test_the_planned_batches_are_the_torch_feeds_batches_across_ranks_epochs_and_a_resume(snap):
    """epoch_batch_plan, which the Ray Data feed follows, writes out exactly the batches the torch
    feed (SnapshotStream through a DataLoader of 2 workers) yields: same rows, same batches, same
    order, per rank and epoch, and after skipping batches on resume."""
    from clipline.components.train.data import PlannedBatchReader, epoch_batch_plan

    root, sid = snap
    snap = resolve_snapshot(root, None, sid)
    reader = PlannedBatchReader([str(f) for f in snap.files], _keys_only, with_keys=True)
    for epoch, rank, skip in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 3)]:
        args = dict(seed=5, epoch=epoch, rank=rank, world_size=2, num_workers=2, skip_batches=skip)
        stream = SnapshotStream(snap, _keys_only, 8, **args, with_keys=True)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        torch_batches = [b["key"] for b in loader]
        planned = [reader.rows(b).column("key").to_pylist() for b in epoch_batch_plan(snap, 8, **args)]
        assert planned == torch_batches and len(planned) == stream.batches_per_epoch() - skip
    # the two ranks share nothing within an epoch
    ranks = [
        {
            k
            for b in epoch_batch_plan(snap, 8, seed=5, epoch=0, rank=r, world_size=2, num_workers=2)
            for k in reader.rows(b).column("key").to_pylist()
        }
        for r in (0, 1)
    ]
    assert ranks[0] and not (ranks[0] & ranks[1])


def _keys_only(rows):
    """A decoder that keeps nothing but a count (the rows' keys come back beside it)."""
    return {"image": torch.zeros(rows.num_rows), "text": torch.zeros(rows.num_rows), "n_bad": 0}
