"""The demo's training recipe: a letterboxing model trains on letterboxed pictures (the aspect ratio
it is evaluated on, the whole object in frame)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clipline.components.model import factory
from clipline.components.train.data import RayDecode


def _red_box(out: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Height and width of the red region of a normalised image tensor, and its mean colour."""
    img = out.permute(1, 2, 0).numpy() * std + mean  # back to 0..1
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    rows, cols = np.where(red)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, img[red].mean(0)


def test_letterbox_training_keeps_aspect_ratio_colour_and_the_whole_picture():
    b = factory.create("clipline-demo", aug={"scale": (0.8, 1.0)})
    assert factory.PREPROCESS_OVERRIDES["clipline-demo"]["resize_mode"] == "longest"
    mean, std = np.array(b.preprocess_cfg["mean"]), np.array(b.preprocess_cfg["std"])
    picture = Image.new("RGB", (300, 150), (220, 20, 20))  # a 2:1 red banner
    torch.manual_seed(0)
    for _ in range(8):
        x = b.train_transform(picture)
        assert x.shape == (3, b.image_size, b.image_size)
        h, w, colour = _red_box(x, mean, std)
        # open_clip's RandomResizedCrop would fill the whole square (aspect 1); letterboxing keeps ~1:2
        assert 0.4 < h / w < 0.6, (h, w)
        assert w >= 0.85 * b.image_size  # zoomed by at most 1/sqrt(0.8): nearly all of it stays in frame
        assert colour[0] > 0.75 and colour[1] < 0.2 and colour[2] < 0.2  # colour unchanged
        white = x.permute(1, 2, 0).numpy() * std + mean
        assert (white.min(axis=2) > 0.95).mean() > 0.3  # the padding is the eval transform's white
    # evaluation letterboxes the same picture the same way, without the random zoom and shift
    h, w, _ = _red_box(b.val_transform(picture), mean, std)
    assert w == b.image_size and abs(h / w - 0.5) < 0.05


def test_ray_data_decoding_uses_the_same_training_transform():
    tf = RayDecode("clipline-demo", 0.8).decoder.transform
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["ResizeKeepRatio", "CenterCropOrPad", "RandomAffine"]
    # a model that crops (open_clip's default) keeps RandomResizedCrop
    assert type(RayDecode("clipline-nano", 0.8).decoder.transform.transforms[0]).__name__ == "RandomResizedCrop"
