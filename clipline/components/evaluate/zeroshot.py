"""Zero-shot classification, the CLIP protocol as CLIP_benchmark implements it.

For each class, every template is filled with the class name, each text embedding is
L2-normalised, the embeddings are averaged over templates and normalised again. Images are
embedded and normalised; logits are ``100 * image @ classes``. Reported: top-1, top-5 (only with
at least 5 classes, as CLIP_benchmark) and mean per-class recall (sklearn's balanced accuracy:
the mean over classes present in the targets of each class's recall).

Differences from CLIP_benchmark that do not change the numbers: all prompts are encoded in
batches instead of one class at a time, and inference runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from clipline.components.evaluate.datasets import EvalDataset, Templates


@dataclass
class ZeroShotResult:
    """Metrics of one zero-shot set. ``confusion[t, p]`` counts images of class t predicted as p."""

    dataset: str
    n_images: int
    n_classes: int
    acc1: float
    acc5: float | None
    mean_per_class_recall: float
    per_class_recall: list[float | None]  # None where a class has no images
    confusion: list[list[int]] = field(repr=False)
    classnames: list[str] = field(repr=False, default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        """Stable metric names: ``<prefix>/acc1``, ``<prefix>/acc5``, ``<prefix>/mean_per_class_recall``."""
        out = {f"{prefix}/acc1": self.acc1, f"{prefix}/mean_per_class_recall": self.mean_per_class_recall}
        if self.acc5 is not None:
            out[f"{prefix}/acc5"] = self.acc5
        return out

    def worst_classes(self, n: int = 5) -> list[tuple[str, float, int]]:
        """The ``n`` classes with the lowest recall: (name, recall, number of images)."""
        counts = [sum(row) for row in self.confusion]
        ranked = sorted((r, i) for i, r in enumerate(self.per_class_recall) if r is not None)
        return [(self.classnames[i], r, counts[i]) for r, i in ranked[:n]]


def _prompts(classnames: Sequence[str], templates: Templates) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    owner: list[int] = []
    for ci, name in enumerate(classnames):
        filled = templates[name] if isinstance(templates, dict) else [t.format(c=name) for t in templates]
        texts.extend(filled)
        owner.extend([ci] * len(filled))
    return texts, owner


@torch.inference_mode()
def build_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Templates,
    device: str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """The (D, C) zero-shot weight matrix: column c is the normalised mean of class c's normalised prompts."""
    texts, owner = _prompts(classnames, templates)
    embs = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(embs)
    owner_t = torch.tensor(owner, device=emb.device)
    weights = torch.zeros(len(classnames), emb.shape[1], device=emb.device, dtype=emb.dtype)
    weights.index_add_(0, owner_t, emb)
    counts = torch.bincount(owner_t, minlength=len(classnames)).clamp(min=1).unsqueeze(1)
    weights = weights / counts
    weights = weights / weights.norm(dim=-1, keepdim=True)
    return weights.t().contiguous()


@torch.inference_mode()
def embed_images(model: Any, loader: Any, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings (N, D) and their integer targets (N,), in loader order."""
    feats, targets = [], []
    for images, target in loader:
        f = model.encode_image(images.to(device)).float()
        feats.append(F.normalize(f, dim=-1).cpu())
        targets.append(torch.as_tensor(target).cpu())
    return torch.cat(feats), torch.cat(targets)


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str], dataset: str = ""
) -> ZeroShotResult:
    """Top-1/top-5 accuracy, mean per-class recall and the confusion matrix from (N, C) logits."""
    n, c = logits.shape
    targets = targets.long()
    k = min(5, c)
    topk = logits.topk(k, dim=1, largest=True, sorted=True).indices
    hit = topk.eq(targets.unsqueeze(1))
    acc1 = hit[:, :1].any(dim=1).float().mean().item()
    acc5 = hit[:, :5].any(dim=1).float().mean().item() if c >= 5 else None
    pred = topk[:, 0]
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    support = confusion.sum(dim=1)
    recalls = [(confusion[i, i].item() / support[i].item()) if support[i] > 0 else None for i in range(c)]
    present = [r for r in recalls if r is not None]
    return ZeroShotResult(
        dataset=dataset,
        n_images=n,
        n_classes=c,
        acc1=acc1,
        acc5=acc5,
        mean_per_class_recall=sum(present) / len(present),
        per_class_recall=recalls,
        confusion=confusion.tolist(),
        classnames=list(classnames),
    )


def make_loader(torch_dataset: Any, batch_size: int, num_workers: int = 0, collate_fn: Any = None) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(
        torch_dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def run_zeroshot(
    model: Any,
    tokenizer: Any,
    preprocess: Any,
    dataset: EvalDataset,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
) -> ZeroShotResult:
    """Zero-shot classification of ``dataset`` with ``model``; see the module docstring for the protocol."""
    classifier = build_classifier(model, tokenizer, dataset.classnames, dataset.templates, device, batch_size)
    loader = make_loader(dataset.torch_dataset(preprocess), batch_size, num_workers)
    feats, targets = embed_images(model, loader, device)
    logits = 100.0 * feats @ classifier.cpu()
    return classification_metrics(logits, targets, dataset.classnames, dataset=dataset.name)
