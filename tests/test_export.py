"""`clipline export`: the written directory loads in plain open_clip and through CLIP_benchmark's
open_clip loader, in a fresh interpreter that never imports clipline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evalkit import make_checkpoint, tiny_model

from clipline.flows.cli import app

LOADER = textwrap.dedent("""
    import json, sys
    import torch
    out, probe = sys.argv[1], sys.argv[2]
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    x = torch.load(probe)
    with torch.no_grad():
        a = model.eval().encode_image(x["image"])
        t = model.encode_text(tok(["a red circle"]))
    from clip_benchmark.models import load_clip
    m2, transform, tok2 = load_clip(model_type="open_clip", model_name=f"local-dir:{out}",
                                     pretrained=f"{out}/open_clip_model.safetensors", cache_dir=None, device="cpu")
    with torch.no_grad():
        b = m2.eval().encode_image(x["image"])
    print(json.dumps({
        "open_clip": torch.allclose(a, x["want"], atol=1e-5),
        "clip_benchmark": torch.allclose(b, x["want"], atol=1e-5),
        "text_dim": t.shape[-1],
        "image_size": list(preprocess.transforms[1].size),
        "clipline_imported": any(k.split(".")[0] == "clipline" for k in sys.modules),
    }))
""")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_export_loads_in_plain_open_clip_and_clip_benchmark(tmp_path, data_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=7)
    out = tmp_path / "exported"
    res = CliRunner().invoke(app, ["--data-dir", str(data_dir), "export", str(ckpt), str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "clipline.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tiny_model(seed=7).encode_image(x)
    torch.save({"image": x, "want": want}, tmp_path / "probe.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), str(out), str(tmp_path / "probe.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "open_clip": True,
        "clip_benchmark": True,
        "text_dim": 32,
        "image_size": [32, 32],
        "clipline_imported": False,
    }


@pytest.mark.slow
def test_clip_benchmark_cli_evaluates_the_export_with_our_numbers(tmp_path, data_dir):
    """`clip_benchmark eval --model_type open_clip --model local-dir:OUT --pretrained ...` runs to the end
    on a Flickr-format retrieval set (its classification path hits a NumPy 2 bug in its accuracy())."""
    from evalkit import COLORS, SHAPES, draw

    from clipline.components.evaluate.datasets import PairSet
    from clipline.components.evaluate.retrieval import run_retrieval
    from clipline.components.model.checkpoint import load_checkpoint
    from clipline.components.model.export import export_checkpoint

    out = export_checkpoint(make_checkpoint(tmp_path / "ckpt", seed=5), tmp_path / "exported").out_dir
    root = tmp_path / "flickr"
    root.mkdir()
    combos = [(c, s) for c in COLORS for s in SHAPES][:12]
    lines, pairs = ["image,caption"], PairSet("val", [], [], [])
    for i, (c, s) in enumerate(combos):
        img = draw(c, s, seed=i)
        (root / f"{i:03d}.jpg").write_bytes(img)  # PIL opens by content, not by suffix
        lines.append(f"{i:03d}.jpg,a {c} {s}")
        pairs.keys.append(str(i))
        pairs.captions.append(f"a {c} {s}")
        pairs.images.append(img)
    (root / "ann.txt").write_text("\n".join(lines) + "\n")
    cli = Path(sys.executable).parent / "clip_benchmark"
    proc = subprocess.run(
        [
            str(cli),
            "eval",
            "--model_type",
            "open_clip",
            "--model",
            f"local-dir:{out}",
            "--pretrained",
            str(out / "open_clip_model.safetensors"),
            "--dataset",
            "flickr30k",
            "--dataset_root",
            str(root),
            "--annotation_file",
            str(root / "ann.txt"),
            "--task",
            "zeroshot_retrieval",
            "--recall_k",
            "1",
            "5",
            "--no_amp",
            "--num_workers",
            "0",
            "--batch_size",
            "5",
            "--output",
            str(tmp_path / "res.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads((tmp_path / "res.json").read_text())["metrics"]
    m = load_checkpoint(out, "cpu")
    ours = run_retrieval(m.model, m.tokenizer, m.preprocess, pairs, batch_size=5, ks=(1, 5))
    for k in (1, 5):
        assert ours.text_to_image[k] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-4)
        assert ours.image_to_text[k] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-4)

    # the same pairs as a CLIP_benchmark webdataset retrieval set (wds/NAME --dataset_root DIR):
    # clipline's `evaluate` of the export and CLIP_benchmark's CLI give the same recall
    from evalkit import write_wds_retrieval_set

    from clipline.components.config import load_config
    from clipline.components.evaluate.model import evaluate_model

    write_wds_retrieval_set(tmp_path / "wds_shapes", pairs.images, [[c] for c in pairs.captions])
    args = [str(cli), "eval", "--model_type", "open_clip", "--model", f"local-dir:{out}"]
    args += ["--pretrained", str(out / "open_clip_model.safetensors"), "--dataset", "wds/shapes"]
    args += ["--dataset_root", str(tmp_path / "wds_{dataset}"), "--task", "zeroshot_retrieval", "--recall_k", "1", "5"]
    args += ["--no_amp", "--num_workers", "0", "--batch_size", "5", "--output", str(tmp_path / "wds.json")]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads((tmp_path / "wds.json").read_text())["metrics"]
    cfg = load_config(None, {"data_dir": data_dir, "evaluate": {"recall_k": [1, 5]}})
    ev = evaluate_model(cfg, str(out), datasets=["wds/shapes"], dataset_root=str(tmp_path / "wds_{dataset}"))
    for k in (1, 5):
        assert ev.eval.metrics[f"retrieval/shapes/text_to_image_R{k}"] == pytest.approx(
            theirs[f"image_retrieval_recall@{k}"], abs=1e-4
        )
        assert ev.eval.metrics[f"retrieval/shapes/image_to_text_R{k}"] == pytest.approx(
            theirs[f"text_retrieval_recall@{k}"], abs=1e-4
        )


def test_export_converts_bin_weights_to_safetensors(tmp_path):
    from safetensors.torch import load_file

    from clipline.components.model.checkpoint import load_checkpoint
    from clipline.components.model.export import export_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=9, weights="bin")
    res = export_checkpoint(ckpt, tmp_path / "out")
    state = load_file(str(res.weights))
    ref = tiny_model(seed=9).state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            load_checkpoint(res.out_dir, "cpu").model.encode_image(x), tiny_model(seed=9).encode_image(x), atol=1e-5
        )


def test_export_refuses_bad_input(tmp_path, data_dir):
    runner = CliRunner()
    ckpt = make_checkpoint(tmp_path / "ckpt")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep me")
    res = runner.invoke(app, ["--data-dir", str(data_dir), "export", str(ckpt), str(busy)])
    assert res.exit_code == 1 and "not empty" in res.output and (busy / "x.txt").read_text() == "keep me"
    (ckpt / "open_clip_model.safetensors").unlink()
    res = runner.invoke(app, ["--data-dir", str(data_dir), "export", str(ckpt), str(tmp_path / "o")])
    assert res.exit_code == 1 and "no weights file" in res.output
    res = runner.invoke(app, ["--data-dir", str(data_dir), "export", "/nonexistent/dir", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not a path" in res.output


@pytest.mark.slow
def test_export_of_a_model_with_our_own_tower_says_which_import_loads_it(tmp_path):
    """The demo's two-stream image tower is clipline's own (registered in timm on import): the
    export's printed command includes that import and works in a fresh process; plain open_clip
    without it fails naming the tower."""
    from clipline.components.model import checkpoint, factory
    from clipline.components.model.export import export_checkpoint

    b = factory.create("clipline-demo")
    ck = checkpoint.save_checkpoint(
        b.model, b.model_cfg, tmp_path / "ck", b.preprocess_cfg, {"model_name": "clipline-demo"}
    )
    res = export_checkpoint(ck, tmp_path / "out")
    assert "import clipline.components.model.towers" in res.open_clip_command
    assert "import sys, clipline.components.model.towers" in res.clip_benchmark_command
    with_import = subprocess.run(
        [sys.executable, "-c", f"import open_clip; {res.open_clip_command}\nprint('ok')"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=300,
    )
    assert with_import.returncode == 0 and with_import.stdout.strip().endswith("ok"), with_import.stderr[-2000:]
    plain = subprocess.run(
        [sys.executable, "-c", f"import open_clip; open_clip.create_model_and_transforms('local-dir:{res.out_dir}')"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=300,
    )
    assert plain.returncode != 0 and "clipline_two_stream" in plain.stderr
