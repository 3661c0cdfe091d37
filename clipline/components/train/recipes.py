"""Training recipes as data: named presets of ``[train]`` values for the scales people train at,
one TOML file each in ``recipes/`` (``[recipe]``: what it is for, the parameter range it is chosen
for, where its values come from; ``[train]``: the values).

``train.recipe`` names one, or ``auto`` (the default) chooses by the model's parameter count, or
``none`` applies none. A recipe sets only the ``[train]`` values the user did not set (in the
TOML file, ``CLIPLINE_TRAIN__*`` or a flag); the demo's own recipe counts as set.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent / "recipes"
AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    source: str
    min_params: int = 0
    max_params: int | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def fits(self, n_params: int) -> bool:
        return n_params >= self.min_params and (self.max_params is None or n_params < self.max_params)


@functools.cache
def recipes() -> dict[str, Recipe]:
    """Every packaged recipe, by name (the file's stem)."""
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        meta = data.get("recipe", {})
        out[path.stem] = Recipe(
            name=path.stem,
            description=meta["description"],
            source=meta["source"],
            min_params=int(meta.get("min_params", 0)),
            max_params=int(meta["max_params"]) if "max_params" in meta else None,
            values=dict(data.get("train", {})),
        )
    return out


def names() -> list[str]:
    return [AUTO, NONE, *recipes()]


@functools.cache
def param_count(model: str) -> int:
    """The number of parameters of model ``model``, built on the meta device (no memory, no weights)."""
    import open_clip
    import torch

    from clipline.components.model import factory  # noqa: F401  (registers our configs and towers)

    with torch.device("meta"):
        m = open_clip.create_model(model, pretrained=None, load_weights=False, device="meta")
    return sum(p.numel() for p in m.parameters())


def choose(name: str, model: str) -> Recipe | None:
    """The recipe ``name`` says for model ``model`` (``auto``: the one whose range holds its parameter
    count), or None (``none``, or no recipe fits)."""
    if name == NONE:
        return None
    if name != AUTO:
        try:
            return recipes()[name]
        except KeyError:
            raise ValueError(f"unknown train.recipe {name!r}: use one of {', '.join(names())}") from None
    n = param_count(model)
    return next((r for r in recipes().values() if r.fits(n)), None)


def apply(tc: Any, model: str) -> tuple[Any, Recipe | None, dict[str, Any]]:
    """``tc`` (a TrainConfig) with the chosen recipe's values for the fields the user did not set;
    the recipe and the values it set."""
    recipe = choose(tc.recipe, model)
    if recipe is None:
        return tc, None, {}
    given = tc.model_fields_set
    values = {k: v for k, v in recipe.values.items() if k not in given}
    return tc.model_validate({**tc.model_dump(), **values}), recipe, values
