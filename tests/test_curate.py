"""The curate stage on crafted raw shards: real Parquet, real JPEGs, real DuckDB, real MLflow."""

from __future__ import annotations

import json
import random

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipline.components.catalog import Catalog
from clipline.components.curate import CurateError, curate
from clipline.components.curate.near import band_plan, near_pairs, near_pairs_reference
from clipline.components.curate.evalset import EvalSetError
from clipline.components.curate.language import classes, classify, classify_langid
from clipline.components.curate.normalize import normalize_text
from clipline.components.curate.phash import phash64
from test_curate_helpers import config, hamming, jpeg, pattern_image, read_snapshot, row, write_shard


def _dropped(res) -> dict[str, int]:
    return {k: v for k, v in res.counts["dropped"].items() if v}


def _kept_keys(cfg, res) -> set[str]:
    return set(read_snapshot(cfg, res.manifest).column("key").to_pylist())


# ------------------------------------------------------------------ rules
@pytest.mark.slow
def test_each_rule_drops_exactly_its_rows(data_dir, tmp_path):
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("# my terms\nforbidden\nbad phrase\n")
    good = [row(f"good{i}", f"a clear photo of object number {i} on a table", seed=i) for i in range(6)]
    crafted = {
        "failed_download": [
            row("f1", status="failed_to_download"),
            row("f2", "tiny", status="failed_to_resize"),
        ],  # also too short: first rule wins
        "missing_key": [row("", "a photo of a missing key row", seed=50)],
        "image_too_small": [row("small", "a photo of a very small picture", seed=51, ow=199, oh=640)],
        "aspect_ratio": [row("wide", "a photo of a very wide panorama", seed=52, ow=1000, oh=300)],
        "missing_caption": [row("nocap", None, seed=53), row("blankcap", "  \t\n ", seed=54)],
        "caption_is_pattern": [
            row("urlcap", "https://example.com/some/image/path.jpg", seed=55),
            row("filecap", "IMG 2041 final (2).JPG", seed=56),
            row("numcap", "2019-07-04 12:30 #45", seed=57),
            row("filecap2", "my holiday photo (1).jpeg", seed=73),
            row("symbols", "★ ★ ★ — 2019 — ★ ★ ★", seed=74),
        ],
        "too_few_words": [row("words", "two words", seed=58)],
        "too_few_chars": [row("chars", "a b c", seed=59)],
        "too_long": [row("long", "a " + "very " * 300 + "long caption", seed=60)],
        "blocklisted": [
            row("block1", "a photo with a Forbidden thing inside", seed=61),
            row("block2", "this is a bad   phrase indeed", seed=62),
        ],
        "language": [
            row("fr", "un chat noir dort sur la table de la cuisine", seed=63),
            row("de", "ein roter Kreis auf einem blauen Hintergrund", seed=64),
        ],
    }
    # near misses that every rule must keep
    keep_extra = [
        row("forbiddenness", "a photo about forbiddenness in art", seed=70),  # not a whole word
        row("exact200", "a photo exactly at the size limit", seed=71, ow=200, oh=600),  # ratio 3.0
        row("three", "three word caption", seed=72),
        row("midfile", "a photo of file.jpg on a desk", seed=75),
    ]  # a file name, not only one
    rows = good + keep_extra + [r for rs in crafted.values() for r in rs]
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir, blocklist_file=blocklist)
    res = curate(cfg, track=False)
    assert _dropped(res) == {k: len(v) for k, v in crafted.items()}
    assert _kept_keys(cfg, res) == {r["key"] for r in good + keep_extra}
    assert res.counts["input"] == len(rows) and res.counts["kept"] == len(good) + len(keep_extra)


def test_rules_are_configurable_and_language_switchable(data_dir):
    rows = [
        row("fr", "un chat noir dort sur la table de la cuisine", seed=1),
        row("two", "two words", seed=2),
        row("small", "a photo of a small image here", seed=3, ow=120, oh=120),
        # letters of other scripts are letters: not "a caption without letters"
        row("ru", "фото чёрной кошки на столе", seed=4),
        row("ja", "テーブル の 上 の 黒い 猫", seed=5),
    ]
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir, language=None, min_caption_words=2, min_image_side=100)
    res = curate(cfg, track=False)
    assert _dropped(res) == {}
    assert _kept_keys(cfg, res) == {"fr", "two", "small", "ru", "ja"}


def test_word_count_rule_counts_words_as_string_split_does():
    """too_few_words is written as a LIKE pattern; it drops exactly the captions with fewer than
    min_caption_words space-separated parts, for every threshold and spacing."""
    import duckdb

    from clipline.components.config import CurateConfig
    from clipline.components.curate.rules import sql_rules

    rnd = random.Random(2)
    captions = [None, "", " ", "  ", "a", "a b", "a b c", " a b", "a  b", "a b ", "a%b c", "a_b c_d e"]
    captions += ["".join(rnd.choice("ab %_") for _ in range(rnd.randint(0, 9))) for _ in range(2000)]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (caption VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?)", [[c] for c in captions])
    for k in range(6):
        rule = next(r for r in sql_rules(CurateConfig(min_caption_words=k)) if r.name == "too_few_words")
        got = [r[0] for r in con.execute(f"SELECT ({rule.sql}\n) FROM t").fetchall()]
        want = [None if c is None else len(c.split(" ")) < k for c in captions]
        assert got == want, k


def test_caption_pattern_rule_is_one_full_match_of_its_patterns():
    """caption_is_pattern tries the file-name pattern only on captions that end with one of its
    extensions; it drops exactly what one full match of all four patterns drops."""
    import duckdb

    from clipline.components.config import CurateConfig
    from clipline.components.curate.rules import sql_rules

    patterns = [
        r"(https?://|www\.)\S+",
        r"[\w\-. ()\[\]]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic|avif)",
        r"(img|dsc|dscn|dscf|pxl|dcim|photo|image|pic|screenshot)[_\- ]?[\d_\- ]+",
        r"[^\pL]+",
    ]
    rnd = random.Random(3)
    captions = [
        None,
        "",
        ".",
        "a.jpg",
        "A.JPG",
        "x.jpeg.",
        "x.jpeg ",
        "my photo (1).jpeg",
        "IMG_2041.heic",
        "file.tiff",
        "file.tif",
        ".png",
        "a cat.",
        "www.example.com/x",
        "HTTPS://a.b",
        "img 12-3",
        "12:30",
        "★ — ★",
        "日本語",
        "a photo of file.jpg on a desk",
        "é.png",
        "[a] b.webp",
    ]
    captions += [
        f"my file (2).{ext}" for ext in ["jpg", "JPEG", "png", "gif", "webp", "bmp", "tif", "TIFF", "heic", "avif"]
    ]
    alphabet = [
        "a",
        "b",
        "I",
        "M",
        "G",
        "j",
        "p",
        "e",
        "g",
        "n",
        "f",
        "w",
        ".",
        " ",
        "_",
        "-",
        "(",
        ")",
        "1",
        "/",
        ":",
        "h",
        "t",
        "s",
        "é",
        "★",
        "jpg",
        "JPEG",
        "webp",
        "tiff",
        "img",
        "www.",
        "http://",
    ]
    captions += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8))) for _ in range(5000)]
    captions += [
        rnd.choice(["img", "DSC", "photo", "Pic"]) + "".join(rnd.choice("12_- a.g") for _ in range(rnd.randint(0, 6)))
        for _ in range(1000)
    ]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (caption VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?)", [[c] for c in captions])
    rule = next(r for r in sql_rules(CurateConfig()) if r.name == "caption_is_pattern")
    got = con.execute(f"SELECT ({rule.sql}\n) FROM t").fetchall()
    want = con.execute("SELECT regexp_full_match(caption, ?) FROM t", ["(?i)" + "|".join(patterns)]).fetchall()
    assert got == want
    for pattern in patterns:
        hits = con.execute("SELECT count(*) FROM t WHERE regexp_full_match(caption, ?)", ["(?i)" + pattern]).fetchall()
        assert hits[0][0] > 20, pattern  # the random captions hit each pattern


def test_rules_file_is_editable_sql(data_dir, tmp_path):
    from clipline.components.curate.rules import RULES_FILE, parse_rules

    custom = tmp_path / "my_rules.sql"
    custom.write_text(
        RULES_FILE.read_text() + "\n-- rule: no_cats\n-- a data person's own rule\n"
        "regexp_matches(lower(caption), '\\bcats?\\b')  -- cats are out\n"
    )
    write_shard(
        data_dir,
        "s0",
        [row("cat", "a photo of two cats on a sofa", seed=1), row("dog", "a photo of a dog on a sofa", seed=2)],
    )
    res = curate(config(data_dir, rules_file=custom), track=False)
    assert _dropped(res) == {"no_cats": 1}
    order = res.manifest["rule_order"]
    assert order.index("blocklisted") < order.index("no_cats") < order.index("language")
    with pytest.raises(ValueError, match="defined twice"):
        parse_rules("-- rule: a\nTRUE\n-- rule: a\nFALSE")
    with pytest.raises(ValueError, match="reserved"):
        parse_rules("-- rule: language\nTRUE")
    with pytest.raises(ValueError, match="no SQL expression"):
        parse_rules("-- rule: empty\n-- only a comment\n")


def test_normalisation_applies_before_rules_and_comparison(data_dir):
    img = jpeg(pattern_image(7))
    rows = [
        row("a", "The caf\u00c3\u00a9 doesn\u00e2\u20ac\u2122t   open\u200b early", image=img, url="http://x.test/a"),
        row("b", " The caf\u00e9 doesn't open early\n", image=img, url="http://x.test/b"),
        row("c", "\t\u00a0  \x07 ", seed=8),
    ]
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir, exact_image_dedup="image_and_caption", language=None)
    res = curate(cfg, track=False)
    assert _dropped(res) == {"dup_caption_image": 1, "missing_caption": 1}
    snap = read_snapshot(cfg, res.manifest)
    assert snap.column("caption").to_pylist() == ["The caf\u00e9 doesn't open early"]
    assert normalize_text("e\u0301") == "\u00e9"  # NFC


# ------------------------------------------------------------------ dedup
def test_exact_duplicates_keep_the_first_by_the_documented_order(data_dir):
    img = jpeg(pattern_image(1))
    rows = [
        row("u1", "a photo of the first upload here", seed=10, url="http://x.test/same"),
        row("u2", "a photo of the second upload here", seed=11, url="http://x.test/same"),
        # same bytes under two URLs: the larger original wins, whatever the key order
        row("i1", "a photo of a small copy here", image=img, ow=300, oh=300),
        row("i2", "a photo of a large copy here", image=img, ow=900, oh=900),
        row("k1", "a photo with a reused key one", seed=12, url="http://x.test/k-a"),
    ]
    rows.append(dict(row("k1", "a photo with a reused key two", seed=13, url="http://x.test/k-b")))
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir)
    res = curate(cfg, track=False)
    assert _dropped(res) == {"dup_url": 1, "dup_image": 1, "dup_key": 1}
    snap = read_snapshot(cfg, res.manifest)
    kept = dict(zip(snap.column("key").to_pylist(), snap.column("caption").to_pylist()))
    assert "i2" in kept and "i1" not in kept
    assert kept["k1"] == "a photo with a reused key one"  # equal areas: first in file... by key then row
    assert len(set(snap.column("url").to_pylist())) == snap.num_rows


def test_near_duplicates_found_and_distinct_images_kept(data_dir):
    base = pattern_image(42, size=256)
    variants = {
        "reencoded": jpeg(base, quality=35),
        "resized": jpeg(base.resize((180, 180), Image.Resampling.BILINEAR)),
        "cropped": jpeg(base.crop((5, 5, 251, 251)).resize((256, 256))),
    }
    orig_hash = phash64(jpeg(base))
    for name, b in variants.items():
        assert hamming(orig_hash, phash64(b)) <= 6, name
    distinct = {f"other{i}": jpeg(pattern_image(1000 + i, size=256)) for i in range(12)}
    for b in distinct.values():
        assert hamming(orig_hash, phash64(b)) > 6
    rows = [row("aaa-original", "a photo of the original image", image=jpeg(base), ow=1024, oh=1024)]
    rows += [row(k, f"a photo of the {k} copy", image=b, ow=512, oh=512) for k, b in variants.items()]
    rows += [row(k, f"a photo of a different image {k}", image=b) for k, b in distinct.items()]
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir)
    res = curate(cfg, track=False)
    assert _dropped(res) == {"near_dup_image": 3}
    assert _kept_keys(cfg, res) == {"aaa-original", *distinct}


def test_lsh_finds_exactly_the_pairs_brute_force_finds(data_dir):
    from clipline.components.curate.db import connect

    rng = np.random.default_rng(0)
    base = rng.integers(-(2**63), 2**63 - 1, size=1500, dtype=np.int64)
    planted = []
    for i in range(300):  # neighbours at every distance 0..9 around random bases
        b = int(base[i]) & ((1 << 64) - 1)
        bits = rng.choice(64, size=i % 10, replace=False)
        for bit in bits:
            b ^= 1 << int(bit)
        planted.append(b if b < 2**63 else b - 2**64)
    hashes = np.unique(np.concatenate([base, np.array(planted, dtype=np.int64)]))
    cfg = config(data_dir)
    con = connect(cfg)
    con.register("_h", pa.table({"gid": np.arange(len(hashes), dtype=np.int64), "phash": hashes}))
    con.execute("CREATE TEMP TABLE h AS SELECT * FROM _h")
    for d, engine in ((0, "numpy"), (3, "sql"), (6, "numpy"), (6, "sql"), (8, "numpy")):
        got = {tuple(p) for p in near_pairs(con, "h", d, engine=engine).tolist()}
        u = hashes.astype(np.uint64)
        x = u[:, None] ^ u[None, :]
        dist = np.unpackbits(x.view(np.uint8), axis=-1).reshape(len(u), len(u), 64).sum(-1)
        ii, jj = np.nonzero(np.triu(dist <= d, k=1))
        assert got == set(zip(ii.tolist(), jj.tolist())), (d, engine)
        assert got == {tuple(p) for p in near_pairs_reference(hashes, d).tolist()}  # gid = position here
        assert d == 0 or len(got) >= 20  # d == 0: the hashes are unique
    plan = band_plan(6, 1_000_000)
    assert plan.n_bands - 6 >= 2 and plan.key_bits >= 16  # no 8-bit buckets at scale


def test_caption_near_dedup_optional(data_dir):
    rows = [
        row("a", "Buy cheap red shoes online now at the best store", seed=1),
        row("b", "Buy cheap red shoes online now at the best store!", seed=2),
        row("c", "a photo of a dog running on the beach at sunset", seed=3),
    ]
    write_shard(data_dir, "s0", rows)
    res = curate(config(data_dir), track=False)
    assert _dropped(res) == {}
    res2 = curate(config(data_dir, caption_near_dedup=True), track=False)
    assert res2.snapshot_id != res.snapshot_id and res2.manifest["rebuild_reason"]
    assert _dropped(res2) == {"near_dup_caption": 1}


# ------------------------------------------------------------------ decontamination
@pytest.mark.parametrize("as_dir", [False, True])
def test_decontamination_removes_planted_eval_image(data_dir, tmp_path, as_dir):
    evals = [pattern_image(500 + i, size=200) for i in range(5)]
    if as_dir:
        eval_path = tmp_path / "evalimgs"
        (eval_path / "sub").mkdir(parents=True)
        for i, im in enumerate(evals):
            im.save(eval_path / "sub" / f"{i}.png")
    else:
        eval_path = tmp_path / "eval.parquet"
        pq.write_table(pa.table({"image": [jpeg(im) for im in evals], "label": list(range(5))}), eval_path)
    planted = jpeg(evals[3].resize((150, 150)), quality=60)
    rows = [row(f"t{i}", f"a training photo number {i} here", seed=i) for i in range(10)]
    rows.append(row("planted", "a photo that leaked from the test set", image=planted))
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir)
    res = curate(cfg, eval_set=eval_path, track=False)
    assert _dropped(res) == {"eval_contamination": 1}
    assert "planted" not in _kept_keys(cfg, res) and len(_kept_keys(cfg, res)) == 10


def test_bad_eval_set_and_no_shards_give_clear_errors(data_dir, tmp_path):
    cfg = config(data_dir)
    with pytest.raises(CurateError, match="clipline ingest"):
        curate(cfg, track=False)
    write_shard(data_dir, "s0", [row("a", "a photo of something nice", seed=1)])
    with pytest.raises(EvalSetError, match="does not exist"):
        curate(cfg, eval_set=tmp_path / "nope.parquet", track=False)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"label": [1]}), bad)
    with pytest.raises(EvalSetError, match="no 'image'"):
        curate(cfg, eval_set=bad, track=False)
    with pytest.raises(FileNotFoundError, match="blocklist"):
        curate(config(data_dir, blocklist_file=tmp_path / "missing.txt"), track=False)


def test_curate_phash_is_the_ingest_phash():
    """One pHash: curate hashes an eval image as ingest hashed the shard row of the same picture."""
    import io

    from clipline.components.curate import phash
    from clipline.components.ingest import imaging

    sources = [
        pattern_image(1),
        pattern_image(2, size=20),  # small: enlarged to 32x32
        pattern_image(3).resize((150, 90)),
        pattern_image(4).convert("L"),
        pattern_image(5).convert("RGBA"),
    ]
    for im in sources:
        assert phash.phash64(im) == imaging.phash64(im)
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            (im if fmt == "PNG" else im.convert("RGB")).save(buf, format=fmt)
            data = buf.getvalue()
            # a row ingested without resizing stores the pHash of the decoded picture; curate's
            # pHash of the same bytes (an eval image) is the same value
            stored = imaging.process_image(data, imaging.ImageSettings(resize_mode="no"))
            assert stored.ok and phash.phash64(data) == stored.phash, (im.size, im.mode, fmt)
    assert phash.hamming(phash.to_signed64(2**64 - 1), 0) == 64


def test_removed_benchmark_switches_are_config_errors(tmp_path):
    """language_backend and near_dup_engine are gone from [curate]: a file that still sets them
    fails as any unknown key does, naming it."""
    from clipline.components.config import ConfigError, load_config

    for key, value in (("language_backend", "compiled"), ("near_dup_engine", "numpy")):
        f = tmp_path / f"{key}.toml"
        f.write_text(f'[curate]\n{key} = "{value}"\n')
        with pytest.raises(ConfigError, match=f"curate.{key}"):
            load_config(f)


def test_steps_are_timed_in_order_and_report_progress(data_dir):
    from clipline.components.curate.steps import KEEP_FIRST, PAIR_SEARCH, SETUP, STEPS

    write_shard(data_dir, "s0", [row(f"k{i}", f"a photo of object number {i} here", seed=i) for i in range(3)])
    seen = []
    res = curate(config(data_dir), progress=lambda *a: seen.append(a), track=False)
    assert seen == [(name, i, len(STEPS)) for i, name in enumerate(STEPS)] + [("done", len(STEPS), len(STEPS))]
    want = [SETUP, *STEPS[:3], PAIR_SEARCH, KEEP_FIRST, *STEPS[3:]]
    assert list(res.timings) == want and list(res.cpu_timings) == want
    assert json.loads((res.path / "manifest.json").read_text())["timings"] == res.timings
    seen.clear()
    again = curate(config(data_dir), progress=lambda *a: seen.append(a), track=False)
    assert not again.new and seen == [("done", len(STEPS), len(STEPS))]


# ------------------------------------------------------------------ snapshots
def _three_shards(seed=0):
    """Rows with duplicates inside and across shards (URL, image, near image)."""
    rnd = random.Random(seed)
    imgs = {i: pattern_image(i, size=128) for i in range(40)}
    shards = []
    for s in range(3):
        rows = []
        for j in range(14):
            i = rnd.randrange(40)
            kind = rnd.random()
            key = f"s{s}-{j:02d}"
            if kind < 0.2:
                img = jpeg(imgs[i], quality=45)  # near duplicate of another row's image
            else:
                img = jpeg(imgs[i])
            url = f"http://x.test/{i}" if kind > 0.85 else None
            rows.append(
                row(
                    key,
                    f"a photo of item {i} variant {j} shard {s}",
                    image=img,
                    url=url,
                    ow=rnd.choice([300, 600]),
                    oh=400,
                )
            )
        rows.append(row(f"s{s}-fail", status="failed_to_download"))
        shards.append(rows)
    return shards


def test_incremental_equals_all_at_once_and_ids_are_content_hashes(tmp_path):
    shards = _three_shards()
    inc_dir, all_dir, again_dir = (tmp_path / n for n in ("inc", "all", "again"))
    for d in (inc_dir, all_dir, again_dir):
        d.mkdir()
    # incremental: one snapshot per shard
    inc_results = []
    for i, rows in enumerate(shards):
        write_shard(inc_dir, f"shard-{i}", rows)
        inc_results.append(curate(config(inc_dir), track=False))
    # all at once
    for i, rows in enumerate(shards):
        write_shard(all_dir, f"shard-{i}", rows)
    res_all = curate(config(all_dir), track=False)
    last = inc_results[-1]
    assert [r.parent_id for r in inc_results] == [None, inc_results[0].snapshot_id, inc_results[1].snapshot_id]
    assert last.manifest["cumulative_counts"] == res_all.counts
    assert sum(res_all.counts["dropped"].values()) > 3  # duplicates were really there
    assert _kept_keys(config(inc_dir), last) == _kept_keys(config(all_dir), res_all)
    assert last.snapshot_id == res_all.snapshot_id
    # the incremental snapshot reuses the parent's files and adds its own
    assert last.manifest["files"][: len(inc_results[1].manifest["files"])] == inc_results[1].manifest["files"]
    # same inputs, same id; running again with nothing new returns the snapshot unchanged
    for i, rows in enumerate(shards):
        write_shard(again_dir, f"shard-{i}", rows)
    assert curate(config(again_dir), track=False).snapshot_id == res_all.snapshot_id
    again = curate(config(all_dir), track=False)
    assert again.new is False and again.snapshot_id == res_all.snapshot_id
    # a rules change rebuilds from scratch instead of stacking on rows chosen under other rules
    rebuilt = curate(config(all_dir, min_image_side=350), track=False)
    assert rebuilt.new and rebuilt.parent_id is None and "rules changed" in rebuilt.manifest["rebuild_reason"]
    assert 0 < rebuilt.counts["dropped"]["image_too_small"] < rebuilt.counts["input"]


def test_snapshot_contract(data_dir):
    rows = [row(f"k{i:03d}", f"a photo of object number {i} on a table", seed=i) for i in range(300)]
    for r in rows:
        r["source"] = "toy"
    table = pa.Table.from_pylist(rows)
    table = table.append_column("color", pa.array([f"c{i % 3}" for i in range(300)]))  # a carried column
    raw = data_dir / "raw"
    raw.mkdir()
    pq.write_table(table, raw / "s0.parquet")
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.record_raw_shard("s0", raw / "s0.parquet", table, {})
    cfg = config(data_dir, val_fraction=0.2)
    res = curate(cfg, track=False)
    m = json.loads((res.path / "manifest.json").read_text())
    for k in (
        "snapshot_id",
        "parent_id",
        "created_at",
        "config",
        "source_shards",
        "counts",
        "n_train",
        "n_val",
        "files",
    ):
        assert k in m
    assert m["source_shards"] == ["s0"] and m["counts"]["kept"] == 300 and m["parent_id"] is None
    assert all(not f.startswith("/") and (cfg.snapshots_dir / f).exists() for f in m["files"])
    snap = read_snapshot(cfg, m)
    for col in (
        "key",
        "url",
        "caption",
        "image",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
        "phash",
        "split",
        "color",
        "source",
    ):
        assert col in snap.column_names, col
    assert "status" not in snap.column_names
    n_val = snap.column("split").to_pylist().count("val")
    assert n_val == m["n_val"] and m["n_train"] + n_val == 300 and 30 < n_val < 90
    # shuffled, not in key order; images are the raw bytes
    assert snap.column("key").to_pylist() != sorted(snap.column("key").to_pylist())
    by_key = {r["key"]: r for r in rows}
    for rec in snap.slice(0, 5).to_pylist():
        assert rec["image"] == by_key[rec["key"]]["image"]
        Image.open(__import__("io").BytesIO(rec["image"])).verify()
    # the split is keyed on the sample key: the same keys are val in any other snapshot
    with Catalog(data_dir / "catalog.duckdb") as cat:
        assert cat.get_snapshot(res.snapshot_id)["n_rows"] == 300
        assert cat.latest_snapshot()["snapshot_id"] == res.snapshot_id
    val_keys = {k for k, s in zip(snap.column("key").to_pylist(), snap.column("split").to_pylist()) if s == "val"}
    write_shard(data_dir, "s1", [row("zz-new", "a photo of a new object here", seed=999)])
    res2 = curate(cfg, track=False)
    snap2 = read_snapshot(cfg, res2.manifest)
    val2 = {k for k, s in zip(snap2.column("key").to_pylist(), snap2.column("split").to_pylist()) if s == "val"}
    assert val_keys <= val2 and snap2.num_rows == 301
    # reading by id twice gives the same rows in the same order
    assert read_snapshot(cfg, res2.manifest).equals(snap2)


def test_row_groups_sized_for_sequential_reads(data_dir):
    # metadata-only rows (the stage never decodes images except for the contact sheet)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5000):
        r = row(f"k{i:05d}", f"a photo of object number {i} on a table", status="failed_to_download")
        r.update(
            status="success",
            error_kind=None,
            error_message=None,
            image=b"img%d" % i,
            width=64,
            height=64,
            original_width=400,
            original_height=400,
            sha256=f"{i:064x}",
            phash=int(rng.integers(-(2**63), 2**63 - 1)),
        )
        rows.append(r)
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir, row_group_rows=2048, language=None, contact_sheet_examples=0)
    res = curate(cfg, track=False)
    assert res.n_rows == 5000
    meta = pq.ParquetFile(cfg.snapshots_dir / res.manifest["files"][0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2048, 2048, 904]


def test_img2dataset_style_external_shard(data_dir):
    img = jpeg(pattern_image(3))
    ext = pa.table(
        {
            "key": ["000000000", "000000001"],
            "url": ["http://e.test/0", "http://e.test/1"],
            "caption": ["a photo from an external tool", "another photo from that tool"],
            "jpg": [img, jpeg(pattern_image(4))],
            "width": [96, 96],
            "height": [96, 96],
            "original_width": [400, 400],
            "original_height": [400, 400],
            "sha256": ["x0", "x1"],
            "status": ["success", "success"],
            "error_message": [None, None],
        }
    )
    p = data_dir / "ext.parquet"
    pq.write_table(ext, p)
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.register_external_shard(p)
    write_shard(data_dir, "s0", [row("ours", "a photo from our own ingest", seed=5)])
    cfg = config(data_dir)
    res = curate(cfg, track=False)
    snap = read_snapshot(cfg, res.manifest)
    imgs = dict(zip(snap.column("key").to_pylist(), snap.column("image").to_pylist()))
    assert set(imgs) == {"000000000", "000000001", "ours"} and imgs["000000000"] == img


def test_external_shards_without_status_or_image_columns_beside_our_own(data_dir):
    """An img2dataset shard (no `status`, images in `jpg`) read beside clipline's shards: its rows
    count as downloaded (its status is NULL under union_by_name), and the dropped rows sampled for
    the contact sheet, all from it, are read with that file's own columns."""
    ext = pa.table(
        {
            "key": ["000000000"],
            "url": ["http://e.test/0"],
            "caption": [None],  # dropped: missing_caption
            "jpg": [jpeg(pattern_image(3))],
            "width": [96],
            "height": [96],
            "original_width": [400],
            "original_height": [400],
        }
    )
    pq.write_table(ext, data_dir / "ext.parquet")
    with Catalog(data_dir / "catalog.duckdb") as cat:
        cat.register_external_shard(data_dir / "ext.parquet")
    write_shard(data_dir, "s0", [row("ours", "a photo from our own ingest", seed=5)])
    res = curate(config(data_dir), track=False)
    assert _dropped(res) == {"missing_caption": 1} and res.contact_sheet_path.is_file()


# ------------------------------------------------------------------ report + tracking
def test_report_table_contact_sheet_and_mlflow(data_dir, mlflow_uri):
    rows = [row(f"k{i}", f"a photo of object number {i} here", seed=i) for i in range(5)]
    rows += [
        row("short", "tiny", seed=20),
        row("fail", status="failed_to_download"),
        row("dup", "a duplicate of object one", image=rows[1]["image"]),
    ]
    write_shard(data_dir, "s0", rows)
    cfg = config(data_dir)
    res = curate(cfg)
    text = res.report_path.read_text()
    assert "| 1 | failed_download | 1 |" in text and "| dup_image | 1 |" in text.replace("| 17 ", "| ")
    dropped = pq.read_table(res.report_path.parent / "dropped.parquet").to_pylist()
    assert {(d["key"], d["shard_id"], d["reason"]) for d in dropped} == {
        ("short", "s0", "too_few_words"),
        ("fail", "s0", "failed_download"),
        ("k1", "s0", "dup_image"),
    }  # same image, same size: the smaller key ("dup") is kept
    sheet = Image.open(res.contact_sheet_path)
    assert sheet.format == "PNG" and sheet.height >= 3 * 128  # one row per rule with drops
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.tags["stage"] == "curate" and run.data.tags["snapshot_id"] == res.snapshot_id
    assert run.data.metrics["dropped/too_few_words"] == 1 and run.data.metrics["rows_kept"] == 5
    exp = mlflow.get_experiment(run.info.experiment_id)
    assert exp.name == cfg.tracking.experiment
    # curate as the first command of a data dir keeps its artifacts there, not in ./mlruns
    assert exp.artifact_location == (cfg.data_dir / "mlartifacts").resolve().as_uri()
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "curate")}
    assert {"curate/report.md", "curate/contact_sheet.png", "curate/manifest.json"} <= arts


CAPTIONS_IN_SCRIPTS = [
    "São Tomé & Príncipe flag emoji",  # Latin with accents
    "Łódź, Zürich, Ørsted, façade, œuvre",
    "Ελληνική σημαία στον άνεμο",  # Greek
    "Красный круг на белом фоне",  # Cyrillic
    "דגל ישראל",  # Hebrew
    "علم المغرب",  # Arabic
]


def test_contact_sheet_draws_letters_of_several_scripts(tmp_path):
    """Every letter of captions in Latin (accented), Greek, Cyrillic, Hebrew and Arabic has a glyph
    in the sheet's font: none is drawn as the missing-glyph box."""
    from clipline.components.curate.report import _font, contact_sheet

    from PIL import ImageDraw

    font = _font()

    def glyph(ch: str) -> bytes:
        im = Image.new("L", (32, 32))
        ImageDraw.Draw(im).text((4, 4), ch, font=font, fill=255)
        return im.tobytes()

    missing = glyph("\U0010fffd")  # a private-use code point no font draws: the missing-glyph box
    boxes = sorted({ch for cap in CAPTIONS_IN_SCRIPTS for ch in cap if ch.isalpha() and glyph(ch) == missing})
    assert boxes == []
    examples = {
        "too_few_words": [(None, cap) for cap in CAPTIONS_IN_SCRIPTS[:3]],
        "language": [(None, cap) for cap in CAPTIONS_IN_SCRIPTS[3:]],
    }
    sheet = Image.open(contact_sheet(examples, tmp_path / "sheet.png", per_rule=3))
    assert sheet.format == "PNG" and sheet.height >= 2 * 128


@pytest.mark.slow
def test_language_id_of_a_list_of_texts_matches_langid():
    rnd = random.Random(1)
    words = ["red", "the", "photo", "chat", "noir", "Kreis", "über", "casa", "日本", "car", "de", "la", "sunset"]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 9))) for _ in range(300)]
    texts += ["", None, "a photo of a cat", "x" * 3000]
    a_lang, a_p = classify_langid(texts)
    best, b_p = classify(texts)
    assert a_lang == [classes()[b] if b >= 0 else None for b in best.tolist()]
    assert np.allclose(a_p, b_p, atol=1e-9)
