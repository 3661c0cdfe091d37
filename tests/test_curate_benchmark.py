"""The curate benchmark's inputs and the script itself: the web caption mix of
`clipline.components.curate.synthetic` carries what a crawl's captions carry (other scripts, entities,
mojibake, emoji) on the same planted rows as the ASCII mix, and `benchmarks/curate_scaling.py` runs at a
tiny size as a user runs it and ends with its whole-stage headline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from clipline.components.curate import synthetic
from clipline.components.curate.normalize import MAYBE_DIRTY, normalize_captions

ROOT = Path(__file__).resolve().parents[1]


def _tables(tmp_path: Path, captions: str, n: int = 20_000) -> pa.Table:
    raw = tmp_path / captions
    raw.mkdir()
    return pa.concat_tables([t for _, _, t in synthetic.generate(raw, n, 8_000, seed=3, captions=captions)])


def test_web_mix_has_a_crawls_captions_on_the_ascii_mixs_rows(tmp_path):
    web, ascii_ = _tables(tmp_path, "web"), _tables(tmp_path, "ascii")
    # the planted problems, URLs, hashes and sizes are the same rows: only captions differ
    assert web.drop_columns(["caption"]).equals(ascii_.drop_columns(["caption"]))
    caps_a, caps_w = ascii_.column("caption"), web.column("caption")
    assert pc.all(pc.string_is_ascii(caps_a)).as_py()
    assert not pc.any(pc.match_substring_regex(caps_a, MAYBE_DIRTY)).as_py()  # nothing for the normaliser

    text = "\n".join(caps_w.to_pylist())
    for what, pattern in {
        "Cyrillic": r"[\u0400-\u04ff]",
        "CJK": r"[\u4e00-\u9fff]",
        "Hangul": r"[\uac00-\ud7af]",
        "Arabic": r"[\u0600-\u06ff]",
        "Devanagari": r"[\u0900-\u097f]",
        "emoji": r"[\U0001F300-\U0001FAFF]",
        "HTML entity": r"&amp;|&#39;|&quot;",
        "mojibake": r"Ã©|â€™",
        "accents": r"[éèüöñç]",
    }.items():
        assert re.search(pattern, text), what
    non_ascii = 1 - pc.sum(pc.string_is_ascii(caps_w)).as_py() / len(caps_w)
    dirty = pc.sum(pc.match_substring_regex(caps_w, MAYBE_DIRTY)).as_py() / len(caps_w)
    # the documented mix: 62% printable ASCII before the planted problems replace some captions
    assert 0.25 < non_ascii < 0.40 and dirty > non_ascii, (non_ascii, dirty)

    # the normaliser has real work: mojibake and entities come out repaired
    fixed = normalize_captions(caps_w).to_pylist()
    before = caps_w.to_pylist()
    changed = sum(a != b for a, b in zip(before, fixed))
    assert changed > 0.05 * len(before)
    assert not any("Ã©" in c or "&amp;" in c for c in fixed)
    assert any("café" in c for c in fixed if c)


def test_an_unknown_caption_mix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="captions must be one of"):
        synthetic.generate(tmp_path, 10, 10, captions="latin1")


HEADLINE = re.compile(r"curate_rows_per_s_2000: ([0-9]+)")


@pytest.mark.slow
def test_curate_scaling_runs_tiny_and_ends_with_the_whole_stage(tmp_path):
    """One to two minutes on 2 cores: every run starts Python and MLflow, and the stage's fixed costs
    (setup, report, MLflow run) dominate at 2,000 rows."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "curate_scaling.py"),
            "--sizes",
            "2000",
            "--repeat",
            "1",
            "--captions",
            "web",
            "--shard-rows",
            "1000",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = HEADLINE.fullmatch(lines[-1])
    assert m and int(m[1]) > 0, lines[-1]
    assert "web captions" in lines[-2] and "(the headline)" in lines[-2], lines[-2]
    whole = next(line for line in lines if line.strip().startswith("whole stage, curate()"))
    rows_s = float(re.search(r"-> ([0-9,]+) rows/s", whole)[1].replace(",", ""))
    assert abs(rows_s - int(m[1])) <= 1  # the headline is the whole stage, not a sub-window
    for sub in ("without the MLflow run:", "rules + exact dedup (", "near-duplicate pair search alone:"):
        assert any(line.strip().startswith(sub) for line in lines), sub
    kept = next(line for line in lines if line.strip().startswith("kept "))
    assert re.search(r"language=[0-9]{2,}", kept), kept  # the web mix's other languages reach the language rule
    assert not (tmp_path / "mlruns").exists()  # MLflow's artifacts stay in the benchmark's own store
