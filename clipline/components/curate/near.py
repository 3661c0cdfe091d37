"""Near-duplicate search on 64-bit perceptual hashes: every pair within Hamming distance ``d``.

Without an all-pairs join (generalised pigeonhole, a form of LSH banding with a recall
guarantee): cut the 64 bits into ``m = d + t`` contiguous bands. Two hashes that differ in at most
``d`` bits leave at least ``t`` bands untouched, so they agree exactly on at least one of the
``C(m, t)`` combinations of ``t`` bands. Each combination is a bit mask; candidates are pairs with
equal ``phash & mask`` (an equi-join), and ``bit_count(xor(a, b)) <= d`` checks them exactly.
``t = 1`` is the classic "d+1 bands" scheme; larger ``t`` makes each key longer (fewer random
collisions) at the cost of more combinations; :func:`band_plan` picks ``m`` from the row count to
minimise the expected work. No pair within ``d`` is ever missed.

Public operations (contracts in their docstrings):

- :func:`near_pairs`: the pairs within ``d`` among a DuckDB table's distinct pHashes. The stage
  uses the default engine, a sort-merge join on the packed band bits in NumPy
  (:func:`near_pairs_numpy`); ``engine="sql"`` runs the same band equi-joins in DuckDB (several
  times slower; kept to compare with, as in ``benchmarks/curate_scaling.py``). Both are tested
  against :func:`near_pairs_reference`, the all-pairs comparison.
- :func:`near_any`: the rows of one table within ``d`` of any pHash of another (decontamination
  against the eval set), as band equi-joins in DuckDB.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from clipline.components.curate.arrays import unique_sorted
from clipline.components.curate.phash import to_signed64


@dataclass(frozen=True)
class BandPlan:
    max_distance: int
    n_bands: int
    masks: list[int]  # one signed-int64 bit mask per t-combination of bands
    combos: list[tuple[tuple[int, int], ...]] = ()  # the same combinations as (start, width) bands

    @property
    def key_bits(self) -> int:
        return min(bin(m & ((1 << 64) - 1)).count("1") for m in self.masks)


def _bands(m: int) -> list[int]:
    """Bit masks of m contiguous bands covering 64 bits (sizes differ by at most one)."""
    out, start = [], 0
    for i in range(m):
        width = 64 // m + (1 if i < 64 % m else 0)
        out.append(((1 << width) - 1) << start)
        start += width
    return out


def band_plan(max_distance: int, n_rows: int, n_query: int | None = None) -> BandPlan:
    """The band scheme for finding every pair within ``max_distance`` bits among ``n_rows``
    hashes (or between ``n_query`` hashes and ``n_rows`` hashes)."""
    d = int(max_distance)
    if d < 0 or d > 32:
        raise ValueError(f"phash_max_distance must be between 0 and 32 (or -1 to switch off), got {d}")
    n = max(int(n_rows), 1)
    q = n if n_query is None else max(int(n_query), 1)
    best: tuple[float, int] | None = None
    for m in range(d + 1, min(64, d + 9) + 1):
        t = m - d
        combos = math.comb(m, t)
        if combos > 4096:
            continue
        bits = (64 // m) * t
        # keys of <= 16 bits sort in one radix pass, <= 32 bits in two (_radix_argsort), wider by merging
        sort_cost = 3.0 if bits + t <= 16 else 8.0 if bits + t <= 32 else 20.0
        cost = combos * (sort_cost * (n + q) + n * q / 2.0**bits)  # a sort per combination + candidates
        if best is None or cost < best[0]:
            best = (cost, m)
    assert best is not None
    m = best[1]
    bands = _bands(m)
    masks = [to_signed64(sum(c)) for c in itertools.combinations(bands, m - d)]
    spans = [((b & -b).bit_length() - 1, bin(b).count("1")) for b in bands]
    return BandPlan(d, m, masks, list(itertools.combinations(spans, m - d)))


# ---------------------------------------------------------------- the pairs among one table's hashes


def near_pairs(con: duckdb.DuckDBPyConnection, table: str, max_distance: int, engine: str = "numpy") -> np.ndarray:
    """Every unordered pair (gid_a < gid_b) of rows of ``table`` (columns ``gid BIGINT, phash
    BIGINT``, one row per distinct phash) within ``max_distance`` bits, as an (n, 2) int64 array
    sorted by (a, b). Exactly the pairs within the distance, whichever ``engine`` (``numpy``, the
    default, or ``sql``) finds them."""
    if engine == "numpy":
        t = con.execute(f"SELECT gid, phash FROM {table} ORDER BY gid").fetchnumpy()
        gid = np.asarray(t["gid"], dtype=np.int64)
        idx = near_pairs_numpy(np.asarray(t["phash"], dtype=np.int64), max_distance)
        pairs = np.stack([gid[idx[:, 0]], gid[idx[:, 1]]], axis=1) if len(idx) else idx
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs
    if engine == "sql":
        return _near_pairs_sql(con, table, max_distance)
    raise ValueError(f"unknown near-duplicate engine {engine!r}: use 'numpy' or 'sql'")


def near_pairs_reference(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every unordered index pair (i < j) of ``hashes`` within ``max_distance`` bits, sorted, by
    comparing all pairs: the plain form of :func:`near_pairs_numpy` (quadratic; for tests)."""
    u = np.asarray(hashes, np.int64).view(np.uint64)
    dist = np.bitwise_count(u[:, None] ^ u[None, :])
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return np.stack([i, j], axis=1).astype(np.int64)


def near_pairs_numpy(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """:func:`near_pairs_reference`'s answer (index pairs i < j, sorted) found with the band plan:
    per combination of bands, a sort on the packed band bits and a merge of equal keys."""
    hashes = np.ascontiguousarray(hashes, dtype=np.int64)
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    codes = []
    for combo in band_plan(max_distance, n).combos:
        p = _bucket_pairs(hashes, combo, max_distance)
        if len(p):
            lo, hi = np.minimum(p[:, 0], p[:, 1]), np.maximum(p[:, 0], p[:, 1])
            codes.append(unique_sorted(lo * n + hi))
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    u = unique_sorted(np.concatenate(codes))
    return np.stack([u // n, u % n], axis=1)


def _popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b).view(np.uint64))


def _combo_key(hashes: np.ndarray, combo: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The bits of the combination's bands packed into the narrowest unsigned integer."""
    u = hashes.view(np.uint64)
    key = np.zeros(len(u), dtype=np.uint64)
    width = 0
    for start, w in combo:
        key = (key << np.uint64(w)) | ((u >> np.uint64(start)) & np.uint64((1 << w) - 1))
        width += w
    for dt, bits in ((np.uint16, 16), (np.uint32, 32)):
        if width <= bits:
            return key.astype(dt)
    return key


def _radix_argsort(kv: np.ndarray) -> np.ndarray:
    """A stable argsort; keys of up to 32 bits as two 16-bit radix passes (numpy's stable sort is a
    radix sort for 16-bit integers only, a merge sort for wider ones)."""
    if kv.dtype == np.uint32:
        o = np.argsort((kv & np.uint32(0xFFFF)).astype(np.uint16), kind="stable")
        return o[np.argsort((kv[o] >> np.uint32(16)).astype(np.uint16), kind="stable")]
    return np.argsort(kv, kind="stable")


def _bucket_pairs(hashes: np.ndarray, combo: tuple[tuple[int, int], ...], max_distance: int) -> np.ndarray:
    """Index pairs (i, j), i != j, that agree on the combination's bands and are within
    max_distance: sort by the packed band bits (radix sort for <= 16 bits), then compare each row
    with the rows after it in its run (the sort-merge form of the equi-join ``a.kv = b.kv``)."""
    kv = _combo_key(hashes, combo)
    order = _radix_argsort(kv)
    s = kv[order]
    h = hashes[order]
    n = len(s)
    out = []
    cand = np.flatnonzero(s[:-1] == s[1:])
    k = 1
    while len(cand):
        close = _popcount_xor(h[cand], h[cand + k]) <= max_distance
        if close.any():
            out.append(np.stack([order[cand[close]], order[cand[close] + k]], axis=1))
        cand = cand[cand + k + 1 < n]
        cand = cand[s[cand] == s[cand + k + 1]]
        k += 1
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


# ---------------------------------------------------------------- the same joins in DuckDB


def _combo_batches(masks: list[int], n_rows: int, budget_rows: int = 4_000_000) -> list[list[int]]:
    """The masks in batches whose keyed copies of the table stay within ``budget_rows`` rows."""
    per = max(1, budget_rows // max(n_rows, 1))
    return [masks[i : i + per] for i in range(0, len(masks), per)]


def _near_pairs_sql(con: duckdb.DuckDBPyConnection, table: str, max_distance: int) -> np.ndarray:
    """:func:`near_pairs` as band equi-joins and the ``bit_count(xor(a, b))`` check in DuckDB."""
    n = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    plan = band_plan(max_distance, n)
    con.execute("CREATE OR REPLACE TEMP TABLE _near_pairs (a BIGINT, b BIGINT)")
    for batch in _combo_batches(plan.masks, n):
        con.register("_masks", pa.table({"cid": np.arange(len(batch)), "mask": pa.array(batch, pa.int64())}))
        con.execute(f"""
            INSERT INTO _near_pairs
            WITH k AS (SELECT m.cid, t.gid, t.phash, t.phash & m.mask AS kv FROM {table} t, _masks m)
            SELECT x.gid, y.gid FROM k x JOIN k y ON x.cid = y.cid AND x.kv = y.kv AND x.gid < y.gid
            WHERE bit_count(xor(x.phash, y.phash)) <= {int(max_distance)}""")
        con.unregister("_masks")
    pairs = con.execute("SELECT DISTINCT a, b FROM _near_pairs ORDER BY a, b").fetchnumpy()
    con.execute("DROP TABLE _near_pairs")
    return (
        np.stack([pairs["a"], pairs["b"]], axis=1).astype(np.int64) if len(pairs["a"]) else np.zeros((0, 2), np.int64)
    )


def near_any(con: duckdb.DuckDBPyConnection, table: str, reference: str, max_distance: int) -> np.ndarray:
    """The ``gid`` of every row of ``table`` (gid, phash) within ``max_distance`` bits of any
    ``phash`` in ``reference`` (a table with a ``phash`` column; nulls ignored), sorted and
    unique."""
    n = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    q = con.execute(f"SELECT count(*) FROM {reference}").fetchall()[0][0]
    if n == 0 or q == 0:
        return np.zeros(0, dtype=np.int64)
    plan = band_plan(max_distance, n, q)
    found: list[np.ndarray] = []
    for batch in _combo_batches(plan.masks, n + q):
        con.register("_masks", pa.table({"cid": np.arange(len(batch)), "mask": pa.array(batch, pa.int64())}))
        got = con.execute(f"""
            WITH k AS (SELECT m.cid, t.gid, t.phash, t.phash & m.mask AS kv FROM {table} t, _masks m),
                 r AS (SELECT m.cid, e.phash, e.phash & m.mask AS kv FROM {reference} e, _masks m
                       WHERE e.phash IS NOT NULL)
            SELECT DISTINCT k.gid FROM k JOIN r ON k.cid = r.cid AND k.kv = r.kv
            WHERE bit_count(xor(k.phash, r.phash)) <= {int(max_distance)}""").fetchnumpy()["gid"]
        con.unregister("_masks")
        found.append(np.asarray(got, dtype=np.int64))
    return unique_sorted(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
