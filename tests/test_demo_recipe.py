"""The demo's training recipe: a letterboxing model trains on letterboxed pictures (the aspect ratio
it is evaluated on, the whole object in frame)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clipline.components.model import checkpoint, factory


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


def test_uniform_text_attention_averages_the_caption_through_training_and_export(tmp_path):
    from clipline.components.model.loss import ContrastiveLoss

    b = factory.create("clipline-demo")
    assert factory.INIT_OPTIONS["clipline-demo"] == {"text_attention": "uniform"}
    assert "init_cfg" not in b.model_cfg  # our block never reaches open_clip's constructor or the export

    def embed(model, texts):
        with torch.no_grad():
            return model.encode_text(b.tokenizer(texts), normalize=True)

    def qk(model):
        return torch.cat(
            [
                torch.cat(
                    [
                        blk.attn.in_proj_weight[: 2 * blk.attn.embed_dim].flatten(),
                        blk.attn.in_proj_bias[: 2 * blk.attn.embed_dim],
                    ]
                )
                for blk in model.transformer.resblocks
            ]
        )

    def attends_uniformly(model):
        # each text layer's attention weights: token i gives 1/(i+1) to itself and every token before it
        x = model.token_embedding(b.tokenizer(["a red star on grey"])) + model.positional_embedding
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)
        with torch.no_grad():
            for blk in model.transformer.resblocks:
                h = blk.ln_1(x)
                _, w = blk.attn(h, h, h, need_weights=True, attn_mask=causal)
                if not torch.allclose(w[0], expected, atol=1e-6):
                    return False
                x = blk(x, attn_mask=causal)
        return True

    assert attends_uniformly(b.model) and not qk(b.model).any()
    # train a few steps: the zero queries and keys stay exactly zero, so attention stays an average
    torch.manual_seed(0)
    opt = torch.optim.AdamW(b.model.parameters(), lr=1e-2, weight_decay=0.1)
    captions = ["a red star", "a blue heart", "a green circle on black", "one small yellow cross"]
    images = torch.randn(4, 3, b.image_size, b.image_size)
    before = embed(b.model, captions)
    for _ in range(3):
        out = b.model(images, b.tokenizer(captions))
        loss = ContrastiveLoss()(out["image_features"], out["text_features"], b.model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(before, embed(b.model, captions))  # it did learn
    assert not qk(b.model).any() and attends_uniformly(b.model)
    # a checkpoint is a plain open_clip model that reads captions the same way
    d = checkpoint.save_checkpoint(b.model, b.model_cfg, tmp_path / "ckpt", b.preprocess_cfg, {"model_name": b.name})
    loaded = checkpoint.load_checkpoint(d, "cpu")
    assert torch.allclose(embed(loaded.model, captions), embed(b.model, captions), atol=1e-6)
    assert attends_uniformly(loaded.model)
    # a model whose config asks for nothing keeps open_clip's own initialisation
    assert qk(factory.create("clipline-nano").model).any()


def test_an_unknown_init_option_is_refused_with_the_choices():
    import pytest

    b = factory.create("clipline-nano")
    with pytest.raises(factory.ModelError, match="text_attention, one of default, uniform"):
        factory.apply_init(b.model, {"text_attention": "zeros"})
    with pytest.raises(factory.ModelError, match="not understood"):
        factory.apply_init(b.model, {"vision": "x"})


def _toy_picture(color: str, shape: str, seed: int = 3) -> Image.Image:
    import random

    from clipline.components.demo import corpus

    return corpus.render(corpus.sample_spec(random.Random(seed), color, shape))


def test_two_stream_tower_sees_form_without_hue_and_colour_without_form():
    from clipline.components.model import towers

    b = factory.create("clipline-demo")
    tower = b.model.visual.trunk
    assert isinstance(tower, towers.TwoStreamNet)
    b.model.eval()
    circle = _toy_picture("red", "circle")
    # the same picture with its colours rotated about the grey axis (R->G->B): a different hue on
    # the same neutral background
    rotated = Image.fromarray(np.asarray(circle)[..., [2, 0, 1]])
    star = _toy_picture("red", "star")
    x = torch.stack([b.val_transform(im) for im in (circle, rotated, star)])
    with torch.no_grad():
        form, colour = tower.form_features(x), tower.colour_features(x)
        emb = b.model.encode_image(x, normalize=True)
    torch.testing.assert_close(form[0], form[1], atol=1e-4, rtol=1e-4)  # hue changes nothing in form
    assert (form[0] - form[2]).abs().max() > 1e-3  # a different shape does
    assert (colour[0] - colour[1]).abs().max() > 1e-3  # the colour stream does see the hue
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)  # so a red and a blue circle embed apart


def test_two_stream_tower_trains_saves_and_loads_with_plain_open_clip(tmp_path):
    import open_clip

    from clipline.components.model.loss import ContrastiveLoss

    b = factory.create("clipline-demo")
    model = b.model
    pics = [
        _toy_picture(c, s, seed=i)
        for i, (c, s) in enumerate([("red", "circle"), ("blue", "star"), ("green", "heart"), ("yellow", "cross")])
    ]
    x = torch.stack([b.train_transform(p) for p in pics])
    t = b.tokenizer(["a red circle", "a blue star", "a green heart", "a yellow cross"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    for _ in range(3):
        o = model(x, t)
        loss = ContrastiveLoss()(o["image_features"], o["text_features"], model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "form." in k)  # both streams learn
    assert any(not torch.equal(before[k], after[k]) for k in before if "colour." in k)
    out = checkpoint.save_checkpoint(
        model, b.model_cfg, tmp_path / "ck", b.preprocess_cfg, {"model_name": "clipline-demo"}
    )
    plain, _, val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    plain.eval()
    xv = torch.stack([val(p) for p in pics])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(xv), model.encode_image(xv))


def test_two_stream_tower_takes_any_normalisation_and_saves_it(tmp_path):
    """The tower undoes its model's own mean/std: the same pictures normalised two ways give the
    same features; the values are saved with the weights, so plain open_clip loads them; a
    checkpoint from before they were saved still loads, with the default it was trained with."""
    import open_clip
    import pytest
    import timm
    from safetensors.torch import load_file, save_file

    from clipline.components.model import towers

    half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    torch.manual_seed(0)
    a = factory.create("clipline-demo")
    torch.manual_seed(0)
    b = factory.create("clipline-demo", preprocess=half)
    assert tuple(b.preprocess_cfg["mean"]) == half["mean"]
    pics = [Image.new("RGB", (80, 60), c) for c in ((200, 30, 30), (20, 160, 220))]
    xa = torch.stack([a.val_transform(p) for p in pics])
    xb = torch.stack([b.val_transform(p) for p in pics])
    assert not torch.allclose(xa, xb)  # the inputs differ...
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            a.model.encode_image(xa), b.model.encode_image(xb), rtol=1e-4, atol=1e-5
        )  # ...not the features

    out = checkpoint.save_checkpoint(
        b.model, b.model_cfg, tmp_path / "ck", b.preprocess_cfg, {"model_name": "clipline-demo"}
    )
    assert torch.equal(
        load_file(out / checkpoint.WEIGHTS_FILE)["visual.trunk.mean"].flatten(), torch.tensor(half["mean"])
    )
    plain, _, val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(torch.stack([val(p) for p in pics])), b.model.encode_image(xb))

    old = {k: v for k, v in load_file(out / checkpoint.WEIGHTS_FILE).items() if not k.endswith(towers.UNSAVED_BEFORE)}
    save_file(old, str(tmp_path / "old.safetensors"))
    fresh = factory.create("clipline-demo")
    checkpoint.load_weights(fresh.model, tmp_path / "old.safetensors")  # loads: the default normalisation stays
    assert tuple(fresh.model.visual.trunk.mean.flatten().tolist()) == pytest.approx(a.preprocess_cfg["mean"])
    del old["logit_scale"]
    save_file(old, str(tmp_path / "broken.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="missing keys \\['logit_scale'\\]"):
        checkpoint.load_weights(fresh.model, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(towers.TWO_STREAM, pretrained=True)


def test_the_generic_cnn_is_stock_open_clip_and_timm(tmp_path):
    """clipline-rgb-cnn, demo_time.py's generic architecture: as many parameters as clipline-demo, and
    its checkpoint loads in plain open_clip with nothing of clipline imported (timm's own test_resnet)."""
    import subprocess
    import sys

    from clipline.components.train.recipes import param_count

    b = factory.create("clipline-rgb-cnn")
    assert b.preprocess_cfg["resize_mode"] == "longest"  # letterboxed, as the demo model's pictures
    assert abs(param_count("clipline-rgb-cnn") - param_count("clipline-demo")) < 0.01 * param_count("clipline-demo")
    out = checkpoint.save_checkpoint(b.model, b.model_cfg, tmp_path / "ck", b.preprocess_cfg, {"model_name": "x"})
    code = (
        "import open_clip, sys; m, _, _ = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1]); "
        "assert not [n for n in sys.modules if n.split('.')[0] == 'clipline']; print(m.visual.trunk.__class__.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ResNet", proc.stderr[-2000:]
