"""CLIP-score filtering (DataComp's CLIP score filter, Gadre et al. 2023): the cosine similarity of
a model's image and caption embeddings, per image-caption pair.

- :func:`load_scorer` loads the scoring model ``curate.clip_score_model`` names: by default the
  registry's ``champion``, so that each refresh filters its new data with the best model so far
  (None when there is no champion yet), or anything ``clipline evaluate --model`` takes.
- :func:`score_pairs` scores pairs in batches: images decoded and preprocessed in DataLoader
  worker processes while the model runs (on the GPU when there is one), captions tokenised by
  the model's own tokenizer. An image that cannot be decoded scores NaN, which the rule drops.
- Scores are cached per model (the sha256 of its weights) by image sha256 and caption md5, as
  Parquet files under ``<data-dir>/cache/clip_score/<model>/``, so a new threshold, a rebuild or
  a refresh does not score again a pair that model has scored.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from clipline.components.config import Config

CHAMPION = "champion"


class ClipScoreError(ValueError):
    """A scoring model that cannot be found or loaded; the message says which and what to do."""


@dataclass
class Scorer:
    """A loaded scoring model: ``label`` says which model it is (registry version, checkpoint or
    hub reference), ``identity`` the sha256 of its weights (the score cache's key)."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    label: str
    identity: str
    checkpoint_dir: Path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_scorer(cfg: Config) -> Scorer | None:
    """The model ``cfg.curate.clip_score_model`` names, loaded on ``clip_score_device``; None when
    that is ``champion`` and the registry has none yet. Raises ClipScoreError otherwise."""
    from clipline.components.model import checkpoint
    from clipline.components.model.errors import ModelError
    from clipline.components.tracking.registry import RegistryError, current_alias, resolve_model

    ref = cfg.curate.clip_score_model
    if cfg.curate.clip_score_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ClipScoreError(
                "curate.clip_score_device is 'cuda' but this machine has no CUDA device: set it to auto or cpu"
            )
    try:
        if ref == CHAMPION and current_alias(cfg, CHAMPION) is None:
            return None
        resolved = resolve_model(cfg, ref)
        loaded = checkpoint.load_checkpoint(resolved.checkpoint_dir, cfg.curate.clip_score_device)
    except (RegistryError, ModelError, FileNotFoundError) as e:
        raise ClipScoreError(
            f"curate.clip_score_model {ref!r} cannot be loaded: {e}; name a registered version or alias, a "
            "checkpoint directory or hub weights, or unset clip_score_threshold / clip_score_keep_fraction"
        ) from e
    if resolved.version:
        label = f"{cfg.tracking.registered_model} v{resolved.version}" + (
            f" ({ref})" if ref != resolved.version else ""
        )
    else:
        label = str(resolved.ref)
    weights = checkpoint.weights_file(resolved.checkpoint_dir)
    return Scorer(
        model=loaded.model,
        preprocess=loaded.preprocess,
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        label=label,
        identity=_file_sha256(weights)[:32],
        checkpoint_dir=resolved.checkpoint_dir,
    )


class _Images:
    """Image bytes -> (preprocessed tensor, decodable?) for a DataLoader."""

    def __init__(self, images: Sequence[bytes | None], preprocess: Any):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, bool]:
        import torch
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.images[i])) as im:
                return self.preprocess(im.convert("RGB")), True
        except Exception:  # noqa: BLE001 - any undecodable image scores NaN, the run goes on
            return torch.zeros(1), False


def _collate(batch: list[tuple[Any, bool]]) -> tuple[Any, Any]:
    import torch

    ok = torch.tensor([b[1] for b in batch])
    shape = next((b[0].shape for b in batch if b[1]), None)
    if shape is None:
        return None, ok
    return torch.stack([b[0] if b[1] else torch.zeros(shape) for b in batch]), ok


def score_pairs(
    scorer: Scorer,
    images: Sequence[bytes | None],
    captions: Sequence[str | None],
    batch_size: int = 256,
    workers: int | None = None,
) -> np.ndarray:
    """Cosine similarity of each image's and its caption's embedding (float32; NaN for an image
    that cannot be decoded), in batches of ``batch_size``; images are decoded in ``workers``
    DataLoader processes (default: the CPUs torch does not use, at least one) while the model runs."""
    import torch
    import torch.nn.functional as F

    n = len(images)
    out = np.full(n, np.nan, dtype=np.float32)
    if n == 0:
        return out
    if workers is None:
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    loader = torch.utils.data.DataLoader(
        _Images(images, scorer.preprocess),
        batch_size=batch_size,
        num_workers=workers if n > batch_size else 0,
        collate_fn=_collate,
        pin_memory=scorer.device == "cuda",
    )
    dev = torch.device(scorer.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    threads = torch.get_num_threads()
    if dev.type == "cpu" and loader.num_workers:
        # the decoding workers have cores of their own: the model takes the rest, not a contended share
        torch.set_num_threads(max(1, threads - loader.num_workers))
    start = 0
    try:
        with torch.inference_mode(), autocast:
            for pixels, ok in loader:
                end = start + len(ok)
                if pixels is not None:
                    tokens = scorer.tokenizer([c or "" for c in captions[start:end]]).to(dev, non_blocking=True)
                    img = F.normalize(scorer.model.encode_image(pixels.to(dev, non_blocking=True)).float(), dim=-1)
                    txt = F.normalize(scorer.model.encode_text(tokens).float(), dim=-1)
                    sim = (img * txt).sum(dim=-1).cpu().numpy()
                    keep = ok.numpy()
                    out[start:end][keep] = sim[keep]
                start = end
    finally:
        torch.set_num_threads(threads)
    return out


# ----- the score cache -----


def cache_dir(cfg: Config, scorer: Scorer) -> Path:
    return cfg.data_dir / "cache" / "clip_score" / scorer.identity


def write_cache_part(directory: Path, sha256: Sequence[str], caption_md5: Sequence[str], scores: np.ndarray) -> Path:
    """One more Parquet file of (sha256, caption_md5, score), written under a hidden name and
    renamed, so readers see whole files only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    table = pa.table(
        {
            "sha256": pa.array(list(sha256), pa.string()),
            "caption_md5": pa.array(list(caption_md5), pa.string()),
            "score": pa.array(scores, pa.float32()),
        }
    )
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return directory / name
