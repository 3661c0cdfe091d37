"""The checkpoint contract (clipline/components/model/checkpoint.py): what it writes loads in plain
open_clip, by registered name with ``pretrained=<weights file>`` and by ``local-dir:``; every
accepted weights file name loads through each reader (inference, fine-tuning start, export);
writes are atomic; unusable checkpoints fail with a message naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipline.components.model import checkpoint, factory  # importing factory registers our configs
from clipline.components.model.checkpoint import CheckpointError
from clipline.components.model.errors import ModelError

NAME = "clipline-nano"


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(11)
    return factory.create(NAME)


@pytest.fixture(scope="module")
def probe(bundle):
    torch.manual_seed(0)
    x = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    t = bundle.tokenizer(["a red circle", "a blue star"])
    return x, t


def _features(model, probe) -> tuple[torch.Tensor, torch.Tensor]:
    x, t = probe
    model.eval()
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(t)


def _same(model, reference, probe) -> bool:
    return all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_features(model, probe), _features(reference, probe)))


def _save(bundle, out: Path, weights_name: str = checkpoint.WEIGHTS_FILE) -> Path:
    """A checkpoint of ``bundle`` whose weights file is ``weights_name`` (torch.save for the non-safetensors)."""
    d = checkpoint.save_checkpoint(
        bundle.model,
        bundle.model_cfg,
        out,
        bundle.preprocess_cfg,
        {"model_name": NAME, "snapshot_id": "snap", "run_id": None, "step": 3},
    )
    if weights_name != checkpoint.WEIGHTS_FILE:
        (d / checkpoint.WEIGHTS_FILE).unlink()
        torch.save(bundle.model.state_dict(), d / weights_name)
    return d


def test_written_checkpoint_loads_in_open_clip_by_name_and_by_local_dir(bundle, probe, tmp_path):
    d = _save(bundle, tmp_path / "ck")
    assert sorted(p.name for p in d.iterdir()) == [
        "clipline.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    cfg = json.loads((d / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == open_clip.get_model_config(NAME)
    by_name, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=str(d / checkpoint.WEIGHTS_FILE))
    by_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{d}")
    assert _same(by_name, bundle.model, probe) and _same(by_dir, bundle.model, probe)
    assert _same(factory.create(NAME, pretrained=d / checkpoint.WEIGHTS_FILE).model, bundle.model, probe)
    # the directory carries the preprocessing too (resize mode, normalisation), so evaluation resizes alike
    plain = json.loads(json.dumps(by_dir.visual.preprocess_cfg))
    assert plain == json.loads(json.dumps(bundle.preprocess_cfg))
    assert checkpoint.read_meta(d)["snapshot_id"] == "snap"


@pytest.mark.parametrize("weights_name", checkpoint.WEIGHTS_FILES)
def test_each_accepted_weights_file_loads_through_every_reader(bundle, probe, tmp_path, weights_name):
    d = _save(bundle, tmp_path / "ck", weights_name)
    assert checkpoint.weights_file(d) == d / weights_name
    # inference (evaluate, tracking)
    loaded = checkpoint.load_checkpoint(d, "cpu")
    assert _same(loaded.model, bundle.model, probe) and loaded.snapshot_id == "snap"
    # a fine-tuning start (train)
    assert _same(factory.create(NAME, pretrained=d).model, bundle.model, probe)
    # the state dict as open_clip reads it (export)
    state = checkpoint.read_state_dict(d)
    ref = bundle.model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_safetensors_is_preferred_when_several_weights_files_are_there(bundle, tmp_path):
    d = _save(bundle, tmp_path / "ck")
    for name in checkpoint.WEIGHTS_FILES[1:]:
        torch.save({}, d / name)
    assert checkpoint.weights_file(d) == d / checkpoint.WEIGHTS_FILE


def test_a_ddp_style_state_dict_loads(bundle, probe, tmp_path):
    d = _save(bundle, tmp_path / "ck", "model.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in bundle.model.state_dict().items()}}, d / "model.pt")
    assert _same(checkpoint.load_checkpoint(d, "cpu").model, bundle.model, probe)


def test_save_replaces_a_checkpoint_whole_and_a_failed_save_leaves_the_old_one(bundle, probe, tmp_path):
    d = _save(bundle, tmp_path / "ck")
    (d / "train_state.pt").write_bytes(b"old")
    other = factory.create(NAME).model  # different random weights
    checkpoint.save_checkpoint(other, bundle.model_cfg, d, bundle.preprocess_cfg, {"model_name": NAME})
    assert not (d / "train_state.pt").exists()  # replaced whole, not merged
    assert _same(checkpoint.load_checkpoint(d, "cpu").model, other, probe)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_checkpoint(
            bundle.model,
            bundle.model_cfg,
            d,
            bundle.preprocess_cfg,
            {"model_name": NAME},
            extra_files={"train_state.pt": Unpicklable()},
        )
    assert _same(checkpoint.load_checkpoint(d, "cpu").model, other, probe)  # the old checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def test_unusable_checkpoints_fail_naming_the_file(bundle, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.weights_file(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not a directory"):
        checkpoint.load_checkpoint(tmp_path / "missing", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no open_clip_config.json"):
        checkpoint.load_checkpoint(empty, "cpu")
    (empty / "open_clip_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load_checkpoint(empty, "cpu")
    (empty / "open_clip_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no 'model_cfg' key"):
        checkpoint.load_checkpoint(empty, "cpu")
    d = _save(bundle, tmp_path / "ck")
    (d / checkpoint.WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights file.*model.pt"):
        checkpoint.load_checkpoint(d, "cpu")
    d = _save(bundle, tmp_path / "ck2")
    wrong_model = "ck2/open_clip_model.safetensors does not load into model 'clipline-tiny'"
    with pytest.raises(CheckpointError, match=wrong_model):
        factory.create("clipline-tiny", pretrained=d)
    (d / checkpoint.WEIGHTS_FILE).write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="ck2/open_clip_model.safetensors does not load into the model"):
        checkpoint.load_checkpoint(d, "cpu")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        checkpoint.read_state_dict(d)
    assert issubclass(CheckpointError, ModelError) and factory.ModelError is ModelError
