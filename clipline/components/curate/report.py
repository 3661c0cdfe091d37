"""The per-run curate report: a Markdown table of rules with the rows each dropped, and a PNG
contact sheet with a few dropped examples per rule so a person can judge whether a rule is right.
Also logs the run to MLflow (experiment ``cfg.tracking.experiment``, tag ``stage=curate``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from clipline.components.curate import sources

THUMB = 128
LABEL_W = 190
CAPTION_H = 44


def markdown_table(manifest: dict) -> str:
    """The report as Markdown: counts of this run per rule, in the order rows are attributed."""
    counts = manifest["counts"]
    n_in = max(counts["input"], 1)
    lines = [
        f"# Curate report: snapshot `{manifest['snapshot_id']}`",
        "",
        f"- parent: `{manifest['parent_id']}`"
        + (f" (rebuilt: {manifest['rebuild_reason']})" if manifest.get("rebuild_reason") else ""),
        f"- new shards: {len(manifest['new_shards'])}, rows read: {counts['input']}, "
        f"kept: {counts['kept']} ({100.0 * counts['kept'] / n_in:.1f}%)",
        f"- snapshot rows: {manifest['n_rows']} (train {manifest['n_train']}, val {manifest['n_val']})",
        "",
        "A row that several rules would drop is counted under the first one, in this order.",
        "",
        "| # | rule | dropped | % of rows read |",
        "|---:|---|---:|---:|",
    ]
    for i, rule in enumerate(manifest["rule_order"], 1):
        n = counts["dropped"].get(rule, 0)
        lines.append(f"| {i} | {rule} | {n} | {100.0 * n / n_in:.2f} |")
    lines.append(f"| | **kept** | **{counts['kept']}** | {100.0 * counts['kept'] / n_in:.2f} |")
    return "\n".join(lines) + "\n"


def _font(size: int = 11) -> ImageFont.ImageFont:
    """DejaVu Sans, which matplotlib ships: Latin with its accents, Greek, Cyrillic, Arabic, Hebrew
    and more (Pillow's built-in font draws boxes for most non-ASCII letters). No CJK: those draw
    as boxes still, as in most sans fonts."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # a matplotlib without its fonts: Pillow's own (ASCII and little else)
        return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width`` pixels in ``font`` (a word too long for a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        while len(word) > 1 and font.getlength(word) > width:  # cut a word wider than the tile
            n = len(word) - 1
            while n > 1 and font.getlength(word[:n]) > width:
                n -= 1
            lines.append(word[:n])
            word = word[n:]
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _tile(image_bytes: bytes | None, caption: str | None, font) -> Image.Image:
    tile = Image.new("RGB", (THUMB, THUMB + CAPTION_H), "white")
    draw = ImageDraw.Draw(tile)
    img = None
    if image_bytes:
        try:
            img = Image.open(io.BytesIO(image_bytes))
            img.draft("RGB", (THUMB, THUMB))
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
        except Exception:  # noqa: BLE001 - shown as "undecodable"
            img = None
    if img is not None:
        tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    else:
        draw.rectangle([0, 0, THUMB - 1, THUMB - 1], fill=(235, 235, 235))
        draw.text((8, THUMB // 2 - 6), "no image" if not image_bytes else "undecodable", fill="gray", font=font)
    text = "\n".join(_wrap((caption or "(no caption)")[:80], font, THUMB - 4)[:3])
    draw.multiline_text((2, THUMB + 2), text, fill="black", font=font, spacing=1)
    return tile


def contact_sheet(examples: dict[str, list[tuple[bytes | None, str | None]]], out: Path, per_rule: int) -> Path | None:
    """A PNG with one row per rule (in the given order) and up to ``per_rule`` examples each."""
    rows = [(r, ex) for r, ex in examples.items() if ex]
    if not rows or per_rule <= 0:
        return None
    font = _font()
    w = LABEL_W + per_rule * (THUMB + 6)
    h = len(rows) * (THUMB + CAPTION_H + 8) + 8
    sheet = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    y = 6
    for rule, ex in rows:
        draw.multiline_text((6, y + THUMB // 2 - 8), rule, fill="black", font=font)
        for j, (b, cap) in enumerate(ex[:per_rule]):
            sheet.paste(_tile(b, cap, font), (LABEL_W + j * (THUMB + 6), y))
        y += THUMB + CAPTION_H + 8
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def sample_dropped(
    con: duckdb.DuckDBPyConnection, schema: dict, paths: list[Path], order: list[str], per_rule: int
) -> dict[str, list[tuple[bytes | None, str | None]]]:
    """Up to ``per_rule`` dropped rows per rule (deterministic: smallest md5 of the key), with
    their image bytes read from the shards for just those rows."""
    if per_rule <= 0:
        return {}
    sample = con.sql(f"""
        SELECT reason AS label, f.filename, {sources.RID_ROW} AS file_row_number, caption FROM (
            SELECT *, row_number() OVER (PARTITION BY reason ORDER BY hash(coalesce(key, '')), rid) AS rk
            FROM rows WHERE reason IS NOT NULL) x JOIN files f ON f.fid = {sources.RID_FILE}
        WHERE rk <= {int(per_rule)}
        ORDER BY label, f.filename, file_row_number""").to_arrow_table()
    out: dict[str, list] = {r: [] for r in order}
    for label, caption, image in _with_images(con, sample):
        out.setdefault(label, []).append((image, caption))
    return out


def _with_images(con: duckdb.DuckDBPyConnection, sample: Any) -> list[tuple[str, str | None, bytes | None]]:
    """(label, caption, image bytes) for the rows of ``sample`` (label, filename, file_row_number,
    caption), in its order, the images read from the shards for just those rows."""
    if sample.num_rows == 0:
        return []
    con.register("_sample", sample.append_column("ord", pa.array(range(sample.num_rows), pa.int64())))
    files = sorted(set(sample.column("filename").to_pylist()))
    # the image columns of the files read here (external shards may hold `jpg` and no `image`)
    read_schema = sources.union_schema([Path(f) for f in files])
    rows = con.execute(f"""
        SELECT s.label, s.caption, {sources.image_expr(read_schema)} AS image
        FROM read_parquet({sources.sql_list([Path(f) for f in files])}, union_by_name = true, filename = true,
                          file_row_number = true) r
        JOIN _sample s ON r.filename = s.filename AND r.file_row_number = s.file_row_number
        ORDER BY s.ord""").fetchall()
    con.unregister("_sample")
    return [(label, caption, bytes(image) if image is not None else None) for label, caption, image in rows]


def clip_score_figures(con: duckdb.DuckDBPyConnection, report_dir: Path, clip: dict, n_lowest: int) -> dict[str, Path]:
    """The CLIP-score rule's figures: ``clip_score_histogram.png`` (the scores of this run's rows,
    kept and dropped, and the threshold) and ``clip_score_lowest.png`` (the lowest-scored pairs it
    dropped, lowest first, score on each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Path] = {}
    t = con.sql("""SELECT clip_score, coalesce(reason = 'clip_score', FALSE) AS dropped FROM rows
                   WHERE clip_score IS NOT NULL AND NOT isnan(clip_score)""").to_arrow_table()
    if t.num_rows:
        scores = t.column(0).to_numpy()
        dropped = t.column(1).to_numpy(zero_copy_only=False)
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 41)
        ax.hist([scores[~dropped], scores[dropped]], bins=bins, stacked=True, label=["kept", "dropped"])
        if clip.get("threshold") is not None and np.isfinite(clip["threshold"]):
            ax.axvline(clip["threshold"], color="black", linestyle="--", label=f"threshold {clip['threshold']:.3f}")
        model = str(clip.get("model"))
        ax.set_title("scored by " + (model if len(model) <= 60 else "..." + model[-57:]), fontsize=9)
        ax.set_xlabel("image-caption cosine similarity")
        ax.set_ylabel("rows")
        ax.legend()
        fig.tight_layout()
        out["clip_score_histogram"] = report_dir / "clip_score_histogram.png"
        fig.savefig(out["clip_score_histogram"])
        plt.close(fig)
    if n_lowest > 0:
        sample = con.sql(f"""
            SELECT printf('%.3f', clip_score) AS label, f.filename, {sources.RID_ROW} AS file_row_number, caption
            FROM rows JOIN files f ON f.fid = {sources.RID_FILE}
            WHERE reason = 'clip_score' AND NOT isnan(clip_score)
            ORDER BY clip_score, rid LIMIT {int(n_lowest)}""").to_arrow_table()
        lowest = _with_images(con, sample)
        if lowest:
            examples = {"lowest-scored\ndropped": [(img, f"{label}: {cap}") for label, cap, img in lowest]}
            sheet = contact_sheet(examples, report_dir / "clip_score_lowest.png", len(lowest))
            if sheet is not None:
                out["clip_score_lowest"] = sheet
    return out


def write_report(
    con: duckdb.DuckDBPyConnection, report_dir: Path, manifest: dict, schema: dict, paths: list[Path], per_rule: int
) -> dict[str, Path]:
    """Write ``report.md``, ``dropped.parquet`` (every dropped row with its rule) and
    ``contact_sheet.png`` (when any row was dropped) into report_dir."""
    report_dir.mkdir(parents=True, exist_ok=True)
    md = report_dir / "report.md"
    examples = sample_dropped(con, schema, paths, manifest["rule_order"], per_rule)
    dropped = manifest["counts"]["dropped"]
    labelled = {f"{rule}\n{dropped.get(rule, 0)} dropped": ex for rule, ex in examples.items()}
    sheet = contact_sheet(labelled, report_dir / "contact_sheet.png", per_rule)
    text = markdown_table(manifest)
    if sheet is not None:
        text += f"\n![dropped examples per rule]({sheet.name})\n"
    decisions = report_dir / "dropped.parquet"
    con.execute(f"""
        COPY (SELECT r.key, r.url, r.caption, f.shard_id, {sources.RID_ROW} AS shard_row, r.reason
              FROM rows r JOIN files f ON f.fid = {sources.RID_FILE} WHERE r.reason IS NOT NULL ORDER BY r.rid)
        TO '{str(decisions).replace("'", "''")}' (FORMAT parquet)""")
    text += f"\nEvery dropped row (key, url, normalised caption, shard, row, rule): `{decisions.name}`\n"
    out = {"markdown": md, "dropped_rows": decisions}
    clip = manifest.get("clip_score") or {}
    if clip.get("model"):
        figs = clip_score_figures(con, report_dir, clip, max(per_rule, 8))
        text += (
            f"\n## CLIP score\n\nModel {clip['model']}, threshold {clip['threshold']}: {clip['rows']} rows, "
            f"{clip['scored']} scored now, {clip['from_cache']} from the cache.\n"
        )
        text += "".join(f"\n![{k}]({p.name})\n" for k, p in figs.items())
        out.update(figs)
    elif clip.get("skipped"):
        text += f"\n## CLIP score\n\nSkipped: {clip['skipped']}.\n"
    md.write_text(text)
    if sheet is not None:
        out["contact_sheet"] = sheet
    return out


def log_to_mlflow(cfg, result) -> str:
    """Log a curate run to MLflow; returns the run id."""
    import mlflow

    from clipline.components.tracking.runs import ensure_experiment

    mlflow.set_tracking_uri(cfg.mlflow_uri)
    # the experiment's artifact location under the data dir, not ./mlruns of the working directory
    mlflow.set_experiment(experiment_id=ensure_experiment(cfg))
    m = result.manifest
    with mlflow.start_run(
        run_name=f"curate-{result.snapshot_id}",
        tags={"stage": "curate", "snapshot_id": result.snapshot_id, "parent_id": str(result.parent_id)},
    ) as run:
        params = {f"curate.{k}": v for k, v in m["config"].items()}
        params.update({"new_shards": len(m["new_shards"]), "parent_id": str(result.parent_id)})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {
            "rows_read": result.counts["input"],
            "rows_kept": result.counts["kept"],
            "snapshot_rows": result.n_rows,
            "n_train": result.n_train,
            "n_val": result.n_val,
        }
        metrics.update({f"dropped/{r}": n for r, n in result.counts["dropped"].items()})
        metrics.update({"seconds/" + k.replace(":", "").replace(" ", "_"): v for k, v in result.timings.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        if result.report_path:
            mlflow.log_artifact(str(result.report_path), artifact_path="curate")
        if result.contact_sheet_path:
            mlflow.log_artifact(str(result.contact_sheet_path), artifact_path="curate")
        for key in ("clip_score_histogram", "clip_score_lowest"):
            if m.get("report", {}).get(key):
                mlflow.log_artifact(m["report"][key], artifact_path="curate")
        clip = m.get("clip_score") or {}
        if clip.get("model"):
            mlflow.set_tag("clip_score_model", clip["model"])
            mlflow.log_metrics(
                {
                    f"clip_score/{k}": float(clip[k])
                    for k in ("threshold", "scored", "from_cache")
                    if clip.get(k) is not None
                }
            )
        mlflow.log_dict(m, "curate/manifest.json")
        return run.info.run_id


__all__ = ["markdown_table", "contact_sheet", "write_report", "log_to_mlflow", "sample_dropped", "clip_score_figures"]
