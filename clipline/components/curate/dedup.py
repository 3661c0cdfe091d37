"""Near-duplicate search on 64-bit perceptual hashes, and the keep-first deduplication rule.

Finding pairs within Hamming distance ``d`` without an all-pairs join (generalised pigeonhole,
a form of LSH banding with a recall guarantee): cut the 64 bits into ``m = d + t`` contiguous
bands. Two hashes that differ in at most ``d`` bits leave at least ``t`` bands untouched, so they
agree exactly on at least one of the ``C(m, t)`` combinations of ``t`` bands. Each combination is
a bit mask; candidates are pairs with equal ``phash & mask`` (an equi-join in DuckDB), and
``bit_count(xor(a, b)) <= d`` checks them exactly. The join runs either in DuckDB (``sql``) or,
by default, as a sort-merge on the masked keys in numpy (``numpy``, same pairs, several times faster). ``t = 1`` is the classic "d+1 bands" scheme;
larger ``t`` makes each key longer (fewer random collisions) at the cost of more combinations;
:func:`band_plan` picks ``m`` from the row count to minimise the expected work. No pair within
``d`` is ever missed.

Keep rule (deterministic, documented): rows are visited in a fixed order (parent snapshot rows
first, then shards in catalog order, then the largest original image, then the smallest key). A
row is dropped when it duplicates a row already KEPT (same URL, same key, same image sha256, same caption and
image, phash within d, or similar caption); the reason is the first of those relations that
holds. Because a row's fate depends only on rows kept before it, building a snapshot in two
steps (parent, then new shards against the parent's rows) keeps exactly the rows that building it
at once would.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from clipline.components.curate.phash import to_signed64

try:  # the compiled loops; without numba the numpy paths are used
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency
    njit = None


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d integer array, as ``np.unique(x)``, by one sort: NumPy
    2.4's ``np.unique`` without ``return_inverse`` takes a hash-table path that is 10-30x slower
    than sorting here (0.2-0.3 s for 280k int64 against 8 ms)."""
    s = np.sort(np.asarray(x).reshape(-1))
    if len(s) < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


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
        cost = combos * (sort_cost * (n + q) + n * q / 2.0 ** bits)  # a sort per combination + candidates
        if best is None or cost < best[0]:
            best = (cost, m)
    assert best is not None
    m = best[1]
    bands = _bands(m)
    masks = [to_signed64(sum(c)) for c in itertools.combinations(bands, m - d)]
    spans = [((b & -b).bit_length() - 1, bin(b).count("1")) for b in bands]
    return BandPlan(d, m, masks, list(itertools.combinations(spans, m - d)))


def _combo_batches(masks: list[int], n_rows: int, budget_rows: int = 4_000_000) -> list[list[int]]:
    per = max(1, budget_rows // max(n_rows, 1))
    return [masks[i:i + per] for i in range(0, len(masks), per)]


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


def near_pairs_numpy(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every unordered index pair (i < j) of ``hashes`` (int64) within ``max_distance`` bits,
    sorted, found with the band plan (no all-pairs comparison)."""
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


def near_pairs(con: duckdb.DuckDBPyConnection, table: str, max_distance: int, engine: str = "numpy") -> np.ndarray:
    """Every unordered pair (gid_a < gid_b) of rows of ``table`` (columns ``gid BIGINT, phash
    BIGINT``, one row per distinct phash) within ``max_distance`` bits, as an (n, 2) int64 array.

    ``engine="sql"`` runs the band equi-joins and the ``bit_count(xor(a, b))`` check in DuckDB;
    ``engine="numpy"`` (default, several times faster) does the same join as a sort-merge in numpy.
    Both return exactly the pairs within the distance (tested against brute force)."""
    if engine == "numpy":
        t = con.execute(f"SELECT gid, phash FROM {table} ORDER BY gid").fetchnumpy()
        gid = np.asarray(t["gid"], dtype=np.int64)
        idx = near_pairs_numpy(np.asarray(t["phash"], dtype=np.int64), max_distance)
        pairs = np.stack([gid[idx[:, 0]], gid[idx[:, 1]]], axis=1) if len(idx) else idx
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs
    if engine != "sql":
        raise ValueError(f"unknown near-duplicate engine {engine!r}: use 'numpy' or 'sql'")
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
    return np.stack([pairs["a"], pairs["b"]], axis=1).astype(np.int64) if len(pairs["a"]) else np.zeros((0, 2), np.int64)


def near_any(con: duckdb.DuckDBPyConnection, table: str, reference: str, max_distance: int) -> np.ndarray:
    """The ``gid`` of every row of ``table`` (gid, phash) within ``max_distance`` bits of any
    ``phash`` in ``reference`` (a table with a ``phash`` column), sorted."""
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


@dataclass
class DedupInput:
    """One entry per row, in visiting order (see the module docstring). Group ids identify rows
    sharing a URL / sha256 / (caption, sha256) / phash value; a row alone in its group may carry
    any id not shared with another row."""

    is_parent: np.ndarray       # bool: rows of the parent snapshot (always kept)
    url_g: np.ndarray           # int64
    key_g: np.ndarray
    sha_g: np.ndarray
    capimg_g: np.ndarray
    ph_g: np.ndarray            # id of the row's distinct phash value (-1: no phash)
    ph_pairs: np.ndarray        # (k, 2) near pairs of ph_g values (unordered)
    captions: list[str] | None = None  # for the optional caption MinHash rule


@dataclass(frozen=True)
class DedupOptions:
    same_image: bool = True            # dup_image on; else only dup_caption_image
    near_image: bool = True
    near_caption: bool = False
    minhash_threshold: float = 0.8
    minhash_perm: int = 64
    shingle_chars: int = 5


def _involved(g: np.ndarray) -> np.ndarray:
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    return counts[inv] > 1


def _shingles(text: str, k: int) -> list[bytes]:
    s = text.lower()
    if len(s) <= k:
        return [s.encode("utf-8")]
    return list({s[i:i + k].encode("utf-8") for i in range(len(s) - k + 1)})


REASONS = ["dup_url", "dup_key", "dup_image", "dup_caption_image", "near_dup_image", "near_dup_caption"]
"""Drop reasons of the keep-first rule; :func:`keep_first_codes` returns ``index + 1`` (0 = kept)."""


def _dense(g: np.ndarray) -> np.ndarray:
    """Group ids renumbered 0..k-1 (same partition); ids already within [0, 4n) are kept as
    they are (the visit only needs small non-negative ids)."""
    g = np.asarray(g, np.int64).reshape(-1)
    if len(g) == 0 or (g.min() >= 0 and g.max() < 4 * len(g) + 16):
        return g
    return np.unique(g, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _keep_first_loop(is_parent, url, key, sha, ci, ph, indptr, nbr, same_image, near_image, out):  # pragma: no cover - compiled
    """The keep-first visit over dense group ids (ph: -1 = no phash; nbr[indptr[p]:indptr[p+1]]:
    phash ids within the distance of p). Writes reason codes (0 = kept) into ``out``."""
    kept_url = np.zeros(url.max() + 1 if len(url) else 1, np.bool_)
    kept_key = np.zeros(key.max() + 1 if len(key) else 1, np.bool_)
    kept_sha = np.zeros(sha.max() + 1 if len(sha) else 1, np.bool_)
    kept_ci = np.zeros(ci.max() + 1 if len(ci) else 1, np.bool_)
    kept_ph = np.zeros(len(indptr), np.bool_)
    for i in range(len(is_parent)):
        if not is_parent[i]:
            r = 0
            if kept_url[url[i]]:
                r = 1
            elif kept_key[key[i]]:
                r = 2
            elif same_image and kept_sha[sha[i]]:
                r = 3
            elif kept_ci[ci[i]]:
                r = 4
            elif near_image and ph[i] >= 0:
                p = ph[i]
                if kept_ph[p]:
                    r = 5
                else:
                    for j in range(indptr[p], indptr[p + 1]):
                        if kept_ph[nbr[j]]:
                            r = 5
                            break
            if r:
                out[i] = r
                continue
        kept_url[url[i]] = True
        kept_key[key[i]] = True
        kept_sha[sha[i]] = True
        kept_ci[ci[i]] = True
        if ph[i] >= 0:
            kept_ph[ph[i]] = True


@functools.lru_cache(maxsize=1)
def _compiled_loop():
    return _keep_first_loop if njit is None else njit(cache=True, nogil=True)(_keep_first_loop)


def _mix(x):  # pragma: no cover - compiled
    """splitmix64's finaliser: a 64-bit value's bits spread over all 64 (slot and fingerprint)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


if njit is not None:  # compiled into the loops below
    _mix = njit(cache=True, nogil=True, inline="always")(_mix)


def _member_loop(members, h, valid, out):  # pragma: no cover - compiled
    """out[i] = True where valid row i's 64-bit value ``h[i]`` is one of ``members``: they go into
    an open-addressing set (linear probing, at most half full), and each row looks its value up
    there. :func:`repeated` passes only the values that repeat, so the set stays in the cache,
    where a table of every value would not (2-3x faster at 1M rows)."""
    size = 2
    while size < 2 * len(members):
        size *= 2
    mask = np.uint64(size - 1)
    keys = np.empty(size, np.uint64)
    used = np.zeros(size, np.bool_)
    for i in range(len(members)):
        x = np.uint64(members[i])
        j = np.int64(_mix(x) & mask)
        while used[j] and keys[j] != x:
            j = (j + 1) & (size - 1)
        keys[j] = x
        used[j] = True
    for i in range(len(h)):
        if not valid[i]:
            continue
        x = np.uint64(h[i])
        j = np.int64(_mix(x) & mask)
        while used[j]:
            if keys[j] == x:
                out[i] = True
                break
            j = (j + 1) & (size - 1)


def _same_strings_loop(ids, data, starts, ends):  # pragma: no cover - compiled
    """True when every row i with ids[i] = f >= 0 holds the same bytes as row f."""
    for i in range(len(ids)):
        f = ids[i]
        if f < 0 or f == i:
            continue
        a, b, fa = starts[i], ends[i], starts[f]
        if b - a != ends[f] - fa:
            return False
        for k in range(b - a):
            if data[a + k] != data[fa + k]:
                return False
    return True


def _first_loop(h, valid, ids):  # pragma: no cover - compiled
    """ids[i] = the first valid position holding the 64-bit value ``h[i]``, -1 where invalid: an
    open-addressing map whose 8-byte slots pack a 32-bit fingerprint of the value with the
    position, so that the map of 200k values stays within the cache."""
    n = len(h)
    size = 2
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    slots = np.zeros(size, np.uint64)  # 0: empty; else fingerprint << 32 | (position + 1)
    low = np.uint64(0xFFFFFFFF)
    for i in range(n):
        if not valid[i]:
            ids[i] = -1
            continue
        x = np.uint64(h[i])
        z = _mix(x)
        fp = z >> np.uint64(32)
        j = np.int64(z & mask)
        f = -1
        while slots[j] != 0:
            e = slots[j]
            if (e >> np.uint64(32)) == fp:
                g = np.int64(e & low) - 1
                if np.uint64(h[g]) == x:
                    f = g
                    break
            j = (j + 1) & (size - 1)
        if f < 0:
            slots[j] = (fp << np.uint64(32)) | np.uint64(i + 1)
            f = i
        ids[i] = f


@functools.lru_cache(maxsize=1)
def _compiled_first():
    return None if njit is None else njit(cache=True, nogil=True)(_first_loop)


def first_ids(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """For each 64-bit value, the first position (among the ``valid`` ones) holding the same
    value; -1 at invalid positions. Equal values get equal ids, and ids are within [0, n)."""
    values = np.ascontiguousarray(values).view(np.uint64) if np.asarray(values).dtype.itemsize == 8 \
        else np.asarray(values, np.int64).view(np.uint64)
    valid = np.ones(len(values), np.bool_) if valid is None else np.ascontiguousarray(valid, np.bool_)
    ids = np.empty(len(values), np.int64)
    loop = _compiled_first()
    if loop is not None and len(values) < 2**31:  # positions are packed in 32 bits
        loop(values, valid, ids)
        return ids
    idx = np.flatnonzero(valid)  # pragma: no cover - numba is a dependency
    _, first, inv = np.unique(values[idx], return_index=True, return_inverse=True)  # pragma: no cover
    ids[:] = -1  # pragma: no cover
    ids[idx] = idx[first][inv.reshape(-1)]  # pragma: no cover
    return ids  # pragma: no cover


@functools.lru_cache(maxsize=1)
def _compiled_same():
    return None if njit is None else njit(cache=True, nogil=True)(_same_strings_loop)


def string_group_ids(values: pa.Array, hashes: np.ndarray) -> np.ndarray | None:
    """A group id per string: the position of the first row holding the same string (rows in
    [0, n)), or n + i for a null at row i; grouped by the strings' 64-bit ``hashes``
    (:func:`first_ids`), then every row's bytes are compared with its group's first in one
    compiled pass. None when a hash collision put two different strings together, or without
    numba (the caller then groups by the values themselves)."""
    same = _compiled_same()
    if same is None:  # pragma: no cover - numba is a dependency
        return None
    from clipline.components.curate.language import string_buffers

    n = len(values)
    valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), np.bool_) if values.null_count \
        else np.ones(n, np.bool_)
    ids = first_ids(hashes, valid)
    data, starts, ends = string_buffers(values)
    if not same(ids, data, starts, ends):
        return None
    return np.where(valid, ids, n + np.arange(n, dtype=np.int64)) if values.null_count else ids


@functools.lru_cache(maxsize=1)
def _compiled_repeated():
    return None if njit is None else njit(cache=True, nogil=True)(_member_loop)


def repeated(values: np.ndarray, valid: np.ndarray | None = None, also: np.ndarray | None = None) -> np.ndarray:
    """True where a 64-bit value (e.g. a hash of a URL) occurs at more than one position, among
    the ``valid`` positions (all by default; the others are False), or is one of ``also``. Exact
    on the values: equal values repeat, nothing else. numpy's sort (it releases the GIL) finds
    the values that repeat, then one compiled pass marks the rows holding them (numpy's isin
    where numba is missing)."""
    values = np.ascontiguousarray(values).view(np.uint64) if np.asarray(values).dtype.itemsize == 8 \
        else np.asarray(values, np.int64).view(np.uint64)
    all_valid = valid is None
    valid = np.ones(len(values), np.bool_) if valid is None else np.ascontiguousarray(valid, np.bool_)
    s = np.sort(values if all_valid else values[valid])
    members = s[1:][s[1:] == s[:-1]]
    if also is not None:
        members = np.concatenate([members, np.asarray(also).reshape(-1).astype(np.int64).view(np.uint64)])
    out = np.zeros(len(values), np.bool_)
    if len(members) == 0:
        return out
    loop = _compiled_repeated()
    if loop is not None:
        loop(members, values, valid, out)
        return out
    return valid & np.isin(values, members)  # pragma: no cover - numba is a dependency


def keep_first_codes(inp: DedupInput, opts: DedupOptions, compiled: bool = True) -> np.ndarray:
    """The drop reason of every row as an int8 code (0 = kept, else ``REASONS[code - 1]``) under
    the keep-first rule. Without the caption rule the visit is one compiled loop over dense group
    ids (``compiled=False``: the same loop in Python); with it, :func:`keep_first`'s Python loop."""
    n = len(inp.is_parent)
    if n == 0:
        return np.zeros(0, np.int8)
    if opts.near_caption and inp.captions is not None:
        names = keep_first(inp, opts)
        codes = np.zeros(n, np.int8)
        for k, name in enumerate(REASONS, 1):
            codes[names == name] = k
        return codes
    ph = np.asarray(inp.ph_g, np.int64)
    pairs = np.asarray(inp.ph_pairs, np.int64).reshape(-1, 2)
    bound = 4 * (n + len(pairs)) + 16
    if not opts.near_image:
        ph_dense, pairs, k = np.full(n, -1, np.int64), pairs[:0], 0
    elif ph.max() < bound and pairs.min(initial=0) >= 0 and pairs.max(initial=-1) < bound:
        # small non-negative ids (the stage passes positions): used as they are; an id of a pair
        # that no row has is simply never kept
        ph_dense = np.where(ph >= 0, ph, -1)
        k = int(max(ph.max(), pairs.max(initial=-1))) + 1
    else:  # any other ids: renumbered 0..k-1
        valid = ph >= 0
        ph_ids = unique_sorted(ph[valid])
        ph_dense = np.full(n, -1, np.int64)
        ph_dense[valid] = np.searchsorted(ph_ids, ph[valid])
        k = len(ph_ids)
        if len(pairs) and k:
            a = np.searchsorted(ph_ids, pairs[:, 0]).clip(0, k - 1)
            b = np.searchsorted(ph_ids, pairs[:, 1]).clip(0, k - 1)
            ok = (ph_ids[a] == pairs[:, 0]) & (ph_ids[b] == pairs[:, 1])  # pairs of phashes no row has: irrelevant
            pairs = np.stack([a[ok], b[ok]], axis=1)
        else:
            pairs = pairs[:0]
    both = np.concatenate([pairs, pairs[:, ::-1]])  # neighbours of each id, as CSR (indptr, nbr)
    nbr = both[np.argsort(both[:, 0], kind="stable"), 1]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(both[:, 0], minlength=k))])
    out = np.zeros(n, np.int8)
    loop = _compiled_loop() if compiled else _keep_first_loop
    loop(np.asarray(inp.is_parent, np.bool_), _dense(inp.url_g), _dense(inp.key_g), _dense(inp.sha_g),
         _dense(inp.capimg_g), ph_dense, indptr.astype(np.int64), nbr, bool(opts.same_image), bool(opts.near_image), out)
    return out


def keep_first(inp: DedupInput, opts: DedupOptions) -> np.ndarray:
    """The drop reason for every row (None = kept) under the keep-first rule."""
    n = len(inp.is_parent)
    reasons = np.full(n, None, dtype=object)
    if n == 0:
        return reasons
    nbrs: dict[int, list[int]] = {}
    involved = _involved(inp.url_g) | _involved(inp.key_g) | _involved(inp.capimg_g)
    if opts.same_image:
        involved |= _involved(inp.sha_g)
    if opts.near_image:
        ph_valid = inp.ph_g >= 0
        involved |= _involved(np.where(ph_valid, inp.ph_g, -np.arange(1, n + 1))) & ph_valid
        for a, b in inp.ph_pairs.tolist():
            nbrs.setdefault(a, []).append(b)
            nbrs.setdefault(b, []).append(a)
        if nbrs:
            involved |= np.isin(inp.ph_g, np.fromiter(nbrs.keys(), dtype=np.int64))
    lsh = minhashes = None
    if opts.near_caption and inp.captions is not None:
        from datasketch import MinHash, MinHashLSH

        involved[:] = True
        lsh = MinHashLSH(threshold=opts.minhash_threshold, num_perm=opts.minhash_perm)
        minhashes = MinHash.bulk([_shingles(c or "", opts.shingle_chars) for c in inp.captions],
                                 num_perm=opts.minhash_perm, seed=1)
    kept_url: set[int] = set()
    kept_key: set[int] = set()
    kept_sha: set[int] = set()
    kept_ci: set[int] = set()
    kept_ph: set[int] = set()
    url_g, key_g, sha_g = inp.url_g.tolist(), inp.key_g.tolist(), inp.sha_g.tolist()
    ci_g, ph_g = inp.capimg_g.tolist(), inp.ph_g.tolist()
    parent = inp.is_parent.tolist()
    for i in np.flatnonzero(involved).tolist():
        if not parent[i]:
            reason = None
            if url_g[i] in kept_url:
                reason = "dup_url"
            elif key_g[i] in kept_key:
                reason = "dup_key"
            elif opts.same_image and sha_g[i] in kept_sha:
                reason = "dup_image"
            elif ci_g[i] in kept_ci:
                reason = "dup_caption_image"
            elif opts.near_image and ph_g[i] >= 0 and (
                    ph_g[i] in kept_ph or any(x in kept_ph for x in nbrs.get(ph_g[i], ()))):
                reason = "near_dup_image"
            elif lsh is not None:
                mh = minhashes[i]
                if any(mh.jaccard(minhashes[j]) >= opts.minhash_threshold for j in lsh.query(mh)):
                    reason = "near_dup_caption"
            if reason is not None:
                reasons[i] = reason
                continue
        kept_url.add(url_g[i])
        kept_key.add(key_g[i])
        kept_sha.add(sha_g[i])
        kept_ci.add(ci_g[i])
        if ph_g[i] >= 0:
            kept_ph.add(ph_g[i])
        if lsh is not None:
            lsh.insert(i, minhashes[i], check_duplication=False)
    return reasons
