"""Models, tokenizers and transforms, all built by open_clip from JSON configs.

Our own configs live in ``configs/*.json`` (open_clip's format) and are registered into open_clip
on import, so ``open_clip.create_model("clipline-tiny")`` works anywhere this module was imported.
open_clip's built-in names (``ViT-B-32``, ``ViT-B-16``, ``RN50``...) are accepted unchanged.
Checkpoints are read and written by :mod:`.checkpoint`; :func:`create` starts from one through it.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipline.components.model import checkpoint, towers  # towers: registers ours in timm (clipline_two_stream)
from clipline.components.model.errors import ModelError
from clipline.components.model.start import HUB_PREFIX, HUB_CONFIG, hub_file

CONFIG_DIR = Path(__file__).parent / "configs"


#: model name -> preprocess overrides / from-scratch initialisation options, from its JSON config
PREPROCESS_OVERRIDES: dict[str, dict[str, Any]] = {}
INIT_OPTIONS: dict[str, dict[str, Any]] = {}
_OUR_CONFIG_PATHS: list[Path] = []


def register_configs(path: str | os.PathLike = CONFIG_DIR) -> list[str]:
    """Register the JSON model configs at ``path`` (a folder of them, or one file) into open_clip, and
    return their names. A config may carry two blocks of our own, kept out of the model constructor's
    arguments:

    - ``preprocess_cfg`` (open_clip's hub-config key: ``resize_mode``, ``fill_color``,
      ``interpolation``...): applied to the model's preprocessing, so the checkpoint's
      ``open_clip_config.json`` records it and evaluation resizes the same way;
    - ``init_cfg``: how a model trained from scratch is initialised (see :func:`apply_init`); it
      changes only starting weights, so a checkpoint stays a plain open_clip model.

    Ours (``configs/``) are registered on import; a benchmark registers variants of them this way."""
    path = Path(path)
    _OUR_CONFIG_PATHS.append(path)
    open_clip.add_model_config(path)  # re-reads every registered file, ours included
    from open_clip import factory as _ocf

    names = []
    for p in _OUR_CONFIG_PATHS:
        for file in [p] if p.is_file() else sorted(p.glob("*.json")):
            cfg = _ocf._MODEL_CONFIGS.get(file.stem)
            if cfg is not None and "preprocess_cfg" in cfg:
                PREPROCESS_OVERRIDES[file.stem] = cfg.pop("preprocess_cfg")
            if cfg is not None and "init_cfg" in cfg:
                INIT_OPTIONS[file.stem] = cfg.pop("init_cfg")
            if p is path:
                names.append(file.stem)
    return names


register_configs()

#: the values ``init_cfg`` accepts
TEXT_ATTENTION_INITS = ("default", "uniform")


def apply_init(model: torch.nn.Module, init_cfg: dict[str, Any]) -> None:
    """Apply a config's ``init_cfg`` to a freshly built model.

    ``text_attention: "uniform"`` zeroes the query and key projections of every text layer. Each
    token then attends equally to itself and every token before it, so the end-of-text token that
    open_clip pools reads the mean of the caption's words: a bag of words, which composes words it
    has never seen together (a colour and a shape) instead of memorising each caption's pairing.
    The zeros are a fixed point of training, not just a start: a query's gradient is proportional
    to the keys and a key's to the queries, both zero, so AdamW (weight decay included) never
    moves them, and fine-tuning keeps them. The model is still open_clip's own architecture."""
    unknown = sorted(set(init_cfg) - {"text_attention"})
    mode = init_cfg.get("text_attention", "default")
    if unknown or mode not in TEXT_ATTENTION_INITS:
        raise ModelError(
            f"init_cfg {init_cfg!r} is not understood: the one option is text_attention, "
            f"one of {', '.join(TEXT_ATTENTION_INITS)}"
        )
    if mode == "uniform":
        for block in model.transformer.resblocks:
            attn = block.attn
            if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
                raise ModelError("text_attention 'uniform' needs text layers built on torch's MultiheadAttention")
            w = attn.embed_dim
            with torch.no_grad():
                attn.in_proj_weight[: 2 * w].zero_()
                if attn.in_proj_bias is not None:
                    attn.in_proj_bias[: 2 * w].zero_()


@dataclass
class ModelBundle:
    """A model with everything needed to feed it."""

    name: str
    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    train_transform: Callable
    val_transform: Callable
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))


def list_models() -> list[str]:
    """Every model name accepted: ours first, then open_clip's built-ins."""
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return ours + [m for m in open_clip.list_models() if m not in ours]


def model_config(name: str) -> dict[str, Any]:
    """The open_clip model config for ``name`` (a deep copy; ``hf-hub:org/repo``: the repo's).
    Raises ModelError naming the choices."""
    if name.startswith(HUB_PREFIX):  # the repo's own config, through the Hugging Face cache
        with open(hub_file(name[len(HUB_PREFIX) :], (HUB_CONFIG,), name), encoding="utf-8") as f:
            return json.load(f)["model_cfg"]
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelError(
            f"unknown model {name!r}: use one of ours ({', '.join(ours)}) or an open_clip name such as "
            "ViT-B-32, ViT-B-16, RN50 (see open_clip.list_models())"
        )
    return copy.deepcopy(cfg)


def create(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    aug: dict[str, Any] | None = None,
    tag: str | None = None,
    preprocess: dict[str, Any] | None = None,
) -> ModelBundle:
    """Build model ``name`` (fp32, on ``device``) with its tokenizer and transforms.

    ``name`` is one of our configs, an open_clip name, or ``hf-hub:org/repo`` (open_clip builds it
    from the repo's config and loads the repo's weights, through the Hugging Face cache); ``tag``
    an open_clip pretrained tag of ``name``, loaded the same way (see :mod:`.start`).
    ``pretrained``: a local checkpoint directory or weights file loaded after that (fine-tuning,
    read by :func:`.checkpoint.load_weights`); it must match the architecture, else
    CheckpointError. ``preprocess``: preprocessing that wins over the architecture's and the tag's
    (a start checkpoint's own). Nothing else is fetched: timm towers are built without ImageNet
    weights and the tokenizer vocabulary ships in the open_clip wheel.
    """
    cfg = model_config(name)
    weights = None
    if pretrained is not None:
        weights = checkpoint.weights_file(pretrained)  # a missing checkpoint fails before any work
    force = {**PREPROCESS_OVERRIDES.get(name, {}), **(preprocess or {})} or None
    model = open_clip.create_model(name, pretrained=tag, device=device, output_dict=True, force_preprocess_cfg=force)
    from_scratch = weights is None and tag is None and not name.startswith(HUB_PREFIX)
    if from_scratch and name in INIT_OPTIONS:
        apply_init(model, INIT_OPTIONS[name])
    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    towers.set_normalisation(model, pp.mean, pp.std)  # a two-stream tower undoes this model's own mean/std
    train_tf = make_train_transform(pp, aug)
    val_tf = image_transform_v2(pp, is_train=False)
    if weights is not None:
        checkpoint.load_weights(model, weights, model_name=name)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    return ModelBundle(
        name=name,
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        train_transform=train_tf,
        val_transform=val_tf,
        model_cfg=cfg,
        preprocess_cfg=preprocess_cfg,
    )


def preprocess_for(name: str) -> PreprocessCfg:
    """The preprocessing of model ``name`` from its config alone (no model built): input size plus
    the ``preprocess_cfg`` overrides of our JSON configs, open_clip's defaults otherwise."""
    size = model_config(name)["vision_cfg"]["image_size"]
    return PreprocessCfg(size=size, **PREPROCESS_OVERRIDES.get(name, {}))


def make_train_transform(pp: PreprocessCfg, aug: dict[str, Any] | None = None) -> Callable:
    """The training transform for preprocessing ``pp``: :func:`letterbox_train_transform` for a
    letterboxing model (``resize_mode`` "longest"), else open_clip's (RandomResizedCrop with
    ``aug``'s ``scale``, colour jitter and grey-scale options)."""
    aug = dict(aug or {})
    if pp.resize_mode == "longest":
        return letterbox_train_transform(
            image_transform_v2(pp, is_train=False), pp, float(aug.get("scale", (1.0, 1.0))[0])
        )
    with warnings.catch_warnings():
        # open_clip warns about every aug_cfg key but 'scale' even though it applies
        # color_jitter/gray_scale_prob itself (transform.py)
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform_v2(pp, is_train=True, aug_cfg=aug)


def letterbox_train_transform(
    val_tf: Callable, pp: PreprocessCfg, scale_min: float, max_shift: float = 0.1
) -> Callable:
    """The training transform of a model that letterboxes (``resize_mode`` "longest": the whole
    picture, longest side to the input size, padded with ``fill_color``): evaluation's own resize and
    pad, then a random zoom by a factor in [sqrt(scale_min), 1/sqrt(scale_min)] and a random shift of
    up to ``max_shift`` of the side, filled with the padding colour.

    open_clip's training transform (RandomResizedCrop) squashes the picture to a square with a random
    aspect ratio and may crop part of it away; for a letterboxing model that means training on
    distorted shapes it never sees at evaluation, and on crops that cut off the object a caption
    names. This keeps the aspect ratio and (for scale_min >= 0.8) nearly all of the picture, and
    changes no colour. No flips: captions may say "left" or "right"."""
    from torchvision import transforms as T

    steps = list(val_tf.transforms)  # ResizeKeepRatio, CenterCropOrPad, then to-RGB/tensor/normalise
    zoom = max(1e-3, min(1.0, scale_min)) ** 0.5
    fill = pp.fill_color if isinstance(pp.fill_color, int) else tuple(pp.fill_color)
    affine = T.RandomAffine(degrees=0, translate=(max_shift, max_shift), scale=(zoom, 1 / zoom), fill=fill)
    return T.Compose(steps[:2] + [affine] + steps[2:])
