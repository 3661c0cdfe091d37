"""The data feed: snapshot Parquet files -> batches of (image tensor, token ids).

One plain function does the work (:func:`BatchDecoder.__call__`: an Arrow batch of ``image`` bytes and
``caption`` strings -> normalised, augmented image tensors and token ids). Two ways to run it:

* :class:`SnapshotStream`, a torch ``IterableDataset`` over the snapshot's files, for one process with
  DataLoader workers (the default on one machine);
* :func:`ray_epoch_batches`, the same batches read and decoded in Ray Data tasks (on a cluster: the
  trainers do no decoding, and the tasks run wherever the cluster has CPUs).

Both feeds give each rank the same rows in the same batches in the same order
(:func:`epoch_batch_plan` writes that order out), so either resumes mid-epoch at the same position.

Order is deterministic given (seed, epoch): row groups are visited in a seeded permutation, rows
within a row group in a seeded permutation, and row ``i`` of that stream belongs to shard
``i % n_shards`` where a shard is one (rank, worker role) pair. Every shard therefore gets the
same number of full batches, DataLoader's round robin over workers is exact, and a resumed run can
skip the batches it already trained on without decoding them.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

COLUMNS = ["image", "caption"]


class SnapshotError(ValueError):
    """A snapshot that cannot be trained on; the message says which and what to do."""


@dataclass
class SnapshotInfo:
    snapshot_id: str
    manifest: dict[str, Any]
    files: list[Path | str]  # local paths, or object-storage URLs for a snapshot in object storage
    n_train: int
    row_groups: list[tuple[int, int, int]] = field(default_factory=list)  # (file index, row group, rows)
    location: str = ""  # the snapshot's directory: a local path or a URL (s3://bucket/.../<id>)


def open_parquet(f: Path | str) -> pq.ParquetFile:
    """A snapshot file, local or in object storage (any fsspec URL; credentials and endpoint from the
    environment, as :mod:`clipline.components.storage` describes)."""
    from clipline.components import storage

    if storage.protocol(str(f)) is None:
        return pq.ParquetFile(f)
    import fsspec

    with storage.storage_errors("snapshot file", str(f)):
        fs, path = fsspec.core.url_to_fs(str(f))
        return pq.ParquetFile(fs.open(path, "rb"))


def resolve_snapshot(snapshots_dir: Path | str, catalog_path: Path | None, snapshot_id: str | None) -> SnapshotInfo:
    """Find a snapshot's manifest and data files.

    ``snapshot_id=None`` takes the catalog's latest snapshot. A snapshot directory with a
    ``manifest.json`` is accepted even when the catalog does not know it. ``snapshot_id`` may also be
    the URL of a snapshot directory in object storage (``s3://bucket/prefix/snapshots/<id>``, as
    curate wrote it and a copy put it there), and ``snapshots_dir`` may be such a URL's parent. Reads
    exactly ``manifest["files"]`` (relative to ``snapshots_dir``), counting the rows with
    ``split == 'train'``.
    """
    from clipline.components import storage

    if snapshot_id is None:
        latest = None
        if catalog_path is not None and Path(catalog_path).exists():
            from clipline.components.catalog import Catalog

            with Catalog(catalog_path, read_only=True) as cat:
                latest = cat.latest_snapshot()
        if latest is None:
            raise SnapshotError(
                f"no snapshot in the catalog {catalog_path}: run `clipline curate` first, or pass --snapshot ID"
            )
        snapshot_id = latest["snapshot_id"]
    # one path for both: a local directory or a URL, read through fsspec (local paths stay paths)
    base, snapshot_id, in_store = storage.snapshot_location(snapshots_dir, snapshot_id)
    location = f"{base}/{snapshot_id}"
    name = location if in_store else repr(snapshot_id)
    mpath = f"{location}/manifest.json"
    import fsspec

    with storage.storage_errors("snapshot", location):
        fs, root = fsspec.core.url_to_fs(base)
        try:  # read first: a probe of the bucket cannot tell a missing bucket from an unreachable store
            manifest = json.loads(fs.cat_file(f"{root}/{snapshot_id}/manifest.json"))
        except FileNotFoundError:
            storage.check_bucket(fs, "snapshot", location)
            hint = (
                "give the URL of a snapshot directory (the one holding manifest.json), copied whole from a "
                "data dir's snapshots/"
                if in_store
                else "give an id from `clipline curate` (directories under the snapshots dir)"
            )
            raise SnapshotError(f"snapshot {name} has no manifest at {mpath}: {hint}") from None
        rel = manifest.get("files")
        if not rel:
            if manifest.get("n_rows") == 0:  # curate kept nothing: say why, not that a list is empty
                dropped = {k: v for k, v in (manifest.get("counts", {}).get("dropped") or {}).items() if v}
                why = ", ".join(f"{k} {v}" for k, v in dropped.items()) or "no successfully fetched rows"
                raise SnapshotError(
                    f"snapshot {name} has no rows to train on (dropped by curate: {why}); ingest URLs "
                    "that fetch, or loosen the curate rules, then curate again"
                )
            raise SnapshotError(f"snapshot {name}: manifest {mpath} lists no 'files'")
        missing = [f"{base}/{r}" for r in rel if not fs.isfile(f"{root}/{r}")]
        if missing:
            raise SnapshotError(f"snapshot {name}: data files listed in {mpath} are missing: {missing[:3]}")
    files: list[Path | str] = [f"{base}/{r}" if in_store else Path(base) / r for r in rel]
    n_train, row_groups = _train_row_groups(files)
    if n_train == 0:
        raise SnapshotError(f"snapshot {name} has no rows with split == 'train'")
    return SnapshotInfo(snapshot_id, manifest, files, n_train, row_groups, location)


def _train_row_groups(files: list[Path | str]) -> tuple[int, list[tuple[int, int, int]]]:
    """Rows with split == 'train', in all and per (file index, row group, rows)."""
    row_groups: list[tuple[int, int, int]] = []
    n_train = 0
    for i, f in enumerate(files):
        pf = open_parquet(f)
        names = set(pf.schema_arrow.names)
        lacking = {"image", "caption", "split"} - names
        if lacking:
            raise SnapshotError(f"snapshot file {f} lacks columns {sorted(lacking)} (snapshot contract)")
        for rg in range(pf.num_row_groups):
            split = pf.read_row_group(rg, columns=["split"]).column("split")
            n = int(pc.sum(pc.equal(split, "train")).as_py() or 0)
            if n:
                row_groups.append((i, rg, n))
                n_train += n
    return n_train, row_groups


class BatchDecoder:
    """Arrow batch (``image`` bytes, ``caption``) -> {"image": (B,3,S,S), "text": long (B,L)}.

    ``image`` is normalised float32 by default. With ``uint8=True`` the workers stop before
    ``ToTensor``/``Normalize`` and hand over uint8 pixels (a quarter of the bytes to pass between
    processes and to copy to the GPU); the consumer finishes with :func:`normalize_on_device`, which
    gives the same values as the float path. For a GPU, where workers and pinned copies, not the
    model, are what limit a small model's rate.

    Undecodable images are skipped and counted in ``out["n_bad"]`` (never a crash). JPEGs are decoded
    at reduced scale (PIL ``draft``) when much larger than the model's input, which is exact for the
    model (it sees ``image_size`` pixels) and several times faster.
    """

    def __init__(self, transform: Callable, tokenizer: Callable, image_size: int, *, uint8: bool = False):
        self.transform = transform
        self.tokenizer = tokenizer
        self.draft_size = (int(image_size * 1.25),) * 2
        self.uint8 = uint8
        self.mean = self.std = None
        if uint8:
            self.transform, self.mean, self.std = split_normalize(transform)

    def decode(self, data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", self.draft_size)
        return img.convert("RGB")

    def _pixels(self, img: Image.Image) -> torch.Tensor:
        out = self.transform(img)
        if self.uint8:  # one writable copy of the PIL pixels, channels first
            return torch.from_numpy(np.array(out if out.mode == "RGB" else out.convert("RGB"), dtype=np.uint8)).permute(
                2, 0, 1
            )
        return out

    def __call__(self, batch: pa.RecordBatch | pa.Table | dict[str, Any]) -> dict[str, Any]:
        if isinstance(batch, (pa.RecordBatch, pa.Table)):
            images, captions = batch.column("image").to_pylist(), batch.column("caption").to_pylist()
        else:
            images, captions = list(batch["image"]), list(batch["caption"])
        tensors, texts, bad = [], [], 0
        for data, cap in zip(images, captions):
            try:
                if data is None:
                    raise ValueError("no image bytes")
                tensors.append(self._pixels(self.decode(data)))
                texts.append(str(cap or ""))
            except (UnidentifiedImageError, OSError, ValueError):
                bad += 1
        if not tensors:
            dtype = torch.uint8 if self.uint8 else torch.float32
            return {"image": torch.empty(0, dtype=dtype), "text": torch.empty(0, dtype=torch.long), "n_bad": bad}
        return {"image": torch.stack(tensors), "text": self.tokenizer(texts), "n_bad": bad}


def split_normalize(transform: Callable) -> tuple[Callable, tuple[float, ...], tuple[float, ...]]:
    """Split an open_clip/torchvision ``Compose`` ending in ``ToTensor, Normalize`` into the PIL part
    and Normalize's mean and std. Raises ValueError for a transform of another shape."""
    steps = list(getattr(transform, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        raise ValueError(
            f"uint8 feed needs a transform ending in ToTensor, Normalize; got {names}: "
            "use the float feed (uint8=False) for this transform"
        )
    from torchvision.transforms import Compose

    norm = steps[-1]
    return Compose(steps[:-2]), tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def normalize_on_device(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B,3,S,S) pixels -> what ``ToTensor`` + ``Normalize(mean, std)`` would give, computed
    where ``images`` lives (on the GPU after the copy). Float tensors pass through unchanged."""
    if images.dtype != torch.uint8:
        return images
    m, s = _channel_stats(tuple(mean), tuple(std), images.device)
    return images.to(torch.float32).div_(255).sub_(m).div_(s).to(dtype)


@functools.lru_cache(maxsize=8)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """mean and std as (1,C,1,1) tensors on ``device``, made once (not a host-to-device copy per batch)."""

    def as_tensor(v: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(v, device=device, dtype=torch.float32).view(1, -1, 1, 1)

    return as_tensor(mean), as_tensor(std)


def train_rows(pf: pq.ParquetFile, row_group: int, columns: list[str], indices: Any) -> pa.Table:
    """``columns`` of the train rows of one row group, at ``indices`` among that row group's train
    rows (the positions both feeds plan in)."""
    t = pf.read_row_group(row_group, columns=columns + ["split"])
    t = t.filter(pc.equal(t.column("split"), "train")).select(columns)
    return t.take(pa.array(indices, type=pa.int64()))


class SnapshotStream(torch.utils.data.IterableDataset):
    """Yields ready batches (dicts of tensors, local batch size) of one epoch's train rows for one
    rank; split further across DataLoader workers. Use with ``DataLoader(batch_size=None)``.

    ``skip_batches``: batches of this epoch already trained on (for resume); they are skipped
    without decoding. Partial batches at the end of an epoch are dropped.
    """

    def __init__(
        self,
        info: SnapshotInfo,
        decoder: BatchDecoder,
        local_batch: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        skip_batches: int = 0,
        with_keys: bool = False,
    ):
        self.info, self.decoder, self.local_batch = info, decoder, local_batch
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_workers = max(1, num_workers)
        self.skip_batches = skip_batches
        self.columns = COLUMNS + (["key"] if with_keys else [])

    def batches_per_epoch(self) -> int:
        """Full local batches each rank gets per epoch (the same on every rank)."""
        n_shards = self.world_size * self.num_workers
        return (self.info.n_train // n_shards // self.local_batch) * self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = torch.utils.data.get_worker_info()
        worker = wi.id if wi is not None else 0
        n_workers = wi.num_workers if wi is not None else 1
        if n_workers != self.num_workers:
            raise RuntimeError(f"SnapshotStream built for {self.num_workers} workers, run with {n_workers}")
        n_shards = self.world_size * n_workers
        # DataLoader round-robins workers starting at worker 0, and batch k of the epoch belongs to role
        # k % n_workers; after skipping s batches, worker w plays role (w + s) % n_workers so that the
        # first batch yielded is batch s of the uninterrupted order.
        role = (worker + self.skip_batches) % n_workers
        shard = self.rank * n_workers + role
        per_shard = self.info.n_train // n_shards // self.local_batch  # full batches per shard
        skip = len(range(role, self.skip_batches, n_workers)) * self.local_batch
        limit = per_shard * self.local_batch
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.info.row_groups))
        pfs: dict[int, pq.ParquetFile] = {}
        taken, pos = 0, 0  # rows of this shard's stream passed so far; rows of the epoch passed so far
        pieces: list[pa.Table] = []
        n_pending = 0
        for j in order:
            fi, rg, n = self.info.row_groups[j]
            perm = rng.permutation(n)  # drawn for every row group so all shards share one order
            mine = perm[(shard - pos) % n_shards :: n_shards]
            pos += n
            before, taken = taken, min(limit, taken + len(mine))
            start, stop = max(0, skip - before), min(len(mine), limit - before)
            if start < stop:
                if fi not in pfs:
                    pfs[fi] = open_parquet(self.info.files[fi])
                pieces.append(train_rows(pfs[fi], rg, self.columns, mine[start:stop]))
                n_pending += stop - start
                while n_pending >= self.local_batch:
                    whole = pa.concat_tables(pieces).combine_chunks()
                    yield _decode(self.decoder, whole.slice(0, self.local_batch))
                    pieces = [whole.slice(self.local_batch)]
                    n_pending -= self.local_batch
            if taken >= limit:
                return


def _decode(decoder: Callable, rows: pa.Table) -> dict[str, Any]:
    """``decoder`` over ``rows``, with the rows' keys beside the batch when they were read. Keys of
    undecodable rows are kept too (the decoder drops their pixels): ``key`` names the rows the batch
    was made from."""
    out = decoder(rows)
    if "key" in rows.column_names:
        out["key"] = rows.column("key").to_pylist()
    return out


def epoch_batch_plan(
    info: SnapshotInfo,
    local_batch: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    skip_batches: int = 0,
) -> list[list[tuple[int, int, list[int]]]]:
    """The batches one rank trains on in one epoch, in order, after the first ``skip_batches``: each
    a list of (file index, row group, indices into that row group's train rows). This is the order
    :class:`SnapshotStream` yields through a DataLoader of ``num_workers`` workers (same seed,
    epoch, rank and world size), written out so another feed can follow it."""
    n_roles = max(1, num_workers)
    n_shards = world_size * n_roles
    per_shard = info.n_train // n_shards // local_batch  # full batches per shard, the same for all
    limit = per_shard * local_batch
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(info.row_groups))
    streams: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(n_roles)]
    taken, pos = [0] * n_roles, 0
    for j in order:
        if min(taken) >= limit:
            break
        fi, rg, n = info.row_groups[j]
        perm = rng.permutation(n)  # drawn for every row group so all shards share one order
        for role in range(n_roles):
            shard = rank * n_roles + role
            mine = perm[(shard - pos) % n_shards :: n_shards][: limit - taken[role]]
            if len(mine):
                streams[role].append((fi, rg, mine))
                taken[role] += len(mine)
        pos += n

    def batches_of(stream: list[tuple[int, int, np.ndarray]]) -> list[list[tuple[int, int, list[int]]]]:
        out, cur, room = [], [], local_batch
        for fi, rg, idx in stream:
            while len(idx):
                part, idx = idx[:room], idx[room:]
                cur.append((int(fi), int(rg), [int(i) for i in part]))
                room -= len(part)
                if room == 0:
                    out.append(cur)
                    cur, room = [], local_batch
        return out

    per_role = [batches_of(st) for st in streams]
    # DataLoader's round robin: batch k of the epoch is batch k // n of role k % n
    merged = [per_role[k % n_roles][k // n_roles] for k in range(per_shard * n_roles)]
    return merged[skip_batches:]


class PlannedBatchReader:
    """Reads and decodes planned batches (:func:`epoch_batch_plan`) inside Ray Data tasks: one input
    row ``{"plan": JSON}`` -> one decoded batch (numpy ``image``, ``text``; ``n_bad`` and, when asked,
    ``key`` as side columns carried on the batch's first row)."""

    def __init__(self, files: list[str], decoder: Callable, with_keys: bool = False):
        self.files, self.decoder, self.with_keys = files, decoder, with_keys
        self.columns = COLUMNS + (["key"] if with_keys else [])
        self._open: dict[int, pq.ParquetFile] = {}

    def rows(self, plan: list[tuple[int, int, list[int]]]) -> pa.Table:
        tables = []
        for fi, rg, idx in plan:
            if fi not in self._open:
                self._open[fi] = open_parquet(self.files[fi])
            tables.append(train_rows(self._open[fi], rg, self.columns, idx))
        return pa.concat_tables(tables).combine_chunks()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (plan,) = batch["plan"]
        out = _decode(self.decoder, self.rows(json.loads(plan)))
        n = len(out["text"])
        result = {
            "image": out["image"].numpy(),
            "text": out["text"].numpy(),
            "n_bad": np.array([out["n_bad"]] + [0] * max(0, n - 1), dtype=np.int64)[:n],
        }
        if self.with_keys:
            result["key"] = np.array(["\n".join(out["key"])] + [""] * max(0, n - 1), dtype=object)[:n]
        return result


def ray_epoch_batches(
    info: SnapshotInfo,
    decoder: Callable,
    local_batch: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    skip_batches: int = 0,
    with_keys: bool = False,
    prefetch_batches: int = 4,
    concurrency: int | tuple[int, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """One rank's batches of one epoch through Ray Data: the batches of :func:`epoch_batch_plan`
    (the torch feed's, for the same arguments) read from the snapshot's files and decoded by
    ``decoder`` in Ray Data tasks, yielded in order as the torch feed's dicts of tensors. Call from
    a Ray Train worker or any process connected to Ray; the files must be readable where the tasks
    run. A batch whose every image is undecodable arrives empty and its count of bad images is lost
    (Ray Data drops empty blocks' side columns)."""
    import ray.data

    plan = epoch_batch_plan(
        info,
        local_batch,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        skip_batches=skip_batches,
    )
    if not plan:
        return
    ds = ray.data.from_items([{"plan": json.dumps(b)} for b in plan], override_num_blocks=len(plan))
    ds.context.execution_options.preserve_order = True  # batch k comes out k-th
    ds = ds.map_batches(
        PlannedBatchReader,
        fn_constructor_kwargs={"files": [str(f) for f in info.files], "decoder": decoder, "with_keys": with_keys},
        batch_size=1,
        batch_format="numpy",
        concurrency=concurrency or (1, 2),
    )
    for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches):
        out: dict[str, Any] = {
            # Ray hands read-only views of its blocks: one writable copy where needed
            "image": torch.from_numpy(np.require(b["image"], requirements=["C", "W"])),
            "text": torch.from_numpy(np.require(b["text"], requirements=["C", "W"])),
            "n_bad": int(b["n_bad"].sum()) if len(b["n_bad"]) else 0,
        }
        if with_keys:
            out["key"] = str(b["key"][0]).split("\n") if len(b["key"]) else []
        yield out
