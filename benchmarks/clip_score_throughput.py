"""CLIP-score throughput: the curate rule's scorer (``clipline.components.curate.clip_score``) vs a
plain open_clip loop over the same Parquet rows.

Both sides get the same model (``--model``, one of clipline's configs or an open_clip name, random
weights, seeded, written as a checkpoint and loaded the way the rule loads it), the same rows
(toy-web pictures with their captions, JPEG bytes in a Parquet file), the same batch size and the
same torch threads. Each side is timed end to end from the Parquet file: read the rows, decode and
preprocess every image, tokenise every caption, encode both, cosine similarity. The plain loop is
open_clip's README usage, batched: decode and preprocess in the loop, then encode. Best of
``--repeats`` runs, alternating sides; the scores of both sides must agree (1e-4) or it fails.

    python benchmarks/clip_score_throughput.py [--rows 1024] [--model clipline-tiny] [--batch-size 128]

Prints pairs/s for each side and, last, ``ratio: X.XX`` (the rule's / the plain loop's, >1 =
faster). Tiny, to check it runs: ``--rows 16 --batch-size 8 --repeats 1``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_rows(path: Path, n: int) -> Path:
    """``n`` toy-web pictures (JPEG) with their captions, as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipline.components.config import DemoConfig
    from clipline.components.demo.corpus import corpus_item, encode_jpeg, render

    cfg = DemoConfig(seed=0)
    items = [corpus_item(cfg.seed, i) for i in range(n)]
    images = [encode_jpeg(render(it.spec), it.spec.quality) for it in items]
    pq.write_table(pa.table({"image": images, "caption": [it.caption for it in items]}), path)
    return path


def plain_loop(model, preprocess, tokenizer, path: Path, batch_size: int):
    """open_clip's README, batched: for each batch, decode + preprocess, tokenise, encode, cosine."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from PIL import Image

    t = pq.read_table(path)
    images, captions = t.column("image").to_pylist(), t.column("caption").to_pylist()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            pix = torch.stack(
                [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[s : s + batch_size]]
            )
            img = F.normalize(model.encode_image(pix), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(captions[s : s + batch_size])), dim=-1)
            out.append((img * txt).sum(-1))
    return torch.cat(out).numpy()


def ours(scorer, path: Path, batch_size: int):
    import pyarrow.parquet as pq

    from clipline.components.curate.clip_score import score_pairs

    t = pq.read_table(path)
    return score_pairs(scorer, t.column("image").to_pylist(), t.column("caption").to_pylist(), batch_size=batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--model", default="clipline-tiny")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: the CPU count)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch

    from clipline.components.curate.clip_score import Scorer
    from clipline.components.model import checkpoint, factory

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = make_rows(tmp / "rows.parquet", args.rows)
        torch.manual_seed(0)
        bundle = factory.create(args.model)
        ck = checkpoint.save_checkpoint(
            bundle.model, bundle.model_cfg, tmp / "ck", bundle.preprocess_cfg, {"model_name": args.model}
        )
        loaded = checkpoint.load_checkpoint(ck, "cpu")
        scorer = Scorer(loaded.model, loaded.preprocess, loaded.tokenizer, loaded.device, args.model, "bench", ck)
        best = {"ours": float("inf"), "plain": float("inf")}
        for _ in range(args.repeats):
            t = time.perf_counter()
            a = ours(scorer, rows, args.batch_size)
            best["ours"] = min(best["ours"], time.perf_counter() - t)
            t = time.perf_counter()
            b = plain_loop(loaded.model, loaded.preprocess, loaded.tokenizer, rows, args.batch_size)
            best["plain"] = min(best["plain"], time.perf_counter() - t)
            if not np.allclose(a, b, atol=1e-4):
                raise SystemExit(f"the two sides disagree: max difference {np.abs(a - b).max():.2e}")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {threads}, model {args.model}, batch {args.batch_size}")
    print(f"rows: {args.rows}")
    print(f"plain_open_clip_loop: {args.rows / best['plain']:.1f} pairs/s")
    print(f"clip_score_rule: {args.rows / best['ours']:.1f} pairs/s")
    print(f"ratio: {best['plain'] / best['ours']:.2f}")


if __name__ == "__main__":
    main()
