"""Zero-shot evaluation sets for models trained on the toy web.

``write_heldout_set`` draws pictures of the 12 colour x shape combinations that the toy web of the
same seed never shows (:func:`~clipline.components.demo.corpus.heldout_combos`); ``write_seen_set``
draws fresh pictures of the 36 combinations it does show (none of these images is in the corpus:
they come from their own random stream). Pass the toy web's seed (``demo.seed``).

**Classes.** Both sets are classified among ALL 48 colour x shape names, not only the held-out
ones. Among the 12 held-out names alone, colour by itself would narrow a picture to one or two
candidates (each colour is held out with at most two shapes), so a model that ignores shape would
score about 75 %; among all 48, getting a held-out picture right needs both its colour and its
shape (colour alone gives 1/6, shape alone 1/8). Chance is 1/48 = 2.1 %.

Layout (CLIP_benchmark's conventions: classnames and templates keyed by dataset name)::

    out_dir/<name>/data.parquet       image (JPEG bytes), label ("red circle"), color, shape
    out_dir/<name>/classnames.json    {"<name>": ["red circle", "red square", ...]}   (48 names)
    out_dir/<name>/templates.json     {"<name>": ["a photo of one {c}.", ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipline.components.demo.corpus import (
    ALL_COMBOS,
    _rng,
    encode_jpeg,
    heldout_combos,
    render,
    sample_spec,
    seen_combos,
)

#: zero-shot prompts; ``{c}`` is a class name such as "red circle". They avoid "a"/"an" so every
#: class name reads correctly ("an orange heart").
TEMPLATES: tuple[str, ...] = (
    "a photo of one {c}.",
    "one {c} on a plain background.",
    "a picture showing the {c}.",
    "a simple illustration of one {c}.",
    "the {c} in this picture.",
    "a single {c}, nothing else.",
)


def classname(color: str, shape: str) -> str:
    return f"{color} {shape}"


CLASSNAMES: tuple[str, ...] = tuple(classname(c, s) for c, s in ALL_COMBOS)


@dataclass(frozen=True)
class EvalSet:
    """One written evaluation set (paths are absolute)."""

    name: str
    data: Path
    classnames_file: Path
    templates_file: Path
    classnames: tuple[str, ...]
    labels: tuple[str, ...]  # the classes that have images
    n_images: int

    @property
    def chance_acc1(self) -> float:
        """Top-1 accuracy of guessing uniformly among the class names."""
        return 1.0 / len(self.classnames)


def _write(out_dir: Path | str, name: str, combos: tuple[tuple[str, str], ...], seed: int, n_per_class: int) -> EvalSet:
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    d = Path(out_dir).resolve() / name
    d.mkdir(parents=True, exist_ok=True)
    images, labels, colors, shapes = [], [], [], []
    for k, (color, shape) in enumerate(combos):
        for j in range(n_per_class):
            rng = _rng(seed, f"eval/{name}/{color}/{shape}", j)
            spec = sample_spec(rng, color, shape, small_share=0.0, large_share=0.0)
            images.append(encode_jpeg(render(spec), 90))
            labels.append(classname(color, shape))
            colors.append(color)
            shapes.append(shape)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": labels, "color": colors, "shape": shapes})
    data = d / "data.parquet"
    tmp = d / "data.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(data)
    cls_file, tpl_file = d / "classnames.json", d / "templates.json"
    cls_file.write_text(json.dumps({name: list(CLASSNAMES)}, indent=1))
    tpl_file.write_text(json.dumps({name: list(TEMPLATES)}, indent=1))
    return EvalSet(name, data, cls_file, tpl_file, CLASSNAMES, tuple(classname(c, s) for c, s in combos), len(labels))


def write_heldout_set(out_dir: Path | str, seed: int = 0, n_per_class: int = 50, name: str = "heldout") -> EvalSet:
    """Pictures of the 12 colour x shape combinations the toy web of ``seed`` never shows,
    ``n_per_class`` each, classified among all 48 names (chance 1/48). Same seed, same bytes."""
    return _write(out_dir, name, heldout_combos(seed), seed, n_per_class)


def write_seen_set(out_dir: Path | str, seed: int = 0, n_per_class: int = 20, name: str = "seen") -> EvalSet:
    """Fresh pictures of the 36 combinations the training corpus of ``seed`` does show, for comparison."""
    return _write(out_dir, name, seen_combos(seed), seed, n_per_class)
