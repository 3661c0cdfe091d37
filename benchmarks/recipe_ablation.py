"""What each training setting is worth to a plain architecture on the demo's data (issue 19).

For each seed, `clipline demo` runs once on a fresh data dir with training cut to one step (the toy
web is served, ingested and curated into a snapshot, and the held-out and seen evaluation sets are
written); then each variant trains on that snapshot in this process (`train.backend = "local"`, as the
demo trains) from the demo's recipe (`demo.train`) with MODEL in it and the variant's settings on top,
and is evaluated on both sets. Same snapshot, same seed, same evaluation: only the settings differ.

    python benchmarks/recipe_ablation.py [--model clipline-rgb-cnn] [--seed 0]... [--n 3000] [--steps N]
        [--variant NAME]... [--set NAME:KEY=VALUE[,KEY=VALUE]]...

With only `--set`, the variants are `recipe` and those given. A `model.KEY` (dotted for nested keys,
`model.vision_cfg.width`) changes MODEL's JSON config instead of a `[train]` setting: the variant trains
a copy of the config, registered as `MODEL-NAME`.

Variants (NAME: the settings changed from the demo's recipe): `--help` lists them.

Prints the machine, each seed's toy-web size, and per seed and variant `<variant>_seed<S>: heldout H
seen S | MODEL, N steps T s train, R samples/s, logit scale L` (L: the learned temperature at the end; the time is the training alone; evaluation and the demo's data are outside it), then
per variant the means over the seeds, `<variant>: heldout H seen S` (best held-out last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_time import cpu_model, run_demo  # noqa: E402  (beside this script)

from clipline.components.config import DEMO_TRAIN  # noqa: E402

STEPS = DEMO_TRAIN["steps"]
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "lr_1e-3": {"lr": 1e-3},
    "lr_4e-3": {"lr": 4e-3},
    "warmup_0": {"warmup_steps": 0},
    "warmup_70": {"warmup_steps": 70},
    "wd_0": {"weight_decay": 0.0},
    "wd_0.5": {"weight_decay": 0.5},
    "crop_1.0": {"crop_scale_min": 1.0},
    "crop_0.5": {"crop_scale_min": 0.5},
    "batch_32_x2_steps": {"batch_size": 32, "steps": 2 * STEPS},
    "batch_128_half_steps": {"batch_size": 128, "steps": STEPS // 2},
    "no_grad_clip": {"grad_clip": 0.0},
    "threads_2_workers_0": {"threads": 2, "loader_workers": 0},
    # the temperature's starting value (open_clip's and CLIP's: 1/0.07 = 14.3; clamped at 100 in training)
    "logit_scale_init_5": {"model.init_logit_scale": math.log(5)},
    "logit_scale_init_50": {"model.init_logit_scale": math.log(50)},
}
MODEL_KEY = "model."


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_set(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` -> (NAME, {KEY: VALUE})."""
    name, _, body = spec.partition(":")
    if not name or not body:
        raise argparse.ArgumentTypeError(f"--set {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    changes = {}
    for item in body.split(","):
        key, eq, val = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--set {spec!r}: {item!r} is not KEY=VALUE")
        changes[key.strip()] = _value(val.strip())
    return name, changes


def variant_model(model: str, name: str, changes: dict[str, Any], out_dir: Path) -> str:
    """A copy of clipline's config ``model`` with ``changes`` (dotted keys) applied, registered into
    open_clip as ``<model>-<name>``; its name."""
    from clipline.components.model import factory

    src = factory.CONFIG_DIR / f"{model}.json"
    if not src.is_file():
        sys.exit(f"variant {name}: model.* settings change one of clipline's own configs, and {model!r} is not one")
    cfg = json.loads(src.read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    path = out_dir / f"{model}-{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    (new,) = factory.register_configs(path)
    return new


def train_and_evaluate(
    data_dir: Path, seed: int, model: str, name: str, changes: dict[str, Any], sets: tuple[Any, Any]
) -> dict[str, Any]:
    """Train ``model`` on the demo recipe with ``changes`` on the data dir's snapshot; top-1 on ``sets``
    (the held-out and the seen set)."""
    from clipline.components.config import load_config
    from clipline.components.evaluate.model import evaluate_model
    from clipline.components.model import checkpoint
    from clipline.components.train.run import train

    model_changes = {k[len(MODEL_KEY) :]: v for k, v in changes.items() if k.startswith(MODEL_KEY)}
    changes = {k: v for k, v in changes.items() if not k.startswith(MODEL_KEY)}
    if model_changes:
        model = variant_model(model, name, model_changes, data_dir)

    settings = {
        **DEMO_TRAIN,
        "model": model,
        **changes,
        "backend": "local",
        "run_name": f"ablation-{name}",
        "system_metrics": False,
    }
    cfg = load_config(None, {"data_dir": data_dir, "demo": {"seed": seed}, "train": settings})
    heldout, seen = sets
    tr = train(cfg)
    ev = evaluate_model(cfg, str(tr.checkpoint_dir), datasets=[str(heldout.data), str(seen.data)])
    m = ev.eval.metrics
    weights = checkpoint.read_state_dict(checkpoint.weights_file(tr.checkpoint_dir))
    return {
        "logit_scale": float(weights["logit_scale"].exp()),
        "model": tr.model_name,
        "heldout": m[f"zeroshot/{heldout.name}/acc1"],
        "seen": m[f"zeroshot/{seen.name}/acc1"],
        "seconds": tr.train_seconds,
        "samples_per_s": tr.samples_per_s,
        "steps": tr.steps,
    }


def main() -> None:
    epilog = "variants:\n" + "\n".join(
        f"  {name}: {', '.join(f'{k}={v}' for k, v in ch.items()) or '(the recipe as it is)'}"
        for name, ch in VARIANTS.items()
    )
    ap = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="clipline-rgb-cnn", help="the architecture every variant trains")
    ap.add_argument("--seed", type=int, action="append", help="toy-web seed (repeatable; default 0)")
    ap.add_argument("--n", type=int, default=None, help="toy-web size (default: the demo's, 3000)")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps of each variant that sets none (default: the recipe's)"
    )
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="run only these (repeatable)")
    ap.add_argument("--set", type=parse_set, action="append", default=[], help="an extra variant NAME:KEY=VALUE,...")
    args = ap.parse_args()
    from clipline.components.config import TrainConfig
    from clipline.components.demo import write_heldout_set, write_seen_set

    variants = {k: VARIANTS[k] for k in args.variant} if args.variant else dict(VARIANTS)
    if args.set and not args.variant:
        variants = {"recipe": {}}
    variants.update(dict(args.set))
    for name, changes in variants.items():
        unknown = sorted(k for k in changes if not k.startswith(MODEL_KEY) and k not in TrainConfig.model_fields)
        if unknown:
            sys.exit(f"variant {name}: unknown train setting(s) {', '.join(unknown)}")
    seeds = args.seed or [0]
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, python {platform.python_version()}")
    print(f"model: {args.model}; recipe: {', '.join(f'{k}={v}' for k, v in DEMO_TRAIN.items() if k != 'model')}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in seeds:
        data_dir = Path(tempfile.mkdtemp(prefix=f"clipline-ablation-s{seed}-"))
        log = data_dir.parent / f"{data_dir.name}.log"
        try:
            # the demo with one training step: the toy web ingested and curated into a snapshot
            seconds, summary = run_demo(data_dir, args.n, log, seed, recipe={"steps": 1, "warmup_steps": 0})
            print(f"--- seed {seed}: {summary['n_urls']} URLs, data ready in {seconds:.0f} s ({data_dir})", flush=True)
            # the demo wrote these; the same seed gives the same bytes
            sets = (write_heldout_set(data_dir / "eval", seed=seed), write_seen_set(data_dir / "eval", seed=seed))
            for name, changes in variants.items():
                load = os.getloadavg()[0]
                steps = {"steps": args.steps} if args.steps else {}
                r = train_and_evaluate(data_dir, seed, args.model, name, {**steps, **changes}, sets)
                results[name].append(r)
                print(
                    f"{name}_seed{seed}: heldout {r['heldout']:.3f} seen {r['seen']:.3f} | {r['model']}, "
                    f"{r['steps']} steps {r['seconds']:.0f} s train, {r['samples_per_s']:.0f} samples/s, "
                    f"logit scale {r['logit_scale']:.1f}, load {load:.2f}",
                    flush=True,
                )
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    means = {
        name: (sum(r["heldout"] for r in rs) / len(rs), sum(r["seen"] for r in rs) / len(rs))
        for name, rs in results.items()
    }
    print(f"--- means over {len(seeds)} seed(s)")
    for name, (h, s) in sorted(means.items(), key=lambda kv: kv[1][0]):
        print(f"{name}: heldout {h:.3f} seen {s:.3f}")


if __name__ == "__main__":
    main()
