"""The contrastive loss: equal to open_clip's ClipLoss, and global-batch exact across Ray Train workers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipline.components.model.loss import ContrastiveLoss

TINY_VIT_CLIP = {  # no BatchNorm, so per-worker statistics cannot differ from the single-process run
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
}


def _features(b: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1))


@pytest.mark.parametrize("b,scale", [(2, 1.0), (8, 1 / 0.07), (33, 50.0)])
def test_loss_equals_open_clip_clip_loss(b, scale):
    img, txt = _features(b, 24, seed=b)
    log_scale = torch.tensor(math.log(scale))
    ours = ContrastiveLoss()(img, txt, log_scale)
    theirs = open_clip.ClipLoss()(img, txt, log_scale.exp())
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)


def test_loss_is_low_for_matching_pairs_and_log_b_for_random_ones():
    img, _ = _features(64, 32, seed=1)
    assert ContrastiveLoss()(img, img.clone(), torch.tensor(math.log(100.0))) < 0.05
    # identical features at scale 1: logits in [-1, 1], loss close to (but below) log(B)
    zero = torch.zeros(64, 32)
    zero[:, 0] = 1
    assert ContrastiveLoss()(zero, zero, torch.tensor(0.0)) == pytest.approx(math.log(64), rel=1e-5)


def test_temperature_is_clamped_at_100():
    img, txt = _features(16, 8, seed=3)
    at_cap = ContrastiveLoss()(img, txt, torch.tensor(math.log(100.0)))
    beyond = ContrastiveLoss()(img, txt, torch.tensor(math.log(1000.0)))
    assert torch.allclose(at_cap, beyond)


def _model_and_batch(b: int):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_VIT_CLIP)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, 16, 16, generator=g)
    texts = torch.randint(1, 100, (b, 8), generator=g)
    return model, images, texts


def _one_step_grads(model, images, texts, loss_fn):
    out = model(images, texts)
    loss = loss_fn(out[0], out[1], model.logit_scale)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(config):
    import ray.train
    import torch

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    model, images, texts = _model_and_batch(config["b"])
    local = config["b"] // world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sl = slice(rank * local, (rank + 1) * local)
    out = ddp(images[sl], texts[sl])
    loss = ContrastiveLoss(world_size=world)(out[0], out[1], model.logit_scale)
    loss.backward()
    grads = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}
    np.savez(Path(config["out"]) / f"rank{rank}.npz", loss=float(loss), **grads)
    ray.train.report({"loss": float(loss)})


@pytest.mark.slow
def test_two_ray_workers_equal_one_worker_on_the_concatenated_batch(ray_local, tmp_path):
    """2 workers x 6 samples (gloo, DDP, all_gather with gradients) == 1 process x 12 samples."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    b = 12
    model, images, texts = _model_and_batch(b)
    ref_loss, ref_grads = _one_step_grads(model, images, texts, ContrastiveLoss())
    # the single-process gradient really involves cross-sample negatives
    assert ref_loss > 0.1

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"b": b, "out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="loss-equivalence", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    assert result.error is None
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert got["loss"] == pytest.approx(ref_loss, abs=1e-5)
        for name, g in ref_grads.items():
            np.testing.assert_allclose(got[name], g.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    # and without the gather, per-worker losses would differ from the global one
    local_only, _ = _one_step_grads(*_model_and_batch(b)[:1], images[:6], texts[:6], ContrastiveLoss())
    assert abs(local_only - ref_loss) > 1e-3
