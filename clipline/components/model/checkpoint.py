"""The checkpoint format: one directory that plain open_clip loads. This module is its one reader
and writer; train, evaluate, tracking and export go through it.

A checkpoint directory holds
  ``open_clip_config.json``        {"model_cfg": <open_clip model config>, "preprocess_cfg": {...}}
  ``open_clip_model.safetensors``  the model's ``state_dict`` (what :func:`save_checkpoint` writes)
  ``clipline.json``                our metadata: model_name, snapshot_id, snapshot_uri, step, run_id, train config
                                   (optional: a checkpoint from elsewhere has none)
and any other file a writer adds (the train stage's ``train_state.pt``).

Weights are read from the first of :data:`WEIGHTS_FILES` present, so directories written by other
open_clip tools (``open_clip_pytorch_model.bin``...) load too; they are loaded with open_clip's own
``load_checkpoint`` (strict), so what loads here loads in open_clip. The directory loads without
clipline: ``open_clip.create_model_and_transforms("local-dir:<dir>")``, or
``create_model_and_transforms(<registered name>, pretrained="<dir>/open_clip_model.safetensors")``
(CLIP_benchmark's ``--model local-dir:<dir> --pretrained <weights>`` does the former). A model whose
image tower is one of ours (:mod:`.towers`, e.g. ``clipline_two_stream``) needs
``import clipline.components.model.towers`` first, which registers the tower in timm.

Writes are atomic: every file is written and fsynced inside a temporary sibling directory that is
then renamed into place, so a reader (a resuming run, a scan for the newest checkpoint, which skips
hidden names) sees a whole checkpoint or none. Errors are :class:`CheckpointError`, a ``ModelError``.

This module imports torch and open_clip only when a function needs them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipline.components.durable import fsync_path
from clipline.components.model.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "WEIGHTS_FILES",
    "CheckpointError",
    "LoadedModel",
    "check_checkpoint_dir",
    "load_checkpoint",
    "load_weights",
    "read_config",
    "read_meta",
    "read_state_dict",
    "save_checkpoint",
    "unwrap",
    "weights_file",
    "write_checkpoint",
]

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
META_FILE = "clipline.json"
#: weights file names accepted in a checkpoint directory, in order of preference; written: the first
WEIGHTS_FILES = (WEIGHTS_FILE, "open_clip_pytorch_model.bin", "open_clip_model.bin", "model.pt")


@dataclass
class LoadedModel:
    """A checkpoint loaded for inference: the model in eval mode on ``device``, its val transform
    (``preprocess``), its tokenizer, and the checkpoint's metadata."""

    model: Any
    preprocess: Any
    tokenizer: Any
    checkpoint_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    @property
    def snapshot_id(self) -> str | None:
        return self.meta.get("snapshot_id")

    @property
    def snapshot_uri(self) -> str | None:
        """Where training read the snapshot (a local path or an object-storage URL), when recorded."""
        return self.meta.get("snapshot_uri")


# ----- reading -----


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file of a checkpoint given as a directory (the first of :data:`WEIGHTS_FILES`
    in it) or as a weights file (itself). Raises CheckpointError when there is none."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in WEIGHTS_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"checkpoint {p} has no weights file (expected {WEIGHTS_FILE}, or one of "
            f"{', '.join(WEIGHTS_FILES[1:])}): give a directory written by `clipline train` or "
            "`clipline export`, or a weights file"
        )
    if p.is_file():
        return p
    raise CheckpointError(f"checkpoint {p} does not exist: give a checkpoint directory or a weights file")


def read_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``open_clip_config.json`` of a checkpoint directory, checked to hold ``model_cfg``."""
    cfg_path = Path(checkpoint_dir) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            f"checkpoint {cfg_path.parent} has no {CONFIG_FILE}: it is not an open_clip-layout checkpoint"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): re-export the checkpoint") from e
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise CheckpointError(
            f"{cfg_path} has no 'model_cfg' key: it must be {{'model_cfg': ..., 'preprocess_cfg': ...}}"
        )
    return cfg


def check_checkpoint_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """The directory, resolved, once it is known to hold a valid config and a weights file."""
    path = Path(checkpoint_dir).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is not a directory: give a checkpoint directory, a version or an alias"
        )
    read_config(path)
    weights_file(path)
    return path


def read_meta(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """``clipline.json`` of a checkpoint directory, or {} when absent (a checkpoint from elsewhere)."""
    p = Path(checkpoint_dir) / META_FILE
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (directory or weights file), on the CPU, read as open_clip reads
    it: safetensors, or a ``torch.save`` file holding a state dict (possibly under ``state_dict``,
    possibly with DDP's ``module.`` prefix)."""
    from open_clip.factory import load_state_dict

    weights = weights_file(path)
    try:
        state = load_state_dict(str(weights), device="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors alike: name the file
        raise CheckpointError(f"cannot read weights {weights}: {type(e).__name__}: {e}") from e
    return {k: v.contiguous() for k, v in state.items()}


def load_weights(model: torch.nn.Module, path: str | os.PathLike, model_name: str | None = None) -> Path:
    """Load a checkpoint's weights (directory or weights file) into ``model``, strictly, with
    open_clip's ``load_checkpoint``; returns the weights file read. CheckpointError, naming the
    file, ``model_name`` and open_clip's reason, when the weights cannot be read or do not fit."""
    import open_clip

    from clipline.components.model.towers import UNSAVED_BEFORE

    weights = weights_file(path)
    what = f"model {model_name!r}" if model_name else "the model its config describes"
    try:
        # strict, except for the two-stream tower's normalisation buffers, which older checkpoints
        # lack (they keep the values the model was built with, those the checkpoint was trained with)
        keys = open_clip.load_checkpoint(unwrap(model), str(weights), strict=False, weights_only=True, device="cpu")
        missing = [k for k in getattr(keys, "missing_keys", []) if not k.endswith(UNSAVED_BEFORE)]
        unexpected = list(getattr(keys, "unexpected_keys", []))
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    except Exception as e:  # unreadable files and shape or key mismatches raise many types
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {weights} does not load into {what}: {type(e).__name__}: {reason}; "
            "give a checkpoint of that model (train with the model the checkpoint was "
            "made with)"
        ) from e
    return weights


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_checkpoint(checkpoint_dir: str | os.PathLike, device: str = "auto") -> LoadedModel:
    """Load a checkpoint directory for inference, in eval mode on ``device`` ("auto": CUDA when there
    is one). open_clip builds the model, transforms and tokenizer from the directory's config
    (``local-dir:``) and loads the weights file :func:`weights_file` picks."""
    import open_clip

    from clipline.components.model import towers  # noqa: F401  (registers our timm towers)

    path = check_checkpoint_dir(checkpoint_dir)
    dev = _pick_device(device)
    try:
        # the weights are loaded below: open_clip's own search of the directory knows fewer names
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", device=dev, load_weights=False, pretrained_text=False
        )
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as e:  # open_clip raises many types; name the checkpoint in one line
        raise CheckpointError(f"open_clip could not load checkpoint {path}: {type(e).__name__}: {e}") from e
    load_weights(model, path)
    model.eval()
    return LoadedModel(
        model=model, preprocess=preprocess, tokenizer=tokenizer, checkpoint_dir=path, meta=read_meta(path), device=dev
    )


# ----- writing -----


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP/compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    model: torch.nn.Module,
    model_cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    preprocess_cfg: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (DDP/compile wrappers removed) as the checkpoint directory ``out_dir``,
    replacing a previous one whole; see :func:`write_checkpoint`."""
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": _jsonable(preprocess_cfg or {})}
    return write_checkpoint(out_dir, state, config, meta, extra_files)


def write_checkpoint(
    out_dir: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Any] | None = None,
    keep_other_files: bool = False,
) -> Path:
    """Write a checkpoint directory atomically: ``state`` as ``open_clip_model.safetensors``,
    ``config`` as ``open_clip_config.json``, ``meta`` (when given) as ``clipline.json``, and each of
    ``extra_files`` (name -> object) with ``torch.save``. All are written and fsynced in a temporary
    sibling directory, which is renamed to ``out_dir``.

    An existing ``out_dir`` is replaced whole; with ``keep_other_files`` its files that the
    checkpoint does not write are kept instead, and each checkpoint file is renamed into it (each
    file atomic, the set not)."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(dict(state), str(tmp / WEIGHTS_FILE))
        fsync_path(tmp / WEIGHTS_FILE)
        _write_json(tmp / CONFIG_FILE, config)
        if meta is not None:
            _write_json(tmp / META_FILE, meta)
        if extra_files:
            import torch

            for name, obj in extra_files.items():
                with open(tmp / name, "wb") as f:
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
        fsync_path(tmp)
        _publish(tmp, out, keep_other_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path, keep_other_files: bool) -> None:
    """Move the finished directory ``tmp`` to ``out`` (see :func:`write_checkpoint`)."""
    if not out.exists():
        tmp.rename(out)
    elif keep_other_files:
        if not out.is_dir():
            raise CheckpointError(f"checkpoint target {out} exists and is not a directory")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
        fsync_path(out)
    else:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
