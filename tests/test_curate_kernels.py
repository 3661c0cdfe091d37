"""The compiled fast paths of the curate stage give the answers of their Python references."""

from __future__ import annotations

import dataclasses
import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from clipline.components.curate import arrays, dedup, hashing, language, near
from clipline.components.curate.normalize import MAYBE_DIRTY, normalize_captions


def _random_dedup_input(rng: np.random.Generator, n: int, n_parent: int) -> dedup.DedupInput:
    def groups(k: int) -> np.ndarray:  # few distinct values: many shared groups
        return rng.integers(0, max(k, 1), n).astype(np.int64)

    ph = rng.integers(-1, max(n // 3, 1), n).astype(np.int64)  # -1: no pHash
    pairs = rng.integers(0, max(n // 3, 1), (n // 4, 2)).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return dedup.DedupInput(
        is_parent=np.arange(n) < n_parent,
        url_g=groups(n // 2),
        key_g=groups(n),
        sha_g=groups(n // 2),
        capimg_g=groups(n // 2),
        ph_g=ph,
        ph_pairs=pairs,
    )


@pytest.mark.parametrize("same_image,near_image", [(True, True), (False, True), (True, False)])
def test_compiled_keep_first_equals_the_python_rule(same_image, near_image):
    rng = np.random.default_rng(7)
    opts = dedup.DedupOptions(same_image=same_image, near_image=near_image)
    for n, n_parent in ((1, 0), (50, 10), (3000, 400)):
        inp = _random_dedup_input(rng, n, n_parent)
        want = dedup.keep_first(inp, opts)  # reason names, None = kept
        codes = dedup.keep_first_codes(inp, opts)
        got = np.array([None if c == 0 else dedup.REASONS[c - 1] for c in codes], dtype=object)
        assert got.tolist() == want.tolist()
        assert (dedup.keep_first_codes(inp, opts, compiled=False) == codes).all()
        assert not codes[:n_parent].any()  # parent rows are always kept
        # large pHash ids (renumbered first), and pairs naming ids no row has: the same codes
        big = 10**15
        shifted = dataclasses.replace(
            inp,
            ph_g=np.where(inp.ph_g >= 0, inp.ph_g * 7 + big, -1),
            ph_pairs=np.concatenate([inp.ph_pairs * 7 + big, [[big - 7, big + 7 * n * 9]]]),
        )
        assert (dedup.keep_first_codes(shifted, opts) == codes).all()
        extra = dataclasses.replace(inp, ph_pairs=np.concatenate([inp.ph_pairs, [[0, n + 5], [n + 6, n + 7]]]))
        assert (dedup.keep_first_codes(extra, opts) == codes).all()
    assert {"dup_url", "dup_key", "near_dup_image" if near_image else "dup_image"} <= set(got.tolist())


def test_compiled_language_id_matches_langid_on_arrow_buffers():
    rnd = random.Random(3)
    words = [
        "red",
        "the",
        "photo",
        "chat",
        "noir",
        "Kreis",
        "über",
        "casa",
        "日本",
        "car",
        "de",
        "la",
        "sunset",
        "ночь",
        "город",
        "a",
        "of",
    ]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 9))) for _ in range(500)]
    texts += ["", None, "a photo of a cat", "x" * 3000, "un chat noir dort sur la table de la cuisine"]
    want_lang, want_p = language.classify_langid(texts)
    classes = language.classes()
    arr = pa.array(["pad"] * 7 + texts, pa.string()).slice(7)  # a non-zero offset into the buffers
    best, p = language.classify(arr, threads=2)
    assert [classes[b] if b >= 0 else None for b in best.tolist()] == want_lang
    assert np.allclose(p, want_p, atol=1e-9)
    best_large, p_large = language.classify(arr.cast(pa.large_string()), threads=2)  # 64-bit offsets
    assert (best_large == best).all() and (p_large == p).all()
    best_list, p_list = language.classify(texts, threads=1)  # a plain list of str
    assert (best_list == best).all() and (p_list == p).all()
    mask = language.other_language_mask(pa.chunked_array([arr.slice(0, 100), arr.slice(100)]), "en", 0.9)
    assert mask.tolist() == language.other_language_mask_langid(texts, "en", 0.9).tolist()
    assert language.other_language_mask(texts, "en", 0.9).tolist() == mask.tolist()
    assert language.other_language_mask(pa.array([], pa.string()), "en", 0.9).tolist() == []
    assert mask[-1] and not mask[-3]  # the French caption is flagged, the English one is not


def test_float32_language_verdicts_equal_the_float64_ones_even_at_the_threshold():
    """other_language_mask scores in float32 and falls back to float64 where rounding could
    change the verdict: thresholds set exactly at texts' own probabilities must not flip them."""
    rnd = random.Random(9)
    words = [
        "the",
        "photo",
        "chat",
        "noir",
        "casa",
        "de",
        "la",
        "und",
        "der",
        "sunset",
        "el",
        "und",
        "le",
        "gato",
        "Hund",
        "a",
        "of",
        "in",
        "nuit",
    ]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 6))) for _ in range(3000)] + ["", None]
    arr = pa.array(texts, pa.string())
    classes = language.classes()
    best, p = language.classify(arr, threads=2)  # float64 reference
    probs_other = sorted({float(x) for b, x in zip(best, p) if b >= 0 and classes[b] != "en"})
    assert len(probs_other) > 20
    for conf in [0.0, 0.5, 0.9, 0.999, 1.0] + probs_other[:: max(1, len(probs_other) // 40)]:
        want = (best >= 0) & (best != classes.index("en")) & (p >= conf)
        got = language.other_language_mask(arr, "en", conf, threads=2)
        assert (got == want).all(), conf
    assert language.other_language_mask(arr, "xx", 0.5).sum() == ((best >= 0) & (p >= 0.5)).sum()


def test_streamed_content_digest_equals_the_whole_column_digest():
    values = pa.array(["b", None, "ab", "c", "", "ü"] * 50, pa.string())
    con = duckdb.connect(config={"preserve_insertion_order": True})
    con.register("v", pa.table({"s": values}))
    con.execute("CREATE TABLE t AS SELECT * FROM v")
    for batch in (7, 300, 65_536):
        assert hashing.digest_table_column(con, "t", "s", batch) == (300, hashing.digest_strings(values))
    con.execute("CREATE TABLE e AS SELECT * FROM t LIMIT 0")
    assert hashing.digest_table_column(con, "e", "s") == (0, hashing.digest_strings(pa.array([], pa.string())))
    a, b = duckdb.connect(), duckdb.connect()
    a.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('ab'), ('c')) x(s)")
    b.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('a'), ('bc')) x(s)")
    assert hashing.digest_table_column(a, "t", "s")[1] != hashing.digest_table_column(b, "t", "s")[1]


def test_sql_split_and_shuffle_agree_with_the_numpy_hashes():
    keys = pa.array([f"key-{i}" for i in range(2000)] + ["", "ü"], pa.string())
    con = duckdb.connect()
    con.create_function(
        "key_hash", hashing.key_hash_udf, [duckdb.sqltype("VARCHAR")], duckdb.sqltype("UBIGINT"), type="arrow"
    )
    con.create_function(
        "shuffle_key", hashing.shuffle_udf("snap"), [duckdb.sqltype("UBIGINT")], duckdb.sqltype("BIGINT"), type="arrow"
    )
    con.register("k", pa.table({"key": keys}))
    got = con.execute(
        f"SELECT {hashing.split_sql('key_hash(key)', 0.1)} AS split, shuffle_key(key_hash(key)) AS sh FROM k"
    ).fetchnumpy()
    assert got["split"].tolist() == hashing.split_of(keys, 0.1).tolist()
    assert (np.asarray(got["sh"]) == hashing.shuffle_order(keys, "snap")).all()
    assert 100 < (got["split"] == "val").sum() < 300


def test_sql_guard_selects_every_caption_the_normaliser_would_change():
    caps = [
        "plain ascii caption",
        "caf\u00c3\u00a9",
        "a  b",
        " lead",
        "trail ",
        "x &amp; y",
        "tab\there",
        "e\u0301",
        "ok",
        None,
        "zero\u200bwidth",
    ]
    con = duckdb.connect()
    con.register("c", pa.table({"caption": pa.array(caps, pa.string())}))
    dirty = [r[0] for r in con.execute(f"SELECT regexp_matches(caption, '{MAYBE_DIRTY}') FROM c").fetchall()]
    normalised = normalize_captions(pa.array(caps, pa.string())).to_pylist()
    for cap, d, norm in zip(caps, dirty, normalised):
        if cap is not None and not d:
            assert norm == cap  # what the guard skips, the normaliser leaves unchanged
    assert dirty[:3] == [False, True, True]


def test_two_pass_radix_argsort_is_a_stable_sort():
    rng = np.random.default_rng(5)
    for high in (1 << 8, 1 << 21, 1 << 32):
        kv = rng.integers(0, high, 50_000, dtype=np.uint64).astype(np.uint32)
        assert (near._radix_argsort(kv) == np.argsort(kv, kind="stable")).all()


def test_band_plan_widens_keys_as_rows_grow_and_still_finds_every_pair():
    assert near.band_plan(6, 1_000_000).n_bands == 8
    assert near.band_plan(6, 4_000_000).n_bands == 9  # 21-bit keys: fewer random candidates
    rng = np.random.default_rng(2)
    base = rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)
    flips = rng.integers(0, 64, (300, 6))
    close = base.copy()
    for i, bits in enumerate(flips):
        for b in bits[: i % 7]:
            close[i] ^= np.int64(1) << np.int64(b) if b < 63 else np.int64(-(2**63))
    hashes = np.concatenate([base, close])
    x = hashes.view(np.uint64)
    brute = {(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if int(np.bitwise_count(x[i] ^ x[j])) <= 6}
    got = set()
    for combo in near.band_plan(6, 4_000_000).combos:  # the wide-key plan, on a small input
        for a, b in near._bucket_pairs(hashes, combo, 6).tolist():
            got.add((min(a, b), max(a, b)))
    assert got == brute and len(brute) >= 250
    assert {tuple(p) for p in near.near_pairs_reference(hashes, 6).tolist()} == brute


def test_first_ids_name_each_value_by_its_first_position():
    rng = np.random.default_rng(9)
    for n in (0, 1, 9, 4000):
        values = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
        values[rng.integers(0, max(n, 1), n // 2)] = values[rng.integers(0, max(n, 1), n // 2)] if n else values[:0]
        valid = rng.random(n) > 0.1
        want = [-1] * n
        first: dict = {}
        for i, (v, ok) in enumerate(zip(values.tolist(), valid.tolist())):
            if ok:
                want[i] = first.setdefault(v, i)
        assert dedup.first_ids(values, valid).tolist() == want
        assert dedup.first_ids_reference(values, valid).tolist() == want


def test_repeated_marks_exactly_the_values_that_occur_twice():
    rng = np.random.default_rng(5)
    for n in (0, 1, 7, 5000):
        for values in (
            rng.integers(-50, 50, n),
            rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
            (np.arange(n, dtype=np.int64) % 97) << 32,
        ):  # low bits all zero
            values[: n // 10] = values[n // 10 : 2 * (n // 10)]  # plant repeats
            valid = rng.random(n) > 0.2
            idx = np.flatnonzero(valid)
            want = np.zeros(n, bool)
            if len(idx):
                _, inv, counts = np.unique(values[idx], return_inverse=True, return_counts=True)
                want[idx] = counts[inv.reshape(-1)] > 1
            assert (dedup.repeated(values, valid) == want).all()
            assert (dedup.repeated_reference(values, valid) == want).all()
            assert (dedup.repeated(values.view(np.uint64)) == dedup.repeated(values)).all()
            also = rng.choice(values, min(n, 5)) if n else np.zeros(0, np.int64)  # and members named as such
            both = np.concatenate([also, also + 1])
            assert (dedup.repeated(values, valid, also=both) == (want | (valid & np.isin(values, both)))).all()
            assert (
                dedup.repeated_reference(values, valid, also=both) == dedup.repeated(values, valid, also=both)
            ).all()
            assert (arrays.unique_sorted(values) == np.unique(values)).all()


def _partition(ids) -> list[int]:
    first: dict = {}
    return [first.setdefault(x, i) for i, x in enumerate(ids)]


def test_hash_grouping_is_exact_even_when_hashes_collide():
    rng = np.random.default_rng(11)
    con = duckdb.connect()
    for n in (1, 2, 40, 400):
        values = [None if rng.random() < 0.15 else f"http://x.test/{rng.integers(0, n // 3 + 1)}" for _ in range(n)]
        col = pa.chunked_array([pa.array(values[: n // 2], pa.string()), pa.array(values[n // 2 :], pa.string())])
        want = [None if v is None else values.index(v) for v in values]  # nulls are alone
        want = [i if w is None else w for i, w in enumerate(want)]
        hashes = pa.array(
            con.execute("SELECT hash(v) FROM unnest(?::VARCHAR[]) AS t(v)", [values]).fetchnumpy()["hash(v)"],
            pa.uint64(),
        )
        assert _partition(dedup.exact_group_ids(col)) == want
        got = dedup.group_ids(col, hashes)
        assert _partition(got) == want and got.min() >= 0 and got.max() < 2 * n
        # every value given the same hash (a collision everywhere), or one of two hashes: still exact
        assert _partition(dedup.group_ids(col, pa.array([7] * n, pa.uint64()))) == want
        assert _partition(dedup.group_ids(col, pa.array(rng.integers(0, 2, n).astype(np.uint64)))) == want
        if n > 1:  # an array that starts inside its buffers (a slice)
            sliced = col.combine_chunks().slice(1)
            want1 = [None if v is None else values[1:].index(v) for v in values[1:]]
            assert _partition(dedup.group_ids(sliced, pa.array([7] * (n - 1), pa.uint64()))) == [
                i if w is None else w for i, w in enumerate(want1)
            ]


def test_candidates_are_the_rows_whose_value_repeats_in_any_column():
    rng = np.random.default_rng(4)
    n = 3000
    cols = {
        "a": pa.array(rng.integers(0, 2000, n).astype(np.uint64), pa.uint64()),
        "b": pa.array([None if x < 0 else int(x) for x in rng.integers(-500, 3000, n)], pa.int64()),
        "c": pa.array([None] * n, pa.int64()),
    }
    tab = pa.table(cols).slice(7)  # a non-zero offset into the buffers
    also = np.array([5, 17, 2999], np.int64)
    want = np.zeros(tab.num_rows, bool)
    for name in cols:
        v = tab.column(name).combine_chunks()
        valid = np.asarray(v.is_valid().to_numpy(zero_copy_only=False))
        values = np.asarray(v.fill_null(0).to_numpy(), np.int64)
        want |= dedup.repeated_reference(values, valid, also=also if name == "b" else None)
    got = dedup.candidates(tab, list(cols), also={"b": also}, threads=2)
    assert (got == want).all() and 0 < got.sum() < tab.num_rows
