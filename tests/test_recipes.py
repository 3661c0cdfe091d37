"""Training recipes as data (``clipline/components/train/recipes/*.toml``), chosen by model size."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipline.components.config import TrainConfig, load_config
from clipline.components.train import recipes


def test_every_recipe_says_what_it_is_for_and_where_its_values_come_from():
    found = recipes.recipes()
    assert {"cpu-toy", "open-clip-b"} <= set(found)
    for r in found.values():
        assert len(r.description) > 20 and len(r.source) > 80, r.name
        assert set(r.values) <= set(TrainConfig.model_fields), r.name
        TrainConfig(**r.values)  # each value is a valid [train] setting
    # the ranges do not overlap, so auto's choice is never ambiguous
    for n in (1, 49_999_999, 50_000_000, 10**10):
        assert sum(r.fits(n) for r in found.values()) == 1, n


def test_the_cpu_recipe_is_the_defaults_so_auto_changes_nothing_for_small_models():
    defaults = TrainConfig()
    assert all(getattr(defaults, k) == v for k, v in recipes.recipes()["cpu-toy"].values.items())


def test_auto_chooses_by_parameter_count_and_leaves_what_the_user_set():
    import open_clip

    from clipline.components.model import factory

    assert recipes.param_count("clipline-nano") == sum(
        p.numel() for p in factory.create("clipline-nano").model.parameters()
    )
    assert recipes.param_count("ViT-B-32") == 151_277_313  # open_clip's ViT-B-32 config, counted
    assert open_clip.get_model_config("ViT-B-32") is not None
    assert recipes.choose("auto", "clipline-tiny").name == "cpu-toy"
    assert recipes.choose("auto", "ViT-B-32").name == "open-clip-b"
    assert recipes.choose("none", "ViT-B-32") is None

    cfg = load_config(None, {"train": {"model": "ViT-B-32", "lr": 1e-4, "batch_size": 4096}})
    tc, recipe, applied = recipes.apply(cfg.train, "ViT-B-32")
    assert recipe.name == "open-clip-b"
    assert (tc.lr, tc.batch_size) == (1e-4, 4096)  # set by the user: kept
    assert (tc.weight_decay, tc.warmup_steps, tc.grad_clip, tc.crop_scale_min) == (0.2, 2000, 0.0, 0.9)
    assert "lr" not in applied and applied["weight_decay"] == 0.2
    off, none, _ = recipes.apply(load_config(None, {"train": {"recipe": "none"}}).train, "ViT-B-32")
    assert none is None and off.weight_decay == TrainConfig().weight_decay
    named, r, _ = recipes.apply(load_config(None, {"train": {"recipe": "open-clip-b"}}).train, "clipline-nano")
    assert r.name == "open-clip-b" and named.weight_decay == 0.2
    with pytest.raises(ValueError, match="unknown train.recipe 'huge': use one of auto, none, cpu-toy, open-clip-b"):
        recipes.apply(load_config(None, {"train": {"recipe": "huge"}}).train, "clipline-nano")


def test_a_training_run_records_its_recipe(data_dir: Path, mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    from clipline.components.train import synthetic
    from clipline.components.train.run import train
    from trainkit import _cfg

    sid = synthetic.write_snapshot(data_dir / "snapshots", n=48, size=48)
    res = train(_cfg(data_dir, steps=2, recipe="open-clip-b"), snapshot_id=sid)
    params = MlflowClient(mlflow_uri).get_run(res.run_id).data.params
    assert params["recipe"] == "open-clip-b" and params["train.weight_decay"] == "0.2"
    assert params["train.lr"] == "0.002"  # trainkit's FAST sets it: the user's value wins
