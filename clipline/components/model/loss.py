"""The symmetric contrastive (CLIP) loss over the global batch.

logits = s * I @ T.T with L2-normalised features I (images) and T (texts), s = exp(log-temperature)
clamped at ``max_scale`` (100); loss = (CE(logits, arange) + CE(logits.T, arange)) / 2.

With ``world_size > 1`` (inside torch.distributed) every rank all-gathers the features of every
other rank *with gradients* (``torch.distributed.nn.all_gather``) and computes the loss over the
whole global batch. The backward of that gather sums each rank's gradient into the owner of the
features, so each rank holds world_size x the gradient of the (shared) global loss; DDP's gradient
averaging divides that back, and N workers x local batch b train exactly like one worker with
batch N*b (tests/test_loss.py checks this on a real 2-worker Ray Train run).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping gradients to every piece."""
    if world_size <= 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the global batch; returns a scalar (mean over the batch)."""

    def __init__(self, world_size: int = 1, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.world_size = world_size
        self.max_log_scale = math.log(max_scale)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """``*_features``: (b, d), already L2-normalised (open_clip's encoders with normalize=True);
        ``logit_scale``: the learned log-temperature (a parameter, not yet exponentiated)."""
        all_img = gather_with_grad(image_features, self.world_size)
        all_txt = gather_with_grad(text_features, self.world_size)
        scale = logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * all_img @ all_txt.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clamp_logit_scale_(model: nn.Module, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep the learned log-temperature in [0, log(max_scale)] after an optimiser step (as open_clip's
    trainer does), so the parameter itself never drifts past the clamp."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))
