"""``clipline export``: a checkpoint rewritten as a self-contained open_clip directory, checked by
loading it, with the commands that load it elsewhere.

The result needs nothing from clipline (except a model with one of our image towers, see
:mod:`.checkpoint`): ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads it, and so does
``clip_benchmark eval --model_type open_clip --model local-dir:OUT --pretrained
OUT/open_clip_model.safetensors`` (CLIP_benchmark passes ``--model`` to open_clip; the
``local-dir:`` schema makes open_clip read the config and weights from OUT). Weights are always
written as safetensors, whatever the source's accepted weights file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipline.components.model import checkpoint
from clipline.components.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError

__all__ = ["CheckpointError", "ExportResult", "export_checkpoint"]


@dataclass
class ExportResult:
    out_dir: Path
    weights: Path
    config: Path
    n_tensors: int
    open_clip_command: str
    clip_benchmark_command: str


def export_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> ExportResult:
    """Write the checkpoint at ``checkpoint_dir`` to ``out_dir`` (absent or empty, or any directory
    with ``overwrite``: its other files are kept) and load the result with open_clip (strict) as
    the proof. Its ``clipline.json`` records ``exported_from``. CheckpointError on a bad source or
    target."""
    src = checkpoint.check_checkpoint_dir(checkpoint_dir)
    out = Path(out_dir).expanduser().resolve()
    if out == src:
        raise CheckpointError(f"export target {out} is the checkpoint itself: choose another OUT_DIR")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} is a file: choose a directory as OUT_DIR")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"export target {out} exists and is not empty: choose an empty OUT_DIR or pass --overwrite"
        )
    state = checkpoint.read_state_dict(src)
    config = checkpoint.read_config(src)
    meta = {**checkpoint.read_meta(src), "exported_from": str(src)}
    checkpoint.write_checkpoint(out, state, config, meta, keep_other_files=True)
    checkpoint.load_checkpoint(out, device="cpu")

    from clipline.components.model import towers

    tower = towers.our_tower(config.get("model_cfg", {}))
    load = f"open_clip.create_model_and_transforms('local-dir:{out}')"
    bench = (
        f"eval --model_type open_clip --model local-dir:{out} "
        f"--pretrained {out / WEIGHTS_FILE} --output result.json --dataset ..."
    )
    if tower:  # open_clip builds it through timm once the module that registers it is imported
        load = f"import clipline.components.model.towers; {load}  # {tower} is clipline's own tower"
        bench = (
            "python -c 'import sys, clipline.components.model.towers; from clip_benchmark.cli import main; "
            f"sys.exit(main())' {bench}"
        )
    else:
        bench = f"clip_benchmark {bench}"
    return ExportResult(
        out_dir=out,
        weights=out / WEIGHTS_FILE,
        config=out / CONFIG_FILE,
        n_tensors=len(state),
        open_clip_command=load,
        clip_benchmark_command=bench,
    )
