"""Resuming a training run: the run directory's layout and the state a resumed run needs.

This is the train stage's own contract, read only by the train stage: what a restarted run needs
beyond the model. Each checkpoint in it is a checkpoint directory of the model contract
(:mod:`clipline.components.model.checkpoint`, which writes it atomically and loads it) plus
``train_state.pt`` (optimiser, scheduler, grad-scaler state, step, data position, RNG states).

Layout of one run, ``<checkpoints_dir>/<run_name>/``:
  ``step-00000200/``   intermediate checkpoints (the newest ``keep`` are kept)
  ``final/``           the end-of-run checkpoint (the directory evaluate, tracking and export read)
  ``run.json``         run name -> MLflow run id, model, snapshot (so a restart by name continues)
A checkpoint counts as resumable only once its ``train_state.pt`` is there, and the model contract
renames a directory into place only when it is complete, so a crash never leaves half a
checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipline.components.model import checkpoint

STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What a resumed run needs beyond the weights."""

    step: int
    epoch: int
    batch_in_epoch: int  # local batches of `epoch` already trained on (data position)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete intermediate checkpoints of a run, oldest first."""
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint of a run (``final/`` counts when it has a train state)."""
    cands = step_dirs(run_dir)
    final = run_dir / "final"
    if (final / STATE_FILE).is_file():
        cands.append((int(checkpoint.read_meta(final).get("step", 0)), final))
        cands.sort()
    return cands[-1][1] if cands else None


def save(
    path: Path, model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, meta: dict, state: TrainState
) -> Path:
    """Write a resumable checkpoint directory atomically: the model checkpoint plus its train state."""
    return checkpoint.save_checkpoint(
        model, model_cfg, path, preprocess_cfg, meta, extra_files={STATE_FILE: state.__dict__}
    )


def load_state(path: Path) -> TrainState:
    return TrainState(**torch.load(Path(path) / STATE_FILE, weights_only=False))


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` intermediate checkpoints."""
    dirs = step_dirs(run_dir)
    for _, p in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def read_run(run_dir: Path) -> dict[str, Any]:
    f = run_dir / RUN_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def write_run(run_dir: Path, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(run_dir / RUN_FILE)
