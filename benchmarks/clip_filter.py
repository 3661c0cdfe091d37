"""CLIP-score filtering with a trained champion, measured on the toy web with mismatched pairs.

1. The demo on a toy web where a share of the clean pairs (``--mismatch``, default 0.3) carry
   another picture's caption: the pipeline trains a model on the unfiltered snapshot and registers
   it as the champion (the clip_score rule has no champion yet, so it waits).
2. curate again with the clip_score rule scoring with that champion, keeping the top
   ``--keep`` share (and, from the score cache, a few other shares for the table): of the pairs
   that reach the rule, the share of mismatched ones dropped and of matched ones kept (ground
   truth: the toy web's ``mismatched`` column, carried from its URL list).
3. The same recipe and steps from scratch on the filtered snapshot, evaluated as the demo
   evaluates: held-out and seen top-1 of the model trained on filtered data beside the demo's
   model trained on the unfiltered data.

    python benchmarks/clip_filter.py [--n 3000] [--mismatch 0.3] [--keep 0.7] [--seed 0]

Prints the table of shares, the two models' figures and, last, ``mismatched_dropped: X``,
``matched_kept: X``, ``heldout_acc1_unfiltered: X`` and ``heldout_acc1_filtered: X``. Tiny, to check
it runs: ``--n 200 --steps 5``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shares(cfg, manifest: dict, url_mismatched: dict[str, bool]) -> tuple[float, float, int, int]:
    """(share of mismatched pairs the rule dropped, share of matched pairs it kept, how many of
    each reached the rule) for the snapshot whose manifest is given."""
    import pyarrow.parquet as pq

    kept = [
        url_mismatched[u]
        for f in manifest["new_files"]
        for u in pq.read_table(cfg.snapshots_dir / f, columns=["url"]).column("url").to_pylist()
    ]
    report = Path(manifest["report"]["dropped_rows"])
    dropped = pq.read_table(report, columns=["url", "reason"]).to_pylist()
    gone = [url_mismatched[r["url"]] for r in dropped if r["reason"] == "clip_score"]
    n_mis = sum(kept) + sum(gone)
    n_ok = (len(kept) - sum(kept)) + (len(gone) - sum(gone))
    return (
        sum(gone) / n_mis if n_mis else float("nan"),
        (len(kept) - sum(kept)) / n_ok if n_ok else float("nan"),
        n_mis,
        n_ok,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="toy web URLs")
    ap.add_argument("--mismatch", type=float, default=0.3, help="share of clean pairs under another picture's caption")
    ap.add_argument("--keep", type=float, default=0.7, help="clip_score_keep_fraction of the filtered snapshot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the demo recipe's)")
    ap.add_argument("--data-dir", type=Path, default=None, help="keep everything here (default: a temporary dir)")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from clipline.components.config import load_config
    from clipline.components.curate import curate
    from clipline.components.evaluate.model import evaluate_model
    from clipline.components.train.run import train
    from clipline.flows.demo import run_demo, with_demo_recipe

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{data / 'mlflow.db'}")
        base = {"data_dir": str(data), "demo": {"n_images": args.n, "seed": args.seed, "mismatch_share": args.mismatch}}
        if args.steps:
            base["demo"]["train"] = {"steps": args.steps}
        cfg = load_config(None, base)
        demo = run_demo(cfg, say=lambda s: None, note=lambda s: print("note:", s))
        unfiltered = demo.summary
        heldout, seen = data / "eval" / "heldout" / "data.parquet", data / "eval" / "seen" / "data.parquet"
        url_list = data / "toyweb" / "toyweb_urls.parquet"
        t = pq.read_table(url_list, columns=["url", "mismatched"])
        url_mismatched = dict(zip(t.column("url").to_pylist(), t.column("mismatched").to_pylist()))

        print(f"toy web: {args.n} URLs, {sum(url_mismatched.values())} mismatched pairs, seed {args.seed}")
        print("| clip_score_keep_fraction | mismatched dropped | matched kept | pairs scored now / from cache |")
        print("|---:|---:|---:|---:|")
        filtered_id = None
        for keep in sorted({0.5, 0.6, args.keep, 0.8}):
            fcfg = load_config(None, {**base, "curate": {"clip_score_keep_fraction": keep}})
            res = curate(fcfg, eval_set=heldout, track=False)
            mis, ok, n_mis, n_ok = shares(fcfg, res.manifest, url_mismatched)
            clip = res.manifest["clip_score"]
            print(f"| {keep} | {mis:.3f} of {n_mis} | {ok:.3f} of {n_ok} | {clip['scored']} / {clip['from_cache']} |")
            if keep == args.keep:
                filtered_id, best = res.snapshot_id, (mis, ok, clip["model"])
        print(f"scored by: {best[2]}")

        fcfg, _ = with_demo_recipe(load_config(None, {**base, "train": {"run_name": "filtered"}}))
        tr = train(fcfg, snapshot_id=filtered_id)
        ev = evaluate_model(fcfg, str(tr.checkpoint_dir), datasets=[str(heldout), str(seen)])
        m = ev.eval.metrics
        print(
            f"unfiltered snapshot: {unfiltered['train']['steps']} steps, heldout top-1 {unfiltered['heldout_acc1']:.3f}, "
            f"seen {unfiltered['seen_acc1']:.3f}"
        )
        print(
            f"filtered snapshot ({filtered_id}): {tr.steps} steps, heldout top-1 {m['zeroshot/heldout/acc1']:.3f}, "
            f"seen {m['zeroshot/seen/acc1']:.3f}"
        )
        print(f"benchmark_seconds: {time.perf_counter() - t0:.0f}")
        print(f"mismatched_dropped: {best[0]:.3f}")
        print(f"matched_kept: {best[1]:.3f}")
        print(f"heldout_acc1_unfiltered: {unfiltered['heldout_acc1']:.3f}")
        print(f"heldout_acc1_filtered: {m['zeroshot/heldout/acc1']:.3f}")


if __name__ == "__main__":
    main()
