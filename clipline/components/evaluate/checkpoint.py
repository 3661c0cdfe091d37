"""Loading and exporting checkpoints in the open_clip hub layout (the checkpoint contract).

A checkpoint directory holds ``open_clip_config.json`` ({"model_cfg": ..., "preprocess_cfg": ...}),
``open_clip_model.safetensors`` (or ``.bin``) and ``clipline.json`` (our own metadata). Loading
goes through plain open_clip's ``local-dir:`` schema, so anything we can load, open_clip and
CLIP_benchmark can load the same way without clipline installed; the one exception is a model whose
image tower is one of ours (``clipline.components.model.towers``, e.g. the demo's two-stream
tower), which needs ``import clipline.components.model.towers`` first to register it in timm.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WEIGHTS_FALLBACKS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
META_FILE = "clipline.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing or malformed; the message says which file and what to do."""


@dataclass
class LoadedModel:
    """A model ready for evaluation: eval mode, on ``device``, with its val transform and tokenizer."""

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


def weights_file(checkpoint_dir: Path) -> Path:
    """The weights file open_clip will pick in ``checkpoint_dir``; raises CheckpointError if none."""
    for name in WEIGHTS_FALLBACKS:
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise CheckpointError(
        f"checkpoint {checkpoint_dir} has no weights file (expected {WEIGHTS_FILE}): "
        "give a directory written by `clipline train` or `clipline export`"
    )


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """Return the directory as a resolved Path if it has a valid config and a weights file."""
    path = Path(checkpoint_dir).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory: give a checkpoint directory, a version or an alias")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}: it is not an open_clip-layout checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): re-export the checkpoint") from e
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise CheckpointError(f"{cfg_path} has no 'model_cfg' key: it must be {{'model_cfg': ..., 'preprocess_cfg': ...}}")
    weights_file(path)
    return path


def read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    """clipline.json of a checkpoint, or {} when absent (e.g. a checkpoint from elsewhere)."""
    p = Path(checkpoint_dir) / META_FILE
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_checkpoint(checkpoint_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Load a checkpoint exactly as plain open_clip does (``local-dir:`` schema), in eval mode."""
    import open_clip

    from clipline.components.model import towers  # noqa: F401  (registers our timm towers)

    path = check_checkpoint_dir(checkpoint_dir)
    dev = pick_device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=dev)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as e:  # open_clip raises many types; name the checkpoint in one line
        raise CheckpointError(f"open_clip could not load checkpoint {path}: {type(e).__name__}: {e}") from e
    model.eval()
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, checkpoint_dir=path,
                       meta=read_meta(path), device=dev)


def save_checkpoint(model: Any, model_cfg: dict[str, Any], out_dir: str | Path,
                    preprocess_cfg: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state_dict in the checkpoint layout (config JSON + safetensors + clipline.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, indent=2))
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


@dataclass
class ExportResult:
    out_dir: Path
    weights: Path
    config: Path
    n_tensors: int
    open_clip_command: str
    clip_benchmark_command: str


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> ExportResult:
    """Write a self-contained open_clip checkpoint to ``out_dir`` and check that open_clip loads it.

    The result needs nothing from clipline (except a model with one of our image towers, see the
    module docstring): ``open_clip.create_model_and_transforms("local-dir:OUT")``
    loads it, and so does ``clip_benchmark eval --model_type open_clip --model local-dir:OUT
    --pretrained OUT/open_clip_model.safetensors`` (CLIP_benchmark passes ``--model`` to open_clip;
    the ``local-dir:`` schema makes open_clip read the config and weights from OUT).
    Weights are always written as safetensors, whatever the source format.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src = check_checkpoint_dir(checkpoint_dir)
    out = Path(out_dir).expanduser().resolve()
    if out == src:
        raise CheckpointError(f"export target {out} is the checkpoint itself: choose another OUT_DIR")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"export target {out} exists and is not empty: choose an empty OUT_DIR or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    wsrc = weights_file(src)
    if wsrc.suffix == ".safetensors":
        state = load_file(str(wsrc))
    else:
        state = torch.load(wsrc, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE))
    shutil.copyfile(src / CONFIG_FILE, out / CONFIG_FILE)
    meta = read_meta(src)
    meta["exported_from"] = str(src)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    # the proof: plain open_clip builds the model from OUT with strict weight loading
    load_checkpoint(out, device="cpu")
    from clipline.components.model import towers

    tower = towers.our_tower(json.loads((out / CONFIG_FILE).read_text()).get("model_cfg", {}))
    load = f"open_clip.create_model_and_transforms('local-dir:{out}')"
    bench = (f"eval --model_type open_clip --model local-dir:{out} "
             f"--pretrained {out / WEIGHTS_FILE} --output result.json --dataset ...")
    if tower:  # open_clip builds it through timm once the module that registers it is imported
        load = f"import clipline.components.model.towers; {load}  # {tower} is clipline's own tower"
        bench = ("python -c 'import sys, clipline.components.model.towers; from clip_benchmark.cli import main; "
                 f"sys.exit(main())' {bench}")
    else:
        bench = f"clip_benchmark {bench}"
    return ExportResult(out_dir=out, weights=out / WEIGHTS_FILE, config=out / CONFIG_FILE, n_tensors=len(state),
                        open_clip_command=load, clip_benchmark_command=bench)
