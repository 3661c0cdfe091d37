"""Models, tokenizers and transforms, all built by open_clip from JSON configs.

Our own configs live in ``configs/*.json`` (open_clip's format) and are registered into open_clip
on import, so ``open_clip.create_model("clipline-tiny")`` works anywhere this module was imported.
open_clip's built-in names (``ViT-B-32``, ``ViT-B-16``, ``RN50``...) are accepted unchanged.

Checkpoint directory layout (the contract read by evaluate/export):
  ``open_clip_config.json`` = {"model_cfg": ..., "preprocess_cfg": ...}
  ``open_clip_model.safetensors`` = the model's state_dict
  ``clipline.json`` = model_name, snapshot_id, step, run_id, train config
Loadable with plain open_clip: ``create_model_and_transforms("local-dir:<dir>")`` or
``create_model_and_transforms(<name>, pretrained="<dir>/open_clip_model.safetensors")``; a model
whose image tower is one of ours (:mod:`.towers`, e.g. ``clipline_two_stream``) needs
``import clipline.components.model.towers`` first, which registers it in timm.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipline.components.model import towers  # registers our timm towers (clipline_two_stream)

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
META_FILE = "clipline.json"



def _register_configs() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Register our JSON configs into open_clip. A config may carry two blocks of our own, kept out
    of the model constructor's arguments:

    - ``preprocess_cfg`` (open_clip's hub-config key: ``resize_mode``, ``fill_color``,
      ``interpolation``...): applied to the model's preprocessing, so the checkpoint's
      ``open_clip_config.json`` records it and evaluation resizes the same way;
    - ``init_cfg``: how a model trained from scratch is initialised (see :func:`apply_init`); it
      changes only starting weights, so a checkpoint stays a plain open_clip model."""
    open_clip.add_model_config(CONFIG_DIR)
    from open_clip import factory as _ocf

    preprocess: dict[str, dict[str, Any]] = {}
    init: dict[str, dict[str, Any]] = {}
    for path in CONFIG_DIR.glob("*.json"):
        cfg = _ocf._MODEL_CONFIGS.get(path.stem)
        if cfg is not None and "preprocess_cfg" in cfg:
            preprocess[path.stem] = cfg.pop("preprocess_cfg")
        if cfg is not None and "init_cfg" in cfg:
            init[path.stem] = cfg.pop("init_cfg")
    return preprocess, init


#: model name -> preprocess overrides / from-scratch initialisation options, from its JSON config
PREPROCESS_OVERRIDES, INIT_OPTIONS = _register_configs()

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
        raise ModelError(f"init_cfg {init_cfg!r} is not understood: the one option is text_attention, "
                         f"one of {', '.join(TEXT_ATTENTION_INITS)}")
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


class ModelError(ValueError):
    """A model name or checkpoint that cannot be used; the message says which and what to do."""


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
    """The open_clip model config for ``name`` (a deep copy). Raises ModelError naming the choices."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelError(
            f"unknown model {name!r}: use one of ours ({', '.join(ours)}) or an open_clip name such as "
            "ViT-B-32, ViT-B-16, RN50 (see open_clip.list_models())")
    return copy.deepcopy(cfg)


def resolve_weights(path: str | os.PathLike) -> Path:
    """The weights file for a checkpoint given as a directory (our layout or any open_clip local
    dir) or as a file. Raises ModelError when nothing loadable is there."""
    p = Path(path)
    if p.is_dir():
        for cand in (WEIGHTS_FILE, "open_clip_pytorch_model.bin", "open_clip_model.bin", "model.pt"):
            if (p / cand).is_file():
                return p / cand
        raise ModelError(f"checkpoint directory {p} holds no {WEIGHTS_FILE}: give a directory written by "
                         "`clipline train` or a weights file")
    if p.is_file():
        return p
    raise ModelError(f"pretrained checkpoint {p} does not exist: give a checkpoint directory or a weights file")


def create(name: str, pretrained: str | os.PathLike | None = None, device: str | torch.device = "cpu",
           aug: dict[str, Any] | None = None) -> ModelBundle:
    """Build model ``name`` (fp32, on ``device``) with its tokenizer and transforms.

    ``pretrained``: a local checkpoint directory or weights file to start from (fine-tuning); it
    must match the architecture. Nothing is downloaded: timm towers are built without ImageNet
    weights and the tokenizer vocabulary ships in the open_clip wheel.
    """
    cfg = model_config(name)
    weights = None
    if pretrained is not None:
        weights = resolve_weights(pretrained)
    model = open_clip.create_model(name, pretrained=None, device=device, output_dict=True,
                                   force_preprocess_cfg=PREPROCESS_OVERRIDES.get(name))
    if weights is None and name in INIT_OPTIONS:
        apply_init(model, INIT_OPTIONS[name])
    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    try:
        towers.check_normalisation(model, pp.mean, pp.std, name)
    except ValueError as e:
        raise ModelError(str(e)) from None
    train_tf = make_train_transform(pp, aug)
    val_tf = image_transform_v2(pp, is_train=False)
    if weights is not None:
        try:
            open_clip.load_checkpoint(model, str(weights))
        except RuntimeError as e:
            raise ModelError(f"checkpoint {weights} does not fit model {name!r}: {str(e).splitlines()[0]}; "
                             "train with the model the checkpoint was made with") from e
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    return ModelBundle(name=name, model=model, tokenizer=open_clip.get_tokenizer(name),
                       train_transform=train_tf, val_transform=val_tf, model_cfg=cfg,
                       preprocess_cfg=preprocess_cfg)


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
        return letterbox_train_transform(image_transform_v2(pp, is_train=False), pp,
                                         float(aug.get("scale", (1.0, 1.0))[0]))
    with warnings.catch_warnings():
        # open_clip warns about every aug_cfg key but 'scale' even though it applies
        # color_jitter/gray_scale_prob itself (transform.py)
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform_v2(pp, is_train=True, aug_cfg=aug)


def letterbox_train_transform(val_tf: Callable, pp: PreprocessCfg, scale_min: float,
                              max_shift: float = 0.1) -> Callable:
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


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``clipline.json`` of a checkpoint directory ({} when absent)."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP/compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_checkpoint_dir(out_dir: str | os.PathLike, model: torch.nn.Module, model_cfg: dict[str, Any],
                        preprocess_cfg: dict[str, Any], meta: dict[str, Any],
                        extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: everything goes into a temporary sibling that is
    renamed into place, so a reader sees either the whole directory or none of it.

    ``extra_files`` maps file names to objects saved with ``torch.save`` (optimiser state...).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"model_cfg": model_cfg, "preprocess_cfg": _jsonable(preprocess_cfg)}, indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        for fname, obj in (extra_files or {}).items():
            torch.save(obj, tmp / fname)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_checkpoint_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a checkpoint directory with plain open_clip (``local-dir:``), as any consumer would."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        raise ModelError(f"{p} is not a checkpoint directory (no {CONFIG_FILE})")
    cfg = json.loads((p / CONFIG_FILE).read_text())
    model, train_tf, val_tf = open_clip.create_model_and_transforms(f"local-dir:{p}", device=device)
    name = read_checkpoint_meta(p).get("model_name", f"local-dir:{p}")
    return ModelBundle(name=name, model=model, tokenizer=open_clip.get_tokenizer(f"local-dir:{p}"),
                       train_transform=train_tf, val_transform=val_tf, model_cfg=cfg["model_cfg"],
                       preprocess_cfg=dict(model.visual.preprocess_cfg))
