"""Starting from pretrained weights: ``hf-hub:org/repo`` ids and open_clip pretrained tags, read
offline from a Hugging Face cache that the test writes on disk in the cache's own layout (blobs,
snapshots, refs), with models made here: nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from clipline.components.model import checkpoint, factory
from clipline.components.model.start import Start, StartError, resolve
from clipline.components.train import synthetic

REPO = "acme/nano-clip"
#: preprocessing unlike open_clip's default (OpenAI mean/std, bicubic, shortest side): what must survive
HUB_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}


def write_hub_repo(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """``repo`` in the Hugging Face cache layout: ``models--org--name/{refs/main, blobs/<sha256>,
    snapshots/<commit>/<file> -> ../../blobs/<sha256>}``. Returns the snapshot directory."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for fname, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs" / sha).write_bytes(data)
        (snap / fname).symlink_to(Path("../../blobs") / sha)
    return snap


def nano_hub_repo(cache: Path) -> dict[str, torch.Tensor]:
    """An open_clip hub repo of a small model (clipline-nano's architecture, its own config and
    preprocessing in ``open_clip_config.json``); returns its weights."""
    torch.manual_seed(7)
    model = factory.create("clipline-nano").model
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {"model_cfg": factory.model_config("clipline-nano"), "preprocess_cfg": HUB_PREPROCESS}
    write_hub_repo(
        cache,
        REPO,
        {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": save(weights)},
    )
    return weights


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline, for this process and its children."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _normalize(transform):
    from torchvision.transforms import Normalize

    return next(t for t in transform.transforms if isinstance(t, Normalize))


def test_hf_hub_start_builds_the_repos_model_with_its_weights_and_preprocessing(hub_cache: Path):
    weights = nano_hub_repo(hub_cache)
    start = resolve(f"hf-hub:{REPO}", "clipline-tiny")  # the repo's architecture wins over train.model
    assert start == Start(ref=f"hf-hub:{REPO}", model=f"hf-hub:{REPO}")
    bundle = factory.create(start.model)
    got = bundle.model.state_dict()
    assert got.keys() == weights.keys()
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    pp = bundle.preprocess_cfg
    assert list(pp["mean"]) == HUB_PREPROCESS["mean"] and pp["resize_mode"] == "squash"
    assert list(_normalize(bundle.val_transform).mean) == HUB_PREPROCESS["mean"]
    assert list(_normalize(bundle.train_transform).std) == HUB_PREPROCESS["std"]
    assert bundle.context_length == 16


def test_a_checkpoint_start_keeps_its_own_architecture_and_preprocessing(tmp_path: Path):
    """A checkpoint trained from a tag (or any start whose preprocessing is not its architecture's
    default) keeps that preprocessing when a refresh fine-tunes from it."""
    torch.manual_seed(1)
    model = factory.create("clipline-nano").model
    ck = checkpoint.save_checkpoint(
        model, factory.model_config("clipline-nano"), tmp_path / "ck", HUB_PREPROCESS, {"model_name": "clipline-nano"}
    )
    start = resolve(str(ck), "clipline-tiny")
    assert (start.model, start.weights, start.tag) == ("clipline-nano", ck / checkpoint.WEIGHTS_FILE, None)
    bundle = factory.create(start.model, pretrained=start.weights, preprocess=start.preprocess)
    assert (
        list(bundle.preprocess_cfg["mean"]) == HUB_PREPROCESS["mean"]
        and bundle.preprocess_cfg["resize_mode"] == "squash"
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bundle.model.state_dict().items())


def test_a_start_that_is_not_cached_offline_says_how_to_download_it(hub_cache: Path):
    with pytest.raises(StartError) as e:
        resolve("hf-hub:acme/not-here", "clipline-tiny")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "hf download acme/not-here open_clip_config.json" in msg
    assert "\n" not in msg
    with pytest.raises(StartError, match="write a Hugging Face model id as hf-hub:org/repo"):
        resolve("hf-hub:just-a-name", "clipline-tiny")
    with pytest.raises(StartError, match="no pretrained tag 'nope'; its tags: .*laion2b_s34b_b79k"):
        resolve("ViT-B-32:nope", "clipline-tiny")
    with pytest.raises(StartError, match="not a local checkpoint, an hf-hub:org/repo id, or an open_clip"):
        resolve("no-such-thing", "clipline-tiny")


def test_an_open_clip_tag_loads_its_weights_and_the_tags_preprocessing(hub_cache: Path):
    """PE-Core-T-16-384 (70M parameters, the smallest tagged model): its tag `meta` lives at
    timm/PE-Core-T-16-384 on the hub and preprocesses with mean 0.5, bilinear, squash, unlike the
    architecture's default."""
    import open_clip

    name, tag = "PE-Core-T-16-384", "meta"
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    write_hub_repo(hub_cache, "timm/PE-Core-T-16-384", {"open_clip_model.safetensors": save(weights)})

    assert resolve(f"{name}:{tag}", "clipline-tiny") == Start(ref=f"{name}:{tag}", model=name, tag=tag)
    start = resolve(tag, name)  # a tag of train.model
    assert (start.model, start.tag) == (name, tag)
    bundle = factory.create(start.model, tag=start.tag)
    got = bundle.model.state_dict()
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    pp = bundle.preprocess_cfg
    assert tuple(pp["mean"]) == (0.5, 0.5, 0.5) and pp["resize_mode"] == "squash" and pp["interpolation"] == "bilinear"
    assert tuple(_normalize(bundle.val_transform).mean) == (0.5, 0.5, 0.5)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPLINE_TRAIN__THREADS": "1", "CLIPLINE_TRAIN__SYSTEM_METRICS": "false"}
    return subprocess.run(
        [sys.executable, "-m", "clipline.flows.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fine_tuning_from_hf_hub_offline_keeps_its_preprocessing_through_export(
    hub_cache: Path, data_dir: Path, mlflow_uri: str, tmp_path: Path
):
    hub = nano_hub_repo(hub_cache)
    sid = synthetic.write_snapshot(data_dir / "snapshots", n=64, size=48)
    r = _cli(
        ["--data-dir", str(data_dir), "train", "--snapshot", sid, "--from-model", f"hf-hub:{REPO}", "--steps", "2"]
        + ["--batch-size", "16"],
        tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ck = next((data_dir / "checkpoints").glob("*/final"))
    assert checkpoint.read_meta(ck)["model_name"] == f"hf-hub:{REPO}"
    assert checkpoint.read_config(ck)["preprocess_cfg"]["mean"] == HUB_PREPROCESS["mean"]
    # it started from the hub's weights: two small steps stay near them, far from a fresh init
    # (parameters only: batch-norm running statistics move with any batch)
    tuned = load_file(ck / checkpoint.WEIGHTS_FILE)
    torch.manual_seed(0)
    fresh_model = factory.create("clipline-nano").model
    params = [k for k, _ in fresh_model.named_parameters()]
    near = max((tuned[k] - hub[k]).abs().max().item() for k in params)
    far = max((fresh_model.state_dict()[k] - hub[k]).abs().max().item() for k in params)
    assert 0 < near < 0.05 < far, (near, far)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_uri).get_run(checkpoint.read_meta(ck)["run_id"])
    assert run.data.params["pretrained"] == f"hf-hub:{REPO}"

    # evaluation reads the checkpoint's own preprocessing; so does plain open_clip on the export
    assert list(_normalize(checkpoint.load_checkpoint(ck, device="cpu").preprocess).mean) == HUB_PREPROCESS["mean"]
    out = tmp_path / "export"
    r = _cli(["--data-dir", str(data_dir), "export", str(ck), str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    import open_clip

    model, _, val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert list(_normalize(val).mean) == HUB_PREPROCESS["mean"]
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())

    r = _cli(["--data-dir", str(data_dir), "train", "--snapshot", sid, "--from-model", "hf-hub:acme/gone"], tmp_path)
    assert r.returncode == 1
    assert "hf download acme/gone" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    r = _cli(["--data-dir", str(data_dir), "evaluate", "--model", "hf-hub:acme/gone"], tmp_path)
    assert r.returncode == 1 and "hf download acme/gone" in r.stderr and "Traceback" not in r.stderr


def test_a_hub_start_is_evaluated_and_registered_as_the_zero_shot_end(hub_cache: Path, data_dir: Path, mlflow_uri: str):
    """`clipline evaluate --model hf-hub:org/repo --register`: the start itself becomes a version, so
    that `compare` shows it beside what was fine-tuned from it (and a WiSE-FT blend of both)."""
    from clipline.components.config import load_config
    from clipline.components.evaluate.model import evaluate_model

    hub = nano_hub_repo(hub_cache)
    sid = synthetic.write_snapshot(data_dir / "snapshots", n=96, size=48)
    cfg = load_config(None, {"data_dir": data_dir})
    out = evaluate_model(cfg, f"hf-hub:{REPO}", snapshot_id=sid, register=True)
    assert out.registry is not None and out.registry.version == "1"
    ck = out.eval.checkpoint_dir
    assert ck.parent == data_dir / "checkpoints" / "_hub"
    assert checkpoint.read_meta(ck) == {"model_name": f"hf-hub:{REPO}", "start": f"hf-hub:{REPO}"}
    assert checkpoint.read_config(ck)["preprocess_cfg"]["mean"] == HUB_PREPROCESS["mean"]
    got = load_file(ck / checkpoint.WEIGHTS_FILE)
    assert all(torch.equal(got[k], hub[k]) for k in hub)
    assert "retrieval/val/text_to_image_R5" in out.eval.metrics


def test_train_pretrained_takes_the_same_starts_as_from_model(hub_cache: Path, data_dir: Path, mlflow_uri: str):
    """`train.pretrained` in the config (no --from-model): a hub id is resolved and trained from."""
    from mlflow.tracking import MlflowClient

    from clipline.components.train.run import train
    from trainkit import _cfg

    hub = nano_hub_repo(hub_cache)
    sid = synthetic.write_snapshot(data_dir / "snapshots", n=48, size=48)
    res = train(_cfg(data_dir, steps=1, pretrained=f"hf-hub:{REPO}"), snapshot_id=sid)
    assert res.model_name == f"hf-hub:{REPO}"
    assert MlflowClient(mlflow_uri).get_run(res.run_id).data.params["pretrained"] == f"hf-hub:{REPO}"
    tuned = load_file(res.checkpoint_dir / checkpoint.WEIGHTS_FILE)
    assert max((tuned[k] - hub[k]).abs().max().item() for k in ("token_embedding.weight", "logit_scale")) < 0.05


@pytest.mark.slow
def test_training_from_an_open_clip_tag_starts_from_the_tags_weights(hub_cache: Path, data_dir: Path, mlflow_uri: str):
    """--from-model MODEL:TAG trains from the tag's weights, with the tag's preprocessing (PE-Core-T, 70M
    parameters at 384 px: one step)."""
    import open_clip

    from clipline.components.train.run import train
    from trainkit import _cfg

    name, tag = "PE-Core-T-16-384", "meta"
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    write_hub_repo(hub_cache, "timm/PE-Core-T-16-384", {"open_clip_model.safetensors": save(weights)})
    sid = synthetic.write_snapshot(data_dir / "snapshots", n=12, size=48)
    res = train(
        _cfg(data_dir, steps=1, batch_size=4, lr=1e-5, warmup_steps=0), snapshot_id=sid, from_model=f"{name}:{tag}"
    )
    assert res.model_name == name
    assert checkpoint.read_config(res.checkpoint_dir)["preprocess_cfg"]["resize_mode"] == "squash"
    tuned = load_file(res.checkpoint_dir / checkpoint.WEIGHTS_FILE)
    torch.manual_seed(0)
    fresh = open_clip.create_model(name).state_dict()
    key = "text.token_embedding.weight"
    assert (tuned[key] - weights[key]).abs().max() < 0.01 < (fresh[key] - weights[key]).abs().max()
