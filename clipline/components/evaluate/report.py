"""Plots and tables of evaluation results (matplotlib with the Agg backend; no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipline.components.evaluate.zeroshot import ZeroShotResult

MAX_CONFUSION_CLASSES = 50


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def confusion_png(result: ZeroShotResult, path: str | Path) -> Path | None:
    """A row-normalised confusion matrix PNG; None (nothing written) above 50 classes."""
    import numpy as np

    if result.n_classes > MAX_CONFUSION_CLASSES:
        return None
    plt = _plt()
    cm = np.asarray(result.confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = result.n_classes
    size = max(4.0, min(16.0, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), result.classnames, rotation=90, fontsize=max(4, 10 - n // 8))
    ax.set_yticks(range(n), result.classnames, fontsize=max(4, 10 - n // 8))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.dataset}: top-1 {result.acc1:.3f}, {result.n_images} images")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def retrieval_grid_png(
    queries: Sequence[str],
    top_images: Sequence[Sequence[bytes]],
    path: str | Path,
    correct: Sequence[Sequence[bool]] | None = None,
) -> Path:
    """One row per text query: the caption, then its top images (green frame = the query's own image)."""
    from PIL import Image

    plt = _plt()
    rows = len(queries)
    cols = max((len(t) for t in top_images), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for r, (q, imgs) in enumerate(zip(queries, top_images)):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(Image.open(io.BytesIO(imgs[c])).convert("RGB"))
                ok = bool(correct and correct[r][c])
                for s in ax.spines.values():
                    s.set_edgecolor("green" if ok else "lightgray")
                    s.set_linewidth(3 if ok else 1)
            else:
                ax.axis("off")
        axes[r][0].set_title(q[:60], loc="left", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def metrics_markdown(metrics: Mapping[str, float], title: str = "Evaluation") -> str:
    """A markdown table of metric name -> value, sorted by name."""
    lines = [f"## {title}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def worst_classes_markdown(result: ZeroShotResult, n: int = 5) -> str:
    rows = result.worst_classes(n)
    lines = [f"Worst classes on `{result.dataset}`:", "", "| class | recall | images |", "|---|---:|---:|"]
    lines += [f"| {name} | {rec:.3f} | {cnt} |" for name, rec, cnt in rows]
    return "\n".join(lines) + "\n"
