"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the weight-space
interpolation ``(1 - alpha) * start + alpha * fine_tuned`` of a fine-tuned model and the weights it
started from. ``alpha = 0`` is the start, ``alpha = 1`` the fine-tuned model; the paper's blends in
between keep most of the start's robustness and most of the fine-tuning's gain.

:func:`interpolate` is the arithmetic; :func:`write_blend` writes the blend of a finished run as a
checkpoint directory beside the run's ``final``, in the same format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipline.components.model import checkpoint
from clipline.components.model.errors import ModelError

if TYPE_CHECKING:
    import torch

    from clipline.components.model.start import Start


def interpolate(
    start: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point tensor (computed in float32
    or wider, returned in ``tuned``'s dtype); other tensors (step counters) are ``tuned``'s. Both
    must hold the same names and shapes, else ModelError naming the first that differs."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise ModelError(f"WiSE-FT alpha {alpha} is outside [0, 1]")
    if start.keys() != tuned.keys():
        diff = sorted(set(start) ^ set(tuned))
        raise ModelError(f"WiSE-FT: the start and the fine-tuned model differ in tensors ({', '.join(diff[:3])}...)")
    out = {}
    for k, t in tuned.items():
        s = start[k]
        if s.shape != t.shape:
            raise ModelError(f"WiSE-FT: tensor {k} has shape {tuple(s.shape)} at the start, {tuple(t.shape)} tuned")
        if t.is_floating_point():
            wide = torch.promote_types(t.dtype, torch.float32)
            out[k] = torch.lerp(s.to(wide), t.to(wide), alpha).to(t.dtype)
        else:
            out[k] = t.clone()
    return out


def write_blend(start: Start, final_dir: Path, alpha: float, out_dir: Path, meta: Mapping[str, Any]) -> Path:
    """The WiSE-FT blend of the checkpoint ``final_dir`` and the weights its run started from
    (``start``, built as training built it) as the checkpoint directory ``out_dir``, with
    ``final_dir``'s config and ``meta`` (plus ``wise_ft_alpha`` and ``wise_ft_start``)."""
    from clipline.components.model import factory

    start_state = factory.create(
        start.model, pretrained=start.weights, tag=start.tag, preprocess=start.preprocess
    ).model.state_dict()
    tuned = checkpoint.read_state_dict(final_dir)
    blend = interpolate(start_state, tuned, alpha)
    info = {**dict(meta), "wise_ft_alpha": alpha, "wise_ft_start": start.ref}
    return checkpoint.write_checkpoint(out_dir, blend, checkpoint.read_config(final_dir), info)
