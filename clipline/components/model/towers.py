"""Image towers of our own, registered in timm so that an open_clip config names them like any
timm model (``"timm_model_name": "clipline_two_stream"``). Importing :mod:`clipline.components.model.factory`
registers them; a process that loads such a checkpoint with plain open_clip must import this
module first.

``clipline_two_stream``: an image tower that sees form and colour separately.

- The *form* stream is a small timm ResNet (``test_resnet``) fed two channels per pixel that carry
  no hue: the luminance (mean of R, G, B) and the chroma magnitude (distance of the pixel's colour
  from the grey axis). Rotating every colour about the grey axis (red to green to blue...) leaves
  both channels, hence the form features, unchanged. An object stays visible on any background,
  since a neutral background has no chroma, but the stream cannot tell which colour it is.
- The *colour* stream is a per-pixel two-layer MLP (1x1 convolutions) on the (normalised) image
  average-pooled to a 16x16 grid, then max- and mean-pooled over the grid: which colours are
  present, and how much of each, without their arrangement.

The two feature vectors are concatenated; open_clip's linear projection then maps them to the
joint space, so an image embedding is a form part plus a colour part. Why: a CLIP tower that sees
RGB learns form detectors per colour and the training data's colour-shape correlations ("pink, so
not a circle"), which fail on colour-shape pairings never seen in training. With the form stream
blind to hue, a shape learned in some colours is recognised in every colour: on the demo's toy
web it lifts held-out-pairing zero-shot top-1 from 0.46-0.50 to 0.79-0.93 (four demo runs) at the
same cost.

The tower undoes the normalisation of its input to get back RGB. The mean and std it undoes are
buffers saved with the weights (``visual.trunk.mean``/``std``), set from the model's preprocessing
when it is built (:func:`set_normalisation`), so any mean/std works and a checkpoint loaded by plain
open_clip undoes the normalisation it was trained with. Checkpoints written before the buffers were
saved hold none and load with the default (OpenAI) values they were trained with
(:data:`UNSAVED_BEFORE`).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.models import register_model
from torch import nn

TWO_STREAM = "clipline_two_stream"
#: timm model names registered by this module
OUR_TOWERS = (TWO_STREAM,)


def our_tower(model_cfg: dict[str, Any]) -> str | None:
    """The name of our image tower an open_clip model config uses, or None for a stock one."""
    name = (model_cfg.get("vision_cfg") or {}).get("timm_model_name")
    return name if name in OUR_TOWERS else None


class TwoStreamNet(nn.Module):
    """Form stream (hue-free channels through a timm CNN) beside a colour stream (pooled per-pixel
    colour features); see the module docstring. timm's classifier interface (``num_features``,
    ``reset_classifier``, ``forward_features``/``forward_head``) as open_clip's TimmModel uses it."""

    def __init__(
        self,
        num_classes: int = 1000,
        global_pool: str = "avg",
        form_model: str = "test_resnet",
        colour_width: int = 32,
        colour_grid: int = 16,
        drop_rate: float = 0.0,
        mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
        std: tuple[float, ...] = OPENAI_DATASET_STD,
        in_chans: int = 3,
        **kwargs: Any,
    ):
        super().__init__()
        if in_chans != 3:
            raise ValueError(f"{TWO_STREAM} reads RGB images (in_chans=3), not in_chans={in_chans}")
        self.form = timm.create_model(
            form_model, pretrained=False, num_classes=0, global_pool=global_pool, in_chans=2, drop_rate=drop_rate
        )
        self.colour = nn.Sequential(
            nn.Conv2d(3, colour_width, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(colour_width, colour_width, 1),
            nn.ReLU(inplace=True),
        )
        self.colour_grid = int(colour_grid)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.num_features = self.form.num_features + 2 * colour_width
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = self.default_cfg = {
            "architecture": TWO_STREAM,
            "num_classes": num_classes,
            "input_size": (3, 64, 64),
            "mean": tuple(mean),
            "std": tuple(std),
            "first_conv": "form.conv1",
            "classifier": "head",
        }

    def hue_free(self, x: torch.Tensor) -> torch.Tensor:
        """The form stream's input: luminance and chroma magnitude, scaled to roughly unit range."""
        rgb = x * self.std + self.mean
        lum = rgb.mean(dim=1, keepdim=True)
        chroma = torch.linalg.vector_norm(rgb - lum, dim=1, keepdim=True)
        return torch.cat([(lum - 0.5) * 4.0, chroma * 4.0], dim=1)

    def form_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.form(self.hue_free(x))

    def colour_features(self, x: torch.Tensor) -> torch.Tensor:
        # RGB in the default (OpenAI) normalisation whatever the input's: x itself for a model
        # that uses the default, and the same features for one that normalises otherwise
        # (pooling is linear: pooled first, the change of normalisation costs a 16 x 16 grid, not the image)
        rgb = nn.functional.adaptive_avg_pool2d(x, self.colour_grid) * self.std + self.mean
        ref_mean = rgb.new_tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        ref_std = rgb.new_tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        f = self.colour((rgb - ref_mean) / ref_std)
        return torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.form_features(x), self.colour_features(x)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.form.reset_classifier(0, global_pool=global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.form.set_grad_checkpointing(enable)


@register_model
def clipline_two_stream(pretrained: bool = False, **kwargs: Any) -> TwoStreamNet:
    """timm entry point of :class:`TwoStreamNet` (no pretrained weights exist)."""
    if pretrained:
        raise ValueError(f"{TWO_STREAM} has no pretrained weights: set timm_model_pretrained to false")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return TwoStreamNet(**kwargs)


#: state-dict key endings of the normalisation buffers; checkpoints from before they were saved lack them
UNSAVED_BEFORE = ("trunk.mean", "trunk.std")


def set_normalisation(model: nn.Module, mean: Any, std: Any) -> None:
    """Make every two-stream image tower in ``model`` undo normalisation with ``mean``/``std``
    (the model's preprocessing), so that its hue-free channels carry no hue whatever they are."""
    for m in model.modules():
        if isinstance(m, TwoStreamNet):
            with torch.no_grad():
                m.mean.copy_(torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, 3, 1, 1))
                m.std.copy_(torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, 3, 1, 1))
