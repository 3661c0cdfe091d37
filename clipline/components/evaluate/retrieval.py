"""Image-text retrieval recall@k with CLIP_benchmark's definition.

Scores are cosine similarities of normalised embeddings. For each query, recall@k is 1 when at
least one of its positives is among the top k results, else 0; the metric is the mean over
queries. ``text_to_image`` queries with each caption and looks for its image (CLIP_benchmark's
``image_retrieval_recall@k``); ``image_to_text`` queries with each image and looks for any of its
captions (CLIP_benchmark's ``text_retrieval_recall@k``). ``k`` larger than the gallery is
clipped to the gallery size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clipline.components.evaluate.datasets import PairSet
from clipline.components.evaluate.zeroshot import make_loader


@dataclass
class RetrievalResult:
    split: str
    n_images: int
    n_texts: int
    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    top_images: list[list[int]] = field(repr=False, default_factory=list)  # per text, best image indices

    def metrics(self, prefix: str) -> dict[str, float]:
        """Stable names ``<prefix>/image_to_text_R<k>`` and ``<prefix>/text_to_image_R<k>``
        (MLflow metric names may not contain '@')."""
        out = {f"{prefix}/image_to_text_R{k}": v for k, v in self.image_to_text.items()}
        out.update({f"{prefix}/text_to_image_R{k}": v for k, v in self.text_to_image.items()})
        return out


def _collate(batch: list[tuple[Any, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@torch.inference_mode()
def embed_pairs(
    model: Any, tokenizer: Any, loader: Any, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Normalised image (N, D) and text (T, D) embeddings, and for each text the index of its image.

    ``loader`` yields ``(images, [[captions of image 0], [captions of image 1], ...])``.
    """
    imgs, txts, owner = [], [], []
    start = 0
    for images, texts in loader:
        imgs.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
        flat = [t for ts in texts for t in ts]
        txts.append(F.normalize(model.encode_text(tokenizer(flat).to(device)).float(), dim=-1).cpu())
        owner.extend(start + i for i, ts in enumerate(texts) for _ in ts)
        start += len(texts)
    return torch.cat(imgs), torch.cat(txts), owner


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries (rows of ``scores``) with at least one positive among their top-k columns."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hits = positives.gather(1, top)  # (Q, kmax) bool: is the j-th result a positive?
    return {k: hits[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks}


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    split: str = "val",
    keep_top: int = 0,
) -> RetrievalResult:
    """Recall@k both ways from normalised embeddings; ``text_image[t]`` is text t's image."""
    scores = text_emb @ image_emb.t()  # (T, N)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_image)), torch.as_tensor(list(text_image))] = True
    t2i = recall_at_k(scores, positives, ks)
    i2t = recall_at_k(scores.t(), positives.t(), ks)
    top = scores.topk(min(keep_top, scores.shape[1]), dim=1).indices.tolist() if keep_top else []
    return RetrievalResult(
        split=split,
        n_images=image_emb.shape[0],
        n_texts=text_emb.shape[0],
        image_to_text=i2t,
        text_to_image=t2i,
        top_images=top,
    )


def run_retrieval(
    model: Any,
    tokenizer: Any,
    preprocess: Any,
    pairs: PairSet,
    device: str = "cpu",
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    num_workers: int = 0,
    keep_top: int = 4,
) -> RetrievalResult:
    """Embed the pairs and compute recall@k both ways (see the module docstring)."""
    loader = make_loader(pairs.torch_dataset(preprocess), batch_size, num_workers, collate_fn=_collate)
    image_emb, text_emb, owner = embed_pairs(model, tokenizer, loader, device)
    return retrieval_metrics(image_emb, text_emb, owner, ks, split=pairs.name, keep_top=keep_top)
